//! tlbtorture: user tasks on several CPUs keep reading one page of a shared address space
//! while a kernel thread on another CPU remaps it to a new frame, shoots the old
//! translation down and then poisons the old frame (bit 63). A reader that ever reads poison
//! used a stale TLB entry: the shootdown missed it. Where the hypervisor hides stale
//! translations (shadow paging applies guest PTE writes at once), the protocol is checked
//! too: every CPU that had the space loaded must have been reached by the shootdown (or have
//! reloaded CR3) by the time it returns. Churner tasks meanwhile map and unmap
//! pages of their own, so shootdowns also come from several CPUs at once, each the target of
//! the others.

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::arch::tsc;
use crate::mm::aspace::AddressSpace;
use crate::mm::frame::StaticFrame;
use crate::user::{self, Program, USER_DATA_VA};
use crate::{println, sched, tlb};

const POISON: u64 = 1 << 63;
const WATCH_VA: u64 = USER_DATA_VA;
const COUNTERS_VA: u64 = USER_DATA_VA + 0x10_0000;
const SCRATCH_VA: u64 = USER_DATA_VA + 0x20_0000;
/// Frames the watched page rotates through.
const POOL: usize = 16;

/// Writes `v` into the first word of a frame of the pool (user tasks only read it).
fn frame_write(f: StaticFrame, v: u64) {
    f.write(0, v);
}

pub fn run(readers: usize, churners: usize, duration_ms: u64) -> bool {
    let cpus = super::cpus();
    // The writer is this task; workers go to the other CPUs when there are any.
    let worker_cpus: Vec<u32> = if cpus.len() > 1 {
        cpus[1..].to_vec()
    } else {
        cpus.clone()
    };
    let aspace = Arc::new(AddressSpace::new());
    user::map_programs(&aspace);
    let pool: Vec<StaticFrame> = (0..POOL)
        .map(|_| StaticFrame::alloc().expect("tlbtorture frame"))
        .collect();
    frame_write(pool[0], 0);
    aspace
        .map(WATCH_VA, pool[0].frame(), false, false)
        .expect("map watched page");

    let mut counters = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..readers + churners {
        let cva = COUNTERS_VA + i as u64 * 4096;
        user::map_zeroed(&aspace, cva, true).expect("counter page");
        counters.push(cva);
        let cpu = worker_cpus[i % worker_cpus.len()];
        tasks.push(if i < readers {
            user::spawn(
                cpu,
                "tlb_reader",
                aspace.clone(),
                Program::TlbReader,
                WATCH_VA,
                cva,
                i as u64,
            )
        } else {
            user::spawn(
                cpu,
                "tlb_churn",
                aspace.clone(),
                Program::Churn,
                SCRATCH_VA + i as u64 * 4096,
                cva,
                i as u64,
            )
        });
    }

    let (shootdowns_before, yields_before) = tlb::stats();
    let end = tsc::now() + tsc::us_to_cycles(duration_ms * 1000);
    let mut gen = 0u64;
    let mut missed = 0u64;
    while tsc::now() < end {
        gen += 1;
        let next = pool[gen as usize % POOL];
        frame_write(next, gen);
        // CPUs that may cache the old translation, and their flushes so far.
        let before: Vec<(u32, u64)> = aspace.cpus().iter().map(|c| (c, tlb::flushes(c))).collect();
        let old = aspace
            .update(WATCH_VA, Some((next.frame(), false)))
            .expect("remap")
            .expect("was mapped");
        let old = *pool
            .iter()
            .find(|f| f.frame() == old)
            .expect("the watched page maps a frame of the pool");
        tlb::shootdown(&aspace, WATCH_VA, 1);
        // Evidence from each holder, not from the sender's target set: every CPU that may
        // have cached the old translation has flushed since (served the request, or
        // reloaded CR3).
        missed += before
            .iter()
            .filter(|&&(c, n)| tlb::flushes(c) == n)
            .count() as u64;
        // Every CPU has dropped the old translation: nobody may read this any more.
        frame_write(old, POISON | (gen - 1));
        sched::yield_now();
    }
    for &c in &counters {
        // The stop word of each counter page is at +16.
        assert!(aspace.write_u64(c + 16, 1), "counter page unmapped");
    }
    let codes: Vec<u64> = tasks.iter().map(sched::join).collect();
    let read = |c: u64, off: u64| aspace.read_u64(c + off).expect("counter page unmapped");
    let stale: u64 = counters[..readers].iter().map(|&c| read(c, 0)).sum();
    let reads: u64 = counters[..readers].iter().map(|&c| read(c, 8)).sum();
    let churns: u64 = counters[readers..].iter().map(|&c| read(c, 8)).sum();
    let (sd, y) = tlb::stats();
    let failed_tasks = codes.iter().filter(|&&c| c != 0).count();
    println!(
        "RESULT tlbtorture readers={readers} churners={churners} remaps={gen} reads={reads} stale={stale} missed_flushes={missed} churn_rounds={churns} shootdowns={} yields={} failed_tasks={failed_tasks}",
        sd - shootdowns_before,
        y - yields_before
    );
    stale == 0 && missed == 0 && reads > 0 && gen > 0 && failed_tasks == 0
}
