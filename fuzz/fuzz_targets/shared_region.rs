//! A guest's shared region, any bytes at all: registration validation, then a snapshot and
//! the per-record checks, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM the region may lie in (1 MiB, from 0).
const RAM: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let vm_vcpus = 1 + (data[0] % 8) as u32;
    let gpa = (data[1] as u64 % 64) * 4096 + if data[2] & 1 == 1 { 8 } else { 0 };
    let body = &data[3..];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    mem.write_slice(
        &body[..body.len().min((RAM - gpa) as usize)],
        GuestAddress(gpa),
    )
    .unwrap();
    let kernel = 0..0x10_000;
    let ram = [0..RAM];
    if let Ok(reg) = host_vmm::shared_region::validate(&mem, gpa, vm_vcpus, &kernel, &ram) {
        if let Ok(snap) = host_vmm::shared_region::Snapshot::take(&mem, &reg) {
            let _ = snap.invalid_records();
            let _ = snap.render();
        }
    }
});
