//! RCU: readers against quiescent-state reporting, grace-period start and an updater
//! requesting a grace period. After a first grace period run step by step (so every CPU
//! has reported a quiescent state before), the updater (CPU 0) unpublishes an element,
//! waits for a grace period and frees it, while a reader (CPU 1) reads and then goes idle
//! and the grace-period thread (CPU 2) runs. No reader may see an element freed.

use std::prelude::rust_2021::*;

use loom::sync::atomic::{AtomicBool, AtomicU64};
use loom::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::platform::{become_cpu, boot, retire_boot_cpu, spawn_cpu, Model};
use super::{check, rejects};
use crate::cpuset::CpuSet;
use crate::rcu::Rcu;
use crate::sync::Ordering::SeqCst;

struct Machine {
    /// Some grace period found a holdout (it did not end at once).
    waited: std::sync::atomic::AtomicBool,
    rcu: Rcu<Model>,
    /// The published element (0, then 1).
    current: AtomicU64,
    freed: [AtomicBool; 2],
}

/// One read-side critical section on the calling CPU: it must never see a freed element.
/// Returns whether it did.
fn read(m: &Machine) -> bool {
    let _g = m.rcu.read();
    let e = m.current.load(SeqCst);
    m.freed[e as usize].load(SeqCst)
}

/// Runs the grace periods asked for, as the grace-period thread on CPU 2 (the kernel's
/// sleeps on wait queues become polling; only this loop polls, so the model stays small).
fn run_grace_periods(m: &Machine) {
    while m.rcu.gp_wanted() {
        let mut gp = m.rcu.gp_begin();
        while !m.rcu.gp_poll(&mut gp) {
            m.waited.store(true, Relaxed);
            crate::sync::spin_loop();
        }
        m.rcu.gp_end(gp);
    }
}

/// Grace period 1, one step at a time: CPU 1 (the reader's) reports a quiescent state for
/// it, CPU 0 (the updater's) passes through idle instead, so it has no report on record.
fn warm_up(m: &Machine) {
    let target = m.rcu.request_gp(true);
    become_cpu(2);
    let mut gp = m.rcu.gp_begin();
    become_cpu(1);
    m.rcu.note_context_switch();
    become_cpu(0);
    m.rcu.enter_idle();
    m.rcu.exit_idle();
    become_cpu(2);
    assert!(m.rcu.gp_poll(&mut gp), "every CPU has reported");
    m.rcu.gp_end(gp);
    become_cpu(0);
    assert_eq!(m.rcu.completed(), target);
}

/// `only_after_wait`: judge only executions in which some grace period waited (an execution
/// where the broken grace period happened to end at once proves nothing about ending early).
fn rcu_model(only_after_wait: bool, faults: impl Fn(&Rcu<Model>)) {
    boot(3);
    let m = Arc::new(Machine {
        waited: std::sync::atomic::AtomicBool::new(false),
        rcu: Rcu::new(3, 0),
        current: AtomicU64::new(0),
        freed: [AtomicBool::new(false), AtomicBool::new(false)],
    });
    faults(&m.rcu);
    m.rcu.start(&CpuSet::first(3), 2);
    warm_up(&m);
    // Someone else's request: grace period 2 starts while the updater below unpublishes and
    // asks for its own, which may be 2 or 3.
    m.rcu.request_gp(true);

    let r = m.clone();
    let reader = spawn_cpu(1, move || {
        let saw_freed = read(&r);
        // Idle from here on: an extended quiescent state.
        r.rcu.enter_idle();
        saw_freed
    });
    let g = m.clone();
    let gp_thread = spawn_cpu(2, move || run_grace_periods(&g));

    let old = m.current.swap(1, SeqCst);
    if let Some(target) = m.rcu.synchronize_target() {
        // The updater blocks (a context switch, then its CPU idles: quiescent states) until
        // the grace-period thread is done with what it found asked for...
        m.rcu.note_context_switch();
        m.rcu.enter_idle();
        gp_thread.join().unwrap();
        m.rcu.exit_idle();
        // ... and runs what was asked too late for it in its place (CPU 2's part),
        // reporting its own quiescent states as it waits.
        while m.rcu.completed() < target {
            become_cpu(2);
            let mut gp = m.rcu.gp_begin();
            become_cpu(0);
            m.rcu.note_context_switch();
            become_cpu(2);
            while !m.rcu.gp_poll(&mut gp) {
                crate::sync::spin_loop();
            }
            m.rcu.gp_end(gp);
            become_cpu(0);
        }
        m.freed[old as usize].store(true, SeqCst);
    } else {
        // The negative control: freed at once.
        m.freed[old as usize].store(true, SeqCst);
        m.rcu.enter_idle();
        gp_thread.join().unwrap();
    }
    retire_boot_cpu();
    let saw_freed = reader.join().unwrap();
    let waited = m.waited.load(Relaxed);
    assert!(
        !(saw_freed && waited),
        "a reader saw an element freed under it, after a grace period that waited"
    );
    assert!(
        !saw_freed || only_after_wait,
        "a reader saw an element freed under it"
    );
}

#[test]
fn readers_never_see_a_freed_element() {
    check(3, || rcu_model(false, |_| {}));
}

#[test]
fn zero_length_grace_periods_are_rejected() {
    assert!(rejects(2, "saw an element freed", || rcu_model(
        false,
        |r| r.faults.no_wait.store(true, Relaxed)
    )));
}

#[test]
fn grace_periods_that_end_slightly_early_are_rejected() {
    // Counts the reader's report for the first grace period: the second still waits for the
    // updater's CPU, which has no report on record, but not for a reader that began after
    // CPU 1's report. Not a zero-length grace period: the failure must come after one that
    // waited.
    assert!(rejects(
        2,
        "after a grace period that waited",
        || rcu_model(true, |r| r.faults.early_end.store(true, Relaxed))
    ));
}
