//! What a waiter in the slow path publishes: it names the vCPU in its way and republishes
//! only when that changes; dropping it publishes what was there before.

use shared_abi::{EventKind, NO_VCPU};

use super::stop_spinning;
use crate::events;
use crate::platform::Platform;
use crate::record;

pub(crate) struct SlowPath<P: Platform> {
    lock: u64,
    named: Option<u32>,
    /// What was published before this slow path first named someone: an interrupt handler
    /// that spins on a lock while the code it interrupted waits on another must leave that
    /// wait published as it found it.
    outer: (u64, u32),
    _p: core::marker::PhantomData<fn() -> P>,
}

impl<P: Platform> SlowPath<P> {
    pub(crate) fn new<L>(lock: &L) -> Self {
        SlowPath {
            lock: lock as *const L as u64,
            named: None,
            outer: (0, NO_VCPU),
            _p: core::marker::PhantomData,
        }
    }

    /// The vCPU last published, if any.
    pub(crate) fn named(&self) -> Option<u32> {
        self.named
    }

    /// One slow round of a ticket waiter: names `taker` (the CPU holding the ticket being
    /// served; not known yet when it took it a moment ago: keep the last name), offers it
    /// this vCPU's time (and, a test-and-set waiter without a pvsync host, given
    /// `halt_while`, stops spinning on it while it is preempted: `stop_spinning`), and
    /// serves what others wait on from this CPU meanwhile.
    pub(crate) fn offer(&mut self, taker: Option<u32>, halt_while: Option<&dyn Fn() -> bool>) {
        let h = taker.or(self.named()).unwrap_or(NO_VCPU);
        self.name(h);
        stop_spinning::<P>(h, halt_while);
        P::serve_waiters();
    }

    /// Publishes `holder` as the vCPU in the way, if it is not already.
    pub(crate) fn name(&mut self, holder: u32) {
        if self.named != Some(holder) {
            let cpu = P::cpu();
            if self.named.is_none() {
                self.outer = record::own_spin(cpu);
            }
            record::set_spin(cpu, self.lock, holder);
            events::emit::<P>(EventKind::LockSpin, holder, self.lock);
            self.named = Some(holder);
        }
    }
}

impl<P: Platform> Drop for SlowPath<P> {
    fn drop(&mut self) {
        if self.named.is_some() {
            let (lock, holder) = self.outer;
            record::set_spin(P::cpu(), lock, holder);
            match lock {
                0 => events::emit::<P>(EventKind::LockSpinEnd, 0, 0),
                _ => events::emit::<P>(EventKind::LockSpin, holder, lock),
            }
        }
    }
}
