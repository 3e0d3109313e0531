//! The Linux backend: the host scheduler runs every vCPU thread as it likes. What KVM cannot
//! do inside KVM_RUN goes through here: the Idle hypercall (a timed wait ended by an IPI),
//! the counters, placement and the boosts.
//!
//! - **Boosts** (`boost.rs`). A spinner's YieldTo and a grace period's RcuWait ask the VM's
//!   policy whom to boost, as under the slot backend, and the ledger charges it the same
//!   way. The boost is the host scheduler's own: the chosen vCPU's thread runs `SCHED_FIFO`
//!   for the ledger's budget (`rtboost`: restored by a timer even if the thread never
//!   exits), and the spinner yields its CPU. The boosted vCPU's record says who lent it the
//!   CPU, and it gives it back (YieldTo naming the lender) once it no longer holds the
//!   lender up.
//! - **Preempted or not** comes from the host: the VM's monitor reads each thread's state
//!   and run-queue wait from `/proc` (`observe`), as KVM's `preempted` flag would say.
//! - **Placement** (`place.rs`). `spread` pins each vCPU thread to a host CPU so that two of
//!   one VM share none while another is free, re-evaluated as vCPU threads start and leave;
//!   `wake-affine` leaves the host's placement alone. Stacking is sampled from the CPUs the
//!   host really ran the threads on (`sampled`).

mod boost;
mod place;

use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::ledger::{BoostLedger, LINUX_LEDGER};
use super::lock_audit::Audited;
use super::metrics::{HostPriority, VcpuMetrics, VmMetrics};
use super::placement::Placement;
use super::rtboost::RtBooster;
use super::{Backend, GuestView, Kick, Nanos, VmHandle};
use crate::policy::{BoostPolicy, Costs, Cpl, Input, VcpuState};
use crate::shared_region::Snapshot;

/// How often an idle vCPU without a deadline looks whether its VM has ended (a safety net:
/// `end_vm` notifies it).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// What the policies are told: a boost costs a priority change and a wake-up (about 50 us
/// here), and a preempted vCPU waits about a tick.
const COSTS: Costs = Costs {
    boost_ns: 50_000,
    slice_ns: 4_000_000,
};

/// Who lent a boosted vCPU the CPU, as its record says (`host_lent_by`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lent {
    /// A spinner (VM-local id) named it: it gives back with `YieldTo(lender)`.
    By(u32),
    /// A grace period waits on it: it gives back with `YieldTo(itself)`.
    GracePeriod,
}

impl Lent {
    /// The record's value.
    fn value(self) -> u32 {
        match self {
            Lent::By(l) => l + 1,
            Lent::GracePeriod => shared_abi::NO_VCPU,
        }
    }
}

#[derive(Default)]
struct Vcpu {
    vm: usize,
    /// Its host thread (0 until it starts), and when it started here (placed).
    tid: libc::pid_t,
    started: Option<Instant>,
    /// An IPI arrived: the next (or current) idle ends.
    wake_token: bool,
    idle: bool,
    gone: bool,
    /// The host kept its thread runnable but off a CPU for most of the last look.
    preempted: bool,
    /// The host CPU `spread` pinned it to (an index into the host CPU list).
    pinned: Option<usize>,
    /// Published in its record while a boost lasts (from its grant on).
    lent: Option<Lent>,
    /// Grants made to it so far: the one `lent` belongs to is `lent_grant`.
    grants: u64,
    lent_grant: u64,
    /// A grant of it is between the ledger and the raise.
    pending: bool,
    /// The live boost (the grant whose raise landed while current) is charged to its VM:
    /// the budget it leaves is repaid only then.
    live_charged: bool,
    metrics: VcpuMetrics,
}

struct Vm {
    first: usize,
    len: usize,
    policy: Box<dyn BoostPolicy>,
    guest: Weak<dyn GuestView>,
    metrics: VmMetrics,
}

impl Vm {
    /// Writes vCPU `index`'s `host_lent_by`, if the VM is still there.
    fn publish_lent(&self, index: usize, lent: Option<Lent>) {
        if let Some(g) = self.guest.upgrade() {
            g.publish_lent_by(index as u32, lent.map_or(0, Lent::value));
        }
    }
}

