//! Boosts under the Linux backend: the ledger's grant, the raise through `rtboost` with the
//! backend's state unlocked, and the early give-back.

use std::time::Duration;

use super::{Lent, LinuxBackend, State};
use crate::policy::{Boost, BoostReason};
use crate::sched::rtboost::Outcome;
use crate::sched::Nanos;

/// A boost the ledger allows, to be made.
pub(super) struct Grant {
    vm: usize,
    key: usize,
    tid: libc::pid_t,
    budget: Nanos,
    reason: BoostReason,
    lent: Lent,
}

impl LinuxBackend {
    /// Settles the ledger at `now`, as the slot scheduler does: between live VMs only
    /// relative debt counts; a live VM repays at the rate of time while no other live VM has
    /// a vCPU kept waiting by the host.
    fn settle(s: &mut State, now: Nanos) {
        let elapsed = now.saturating_sub(s.settled);
        s.settled = now;
        let live_vm = |s: &State, vm: usize| {
            let m = &s.vms[vm];
            s.vcpus[m.first..m.first + m.len].iter().any(|c| !c.gone)
        };
        let waits = |s: &State, vm: usize| {
            let m = &s.vms[vm];
            s.vcpus[m.first..m.first + m.len]
                .iter()
                .any(|c| c.preempted && !c.gone && !c.idle)
        };
        let live: Vec<usize> = (0..s.vms.len()).filter(|&vm| live_vm(s, vm)).collect();
        if live.len() > 1 {
            s.ledger.forgive_common(live.iter().copied());
        }
        for &vm in &live {
            if !live.iter().any(|&o| o != vm && waits(s, o)) {
                s.ledger.repaid(vm, elapsed);
            }
        }
    }

    /// Which of VM-local vCPUs `boosts` of `vm` the ledger allows (lent by `lent`); returns
    /// what to raise. The raise itself happens in `raise`, with the state unlocked: a raised
    /// thread may preempt the caller at once.
    pub(super) fn grant(
        &self,
        s: &mut State,
        vm: usize,
        boosts: &[Boost],
        lent: Lent,
        now: Nanos,
    ) -> Vec<Grant> {
        Self::settle(s, now);
        let mut out = Vec::new();
        for b in boosts {
            let Some(key) =
                (b.vcpu < s.vms[vm].len as u32).then(|| s.vms[vm].first + b.vcpu as usize)
            else {
                continue;
            };
            let (tid, gone) = (s.vcpus[key].tid, s.vcpus[key].gone);
            // Lent already: it runs on an earlier boost.
            if tid == 0 || gone || s.vcpus[key].lent.is_some() {
                continue;
            }
            let Some(budget) = s.ledger.grant(vm) else {
                s.vcpus[key].metrics.boosts_refused += 1;
                continue;
            };
            // The record names the lender before the thread is raised: raised, it may run
            // and stop holding the lender up at once, and must know to give the CPU back.
            s.vcpus[key].lent = Some(lent);
            s.vms[vm].publish_lent(b.vcpu as usize, Some(lent));
            out.push(Grant {
                vm,
                key,
                tid,
                budget,
                reason: b.reason,
                lent,
            });
        }
        out
    }

    /// Raises the threads `grants` names through the host scheduler, then books them: the
    /// debt of the boosts made, the refusals, and the lender in the boosted vCPU's record.
    pub(super) fn raise(&self, grants: Vec<Grant>) {
        if grants.is_empty() {
            return;
        }
        // The caller lends its own CPU (this thread is the spinner's, or the vCPU's that
        // told of a grace period's holdouts, which waits for them), as a directed yield
        // would: the boosted thread preempts it rather than whatever runs elsewhere.
        // SAFETY: sched_getcpu has no preconditions.
        let here = usize::try_from(unsafe { libc::sched_getcpu() }).ok();
        let outcomes: Vec<Outcome> = grants
            .iter()
            .map(|g| {
                self.booster
                    .boost(g.tid, Duration::from_nanos(g.budget), here)
            })
            .collect();
        let mut s = self.lock();
        for (g, o) in grants.iter().zip(outcomes) {
            if o != Outcome::Boosted && s.vcpus[g.key].lent == Some(g.lent) {
                // Nothing lent after all.
                s.vcpus[g.key].lent = None;
                let index = g.key - s.vms[g.vm].first;
                s.vms[g.vm].publish_lent(index, None);
            }
            match o {
                Outcome::Boosted => {
                    // Booked only now: a grant that made no boost costs nothing.
                    s.ledger.borrowed(g.vm, g.budget);
                    let debt = s.ledger.debt(g.vm);
                    let m = &mut s.vms[g.vm].metrics;
                    m.max_debt_ns = m.max_debt_ns.max(debt);
                    s.vcpus[g.key].metrics.count_boost(g.reason);
                }
                // Running on an earlier boost: nothing new was lent.
                Outcome::AlreadyBoosted => {}
                Outcome::CoolingDown | Outcome::Busy | Outcome::AlreadyRealTime => {
                    s.vcpus[g.key].metrics.boosts_refused += 1;
                }
                Outcome::NotPermitted => {
                    s.vcpus[g.key].metrics.boosts_refused += 1;
                    if !std::mem::replace(&mut s.warned_privilege, true) {
                        eprintln!(
                            "pvsync: warning: the Linux backend cannot raise vCPU threads (no \
                             CAP_SYS_NICE, or no real-time budget: RLIMIT_RTPRIO below 2 or \
                             sched_rt_runtime_us 0): boosts fall back to the spinner's \
                             sched_yield; placement still applies"
                        );
                    }
                }
                Outcome::Failed(_) => s.vcpus[g.key].metrics.boosts_refused += 1,
            }
        }
    }

    /// vCPU `v` (VM-local `me`) names `named`: if that gives back a CPU lent to it (the
    /// lender, or itself for a grace period's boost), its boost ends now and the unused
    /// budget is repaid. True if it gave back.
    pub(super) fn gives_back(
        &self,
        s: &mut State,
        v: usize,
        me: u32,
        named: Option<u32>,
        now: Nanos,
    ) -> bool {
        let c = &mut s.vcpus[v];
        let back = match c.lent {
            Some(Lent::By(l)) => named == Some(l),
            Some(Lent::GracePeriod) => named == Some(me),
            None => false,
        };
        if !back {
            return false;
        }
        c.lent = None;
        let vm = c.vm;
        let left = self.booster.restore(c.tid);
        if left.is_some() {
            c.metrics.turns_given_back += 1;
        }
        s.vms[vm].publish_lent(me as usize, None);
        if let Some(left) = left {
            Self::settle(s, now);
            s.ledger.repaid(vm, left.as_nanos() as Nanos);
        }
        true
    }
}
