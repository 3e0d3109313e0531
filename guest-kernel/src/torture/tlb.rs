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
use core::ptr::{read_volatile, write_volatile};
use x86_64::structures::paging::PhysFrame;

use super::StartGate;
use crate::arch::tsc;
use crate::mm::aspace::AddressSpace;
use crate::sched::Task;
use crate::user::{self, USER_DATA_VA};
use crate::{println, sched, tlb};

const POISON: u64 = 1 << 63;
const WATCH_VA: u64 = USER_DATA_VA;
const COUNTERS_VA: u64 = USER_DATA_VA + 0x10_0000;
const SCRATCH_VA: u64 = USER_DATA_VA + 0x20_0000;
/// Frames the watched page rotates through.
const POOL: usize = 16;
/// Tasks (readers and churners) the counter pages have room for.
const MAX_TASKS: usize = ((SCRATCH_VA - COUNTERS_VA) / 4096) as usize;

fn frame_write(f: PhysFrame, v: u64) {
    // SAFETY: a frame of this test's pool, identity-mapped; user tasks only read it.
    unsafe { write_volatile(f.start_address().as_u64() as *mut u64, v) }
}

/// Starts task `i`: a reader if `i < readers`, else a churner, counting into the page at
/// user address `cva`.
fn start(
    i: usize,
    readers: usize,
    cpu: u32,
    aspace: &Arc<AddressSpace>,
    cva: u64,
    gate: &Arc<StartGate>,
) -> Result<Arc<Task>, &'static str> {
    let gate = gate.clone();
    let before = move || {
        gate.wait();
    };
    if i < readers {
        user::try_spawn(
            cpu,
            "tlb_reader",
            aspace.clone(),
            user::user_tlb_reader,
            WATCH_VA,
            cva,
            i as u64,
            before,
        )
    } else {
        user::try_spawn(
            cpu,
            "tlb_churn",
            aspace.clone(),
            user::user_churn,
            SCRATCH_VA + i as u64 * 4096,
            cva,
            i as u64,
            before,
        )
    }
}

/// Tells the tasks counting into `counters` (physical addresses) to exit.
fn stop(counters: &[u64]) {
    for &c in counters {
        // SAFETY: the counter pages are this test's frames; the stop word is at +16.
        unsafe { write_volatile((c + 16) as *mut u64, 1) };
    }
}

pub fn run(readers: usize, churners: usize, duration_ms: u64) -> bool {
    let ntasks = readers + churners;
    if ntasks > MAX_TASKS {
        println!(
            "FAILURE: tlbtorture runs at most {MAX_TASKS} user tasks; {readers} readers and {churners} churners asked (threads=N gives N/2 readers)"
        );
        return false;
    }
    // Per task a counter page and a user stack, a churner's scratch page, the pool, and
    // page tables.
    let frames = (2 * ntasks + churners + POOL + 16) as u64;
    if !super::fits("tlbtorture", ntasks, 0, frames) {
        return false;
    }
    let cpus = super::cpus();
    // The writer is this task; workers go to the other CPUs when there are any.
    let worker_cpus: Vec<u32> = if cpus.len() > 1 {
        cpus[1..].to_vec()
    } else {
        cpus.clone()
    };
    let aspace = Arc::new(AddressSpace::new());
    user::map_programs(&aspace);
    let pool: Vec<PhysFrame> = (0..POOL)
        .map(|_| crate::mm::frame::alloc().expect("tlbtorture frame"))
        .collect();
    frame_write(pool[0], 0);
    aspace
        .map(WATCH_VA, pool[0], false, false)
        .expect("map watched page");

    // Started tasks wait in the kernel until all exist: user readers spinning on every other
    // CPU would leave this (spawning) vCPU little host time.
    let gate = StartGate::new(duration_ms);
    let mut counters = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..ntasks {
        let cva = COUNTERS_VA + i as u64 * 4096;
        let cpu = worker_cpus[i % worker_cpus.len()];
        let started = user::map_zeroed(&aspace, cva, true)
            .map_err(|_| "no free frame for its counter page")
            .and_then(|c| {
                counters.push(c);
                start(i, readers, cpu, &aspace, cva, &gate)
            });
        match started {
            Ok(t) => tasks.push(t),
            Err(why) => {
                stop(&counters);
                gate.open();
                tasks.iter().for_each(|t| {
                    sched::join(t);
                });
                println!(
                    "FAILURE: tlbtorture: task {i} of {ntasks} could not start: {why}; give the VM more memory (--mem)"
                );
                return false;
            }
        }
    }

    gate.open();
    let (shootdowns_before, yields_before) = tlb::stats();
    let end = tsc::now() + tsc::us_to_cycles(duration_ms * 1000);
    let mut gen = 0u64;
    let mut missed = 0u64;
    // At least one remap, however long this vCPU was kept off the CPU.
    while gen == 0 || tsc::now() < end {
        gen += 1;
        let next = pool[gen as usize % POOL];
        frame_write(next, gen);
        // CPUs that may cache the old translation, and their CR3 reloads so far.
        let holders = aspace.cpus();
        let before: Vec<(u32, u64)> = (0..64u32)
            .filter(|c| holders & (1 << c) != 0)
            .map(|c| (c, tlb::cr3_reloads(c)))
            .collect();
        let old = aspace
            .update(WATCH_VA, Some((next, false)))
            .expect("remap")
            .expect("was mapped");
        let reached = tlb::shootdown(&aspace, WATCH_VA, 1);
        // A holder this shootdown did not reach must at least have reloaded CR3 meanwhile.
        missed += before
            .iter()
            .filter(|&&(c, n)| reached & (1 << c) == 0 && tlb::cr3_reloads(c) == n)
            .count() as u64;
        // Every CPU has dropped the old translation: nobody may read this any more.
        frame_write(old, POISON | (gen - 1));
        sched::yield_now();
    }
    stop(&counters);
    let codes: Vec<u64> = tasks.iter().map(sched::join).collect();
    let read = |c: u64, off: u64| {
        // SAFETY: as above.
        unsafe { read_volatile((c + off) as *const u64) }
    };
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
