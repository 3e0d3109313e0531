//! The TLB-shootdown protocol against a model of the TLBs themselves: each CPU caches the
//! one page-table entry the sender changes, a flush drops it, and a page walk reloads it.
//! Once `shootdown` returns, no CPU may still cache the old entry: neither a CPU that had
//! the address space loaded all along, nor one that joins it while the shootdown runs.
//! With KVM's PV TLB flush, a CPU the host takes off may be skipped, but must not use the
//! old entry once it runs again.

use std::prelude::rust_2021::*;

use loom::sync::atomic::{AtomicBool, AtomicU64};
use loom::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::platform::{
    boot, host_deschedules, kvm_enters, retire_boot_cpu, spawn_cpu, world, Model,
};
use super::{check, rejects};
use crate::cpuset::AtomicCpuSet;
use crate::platform::FlushRange;
use crate::sync::{fence, Ordering::Release, Ordering::SeqCst};
use crate::tlb::Shootdowns;

const OLD: u64 = 1;
const NEW: u64 = 2;
const PAGE: FlushRange = FlushRange::Pages {
    start: 0x1000,
    pages: 1,
};

struct Machine {
    tlb: Shootdowns<Model>,
    /// The address space's CPU set.
    cpus: AtomicCpuSet,
    /// The page-table entry.
    pte: AtomicU64,
    stop: AtomicBool,
}

/// A page walk on the calling CPU: fills its TLB from the entry unless it caches one.
fn walk(m: &Machine, cpu: usize) {
    let w = world();
    if w.tlb[cpu].load(SeqCst) == 0 {
        w.tlb[cpu].store(m.pte.load(SeqCst), SeqCst);
    }
}

/// Serves shootdown requests (as the IPI handler would) until the sender is done.
fn serve_until_stopped(m: &Machine) {
    while !m.stop.load(SeqCst) {
        m.tlb.serve();
        crate::sync::spin_loop();
    }
}

/// Two CPUs; `loaded` have the address space loaded and the old entry cached.
fn machine(
    loaded: &[usize],
    faults: impl Fn(&Shootdowns<Model>),
) -> (std::rc::Rc<super::platform::World>, Arc<Machine>) {
    let w = boot(2);
    let m = Arc::new(Machine {
        tlb: Shootdowns::new(2),
        cpus: AtomicCpuSet::new(),
        pte: AtomicU64::new(OLD),
        stop: AtomicBool::new(false),
    });
    faults(&m.tlb);
    for &c in loaded {
        m.cpus.insert(c as u32);
        w.tlb[c].store(OLD, SeqCst);
    }
    (w, m)
}

/// CPU 0 changes the entry and shoots it down, with CPU 1 running in the address space all
/// along (`joiner` false) or joining it meanwhile (`joiner` true).
fn shootdown_model(joiner: bool, faults: impl Fn(&Shootdowns<Model>)) {
    let (w, m) = machine(if joiner { &[0] } else { &[0, 1] }, faults);
    let m1 = m.clone();
    let cpu1 = spawn_cpu(1, move || {
        if joiner {
            // Joins the address space (aspace::switch): into the set, then a CR3 load
            // (serialising, like the locked read-modify-write before it), then page walks.
            m1.cpus.insert(1);
            fence(SeqCst);
            walk(&m1, 1);
        }
        serve_until_stopped(&m1);
    });

    // A page-table write is a plain store: on x86 it is ordered like a release store, and
    // a later load may pass it.
    m.pte.store(NEW, Release);
    m.tlb.shootdown(&m.cpus, PAGE);
    // Checked after every thread is done (a panic here would leave CPU 1 spinning).
    let stale: Vec<bool> = (0..2).map(|c| w.tlb[c].load(SeqCst) == OLD).collect();
    m.stop.store(true, SeqCst);
    retire_boot_cpu();
    cpu1.join().unwrap();
    assert_eq!(
        stale,
        [false, false],
        "a CPU still caches the old entry after the shootdown"
    );
}

#[test]
fn shootdown_leaves_no_stale_entry() {
    check(3, || shootdown_model(false, |_| {}));
}

#[test]
fn shootdown_reaches_or_precedes_a_cpu_joining_midway() {
    check(3, || shootdown_model(true, |_| {}));
}

#[test]
fn shootdown_that_does_not_wait_for_acks_is_rejected() {
    assert!(rejects(
        3,
        "still caches the old entry",
        || shootdown_model(false, |t| t.faults.skip_ack_wait.store(true, Relaxed))
    ));
}

#[test]
fn shootdown_without_the_fence_misses_a_joining_cpu() {
    assert!(rejects(
        3,
        "still caches the old entry",
        || shootdown_model(true, |t| t.faults.skip_fence.store(true, Relaxed))
    ));
}

/// CPU 1 runs with the old entry cached, is taken off by the host (which marks it
/// preempted), and KVM enters it again, after which it uses its TLB; CPU 0 meanwhile
/// changes the entry and shoots it down, possibly leaving CPU 1's flush to KVM. A use after
/// the shootdown returned must not find the old entry.
fn pv_flush_model(faults: impl Fn(&Shootdowns<Model>)) {
    let (_world, m) = machine(&[0, 1], faults);
    let done = Arc::new(AtomicBool::new(false));
    let (m1, done1) = (m.clone(), done.clone());
    let cpu1 = spawn_cpu(1, move || {
        host_deschedules();
        kvm_enters();
        // Running again: whether the shootdown had returned, then what the TLB gives.
        let returned = done1.load(SeqCst);
        let used = world().tlb[1].load(SeqCst);
        serve_until_stopped(&m1);
        returned && used == OLD
    });
    m.pte.store(NEW, Release);
    m.tlb.shootdown(&m.cpus, PAGE);
    done.store(true, SeqCst);
    m.stop.store(true, SeqCst);
    retire_boot_cpu();
    let stale_use = cpu1.join().unwrap();
    assert!(
        !stale_use,
        "a CPU used the old entry after the shootdown returned"
    );
}

#[test]
fn shootdown_leaves_a_preempted_cpu_to_kvm_without_a_stale_use() {
    check(3, || pv_flush_model(|_| {}));
}

#[test]
fn shootdown_skipping_a_preempted_cpu_without_the_flag_is_rejected() {
    assert!(rejects(3, "used the old entry", || pv_flush_model(|t| t
        .faults
        .defer_without_flag
        .store(true, Relaxed))));
}
