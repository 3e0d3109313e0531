//! The Linux backend: the host scheduler runs every vCPU thread as it likes. What KVM cannot
//! do inside KVM_RUN goes through here: the Idle hypercall (a timed wait ended by an IPI),
//! the counters, placement and the boosts.
//!
//! - **Boosts.** A spinner's YieldTo and a grace period's RcuWait ask the VM's policy whom
//!   to boost, as under the slot backend, and the ledger charges it the same way. The boost
//!   is the host scheduler's own: the chosen vCPU's thread runs `SCHED_FIFO` for the
//!   ledger's budget (`rtboost`, restored by a timer even if the thread never exits), and
//!   the spinner yields its CPU.
//! - **Preempted or not** comes from the host: the VM's monitor reads each thread's state
//!   and run-queue wait from `/proc` (`observe`), as KVM's `preempted` flag would say.
//! - **Placement.** `spread` pins each vCPU thread to a host CPU so that two of one VM share
//!   none while another is free, re-evaluated as vCPU threads start and leave;
//!   `wake-affine` leaves the host's placement alone. Stacking is sampled from the CPUs the
//!   host really ran the threads on (`sampled`).

use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::ledger::BoostLedger;
use super::metrics::{VcpuMetrics, VmMetrics};
use super::metrics::HostPriority;
use super::placement::{spread_pins, Placement};
use super::rtboost::{Outcome, RtBooster};
use super::{Backend, GuestView, Kick, Nanos, VmHandle};
use crate::policy::{Boost, BoostPolicy, BoostReason, Costs, Cpl, Input, VcpuState};
use crate::shared_region::Snapshot;

/// Run time one boost lends (the ledger's budget), ns: about a host scheduler tick.
const BOOST_BUDGET: Nanos = 4_000_000;
/// Boost time a VM may owe at most before its boosts are refused.
const MAX_DEBT: Nanos = 40_000_000;
/// What the policies are told: a boost costs a priority change and a wake-up (about 50 us
/// here), and a preempted vCPU waits about a tick.
const COSTS: Costs = Costs {
    boost_ns: 50_000,
    slice_ns: 4_000_000,
};

#[derive(Default)]
struct Vcpu {
    vm: usize,
    /// Its host thread (0 until it starts).
    tid: libc::pid_t,
    /// An IPI arrived: the next (or current) idle ends.
    wake_token: bool,
    idle: bool,
    gone: bool,
    /// The host kept its thread runnable but off a CPU for most of the last look.
    preempted: bool,
    /// The host CPU `spread` pinned it to (an index into the host CPU list).
    pinned: Option<usize>,
    metrics: VcpuMetrics,
}

struct Vm {
    first: usize,
    len: usize,
    policy: Box<dyn BoostPolicy>,
    metrics: VmMetrics,
}

struct State {
    vcpus: Vec<Vcpu>,
    vms: Vec<Vm>,
    ledger: BoostLedger,
    /// When the ledger last settled (repaid with time, forgave the common debt).
    settled: Nanos,
    /// Said once: boosts need CAP_SYS_NICE.
    warned: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            vcpus: Vec::new(),
            vms: Vec::new(),
            ledger: BoostLedger::new(0, BOOST_BUDGET, MAX_DEBT),
            settled: 0,
            warned: false,
        }
    }
}

pub struct LinuxBackend {
    state: Mutex<State>,
    /// One for all: idle waits are slow paths.
    wake: Condvar,
    booster: RtBooster,
    epoch: std::sync::OnceLock<Instant>,
    placement: Placement,
    /// The host CPUs this process may run on (`spread` pins within them).
    host_cpus: Vec<usize>,
}

impl Default for LinuxBackend {
    fn default() -> Self {
        Self::new(Placement::WakeAffine)
    }
}

