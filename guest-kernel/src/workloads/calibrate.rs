//! `test=calibrate`: what kernel mode costs against user mode on this host. The same two
//! instructions (`dec`/`jnz`) run as a loop in kernel mode and, in a user task, in user mode;
//! on the nested hosts this is developed on the kernel loop is emulated and the user loop is
//! not, and the study reports the ratio with its results (docs/study.md).

use alloc::sync::Arc;

use crate::arch::tsc;
use crate::mm::aspace::AddressSpace;
use crate::user::{self, Program};
use crate::{println, sched};

/// Kernel-mode loop iterations per sample (each costs thousands of cycles when emulated).
const KERNEL_SPINS: u64 = 20_000;
/// User-mode rounds and iterations per round (native: about 10 ms in all).
const USER_ROUNDS: u64 = 100;
const USER_SPINS: u64 = 100_000;

/// `spins` iterations of `dec`/`jnz` in kernel mode; returns the TSC cycles they took.
fn kernel_loop(spins: u64) -> u64 {
    let start = tsc::now();
    // SAFETY: a register-only loop: it touches no memory and leaves rcx at zero, which is
    // declared clobbered.
    unsafe {
        core::arch::asm!("2:", "dec {c}", "jnz 2b", c = inout(reg) spins.max(1) => _,
            options(nomem, nostack));
    }
    tsc::now() - start
}

/// TSC cycles from spawning a user task that spins `rounds` rounds to joining it, and the
/// rounds it reported; None if it could not start. `slot`: its user stack's (each run gets
/// its own: a stack stays mapped in the address space).
fn user_run(aspace: &Arc<AddressSpace>, rounds: u64, slot: u64) -> Option<(u64, u64)> {
    let start = tsc::now();
    let task = user::try_spawn(
        crate::percpu::id(),
        "calibrate",
        aspace.clone(),
        Program::SpinRounds,
        rounds,
        USER_SPINS,
        slot,
        || {},
    )
    .ok()?;
    let done = sched::join(&task);
    Some((tsc::now() - start, done))
}

/// Runs the calibration; prints its `RESULT` line. False if the user task failed.
pub fn run() -> bool {
    // The best of three: an interrupt or a host preemption only lengthens a sample.
    let kernel_cycles = (0..3).map(|_| kernel_loop(KERNEL_SPINS)).min().unwrap_or(0);
    let aspace = Arc::new(AddressSpace::new());
    user::map_programs(&aspace);
    // A task's creation, scheduling and exit are emulated kernel code: a run of no rounds
    // measures them, and is taken off (best of three each).
    let best = |rounds, first: u64| {
        (first..first + 3)
            .filter_map(|slot| user_run(&aspace, rounds, slot))
            .min()
    };
    let (Some((empty, _)), Some((full, done))) = (best(0, 0), best(USER_ROUNDS, 3)) else {
        println!("FAILURE: calibrate: could not start the user task");
        return false;
    };
    let user_cycles = full.saturating_sub(empty).max(1);
    let ns = |cycles: u64, spins: u64| tsc::cycles_to_ns(cycles) as f64 / spins as f64;
    let kernel_ns = ns(kernel_cycles, KERNEL_SPINS);
    let user_ns = ns(user_cycles, USER_ROUNDS * USER_SPINS);
    println!(
        "RESULT calibrate kernel_loop_ns={kernel_ns:.3} user_loop_ns={user_ns:.3} kernel_over_user={:.1}",
        kernel_ns / user_ns.max(1e-6)
    );
    if done != USER_ROUNDS {
        println!("FAILURE: calibrate: the user task did {done} of {USER_ROUNDS} rounds");
        return false;
    }
    true
}
