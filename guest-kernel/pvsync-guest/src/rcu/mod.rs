//! Read-copy-update, non-preemptible flavour: a reader disables preemption, so any point
//! where a CPU is preemptible (context switch, a tick that interrupted preemptible code) is
//! a quiescent state, as are idle and user mode ("extended" quiescent states, tracked with a
//! per-CPU counter that is even while the CPU is in one).
//!
//! A grace-period thread runs grace periods on demand ([`gp`]): it snapshots every CPU's
//! counter, then waits until each CPU was quiescent at the start, has left or entered an
//! extended quiescent state since, or reported a quiescent state for this grace period.
//! Callbacks queue per CPU and run in a per-CPU thread, never inside a reader
//! ([`callbacks`]). The kernel owns the threads and their wait queues; the crate says when
//! to wake them ([`Platform::wake`]).
//!
//! A vCPU the host preempts inside a reader stalls grace periods: the reader's nesting stays
//! visible in the shared region (`rcu_nesting`), and the header carries the grace-period
//! sequence, the holdouts and the callback backlog, so the host can see both sides of the
//! problem. Two RcuWait hypercalls per grace period at most ask the host to act at once:
//! the thread's when it starts waiting on holdouts, and the last holdout's when only the
//! thread's own CPU is left (its vCPU must run to end the grace period).

mod callbacks;
mod gp;

pub use gp::GracePeriod;

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool as FaultBool, AtomicU64 as StatU64, Ordering::Relaxed};

use shared_abi::EventKind;

use crate::cpuset::{AtomicCpuSet, CpuSet};
use crate::locks::{KernelTicketLock, SpinLock};
use crate::platform::{Platform, Wake};
use crate::sync::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use crate::{events, hypercall, record, region};

/// A callback queued by `call`.
pub type Callback = Box<dyn FnOnce() + Send>;

/// A CPU's callback list: each callback with the grace period it waits for.
type CallbackList<P> = SpinLock<VecDeque<(u64, Callback)>, KernelTicketLock<P>>;

/// Faults a negative control can switch on.
#[derive(Default)]
pub struct RcuFaults {
    /// `synchronize` does not wait at all (zero-length grace periods).
    pub no_wait: FaultBool,
    /// A grace period counts a CPU's quiescent state reported for the previous grace period
    /// as one for itself: it ends slightly early, without waiting for readers that began
    /// after that report.
    pub early_end: FaultBool,
}

/// Counters, for results lines.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Grace periods completed.
    pub gps: u64,
    /// Shortest grace period, in platform ticks.
    pub gp_min_ticks: u64,
    /// Mean grace period, in platform ticks.
    pub gp_avg_ticks: u64,
    /// Longest grace period, in platform ticks.
    pub gp_max_ticks: u64,
    /// Callbacks queued and not run yet.
    pub pending: u64,
    /// Most callbacks ever queued at once.
    pub peak_pending: u64,
    /// Callbacks run.
    pub invoked: u64,
}

/// RCU for CPUs `0..nr_cpus`.
pub struct Rcu<P: Platform> {
    nesting: Box<[AtomicU32]>,
    /// Odd: in the kernel; even: idle or user mode. Starts odd.
    eqs: Box<[AtomicU64]>,
    /// Last grace period each CPU reported a quiescent state for.
    qs_gp: Box<[AtomicU64]>,
    gp_started: AtomicU64,
    /// CPU of the grace-period thread.
    gp_cpu: AtomicU32,
    gp_completed: AtomicU64,
    gp_requested: AtomicU64,
    /// CPUs the grace period in progress still waits for, the thread's own included until
    /// it ends (mirrored into the shared region's holdout bitmap).
    holdouts: AtomicCpuSet,
    /// CPUs whose context switch made them the last holdout (see `after_switch`).
    last_holdout_at_switch: Box<[AtomicBool]>,
    /// The grace period for which each CPU last gave back a turn the host lent it for one.
    gave_back: Box<[AtomicU64]>,
    /// CPUs taking part (set once they run the scheduler).
    online: AtomicCpuSet,
    started: AtomicBool,
    /// Per-CPU callback lists; the tick looks at them, so they are locked with interrupts
    /// off.
    cbs: Box<[CallbackList<P>]>,
    /// Callbacks in each CPU's list: the end of a grace period and the tick wake (or look
    /// at) only the callback threads that have work.
    queued: Box<[AtomicU64]>,
    pending: StatU64,
    peak_pending: StatU64,
    invoked: StatU64,
    gp_min: StatU64,
    gp_max: StatU64,
    gp_total: StatU64,
    /// After this long a grace period asks its holdouts for a quiescent state with an IPI.
    nudge_after_us: u64,
    /// Negative controls.
    pub faults: RcuFaults,
    _p: PhantomData<fn() -> P>,
}