struct State {
    vcpus: Vec<Vcpu>,
    vms: Vec<Vm>,
    ledger: BoostLedger,
    /// When the ledger last settled (repaid with time, forgave the common debt).
    settled: Nanos,
    /// Said once: boosts need a privilege this process lacks; a pin failed.
    warned_privilege: bool,
    warned_pin: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            vcpus: Vec::new(),
            vms: Vec::new(),
            ledger: BoostLedger::new(0, LINUX_LEDGER.budget, LINUX_LEDGER.max_debt),
            settled: 0,
            warned_privilege: false,
            warned_pin: false,
        }
    }
}

pub struct LinuxBackend {
    state: Mutex<State>,
    /// One for all: idle waits are slow paths.
    wake: Condvar,
    booster: RtBooster,
    epoch: Instant,
    placement: Placement,
    /// The host CPUs this process may run on (`spread` pins within them).
    host_cpus: Vec<usize>,
}

impl LinuxBackend {
    pub fn new(placement: Placement) -> Self {
        let host_cpus = super::affinity::allowed_cpus().unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..n).collect()
        });
        LinuxBackend {
            state: Mutex::default(),
            wake: Condvar::new(),
            // Boosted threads never hold every CPU: the timer, the monitors and the host
            // keep one (on a one-CPU host nothing is boosted).
            booster: RtBooster::new(host_cpus.len().saturating_sub(1)),
            epoch: Instant::now(),
            placement,
            host_cpus,
        }
    }

    fn lock(&self) -> Audited<MutexGuard<'_, State>> {
        Audited::new(self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// What the policy of VM `vm` is told about its vCPUs.
    fn states(s: &State, vm: usize) -> Vec<VcpuState> {
        let m = &s.vms[vm];
        s.vcpus[m.first..m.first + m.len]
            .iter()
            .enumerate()
            .map(|(i, c)| VcpuState {
                id: i as u32,
                preempted: c.preempted && !c.idle && !c.gone,
                blocked: c.idle || c.gone,
                // Another thread cannot read a vCPU's CPL while it is in KVM_RUN; KVM's own
                // directed yield can. KVM's policies therefore see no candidate here.
                cpl: Cpl::Unknown,
                interrupt_pending: c.wake_token,
                in_spin_loop: false,
                expected_wait: if c.preempted { COSTS.slice_ns } else { 0 },
            })
            .collect()
    }

    /// VM `vm`'s first vCPU key and count, if there is such a VM.
    fn span(s: &State, vm: usize) -> Option<(usize, usize)> {
        s.vms.get(vm).map(|m| (m.first, m.len))
    }

    /// VM-local vCPU `v` leaves: its boost ends (the budget left is repaid), it is never
    /// raised again, its record names no lender, and whether the host still runs it
    /// real-time is read back.
    fn leave(&self, s: &mut State, v: usize) {
        let c = &mut s.vcpus[v];
        if c.gone {
            return;
        }
        c.gone = true;
        let (vm, tid) = (c.vm, c.tid);
        if c.lent.take().is_some() {
            let index = v - s.vms[vm].first;
            s.vms[vm].publish_lent(index, None);
        }
        if tid == 0 {
            return;
        }
        if let Some(left) = self.booster.retire(tid) {
            if s.vcpus[v].live_charged {
                s.ledger.repaid(vm, left.as_nanos() as Nanos);
            }
        }
        s.vcpus[v].metrics.host_priority.raised_at_exit = place::real_time(tid);
    }

    /// `v`'s record names a lender but no boost is live or on its way (the timer ended it):
    /// it names none any more.
    fn drop_stale_lent(&self, s: &mut State, v: usize) {
        let c = &s.vcpus[v];
        if c.lent.is_none() || c.pending || c.tid == 0 || self.booster.is_boosted(c.tid) {
            return;
        }
        let vm = c.vm;
        s.vcpus[v].lent = None;
        let index = v - s.vms[vm].first;
        s.vms[vm].publish_lent(index, None);
    }
}

