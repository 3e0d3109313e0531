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

use super::StartGate;
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
    /// Readers still reading: the writer keeps updating until they are all done.
    readers_left: AtomicU64,
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

/// The writer: replaces the current element, waits a grace period (synchronously, or every
/// fourth time through a callback) and ages what it removed; until its deadline and until
/// every reader is done. Returns the number of updates.
fn writer(ws: &Shared, deadline: u64) -> u64 {
    let running = || {
        !ws.stop.load(Relaxed)
            && (!StartGate::expired(deadline) || ws.readers_left.load(SeqCst) > 0)
    };
    let mut removed = Removed(Vec::new());
    let mut graveyard = Vec::new();
    let mut n = 0u64;
    let done_by_callback = Arc::new(AtomicU64::new(0));
    // At least one update, however late the writer got to run.
    while n == 0 || running() {
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
            while done_by_callback.load(SeqCst) < want && running() {
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
}

pub fn run(readers: usize, duration_ms: u64) -> bool {
    let s = Arc::new(Shared {
        current: AtomicPtr::new(new_elem()),
        stop: AtomicBool::new(false),
        hist: [const { AtomicU64::new(0) }; PIPE_LEN + 1],
        freed_seen: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        readers_left: AtomicU64::new(readers as u64),
    });
    // The readers, the writer, its removed elements and callbacks.
    if !super::fits("rcutorture", readers + 1, 256 * 1024, 0) {
        return false;
    }
    let before = rcu::stats();
    let gate = StartGate::new(duration_ms);
    let reader_tasks = super::spawn_all(
        "rcutorture",
        readers,
        |i| {
            let (s, gate) = (s.clone(), gate.clone());
            sched::try_spawn(super::cpu_for(i), "rcu_reader", move || {
                let deadline = gate.wait();
                // At least one read, however late this reader got to run.
                let mut mine = 0u64;
                while mine == 0 || !s.stop.load(Relaxed) && !StartGate::expired(deadline) {
                    mine += 1;
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
                s.readers_left.fetch_sub(1, SeqCst);
            })
        },
        || {
            s.stop.store(true, Relaxed);
            gate.open();
        },
    );
    let Some(reader_tasks) = reader_tasks else {
        return false;
    };

    let (ws, wgate) = (s.clone(), gate.clone());
    let writer = super::spawn_all(
        "rcutorture",
        1,
        |_| {
            let (ws, wgate) = (ws.clone(), wgate.clone());
            sched::try_spawn_returning(super::cpu_for(readers), "rcu_writer", move || {
                writer(&ws, wgate.wait())
            })
        },
        || {
            s.stop.store(true, Relaxed);
            gate.open();
            for t in &reader_tasks {
                sched::join(t);
            }
        },
    );
    let Some(writer) = writer else {
        return false;
    };

    gate.open();
    for t in &reader_tasks {
        sched::join(t);
    }
    let updates = sched::join(&writer[0]);
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
        us(st.gp_min_cycles),
        us(st.gp_avg_cycles),
        us(st.gp_max_cycles),
        st.peak_pending
    );
    bad_pipe == 0 && freed_seen == 0 && updates > 0 && s.reads.load(Relaxed) > 0
}

/// Heap one queued callback takes: its boxed closure and its slot in a per-CPU queue (which
/// grows by doubling), rounded up.
const CALLBACK_HEAP_BYTES: u64 = 96;

/// Past 8 CPUs each CPU posts fewer callbacks than asked: at most FLOOD_WORK / cpus².
/// Every `call_rcu` allocates under the one heap lock, whose holders a host with far fewer
/// cores than vCPUs preempts, so the cost of a callback grows with the CPUs posting: 1000
/// from each of 64 vCPUs on two host cores took many minutes. 15 each at 64 CPUs.
const FLOOD_WORK: u64 = 64_000;

/// Every CPU posts `per_cpu` callbacks (fewer on a large VM, see FLOOD_WORK) as fast as it
/// can; then rcu_barrier must leave none pending, each invoked once.
pub fn flood(per_cpu: u64) -> bool {
    let cpus = super::cpus();
    let n = cpus.len() as u64;
    let per_cpu = per_cpu.min(FLOOD_WORK / (n * n)).max(1);
    let queued = per_cpu * cpus.len() as u64 * CALLBACK_HEAP_BYTES;
    if !super::fits("rcuflood", cpus.len(), queued, 0) {
        return false;
    }
    let invoked = Arc::new(AtomicU64::new(0));
    let posters = super::spawn_all(
        "rcuflood",
        cpus.len(),
        |k| {
            let inv = invoked.clone();
            sched::try_spawn(cpus[k], "rcu_flood", move || {
                for _ in 0..per_cpu {
                    let i = inv.clone();
                    rcu::call(move || {
                        i.fetch_add(1, Relaxed);
                    });
                }
            })
        },
        || {},
    );
    let Some(posters) = posters else {
        return false;
    };
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
