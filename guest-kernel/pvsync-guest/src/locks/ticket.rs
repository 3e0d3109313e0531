//! Ticket lock: FIFO by ticket number.
//!
//! Each lock remembers which CPU took each outstanding ticket, so a waiter can name the CPU
//! in its way even when that CPU has been served but has not taken the lock yet (a vCPU
//! preempted between the release and its acquisition blocks everyone behind it just as a
//! holder does).
//!
//! Kernel locks (`TicketLock::kernel`) are taken test-and-set style on the same counters (a
//! CPU takes the ticket being served only while nobody holds it), as Linux's
//! `virt_spin_lock` does under a hypervisor: a FIFO hand-off to a waiter the hypervisor
//! preempted stalls every CPU behind it, however short the critical section. Measured on 2
//! host cores: 64 vCPUs boot in about 20 s with FIFO kernel locks (yields and all), 3-4 s
//! test-and-set. A waiter still names the holder and yields to it, so the host can boost a
//! preempted holder; only the waiters' order is given up.

use core::marker::PhantomData;
use shared_abi::{EventKind, NO_VCPU};

use super::pacer::Pacer;
use super::slow::SlowPath;
use super::spinlock::{Guard, SpinLock};
use super::{give_back_turn, RawLock};
use crate::platform::Platform;
use crate::sync::{AtomicU32, Ordering::*};
use crate::NR_CPUS;

/// A ticket lock whose waiters' CPUs fit in `SLOTS` taker slots (by default every CPU a
/// kernel may have, [`NR_CPUS`]: 4 bytes each).
pub struct TicketLock<P, const SLOTS: usize = NR_CPUS> {
    next: AtomicU32,
    owner: AtomicU32,
    /// Slot `t % SLOTS` holds `tag(t) | cpu` once `cpu` took ticket `t` (written right after
    /// it takes it). The slots of outstanding tickets never collide: a CPU holds or waits for
    /// at most one ticket of a lock at a time (preemption is off from taking a ticket to
    /// releasing the lock, and a CPU never takes a lock it holds: an interrupt handler's lock
    /// is taken with interrupts off everywhere), so at most SLOTS consecutive tickets are
    /// outstanding.
    takers: [AtomicU32; SLOTS],
    /// Take the lock test-and-set style (kernel locks).
    unfair: bool,
    /// Negative control of the models: release without release ordering (a missing
    /// fence), so the next holder may not see the critical section's writes.
    #[cfg(test)]
    relaxed_release: bool,
    _p: PhantomData<fn() -> P>,
}

/// Bits of a taker slot that hold the CPU; the ticket's tag lies above them.
const CPU_BITS: u32 = 12;
const CPU_MASK: u32 = (1 << CPU_BITS) - 1;
const _: () = assert!(NR_CPUS <= CPU_MASK as usize + 1);

/// A kernel lock's type ([`TicketLock::kernel`]): taken test-and-set style, it has at most
/// one ticket outstanding (a CPU takes one only while nobody holds the lock), so one taker
/// slot names its holder, where a FIFO lock needs one per CPU that may wait (4 KiB at 1024
/// CPUs, for every run queue, wait queue and task). Never take a ticket of one with
/// `take_ticket`.
pub type KernelTicketLock<P> = TicketLock<P, 1>;

/// Ticket `t`'s tag: its low bits, plus one so that a zeroed slot names nobody.
fn tag(t: u32) -> u32 {
    t.wrapping_add(1) << CPU_BITS
}

impl<P: Platform, const SLOTS: usize> TicketLock<P, SLOTS> {
    crate::sync::const_fn! {
        /// A FIFO ticket lock.
        pub fn new() -> Self {
            Self::with_order(false)
        }
    }

    crate::sync::const_fn! {
        /// A kernel lock: test-and-set on the ticket counters (module doc).
        pub fn kernel() -> Self {
            Self::with_order(true)
        }
    }

    crate::sync::const_fn! {
        fn with_order(unfair: bool) -> Self {
            TicketLock {
                next: AtomicU32::new(0),
                owner: AtomicU32::new(0),
                takers: crate::sync::array_of!(SLOTS, AtomicU32::new(0)),
                unfair,
                #[cfg(test)]
                relaxed_release: false,
                _p: PhantomData,
            }
        }
    }

    /// The broken variant of the models' negative control (see `relaxed_release`).
    #[cfg(test)]
    pub(crate) fn with_relaxed_release(unfair: bool) -> Self {
        let mut l = Self::with_order(unfair);
        l.relaxed_release = true;
        l
    }

    fn slot(t: u32) -> usize {
        t as usize % SLOTS
    }

    /// The CPU that took ticket `t`, if it has said so yet. A stale slot holds ticket
    /// `t - SLOTS`'s tag, which differs.
    fn taker(&self, t: u32) -> Option<u32> {
        let v = self.takers[Self::slot(t)].load(Relaxed);
        (v & !CPU_MASK == tag(t)).then_some(v & CPU_MASK)
    }

    fn record_taker(&self, t: u32, cpu: u32) {
        self.takers[Self::slot(t)].store(tag(t) | cpu, Relaxed);
    }

