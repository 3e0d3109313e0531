//! rcutorture: readers on every CPU look at the current element and record its "pipe" age:
//! the writer replaces the element, then ages every removed element by one at each grace
//! period. A reader that sees age >= 2 saw an element a full grace period after its removal:
//! RCU failed (`bad_pipe`). Removed elements are not reused but quarantined with a `freed`
//! mark once they are PIPE_LEN grace periods old, so a premature "free" is detected without
//! a real use-after-free (`freed_seen`: only a grace period that does not wait at all gets
//! there).
//!
//! What the readers do, so that grace periods have something to get wrong:
//! - one read in [`LONG_READ_EVERY`] stays 50-200 µs inside its critical section, and a read
//!   that finds its element removed (age 1) holds it [`LINGER_US`] more, watching its age: a
//!   grace period that ends early (`rcu=early`: a quiescent state reported for the previous
//!   grace period is taken for one of this grace period) then ends under such a reader,
//!   which sees the age reach 2. A correct grace period waits for the reader, however long
//!   it holds on;
//! - between reads they rest. On odd CPUs a user task runs beside the readers: a reader
//!   yields to it, it spins in user mode (an extended quiescent state) and yields back, so
//!   the CPU keeps crossing between user and kernel mode between reads. On even CPUs the
//!   readers block until the suite's main task wakes them (about every [`REST_MS`], out of
//!   step with the writer: readers woken by each update would always read across the next
//!   removal on a CPU that the next grace period must wait for, which hides an early end),
//!   so the CPU goes idle (the other extended quiescent state) between reads; on CPU 0 the
//!   writer and the main task keep it busy.
//!
//! rcuflood: every CPU posts call_rcu callbacks as fast as it can; rcu_barrier must drain
//! them all (pending back to 0, every callback invoked once).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering::*};

use super::StartGate;
use crate::arch::tsc;
use crate::mm::aspace::AddressSpace;
use crate::sched::task::OutOfHeap;
use crate::sched::WaitQueue;
use crate::user::Program;
use crate::{println, rcu, sched, user};

const PIPE_LEN: usize = 10;
/// One read in this many is long (50-200 µs inside the critical section).
const LONG_READ_EVERY: u64 = 16;
/// How long a read that finds its element removed holds it on at most: a grace period that
/// ends early must end (and the writer age the element) within it to be seen, which takes
/// some ms when vCPUs wait for host CPUs.
const LINGER_US: u64 = 50_000;
/// A reader rests after this many reads.
const READS_PER_REST: u64 = 8;
/// Readers of even CPUs rest about this long.
const REST_MS: u64 = 1;
/// Iterations of the user task's spin between two yields (some µs in user mode).
const USER_SPINS: u64 = 20_000;

/// Bit 63 of a user task's exit code: it ran to its deadline (the rest is its rounds).
const USER_DONE: u64 = 1 << 63;

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
    long_reads: AtomicU64,
    /// Reads that found their element removed and held it on.
    lingers: AtomicU64,
    /// Rests until the next update (readers of even CPUs).
    idle_rests: AtomicU64,
    /// Readers resting on an even CPU wait for it to move (the main task moves it every
    /// [`REST_MS`], out of step with the writer's updates).
    rest_epoch: AtomicU64,
    rest: WaitQueue,
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

/// A small xorshift generator, one per reader.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One read: the current element's age, looked at before and after a short or `long` spin;
/// a read that finds its element removed holds it [`LINGER_US`] more, watching its age.
fn read_once(s: &Shared, long: Option<u64>) {
    let g = rcu::read();
    let p = s.current.load(Acquire);
    // SAFETY: inside a reader, an element read from `current` is not freed (and is never
    // deallocated during the test at all).
    let e = unsafe { &*p };
    let mut age = e.pipe.load(SeqCst);
    match long {
        Some(cycles) => tsc::spin_cycles(cycles),
        None => {
            for _ in 0..200 {
                core::hint::spin_loop();
            }
        }
    }
    age = age.max(e.pipe.load(SeqCst));
    if age == 1 {
        // Removed while we hold it: the grace period the writer waits for must wait for us.
        s.lingers.fetch_add(1, Relaxed);
        let start = tsc::now();
        let linger = tsc::us_to_cycles(LINGER_US);
        while age < 2 && tsc::now().wrapping_sub(start) < linger {
            age = age.max(e.pipe.load(SeqCst));
        }
        // Once more: this vCPU may have been descheduled past the limit.
        age = age.max(e.pipe.load(SeqCst));
    }
    if e.freed.load(SeqCst) {
        s.freed_seen.fetch_add(1, Relaxed);
    }
    drop(g);
    s.hist[(age as usize).min(PIPE_LEN)].fetch_add(1, Relaxed);
}

fn reader(s: &Shared, i: usize, user_beside: bool) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (i as u64 + 1));
    let mut n = 0u64;
    // At least one read, however late this reader got to run.
    while n == 0 || !s.stop.load(Relaxed) {
        let r = rng.next();
        let long = r
            .is_multiple_of(LONG_READ_EVERY)
            .then(|| tsc::us_to_cycles(50 + (r >> 32) % 151));
        read_once(s, long);
        s.long_reads.fetch_add(long.is_some() as u64, Relaxed);
        s.reads.fetch_add(1, Relaxed);
        n += 1;
        if n.is_multiple_of(READS_PER_REST) {
            if user_beside {
                // The user task runs (in user mode) until it yields back.
                sched::yield_now();
            } else {
                // Blocks until the main task's next wake-up (the CPU idles once its readers
                // all rest).
                let seen = s.rest_epoch.load(SeqCst);
                s.idle_rests.fetch_add(1, Relaxed);
                s.rest
                    .wait_until(|| s.rest_epoch.load(SeqCst) != seen || s.stop.load(SeqCst));
            }
        }
    }
}

