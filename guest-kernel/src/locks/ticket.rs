//! Ticket lock: FIFO by ticket number.
//!
//! Each lock remembers which CPU took each outstanding ticket, so a waiter can name the CPU
//! in its way even when that CPU has been served but has not taken the lock yet (a vCPU
//! preempted between the release and its acquisition blocks everyone behind it just as a
//! holder does).

use core::sync::atomic::{AtomicU32, Ordering::*};
use shared_abi::{MAX_VCPUS, NO_VCPU};

use super::{acquired, pv_yield, released, RawLock, SlowPath, PV_SPIN_US};
use crate::arch::tsc;
use crate::percpu;

pub struct TicketLock {
    next: AtomicU32,
    owner: AtomicU32,
    /// Slot `t % MAX_VCPUS` holds `tag(t) | cpu` once `cpu` took ticket `t` (written right
    /// after it takes it). The slots of outstanding tickets never collide: a CPU holds or
    /// waits for at most one ticket of a lock at a time (preemption is off from taking a
    /// ticket to releasing the lock, and a CPU never takes a lock it holds: an interrupt
    /// handler's lock is taken with interrupts off everywhere), so at most MAX_VCPUS
    /// consecutive tickets are outstanding.
    takers: [AtomicU32; MAX_VCPUS],
}

/// Low bits of a taker slot: the CPU (< MAX_VCPUS <= 256).
const CPU_MASK: u32 = 0xff;

/// Ticket `t`'s tag: its low 24 bits, plus one so that a zeroed slot names nobody.
fn tag(t: u32) -> u32 {
    t.wrapping_add(1) << 8
}

fn slot(t: u32) -> usize {
    t as usize % MAX_VCPUS
}

impl TicketLock {
    pub const fn new() -> Self {
        TicketLock {
            next: AtomicU32::new(0),
            owner: AtomicU32::new(0),
            takers: [const { AtomicU32::new(0) }; MAX_VCPUS],
        }
    }

    /// The CPU that took ticket `t`, if it has said so yet. A stale slot holds ticket
    /// `t - MAX_VCPUS`'s tag, which differs.
    fn taker(&self, t: u32) -> Option<u32> {
        let v = self.takers[slot(t)].load(Relaxed);
        (v & !CPU_MASK == tag(t)).then_some(v & CPU_MASK)
    }

    fn record_taker(&self, t: u32) {
        self.takers[slot(t)].store(tag(t) | percpu::id(), Relaxed);
    }

    /// First half of `lock`: disables preemption and takes (and records) a ticket.
    pub fn take_ticket(&self) -> u32 {
        percpu::preempt_disable();
        let t = self.next.fetch_add(1, Relaxed);
        self.record_taker(t);
        t
    }

    /// Second half of `lock`: waits until ticket `t` (taken by this CPU) is served.
    pub fn wait_turn(&self, t: u32) {
        if self.owner.load(Acquire) != t {
            self.wait_slow(t);
        }
        acquired();
    }

    #[cold]
    fn wait_slow(&self, ticket: u32) {
        let threshold = tsc::us_to_cycles(PV_SPIN_US);
        let mut since = tsc::now();
        let mut slow = SlowPath::new(self);
        loop {
            let owner = self.owner.load(Acquire);
            if owner == ticket {
                break;
            }
            core::hint::spin_loop();
            if tsc::now() - since > threshold {
                // Whoever took ticket `owner` is in our way, holding the lock or about to.
                // Not said yet (it took the ticket a moment ago): keep the last name.
                let h = self.taker(owner).or(slow.named()).unwrap_or(NO_VCPU);
                slow.name(h);
                pv_yield(h);
                crate::tlb::serve_requests();
                since = tsc::now();
            }
        }
    }
}

impl Default for TicketLock {
    fn default() -> Self {
        Self::new()
    }
}

impl RawLock for TicketLock {
    const NAME: &'static str = "ticket";

    fn lock(&self) {
        self.wait_turn(self.take_ticket());
    }

    fn release(&self) {
        released();
        self.owner.fetch_add(1, Release);
    }

    /// The CPU that took the ticket being served: the holder, or the CPU about to hold the
    /// lock; NO_VCPU when nobody took it.
    fn holder(&self) -> u32 {
        self.taker(self.owner.load(Relaxed)).unwrap_or(NO_VCPU)
    }
}
