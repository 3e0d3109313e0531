//! Just enough ACPI to count CPUs: RSDP -> XSDT/RSDT -> MADT, local APIC and x2APIC entries.
//! Every table is checksummed and every length bounded before it is trusted.

use shared_abi::MAX_VCPUS;

use crate::arch::bootmem::{BootMemory, LIMIT};

/// Enabled local APIC IDs, in MADT order.
pub struct CpuList {
    ids: [u32; MAX_VCPUS],
    len: usize,
}

impl CpuList {
    pub fn from_count(n: usize) -> Self {
        let mut l = CpuList {
            ids: [0; MAX_VCPUS],
            len: 0,
        };
        for i in 0..n.min(MAX_VCPUS) {
            l.push(i as u32);
        }
        l
    }

    fn push(&mut self, id: u32) {
        assert!(
            self.len < MAX_VCPUS,
            "more than {MAX_VCPUS} CPUs in the MADT"
        );
        if !self.ids[..self.len].contains(&id) {
            self.ids[self.len] = id;
            self.len += 1;
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }
}

/// Firmware memory is viewed through the boot tables (`BootMemory`): every view borrows the
/// token, which `mm::init` consumes before the frame allocator may reuse that memory.
fn bytes(scope: &BootMemory, paddr: u64, len: usize) -> &[u8] {
    scope.bytes(paddr, len)
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Largest table believed.
const MAX_TABLE: usize = 1 << 20;

/// A checksummed SDT at `paddr`, or None.
fn table(scope: &BootMemory, paddr: u64) -> Option<&[u8]> {
    if paddr == 0 || paddr + 36 > LIMIT {
        return None;
    }
    let len = u32_at(bytes(scope, paddr, 36), 4) as usize;
    if !(36..=MAX_TABLE).contains(&len) || paddr + len as u64 > LIMIT {
        return None;
    }
    let t = bytes(scope, paddr, len);
    checksum_ok(t).then_some(t)
}

fn find_rsdp(scope: &BootMemory, hint: u64) -> Option<u64> {
    if hint != 0 {
        return (hint + 36 <= LIMIT).then_some(hint);
    }
    // Legacy location: the BIOS area, on 16-byte boundaries.
    (0xe0000u64..0x100000)
        .step_by(16)
        .find(|&a| bytes(scope, a, 8) == b"RSD PTR ")
}

/// Enabled CPUs from the MADT (read through the boot tables), or None when there is no
/// usable ACPI.
pub fn cpus_from_madt(scope: &BootMemory, rsdp_hint: u64) -> Option<CpuList> {
    let rsdp_addr = find_rsdp(scope, rsdp_hint)?;
    let rsdp = bytes(scope, rsdp_addr, 36);
    if &rsdp[..8] != b"RSD PTR " || !checksum_ok(&rsdp[..20]) {
        return None;
    }
    let (root, entry_size) = if rsdp[15] >= 2 && u64_at(rsdp, 24) != 0 {
        (table(scope, u64_at(rsdp, 24))?, 8)
    } else {
        (table(scope, u32_at(rsdp, 16) as u64)?, 4)
    };
    let madt = root[36..]
        .chunks_exact(entry_size)
        .map(|e| {
            if entry_size == 8 {
                u64_at(e, 0)
            } else {
                u32_at(e, 0) as u64
            }
        })
        .filter_map(|a| table(scope, a))
        .find(|t| &t[..4] == b"APIC")?;

    let mut cpus = CpuList {
        ids: [0; MAX_VCPUS],
        len: 0,
    };
    let mut off = 44;
    while off + 2 <= madt.len() {
        let (kind, len) = (madt[off], madt[off + 1] as usize);
        if len < 2 || off + len > madt.len() {
            break;
        }
        let e = &madt[off..off + len];
        match kind {
            0 if len >= 8 && u32_at(e, 4) & 1 != 0 => cpus.push(e[3] as u32),
            9 if len >= 16 && u32_at(e, 8) & 1 != 0 => cpus.push(u32_at(e, 4)),
            _ => {}
        }
        off += len;
    }
    (cpus.len > 0).then_some(cpus)
}
