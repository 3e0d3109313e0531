//! KVM paravirtual hypercalls (`vmcall` on Intel, `vmmcall` on AMD), used only when KVM
//! advertises the matching feature bit in CPUID 0x40000001.

use spin::Once;

use super::tsc::kvm_features;

const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const KVM_HC_SCHED_YIELD: u64 = 11;

fn is_amd() -> bool {
    static AMD: Once<bool> = Once::new();
    *AMD.call_once(|| {
        let r = core::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"AuthenticAMD" || &v == b"HygonGenuine"
    })
}

fn hypercall1(nr: u64, a0: u64) -> u64 {
    let ret: u64;
    // SAFETY: KVM hypercalls read rax/rbx and write rax only; they touch no guest memory for
    // the numbers used here. Callers check the feature bit first, so the instruction is
    // handled by KVM rather than raising #UD.
    unsafe {
        // rbx is reserved by LLVM: swap the argument in and out around the instruction.
        if is_amd() {
            core::arch::asm!("xchg {a0}, rbx", "vmmcall", "xchg {a0}, rbx", a0 = inout(reg) a0 => _, inout("rax") nr => ret, options(nostack));
        } else {
            core::arch::asm!("xchg {a0}, rbx", "vmcall", "xchg {a0}, rbx", a0 = inout(reg) a0 => _, inout("rax") nr => ret, options(nostack));
        }
    }
    ret
}

/// Whether KVM offers the PV sched-yield hypercall.
pub fn has_pv_sched_yield() -> bool {
    static HAS: Once<bool> = Once::new();
    *HAS.call_once(|| kvm_features() & KVM_FEATURE_PV_SCHED_YIELD != 0)
}

/// Asks KVM to run the vCPU with APIC ID `apic_id` (if it is preempted) in our place.
pub fn sched_yield(apic_id: u32) {
    if has_pv_sched_yield() {
        hypercall1(KVM_HC_SCHED_YIELD, apic_id as u64);
    }
}
