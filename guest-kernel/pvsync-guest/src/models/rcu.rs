//! RCU: readers against quiescent-state reporting, grace-period start and an updater
//! requesting grace periods. The updater (CPU 0) unpublishes an element, waits for a grace
//! period and frees it, twice; a reader (CPU 1) reads twice and then goes idle; the
//! grace-period thread runs on CPU 2. No reader may see an element freed.

use std::prelude::rust_2021::*;

use loom::sync::atomic::{AtomicBool, AtomicU64};
use loom::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::platform::{boot, retire_boot_cpu, spawn_cpu, Model};
use super::{check, rejects};
use crate::cpuset::CpuSet;
use crate::rcu::Rcu;
use crate::sync::Ordering::SeqCst;

struct Machine {
    rcu: Rcu<Model>,
    /// The published element (0, 1, 2: one per update).
    current: AtomicU64,
    freed: [AtomicBool; 3],
    stop: AtomicBool,
}

/// One read-side critical section on the calling CPU: it must never see a freed element.
/// Returns whether it did.
fn read(m: &Machine) -> bool {
    let _g = m.rcu.read();
    let e = m.current.load(SeqCst);
    m.freed[e as usize].load(SeqCst)
}

/// The grace-period thread's loop (the kernel's sleeps on wait queues become polling).
fn gp_thread(m: &Machine) {
    while !m.stop.load(SeqCst) {
        if m.rcu.gp_wanted() {
            let mut gp = m.rcu.gp_begin();
            while !m.rcu.gp_poll(&mut gp) {
                crate::sync::spin_loop();
            }
            m.rcu.gp_end(gp);
        }
        crate::sync::spin_loop();
    }
}

/// `synchronize` on the calling CPU: the wait blocks, a context switch (a quiescent state).
fn synchronize(m: &Machine) {
    let target = m.rcu.synchronize_target();
    while target.is_some_and(|t| m.rcu.completed() < t) {
        m.rcu.note_context_switch();
        crate::sync::spin_loop();
    }
}

fn rcu_model(updates: u64, faults: impl Fn(&Rcu<Model>)) {
    boot(3);
    let m = Arc::new(Machine {
        rcu: Rcu::new(3, 0),
        current: AtomicU64::new(0),
        freed: [const { () }; 3].map(|_| AtomicBool::new(false)),
        stop: AtomicBool::new(false),
    });
    faults(&m.rcu);
    m.rcu.start(&CpuSet::first(3), 2);

    let r = m.clone();
    let reader = spawn_cpu(1, move || {
        let saw_freed = (0..updates).any(|_| read(&r));
        // Idle from here on: an extended quiescent state.
        r.rcu.enter_idle();
        saw_freed
    });
    let g = m.clone();
    let gp = spawn_cpu(2, move || gp_thread(&g));

    for e in 1..=updates {
        let old = m.current.swap(e, SeqCst);
        synchronize(&m);
        m.freed[old as usize].store(true, SeqCst);
    }
    m.stop.store(true, SeqCst);
    retire_boot_cpu();
    let saw_freed = reader.join().unwrap();
    gp.join().unwrap();
    assert!(!saw_freed, "a reader saw an element freed under it");
}

#[test]
fn readers_never_see_a_freed_element() {
    check(2, || rcu_model(2, |_| {}));
}

#[test]
fn zero_length_grace_periods_are_rejected() {
    assert!(rejects(2, || rcu_model(1, |r| r
        .faults
        .no_wait
        .store(true, Relaxed))));
}

#[test]
fn grace_periods_that_end_slightly_early_are_rejected() {
    // Counts the reader's report for the previous grace period: the second grace period
    // still waits for the updater's CPU and its own, but not for a reader that began after
    // that report.
    assert!(rejects(2, || rcu_model(2, |r| r
        .faults
        .early_end
        .store(true, Relaxed))));
}
