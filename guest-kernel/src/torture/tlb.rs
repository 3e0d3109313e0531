//! tlbtorture: user tasks on several CPUs keep reading one page of a shared address space
//! while a kernel thread on another CPU remaps it to a new frame, shoots the old
//! translation down and then poisons the old frame (bit 63). A reader that ever reads poison
//! used a stale TLB entry: the shootdown missed it. Where the hypervisor hides stale
//! translations (shadow paging applies guest PTE writes at once), the protocol is checked
//! too, from each CPU's own evidence rather than from the sender's target mask: every CPU
//! that may hold the old translation when the page table changes must, by the time the
//! shootdown returns, have counted a flush of the writer's request (`tlb::served`) or a CR3
//! load (`tlb::full_flushes`) made after the change; `missed_flushes` counts those that did
//! not. Churner tasks meanwhile map and unmap pages of their own, so shootdowns also come
//! from several CPUs at once, each the target of the others; their page flushes do not
//! count as evidence for the watched page.
//!
//! With KVM's PV TLB flush (`kvm=pvtlb`) a preempted holder is not interrupted: the sender
//! sets its flush flag and KVM flushes it at its next entry. That counts as evidence only
//! if the sender's compare-and-exchange succeeded (`tlb::deferred`) and the holder's
//! steal-time `version` then moves: KVM bumps it after it has exchanged the flag away and
//! flushed. `tlb=defer-noflag` skips such holders without the flag, and must fail.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering::SeqCst};

use super::StartGate;
use crate::arch::tsc;
use crate::mm::aspace::AddressSpace;
use crate::mm::frame::StaticFrame;
use crate::sched::Task;
use crate::user::{self, Program, USER_DATA_VA};
use crate::{println, sched, tlb};

const POISON: u64 = 1 << 63;
const WATCH_VA: u64 = USER_DATA_VA;
/// Tasks (readers and churners) the counter pages have room for: the default (a reader
/// per CPU and two churners) at NR_CPUS, twice over.
const MAX_TASKS: usize = 2 * pvsync_guest::NR_CPUS;
const COUNTERS_VA: u64 = USER_DATA_VA + 0x10_0000;
const SCRATCH_VA: u64 = COUNTERS_VA + MAX_TASKS as u64 * 4096;
/// Frames the watched page rotates through.
const POOL: usize = 16;
const _: () = assert!(SCRATCH_VA + MAX_TASKS as u64 * 4096 <= crate::user::USER_WORKLOAD_VA);

/// Writes `v` into the first word of a frame of the pool (user tasks only read it).
fn frame_write(f: StaticFrame, v: u64) {
    f.write(0, v);
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
            Program::TlbReader,
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
            Program::Churn,
            SCRATCH_VA + i as u64 * 4096,
            cva,
            i as u64,
            before,
        )
    }
}

