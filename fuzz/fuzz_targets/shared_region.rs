//! A guest's shared region, any bytes at all: registration validation, then a snapshot and
//! the per-record checks, never panic. Half the inputs get a valid ABI 6 header over their
//! bytes, so the records, the bitmaps (with any count and any bits) and the partial
//! snapshots are fuzzed too, not only the header checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_abi::PageHeader;
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
    if data[2] & 2 == 2 {
        // A valid header over the fuzzer's bytes; its RCU fields stay the fuzzer's.
        let mut h = PageHeader::new(vm_vcpus, 0);
        let mut old = [0u8; 64];
        let _ = mem.read_slice(&mut old, GuestAddress(gpa));
        let old = PageHeader::from_bytes(&old);
        h.rcu_gp_seq = old.rcu_gp_seq;
        h.rcu_callbacks_pending = old.rcu_callbacks_pending;
        let _ = mem.write_slice(&h.to_bytes(), GuestAddress(gpa));
    }
    let kernel = 0..0x10_000;
    let ram = [0..RAM];
    if let Ok(reg) = host_vmm::shared_region::validate(&mem, gpa, vm_vcpus, &kernel, &ram) {
        use host_vmm::shared_region::Snapshot;
        if let Ok(snap) = Snapshot::take(&mem, &reg) {
            let _ = snap.invalid_records();
            let _ = snap.render();
        }
        let _ = Snapshot::take_some(&mem, &reg, &[data[0] as u32 % 9, u32::MAX]);
        let _ = Snapshot::take_holdouts(&mem, &reg);
    }
});
