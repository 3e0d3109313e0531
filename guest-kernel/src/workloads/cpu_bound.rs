//! `test=cpu-bound`: every vCPU busy. One user task per CPU (`threads=` overrides) spins its
//! share of `work=N` rounds in user mode, where this nested host runs guest code natively
//! (kernel code is emulated), with no system call until it exits with the rounds it did;
//! a task that did not do its share fails the run.

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::arch::tsc;
use crate::mm::aspace::AddressSpace;
use crate::sched::task::OutOfHeap;
use crate::torture::{self, StartGate};
use crate::user::{self, Program};
use crate::{println, sched};

/// Rounds when `work=` is not given (about 2 s with 4 vCPUs on the emulating host).
pub const DEFAULT_WORK: u64 = 60_000;
/// Iterations of the user loop per round (tens of microseconds natively).
const SPINS_PER_ROUND: u64 = 100_000;

pub fn run(threads: Option<usize>, work: Option<u64>) -> bool {
    let t = super::threads(threads);
    let work = work.unwrap_or(DEFAULT_WORK);
    // A kernel stack each, a user stack page each and the page tables.
    if !torture::fits("cpu-bound", t, 0, t as u64 + 16) {
        return false;
    }
    let aspace = Arc::new(AddressSpace::new());
    user::map_programs(&aspace);
    let gate = StartGate::new();
    let tasks = torture::spawn_all(
        "cpu-bound",
        t,
        |i| {
            let gate = gate.clone();
            user::try_spawn(
                torture::cpu_for(i),
                "cpu_bound",
                aspace.clone(),
                Program::SpinRounds,
                super::share(work, t, i),
                SPINS_PER_ROUND,
                i as u64,
                move || gate.wait(),
            )
            .map_err(|_| OutOfHeap)
        },
        || gate.open(),
    );
    let Some(tasks) = tasks else {
        return false;
    };
    let start = tsc::now();
    gate.open();
    let done: Vec<u64> = tasks.iter().map(sched::join).collect();
    let cycles = tsc::now() - start;
    let rounds: u64 = done.iter().sum();
    println!(
        "RESULT cpu-bound threads={t} rounds={rounds} elapsed_us={}",
        super::us(cycles)
    );
    let ok = done
        .iter()
        .enumerate()
        .all(|(i, &d)| d == super::share(work, t, i));
    if !ok {
        println!(
            "FAILURE: cpu-bound: a task did not do its share of work={work} (exit codes {done:?})"
        );
    }
    ok
}
