//! Boost policies: pure functions from what the host knows (a validated shared-region
//! snapshot, the backend's view of each vCPU, a clock) to decisions ("run vCPU v next, for
//! this reason"). They never learn which backend runs the vCPUs (the VMM's slot scheduler or
//! the host Linux scheduler), and they never trust a guest-written field that failed
//! validation.
//!
//! ```
//! use host_vmm::policy::{by_name, Cpl, Input, VcpuState};
//! let mut kvm = by_name("kvm").unwrap();
//! // vCPU 1 was preempted in user mode with an IPI pending: KVM's rule skips it...
//! let vcpus = [
//!     VcpuState { id: 0, ..VcpuState::running() },
//!     VcpuState { id: 1, cpl: Cpl::User, interrupt_pending: true, ..VcpuState::preempted() },
//! ];
//! let input = Input { now: 0, vcpus: &vcpus, shared: None, costs: Default::default() };
//! assert_eq!(kvm.on_spin(&input, 0, None), None);
//! // ...and the upstream fix (kvm-ipi) boosts it.
//! let mut fixed = by_name("kvm-ipi").unwrap();
//! assert_eq!(fixed.on_spin(&input, 0, None).map(|b| b.vcpu), Some(1));
//! ```

mod kvm;
mod pv;
mod spec;

pub use kvm::KvmPolicy;
pub use pv::{PvPolicy, PvThresholds};
pub use spec::{PolicyKind, PolicySpec};

use crate::shared_region::Snapshot;

/// Host time in nanoseconds (the backend's clock; tests use a fake one).
pub type Nanos = u64;

/// Privilege level of a descheduled vCPU, as read from KVM (KVM_GET_SREGS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cpl {
    Kernel,
    User,
    Unknown,
}

/// What the backend knows about one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuState {
    pub id: u32,
    /// Runnable but not running: the backend took its CPU away.
    pub preempted: bool,
    /// Halted or otherwise not runnable: boosting it would achieve nothing.
    pub blocked: bool,
    /// Its CPL when it was descheduled.
    pub cpl: Cpl,
    /// An interrupt is pending or being delivered to it (e.g. an IPI the backend injected).
    pub interrupt_pending: bool,
    /// It is itself in a spin loop (a spin exit or yield hypercall in progress).
    pub in_spin_loop: bool,
    /// How long, as the backend sees it now, until it would run without a boost: 0 while it
    /// runs, `Nanos::MAX` when the backend cannot say (or it is blocked).
    pub expected_wait: Nanos,
}

impl VcpuState {
    /// Whether it runs now (neither preempted nor blocked).
    pub const fn runs(&self) -> bool {
        !self.preempted && !self.blocked
    }

    /// A running vCPU (not a candidate).
    pub const fn running() -> Self {
        VcpuState {
            id: 0,
            preempted: false,
            blocked: false,
            cpl: Cpl::Kernel,
            interrupt_pending: false,
            in_spin_loop: false,
            expected_wait: 0,
        }
    }

    /// A preempted vCPU in kernel mode, with no idea when it runs again.
    pub const fn preempted() -> Self {
        VcpuState {
            preempted: true,
            expected_wait: Nanos::MAX,
            ..Self::running()
        }
    }

    /// Whether giving it a CPU can help: preempted and runnable.
    pub fn candidate(&self) -> bool {
        self.preempted && !self.blocked
    }
}

/// What a boost costs on this host and how long a turn is, as the backend measures them.
/// Policies boost only where the wait a boost saves exceeds what the boost costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Costs {
    /// One boost: a slot hand-off plus the kick that ends the boosted turn (typical values
    /// measured on this host, ns). 0 before anything was measured.
    pub boost_ns: Nanos,
    /// The backend's time slice (0: none, the host scheduler decides).
    pub slice_ns: Nanos,
}

impl Costs {
    /// Whether running a vCPU now, rather than in `wait` from now, is worth a boost.
    pub fn worth_boosting(&self, wait: Nanos) -> bool {
        wait > self.boost_ns
    }
}

/// One look at a VM.
pub struct Input<'a> {
    pub now: Nanos,
    /// Indexed by vCPU id.
    pub vcpus: &'a [VcpuState],
    /// The shared region, if the guest registered one and the snapshot could be taken.
    pub shared: Option<&'a Snapshot>,
    /// What a boost costs here.
    pub costs: Costs,
}

/// Why a vCPU is boosted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BoostReason {
    /// KVM-style directed yield to a preempted kernel-mode vCPU.
    DirectedYield,
    /// KVM-style directed yield to a user-mode vCPU with an interrupt pending (the upstream fix).
    UserModeWithInterrupt,
    /// The vCPU a spinner named in its YieldTo hypercall.
    NamedBySpinner,
    /// The holder of a lock someone spins on.
    LockHolder,
    /// It owes an IPI acknowledgement to a waiting sender.
    IpiAckOwed,
    /// A preempted RCU reader while a grace period is overdue or callbacks pile up.
    RcuReader,
    /// A preempted vCPU an overdue grace period still waits on (outside any reader: it only
    /// has to run to report its quiescent state).
    RcuHoldout,
}

