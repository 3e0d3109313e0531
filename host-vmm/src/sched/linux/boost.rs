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
    /// Booked in the ledger (another VM waited).
    charged: bool,
    reason: BoostReason,
    /// Which grant of the vCPU this is (`Vcpu::grants`).
    number: u64,
}

impl LinuxBackend {
    /// Whether VM `vm` has a vCPU that has not left.
    fn live_vm(s: &State, vm: usize) -> bool {
        let m = &s.vms[vm];
        s.vcpus[m.first..m.first + m.len].iter().any(|c| !c.gone)
    }

    /// Whether a VM other than `vm` has a vCPU that may want a CPU: started, not idle (in
    /// `Idle`) and not gone. A real-time boost may take the CPU from any such thread, and
    /// the monitor's view of who waits is a look old and thresholded, so this is what
    /// makes a boost charged.
    fn another_vm_active(s: &State, vm: usize) -> bool {
        (0..s.vms.len()).filter(|&o| o != vm).any(|o| {
            let m = &s.vms[o];
            s.vcpus[m.first..m.first + m.len]
                .iter()
                .any(|c| c.tid != 0 && !c.gone && !c.idle)
        })
    }

    /// Settles the ledger at `now`, as the slot scheduler does: between live VMs only
    /// relative debt counts, and a lone live VM repays at the rate of time. Beside another
    /// live VM there is no repayment with time: the host scheduler gives no turns back, and
    /// a debt repaid while the other VM merely idled would be run up again at its next
    /// burst (charges only arise while it is active: see `grant`).
    fn settle(s: &mut State, now: Nanos) {
        let elapsed = now.saturating_sub(s.settled);
        s.settled = now;
        let live: Vec<usize> = (0..s.vms.len())
            .filter(|&vm| Self::live_vm(s, vm))
            .collect();
        match live[..] {
            [vm] => s.ledger.repaid(vm, elapsed),
            [] => {}
            _ => s.ledger.forgive_common(live.iter().copied()),
        }
    }

    /// Which of VM-local vCPUs `boosts` (asked for by vCPU `caller`) the ledger allows (lent
    /// by `lent`); returns what to raise. The raise itself happens in `raise`, with the state
    /// unlocked: a raised thread may preempt the caller at once.
    pub(super) fn grant(
        &self,
        s: &mut State,
        caller: usize,
        boosts: &[Boost],
        lent: Lent,
        now: Nanos,
    ) -> Vec<Grant> {
        Self::settle(s, now);
        let vm = s.vcpus[caller].vm;
        let mut out = Vec::new();
        for b in boosts {
            let Some(key) =
                (b.vcpu < s.vms[vm].len as u32).then(|| s.vms[vm].first + b.vcpu as usize)
            else {
                continue;
            };
            self.drop_stale_lent(s, key);
            let (tid, gone) = (s.vcpus[key].tid, s.vcpus[key].gone);
            // Lent already: it runs on an earlier boost (or one is on its way).
            if tid == 0 || gone || s.vcpus[key].lent.is_some() {
                continue;
            }
            // A boost that cannot happen now (privilege, cool-down, the cap) is not
            // announced to the guest at all.
            if let Some(why) = self.booster.would_refuse(tid) {
                self.refused(s, key, why);
                continue;
            }
            // Charged only if it may take the CPU from another VM's vCPU: else it only
            // reorders this VM's own threads.
            let charged = Self::another_vm_active(s, vm);
            let budget = if charged {
                let Some(budget) = s.ledger.grant(vm) else {
                    s.vcpus[key].metrics.boosts_refused += 1;
                    continue;
                };
                // Booked now, so that grants made together cannot pass the cap; repaid in
                // `raise` if no boost is made.
                s.ledger.borrowed(vm, budget);
                budget
            } else {
                s.ledger.budget()
            };
            let debt = s.ledger.debt(vm);
            let m = &mut s.vms[vm].metrics;
            m.max_debt_ns = m.max_debt_ns.max(debt);
            // The record names the lender before the thread is raised: raised, it may run
            // and stop holding the lender up at once, and must know to give the CPU back.
            let c = &mut s.vcpus[key];
            c.grants += 1;
            c.lent = Some(lent);
            c.lent_grant = c.grants;
            c.pending = true;
            let number = c.grants;
            s.vms[vm].publish_lent(b.vcpu as usize, Some(lent));
            out.push(Grant {
                vm,
                key,
                tid,
                budget,
                charged,
                reason: b.reason,
                number,
            });
        }
        out
    }

    /// A boost of `key` refused for `why`: counted, and said once if for lack of privilege.
    fn refused(&self, s: &mut State, key: usize, why: Outcome) {
        if why == Outcome::AlreadyBoosted {
            return;
        }
        s.vcpus[key].metrics.boosts_refused += 1;
        if why == Outcome::NotPermitted && !std::mem::replace(&mut s.warned_privilege, true) {
            eprintln!(
                "pvsync: warning: the Linux backend cannot raise vCPU threads (no \
                 CAP_SYS_NICE, or no real-time budget: RLIMIT_RTPRIO below 2 or \
                 sched_rt_runtime_us 0): boosts fall back to the spinner's sched_yield; \
                 placement still applies"
            );
        }
    }

    /// Raises the threads `grants` names through the host scheduler, then books them: a
    /// grant that made no boost is repaid and its lender taken back from the record.
    pub(super) fn raise(&self, grants: Vec<Grant>) {
        if grants.is_empty() {
            return;
        }
        let outcomes: Vec<Outcome> = grants
            .iter()
            .map(|g| self.booster.boost(g.tid, Duration::from_nanos(g.budget)))
            .collect();
        let mut s = self.lock();
        for (g, o) in grants.iter().zip(outcomes) {
            let c = &mut s.vcpus[g.key];
            // Still this grant's: the vCPU did not give the CPU back (or leave) before the
            // raise landed.
            let current = c.lent_grant == g.number && c.lent.is_some() && !c.gone;
            if c.lent_grant == g.number {
                c.pending = false;
            }
            let made = o == Outcome::Boosted;
            if made && !current {
                // Given back (or left) already: the boost ends at once.
                if let Some(left) = self.booster.restore(g.tid).filter(|_| g.charged) {
                    s.ledger.repaid(g.vm, left.as_nanos() as Nanos);
                }
                s.vcpus[g.key].metrics.count_boost(g.reason);
                continue;
            }
            if made {
                // The live boost is this grant's: its leftover is repaid as it was booked.
                s.vcpus[g.key].live_charged = g.charged;
                s.vcpus[g.key].metrics.count_boost(g.reason);
                continue;
            }
            if g.charged {
                s.ledger.repaid(g.vm, g.budget);
            }
            if current {
                s.vcpus[g.key].lent = None;
                let index = g.key - s.vms[g.vm].first;
                s.vms[g.vm].publish_lent(index, None);
            }
            self.refused(&mut s, g.key, o);
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
        // A grant still on its way is ended by `raise` when it lands.
        let left = if c.pending {
            None
        } else {
            self.booster.restore(c.tid)
        };
        if left.is_some() || c.pending {
            c.metrics.turns_given_back += 1;
        }
        s.vms[vm].publish_lent(me as usize, None);
        if let Some(left) = left.filter(|_| s.vcpus[v].live_charged) {
            Self::settle(s, now);
            s.ledger.repaid(vm, left.as_nanos() as Nanos);
        }
        true
    }
}
