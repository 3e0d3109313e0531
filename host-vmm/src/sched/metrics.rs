//! What the scheduler counts, per vCPU and per VM.

use crate::policy::BoostReason;

/// Counters of one vCPU over a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuMetrics {
    /// Time holding a slot (inside or around KVM_RUN), ns.
    pub run_ns: u64,
    /// Time runnable but queued behind another vCPU, ns.
    pub wait_ns: u64,
    /// Time idle (the Idle hypercall), ns.
    pub idle_ns: u64,
    /// Slices ended by the scheduler (a kick), not by the vCPU.
    pub preemptions: u64,
    /// YieldTo hypercalls this vCPU made (it was spinning).
    pub yields: u64,
    /// YieldTo hypercalls it made whose named vCPU was running (it kept its slot, unless
    /// the policy boosted another vCPU in its way).
    pub yields_target_running: u64,
    /// YieldTo hypercalls naming this vCPU.
    pub named_by_yields: u64,
    /// Idle hypercalls that gave up the slot.
    pub halts: u64,
    /// SendIpi hypercalls this vCPU made, and interrupts sent to it.
    pub ipis_sent: u64,
    pub ipis_received: u64,
    /// Hypercalls refused (bad vCPU id, bad argument or width).
    pub bad_hypercalls: u64,
    /// Times its shared record failed validation (not merely torn) at a policy look.
    pub invalid_records: u64,
    /// Boosts this vCPU received, by reason (indexed like `BoostReason::ALL`).
    pub boosts: [u64; BoostReason::ALL.len()],
    /// Boosts this vCPU received while preempted in user mode (its CPL when descheduled).
    pub user_mode_boosts: u64,
    /// Boosts the policy chose that the ledger refused (the VM owed too much).
    pub boosts_refused: u64,
    /// Times the vCPU was handed a slot, and the total delay from the hand-off to its
    /// thread entering KVM_RUN, ns.
    pub dispatches: u64,
    pub handoff_ns: u64,
    /// Kicks honoured, and the total delay from the kick to the vCPU giving up its slot, ns.
    pub kicks: u64,
    pub kick_latency_ns: u64,
    /// The same delays one by one: a few take a host scheduler tick and dominate a mean.
    pub handoff_hist: LatencyHistogram,
    pub kick_hist: LatencyHistogram,
    /// RcuWait hypercalls this vCPU made (a grace period named its holdouts).
    pub rcu_waits: u64,
    /// Lent turns it gave back early (YieldTo naming its lender).
    pub turns_given_back: u64,
    /// Under the Linux backend: the real-time boosts of its thread, as the host shows them.
    pub host_priority: HostPriority,
}

/// The real-time boosts of a vCPU thread under the Linux backend, each read back from the
/// host kernel rather than taken from the VMM's intent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostPriority {
    /// Boosts made: the thread read back `SCHED_FIFO`.
    pub raised: u64,
    /// Boosts ended by the timer when the budget ran out (the thread had not exited).
    pub expired: u64,
    /// Restores after which the thread read back its own policy, and those after which it
    /// did not.
    pub restored: u64,
    pub restore_failures: u64,
    /// Monitor looks that found the thread real-time with a boost live, and real-time with
    /// none (a boost that outlived its bookkeeping: must stay 0).
    pub samples_raised: u64,
    pub samples_unaccounted: u64,
    /// The thread was still real-time when it left the VM.
    pub raised_at_exit: bool,
    /// The most one of its boosts ran past its budget before the timer ended it, ns.
    pub max_overrun_ns: u64,
}

impl VcpuMetrics {
    pub fn boosts_total(&self) -> u64 {
        self.boosts.iter().sum()
    }

    pub fn count_boost(&mut self, reason: BoostReason) {
        if let Some(i) = BoostReason::ALL.iter().position(|&r| r == reason) {
            self.boosts[i] += 1;
        }
    }
}

/// Counters of one VM over a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmMetrics {
    /// Scheduler ticks sampled while the VM was live, the time they cover, and the part of
    /// it in which at least two of its vCPUs sat on the same slot (running or queued): ticks
    /// come at uneven intervals, so the fraction is weighted by time. A spinner queued behind
    /// the vCPU it lent its turn to (a directed yield) does not count: it is there on purpose.
    pub samples: u64,
    pub sampled_ns: u64,
    pub stacked_ns: u64,
    /// Shared-region snapshots that could not be taken, plus records that failed validation
    /// (a bad field, not merely torn), summed over ticks.
    pub invalid_page_events: u64,
    /// Records read torn (seq odd or moving through every retry), summed over ticks.
    pub torn_records: u64,
    /// RcuWait words ignored: past the per-grace-period or per-period limit, or naming an
    /// earlier grace period.
    pub rcu_words_ignored: u64,
    /// Largest boost debt the VM reached, ns.
    pub max_debt_ns: u64,
}

impl VmMetrics {
    /// Share of sampled time at least two sibling vCPUs sat on one slot.
    pub fn stacking_fraction(&self) -> f64 {
        if self.sampled_ns == 0 {
            0.0
        } else {
            self.stacked_ns as f64 / self.sampled_ns as f64
        }
    }
}

/// Sub-buckets per power of two (2^3: a value is known to within 12.5 %).
const SUB_BITS: u32 = 3;
const SUBS: usize = 1 << SUB_BITS;
const BUCKETS: usize = SUBS + (64 - SUB_BITS as usize) * SUBS;

/// Latencies in log-linear buckets: fixed size, no allocation when recording, so it can sit
/// on the exit path; quantiles to within one bucket (12.5 %).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Box<[u32; BUCKETS]>,
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

impl LatencyHistogram {
    fn bucket(v: u64) -> usize {
        if v < SUBS as u64 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros();
        let sub = (v >> (e - SUB_BITS)) as usize & (SUBS - 1);
        SUBS + (e - SUB_BITS) as usize * SUBS + sub
    }

    /// The smallest value of bucket `i`.
    fn low(i: usize) -> u64 {
        if i < SUBS {
            return i as u64;
        }
        let e = (i - SUBS) / SUBS + SUB_BITS as usize;
        let sub = ((i - SUBS) % SUBS) as u64;
        (1u64 << e) | (sub << (e - SUB_BITS as usize))
    }

    pub fn record(&mut self, v: u64) {
        let c = &mut self.counts[Self::bucket(v)];
        *c = c.saturating_add(1);
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value below which a fraction `q` (0..=1) of the samples lie (the low edge of its
    /// bucket), or 0 without samples.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c as u64;
            if seen >= rank {
                return Self::low(i);
            }
        }
        Self::low(BUCKETS - 1)
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover_every_value() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let b = LatencyHistogram::bucket(v);
            assert!(b >= last && b < BUCKETS, "{v}");
            assert!(LatencyHistogram::low(b) <= v, "{v}");
            last = b;
        }
    }

    #[test]
    fn quantiles_within_a_bucket() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        h.record(10_000_000); // one host tick
        let med = h.quantile(0.5) as f64;
        assert!((med - 500_000.0).abs() / 500_000.0 < 0.13, "{med}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.13, "{p99}");
        assert_eq!(
            h.quantile(1.0),
            LatencyHistogram::low(LatencyHistogram::bucket(10_000_000))
        );
        let mut m = LatencyHistogram::default();
        m.merge(&h);
        assert_eq!(m, h);
    }
}
