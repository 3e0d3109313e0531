//! Spinlocks with holder tracking and a paravirt slow path.
//!
//! Every lock disables preemption while held or awaited, counts itself in the CPU's
//! `locks_held`, and tracks which CPU is in a waiter's way. A waiter that has spun past
//! [`PV_SPIN_US`] publishes "spinning on lock L, held by vCPU h" in the shared region and
//! then makes the host aware: the ticket lock offers its time to h (yield hypercall), the
//! queued lock halts until its predecessor kicks it with an IPI (or, with interrupts off,
//! yields too). A waiter keeps h current: when the lock changes hands while it waits, it
//! names the new holder.
//!
//! The kernel's own data structures use [`KernelLock`] (a ticket lock taken test-and-set
//! style, see ticket.rs): a tick cannot preempt a holder, and the host sees holders and
//! waiters.

mod mcs;
mod ticket;

pub use mcs::McsLock;
pub use ticket::TicketLock;

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU64, Ordering};
use shared_abi::NO_VCPU;

use crate::arch::tsc;
use crate::percpu::{self, PerCpu};
use crate::shared;

/// Spin this long before the paravirt slow path.
pub const PV_SPIN_US: u64 = 20;

static PV_YIELDS: AtomicU64 = AtomicU64::new(0);
static PV_HALTS: AtomicU64 = AtomicU64::new(0);
static PV_KICKS: AtomicU64 = AtomicU64::new(0);

/// (yield hypercalls, halts, kicks) made by lock slow paths.
pub fn pv_stats() -> (u64, u64, u64) {
    (
        PV_YIELDS.load(Ordering::Relaxed),
        PV_HALTS.load(Ordering::Relaxed),
        PV_KICKS.load(Ordering::Relaxed),
    )
}

/// A lock algorithm. `lock` returns with preemption disabled; `unlock` re-enables it.
pub trait RawLock: Sync {
    const NAME: &'static str;
    /// Whether `holder` is meaningful (not for the broken lock).
    const TRACKS_HOLDER: bool = true;
    fn lock(&self);
    /// Releases the lock but leaves preemption disabled: the caller re-enables it once it
    /// has restored the interrupt flag, so that the reschedule check sees it.
    fn release(&self);
    fn unlock(&self) {
        self.release();
        percpu::preempt_enable();
    }
    /// The CPU believed to hold the lock, or NO_VCPU.
    fn holder(&self) -> u32;
}

/// Counts a lock taken by this CPU (`me`; published with one store).
#[inline]
fn acquired(me: &PerCpu) {
    me.add_locks_held(1);
}

/// Counts a lock released by this CPU.
#[inline]
fn released(me: &PerCpu) {
    me.add_locks_held(-1);
}

/// Spins between two reads of the clock in a waiting loop.
const CLOCK_EVERY: u32 = 8;

/// Paces a waiting loop: [`Pacer::due`] turns true each time [`PV_SPIN_US`] have passed
/// since the previous round of slow-path work (or the start). The clock is read only every
/// [`CLOCK_EVERY`] spins: RDTSC may exit to the hypervisor (it does on the nested hosts this
/// runs on), and a pause loop broken by exits no longer looks like spinning to KVM's
/// pause-loop exiting, which gives a spinner's time to a preempted vCPU.
struct Pacer {
    threshold: u64,
    since: u64,
    spins: u32,
}

impl Pacer {
    fn new() -> Self {
        Pacer {
            threshold: tsc::us_to_cycles(PV_SPIN_US),
            since: tsc::now(),
            spins: 0,
        }
    }

    /// Called once per spin: whether it is time for a round of slow-path work.
    #[inline]
    fn due(&mut self) -> bool {
        self.spins = self.spins.wrapping_add(1);
        if !self.spins.is_multiple_of(CLOCK_EVERY) {
            return false;
        }
        let now = tsc::now();
        if now - self.since > self.threshold {
            self.since = now;
            true
        } else {
            false
        }
    }

    /// Starts the next period now (after slow-path work that took a while: a halt).
    fn restart(&mut self) {
        self.since = tsc::now();
    }
}

/// What a waiter in the slow path has published: it names the vCPU in its way and
/// republishes only when that changes; dropping it publishes "not spinning".
struct SlowPath {
    lock: u64,
    named: Option<u32>,
    /// What was published before this slow path first named someone: an interrupt handler
    /// that spins on a kernel lock while the code it interrupted waits on another must leave
    /// that wait published as it found it.
    outer: (u64, u32),
}

impl SlowPath {
    fn new<L>(lock: &L) -> Self {
        SlowPath {
            lock: lock as *const L as u64,
            named: None,
            outer: (0, NO_VCPU),
        }
    }

    /// The vCPU last published, if any.
    fn named(&self) -> Option<u32> {
        self.named
    }

