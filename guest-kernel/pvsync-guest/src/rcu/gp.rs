//! The grace-period machine, driven by the kernel's grace-period thread:
//!
//! ```text
//! loop {
//!     wait until rcu.gp_wanted();
//!     let mut gp = rcu.gp_begin();
//!     wait until rcu.gp_poll(&mut gp);   // re-checked whenever the thread is woken
//!     rcu.gp_end(gp);
//! }
//! ```

use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;
use shared_abi::EventKind;

use super::Rcu;
use crate::cpuset::CpuSet;
use crate::platform::{Ipi, Platform, Wake};
use crate::sync::Ordering::SeqCst;
use crate::{events, region};

/// A grace period in progress.
pub struct GracePeriod {
    n: u64,
    start: u64,
    /// Each CPU's extended-quiescent-state counter when the grace period began.
    snap: Vec<u64>,
    nudge_at: u64,
    nudged: bool,
}

impl GracePeriod {
    /// The grace period's number (what `request_gp` returned to those waiting for it).
    pub fn number(&self) -> u64 {
        self.n
    }
}

impl<P: Platform> Rcu<P> {
    /// Starts the grace period the requests ask for (call it on the grace-period thread's
    /// CPU once [`Rcu::gp_wanted`]).
    pub fn gp_begin(&self) -> GracePeriod {
        let n = self.gp_completed.load(SeqCst) + 1;
        let start = P::now();
        let me = P::cpu().id();
        // The set only shrinks while the grace period runs: every CPU first, then each bit
        // is cleared by the CPU that reports or by this thread when it finds the CPU
        // quiescent; it is never written whole, so a report is never undone and the host
        // never sees an empty set with an odd sequence.
        // Started before the set is filled: a CPU reporting for the previous grace period
        // that reads the old number afterwards would clear its bit in the new set, and the
        // host would not see a real holdout; this way a late report finds the new number and
        // puts its bit back (`report_qs`), and a bit set here for a CPU that has already
        // reported for this one is dropped by the first `keep_holdouts` below.
        self.gp_started.store(n, SeqCst);
        let mut all = CpuSet::new();
        self.online.load_into(&mut all, SeqCst);
        all.insert(me);
        self.holdouts.store(&all);
        // Every word of the region's bitmap before the odd sequence: a host that reads the
        // sequence odd finds this grace period's holdouts.
        region::rcu_holdouts().store(&all);
        self.publish_state();
        let snap = self.eqs.iter().map(|e| e.load(SeqCst)).collect();
        let gp = GracePeriod {
            n,
            start,
            snap,
            nudge_at: start + P::us_to_ticks(self.nudge_after_us),
            nudged: false,
        };
        // This thread is itself preemptible here: a quiescent state for its own CPU.
        self.report_qs(me as usize);
        let mut first = CpuSet::new();
        self.holdouts_of(&gp, &mut first);
        self.keep_holdouts(&mut first, me);
        let seq = self.gp_seq() as u32;
        events::emit::<P>(EventKind::GpStart, seq, first.first_word());
        if !first.is_empty() {
            // One exit per grace period that has to wait: the host can run the preempted
            // holdouts (named in the header, with the sequence published above) at once.
            self.tell_host_waiting();
        }
        gp
    }

    /// Looks at the holdouts again: true once none is left (then call [`Rcu::gp_end`]).
    /// Once the grace period is overdue it asks its holdouts for a quiescent state with an
    /// IPI (Linux's RCU does the same with resched_cpu), instead of waiting for their ticks.
    pub fn gp_poll(&self, gp: &mut GracePeriod) -> bool {
        let mut h = CpuSet::new();
        self.holdouts_of(gp, &mut h);
        self.keep_holdouts(&mut h, P::cpu().id());
        if !h.is_empty() && !gp.nudged && P::now() > gp.nudge_at {
            gp.nudged = true;
            P::send_ipi_many(&h, Ipi::Reschedule);
        }
        h.is_empty()
    }

    /// Ends the grace period: its waiters and the callback threads with work are woken.
    pub fn gp_end(&self, gp: GracePeriod) {
        events::emit::<P>(EventKind::GpEnd, self.gp_seq() as u32, 0);
        let took = P::now().wrapping_sub(gp.start);
        self.gp_completed.store(gp.n, SeqCst);
        self.gp_min.fetch_min(took, Relaxed);
        self.gp_max.fetch_max(took, Relaxed);
        self.gp_total.fetch_add(took, Relaxed);
        self.publish_state();
        // Cleared only once the even sequence is out.
        self.holdouts.clear();
        region::rcu_holdouts().clear();
        P::wake(Wake::GracePeriodWaiters);
        let mut online = CpuSet::new();
        self.online.load_into(&mut online, SeqCst);
        for c in online.iter() {
            if self.queued[c as usize].load(SeqCst) != 0 {
                P::wake(Wake::Callbacks(c));
            }
        }
    }

    /// Published: the holdouts, and the thread's own CPU until the grace period ends
    /// (`holdouts` comes back as it was; it holds `me` for a moment, not to be copied).
    fn keep_holdouts(&self, holdouts: &mut CpuSet, me: u32) {
        let had_me = holdouts.contains(me);
        holdouts.insert(me);
        self.holdouts.retain(holdouts);
        region::rcu_holdouts().retain(holdouts);
        if !had_me {
            holdouts.remove(me);
        }
    }

    /// Leaves in `into` the CPUs grace period `gp` still waits for.
    fn holdouts_of(&self, gp: &GracePeriod, into: &mut CpuSet) {
        // The negative control counts a report for the previous grace period too.
        let early = self.faults.early_end.load(Relaxed) as u64;
        self.online.load_into(into, SeqCst);
        into.retain(|c| {
            let c = c as usize;
            !(gp.snap[c].is_multiple_of(2)
                || self.eqs[c].load(SeqCst) != gp.snap[c]
                || self.qs_gp[c].load(SeqCst) + early >= gp.n)
        });
    }
}
