//! Spinlocks with holder tracking and a paravirt slow path.
//!
//! Every lock disables preemption while held, counts itself in the CPU's `locks_held`, and
//! records which CPU holds it. A waiter that has spun past [`PV_SPIN_US`] publishes "spinning
//! on lock L, held by vCPU h" in the shared region and then makes the host aware: the ticket
//! lock offers its time to h (yield hypercall), the queued lock halts until its predecessor
//! kicks it with an IPI (or, with interrupts off, yields too).

mod mcs;
mod ticket;

pub use mcs::McsLock;
pub use ticket::TicketLock;

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use shared_abi::{MAX_VCPUS, NO_VCPU};

use crate::{percpu, shared};

/// Spin this long before the paravirt slow path.
pub const PV_SPIN_US: u64 = 20;

static HELD: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];
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
    fn unlock(&self);
    /// The CPU believed to hold the lock, or NO_VCPU.
    fn holder(&self) -> u32;
}

fn acquired(holder: &AtomicU32) {
    holder.store(percpu::id(), Ordering::Relaxed);
    let c = percpu::id() as usize;
    let n = HELD[c].fetch_add(1, Ordering::Relaxed) + 1;
    shared::set_locks_held(n);
}

fn releasing(holder: &AtomicU32) {
    holder.store(NO_VCPU, Ordering::Relaxed);
    let c = percpu::id() as usize;
    let n = HELD[c].fetch_sub(1, Ordering::Relaxed) - 1;
    shared::set_locks_held(n);
}

/// Entering the slow path: tell the host what we spin on.
fn slow_path_enter(lock: *const (), holder: u32) {
    shared::set_spin(lock as u64, holder);
}

fn slow_path_exit() {
    shared::set_spin(0, NO_VCPU);
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
    fn unlock(&self) {
        percpu::preempt_enable();
    }
    fn holder(&self) -> u32 {
        NO_VCPU
    }
}

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
        self.lock.raw.unlock();
        if self.irq_was_enabled == Some(true) {
            x86_64::instructions::interrupts::enable();
        }
    }
}