fn per_cpu<T>(n: usize, f: impl Fn() -> T) -> Box<[T]> {
    (0..n).map(|_| f()).collect()
}

impl<P: Platform> Rcu<P> {
    /// RCU state for CPUs `0..nr_cpus`; a grace period nudges its holdouts with an IPI once
    /// it has waited `nudge_after_us` (a tick is a good choice).
    pub fn new(nr_cpus: usize, nudge_after_us: u64) -> Self {
        Rcu {
            nesting: per_cpu(nr_cpus, || AtomicU32::new(0)),
            eqs: per_cpu(nr_cpus, || AtomicU64::new(1)),
            qs_gp: per_cpu(nr_cpus, || AtomicU64::new(0)),
            gp_started: AtomicU64::new(0),
            gp_cpu: AtomicU32::new(0),
            gp_completed: AtomicU64::new(0),
            gp_requested: AtomicU64::new(0),
            holdouts: AtomicCpuSet::new(),
            last_holdout_at_switch: per_cpu(nr_cpus, || AtomicBool::new(false)),
            gave_back: per_cpu(nr_cpus, || AtomicU64::new(0)),
            online: AtomicCpuSet::new(),
            started: AtomicBool::new(false),
            cbs: per_cpu(nr_cpus, || SpinLock::kernel(VecDeque::new())),
            queued: per_cpu(nr_cpus, || AtomicU64::new(0)),
            pending: StatU64::new(0),
            peak_pending: StatU64::new(0),
            invoked: StatU64::new(0),
            gp_min: StatU64::new(u64::MAX),
            gp_max: StatU64::new(0),
            gp_total: StatU64::new(0),
            nudge_after_us,
            faults: RcuFaults::default(),
            _p: PhantomData,
        }
    }

    /// Makes the CPUs in `cpus` take part, with the grace-period thread on `gp_cpu`. Call
    /// it once, before the threads start waiting.
    pub fn start(&self, cpus: &CpuSet, gp_cpu: u32) {
        for c in cpus.iter() {
            assert!(
                (c as usize) < self.nesting.len(),
                "CPU {c} beyond RCU's {}",
                self.nesting.len()
            );
            self.online.insert(c);
        }
        self.gp_cpu.store(gp_cpu, SeqCst);
        self.started.store(true, SeqCst);
    }

    /// The CPUs taking part.
    pub fn online(&self) -> CpuSet {
        self.online.load()
    }

    fn me() -> usize {
        P::cpu().id() as usize
    }

    /// Enters a read-side critical section (nests).
    pub fn read_lock(&self) {
        P::preempt_disable();
        let me = P::cpu();
        let n = self.nesting[me.id() as usize].fetch_add(1, SeqCst) + 1;
        record::set_rcu_nesting(me, n);
    }

    /// Leaves a read-side critical section. Leaving the outermost one with preemption
    /// enabled is a quiescent state, reported at once: a grace period then waits for a
    /// reader only until its section ends, not until the next tick or context switch happens
    /// to land outside one. `preemptible_after` says whether the caller will be preemptible
    ///.
    pub fn read_unlock(&self) {
        let me = P::cpu();
        let c = me.id() as usize;
        let n = self.nesting[c].fetch_sub(1, SeqCst) - 1;
        record::set_rcu_nesting(me, n);
        P::preempt_enable();
        // Tasks never migrate, so this still runs on CPU `c`.
        if n == 0 && P::preemptible() {
            if self.report_qs(c) {
                self.last_holdout();
            }
            // A turn the host gave because the grace period waited on this CPU goes back now
            // that it no longer does (the thread's CPU holds it until the thread has run).
            // Once per grace period: a host that leaves the field set must not cost an exit
            // per read-side section.
            let started = self.gp_started.load(SeqCst);
            if record::boosted_for_grace_period(me)
                && c as u32 != self.gp_cpu.load(SeqCst)
                && self.qs_gp[c].load(SeqCst) >= started
                && self.gave_back[c].swap(started, SeqCst) != started
            {
                hypercall::yield_to::<P>(c as u32);
            }
        }
    }

