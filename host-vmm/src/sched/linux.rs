//! The Linux backend: the host scheduler runs every vCPU thread as it likes. What KVM cannot
//! do inside KVM_RUN goes through here: the Idle hypercall (a timed wait ended by an IPI),
//! the counters, and the boosts. A spinner's YieldTo and a grace period's RcuWait ask the
//! VM's policy whom to boost, as under the slot backend; the boost is the host scheduler's
//! own: the chosen vCPU's thread runs `SCHED_FIFO` for the ledger's budget (`rtboost`),
//! and the spinner yields its CPU. Whether a vCPU is preempted comes from the host
//! (`observe`: the monitor's reading of the thread's schedstat wait).

use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::ledger::BoostLedger;
use super::metrics::{VcpuMetrics, VmMetrics};
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
    metrics: VcpuMetrics,
}

struct Vm {
    first: usize,
    len: usize,
    policy: Box<dyn BoostPolicy>,
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

#[derive(Default)]
pub struct LinuxBackend {
    state: Mutex<State>,
    /// One for all: idle waits are slow paths.
    wake: Condvar,
    booster: RtBooster,
    epoch: std::sync::OnceLock<Instant>,
}

impl LinuxBackend {
    pub fn new() -> Self {
        Self::default()
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
        });
        s.ledger.add_vm();
        s.vcpus.extend((0..vcpus).map(|_| Vcpu {
            vm,
            ..Default::default()
        }));
        VmHandle { vm, first }
    }

    fn start(&self, v: usize, _: Box<dyn Kick>) {
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            // SAFETY: gettid has no preconditions; this runs on vCPU v's own thread.
            c.tid = unsafe { libc::gettid() };
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
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            c.preempted = preempted;
        }
    }

    fn bad_hypercall(&self, v: usize) {
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            c.metrics.bad_hypercalls += 1;
        }
    }

    fn exit(&self, v: usize) {
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            c.gone = true;
            // Whatever the budget said: a thread that leaves gives its priority back.
            self.booster.restore(c.tid);
        }
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
        }
        self.wake.notify_all();
    }

    fn report(&self, vm: usize) -> Option<(VmMetrics, Vec<VcpuMetrics>)> {
        let s = self.lock();
        let (first, len) = s.vms.get(vm).map(|m| (m.first, m.len))?;
        let vcpus = s.vcpus[first..first + len]
            .iter()
            .map(|c| c.metrics.clone())
            .collect();
        Some((VmMetrics::default(), vcpus))
    }

    fn publishes_host_fields(&self) -> bool {
        false
    }
}
