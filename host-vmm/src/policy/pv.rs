//! The paravirtual policy: decisions from what the guest published in the shared region.
//!
//! On a spin: the vCPU the spinner named (YieldTo), else the holder its record names, else a
//! preempted vCPU that owes it an IPI acknowledgement (whatever mode that vCPU is in), else
//! KVM's rule with the upstream fix. On a tick: preempted RCU readers when a grace period has
//! stayed in progress past `rcu_overdue` on the host's clock or the callback backlog exceeds
//! `backlog`; preempted lock holders and vCPUs owing an IPI acknowledgement whose waiter
//! cannot yield to them itself (it halted). Records that failed validation are ignored,
//! never acted on.

use super::{Boost, BoostPolicy, BoostReason, Input, KvmPolicy, Nanos};
use crate::shared_region::{RecordView, Snapshot};
use shared_abi::NO_VCPU;

/// When RCU state makes readers worth boosting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvThresholds {
    /// A grace period in progress for longer than this (host time) is overdue.
    pub rcu_overdue: Nanos,
    /// More queued callbacks than this is a backlog.
    pub backlog: u64,
}

impl Default for PvThresholds {
    fn default() -> Self {
        PvThresholds {
            rcu_overdue: 4_000_000,
            backlog: 1000,
        }
    }
}

#[derive(Debug)]
pub struct PvPolicy {
    thresholds: PvThresholds,
    /// The in-progress grace-period sequence last seen, and since when (host time).
    gp_watch: Option<(u64, Nanos)>,
    fallback: KvmPolicy,
}

impl PvPolicy {
    pub fn new(thresholds: PvThresholds) -> Self {
        PvPolicy {
            thresholds,
            gp_watch: None,
            fallback: KvmPolicy::new(true),
        }
    }

    /// Whether readers should be boosted now; updates the grace-period watch.
    fn rcu_pressure(&mut self, now: Nanos, snap: &Snapshot) -> bool {
        let seq = snap.header.rcu_gp_seq;
        let in_progress = seq % 2 == 1;
        let overdue = if in_progress {
            match self.gp_watch {
                Some((s, since)) if s == seq => {
                    now.saturating_sub(since) > self.thresholds.rcu_overdue
                }
                _ => {
                    self.gp_watch = Some((seq, now));
                    false
                }
            }
        } else {
            self.gp_watch = None;
            false
        };
        overdue || snap.header.rcu_callbacks_pending > self.thresholds.backlog
    }
}

/// A record the policy may act on: validated, and of a vCPU the VM has.
fn trusted(snap: &Snapshot, vcpu: u32, nr: usize) -> Option<&RecordView> {
    let r = snap.records.get(vcpu as usize)?;
    (r.problems.is_empty() && (vcpu as usize) < nr).then_some(r)
}

impl BoostPolicy for PvPolicy {
    fn name(&self) -> &str {
        "pv"
    }

    fn on_spin(&mut self, input: &Input, spinner: u32, named: Option<u32>) -> Option<Boost> {
        let n = input.vcpus.len();
        let preempted =
            |v: u32| v != spinner && input.vcpus.get(v as usize).is_some_and(|s| s.candidate());
        if let Some(v) = named.filter(|&v| preempted(v)) {
            return Some(Boost {
                vcpu: v,
                reason: BoostReason::NamedBySpinner,
            });
        }
        if let Some(rec) = input.shared.and_then(|s| trusted(s, spinner, n)) {
            let holder = rec.record.spin_holder;
            if rec.record.spin_lock != 0 && holder != NO_VCPU && preempted(holder) {
                return Some(Boost {
                    vcpu: holder,
                    reason: BoostReason::LockHolder,
                });
            }
            let owed = rec.record.ipi_wait;
            if let Some(v) = (0..n as u32).find(|&v| owed & (1u64 << v) != 0 && preempted(v)) {
                return Some(Boost {
                    vcpu: v,
                    reason: BoostReason::IpiAckOwed,
                });
            }
        }
        self.fallback.on_spin(input, spinner, named)
    }

    fn on_tick(&mut self, input: &Input) -> Vec<Boost> {
        let Some(snap) = input.shared else {
            return Vec::new();
        };
        let n = input.vcpus.len();
        let mut reasons: Vec<Option<BoostReason>> = vec![None; n];
        let mut want = |v: u32, why: BoostReason| {
            if let (Some(slot), Some(s)) =
                (reasons.get_mut(v as usize), input.vcpus.get(v as usize))
            {
                if s.candidate() && slot.is_none() {
                    *slot = Some(why);
                }
            }
        };
        // Waiters name whom they wait for: the most direct evidence first. A waiter that
        // spins names its target itself when it yields (`on_spin`), and boosting for it while
        // it is preempted only reorders turns at the price of a hand-off each; a waiter that
        // halted (an MCS waiter) never yields, so the periodic look speaks for it.
        let stuck = |w: u32| input.vcpus.get(w as usize).is_some_and(|s| s.blocked);
        for w in (0..n as u32)
            .filter(|&w| stuck(w))
            .filter_map(|v| trusted(snap, v, n))
        {
            if w.record.spin_lock != 0 && w.record.spin_holder != NO_VCPU {
                want(w.record.spin_holder, BoostReason::LockHolder);
            }
            for v in (0..n as u32).filter(|&v| w.record.ipi_wait & (1u64 << v) != 0) {
                want(v, BoostReason::IpiAckOwed);
            }
        }
        if self.rcu_pressure(input.now, snap) {
            // Only the vCPUs the grace period still waits on matter: a reader that began
            // after the grace period did, or a vCPU that already reported, holds nothing up.
            // A guest that publishes no holdouts gets its readers boosted.
            let holdouts = match snap.header.rcu_gp_holdouts {
                0 => u64::MAX,
                h => h,
            };
            for r in (0..n as u32).filter_map(|v| trusted(snap, v, n)) {
                if holdouts & (1u64 << r.vcpu) == 0 {
                    continue;
                }
                if r.record.rcu_nesting > 0 {
                    want(r.vcpu, BoostReason::RcuReader);
                } else if holdouts != u64::MAX {
                    want(r.vcpu, BoostReason::RcuHoldout);
                }
            }
        }
        reasons
            .iter()
            .enumerate()
            .filter_map(|(v, r)| {
                r.map(|reason| Boost {
                    vcpu: v as u32,
                    reason,
                })
            })
            .collect()
    }
}