    /// A reader guard: `let _g = rcu.read();`.
    pub fn read(&self) -> ReadGuard<'_, P> {
        self.read_lock();
        ReadGuard(self)
    }

    /// Whether the calling CPU is inside a read-side critical section.
    pub fn in_reader(&self) -> bool {
        self.nesting[Self::me()].load(SeqCst) != 0
    }

    /// Reports a quiescent state of CPU `c` for the grace period in progress. True if `c`
    /// was the last holdout (only the thread, which must now end the grace period, remains).
    fn report_qs(&self, c: usize) -> bool {
        let started = self.gp_started.load(SeqCst);
        if self.qs_gp[c].load(SeqCst) >= started {
            return false;
        }
        self.qs_gp[c].store(started, SeqCst);
        // Tell the host this CPU no longer holds the grace period up (a hint: the thread
        // recomputes the exact set whenever it looks). The thread's own CPU keeps its bit:
        // the grace period also waits for the thread to run and end it.
        let gp_cpu = self.gp_cpu.load(SeqCst);
        if c as u32 == gp_cpu {
            return false;
        }
        // A report for a grace period that is already over must not touch the set of the
        // next one (the thread may have found this CPU quiescent and ended it without this
        // report).
        if started == self.gp_completed.load(SeqCst) {
            return false;
        }
        let only_gp_left = self.holdouts.remove_leaving_only(c as u32, gp_cpu);
        region::rcu_holdouts().remove(c as u32);
        if self.gp_started.load(SeqCst) != started {
            // A new grace period began between the load above and the clear: this CPU has
            // not reported for it, so its bit goes back.
            self.holdouts.insert(c as u32);
            region::rcu_holdouts().insert(c as u32);
            return false;
        }
        only_gp_left && self.gp_started.load(SeqCst) > self.gp_completed.load(SeqCst)
    }

    /// The last holdout reported: only the thread's own CPU is left, whose thread must run
    /// to end the grace period. Tells the host (RcuWait: it may boost that vCPU if
    /// preempted) and wakes the thread.
    fn last_holdout(&self) {
        hypercall::rcu_wait::<P>(self.gp_seq() as u32);
        P::wake(Wake::GracePeriodThread);
    }

    /// Context switch: a quiescent state (readers cannot be switched out). Whatever runs
    /// next runs kernel code first, so an extended quiescent state (an interrupt in idle that
    /// switches to a task) ends here. May run under the scheduler's lock: the thread is woken
    /// in `after_switch`.
    pub fn note_context_switch(&self) {
        self.exit_idle();
        let c = Self::me();
        if self.report_qs(c) {
            self.last_holdout_at_switch[c].store(true, SeqCst);
        }
    }

    /// Right after a context switch, the scheduler's lock released.
    pub fn after_switch(&self) {
        if self.last_holdout_at_switch[Self::me()].swap(false, SeqCst) {
            self.last_holdout();
        }
    }

    /// Entering idle (or user mode): an extended quiescent state. The counter becomes even.
    pub fn enter_idle(&self) {
        let c = Self::me();
        if !self.eqs[c].load(SeqCst).is_multiple_of(2) {
            self.eqs[c].fetch_add(1, SeqCst);
        }
    }

    /// Leaving idle (or user mode): the counter becomes odd. Idempotent.
    pub fn exit_idle(&self) {
        let c = Self::me();
        if self.eqs[c].load(SeqCst).is_multiple_of(2) {
            self.eqs[c].fetch_add(1, SeqCst);
        }
    }

    /// From an interrupt that asks for a quiescent state (the IPI a grace period sends its
    /// holdouts): reports one if the interrupted code was outside any reader
    /// (`preemptible`: it could have been preempted).
    pub fn interrupt_qs(&self, preemptible: bool) {
        let c = Self::me();
        if preemptible
            && self.nesting[c].load(SeqCst) == 0
            && self.started.load(SeqCst)
            && self.report_qs(c)
        {
            self.last_holdout();
        }
    }

    /// From the tick: `preemptible` says whether the interrupted code could have been
    /// preempted (then it was not in a reader).
    pub fn tick(&self, preemptible: bool) {
        let c = Self::me();
        if preemptible && self.nesting[c].load(SeqCst) == 0 && self.report_qs(c) {
            // The thread is woken below anyway; the host hears of it now.
            self.tell_host_waiting();
        }
        // A grace period in progress (the thread rechecks its holdouts) or one requested by
        // call since the last tick.
        if self.started.load(SeqCst) && self.gp_wanted() {
            P::wake(Wake::GracePeriodThread);
        }
        if self.queued[c].load(SeqCst) != 0 && self.callbacks_ready(c as u32) {
            P::wake(Wake::Callbacks(c as u32));
        }
    }

    /// The header's `rcu_gp_seq`: `2 * completed`, plus one while a grace period runs.
    /// The grace period in progress now waits on the holdouts in the header: the host may
    /// boost the preempted ones (RcuWait).
    fn tell_host_waiting(&self) {
        let seq = self.gp_seq() as u32;
        if events::on() {
            let holdouts = region::rcu_holdouts().first_word();
            events::emit::<P>(EventKind::GpWait, seq, holdouts);
        }
        hypercall::rcu_wait::<P>(seq);
    }

    fn gp_seq(&self) -> u64 {
        let completed = self.gp_completed.load(SeqCst);
        2 * completed + (self.gp_started.load(SeqCst) > completed) as u64
    }

    fn publish_state(&self) {
        region::set_rcu_header(self.gp_seq(), self.pending.load(Relaxed));
    }

    /// Grace periods completed so far.
    pub fn completed(&self) -> u64 {
        self.gp_completed.load(SeqCst)
    }

    /// Whether a grace period is wanted that has not completed yet (the grace-period
    /// thread's wake-up condition).
    pub fn gp_wanted(&self) -> bool {
        self.gp_requested.load(SeqCst) > self.gp_completed.load(SeqCst)
    }

    /// Asks for a grace period that starts after this call; returns its number, which
    /// [`Rcu::completed`] reaches once every reader that started before the call has
    /// finished. `now`: a task waits for it (synchronize, barrier), so the thread is woken at
    /// once; otherwise (call) the next tick starts it, and callbacks queued meanwhile share
    /// it.
    pub fn request_gp(&self, now: bool) -> u64 {
        // Store buffering: the caller's earlier stores (unpublishing the old pointer) must be
        // in memory before `gp_started` is read, and x86 lets a load pass a store still in
        // the store buffer. Without this full fence (Linux has smp_mb() here) the caller can
        // read the counter just before a grace period starts and choose that one, while a
        // reader that reported its quiescent state for it still reads the old pointer: the
        // grace period ends without waiting for that reader.
        fence(SeqCst);
        let target = self.gp_started.load(SeqCst) + 1;
        // Wake the thread only for a request that raises the target while no grace period
        // runs: a thread inside one starts the next by itself when it ends (it reads the
        // requests after publishing the end, and we read the end after raising the request).
        if self.gp_requested.fetch_max(target, SeqCst) < target
            && now
            && self.gp_started.load(SeqCst) == self.gp_completed.load(SeqCst)
        {
            P::wake(Wake::GracePeriodThread);
        }
        target
    }

    /// What `synchronize` waits for: the grace period to wait on, or None when the
    /// `no_wait` fault is on. Must not be called inside a reader.
    pub fn synchronize_target(&self) -> Option<u64> {
        assert!(
            !self.in_reader(),
            "synchronize_rcu inside a read-side critical section"
        );
        if self.faults.no_wait.load(Relaxed) {
            return None;
        }
        Some(self.request_gp(true))
    }

    /// Counters, for results lines.
    pub fn stats(&self) -> Stats {
        let gps = self.gp_completed.load(SeqCst);
        Stats {
            gps,
            gp_min_ticks: if gps == 0 {
                0
            } else {
                self.gp_min.load(Relaxed)
            },
            gp_avg_ticks: self.gp_total.load(Relaxed).checked_div(gps).unwrap_or(0),
            gp_max_ticks: self.gp_max.load(Relaxed),
            pending: self.pending.load(Relaxed),
            peak_pending: self.peak_pending.load(Relaxed),
            invoked: self.invoked.load(Relaxed),
        }
    }
}

/// A read-side critical section, left when dropped.
pub struct ReadGuard<'a, P: Platform>(&'a Rcu<P>);

impl<P: Platform> Drop for ReadGuard<'_, P> {
    fn drop(&mut self) {
        self.0.read_unlock();
    }
}
