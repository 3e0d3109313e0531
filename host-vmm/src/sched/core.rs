//! The slot scheduler's state machine: which vCPU holds which slot, who is queued where, and
//! what a boost, a yield, an idle hypercall or an IPI changes. It never touches a thread or
//! KVM: every operation takes the time and returns [`Effects`] (threads to wake, threads to
//! kick out of KVM_RUN) for the backend to carry out, so it is unit-tested with a fake clock.

use std::collections::VecDeque;

use super::ledger::BoostLedger;
use super::metrics::{LatencyHistogram, VcpuMetrics, VmMetrics};
use super::placement::{self, Cause, Placement, SlotView};
use super::trace::{Event, Trace, Waited};
use super::Nanos;
use crate::policy::{Boost, BoostPolicy, BoostReason, Costs, Cpl, Input, VcpuState};
use crate::shared_region::{Problems, Snapshot};

/// How often the policies' periodic look (`on_tick`) runs.
pub const POLICY_PERIOD: Nanos = 1_000_000;
/// RcuWait words acted on per grace period (the start, and the last holdout; one spare for
/// a race between two last holdouts).
const RCU_WORDS_PER_GP: u32 = 3;
/// RcuWait words acted on per VM and policy period, whatever the sequence says.
const RCU_WORDS_PER_PERIOD: u32 = 8;
/// An RCU boost's turn, in boost budgets (the guest gives it back as soon as it reports).
const RCU_BOOST_BUDGETS: Nanos = 4;
/// How often the load balancer looks.
pub const BALANCE_PERIOD: Nanos = 4_000_000;

/// Tunables of the slot scheduler.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub slots: usize,
    /// A turn on a slot, when others wait.
    pub slice: Nanos,
    pub placement: Placement,
    /// Run time one boost lends (see `BoostLedger`).
    pub boost_budget: Nanos,
    /// Most boosted time a VM may owe.
    pub max_debt: Nanos,
    pub trace: bool,
    /// Bind each slot to a host CPU (the backend moves a vCPU thread there before waking it).
    pub pin_slots: bool,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            slots: 2,
            slice: 3_000_000,
            placement: Placement::default(),
            boost_budget: super::ledger::SLOT_LEDGER.budget,
            max_debt: super::ledger::SLOT_LEDGER.max_debt,
            trace: false,
            pin_slots: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Registered, its thread not started yet.
    NotStarted,
    Running {
        slot: usize,
    },
    Queued {
        slot: usize,
    },
    /// In the Idle hypercall until `until` or an IPI.
    Idle {
        until: Nanos,
    },
    /// Its VM ended.
    Gone,
}

#[derive(Debug)]
struct Vcpu {
    vm: usize,
    index: u32,
    state: RunState,
    /// When `state` last changed.
    since: Nanos,
    last_slot: usize,
    slice_end: Nanos,
    /// An IPI arrived while it was not idle: its next Idle returns at once.
    wake_token: bool,
    /// A kick was requested (at `kicked_at`) and not yet honoured.
    kick_pending: bool,
    kicked_at: Nanos,
    cpl: Cpl,
    interrupt_pending: bool,
    in_spin_loop: bool,
    /// This turn (or the queued one) is a boost.
    boost: Option<BoostReason>,
    /// Run time the ledger granted the boost.
    boost_budget: Nanos,
    /// The boost is charged to its VM: another VM had a vCPU waiting when it was granted.
    boost_charged: bool,
    /// This turn was given to it in place of a VM in debt: when it ends, its run time
    /// repays that VM's debt.
    stands_for: Option<usize>,
    /// It lent its turn in a directed yield: the turn's end, for when it runs again.
    resume_end: Option<Nanos>,
    /// Its boost runs on a turn this vCPU (a key) lent it; published to the guest, which
    /// gives the turn back when it no longer holds the lender up.
    lent_by: Option<usize>,
    metrics: VcpuMetrics,
}

struct Vm {
    policy: Box<dyn BoostPolicy>,
    first: usize,
    len: usize,
    live: bool,
    metrics: VmMetrics,
}

#[derive(Debug, Default)]
struct Slot {
    running: Option<usize>,
    queue: VecDeque<usize>,
}

/// What the backend must do after an operation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// vCPUs just handed a slot: wake their threads.
    pub run: Vec<usize>,
    /// vCPUs whose slice is over: kick them out of KVM_RUN.
    pub kick: Vec<usize>,
}

/// RcuWait words a VM had acted on: for the latest grace period it named, and in the
/// current policy period.
#[derive(Debug, Default)]
struct RcuWords {
    seq: u32,
    for_seq: u32,
    window: Nanos,
    in_window: u32,
}

