//! Ticket and MCS locks: mutual exclusion, the ordering that hands the critical section's
//! writes to the next holder (loom checks every access to the protected cell), and the MCS
//! halt/kick handshake.

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use std::prelude::rust_2021::*;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use super::platform::{boot, retire_boot_cpu, spawn_cpu, world, Model};
use super::{check, rejects};
use crate::locks::{pv_stats, KernelTicketLock, McsLock, RawLock, TicketLock};

/// CPUs 1..=n each take `lock` once and increment the protected counter; CPU 0 joins them
/// and checks the count. loom reports a data race on the counter if the lock hands it over
/// without ordering, and fails the holder check if two CPUs are inside at once.
fn contend<L: RawLock<Platform = Model> + 'static>(n: usize, lock: impl Fn() -> L) {
    boot(n + 1);
    let shared = Arc::new((lock(), UnsafeCell::new(0u32)));
    let threads: Vec<_> = (1..=n)
        .map(|cpu| {
            let shared = shared.clone();
            spawn_cpu(cpu, move || {
                let (lock, count) = &*shared;
                lock.lock();
                if L::TRACKS_HOLDER {
                    assert_eq!(lock.holder(), cpu as u32, "the holder is named");
                }
                // SAFETY: inside the critical section the lock excludes every other access;
                // loom checks that it does.
                count.with_mut(|c| unsafe { *c += 1 });
                lock.unlock();
            })
        })
        .collect();
    retire_boot_cpu();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(
        world().lost_wakeups.get(),
        0,
        "a halted waiter was never woken"
    );
    // SAFETY: every thread has been joined.
    let total = shared.1.with(|c| unsafe { *c });
    assert_eq!(total, n as u32, "an increment was lost");
}

#[test]
fn ticket_lock_excludes() {
    check(3, || contend(2, TicketLock::<Model, 4>::new));
}

/// The kernel's flavour with its single taker slot (`KernelTicketLock`).
#[test]
fn kernel_ticket_lock_excludes() {
    check(3, || contend(2, KernelTicketLock::<Model>::kernel));
}

#[test]
fn ticket_lock_without_release_ordering_is_rejected() {
    assert!(rejects(3, "Causality violation", || contend(2, || {
        TicketLock::<Model, 4>::with_relaxed_release(false)
    })));
}

static SOME_EXECUTION_HALTED: AtomicBool = AtomicBool::new(false);

/// Two CPUs on one MCS lock: the waiter halts (the models' clock makes every wait reach
/// its slow path at once) and the releasers kick them.
fn mcs_contend(lock: fn() -> McsLock<Model>) {
    let halts = pv_stats().halts;
    contend(2, lock);
    if pv_stats().halts > halts {
        SOME_EXECUTION_HALTED.store(true, Relaxed);
    }
}

#[test]
fn mcs_lock_excludes_and_wakes_halted_waiters() {
    check(2, || mcs_contend(McsLock::new));
    assert!(
        SOME_EXECUTION_HALTED.load(Relaxed),
        "no execution reached the halt: the model does not cover the handshake"
    );
}

#[test]
fn mcs_lock_that_drops_kicks_is_rejected() {
    // A halted waiter that is granted the lock but never kicked sleeps until nobody is left
    // who could wake it: a lost wake-up.
    assert!(rejects(2, "a halted waiter was never woken", || {
        mcs_contend(McsLock::dropping_kicks)
    }));
}

#[test]
fn mcs_lock_without_the_handshake_fences_is_rejected() {
    // Store buffering: the waiter's `halted` store and the releaser's `granted` store each
    // pass the other side's load, the waiter halts and the releaser does not kick.
    assert!(rejects(2, "a halted waiter was never woken", || {
        mcs_contend(McsLock::without_fences)
    }));
}