impl BoostReason {
    pub const ALL: [BoostReason; 7] = [
        BoostReason::DirectedYield,
        BoostReason::UserModeWithInterrupt,
        BoostReason::NamedBySpinner,
        BoostReason::LockHolder,
        BoostReason::IpiAckOwed,
        BoostReason::RcuReader,
        BoostReason::RcuHoldout,
    ];

    /// A grace period waits on the boosted vCPU.
    pub fn is_rcu(self) -> bool {
        matches!(self, BoostReason::RcuReader | BoostReason::RcuHoldout)
    }

    pub const fn name(self) -> &'static str {
        match self {
            BoostReason::DirectedYield => "directed-yield",
            BoostReason::UserModeWithInterrupt => "user-mode-with-interrupt",
            BoostReason::NamedBySpinner => "named-by-spinner",
            BoostReason::LockHolder => "lock-holder",
            BoostReason::IpiAckOwed => "ipi-ack-owed",
            BoostReason::RcuReader => "rcu-reader",
            BoostReason::RcuHoldout => "rcu-holdout",
        }
    }
}

/// "Run `vcpu` next (for a bounded budget), because `reason`."
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boost {
    pub vcpu: u32,
    pub reason: BoostReason,
}

/// A boost policy. Implementations are deterministic functions of their inputs and their own
/// small state (round-robin position, when a grace period was first seen in progress).
pub trait BoostPolicy: Send {
    fn name(&self) -> &str;
    /// `spinner` spins (a spin exit, or a YieldTo hypercall naming `named`): whom to run.
    fn on_spin(&mut self, input: &Input, spinner: u32, named: Option<u32>) -> Option<Boost>;
    /// A periodic look: vCPUs to boost now. Each vCPU appears at most once.
    fn on_tick(&mut self, input: &Input) -> Vec<Boost>;
    /// The guest says (RcuWait hypercall) that the grace period in progress now waits on the
    /// vCPUs its header names: vCPUs to boost at once. Each vCPU appears at most once.
    fn on_rcu_wait(&mut self, _input: &Input) -> Vec<Boost> {
        Vec::new()
    }
}

/// Round robin only: never boosts.
#[derive(Debug, Default)]
pub struct NoBoost;

impl BoostPolicy for NoBoost {
    fn name(&self) -> &str {
        "none"
    }
    fn on_spin(&mut self, _: &Input, _: u32, _: Option<u32>) -> Option<Boost> {
        None
    }
    fn on_tick(&mut self, _: &Input) -> Vec<Boost> {
        Vec::new()
    }
}

/// Several policies composed: on a spin the first that boosts wins; on a tick each vCPU is
/// boosted at most once, for the first policy's reason.
pub struct Chain {
    name: String,
    parts: Vec<Box<dyn BoostPolicy>>,
}

impl BoostPolicy for Chain {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_spin(&mut self, input: &Input, spinner: u32, named: Option<u32>) -> Option<Boost> {
        self.parts
            .iter_mut()
            .find_map(|p| p.on_spin(input, spinner, named))
    }

    fn on_tick(&mut self, input: &Input) -> Vec<Boost> {
        self.merged(|p| p.on_tick(input))
    }

    fn on_rcu_wait(&mut self, input: &Input) -> Vec<Boost> {
        self.merged(|p| p.on_rcu_wait(input))
    }
}

impl Chain {
    /// Each part's boosts, a vCPU at most once (for the first part that names it).
    fn merged(&mut self, mut f: impl FnMut(&mut dyn BoostPolicy) -> Vec<Boost>) -> Vec<Boost> {
        let mut out: Vec<Boost> = Vec::new();
        for p in &mut self.parts {
            for b in f(p.as_mut()) {
                if !out.iter().any(|o| o.vcpu == b.vcpu) {
                    out.push(b);
                }
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "unknown boost policy '{0}' (known: none, kvm, kvm-ipi, pv; or a comma-separated chain)"
    )]
    Unknown(String),
}

/// Names accepted by [`PolicySpec`] and [`by_name`], alone or chained with commas ("pv,kvm").
pub const POLICY_NAMES: [&str; 4] = [
    PolicyKind::ALL[0].name(),
    PolicyKind::ALL[1].name(),
    PolicyKind::ALL[2].name(),
    PolicyKind::ALL[3].name(),
];

/// The policy called `name`, or the chain "a,b,..." of such policies (a shorthand for
/// parsing a [`PolicySpec`] and building it, for tests and benchmarks).
pub fn by_name(name: &str) -> Result<Box<dyn BoostPolicy>, PolicyError> {
    Ok(name.parse::<PolicySpec>()?.build())
}

#[cfg(test)]
mod tests;