/// Tells the tasks counting into the pages at `counters` (user addresses in `aspace`) to
/// exit.
fn stop(aspace: &AddressSpace, counters: &[u64]) {
    for &c in counters {
        // The stop word of each counter page is at +16.
        assert!(aspace.write_u64(c + 16, 1), "counter page unmapped");
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
    let pool: Vec<StaticFrame> = (0..POOL)
        .map(|_| StaticFrame::alloc().expect("tlbtorture frame"))
        .collect();
    frame_write(pool[0], 0);
    aspace
        .map(WATCH_VA, pool[0].frame(), false, false)
        .expect("map watched page");

    // Started tasks wait in the kernel until all exist: user readers spinning on every other
    // CPU would leave this (spawning) vCPU little host time.
    let gate = StartGate::new();
    let mut counters = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..ntasks {
        let cva = COUNTERS_VA + i as u64 * 4096;
        let cpu = worker_cpus[i % worker_cpus.len()];
        let started = user::map_zeroed(&aspace, cva, true)
            .map_err(|_| "no free frame for its counter page")
            .and_then(|_| {
                counters.push(cva);
                start(i, readers, cpu, &aspace, cva, &gate)
            });
        match started {
            Ok(t) => tasks.push(t),
            Err(why) => {
                stop(&aspace, &counters);
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
    let me = crate::percpu::id();
    // The evidence counts this task's requests (the churners' do not count).
    tlb::watch_sender(me);
    let (shootdowns_before, yields_before) = tlb::stats();
    let end = tsc::now() + tsc::us_to_cycles(duration_ms * 1000);
    let mut gen = 0u64;
    let mut missed = 0u64;
    // At least one remap, however long this vCPU was kept off the CPU.
    while gen == 0 || tsc::now() < end {
        gen += 1;
        let next = pool[gen as usize % POOL];
        frame_write(next, gen);
        let old = aspace
            .update(WATCH_VA, Some((next.frame(), false)))
            .expect("remap")
            .expect("was mapped");
        let old = *pool
            .iter()
            .find(|f| f.frame() == old)
            .expect("the watched page maps a frame of the pool");
        // The page-table store is visible before the evidence is read (x86 lets a load pass
        // an earlier store).
        fence(SeqCst);
        // Each CPU's evidence so far, then the CPUs that may hold the old translation. Read
        // in this order, a CPU found in the set either stays there until the shootdown reads
        // it (and must serve this request) or leaves it, and a CPU counts its CR3 load only
        // once out of the set (mm::aspace::switch): either way its evidence moves after
        // this read. A flush before the change proves nothing, so none is counted.
        let evidence: Vec<(u32, u64, u64, u64)> = cpus
            .iter()
            .map(|&c| (c, tlb::served(c), tlb::full_flushes(c), tlb::deferred(c)))
            .collect();
        let holders = aspace.cpus();
        tlb::shootdown(&aspace, WATCH_VA, 1);
        // Evidence from each holder, not from the sender's target set: it flushed this
        // sender's request or reloaded CR3 since the change. (With more than one CPU this
        // task is the only sender on its CPU: the churners run on the others.)
        // A holder that left the address space meanwhile (the shootdown then skips it) counts
        // its CR3 load only after leaving: its count is bound to move, so wait for it (a
        // vCPU preempted in between would otherwise look like a missed flush).
        let flushed = |c: u32, served: u64, reloads: u64, deferred: u64| {
            tlb::served(c) != served
                || tlb::full_flushes(c) != reloads
                || (tlb::deferred(c) != deferred && host_flushed(c))
                || (!aspace.cpus().contains(c)
                    && eventually_within_ms(LEFT_WAIT_MS, || tlb::full_flushes(c) != reloads))
        };
        missed += evidence
            .iter()
            .filter(|&&(c, served, reloads, deferred)| {
                holders.contains(c) && !flushed(c, served, reloads, deferred)
            })
            .count() as u64;
        // Every CPU has dropped the old translation: nobody may read this any more.
        frame_write(old, POISON | (gen - 1));
        sched::yield_now();
    }
    stop(&aspace, &counters);
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

/// How long a holder that left the address space gets to count its CR3 load.
const LEFT_WAIT_MS: u64 = 100;
/// How long a holder whose flush was left to KVM gets to run again (its steal-time version
/// moves at its next entry; a preempted vCPU waits for its next turn).
const HOST_FLUSH_WAIT_MS: u64 = 5000;

/// Whether KVM has dealt with CPU `c`'s steal-time area since the shootdown that left its
/// flush to KVM returned (read after the sender's compare-and-exchange): KVM exchanges the
/// flag away, flushing, before it bumps the version.
fn host_flushed(c: u32) -> bool {
    let Some(v) = crate::arch::kvm::steal_version(c) else {
        return false;
    };
    eventually_within_ms(HOST_FLUSH_WAIT_MS, || {
        crate::arch::kvm::steal_version(c) != Some(v)
    })
}

/// Whether `cond` holds within `ms` milliseconds (polled, yielding in between).
fn eventually_within_ms(ms: u64, cond: impl Fn() -> bool) -> bool {
    let end = tsc::now() + tsc::us_to_cycles(ms * 1000);
    while tsc::now() < end {
        if cond() {
            return true;
        }
        sched::yield_now();
    }
    cond()
}