    /// First half of `lock`: disables preemption and takes (and records) a ticket.
    #[inline]
    fn take(&self) -> u32 {
        P::preempt_disable();
        let t = self.next.fetch_add(1, Relaxed);
        self.record_taker(t, P::cpu().id());
        t
    }

    /// Second half of `lock`: waits until ticket `t` (taken by this CPU) is served.
    #[inline]
    fn wait(&self, t: u32) {
        if self.owner.load(Acquire) != t {
            self.wait_slow(t);
        }
        P::cpu().add_locks_held(1);
    }

    /// The first half of `lock` alone (for tests that hold a ticket without waiting):
    /// returns the ticket, preemption disabled.
    pub fn take_ticket(&self) -> u32 {
        self.take()
    }

    /// The second half of `lock`, for a ticket from `take_ticket` on this CPU.
    pub fn wait_turn(&self, t: u32) {
        self.wait(t);
    }

    /// Takes the lock if it is free, else re-enables preemption and returns false.
    pub fn try_lock(&self) -> bool {
        P::preempt_disable();
        if self.try_take() {
            P::cpu().add_locks_held(1);
            true
        } else {
            P::preempt_enable();
            false
        }
    }

    /// Takes the ticket being served if nobody holds it (the lock is free).
    #[inline]
    fn try_take(&self) -> bool {
        let owner = self.owner.load(Acquire);
        let free = self
            .next
            .compare_exchange(owner, owner.wrapping_add(1), Acquire, Relaxed)
            .is_ok();
        if free {
            self.record_taker(owner, P::cpu().id());
        }
        free
    }

    /// Test-and-set acquisition: spin until the lock is free and take it; past the
    /// threshold, name the holder and yield to it.
    #[cold]
    fn spin_unfair(&self) {
        let mut pacer = Pacer::<P>::new();
        let mut slow = SlowPath::<P>::new(self);
        loop {
            // Read before the CAS: waiters spin on a shared line, not an exclusive one.
            let owner = self.owner.load(Relaxed);
            if self.next.load(Relaxed) == owner && self.try_take() {
                break;
            }
            crate::sync::spin_loop();
            if pacer.due() {
                // Halt only while the lock is held by whoever took ticket `owner`: `next`
                // first, then `owner`, which only grow, so the lock was held all along
                // between the two reads (`next` is `owner` or `owner + 1`).
                let held = || {
                    let next = self.next.load(Relaxed);
                    self.owner.load(Relaxed) == owner && next == owner.wrapping_add(1)
                };
                slow.offer(self.taker(owner), Some(&held));
            }
        }
    }

    #[cold]
    fn wait_slow(&self, ticket: u32) {
        let mut pacer = Pacer::<P>::new();
        let mut slow = SlowPath::<P>::new(self);
        loop {
            let owner = self.owner.load(Acquire);
            if owner == ticket {
                break;
            }
            crate::sync::spin_loop();
            if pacer.due() {
                // Whoever took ticket `owner` is in our way, holding the lock or about to.
                slow.offer(self.taker(owner), None);
            }
        }
    }
}

impl<P: Platform, const SLOTS: usize> Default for TicketLock<P, SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Platform, const SLOTS: usize> RawLock for TicketLock<P, SLOTS> {
    type Platform = P;
    const NAME: &'static str = "ticket";

    fn lock(&self) {
        if self.unfair {
            P::preempt_disable();
            if !self.try_take() {
                self.spin_unfair();
            }
            P::cpu().add_locks_held(1);
        } else {
            let t = self.take();
            self.wait(t);
        }
    }

    fn release(&self) {
        P::cpu().add_locks_held(-1);
        #[cfg(test)]
        let order = if self.relaxed_release {
            Relaxed
        } else {
            Release
        };
        #[cfg(not(test))]
        let order = Release;
        let served = self.owner.fetch_add(1, order);
        // Traced only: whether someone took a ticket after ours (a waiter) costs a load.
        if crate::events::on() && self.next.load(Relaxed) != served.wrapping_add(1) {
            crate::events::emit::<P>(EventKind::LockRelease, NO_VCPU, self as *const Self as u64);
        }
        give_back_turn::<P>(self as *const Self as u64);
    }

    /// The CPU that took the ticket being served: the holder, or the CPU about to hold the
    /// lock; NO_VCPU when nobody took it.
    fn holder(&self) -> u32 {
        self.taker(self.owner.load(Relaxed)).unwrap_or(NO_VCPU)
    }
}

impl<T, P: Platform, const SLOTS: usize> SpinLock<T, TicketLock<P, SLOTS>> {
    crate::sync::const_fn! {
        /// A kernel lock (test-and-set ticket lock) around `data`.
        pub fn kernel(data: T) -> Self {
            SpinLock::new(TicketLock::kernel(), data)
        }
    }

    /// The lock if it is free now, without waiting (interrupts as they are).
    pub fn try_lock(&self) -> Option<Guard<'_, T, TicketLock<P, SLOTS>>> {
        self.raw().try_lock().then(|| self.held())
    }
}
