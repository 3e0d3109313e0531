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
    /// YieldTo hypercalls it made whose named vCPU was running (it kept its slot).
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
    /// come at uneven intervals, so the fraction is weighted by time.
    pub samples: u64,
    pub sampled_ns: u64,
    pub stacked_ns: u64,
    /// Shared-region snapshots that could not be taken, plus records that failed validation
    /// (a bad field, not merely torn), summed over ticks.
    pub invalid_page_events: u64,
    /// Records read torn (seq odd or moving through every retry), summed over ticks.
    pub torn_records: u64,
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
