//! A guest's event rings, any bytes at all and rewritten between drains: drains of every
//! vCPU's ring that never panic, never keep more events than the log's cap, and never copy
//! more than a ring holds per drain. The header is a valid one (the fuzzer chooses the vCPU
//! count and ring size) unless the first byte asks for raw bytes, so that the rings are
//! reached from the first run on; validation itself is the `shared_region` target's.
//! (`EventLog` also draws on a process-wide budget of events, spent after some thousands
//! of runs: from then on events are checked and counted but not kept.)
#![no_main]

use host_vmm::guest_events::{drain, EventLog, TscSync};
use libfuzzer_sys::fuzz_target;
use shared_abi::{PageHeader, MAX_EVENT_RING_ENTRIES, MIN_EVENT_RING_ENTRIES};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM the region may lie in (2 MiB, from 0).
const RAM: u64 = 2 << 20;
/// Events a log keeps: small, so the cap is reached too.
const LOG_CAP: usize = 64;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let vm_vcpus = 1 + (data[0] % 8) as u32;
    // Pages 0..63: a region of 8 vCPUs with 4096-entry rings (about 800 kB) still fits.
    let gpa = (data[1] as u64 % 64) * 4096;
    let drains = 1 + (data[2] % 4) as usize;
    let tsc_khz = data[3] as u32; // 0 too: a clock the host could not read
    let body = &data[4..];
    // The first part is the region; every later chunk is what the guest rewrites in it
    // before the next drain (offset, then bytes).
    let (region, mut rewrites) = body.split_at(body.len().min(64 * 1024));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    mem.write_slice(region, GuestAddress(gpa)).unwrap();
    if data[0] & 0x80 == 0 {
        // Rings of 8 to 4096 entries, chosen by the fuzzer.
        let shift = (data[0] >> 3) & 0xf;
        let entries = (MIN_EVENT_RING_ENTRIES << shift).min(MAX_EVENT_RING_ENTRIES);
        let header = PageHeader::new(vm_vcpus, entries);
        mem.write_slice(&header.to_bytes(), GuestAddress(gpa))
            .unwrap();
    }
    let kernel = 0..0x10_000;
    let ram = [0..RAM];
    let Ok(reg) = host_vmm::shared_region::validate(&mem, gpa, vm_vcpus, &kernel, &ram) else {
        return;
    };
    let mut logs: Vec<EventLog> = (0..reg.nr_vcpus + 1)
        .map(|_| EventLog::with_cap(LOG_CAP))
        .collect();
    let epoch = Instant::now();
    for _ in 0..drains {
        for (v, log) in logs.iter_mut().enumerate() {
            let before = log.events.len();
            let mut sync = || {
                (tsc_khz != 0).then_some(TscSync {
                    guest_tsc: u64::from(tsc_khz) << 20,
                    host: epoch,
                    tsc_khz,
                })
            };
            // vCPU `nr_vcpus` is out of range: nothing is read.
            drain(&mem, &reg, v as u32, log, &mut sync).unwrap();
            let copied = log.events.len() - before;
            assert!(log.events.len() <= LOG_CAP);
            assert!(copied <= reg.event_ring_entries as usize);
        }
        if rewrites.len() >= 4 {
            let at =
                u32::from_le_bytes([rewrites[0], rewrites[1], rewrites[2], 0]) as u64 % reg.size;
            let n = (rewrites[3] as usize).min(rewrites.len() - 4);
            let n = n.min((reg.size - at) as usize);
            mem.write_slice(&rewrites[4..4 + n], GuestAddress(reg.gpa + at))
                .unwrap();
            rewrites = &rewrites[4 + n..];
        }
    }
});