pub struct Core {
    cfg: CoreConfig,
    slots: Vec<Slot>,
    vcpus: Vec<Vcpu>,
    vms: Vec<Vm>,
    ledger: BoostLedger,
    trace: Option<Trace>,
    last_tick: Nanos,
    last_policy_tick: Nanos,
    last_balance: Nanos,
    /// Every hand-off and kick so far, for what a boost costs on this host.
    handoffs: LatencyHistogram,
    kicks: LatencyHistogram,
    /// What the policies are told a boost costs (refreshed at each policy look).
    costs: Costs,
    /// Per VM: RcuWait words acted on.
    rcu_words: Vec<RcuWords>,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Self {
        let slots = (0..cfg.slots.max(1)).map(|_| Slot::default()).collect();
        let ledger = BoostLedger::new(0, cfg.boost_budget, cfg.max_debt);
        // The backend that owns the clock sets the real epoch when it hands the trace out.
        let trace = cfg.trace.then(|| Trace::new(std::time::Instant::now()));
        Core {
            cfg,
            slots,
            vcpus: Vec::new(),
            vms: Vec::new(),
            ledger,
            trace,
            last_tick: 0,
            last_policy_tick: 0,
            last_balance: 0,
            handoffs: LatencyHistogram::default(),
            kicks: LatencyHistogram::default(),
            costs: Costs {
                boost_ns: 0,
                slice_ns: 0,
            },
            rcu_words: Vec::new(),
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// What a boost costs, as measured so far: the typical (median) hand-off plus the
    /// typical kick. Medians, because a few hand-offs and kicks in a thousand take a whole
    /// host scheduler tick; the policies compare this with waits of a slice's order.
    pub fn costs(&self) -> Costs {
        Costs {
            boost_ns: self.handoffs.quantile(0.5) + self.kicks.quantile(0.5),
            slice_ns: self.cfg.slice,
        }
    }

    /// A hand-off took `ns` (the backend measures it: from the decision to the vCPU's thread
    /// about to enter KVM_RUN).
    pub fn record_handoff(&mut self, v: usize, ns: Nanos) {
        if let Some(c) = self.vcpus.get_mut(v) {
            c.metrics.handoff_ns += ns;
            c.metrics.handoff_hist.record(ns);
            self.handoffs.record(ns);
        }
    }

    /// Adds a VM of `len` vCPUs; returns its id and the key of its vCPU 0 (keys are
    /// consecutive).
    pub fn add_vm(&mut self, policy: Box<dyn BoostPolicy>, len: usize) -> (usize, usize) {
        let vm = self.vms.len();
        let first = self.vcpus.len();
        for index in 0..len {
            self.vcpus.push(Vcpu {
                vm,
                index: index as u32,
                state: RunState::NotStarted,
                since: 0,
                last_slot: 0,
                slice_end: 0,
                wake_token: false,
                kick_pending: false,
                kicked_at: 0,
                cpl: Cpl::Kernel,
                interrupt_pending: false,
                in_spin_loop: false,
                boost: None,
                boost_budget: 0,
                boost_charged: false,
                stands_for: None,
                resume_end: None,
                lent_by: None,
                metrics: VcpuMetrics::default(),
            });
        }
        self.vms.push(Vm {
            policy,
            first,
            len,
            live: true,
            metrics: VmMetrics::default(),
        });
        self.ledger.add_vm();
        self.rcu_words.push(RcuWords::default());
        (vm, first)
    }

    pub fn state(&self, v: usize) -> Option<RunState> {
        self.vcpus.get(v).map(|c| c.state)
    }

    pub fn is_running(&self, v: usize) -> bool {
        matches!(self.state(v), Some(RunState::Running { .. }))
    }

    /// Whether vCPU `v`'s thread should stop waiting (it runs, or its VM is gone).
    pub fn may_proceed(&self, v: usize) -> bool {
        matches!(
            self.state(v),
            Some(RunState::Running { .. } | RunState::Gone) | None
        )
    }

    /// The vCPU's thread, woken by a hand-off, is about to enter KVM_RUN.
    pub fn entered(&mut self, v: usize, now: Nanos) {
        if let Some(c) = self.vcpus.get(v) {
            if matches!(c.state, RunState::Running { .. }) {
                let ns = now.saturating_sub(c.since);
                self.record_handoff(v, ns);
            }
        }
    }

    fn vm_of(&self) -> impl Fn(usize) -> usize + '_ {
        |v| self.vcpus[v].vm
    }

    fn place(&self, v: usize, cause: Cause) -> usize {
        let views: Vec<SlotView> = self
            .slots
            .iter()
            .map(|s| SlotView {
                running: s.running,
                queued: &s.queue,
            })
            .collect();
        let c = &self.vcpus[v];
        placement::choose(
            self.cfg.placement,
            &views,
            &self.vm_of(),
            v,
            c.vm,
            c.last_slot,
            cause,
        )
    }

    /// Moves `v` to `state`, accounting the time spent in the old one.
    fn set_state(&mut self, v: usize, state: RunState, now: Nanos) {
        let c = &mut self.vcpus[v];
        let spent = now.saturating_sub(c.since);
        match c.state {
            RunState::Running { slot } => {
                c.metrics.run_ns += spent;
                c.lent_by = None;
                if let Some(debtor) = c.stands_for.take() {
                    // What the substitute really ran (it may halt at once), up to a slice.
                    self.ledger.repaid(debtor, spent.min(self.cfg.slice));
                }
                let boost = c.boost.take();
                if boost.is_some() && c.boost_charged {
                    // The budget was charged when the boost was granted; settle the rest.
                    if spent > c.boost_budget {
                        self.ledger.borrowed(c.vm, spent - c.boost_budget);
                    } else {
                        self.ledger.repaid(c.vm, c.boost_budget - spent);
                    }
                    let debt = self.ledger.debt(c.vm);
                    let m = &mut self.vms[c.vm].metrics;
                    m.max_debt_ns = m.max_debt_ns.max(debt);
                }
                if let Some(t) = &mut self.trace {
                    t.push(Event::Turn {
                        slot,
                        vm: c.vm,
                        vcpu: c.index,
                        start: c.since,
                        dur: spent,
                        boost: boost.map(|b| b.name()),
                    });
                }
                self.slots[slot].running = None;
                c.last_slot = slot;
            }
            RunState::Queued { slot } => {
                c.metrics.wait_ns += spent;
                self.slots[slot].queue.retain(|&q| q != v);
                if let Some(t) = &mut self.trace {
                    t.push(Event::Wait {
                        vm: c.vm,
                        vcpu: c.index,
                        how: Waited::Queued { slot },
                        start: c.since,
                        dur: spent,
                    });
                }
            }
            RunState::Idle { .. } => {
                c.metrics.idle_ns += spent;
                if let Some(t) = &mut self.trace {
                    t.push(Event::Wait {
                        vm: c.vm,
                        vcpu: c.index,
                        how: Waited::Idle,
                        start: c.since,
                        dur: spent,
                    });
                }
            }
            RunState::NotStarted | RunState::Gone => {}
        }
        c.state = state;
        c.since = now;
    }

    /// Queues `v` on `slot` (at the head if `front`) and fills the slot if it is free.
    fn enqueue(&mut self, v: usize, slot: usize, front: bool, now: Nanos, fx: &mut Effects) {
        self.set_state(v, RunState::Queued { slot }, now);
        let q = &mut self.slots[slot].queue;
        if front {
            q.push_front(v);
        } else {
            q.push_back(v);
        }
        self.dispatch(slot, now, fx);
    }

    /// Whether queued vCPU `v` has waited two slices or more: boosts no longer pass it.
    fn starving(&self, v: usize, now: Nanos) -> bool {
        let c = &self.vcpus[v];
        matches!(c.state, RunState::Queued { .. })
            && now.saturating_sub(c.since) >= 2 * self.cfg.slice
    }

    /// The next vCPU for `slot`'s queue: a boosted one first; else the head, unless its VM
    /// owes boosted time and a vCPU of a VM that owes nothing waits (which repays the debt).
    fn pick(&mut self, slot: usize) -> Option<usize> {
        let q = &self.slots[slot].queue;
        let head = *q.front()?;
        // A boost, or a lender back from its directed yield (the rest of its own turn), runs
        // as queued: the ledger substitution is for ordinary turns.
        if self.vcpus[head].boost.is_some() || self.vcpus[head].resume_end.is_some() {
            return Some(head);
        }
        let head_vm = self.vcpus[head].vm;
        if self.ledger.owes(head_vm) {
            if let Some(&other) = q.iter().find(|&&o| !self.ledger.owes(self.vcpus[o].vm)) {
                // Repaid by what `other` runs, when its turn ends (`set_state`).
                self.vcpus[other].stands_for = Some(head_vm);
                return Some(other);
            }
        }
        Some(head)
    }

    /// Whether queued `v` may move to another slot: not a boost (it stays where its booster
    /// put it) and not a lender waiting right behind the vCPU it lent its turn to.
    fn movable(&self, v: usize) -> bool {
        let c = &self.vcpus[v];
        c.boost.is_none() && c.resume_end.is_none()
    }

    /// vCPUs of `vm` on `slot` (running or queued), `except` left out.
    fn siblings_on(&self, slot: usize, vm: usize, except: usize) -> usize {
        let s = &self.slots[slot];
        s.running
            .iter()
            .chain(s.queue.iter())
            .filter(|&&v| v != except && self.vcpus[v].vm == vm)
            .count()
    }

    /// A queued vCPU another slot could take: the last non-boosted entry of the longest queue
    /// that has one (a boosted vCPU stays where its booster put it). With `spread`, one that
    /// has no sibling on `slot` first: stealing must not stack what placement spread.
    fn steal_for(&self, slot: usize) -> Option<usize> {
        let mut queues: Vec<usize> = (0..self.slots.len()).filter(|&s| s != slot).collect();
        queues.sort_by_key(|&s| std::cmp::Reverse(self.slots[s].queue.len()));
        let candidates = || {
            queues.iter().flat_map(|&s| {
                self.slots[s]
                    .queue
                    .iter()
                    .rev()
                    .copied()
                    .filter(|&v| self.movable(v))
            })
        };
        if self.cfg.placement == Placement::Spread {
            if let Some(v) =
                candidates().find(|&v| self.siblings_on(slot, self.vcpus[v].vm, v) == 0)
            {
                return Some(v);
            }
        }
        candidates().next()
    }

    /// `spread`: a queued vCPU sitting with a sibling moves to a slot where its VM has none
    /// and no more load than it leaves. Wakes and requeues already place that way; this
    /// undoes what wake-ups, steals and idle slots left stacked (a sibling woken next to a
    /// vCPU whose own sibling was queued there meanwhile). Every move takes one stacked pair
    /// away and adds none, so it ends.
    fn unstack(&mut self, now: Nanos, fx: &mut Effects) -> bool {
        let load = |s: &Slot| s.running.is_some() as usize + s.queue.len();
        for from in 0..self.slots.len() {
            for &v in self.slots[from].queue.iter() {
                let c = &self.vcpus[v];
                // One that has waited two slices stays: moving it would send it to the back
                // of another queue.
                if !self.movable(v) || self.siblings_on(from, c.vm, v) == 0 || self.starving(v, now)
                {
                    continue;
                }
                let to = (0..self.slots.len())
                    .filter(|&t| t != from && self.siblings_on(t, c.vm, v) == 0)
                    .filter(|&t| load(&self.slots[t]) <= load(&self.slots[from]))
                    .min_by_key(|&t| load(&self.slots[t]));
                if let Some(to) = to {
                    self.enqueue(v, to, false, now, fx);
                    return true;
                }
            }
        }
        false
    }

    /// After every change of who sits where: with `spread`, unstack what can be.
    fn settle(&mut self, now: Nanos, fx: &mut Effects) {
        if self.cfg.placement != Placement::Spread {
            return;
        }
        for _ in 0..self.vcpus.len() {
            if !self.unstack(now, fx) {
                break;
            }
        }
    }

    /// Load balancing, as a busy host does now and then (every `BALANCE_PERIOD`): if one
    /// slot holds two vCPUs more than another (running and queued), its last non-boosted
    /// waiter moves over. One move per period, so wake-affine placement still shows its
    /// stacking between moves, as under CFS.
    fn balance(&mut self, now: Nanos, fx: &mut Effects) {
        let load = |s: &Slot| s.running.is_some() as usize + s.queue.len();
        let (Some(busy), Some(light)) = (
            (0..self.slots.len()).max_by_key(|&s| load(&self.slots[s])),
            (0..self.slots.len()).min_by_key(|&s| load(&self.slots[s])),
        ) else {
            return;
        };
        if load(&self.slots[busy]) < load(&self.slots[light]) + 2 {
            return;
        }
        let movable = |v: &&usize| self.movable(**v);
        let q = &self.slots[busy].queue;
        // With `spread`, a waiter that has no sibling where it goes first.
        let pick = q
            .iter()
            .rev()
            .filter(movable)
            .find(|&&v| {
                self.cfg.placement == Placement::Spread
                    && self.siblings_on(light, self.vcpus[v].vm, v) == 0
            })
            .or_else(|| q.iter().rev().find(movable))
            .copied();
        if let Some(v) = pick {
            self.enqueue(v, light, false, now, fx);
        }
    }

    /// Hands `slot` to its next vCPU if it is free (stealing from another slot if its own
    /// queue is empty).
    fn dispatch(&mut self, slot: usize, now: Nanos, fx: &mut Effects) {
        if self.slots[slot].running.is_some() {
            return;
        }
        let Some(v) = self.pick(slot).or_else(|| self.steal_for(slot)) else {
            return;
        };
        self.start_turn(v, slot, now, fx);
    }

    /// Gives free `slot` to `v` (queued, or starting).
    fn start_turn(&mut self, v: usize, slot: usize, now: Nanos, fx: &mut Effects) {
        self.set_state(v, RunState::Running { slot }, now);
        self.slots[slot].running = Some(v);
        let slice = self.cfg.slice;
        let c = &mut self.vcpus[v];
        // A fresh turn: a kick meant for an earlier one no longer applies.
        c.kick_pending = false;
        c.last_slot = slot;
        let resume = c.resume_end.take();
        c.slice_end = if c.boost.is_some() {
            now + c.boost_budget
        } else {
            // A spinner back from lending its turn has only the rest of it (maybe none: then
            // the next tick ends it).
            resume.unwrap_or(now + slice).max(now)
        };
        c.interrupt_pending = false;
        c.in_spin_loop = false;
        c.metrics.dispatches += 1;
        fx.run.push(v);
    }

    /// The vCPU's thread starts.
    pub fn start(&mut self, v: usize, now: Nanos, fx: &mut Effects) {
        if self.vcpus.get(v).map(|c| c.state) != Some(RunState::NotStarted) {
            return;
        }
        let slot = self.place(v, Cause::Start);
        self.enqueue(v, slot, false, now, fx);
        self.settle(now, fx);
    }

    /// The vCPU left KVM_RUN because it was kicked: it goes back in the queue (its CPL at that
    /// moment recorded for the policies).
    pub fn preempt(&mut self, v: usize, cpl: Cpl, now: Nanos, fx: &mut Effects) {
        let Some(c) = self.vcpus.get_mut(v) else {
            return;
        };
        let RunState::Running { slot } = c.state else {
            c.kick_pending = false;
            return;
        };
        if std::mem::take(&mut c.kick_pending) {
            c.metrics.kicks += 1;
            let ns = now.saturating_sub(c.kicked_at);
            c.metrics.kick_latency_ns += ns;
            c.metrics.kick_hist.record(ns);
            self.kicks.record(ns);
        }
        c.cpl = cpl;
        c.metrics.preemptions += 1;
        self.end_turn(v, slot, None, now, fx);
    }

    /// Running `v`'s turn on `slot` ends: the slot goes to `next` if it is queued (a lender
    /// taking its turn back), else to the next waiter; `v` queues as after any turn. `v` is
    /// placed while it still counts on its slot (so its own slot does not look free to it);
    /// the freed slot first takes a waiter (its own, or stolen from another slot), then `v`
    /// queues.
    fn end_turn(
        &mut self,
        v: usize,
        slot: usize,
        next: Option<usize>,
        now: Nanos,
        fx: &mut Effects,
    ) {
        let to = self.place(v, Cause::Requeue);
        self.set_state(v, RunState::Queued { slot }, now);
        // The lender takes its turn back at once, unless a boost was queued ahead of it
        // meanwhile (a grace period's holdout, say): then the queue's order stands.
        let boost_ahead = |n: usize| {
            self.slots[slot]
                .queue
                .iter()
                .take_while(|&&q| q != n)
                .any(|&q| self.vcpus[q].boost.is_some())
        };
        match next
            .filter(|&n| matches!(self.vcpus[n].state, RunState::Queued { .. }) && !boost_ahead(n))
        {
            Some(n) => self.start_turn(n, slot, now, fx),
            None => self.dispatch(slot, now, fx),
        }
        self.enqueue(v, to, false, now, fx);
        self.settle(now, fx);
    }

    /// Input for VM `vm`'s policy.
    fn policy_states(&self, vm: usize, now: Nanos) -> Vec<VcpuState> {
        let m = &self.vms[vm];
        let waits = self.expected_waits(m.first..m.first + m.len, now);
        (m.first..m.first + m.len)
            .zip(waits)
            .map(|(v, expected_wait)| {
                let c = &self.vcpus[v];
                VcpuState {
                    id: c.index,
                    preempted: matches!(c.state, RunState::Queued { .. }),
                    blocked: !matches!(c.state, RunState::Queued { .. } | RunState::Running { .. }),
                    cpl: c.cpl,
                    interrupt_pending: c.interrupt_pending,
                    in_spin_loop: c.in_spin_loop,
                    expected_wait,
                }
            })
            .collect()
    }

    /// How long each vCPU of `range` should wait for its turn without a boost: 0 while it
    /// runs; queued, the rest of the turn on its slot plus a turn for each vCPU queued ahead
    /// of it (a boost its budget); `Nanos::MAX` when it is not runnable. One pass over each
    /// slot's queue, so a decision about a VM of n vCPUs costs O(n), not O(n^2).
    fn expected_waits(&self, range: std::ops::Range<usize>, now: Nanos) -> Vec<Nanos> {
        let mut waits: Vec<Nanos> = range
            .clone()
            .map(|v| match self.vcpus[v].state {
                RunState::Running { .. } => 0,
                _ => Nanos::MAX,
            })
            .collect();
        for (slot, s) in self.slots.iter().enumerate() {
            let mut ahead = s
                .running
                .map_or(0, |r| self.vcpus[r].slice_end.saturating_sub(now));
            for &q in &s.queue {
                let c = &self.vcpus[q];
                if range.contains(&q) && c.state == (RunState::Queued { slot }) {
                    waits[q - range.start] = ahead;
                }
                let turn = match c.boost {
                    Some(_) => c.boost_budget,
                    None => self.cfg.slice,
                };
                ahead = ahead.saturating_add(turn);
            }
        }
        waits
    }

    fn input<'a>(
        &self,
        now: Nanos,
        vcpus: &'a [VcpuState],
        shared: Option<&'a Snapshot>,
    ) -> Input<'a> {
        Input {
            now,
            vcpus,
            shared,
            costs: self.costs,
        }
    }

    /// Boosts VM-local vCPU `target` of `vm` onto `slot` (at the head of its queue) if the
    /// ledger allows; true if it did.
    fn boost(
        &mut self,
        vm: usize,
        target: u32,
        reason: BoostReason,
        slot: usize,
        now: Nanos,
        fx: &mut Effects,
    ) -> bool {
        let m = &self.vms[vm];
        let Some(v) = (target < m.len as u32).then(|| m.first + target as usize) else {
            return false;
        };
        // Already boosted: it heads a queue; charging the VM again would count it twice.
        if !matches!(self.vcpus[v].state, RunState::Queued { .. }) || self.vcpus[v].boost.is_some()
        {
            return false;
        }
        // A vCPU boosted because a grace period waits on it runs until it has reported its
        // quiescent state (the guest gives the turn back then), up to a few budgets.
        let want = match reason.is_rcu() {
            true => {
                let b = self.ledger.budget();
                (RCU_BOOST_BUDGETS * b).min(self.cfg.slice.max(b))
            }
            false => self.ledger.budget(),
        };
        // A boost passes only its own VM's vCPUs unless another VM waits: then it takes
        // from that VM and is charged, else it is free (and not capped).
        let charged = self.another_vm_waits(vm);
        let budget = if charged {
            let Some(budget) = self.ledger.grant_up_to(vm, want) else {
                self.vcpus[v].metrics.boosts_refused += 1;
                return false;
            };
            // Charged now, so that boosts granted together cannot exceed the cap.
            self.ledger.borrowed(vm, budget);
            budget
        } else {
            want
        };
        self.vcpus[v].boost = Some(reason);
        self.vcpus[v].boost_budget = budget;
        self.vcpus[v].boost_charged = charged;
        // At the head, but behind earlier boosts and behind anyone who has waited too long:
        // boosts reorder turns, they may not starve a vCPU that is never named.
        self.set_state(v, RunState::Queued { slot }, now);
        let pos = self.slots[slot]
            .queue
            .iter()
            .position(|&q| self.vcpus[q].boost.is_none() && !self.starving(q, now))
            .unwrap_or(self.slots[slot].queue.len());
        self.slots[slot].queue.insert(pos, v);
        self.dispatch(slot, now, fx);
        let c = &mut self.vcpus[v];
        c.metrics.count_boost(reason);
        if c.cpl == Cpl::User {
            c.metrics.user_mode_boosts += 1;
        }
        let index = c.index;
        if let Some(t) = &mut self.trace {
            t.push(Event::Boost {
                slot,
                vm,
                vcpu: index,
                at: now,
                reason: reason.name(),
            });
        }
        true
    }

    /// vCPU `v` spins (a YieldTo hypercall naming `named`, a VM-local id): ask its VM's
    /// policy whom to run; boost that vCPU onto `v`'s slot, and `v` yields.
    pub fn spin_yield(
        &mut self,
        v: usize,
        named: Option<u32>,
        shared: Option<&Snapshot>,
        now: Nanos,
        fx: &mut Effects,
    ) {
        let Some(c) = self.vcpus.get_mut(v) else {
            return;
        };
        c.metrics.yields += 1;
        let (vm, index) = (c.vm, c.index);
        let RunState::Running { slot } = c.state else {
            return;
        };
        if named == Some(index) && self.vcpus[v].boost.is_some_and(BoostReason::is_rcu) {
            // A turn given on a grace period's word, given back: the vCPU has reported its
            // quiescent state. It queues as after any turn.
            self.vcpus[v].metrics.turns_given_back += 1;
            self.end_turn(v, slot, None, now, fx);
            return;
        }
        if named == Some(index) {
            // Naming itself (a turn given back whose host field was already stale): there is
            // nobody to run in its place.
            return;
        }
        if let Some(n) = named.and_then(|n| self.local(vm, n)) {
            self.vcpus[n].metrics.named_by_yields += 1;
            if self.vcpus[v].lent_by == Some(n) {
                // It gives back the turn `n` lent it (it no longer holds `n` up): `n` runs at
                // once on this slot, with what is left of its turn; this vCPU queues as after
                // any turn.
                self.vcpus[v].metrics.turns_given_back += 1;
                self.end_turn(v, slot, Some(n), now, fx);
                return;
            }
            if self.is_running(n) {
                // Whether the spinner keeps spinning (KVM_HC_SCHED_YIELD never yields to a
                // vCPU that runs) or someone else is in its way (a vCPU it waits on that is
                // queued) is the policy's call.
                self.vcpus[v].metrics.yields_target_running += 1;
            }
        }
        let states = self.policy_states(vm, now);
        let input = self.input(now, &states, shared);
        let decision = self.vms[vm].policy.on_spin(&input, index, named);
        // Like KVM after a pause-loop exit: without a candidate (or with the ledger saying
        // no) the spinner goes back to spinning on its slot.
        if !decision.is_some_and(|b| self.boost(vm, b.vcpu, b.reason, slot, now, fx)) {
            return;
        }
        // A directed yield lends the rest of the spinner's turn: the boosted vCPU runs now on
        // this slot, the spinner right after it for what is left of its turn (so repeated
        // yields cannot starve the vCPUs queued behind). A hypercall comes from the kernel.
        let c = &mut self.vcpus[v];
        c.cpl = Cpl::Kernel;
        c.in_spin_loop = true;
        c.resume_end = Some(c.slice_end);
        self.set_state(v, RunState::Queued { slot }, now);
        let target = self.local(vm, decision.map_or(0, |b| b.vcpu));
        if let Some(t) = target {
            self.vcpus[t].lent_by = Some(v);
        }
        let q = &mut self.slots[slot].queue;
        let after = target
            .and_then(|t| q.iter().position(|&x| x == t))
            .map_or(0, |i| i + 1);
        q.insert(after, v);
        self.dispatch(slot, now, fx);
    }

    fn local(&self, vm: usize, index: u32) -> Option<usize> {
        let m = self.vms.get(vm)?;
        (index < m.len as u32).then(|| m.first + index as usize)
    }

    /// The Idle hypercall: true if `v` gave up its slot (it waits until `until` or an IPI),
    /// false if an IPI arrived since its last idle (it goes on at once).
    pub fn idle(&mut self, v: usize, until: Nanos, now: Nanos, fx: &mut Effects) -> bool {
        let Some(c) = self.vcpus.get_mut(v) else {
            return false;
        };
        if std::mem::take(&mut c.wake_token) {
            return false;
        }
        let RunState::Running { slot } = c.state else {
            return false;
        };
        c.metrics.halts += 1;
        c.cpl = Cpl::Kernel;
        self.set_state(v, RunState::Idle { until }, now);
        self.dispatch(slot, now, fx);
        self.settle(now, fx);
        true
    }

    /// Makes an idle vCPU runnable; one that is not idle keeps a token for its next Idle.
    fn wake(&mut self, v: usize, waker_slot: Option<usize>, now: Nanos, fx: &mut Effects) {
        match self.vcpus[v].state {
            RunState::Idle { .. } => {
                let slot = self.place(v, Cause::Wake { waker_slot });
                self.enqueue(v, slot, false, now, fx);
                self.settle(now, fx);
            }
            RunState::Gone => {}
            _ => self.vcpus[v].wake_token = true,
        }
    }

    /// Wakes `v` if it idles and its timeout has passed.
    pub fn idle_expired(&mut self, v: usize, now: Nanos, fx: &mut Effects) {
        if let Some(RunState::Idle { until }) = self.state(v) {
            if until <= now {
                self.wake(v, None, now, fx);
            }
        }
    }

    /// vCPU `from` sent an interrupt to VM-local vCPU `to` of the same VM (already injected).
    pub fn ipi(&mut self, from: usize, to: u32, now: Nanos, fx: &mut Effects) {
        let Some(f) = self.vcpus.get_mut(from) else {
            return;
        };
        f.metrics.ipis_sent += 1;
        let waker_slot = match f.state {
            RunState::Running { slot } => Some(slot),
            _ => None,
        };
        let vm = f.vm;
        let Some(t) = self.local(vm, to) else {
            return;
        };
        let c = &mut self.vcpus[t];
        c.interrupt_pending = true;
        c.metrics.ipis_received += 1;
        self.wake(t, waker_slot, now, fx);
    }

    pub fn bad_hypercall(&mut self, v: usize) {
        if let Some(c) = self.vcpus.get_mut(v) {
            c.metrics.bad_hypercalls += 1;
        }
    }

    /// The vCPU's thread left for good (its VM ended, or the thread failed).
    pub fn exit(&mut self, v: usize, now: Nanos, fx: &mut Effects) {
        let Some(c) = self.vcpus.get(v) else {
            return;
        };
        let slot = match c.state {
            RunState::Running { slot } => Some(slot),
            _ => None,
        };
        self.set_state(v, RunState::Gone, now);
        if let Some(slot) = slot {
            self.dispatch(slot, now, fx);
        }
    }

    /// VM `vm` ended: all its vCPUs leave (their threads are told to proceed and stop).
    pub fn end_vm(&mut self, vm: usize, now: Nanos, fx: &mut Effects) {
        let Some(m) = self.vms.get_mut(vm) else {
            return;
        };
        m.live = false;
        let (first, len) = (m.first, m.len);
        for v in first..first + len {
            // One still inside KVM_RUN must leave it now: its slot goes to someone else.
            if self.is_running(v) {
                fx.kick.push(v);
            }
            self.exit(v, now, fx);
            fx.run.push(v);
        }
    }

    /// Whether the next `tick` runs the policies' periodic look (and so wants snapshots).
    pub fn policy_due(&self, now: Nanos) -> bool {
        now.saturating_sub(self.last_policy_tick) >= POLICY_PERIOD
    }

    /// The periodic look (every millisecond or so): wake vCPUs whose idle timeout passed,
    /// apply the policies' tick boosts, end slices that are over, let idle slots steal,
    /// sample stacking. `snapshot(vm)` reads VM `vm`'s shared region: None if it has none,
    /// Some(Err) if it could not be read.
    pub fn tick(
        &mut self,
        now: Nanos,
        snapshot: &mut dyn FnMut(usize) -> Option<Result<Snapshot, ()>>,
        fx: &mut Effects,
    ) {
        let elapsed = now.saturating_sub(self.last_tick);
        self.last_tick = now;
        for v in 0..self.vcpus.len() {
            self.idle_expired(v, now, fx);
        }
        // The policies look at a steady pace, however often the ticker runs for slices; so
        // does the load balancer.
        if now.saturating_sub(self.last_balance) >= BALANCE_PERIOD {
            self.last_balance = now;
            self.balance(now, fx);
        }
        self.settle(now, fx);
        if now.saturating_sub(self.last_policy_tick) >= POLICY_PERIOD {
            self.last_policy_tick = now;
            self.costs = self.costs();
            for vm in 0..self.vms.len() {
                if self.vms[vm].live {
                    self.tick_policy(vm, now, snapshot, fx);
                }
            }
        }
        for slot in 0..self.slots.len() {
            self.dispatch(slot, now, fx);
        }
        let waiting = self.anyone_waits();
        for slot in 0..self.slots.len() {
            let Some(r) = self.slots[slot].running else {
                continue;
            };
            let c = &mut self.vcpus[r];
            if now < c.slice_end {
                continue;
            }
            // A turn ends when someone waits, on this slot or another (the freed slot then
            // takes a waiter from elsewhere, so vCPUs rotate over the slots).
            if self.slots[slot].queue.is_empty() && !waiting {
                // Nobody waits: a boost that used its budget simply becomes a normal turn.
                if c.boost.is_some() {
                    self.set_state(r, RunState::Running { slot }, now);
                    self.slots[slot].running = Some(r);
                    self.vcpus[r].slice_end = now + self.cfg.slice;
                }
                continue;
            }
            if !c.kick_pending {
                c.kick_pending = true;
                c.kicked_at = now;
                fx.kick.push(r);
            }
        }
        self.sample(elapsed);
    }

    fn tick_policy(
        &mut self,
        vm: usize,
        now: Nanos,
        snapshot: &mut dyn FnMut(usize) -> Option<Result<Snapshot, ()>>,
        fx: &mut Effects,
    ) {
        let snap = match snapshot(vm) {
            Some(Ok(s)) => {
                let first = self.vms[vm].first;
                let len = self.vms[vm].len;
                for r in s.records.iter().take(len) {
                    let m = &mut self.vms[vm].metrics;
                    if r.problems.contains(Problems::TORN) {
                        // A vCPU descheduled mid-update: expected, not hostile.
                        m.torn_records += 1;
                    }
                    if !(r.problems - Problems::TORN).is_empty() {
                        m.invalid_page_events += 1;
                        if let Some(c) = self.vcpus.get_mut(first + r.vcpu as usize) {
                            c.metrics.invalid_records += 1;
                        }
                    }
                }
                Some(s)
            }
            Some(Err(())) => {
                self.vms[vm].metrics.invalid_page_events += 1;
                None
            }
            None => None,
        };
        let states = self.policy_states(vm, now);
        let input = self.input(now, &states, snap.as_ref());
        let boosts = self.vms[vm].policy.on_tick(&input);
        self.apply_boosts(vm, &boosts, now, fx);
    }

    /// vCPU `v` made the RcuWait hypercall for grace period `seq` (low 32 bits): the grace
    /// period now waits on the holdouts its header names. The policy may boost them at once.
    pub fn rcu_wait(
        &mut self,
        v: usize,
        seq: u32,
        shared: Option<&Snapshot>,
        now: Nanos,
        fx: &mut Effects,
    ) {
        let Some(c) = self.vcpus.get_mut(v) else {
            return;
        };
        c.metrics.rcu_waits += 1;
        let vm = c.vm;
        if !self.vms[vm].live {
            return;
        }
        // A hint about a grace period that is no longer the one in progress is stale.
        let Some(snap) = shared.filter(|s| s.header.rcu_gp_seq as u32 == seq && seq % 2 == 1)
        else {
            return;
        };
        // The guest names a grace period's holdouts once when it starts waiting and once for
        // its last one; more words for the same grace period are ignored (a flood would hold
        // the scheduler's lock for every VM).
        // The sequence is the guest's word too: only a later grace period starts a new count,
        // and a VM gets at most RCU_WORDS_PER_PERIOD words acted on per policy period.
        let w = &mut self.rcu_words[vm];
        if now.saturating_sub(w.window) >= POLICY_PERIOD {
            w.window = now;
            w.in_window = 0;
        }
        let later = (seq.wrapping_sub(w.seq) as i32) > 0;
        if later {
            w.seq = seq;
            w.for_seq = 0;
        }
        if seq != w.seq || w.for_seq >= RCU_WORDS_PER_GP || w.in_window >= RCU_WORDS_PER_PERIOD {
            self.vms[vm].metrics.rcu_words_ignored += 1;
            return;
        }
        w.for_seq += 1;
        w.in_window += 1;
        let states = self.policy_states(vm, now);
        let input = self.input(now, &states, Some(snap));
        let boosts = self.vms[vm].policy.on_rcu_wait(&input);
        self.apply_boosts(vm, &boosts, now, fx);
    }

    /// Boosts queued vCPUs of `vm` where they wait: each runs next on its slot. What holds a
    /// grace period up is worth ending the current turn for (at most one kick per slot per
    /// look); what lock and IPI waiters need waits for the turn to end.
    fn apply_boosts(&mut self, vm: usize, boosts: &[Boost], now: Nanos, fx: &mut Effects) {
        for b in boosts.iter().copied() {
            let Some(v) = self.local(vm, b.vcpu) else {
                continue;
            };
            let RunState::Queued { slot } = self.vcpus[v].state else {
                continue;
            };
            if self.vcpus[v].boost.is_some() || !self.boost(vm, b.vcpu, b.reason, slot, now, fx) {
                continue;
            }
            // Only a sibling's turn is cut: the trigger is the guest's word, and a guest may not
            // cut short another VM's turn on its word.
            let urgent = matches!(b.reason, BoostReason::RcuReader | BoostReason::RcuHoldout);
            let sibling = |r: &usize| self.vcpus[*r].vm == vm;
            if let Some(r) = self.slots[slot].running.filter(|r| urgent && sibling(r)) {
                let c = &mut self.vcpus[r];
                if c.boost.is_none() && !c.kick_pending {
                    c.kick_pending = true;
                    c.kicked_at = now;
                    fx.kick.push(r);
                }
            }
        }
    }

    /// Stacking samples, and debt repayment for VMs that run with nobody to compete with.
    fn sample(&mut self, elapsed: Nanos) {
        let mut on_slot = vec![0u32; self.vms.len()];
        let mut stacked = vec![false; self.vms.len()];
        for s in &self.slots {
            on_slot.iter_mut().for_each(|c| *c = 0);
            // A spinner queued behind the vCPU it lent its turn to sits there on purpose
            // (a directed yield), not by placement: it is not stacking.
            for &v in s
                .running
                .iter()
                .chain(s.queue.iter())
                .filter(|&&v| self.vcpus[v].resume_end.is_none())
            {
                let vm = self.vcpus[v].vm;
                on_slot[vm] += 1;
                if on_slot[vm] >= 2 {
                    stacked[vm] = true;
                }
            }
        }
        // Between VMs, only relative debt counts; a lone VM repays at the rate of time (below).
        // While another VM is live, debt is repaid only by giving it turns (`pick`): repaid
        // with time while it merely idled, a debt would be run up again at its next burst,
        // and its share over a longer interval would lose the cap once per burst.
        let live: Vec<usize> = (0..self.vms.len()).filter(|&v| self.vms[v].live).collect();
        if live.len() > 1 {
            self.ledger.forgive_common(live.iter().copied());
        }
        let alone = live.len() == 1;
        for (vm, m) in self.vms.iter_mut().enumerate() {
            if !m.live {
                continue;
            }
            m.metrics.samples += 1;
            m.metrics.sampled_ns += elapsed;
            if stacked[vm] {
                m.metrics.stacked_ns += elapsed;
            }
            if alone {
                self.ledger.repaid(vm, elapsed);
            }
        }
    }

    /// Whether a vCPU of a VM other than `vm` waits in a queue.
    fn another_vm_waits(&self, vm: usize) -> bool {
        self.slots
            .iter()
            .any(|s| s.queue.iter().any(|&v| self.vcpus[v].vm != vm))
    }

    /// Whether any vCPU waits in a queue.
    fn anyone_waits(&self) -> bool {
        self.slots.iter().any(|s| !s.queue.is_empty())
    }

    /// When the next tick is due: the earliest end of a slice while someone waits (or of a
    /// boost), skipping turns already being ended, but at least `min` and at most `max` from
    /// `now`.
    pub fn next_tick(&self, now: Nanos, min: Nanos, max: Nanos) -> Nanos {
        let waiting = self.anyone_waits();
        let due = self
            .slots
            .iter()
            .filter_map(|s| {
                let c = &self.vcpus[s.running?];
                (!c.kick_pending && (waiting || c.boost.is_some())).then_some(c.slice_end)
            })
            .min()
            .unwrap_or(u64::MAX);
        due.clamp(now + min, now + max)
    }

    /// Per-vCPU host fields for the shared region: (preempted now, total queued ns, boosts).
    pub fn host_fields(&self, v: usize, now: Nanos) -> Option<(bool, u64, u64)> {
        let c = self.vcpus.get(v)?;
        let queued = matches!(c.state, RunState::Queued { .. });
        let current = if queued {
            now.saturating_sub(c.since)
        } else {
            0
        };
        Some((
            queued,
            c.metrics.wait_ns + current,
            c.metrics.boosts_total(),
        ))
    }

    /// VM `vm`'s counters as of `now` (the interval each vCPU is in counts up to `now`).
    pub fn vm_metrics(&self, vm: usize, now: Nanos) -> Option<(&VmMetrics, Vec<VcpuMetrics>)> {
        let m = self.vms.get(vm)?;
        let vcpus = self.vcpus[m.first..m.first + m.len]
            .iter()
            .map(|c| {
                let mut out = c.metrics.clone();
                let open = now.saturating_sub(c.since);
                match c.state {
                    RunState::Running { .. } => out.run_ns += open,
                    RunState::Queued { .. } => out.wait_ns += open,
                    RunState::Idle { .. } => out.idle_ns += open,
                    RunState::NotStarted | RunState::Gone => {}
                }
                out
            })
            .collect();
        Some((&m.metrics, vcpus))
    }

    /// What `v`'s `host_lent_by` must read during its current turn: the lender's VM-local
    /// id + 1, or 0. Only the vCPU's own thread publishes it, before it enters KVM_RUN.
    /// `NO_VCPU` for a turn the host gave on a grace period's word (RCU boosts): given back
    /// with `YieldTo(itself)` once the vCPU has reported its quiescent state.
    pub fn lent_value(&self, v: usize) -> u32 {
        let Some(c) = self
            .vcpus
            .get(v)
            .filter(|c| matches!(c.state, RunState::Running { .. }))
        else {
            return 0;
        };
        if c.boost.is_some_and(BoostReason::is_rcu) {
            return shared_abi::NO_VCPU;
        }
        c.lent_by.map_or(0, |l| self.vcpus[l].index + 1)
    }

    pub fn take_trace(&mut self) -> Option<Trace> {
        self.trace.take()
    }

    /// Whose turn on each slot, then the queue, for debugging and tests.
    pub fn layout(&self) -> Vec<(Option<usize>, Vec<usize>)> {
        self.slots
            .iter()
            .map(|s| (s.running, s.queue.iter().copied().collect()))
            .collect()
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
