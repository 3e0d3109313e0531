//! The paravirtual policy: decisions from what the guest published in the shared region.
//!
//! On a spin: the vCPU the spinner named (YieldTo), else the holder its record names, else a
//! preempted vCPU that owes it an IPI acknowledgement (whatever mode that vCPU is in), else
//! KVM's rule with the upstream fix. On the guest's word (the RcuWait hypercall): the
//! preempted vCPUs the grace period in progress waits on, at once. On a tick: the same
//! holdouts when the grace period has lasted longer than a boost costs (a hint the guest
//! gave earlier may have met a full ledger), or when the callback backlog exceeds
//! `backlog`; preempted lock holders and vCPUs owing an IPI acknowledgement whose waiter
//! cannot yield to them itself (it halted).
//!
//! Every boost must pay: a vCPU is boosted only when the backend expects it to wait longer
//! than a boost costs on this host (`Costs`, measured by the backend). Records that failed
//! validation are ignored, never acted on.

use super::{Boost, BoostPolicy, BoostReason, Input, KvmPolicy, Nanos};
use crate::shared_region::{RecordView, Snapshot};
use shared_abi::{bitmap_iter, NO_VCPU};

/// What the guest's word alone cannot tell: when a callback backlog is worth boosting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvThresholds {
    /// More queued callbacks than this is a backlog.
    pub backlog: u64,
}

impl Default for PvThresholds {
    fn default() -> Self {
        PvThresholds { backlog: 1000 }
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

    /// Whether readers should be boosted at a periodic look; updates the grace-period watch.
    /// A grace period is overdue once it has lasted longer than a boost costs: from then on
    /// waiting for the holdouts' turns can only cost more than boosting them.
    fn rcu_pressure(&mut self, input: &Input, snap: &Snapshot) -> bool {
        let seq = snap.header.rcu_gp_seq;
        let in_progress = seq % 2 == 1;
        let overdue = if in_progress {
            match self.gp_watch {
                Some((s, since)) if s == seq => {
                    input.now.saturating_sub(since) > input.costs.boost_ns
                }
                _ => {
                    self.gp_watch = Some((seq, input.now));
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
    let r = snap.record(vcpu)?;
    (r.problems.is_empty() && (vcpu as usize) < nr).then_some(r)
}

impl BoostPolicy for PvPolicy {
    fn name(&self) -> &str {
        "pv"
    }

    fn on_spin(&mut self, input: &Input, spinner: u32, named: Option<u32>) -> Option<Boost> {
        let n = input.vcpus.len();
        let preempted = |v: u32| v != spinner && worth(input, v);
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
            if let Some(v) = rec.ipi_targets().find(|&v| preempted(v)) {
                return Some(Boost {
                    vcpu: v,
                    reason: BoostReason::IpiAckOwed,
                });
            }
        }
        self.fallback
            .on_spin(input, spinner, named)
            .filter(|b| worth(input, b.vcpu))
    }

    fn on_tick(&mut self, input: &Input) -> Vec<Boost> {
        let Some(snap) = input.shared else {
            return Vec::new();
        };
        let n = input.vcpus.len();
        let mut reasons: Vec<Option<BoostReason>> = vec![None; n];
        let mut want = |v: u32, why: BoostReason| {
            if let Some(slot) = reasons.get_mut(v as usize) {
                if worth(input, v) && slot.is_none() {
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
            for v in w.ipi_targets() {
                want(v, BoostReason::IpiAckOwed);
            }
        }
        if self.rcu_pressure(input, snap) {
            rcu_holdouts(snap, n, &mut want);
        }
        collect(&reasons)
    }

    fn on_rcu_wait(&mut self, input: &Input) -> Vec<Boost> {
        let Some(snap) = input.shared else {
            return Vec::new();
        };
        // Only while a grace period is in progress; from now on the periodic look measures
        // how long it has lasted.
        if snap.header.rcu_gp_seq % 2 == 0 {
            return Vec::new();
        }
        if self
            .gp_watch
            .is_none_or(|(s, _)| s != snap.header.rcu_gp_seq)
        {
            self.gp_watch = Some((snap.header.rcu_gp_seq, input.now));
        }
        let n = input.vcpus.len();
        let mut reasons: Vec<Option<BoostReason>> = vec![None; n];
        let mut want = |v: u32, why: BoostReason| {
            if let Some(slot) = reasons.get_mut(v as usize) {
                if worth(input, v) && slot.is_none() {
                    *slot = Some(why);
                }
            }
        };
        rcu_holdouts(snap, n, &mut want);
        collect(&reasons)
    }
}

/// Whether vCPU `v` may be boosted and a boost pays: preempted, runnable, and expected to
/// wait longer than a boost costs.
fn worth(input: &Input, v: u32) -> bool {
    input
        .vcpus
        .get(v as usize)
        .is_some_and(|s| s.candidate() && input.costs.worth_boosting(s.expected_wait))
}

/// Names the vCPUs the grace period in progress waits on: readers first (their reason says
/// so), then holdouts outside any reader (the grace-period kthread's own vCPU among them).
/// A reader that began after the grace period did, or a vCPU that already reported, holds
/// nothing up. A guest that publishes no holdouts gets its readers boosted.
/// Walks the published holdouts only (one bit scan each), or every vCPU when none are
/// published.
fn rcu_holdouts(snap: &Snapshot, n: usize, want: &mut impl FnMut(u32, BoostReason)) {
    let published = snap.has_holdouts();
    let mut consider = |v: u32| {
        let Some(r) = trusted(snap, v, n) else {
            return;
        };
        if r.record.rcu_nesting > 0 {
            want(v, BoostReason::RcuReader);
        } else if published {
            want(v, BoostReason::RcuHoldout);
        }
    };
    if published {
        bitmap_iter(&snap.holdouts).for_each(&mut consider);
    } else {
        (0..n as u32).for_each(consider);
    }
}

fn collect(reasons: &[Option<BoostReason>]) -> Vec<Boost> {
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
