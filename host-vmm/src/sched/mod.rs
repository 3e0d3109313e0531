//! Backends: how a vCPU gets CPU time. The vCPU loop talks to a [`Backend`]; policies (in
//! `policy`) decide whom to boost and never learn which backend runs.
//!
//! - [`SlotBackend`]: the VMM's own scheduler. `--slots N` host CPU slots; a vCPU thread
//!   enters KVM_RUN only while it holds one; a slice ends with a kick (signal +
//!   `immediate_exit`); per-slot run queues, placement (`wake-affine` or `spread`), boosts
//!   from the policies, charged to the VM's ledger (`ledger`).
//! - [`LinuxBackend`]: the host Linux scheduler runs every vCPU thread; only the hypercalls
//!   go through the backend (idle waits ended by IPIs, and counters); no boosts.

pub mod affinity;
mod core;
pub mod fair_share;
mod ledger;
mod linux;
pub mod lock_audit;
pub mod metrics;
pub mod placement;
pub mod rtboost;
mod slots;
pub mod trace;

use std::sync::Weak;
use std::time::Duration;

pub use self::core::{Core, CoreConfig, Effects, RunState};
pub use ledger::{BoostLedger, LedgerLimits, LINUX_LEDGER, SLOT_LEDGER};
pub use linux::LinuxBackend;
pub use metrics::{VcpuMetrics, VmMetrics};
pub use placement::Placement;
pub use slots::SlotBackend;

use crate::policy::{BoostPolicy, Cpl};
use crate::shared_region::Snapshot;

pub use crate::policy::Nanos;

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("starting the slot scheduler: {0}")]
    Start(std::io::Error),
    #[error("the slot scheduler's ticker failed; every VM was stopped")]
    TickerFailed,
}

/// What a backend needs from a VM: its shared region, a place to publish host fields, and a
/// way to stop it.
pub trait GuestView: Send + Sync {
    /// None if the guest registered no region; Err if it could not be read.
    fn snapshot(&self) -> Option<Result<Snapshot, ()>>;
    /// Writes the host fields of vCPU `index`'s record.
    fn publish_host(&self, index: u32, preempted: bool, preempted_ns: u64, boosts: u64);
    /// Writes vCPU `index`'s `host_lent_by` (the lender's id + 1, or 0).
    fn publish_lent_by(&self, index: u32, value: u32);
    /// The backend can no longer run the VM: it must stop (`reason` says why).
    fn backend_failed(&self, reason: &str);
}

/// How a backend forces a vCPU thread out of KVM_RUN (the vCPU module's kick signal). Safe
/// at any time from any thread; once the vCPU thread has left its loop it does nothing.
pub trait Kick: Send + Sync {
    fn kick(&self);
}

/// A VM as a backend knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmHandle {
    pub vm: usize,
    /// Backend key of the VM's vCPU 0; vCPU i is `first + i`.
    pub first: usize,
}

/// How vCPUs get CPU time. Every method is called by vCPU threads (with their own key) or
/// the VM lifecycle; none may panic on bad keys.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Registers a VM of `vcpus` vCPUs run by `policy`.
    fn add_vm(
        &self,
        policy: Box<dyn BoostPolicy>,
        vcpus: usize,
        view: Weak<dyn GuestView>,
    ) -> VmHandle;
    /// vCPU `v`'s thread has started; `kick` forces it out of KVM_RUN from now on.
    fn start(&self, v: usize, kick: Box<dyn Kick>);
    /// Blocks until `v` may enter KVM_RUN (or its VM ended).
    fn wait_turn(&self, v: usize);
    /// After a KVM_RUN exit: whether `v` was asked to give up its CPU (then call
    /// `preempted` and `wait_turn`).
    fn take_kick(&self, v: usize) -> bool;
    /// `v` left KVM_RUN on a kick; `cpl` is its privilege level at that point.
    fn preempted(&self, v: usize, cpl: Cpl);
    /// `v` spins waiting for VM-local vCPU `named` (a YieldTo hypercall); returns when `v`
    /// may run again.
    fn spin_yield(&self, v: usize, named: Option<u32>, shared: Option<&Snapshot>);
    /// `v` idles (the Idle hypercall) for at most `timeout` (None: until an IPI wakes it or
    /// its VM ends); returns when it may run again.
    fn idle(&self, v: usize, timeout: Option<Duration>);
    /// `v` sent an interrupt (already injected) to VM-local vCPU `to`.
    fn ipi(&self, v: usize, to: u32);
    /// `v` says (RcuWait) that the grace period `seq` now waits on the holdouts named in
    /// the shared header; `shared` is a snapshot taken after the hypercall.
    fn rcu_wait(&self, v: usize, seq: u32, shared: Option<&Snapshot>);
    /// `v` made a hypercall with bad arguments.
    fn bad_hypercall(&self, v: usize);
    /// The host scheduler kept `v`'s thread runnable but off a CPU for most of the last
    /// look (`preempted`), as the VM's monitor reads it; a backend that schedules vCPUs
    /// itself knows better and ignores it.
    fn observe(&self, _v: usize, _preempted: bool) {}
    /// The VM's monitor looked at all of VM `vm`'s vCPU threads, `interval_ns` after its
    /// previous look: `stacked` if two runnable siblings were on one host CPU (from
    /// `/proc`, where the host really ran them). A backend that places vCPUs itself
    /// samples its own stacking and ignores it.
    fn sampled(&self, _vm: usize, _stacked: bool, _interval_ns: u64) {}
    /// `v`'s thread leaves for good.
    fn exit(&self, v: usize);
    /// The VM ended: its vCPUs leave, threads waiting in the backend return.
    fn end_vm(&self, vm: usize);
    /// VM `vm`'s run time and runnable time (running, or waiting for a CPU) so far, summed
    /// over its vCPUs, ns, where the backend schedules vCPUs itself; None where the host
    /// scheduler does (the monitor then reads both from `/proc`).
    fn progress(&self, _vm: usize) -> Option<(u64, u64)> {
        None
    }
    /// Counters of VM `vm` so far.
    fn report(&self, vm: usize) -> Option<(VmMetrics, Vec<VcpuMetrics>)>;
    /// Whether the backend writes the host fields of the shared records itself.
    fn publishes_host_fields(&self) -> bool;
    /// Whether the backend takes runnable vCPUs off their CPU itself (a kick, or a
    /// YieldTo that queues the yielder): then each vCPU thread marks its steal-time area
    /// preempted as it gives up its CPU (`vcpu::steal_time`), which KVM does not here.
    fn takes_vcpus_off(&self) -> bool {
        false
    }
}
