//! Workloads with a fixed amount of work (`work=N`), seeded (`seed=N`), each with a
//! self-check: `ebizzy` (records under bucket spinlocks), `postmark` (an RCU-protected RAM
//! file system), `cpu-bound` (every vCPU spinning in user mode). Each prints one `RESULT`
//! line and returns whether it passed (the caller prints SUCCESS or FAILURE).
//!
//! Guest kernel code runs emulated on the nested hosts this is developed on (thousands of
//! host cycles per instruction), so the per-operation kernel work is small and the defaults
//! of `work=` are sized for a run of about 1-3 s with 4 vCPUs there.

pub mod calibrate;
pub mod cpu_bound;
pub mod ebizzy;
mod hist;
pub mod postmark;
mod ramfs;

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::arch::tsc;
use crate::sched;
use crate::torture::{self, StartGate};

/// A small xorshift generator; never seeded with 0.
pub struct Rng(u64);

impl Rng {
    /// The generator of worker `i` for run seed `seed`.
    pub fn new(seed: u64, i: usize) -> Rng {
        let mut r = Rng(
            (seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9)
                ^ (i as u64 + 1).wrapping_mul(0x94d0_49bb_1331_11eb),
        );
        if r.0 == 0 {
            r.0 = 1;
        }
        r.next();
        r
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Workers: `threads=` if given, else one per online CPU.
pub fn threads(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| torture::cpus().len()).max(1)
}

/// Worker `i`'s share of `work` split over `n` workers (the first `work % n` do one more).
pub fn share(work: u64, n: usize, i: usize) -> u64 {
    work / n as u64 + u64::from((i as u64) < work % n as u64)
}

/// Runs `body(i)` in `n` kernel threads, worker `i` on the i-th online CPU round-robin, all
/// released at once; returns their results and the TSC cycles from the release to the last
/// one's end, or None (a FAILURE line printed) when the heap cannot hold the threads.
pub fn run_workers(
    name: &'static str,
    n: usize,
    body: impl Fn(usize) -> u64 + Send + Sync + 'static,
) -> Option<(Vec<u64>, u64)> {
    let body = Arc::new(body);
    let gate = StartGate::new();
    let tasks = torture::spawn_all(
        name,
        n,
        |i| {
            let (body, gate) = (body.clone(), gate.clone());
            sched::try_spawn_returning(torture::cpu_for(i), name, move || {
                gate.wait();
                body(i)
            })
        },
        || gate.open(),
    )?;
    let start = tsc::now();
    gate.open();
    let results = tasks.iter().map(sched::join).collect();
    Some((results, tsc::now() - start))
}

/// Microseconds in `cycles` TSC cycles.
pub fn us(cycles: u64) -> u64 {
    tsc::cycles_to_ns(cycles) / 1000
}

/// `count` per second over `cycles` TSC cycles.
pub fn per_second(count: u64, cycles: u64) -> u64 {
    let ns = tsc::cycles_to_ns(cycles).max(1);
    (count as u128 * 1_000_000_000 / ns as u128) as u64
}
