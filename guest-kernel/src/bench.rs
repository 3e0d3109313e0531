//! `test=bench`: guest-side latencies in TSC cycles (medians), for `run.sh bench guest`,
//! which runs it with one vCPU per host core and with 2x overcommit, side by side.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::tsc;
use crate::locks::{KernelLock, RawLock, SpinLock, TicketLock};
use crate::mm::aspace::AddressSpace;
use crate::user::{self, Program, USER_DATA_VA};
use crate::{println, rcu, sched, tlb, torture};

const ROUNDS: usize = 200;

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

static LOCK: SpinLock<u64, TicketLock> = SpinLock::new(TicketLock::new(), 0);
static KERNEL_LOCK: KernelLock<u64> = SpinLock::kernel(0);

fn ipi_round_trip() -> u64 {
    let Some(&target) = torture::cpus().get(1) else {
        return 0;
    };
    median((0..ROUNDS).map(|_| tlb::ping_round_trip(target)).collect())
}

/// Shootdown latency with user tasks of one address space on `targets` other CPUs.
fn shootdown(targets: usize) -> u64 {
    let cpus = torture::cpus();
    if cpus.len() < 2 || targets == 0 {
        return 0;
    }
    let aspace = Arc::new(AddressSpace::new());
    user::map_programs(&aspace);
    let page = crate::mm::frame::alloc().expect("bench frame");
    aspace.map(USER_DATA_VA, page, false, false).expect("map");
    let mut counters = Vec::new();
    let tasks: Vec<_> = (0..targets)
        .map(|i| {
            let cva = USER_DATA_VA + 0x10_0000 + i as u64 * 4096;
            user::map_zeroed(&aspace, cva, true).expect("counter");
            counters.push(cva);
            let cpu = cpus[1 + i % (cpus.len() - 1)];
            user::spawn(
                cpu,
                "bench_reader",
                aspace.clone(),
                Program::TlbReader,
                USER_DATA_VA,
                cva,
                i as u64,
            )
        })
        .collect();
    // Wait until every reader runs (its CPU joined the address space).
    while (aspace.cpus().len()) < targets.min(cpus.len() - 1) {
        sched::yield_now();
    }
    let samples = (0..ROUNDS)
        .map(|_| {
            let t0 = tsc::now();
            tlb::shootdown(&aspace, USER_DATA_VA, 1);
            tsc::now() - t0
        })
        .collect();
    for &c in &counters {
        // The stop word of each counter page is at +16.
        assert!(aspace.write_u64(c + 16, 1), "counter page unmapped");
    }
    tasks.iter().for_each(|t| {
        sched::join(t);
    });
    median(samples)
}

/// `preempt_disable` + `preempt_enable`: the cost every lock and RCU reader pays twice.
fn preempt_pair() -> u64 {
    median(
        (0..ROUNDS)
            .map(|_| {
                let t0 = tsc::now();
                crate::percpu::preempt_disable();
                crate::percpu::preempt_enable();
                tsc::now() - t0
            })
            .collect(),
    )
}

/// An uncontended kernel lock taken and released with `lock_irqsave` (the run-queue, heap
/// and console locks' pattern).
fn lock_irqsave_pair() -> u64 {
    median(
        (0..ROUNDS)
            .map(|_| {
                let t0 = tsc::now();
                drop(KERNEL_LOCK.lock_irqsave());
                tsc::now() - t0
            })
            .collect(),
    )
}

fn lock_uncontended() -> u64 {
    median(
        (0..ROUNDS)
            .map(|_| {
                let t0 = tsc::now();
                LOCK.raw().lock();
                let t = tsc::now() - t0;
                LOCK.raw().unlock();
                t
            })
            .collect(),
    )
}

/// Median acquire latency with one hammering thread per CPU.
fn lock_contended() -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(KernelLock::kernel(Vec::new()));
    let threads: Vec<_> = torture::cpus()
        .into_iter()
        .map(|c| {
            let (stop, samples) = (stop.clone(), samples.clone());
            sched::spawn(c, "bench_lock", move || {
                let mut mine = Vec::with_capacity(ROUNDS);
                while !stop.load(Ordering::Relaxed) && mine.len() < ROUNDS {
                    let t0 = tsc::now();
                    let mut g = LOCK.lock();
                    mine.push(tsc::now() - t0);
                    *g += 1;
                    for _ in 0..200 {
                        core::hint::spin_loop();
                    }
                }
                samples.lock().extend(mine);
            })
        })
        .collect();
    threads.iter().for_each(|t| {
        sched::join(t);
    });
    stop.store(true, Ordering::Relaxed);
    let all = core::mem::take(&mut *samples.lock());
    median(all)
}

fn sync_rcu() -> (u64, u64) {
    let samples: Vec<u64> = (0..20)
        .map(|_| {
            let t0 = tsc::now();
            rcu::synchronize();
            tsc::now() - t0
        })
        .collect();
    let max = samples.iter().copied().max().unwrap_or(0);
    (median(samples), max)
}

/// What two back-to-back TSC reads cost: the floor of every figure here (RDTSC may exit to
/// the hypervisor).
fn clock_overhead() -> u64 {
    median(
        (0..ROUNDS)
            .map(|_| {
                let t0 = tsc::now();
                tsc::now() - t0
            })
            .collect(),
    )
}

/// Round trip of a hypercall that has nothing to wait for: YieldTo naming the caller
/// itself (no one to boost) and a 1 us Idle. 0 without a pvsync host.
fn hypercall_round_trips() -> (u64, u64) {
    if !crate::shared::pv_host() {
        return (0, 0);
    }
    let me = crate::percpu::id();
    let time = |f: &dyn Fn()| {
        median(
            (0..ROUNDS)
                .map(|_| {
                    let t0 = tsc::now();
                    f();
                    tsc::now() - t0
                })
                .collect(),
        )
    };
    let yield_rtt = time(&|| crate::shared::yield_to(me));
    let idle_rtt = time(&|| {
        crate::shared::idle(1);
    });
    (yield_rtt, idle_rtt)
}

pub fn run() -> bool {
    let cpus = torture::cpus().len();
    let clock = clock_overhead();
    let (hc_yield, hc_idle) = hypercall_round_trips();
    let ipi = ipi_round_trip();
    let sd1 = shootdown(1);
    let sdn = shootdown(cpus.saturating_sub(1));
    let pp = preempt_pair();
    let lip = lock_irqsave_pair();
    let lu = lock_uncontended();
    let lc = lock_contended();
    let (rcu_med, rcu_max) = sync_rcu();
    println!(
        "RESULT bench cpus={cpus} tsc_khz={} clock_overhead={clock} hc_yield_rtt={hc_yield} hc_idle_rtt={hc_idle} ipi_rtt={ipi} shootdown_1={sd1} shootdown_n={sdn} lock_uncontended={lu} lock_contended={lc} sync_rcu={rcu_med} sync_rcu_max={rcu_max} preempt_pair={pp} lock_irqsave_pair={lip}",
        tsc::khz()
    );
    true
}