    /// One slow round of a ticket waiter: names `taker` (the CPU holding the ticket being
    /// served; not known yet when it took it a moment ago: keep the last name), offers it
    /// this vCPU's time, and serves shootdowns aimed here meanwhile.
    fn offer(&mut self, taker: Option<u32>) {
        let h = taker.or(self.named()).unwrap_or(NO_VCPU);
        self.name(h);
        pv_yield(h);
        crate::tlb::serve_requests();
    }

    /// Publishes `holder` as the vCPU in the way, if it is not already.
    fn name(&mut self, holder: u32) {
        if self.named != Some(holder) {
            if self.named.is_none() {
                self.outer = shared::own_spin();
            }
            shared::set_spin(self.lock, holder);
            self.named = Some(holder);
        }
    }
}

impl Drop for SlowPath {
    fn drop(&mut self) {
        if self.named.is_some() {
            shared::set_spin(self.outer.0, self.outer.1);
        }
    }
}

/// After releasing `lock` on CPU `me`: if this vCPU runs on a turn that a vCPU spinning on
/// `lock` lent it (the host boosted us for that vCPU's YieldTo), give the turn back, as
/// ABI v4 asks: we no longer hold the lender up, and the host runs it at once. One load of
/// our own record when no turn was lent.
#[inline]
fn give_back_turn(me: &PerCpu, lock: u64) {
    // Only with no lock left held: a vCPU that queues while holding another lock would hold
    // up whoever waits for that one.
    if me.locks_held() != 0 {
        return;
    }
    if let Some(lender) = shared::lent_by(me) {
        // Nor with interrupts off (an irqsave lock being released): the vCPU would be
        // entered again with IF=0, which costs an interrupt-window exit on this host.
        if shared::spinning_on(lender) == lock && x86_64::instructions::interrupts::are_enabled() {
            shared::yield_to(lender);
        }
    }
}

fn pv_yield(holder: u32) {
    if holder != NO_VCPU && holder != percpu::id() {
        PV_YIELDS.fetch_add(1, Ordering::Relaxed);
        shared::yield_to(holder);
    }
}

/// A deliberately broken lock for the negative control: it excludes nothing.
pub struct BrokenLock;

impl RawLock for BrokenLock {
    const NAME: &'static str = "broken";
    const TRACKS_HOLDER: bool = false;
    fn lock(&self) {
        percpu::preempt_disable();
    }
    fn release(&self) {}
    fn holder(&self) -> u32 {
        NO_VCPU
    }
}

/// The lock kernel data structures use (run queues, wait queues, allocators, console).
pub type KernelLock<T> = SpinLock<T, TicketLock>;

/// Data behind a lock of algorithm `L`.
pub struct SpinLock<T, L: RawLock> {
    raw: L,
    data: UnsafeCell<T>,
}

// SAFETY: the raw lock serialises access to `data` (for every L but BrokenLock, which exists
// to show what happens when it does not).
unsafe impl<T: Send, L: RawLock> Sync for SpinLock<T, L> {}

impl<T, L: RawLock> SpinLock<T, L> {
    pub const fn new(raw: L, data: T) -> Self {
        SpinLock {
            raw,
            data: UnsafeCell::new(data),
        }
    }

    pub fn lock(&self) -> Guard<'_, T, L> {
        self.raw.lock();
        Guard {
            lock: self,
            irq_was_enabled: None,
        }
    }

    /// Disables interrupts too, restoring them on unlock (for data interrupt handlers use).
    pub fn lock_irqsave(&self) -> Guard<'_, T, L> {
        let was = x86_64::instructions::interrupts::are_enabled();
        x86_64::instructions::interrupts::disable();
        self.raw.lock();
        Guard {
            lock: self,
            irq_was_enabled: Some(was),
        }
    }

    pub fn raw(&self) -> &L {
        &self.raw
    }
}

impl<T> SpinLock<T, TicketLock> {
    /// A kernel lock around `data`.
    pub const fn kernel(data: T) -> Self {
        SpinLock::new(TicketLock::kernel(), data)
    }

    /// The lock if it is free now, without waiting (interrupts as they are).
    pub fn try_lock(&self) -> Option<Guard<'_, T, TicketLock>> {
        self.raw.try_lock().then_some(Guard {
            lock: self,
            irq_was_enabled: None,
        })
    }
}

pub struct Guard<'a, T, L: RawLock> {
    lock: &'a SpinLock<T, L>,
    irq_was_enabled: Option<bool>,
}

impl<T, L: RawLock> Deref for Guard<'_, T, L> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T, L: RawLock> DerefMut for Guard<'_, T, L> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock exclusively.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T, L: RawLock> Drop for Guard<'_, T, L> {
    fn drop(&mut self) {
        self.lock.raw.release();
        // Interrupts back on before preemption: preempt_enable switches to a task woken
        // meanwhile only when it sees interrupts enabled.
        if self.irq_was_enabled == Some(true) {
            x86_64::instructions::interrupts::enable();
        }
        percpu::preempt_enable();
    }
}