impl LinuxBackend {
    pub fn new(placement: Placement) -> Self {
        LinuxBackend {
            state: Mutex::default(),
            wake: Condvar::new(),
            booster: RtBooster::new(),
            epoch: std::sync::OnceLock::new(),
            placement,
            host_cpus: allowed_cpus(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Nanos {
        self.epoch.get_or_init(Instant::now).elapsed().as_nanos() as Nanos
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

    /// Settles the ledger at `now`, as the slot scheduler does: between VMs only relative
    /// debt counts; a VM alone repays at the rate of time.
    fn settle(s: &mut State, now: Nanos) {
        let elapsed = now.saturating_sub(s.settled);
        s.settled = now;
        if s.vms.len() > 1 {
            s.ledger.forgive_common(0..s.vms.len());
        } else {
            s.ledger.repaid(0, elapsed);
        }
    }

    /// Under `spread`, pins every live vCPU thread to the CPU `spread_pins` gives it now;
    /// only threads whose CPU changed move.
    fn repin(&self, s: &mut State) {
        if self.placement != Placement::Spread {
            return;
        }
        let live: Vec<Vec<bool>> = s
            .vms
            .iter()
            .map(|m| {
                s.vcpus[m.first..m.first + m.len]
                    .iter()
                    .map(|c| c.tid != 0 && !c.gone)
                    .collect()
            })
            .collect();
        let current: Vec<Vec<Option<usize>>> = s
            .vms
            .iter()
            .map(|m| {
                s.vcpus[m.first..m.first + m.len]
                    .iter()
                    .map(|c| c.pinned)
                    .collect()
            })
            .collect();
        let pins = spread_pins(&live, &current, self.host_cpus.len());
        for (m, vm_pins) in s.vms.iter().zip(pins) {
            for (c, pin) in s.vcpus[m.first..m.first + m.len].iter_mut().zip(vm_pins) {
                if pin.is_some() && pin != c.pinned {
                    let cpu = self.host_cpus[pin.unwrap_or(0)];
                    if pin_thread(c.tid, cpu).is_ok() {
                        c.pinned = pin;
                    }
                }
            }
        }
    }

    /// Charges the ledger for VM-local vCPUs `boosts` of `vm` as it allows; returns what to
    /// raise (key, thread, budget, reason). The raising itself happens in `raise`, with the
    /// state unlocked: a raised thread may preempt the caller at once.
    fn grant(&self, s: &mut State, vm: usize, boosts: &[Boost]) -> Vec<Grant> {
        Self::settle(s, self.now());
        let mut out = Vec::new();
        for b in boosts {
            let Some(key) =
                (b.vcpu < s.vms[vm].len as u32).then(|| s.vms[vm].first + b.vcpu as usize)
            else {
                continue;
            };
            let tid = s.vcpus[key].tid;
            if tid == 0 || s.vcpus[key].gone {
                continue;
            }
            let Some(budget) = s.ledger.grant(vm) else {
                s.vcpus[key].metrics.boosts_refused += 1;
                continue;
            };
            // Charged now, so that concurrent requests cannot pass the cap together; given
            // back below if no boost is made.
            s.ledger.borrowed(vm, budget);
            let debt = s.ledger.debt(vm);
            let m = &mut s.vms[vm].metrics;
            m.max_debt_ns = m.max_debt_ns.max(debt);
            out.push(Grant {
                vm,
                key,
                tid,
                budget,
                reason: b.reason,
            });
        }
        out
    }

    /// Raises the threads `grants` names through the host scheduler, then accounts for it.
    fn raise(&self, grants: Vec<Grant>) {
        if grants.is_empty() {
            return;
        }
        let outcomes: Vec<Outcome> = grants
            .iter()
            .map(|g| {
                self.booster
                    .boost(g.tid, Duration::from_nanos(g.budget))
            })
            .collect();
        let mut s = self.lock();
        for (g, o) in grants.iter().zip(outcomes) {
            if o == Outcome::Boosted {
                s.vcpus[g.key].metrics.count_boost(g.reason);
                continue;
            }
            s.ledger.repaid(g.vm, g.budget);
            match o {
                // Running on an earlier boost: nothing new was lent.
                Outcome::AlreadyBoosted | Outcome::Boosted => {}
                Outcome::NotPermitted => {
                    s.vcpus[g.key].metrics.boosts_refused += 1;
                    if !std::mem::replace(&mut s.warned, true) {
                        eprintln!(
                            "pvsync: warning: the Linux backend cannot raise vCPU threads \
                             (no CAP_SYS_NICE): boosts fall back to the spinner's sched_yield"
                        );
                    }
                }
                Outcome::Failed(_) => s.vcpus[g.key].metrics.boosts_refused += 1,
            }
        }
    }
}

/// A boost the ledger granted, to be made.
struct Grant {
    vm: usize,
    key: usize,
    tid: libc::pid_t,
    budget: Nanos,
    reason: BoostReason,
}

impl Backend for LinuxBackend {
    fn name(&self) -> &'static str {
        "linux"
    }

    fn add_vm(
        &self,
        policy: Box<dyn BoostPolicy>,
        vcpus: usize,
        _: Weak<dyn GuestView>,
    ) -> VmHandle {
        let mut s = self.lock();
        let vm = s.vms.len();
        let first = s.vcpus.len();
        s.vms.push(Vm {
            first,
            len: vcpus,
            policy,
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
            let (first, len) = (s.vms[vm].first, s.vms[vm].len);
            if let Some(n) = named.filter(|&n| (n as usize) < len) {
                s.vcpus[first + n as usize].metrics.named_by_yields += 1;
            }
            let states = Self::states(&s, vm);
            let input = Input {
                now,
                vcpus: &states,
                shared,
                costs: COSTS,
            };
            let me = (v - first) as u32;
            let decision = s.vms[vm].policy.on_spin(&input, me, named);
            match decision {
                Some(b) => self.grant(&mut s, vm, &[b]),
                None => Vec::new(),
            }
        };
        self.raise(grants);
        // The boosted thread runs at a real-time priority now; the spinner offers its CPU.
        std::thread::yield_now();
    }

    fn idle(&self, v: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
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
            if now >= deadline {
                break;
            }
            s = self
                .wake
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
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
        let Some((first, len)) = s.vms.get(vm).map(|m| (m.first, m.len)) else {
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
        let grants = self.grant(&mut s, vm, &boosts);
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
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            let p = &mut c.metrics.host_priority;
            match (a.real_time, a.boosted) {
                (true, true) => p.samples_raised += 1,
                (true, false) => p.samples_unaccounted += 1,
                _ => {}
            }
        }
    }

    fn sampled(&self, vm: usize, stacked: bool, interval_ns: u64) {
        let mut s = self.lock();
        let Some((first, len)) = s.vms.get(vm).map(|m| (m.first, m.len)) else {
            return;
        };
        // Sampled while the VM is live: every vCPU thread has started here (before that it
        // sets itself up, unplaced) and not all have left.
        let vcpus = &s.vcpus[first..first + len];
        if vcpus.iter().any(|c| c.tid == 0) || vcpus.iter().all(|c| c.gone) {
            return;
        }
        if let Some(m) = s.vms.get_mut(vm) {
            m.metrics.samples += 1;
            m.metrics.sampled_ns += interval_ns;
            if stacked {
                m.metrics.stacked_ns += interval_ns;
            }
        }
    }

    fn bad_hypercall(&self, v: usize) {
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            c.metrics.bad_hypercalls += 1;
        }
    }

    fn exit(&self, v: usize) {
        let mut s = self.lock();
        if let Some(c) = s.vcpus.get_mut(v) {
            c.gone = true;
            if c.tid != 0 {
                // Whatever the budget said: a thread that leaves gives its priority back,
                // and is seen to.
                self.booster.restore(c.tid);
                c.metrics.host_priority.raised_at_exit = real_time(c.tid);
            }
            self.repin(&mut s);
        }
        drop(s);
        self.wake.notify_all();
    }

    fn end_vm(&self, vm: usize) {
        let mut s = self.lock();
        if let Some(m) = s.vms.get(vm) {
            let (first, len) = (m.first, m.len);
            for c in &mut s.vcpus[first..first + len] {
                c.gone = true;
                if c.tid != 0 {
                    self.booster.restore(c.tid);
                }
            }
            self.repin(&mut s);
        }
        drop(s);
        self.wake.notify_all();
    }

    fn report(&self, vm: usize) -> Option<(VmMetrics, Vec<VcpuMetrics>)> {
        let s = self.lock();
        let (first, len) = s.vms.get(vm).map(|m| (m.first, m.len))?;
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

/// The host CPUs this process may run on, in order (any number: no CPU limit is built in).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain bits; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into `set`.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0;
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, inside `set`.
        .filter(|&cpu| ok && unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        (0..n).collect()
    } else {
        cpus
    }
}

/// Pins thread `tid` to host CPU `cpu`.
fn pin_thread(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: as in `allowed_cpus`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu` was checked to lie inside the set.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `set`, which lives across the call; a tid that names no
    // thread is refused with ESRCH.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether thread `tid` runs under a real-time policy now.
fn real_time(tid: libc::pid_t) -> bool {
    matches!(
        super::rtboost::current(tid),
        Some((libc::SCHED_FIFO | libc::SCHED_RR, _))
    )
}
