//! Spinlocks with holder tracking and a paravirtual slow path.
//!
//! Every lock disables preemption while held or awaited, counts itself in the CPU's
//! `locks_held`, and tracks which CPU is in a waiter's way. A waiter that has spun past
//! [`PV_SPIN_US`] publishes "spinning on lock L, held by vCPU h" in the shared region and
//! then makes the host aware: the ticket lock offers its time to h (yield hypercall), the
//! queued lock halts until its predecessor kicks it with an IPI (or, with interrupts off,
//! yields too). A waiter keeps h current: when the lock changes hands while it waits, it
//! names the new holder.

pub(crate) mod mcs;
pub(crate) mod pacer;
mod slow;
mod spinlock;
mod ticket;

pub use mcs::McsLock;
pub use spinlock::{Guard, SpinLock};
pub use ticket::{KernelTicketLock, TicketLock};

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use shared_abi::NO_VCPU;

use crate::platform::Platform;

/// Spin this long before the paravirtual slow path.
pub const PV_SPIN_US: u64 = 20;

static PV_YIELDS: AtomicU64 = AtomicU64::new(0);
static PV_HALTS: AtomicU64 = AtomicU64::new(0);
static PV_KICKS: AtomicU64 = AtomicU64::new(0);
static STOCK_YIELDS: AtomicU64 = AtomicU64::new(0);
static PREEMPTED_HALTS: AtomicU64 = AtomicU64::new(0);

/// What the locks' slow paths have done so far (all locks, all CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvStats {
    /// Yield hypercalls naming the vCPU in the way (none without a pvsync host).
    pub yields: u64,
    /// Halts of queued-lock waiters.
    pub halts: u64,
    /// Kicks (IPIs) of halted queued-lock waiters.
    pub kicks: u64,
    /// Without a pvsync host: yields to a preempted holder through the platform's own
    /// means ([`Platform::yield_to_preempted`], KVM's PV sched yield).
    pub stock_yields: u64,
    /// Without a pvsync host: test-and-set ticket waiters that halted (until the next
    /// interrupt) because the platform reported the holder preempted
    /// ([`Platform::vcpu_is_preempted`]).
    pub preempted_halts: u64,
}

/// The slow paths' counters.
pub fn pv_stats() -> PvStats {
    PvStats {
        yields: PV_YIELDS.load(Relaxed),
        halts: PV_HALTS.load(Relaxed),
        kicks: PV_KICKS.load(Relaxed),
        stock_yields: STOCK_YIELDS.load(Relaxed),
        preempted_halts: PREEMPTED_HALTS.load(Relaxed),
    }
}

/// A lock algorithm. `lock` returns with preemption disabled; `unlock` re-enables it.
pub trait RawLock: Sync {
    /// The platform the lock runs on.
    type Platform: Platform;
    /// A short name for results lines.
    const NAME: &'static str;
    /// Whether `holder` is meaningful (not for the broken lock).
    const TRACKS_HOLDER: bool = true;
    /// Takes the lock (preemption disabled until `unlock`).
    fn lock(&self);
    /// Releases the lock but leaves preemption disabled: the caller re-enables it once it
    /// has restored the interrupt flag, so that the reschedule check sees it.
    fn release(&self);
    /// Releases the lock and re-enables preemption.
    fn unlock(&self) {
        self.release();
        Self::Platform::preempt_enable();
    }
    /// The CPU believed to hold the lock, or NO_VCPU.
    fn holder(&self) -> u32;
}

/// After releasing lock `lock` on CPU `me`: if this vCPU runs on a turn that a vCPU
/// spinning on `lock` lent it (the host boosted us for that vCPU's YieldTo), give the turn
/// back, as ABI v4 asks: we no longer hold the lender up, and the host runs it at once. One
/// load of our own record when no turn was lent.
#[inline]
fn give_back_turn<P: Platform>(lock: u64) {
    let me = P::cpu();
    // Only with no lock left held: a vCPU that queues while holding another lock would hold
    // up whoever waits for that one.
    if me.locks_held() != 0 {
        return;
    }
    if let Some(lender) = crate::record::lent_by(me) {
        // Nor with interrupts off (an irqsave lock being released): the vCPU would be
        // entered again with IF=0, which costs an interrupt-window exit.
        if crate::record::spinning_on(lender) == lock && P::irqs_enabled() {
            crate::hypercall::yield_to::<P>(lender);
        }
    }
}

/// Whether CPU `cpu` is kept off its physical CPU while runnable, as the pvsync host
/// (`host_preempted`) or the platform's own channel (KVM's steal time) reports it.
pub(crate) fn preempted<P: Platform>(cpu: u32) -> bool {
    crate::record::host_preempted(cpu) || P::vcpu_is_preempted(cpu)
}

/// Offers this vCPU's time to `holder` (not to itself, nor to nobody): with a pvsync host,
/// a YieldTo hypercall; without one, the platform's own yield to a holder it reports
/// preempted. Returns whether a call was made (each kind counted).
fn pv_yield<P: Platform>(holder: u32) -> bool {
    if holder == NO_VCPU || holder == P::cpu().id() {
        return false;
    }
    if crate::region::pv_host() {
        PV_YIELDS.fetch_add(1, Relaxed);
        crate::hypercall::yield_to::<P>(holder);
        true
    } else if P::vcpu_is_preempted(holder) && P::yield_to_preempted(holder) {
        STOCK_YIELDS.fetch_add(1, Relaxed);
        true
    } else {
        false
    }
}

/// A spinner's slow round: offers its time to `holder` ([`pv_yield`]); then, without a
/// pvsync host and given `halt_while` (test-and-set waiters only: a FIFO waiter that halts
/// would hold up everyone queued behind it once its turn came), if the platform still
/// reports the holder preempted, stops spinning: halts until the next interrupt (its tick
/// at the latest) while `halt_while` holds and the holder stays preempted, so that the host
/// can give the physical CPU to the holder. Nobody kicks such a halt: the tick bounds it.
/// With interrupts off it cannot halt, and spins on.
fn stop_spinning<P: Platform>(holder: u32, halt_while: Option<&dyn Fn() -> bool>) {
    pv_yield::<P>(holder);
    let Some(still_waiting) = halt_while else {
        return;
    };
    if crate::region::pv_host()
        || holder == NO_VCPU
        || holder == P::cpu().id()
        || !P::irqs_enabled()
        || !P::vcpu_is_preempted(holder)
    {
        return;
    }
    PREEMPTED_HALTS.fetch_add(1, Relaxed);
    P::halt_while(&|| still_waiting() && P::vcpu_is_preempted(holder));
}

/// A deliberately broken lock for negative controls: it excludes nothing.
pub struct BrokenLock<P>(PhantomData<fn() -> P>);

impl<P> BrokenLock<P> {
    /// The broken lock.
    pub const fn new() -> Self {
        BrokenLock(PhantomData)
    }
}

impl<P> Default for BrokenLock<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Platform> RawLock for BrokenLock<P> {
    type Platform = P;
    const NAME: &'static str = "broken";
    const TRACKS_HOLDER: bool = false;
    fn lock(&self) {
        P::preempt_disable();
    }
    fn release(&self) {}
    fn holder(&self) -> u32 {
        NO_VCPU
    }
}
