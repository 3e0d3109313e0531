//! Boot register state of the bootstrap vCPU for the PVH entry: 32-bit protected mode,
//! flat segments, paging off, %ebx = start info. Application processors need none: they
//! wait in KVM for INIT-SIPI-SIPI from the guest.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// RFLAGS bit 1 is reserved and must be set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

const SEG_TYPE_CODE_EXEC_READ_ACCESSED: u8 = 0xb;
const SEG_TYPE_DATA_READ_WRITE_ACCESSED: u8 = 0x3;
const CODE_SELECTOR: u16 = 0x8;
const DATA_SELECTOR: u16 = 0x10;

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Updates `sregs` (as read from the fresh vCPU) for the PVH entry.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = flat_segment(CODE_SELECTOR, SEG_TYPE_CODE_EXEC_READ_ACCESSED);
    let data = flat_segment(DATA_SELECTOR, SEG_TYPE_DATA_READ_WRITE_ACCESSED);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers for the PVH entry.
pub fn pvh_regs(entry: u64, start_info: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: start_info,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_state_matches_the_protocol() {
        let s = pvh_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(s.cs.db, 1);
        assert_eq!(s.cs.l, 0);
        assert_eq!(s.cs.type_, 0xb);
        assert_eq!(s.ss.type_, 0x3);
        let r = pvh_regs(0x10_0000, 0x6000);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0000, 0x6000, 2));
    }
}
