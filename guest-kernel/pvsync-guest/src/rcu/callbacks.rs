//! Callbacks: queued per CPU with the grace period they wait for, run in order by the
//! kernel's per-CPU callback thread once that grace period has completed.

use core::sync::atomic::Ordering::Relaxed;

use super::{Callback, Rcu};
use crate::platform::{Platform, Wake};
use crate::sync::Ordering::SeqCst;

impl<P: Platform> Rcu<P> {
    /// Runs `f` after a grace period, on this CPU, outside any reader.
    pub fn call(&self, f: Callback) {
        let target = self.request_gp(false);
        self.post(P::cpu().id(), target, f);
    }

    /// Queues `f` on CPU `c`'s list, to run once grace period `target` has completed (a
    /// barrier posts one callback per CPU).
    pub fn post(&self, c: u32, target: u64, f: Callback) {
        // Counted before it is queued: once queued, the callback thread may run and uncount
        // it at once (its grace period can already be over), and the count must never go
        // below 0.
        let p = self.pending.fetch_add(1, Relaxed) + 1;
        self.peak_pending.fetch_max(p, Relaxed);
        self.cbs[c as usize].lock_irqsave().push_back((target, f));
        self.queued[c as usize].fetch_add(1, SeqCst);
        // The grace period may have ended since request_gp, its thread finding nothing
        // queued here: then this is the wake-up (both sides count before they look).
        if self.gp_completed.load(SeqCst) >= target {
            P::wake(Wake::Callbacks(c));
        }
        self.publish_state();
    }

    /// Whether CPU `c` has a callback whose grace period has completed (its callback
    /// thread's wake-up condition).
    pub fn callbacks_ready(&self, c: u32) -> bool {
        let done = self.gp_completed.load(SeqCst);
        self.cbs[c as usize]
            .lock_irqsave()
            .front()
            .is_some_and(|(t, _)| *t <= done)
    }

    /// Runs CPU `c`'s callbacks whose grace period has completed, in order (call it from
    /// CPU `c`'s callback thread, outside any reader).
    pub fn run_callbacks(&self, c: u32) {
        let done = self.gp_completed.load(SeqCst);
        loop {
            let cb = {
                let mut q = self.cbs[c as usize].lock_irqsave();
                if q.front().is_some_and(|(t, _)| *t <= done) {
                    q.pop_front().map(|(_, f)| f)
                } else {
                    None
                }
            };
            let Some(f) = cb else { break };
            self.queued[c as usize].fetch_sub(1, SeqCst);
            // Uncount before running: a barrier's callback wakes its waiter, which must then
            // see no callback of its own still counted.
            self.pending.fetch_sub(1, Relaxed);
            self.invoked.fetch_add(1, Relaxed);
            f();
        }
        self.publish_state();
    }
}
