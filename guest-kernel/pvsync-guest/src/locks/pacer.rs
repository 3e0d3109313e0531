//! Paces a waiting loop's slow-path work.

use super::PV_SPIN_US;
use crate::platform::Platform;

/// Spins between two reads of the clock in a waiting loop.
#[cfg(not(test))]
const CLOCK_EVERY: u32 = 8;
/// Models read the clock on every spin (a smaller state space).
#[cfg(test)]
const CLOCK_EVERY: u32 = 1;

/// [`Pacer::due`] turns true each time [`PV_SPIN_US`] have passed since the previous round
/// of slow-path work (or the start). The clock is read only every [`CLOCK_EVERY`] spins:
/// RDTSC may exit to the hypervisor (it does on nested hosts), and a pause loop broken by
/// exits no longer looks like spinning to KVM's pause-loop exiting, which gives a spinner's
/// time to a preempted vCPU.
pub(crate) struct Pacer<P> {
    threshold: u64,
    since: u64,
    spins: u32,
    _p: core::marker::PhantomData<fn() -> P>,
}

impl<P: Platform> Pacer<P> {
    pub(crate) fn new() -> Self {
        Self::every_us(PV_SPIN_US)
    }

    /// A pacer with its own period.
    pub(crate) fn every_us(us: u64) -> Self {
        Pacer {
            threshold: P::us_to_ticks(us),
            since: P::now(),
            spins: 0,
            _p: core::marker::PhantomData,
        }
    }

    /// Called once per spin: whether it is time for a round of slow-path work.
    #[inline]
    pub(crate) fn due(&mut self) -> bool {
        self.spins = self.spins.wrapping_add(1);
        if !self.spins.is_multiple_of(CLOCK_EVERY) {
            return false;
        }
        let now = P::now();
        if now.wrapping_sub(self.since) > self.threshold {
            self.since = now;
            true
        } else {
            false
        }
    }

    /// Starts the next period now (after slow-path work that took a while: a halt).
    pub(crate) fn restart(&mut self) {
        self.since = P::now();
    }
}