/// The writer: replaces the current element, waits a grace period (synchronously, or every
/// fourth time through a callback) and ages what it removed, until the main task says stop.
/// Returns the number of updates.
fn writer(ws: &Shared) -> u64 {
    let mut removed = Removed(Vec::new());
    let mut graveyard = Vec::new();
    let mut n = 0u64;
    let done_by_callback = Arc::new(AtomicU64::new(0));
    // At least one update, however late the writer got to run.
    while n == 0 || !ws.stop.load(Relaxed) {
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
}

pub fn run(readers: usize, duration_ms: u64) -> bool {
    let s = Arc::new(Shared {
        current: AtomicPtr::new(new_elem()),
        stop: AtomicBool::new(false),
        hist: [const { AtomicU64::new(0) }; PIPE_LEN + 1],
        freed_seen: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        long_reads: AtomicU64::new(0),
        lingers: AtomicU64::new(0),
        idle_rests: AtomicU64::new(0),
        rest_epoch: AtomicU64::new(0),
        rest: WaitQueue::new(),
    });
    // A user task on each odd CPU that has readers, until the deadline.
    let user_cpus: Vec<u32> = {
        let mut c: Vec<u32> = (0..readers)
            .map(super::cpu_for)
            .filter(|c| c % 2 == 1)
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    // The readers, the writer, the user tasks (a user stack each and page tables), the
    // writer's removed elements and callbacks.
    let threads = readers + 1 + user_cpus.len();
    if !super::fits(
        "rcutorture",
        threads,
        256 * 1024,
        2 * user_cpus.len() as u64 + 16,
    ) {
        return false;
    }
    let before = rcu::stats();

    // Everything started waits at the gate until all exist (user tasks in the kernel, before
    // they enter user mode).
    let gate = StartGate::new();
    let stop_all = || {
        s.stop.store(true, SeqCst);
        gate.open();
        s.rest.wake_all();
    };
    let reader_tasks = super::spawn_all(
        "rcutorture",
        readers,
        |i| {
            let (s, gate) = (s.clone(), gate.clone());
            let cpu = super::cpu_for(i);
            sched::try_spawn(cpu, "rcu_reader", move || {
                gate.wait();
                reader(&s, i, cpu % 2 == 1)
            })
        },
        stop_all,
    );
    let Some(reader_tasks) = reader_tasks else {
        return false;
    };
    let join_readers = || {
        stop_all();
        for t in &reader_tasks {
            sched::join(t);
        }
    };

    let writer = super::spawn_all(
        "rcutorture",
        1,
        |_| {
            let (ws, wgate) = (s.clone(), gate.clone());
            sched::try_spawn_returning(super::cpu_for(readers), "rcu_writer", move || {
                wgate.wait();
                writer(&ws)
            })
        },
        join_readers,
    );
    let Some(writer) = writer else {
        return false;
    };

    // The user tasks' deadline: they are the last to start, just before the gate opens.
    let deadline_ns = tsc::now_ns() + duration_ms * 1_000_000;
    let aspace = Arc::new(AddressSpace::new());
    user::map_programs(&aspace);
    let user_tasks = super::spawn_all(
        "rcutorture",
        user_cpus.len(),
        |slot| {
            let gate = gate.clone();
            user::try_spawn(
                user_cpus[slot],
                "rcu_user",
                aspace.clone(),
                Program::SpinYield,
                deadline_ns,
                USER_SPINS,
                slot as u64,
                move || {
                    gate.wait();
                },
            )
            .map_err(|_| OutOfHeap)
        },
        || {
            join_readers();
            sched::join(&writer[0]);
        },
    );
    let Some(user_tasks) = user_tasks else {
        return false;
    };

    gate.open();
    let end = tsc::now() + tsc::us_to_cycles(duration_ms * 1000);
    while tsc::now() < end {
        sched::sleep_ms(REST_MS);
        s.rest_epoch.fetch_add(1, SeqCst);
        s.rest.wake_all();
    }
    s.stop.store(true, SeqCst);
    s.rest.wake_all();
    for t in &reader_tasks {
        sched::join(t);
    }
    let updates = sched::join(&writer[0]);
    let user_codes: Vec<u64> = user_tasks.iter().map(sched::join).collect();
    let user_rounds: u64 = user_codes.iter().map(|c| c & !USER_DONE).sum();
    let failed_user = user_codes.iter().filter(|&&c| c & USER_DONE == 0).count();
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
        "RESULT rcutorture reads={} long_reads={} lingers={} idle_rests={} user_tasks={} user_rounds={user_rounds} failed_user_tasks={failed_user} updates={updates} bad_pipe={bad_pipe} freed_seen={freed_seen} gps={} gp_min_us={} gp_avg_us={} gp_max_us={} cbs_peak={}",
        s.reads.load(Relaxed),
        s.long_reads.load(Relaxed),
        s.lingers.load(Relaxed),
        s.idle_rests.load(Relaxed),
        user_tasks.len(),
        st.gps - before.gps,
        us(st.gp_min_ticks),
        us(st.gp_avg_ticks),
        us(st.gp_max_ticks),
        st.peak_pending
    );
    bad_pipe == 0 && freed_seen == 0 && updates > 0 && s.reads.load(Relaxed) > 0 && failed_user == 0
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
