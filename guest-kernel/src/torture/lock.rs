//! locktorture: writer threads on every CPU take one lock in a loop. Inside, each checks
//! that it is alone (an `in_cs` counter) and increments a plain, non-atomic counter that the
//! lock protects; a lost update shows a broken lock too.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::StartGate;
use crate::locks::{self, BrokenLock, McsLock, RawLock, SpinLock, TicketLock};
use crate::{println, sched};

/// Spin iterations inside the critical section: long enough that overlap is likely when
/// mutual exclusion fails.
const CS_SPINS: u32 = 500;

static TICKET: SpinLock<u64, TicketLock> = SpinLock::new(TicketLock::new(), 0);
static MCS: SpinLock<u64, McsLock> = SpinLock::new(McsLock::new(), 0);
static BROKEN: SpinLock<u64, BrokenLock> = SpinLock::new(BrokenLock, 0);

pub fn run(kind: &str, threads: usize, duration_ms: u64) -> bool {
    match kind {
        "ticket" => torture(&TICKET, threads, duration_ms),
        "mcs" => torture(&MCS, threads, duration_ms),
        "broken" => torture(&BROKEN, threads, duration_ms),
        other => {
            println!("locktorture: unknown lock '{other}' (ticket, mcs, broken)");
            false
        }
    }
}

fn torture<L: RawLock + 'static>(
    lock: &'static SpinLock<u64, L>,
    threads: usize,
    duration_ms: u64,
) -> bool {
    if !super::fits("locktorture", threads, 0, 0) {
        return false;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let in_cs = Arc::new(AtomicU64::new(0));
    let fails = Arc::new(AtomicU64::new(0));
    let start_value = *lock.lock();
    let gate = StartGate::new(duration_ms);
    let workers = super::spawn_all(
        "locktorture",
        threads,
        |i| {
            let (stop, in_cs, fails) = (stop.clone(), in_cs.clone(), fails.clone());
            let gate = gate.clone();
            sched::try_spawn_returning(super::cpu_for(i), "locktorture", move || {
                let deadline = gate.wait();
                let mut n = 0u64;
                // At least once, however late this worker got to run.
                while n == 0 || !stop.load(Ordering::Relaxed) && !StartGate::expired(deadline) {
                    // Odd threads use the irq-save variant.
                    let mut g = if i % 2 == 1 {
                        lock.lock_irqsave()
                    } else {
                        lock.lock()
                    };
                    if in_cs.fetch_add(1, Ordering::SeqCst) != 0 {
                        fails.fetch_add(1, Ordering::Relaxed);
                    }
                    // Holder tracking: the lock must name this CPU while we hold it.
                    if L::TRACKS_HOLDER && lock.raw().holder() != crate::percpu::id() {
                        fails.fetch_add(1, Ordering::Relaxed);
                    }
                    let v = *g;
                    for _ in 0..CS_SPINS {
                        core::hint::spin_loop();
                    }
                    *g = v + 1;
                    in_cs.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                    n += 1;
                }
                n
            })
        },
        || {
            stop.store(true, Ordering::Relaxed);
            gate.open();
        },
    );
    let Some(workers) = workers else {
        return false;
    };
    gate.open();
    let counts: Vec<u64> = workers.iter().map(sched::join).collect();
    let total: u64 = counts.iter().sum();
    let (max, min) = (
        counts.iter().copied().max().unwrap_or(0),
        counts.iter().copied().min().unwrap_or(0),
    );
    let protected = *lock.lock() - start_value;
    let lost = total.saturating_sub(protected);
    let fail = fails.load(Ordering::Relaxed) + lost;
    let imbalance = max / 2 > min;
    let (yields, halts, kicks) = locks::pv_stats();
    println!(
        "locktorture lock={} Writes: Total: {total} Max/Min: {max}/{min}{} Fail: {fail}",
        L::NAME,
        if imbalance { " ???" } else { "" }
    );
    println!(
        "RESULT locktorture lock={} threads={threads} total={total} max={max} min={min} fail={fail} lost_updates={lost} imbalance={} pv_yields={yields} pv_halts={halts} pv_kicks={kicks}",
        L::NAME,
        if imbalance { "yes" } else { "no" }
    );
    fail == 0 && total > 0
}
