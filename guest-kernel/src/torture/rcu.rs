//! rcutorture: readers on every CPU look at the current element and record its "pipe" age:
//! the writer replaces the element, then ages every removed element by one at each grace
//! period. A reader that sees age >= 2 saw an element a full grace period after its removal:
//! RCU failed. Removed elements are not reused but quarantined with a `freed` mark, so a
//! premature "free" is detected without a real use-after-free.
//!
//! rcuflood: every CPU posts call_rcu callbacks as fast as it can; rcu_barrier must drain
//! them all (pending back to 0, every callback invoked once).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering::*};

use crate::arch::tsc;
use crate::{println, rcu, sched};

const PIPE_LEN: usize = 10;

struct Elem {
    pipe: AtomicU32,
    freed: AtomicBool,
}

fn new_elem() -> *mut Elem {
    Box::into_raw(Box::new(Elem {
        pipe: AtomicU32::new(0),
        freed: AtomicBool::new(false),
    }))
}

struct Shared {
    current: AtomicPtr<Elem>,
    stop: AtomicBool,
    hist: [AtomicU64; PIPE_LEN + 1],
    freed_seen: AtomicU64,
    reads: AtomicU64,
}

/// Removed elements, aged at each grace period; freed (marked) once they reach PIPE_LEN.
struct Removed(Vec<*mut Elem>);

// SAFETY: the pointers are owned by the writer thread; Elem is Sync.
unsafe impl Send for Removed {}

fn age_all(removed: &mut Removed, graveyard: &mut Vec<*mut Elem>) {
    removed.0.retain(|&e| {
        // SAFETY: removed elements stay allocated until the end of the test.
        let e_ref = unsafe { &*e };
        let p = e_ref.pipe.fetch_add(1, SeqCst) + 1;
        if p as usize >= PIPE_LEN {
            e_ref.freed.store(true, SeqCst);
            graveyard.push(e);
            false
        } else {
            true
        }
    });
}

pub fn run(readers: usize, duration_ms: u64) -> bool {
    let s = Arc::new(Shared {
        current: AtomicPtr::new(new_elem()),
        stop: AtomicBool::new(false),
        hist: [const { AtomicU64::new(0) }; PIPE_LEN + 1],
        freed_seen: AtomicU64::new(0),
        reads: AtomicU64::new(0),
    });
    let before = rcu::stats();
    let reader_tasks: Vec<_> = (0..readers)
        .map(|i| {
            let s = s.clone();
            sched::spawn(super::cpu_for(i), "rcu_reader", move || {
                while !s.stop.load(Relaxed) {
                    let g = rcu::read();
                    let p = s.current.load(Acquire);
                    // SAFETY: inside a reader, an element read from `current` is not freed
                    // (and is never deallocated during the test at all).
                    let e = unsafe { &*p };
                    let mut age = e.pipe.load(SeqCst);
                    for _ in 0..2000 {
                        core::hint::spin_loop();
                    }
                    age = age.max(e.pipe.load(SeqCst));
                    if e.freed.load(SeqCst) {
                        s.freed_seen.fetch_add(1, Relaxed);
                    }
                    drop(g);
                    s.hist[(age as usize).min(PIPE_LEN)].fetch_add(1, Relaxed);
                    if s.reads.fetch_add(1, Relaxed) % 64 == 63 {
                        // Block now and then, outside the reader: the context-switch (and
                        // idle) quiescent-state paths get exercised too.
                        sched::yield_now();
                    }
                }
            })
        })
        .collect();

    let ws = s.clone();
    let writer = sched::spawn_returning(super::cpu_for(readers), "rcu_writer", move || {
        let mut removed = Removed(Vec::new());
        let mut graveyard = Vec::new();
        let mut n = 0u64;
        let done_by_callback = Arc::new(AtomicU64::new(0));
        while !ws.stop.load(Relaxed) {
            let old = ws.current.swap(new_elem(), AcqRel);
            // SAFETY: `old` was the current element; only the writer ages it.
            unsafe { (*old).pipe.store(1, SeqCst) };
            removed.0.push(old);
            if n % 4 == 3 {
                // The asynchronous path: a callback marks one grace period's passing.
                let d = done_by_callback.clone();
                rcu::call(move || {
                    d.fetch_add(1, SeqCst);
                });
                let want = n / 4 + 1;
                while done_by_callback.load(SeqCst) < want && !ws.stop.load(Relaxed) {
                    sched::yield_now();
                }
                if done_by_callback.load(SeqCst) < want {
                    // Stopped before the grace period ended: nothing may be aged.
                    break;
                }
            } else {
                rcu::synchronize();
            }
            age_all(&mut removed, &mut graveyard);
            n += 1;
        }
        // Let the last readers finish before anything is really freed.
        rcu::synchronize();
        rcu::barrier();
        for e in removed.0.into_iter().chain(graveyard) {
            // SAFETY: no reader can hold `e` after the grace period above; allocated by
            // new_elem via Box::into_raw.
            drop(unsafe { Box::from_raw(e) });
        }
        n
    });

    sched::sleep_ms(duration_ms);
    s.stop.store(true, Relaxed);
    for t in &reader_tasks {
        sched::join(t);
    }
    let updates = sched::join(&writer);
    let hist: Vec<u64> = s.hist.iter().map(|h| h.load(Relaxed)).collect();
    let freed_seen = s.freed_seen.load(Relaxed);
    let bad_pipe: u64 = hist[2..].iter().sum();
    let st = rcu::stats();
    let us = |c: u64| tsc::cycles_to_ns(c) / 1000;
    println!(
        "rcutorture: Reader Pipe: {}",
        hist.iter()
            .map(|h| alloc::format!("{h}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "RESULT rcutorture reads={} updates={updates} bad_pipe={bad_pipe} freed_seen={freed_seen} gps={} gp_min_us={} gp_avg_us={} gp_max_us={} cbs_peak={}",
        s.reads.load(Relaxed),
        st.gps - before.gps,
        us(st.gp_min_ticks),
        us(st.gp_avg_ticks),
        us(st.gp_max_ticks),
        st.peak_pending
    );
    bad_pipe == 0 && freed_seen == 0 && updates > 0 && s.reads.load(Relaxed) > 0
}

pub fn flood(per_cpu: u64) -> bool {
    let cpus = super::cpus();
    let invoked = Arc::new(AtomicU64::new(0));
    let posters: Vec<_> = cpus
        .iter()
        .map(|&c| {
            let inv = invoked.clone();
            sched::spawn(c, "rcu_flood", move || {
                for _ in 0..per_cpu {
                    let i = inv.clone();
                    rcu::call(move || {
                        i.fetch_add(1, Relaxed);
                    });
                }
            })
        })
        .collect();
    for t in &posters {
        sched::join(t);
    }
    let peak = rcu::stats().peak_pending;
    rcu::barrier();
    let st = rcu::stats();
    let posted = per_cpu * cpus.len() as u64;
    let got = invoked.load(Relaxed);
    println!(
        "RESULT rcuflood posted={posted} invoked={got} peak_pending={peak} pending_after_barrier={} total_invoked={}",
        st.pending, st.invoked
    );
    got == posted && st.pending == 0
}