impl Backend for LinuxBackend {
    fn name(&self) -> &'static str {
        "linux"
    }

    fn add_vm(
        &self,
        policy: Box<dyn BoostPolicy>,
        vcpus: usize,
        guest: Weak<dyn GuestView>,
    ) -> VmHandle {
        let mut s = self.lock();
        let vm = s.vms.len();
        let first = s.vcpus.len();
        s.vms.push(Vm {
            first,
            len: vcpus,
            policy,
            guest,
            metrics: VmMetrics::default(),
        });
        s.ledger.add_vm();
        s.vcpus.extend((0..vcpus).map(|_| Vcpu {
            vm,
            ..Default::default()
        }));
        VmHandle { vm, first }
    }

    fn start(&self, v: usize, _: Box<dyn Kick>) {
        let mut s = self.lock();
        if let Some(c) = s.vcpus.get_mut(v) {
            // SAFETY: gettid has no preconditions; this runs on vCPU v's own thread.
            c.tid = unsafe { libc::gettid() };
            c.started = Some(Instant::now());
            self.booster.register(c.tid);
            self.repin(&mut s);
        }
    }

    fn wait_turn(&self, _: usize) {}

    fn take_kick(&self, _: usize) -> bool {
        false
    }

    fn preempted(&self, _: usize, _: Cpl) {}

    fn spin_yield(&self, v: usize, named: Option<u32>, shared: Option<&Snapshot>) {
        let now = self.now();
        let grants = {
            let mut s = self.lock();
            let Some(c) = s.vcpus.get_mut(v) else {
                return;
            };
            c.metrics.yields += 1;
            let vm = c.vm;
            let Some((first, len)) = Self::span(&s, vm) else {
                return;
            };
            let me = (v - first) as u32;
            if let Some(n) = named.filter(|&n| (n as usize) < len) {
                s.vcpus[first + n as usize].metrics.named_by_yields += 1;
            }
            if self.gives_back(&mut s, v, me, named, now) {
                drop(s);
                // The lender (or whoever the host picks) runs now.
                std::thread::yield_now();
                return;
            }
            if named == Some(me) {
                // Naming itself with nothing lent (a stale field): nobody to run instead.
                return;
            }
            let states = Self::states(&s, vm);
            let input = Input {
                now,
                vcpus: &states,
                shared,
                costs: COSTS,
            };
            match s.vms[vm].policy.on_spin(&input, me, named) {
                Some(b) => self.grant(&mut s, v, &[b], Lent::By(me), now),
                None => Vec::new(),
            }
        };
        self.raise(grants);
        // The boosted thread runs at a real-time priority now; the spinner offers its CPU.
        std::thread::yield_now();
    }

    fn idle(&self, v: usize, timeout: Option<Duration>) {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.lock();
        let Some(c) = s.vcpus.get_mut(v) else {
            return;
        };
        if std::mem::take(&mut c.wake_token) {
            return;
        }
        c.metrics.halts += 1;
        c.idle = true;
        let started = Instant::now();
        loop {
            let c = &mut s.vcpus[v];
            if c.gone || std::mem::take(&mut c.wake_token) {
                break;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break;
            }
            // Without a deadline the wait still wakes now and then to look at `gone`.
            let wait = deadline.map_or(IDLE_RECHECK, |d| (d - now).min(IDLE_RECHECK));
            s = Audited::new(
                self.wake
                    .wait_timeout(s.into_inner(), wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0,
            );
        }
        let c = &mut s.vcpus[v];
        c.idle = false;
        c.metrics.idle_ns += started.elapsed().as_nanos() as u64;
    }

    fn ipi(&self, v: usize, to: u32) {
        let mut s = self.lock();
        let Some(c) = s.vcpus.get_mut(v) else {
            return;
        };
        c.metrics.ipis_sent += 1;
        let vm = c.vm;
        let Some((first, len)) = Self::span(&s, vm) else {
            return;
        };
        if (to as usize) < len {
            let t = &mut s.vcpus[first + to as usize];
            t.metrics.ipis_received += 1;
            t.wake_token = true;
            if t.idle {
                self.wake.notify_all();
            }
        }
    }

    /// The policy may boost the preempted holdouts of the grace period in progress.
    fn rcu_wait(&self, v: usize, seq: u32, shared: Option<&Snapshot>) {
        let now = self.now();
        let mut s = self.lock();
        let Some(c) = s.vcpus.get_mut(v) else {
            return;
        };
        c.metrics.rcu_waits += 1;
        let vm = c.vm;
        // A hint about a grace period that is no longer the one in progress is stale.
        let Some(snap) = shared.filter(|s| s.header.rcu_gp_seq as u32 == seq && seq % 2 == 1)
        else {
            return;
        };
        let states = Self::states(&s, vm);
        let input = Input {
            now,
            vcpus: &states,
            shared: Some(snap),
            costs: COSTS,
        };
        let boosts = s.vms[vm].policy.on_rcu_wait(&input);
        let grants = self.grant(&mut s, v, &boosts, Lent::GracePeriod, now);
        drop(s);
        self.raise(grants);
    }

    fn observe(&self, v: usize, preempted: bool) {
        let tid = {
            let mut s = self.lock();
            let Some(c) = s.vcpus.get_mut(v) else {
                return;
            };
            c.preempted = preempted;
            c.tid
        };
        // Whether the host runs the thread real-time now, and whether a boost says so.
        let Some(a) = (tid != 0).then(|| self.booster.audit(tid)).flatten() else {
            return;
        };
        let mut s = self.lock();
        let Some(c) = s.vcpus.get_mut(v) else {
            return;
        };
        let p = &mut c.metrics.host_priority;
        match (a.real_time, a.boosted) {
            (true, true) => p.samples_raised += 1,
            (true, false) => p.samples_unaccounted += 1,
            _ => {}
        }
        // A boost the timer ended: the record no longer names a lender.
        self.drop_stale_lent(&mut s, v);
    }

    fn sampled(&self, vm: usize, stacked: bool, interval_ns: u64) {
        let mut s = self.lock();
        let Some((first, len)) = Self::span(&s, vm) else {
            return;
        };
        // Sampled while the VM is live: every vCPU thread started here (before that it sets
        // itself up, unplaced) at least a whole look ago, so the look saw them placed, and
        // not all have left.
        let vcpus = &s.vcpus[first..first + len];
        let look = Duration::from_nanos(interval_ns);
        let placed = |c: &Vcpu| c.started.is_some_and(|t| t.elapsed() > look);
        if !vcpus.iter().all(placed) || vcpus.iter().all(|c| c.gone) {
            return;
        }
        let m = &mut s.vms[vm].metrics;
        m.samples += 1;
        m.sampled_ns += interval_ns;
        if stacked {
            m.stacked_ns += interval_ns;
        }
    }

    fn bad_hypercall(&self, v: usize) {
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            c.metrics.bad_hypercalls += 1;
        }
    }

    fn exit(&self, v: usize) {
        let mut s = self.lock();
        if v < s.vcpus.len() {
            self.leave(&mut s, v);
            self.repin(&mut s);
        }
        drop(s);
        self.wake.notify_all();
    }

    fn end_vm(&self, vm: usize) {
        let mut s = self.lock();
        if let Some((first, len)) = Self::span(&s, vm) {
            for v in first..first + len {
                self.leave(&mut s, v);
            }
            self.repin(&mut s);
        }
        drop(s);
        self.wake.notify_all();
    }

    fn report(&self, vm: usize) -> Option<(VmMetrics, Vec<VcpuMetrics>)> {
        let s = self.lock();
        let (first, len) = Self::span(&s, vm)?;
        let vcpus = s.vcpus[first..first + len]
            .iter()
            .map(|c| {
                let mut m = c.metrics.clone();
                let t = self.booster.thread_counts(c.tid);
                m.host_priority = HostPriority {
                    raised: t.raised,
                    expired: t.expired,
                    restored: t.restored,
                    restore_failures: t.restore_failures,
                    max_overrun_ns: t.max_overrun.as_nanos() as u64,
                    ..m.host_priority
                };
                m
            })
            .collect();
        Some((s.vms[vm].metrics.clone(), vcpus))
    }

    fn publishes_host_fields(&self) -> bool {
        false
    }
}
