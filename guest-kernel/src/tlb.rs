//! The kernel's TLB shootdowns: the synchronization crate's protocol
//! (`pvsync_guest::tlb`) for this kernel's CPUs, its IPI handler, and the per-CPU evidence
//! tests check.

use pvsync_guest::tlb::Shootdowns;
use pvsync_guest::{CpuSet, FlushRange};
use spin::Once;

use crate::arch::idt::{self, TrapFrame};
use crate::arch::{apic, tsc, vectors};
use crate::mm::aspace::AddressSpace;
use crate::platform::{self, Kernel};

static TLB: Once<Shootdowns<Kernel>> = Once::new();

/// The negative controls a run may switch on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Leave one target out of every shootdown (`tlb=skip`).
    pub skip_one_target: bool,
    /// Return without waiting for the acknowledgements (`tlb=noack`).
    pub skip_ack_wait: bool,
    /// Skip a target KVM reports preempted without asking KVM to flush it
    /// (`tlb=defer-noflag`).
    pub defer_without_flag: bool,
}

/// Sets the protocol up for CPUs `0..nr_cpus` with the negative controls `faults`, and
/// installs its IPI handler.
pub fn init(nr_cpus: usize, faults: Faults) {
    use core::sync::atomic::Ordering::Relaxed;
    let tlb = TLB.call_once(|| Shootdowns::new(nr_cpus));
    tlb.faults
        .skip_one_target
        .store(faults.skip_one_target, Relaxed);
    tlb.faults
        .skip_ack_wait
        .store(faults.skip_ack_wait, Relaxed);
    tlb.faults
        .defer_without_flag
        .store(faults.defer_without_flag, Relaxed);
    idt::register(vectors::TLB_SHOOTDOWN, ipi);
    platform::set_serve_waiters(serve_requests);
}

fn tlb() -> &'static Shootdowns<Kernel> {
    TLB.get().expect("TLB shootdowns used before tlb::init")
}

/// (shootdowns sent, yield hypercalls made while waiting).
pub fn stats() -> (u64, u64) {
    TLB.get().map_or((0, 0), |t| (t.shootdowns(), t.yields()))
}

/// Makes `served` and `deferred` count the requests of CPU `sender` from now on (one
/// sender at a time: the counts are per target).
pub fn watch_sender(sender: u32) {
    if let Some(t) = TLB.get() {
        t.watch_sender(sender);
    }
}

/// Requests of the watched sender that CPU `target` has flushed and acknowledged so far
/// (as `target` counted them; `target` the sender: its local flushes).
pub fn served(target: u32) -> u64 {
    TLB.get().map_or(0, |t| t.served(target))
}

/// Requests of the watched sender whose flush on CPU `target` was left to the host (KVM's
/// PV TLB flush: `target` was preempted, and KVM flushes it before it runs again).
pub fn deferred(target: u32) -> u64 {
    TLB.get().map_or(0, |t| t.deferred(target))
}

/// Flushes left to the host so far (all senders and targets).
pub fn deferred_total() -> u64 {
    TLB.get().map_or(0, |t| t.deferred_total())
}

/// CR3 loads CPU `cpu` has made so far (each drops every non-global translation).
pub fn full_flushes(cpu: u32) -> u64 {
    TLB.get().map_or(0, |t| t.full_flushes(cpu))
}

/// A CR3 load (which drops every non-global translation) on this CPU.
pub fn note_cr3_reload() {
    if let Some(t) = TLB.get() {
        t.note_full_flush();
    }
}

/// Serves every request aimed at this CPU (any busy wait's slow path, and the IPI).
pub fn serve_requests() {
    if let Some(t) = TLB.get() {
        t.serve();
    }
}

fn ipi(_: &mut TrapFrame) {
    serve_requests();
}

/// Flushes `pages` pages from `start` (0 pages: everything) of `aspace` on every CPU that
/// may cache them, and returns once all have done so.
pub fn shootdown(aspace: &AddressSpace, start: u64, pages: u64) {
    tlb().shootdown(aspace.cpu_set(), flush_range(start, pages));
}

/// [`shootdown`], which also returns the CPUs that flushed (for tests).
pub fn shootdown_reaching(aspace: &AddressSpace, start: u64, pages: u64) -> CpuSet {
    tlb().shootdown_reaching(aspace.cpu_set(), flush_range(start, pages))
}

fn flush_range(start: u64, pages: u64) -> FlushRange {
    match pages {
        0 => FlushRange::All,
        pages => FlushRange::Pages { start, pages },
    }
}

/// Round trip of one ping IPI to `target`, in TSC cycles (for benchmarks and tests).
pub fn ping_round_trip(target: u32) -> u64 {
    let before = crate::irq::pings(target);
    let t0 = tsc::now();
    apic::send_ipi(target, vectors::PING);
    while crate::irq::pings(target) == before {
        core::hint::spin_loop();
    }
    tsc::now() - t0
}
