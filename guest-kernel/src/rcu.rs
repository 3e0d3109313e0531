//! Read-copy-update, non-preemptible flavour: a reader disables preemption, so any point
//! where a CPU is preemptible (context switch, a tick that interrupted preemptible code) is
//! a quiescent state, as are idle and user mode ("extended" quiescent states, tracked with a
//! per-CPU counter that is even while the CPU is in one).
//!
//! A grace-period kthread on CPU 0 runs grace periods on demand: it snapshots every CPU's
//! counter, then waits until each CPU was quiescent at the start, has left or entered an
//! extended quiescent state since, or reported a quiescent state for this grace period.
//! Callbacks queue per CPU and run in a per-CPU kthread, never inside a reader.
//!
//! A vCPU the host preempts inside a reader stalls grace periods: the reader's nesting stays
//! visible in the shared region (`rcu_nesting`), and the header carries the grace-period
//! sequence, the holdouts and the callback backlog, so the host can see both sides of the
//! problem. Two RcuWait hypercalls per grace period at most ask the host to act at once:
//! the kthread's when it starts waiting on holdouts, and the last holdout's when only the
//! kthread's own CPU is left (its vCPU must run to end the grace period).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use shared_abi::MAX_VCPUS;

use crate::arch::tsc;
use crate::locks::{KernelLock, SpinLock};
use crate::sched::{self, WaitQueue};
use crate::{percpu, shared};

type Callback = Box<dyn FnOnce() + Send>;

static NESTING: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];
/// Odd: in the kernel; even: idle or user mode. Starts odd.
static EQS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(1) }; MAX_VCPUS];
/// Last grace period each CPU reported a quiescent state for.
static QS_GP: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];

static GP_STARTED: AtomicU64 = AtomicU64::new(0);
/// CPU of the grace-period kthread.
static GP_CPU: AtomicU64 = AtomicU64::new(0);
static GP_COMPLETED: AtomicU64 = AtomicU64::new(0);
static GP_REQUESTED: AtomicU64 = AtomicU64::new(0);
/// The grace-period kthread waits here; it is woken to the head of its run queue, since
/// every updater waits on it.
static GP_KTHREAD_WQ: WaitQueue = WaitQueue::new();
static GP_DONE_WQ: WaitQueue = WaitQueue::new();

/// Per-CPU callback lists; the tick looks at them, so they are locked with interrupts off.
static CBS: [KernelLock<VecDeque<(u64, Callback)>>; MAX_VCPUS] =
    [const { SpinLock::kernel(VecDeque::new()) }; MAX_VCPUS];
static CB_WQ: [WaitQueue; MAX_VCPUS] = [const { WaitQueue::new() }; MAX_VCPUS];
/// Callbacks in each CPU's list: the end of a grace period and the tick wake (or look at)
/// only the callback kthreads that have work.
static QUEUED: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static PENDING: AtomicU64 = AtomicU64::new(0);
static PEAK_PENDING: AtomicU64 = AtomicU64::new(0);
static INVOKED: AtomicU64 = AtomicU64::new(0);

static GP_MIN: AtomicU64 = AtomicU64::new(u64::MAX);
static GP_MAX: AtomicU64 = AtomicU64::new(0);
static GP_TOTAL: AtomicU64 = AtomicU64::new(0);

/// CPUs taking part (set once they run the scheduler).
static ONLINE: AtomicU64 = AtomicU64::new(0);
static STARTED: AtomicBool = AtomicBool::new(false);
/// Negative control: synchronize_rcu returns without waiting (`rcu=broken`).
static BROKEN: AtomicBool = AtomicBool::new(false);

pub fn set_broken(b: bool) {
    BROKEN.store(b, SeqCst);
}

fn cpu() -> usize {
    percpu::id() as usize
}

/// Enters a read-side critical section (nests).
pub fn read_lock() {
    let me = percpu::this();
    me.preempt_disable();
    let n = NESTING[me.id() as usize].fetch_add(1, SeqCst) + 1;
    shared::set_rcu_nesting(me, n);
}

/// Leaves a read-side critical section. Leaving the outermost one with preemption enabled
/// is a quiescent state, reported at once: a grace period then waits for a reader only until
/// its section ends, not until the next tick or context switch happens to land outside one
/// (which, for a CPU that is almost always reading, can take many ticks).
pub fn read_unlock() {
    let me = percpu::this();
    let c = me.id() as usize;
    let n = NESTING[c].fetch_sub(1, SeqCst) - 1;
    shared::set_rcu_nesting(me, n);
    me.preempt_enable();
    // Tasks never migrate, so this still runs on CPU `c`. Task context with nothing held:
    // the kthread may be woken from here (the last holdout ends the wait at once).
    if n == 0 && percpu::preempt_count() == 0 {
        if report_qs(c) {
            last_holdout();
        }
        // A turn the host gave because the grace period waited on this CPU goes back now
        // that it no longer does (the kthread's CPU holds it until the kthread has run).
        if shared::boosted_for_grace_period(me)
            && c as u64 != GP_CPU.load(SeqCst)
            && QS_GP[c].load(SeqCst) >= GP_STARTED.load(SeqCst)
        {
            shared::yield_to(c as u32);
        }
    }
}

/// A reader guard: `let _g = rcu::read();`.
pub struct ReadGuard(());

pub fn read() -> ReadGuard {
    read_lock();
    ReadGuard(())
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        read_unlock();
    }
}

/// Reports a quiescent state of CPU `c` for the grace period in progress. True if `c` was
/// the last holdout (only the kthread, which must now end the grace period, remains).
fn report_qs(c: usize) -> bool {
    let started = GP_STARTED.load(SeqCst);
    if QS_GP[c].load(SeqCst) >= started {
        return false;
    }
    QS_GP[c].store(started, SeqCst);
    // Tell the host this CPU no longer holds the grace period up (a hint: the kthread
    // recomputes the exact set whenever it looks). The kthread's own CPU keeps its bit: the
    // grace period also waits for the kthread to run and end it.
    let gp_cpu = GP_CPU.load(SeqCst);
    if c as u64 == gp_cpu {
        return false;
    }
    // A report for a grace period that is already over must not touch the mask of the next
    // one (the kthread may have found this CPU quiescent and ended it without this report).
    if started == GP_COMPLETED.load(SeqCst) {
        return false;
    }
    let left = shared::rcu_holdouts().fetch_and(!(1 << c), SeqCst) & !(1 << c);
    if GP_STARTED.load(SeqCst) != started {
        // A new grace period began between the load above and the clear: this CPU has not
        // reported for it, so its bit goes back.
        shared::rcu_holdouts().fetch_or(1 << c, SeqCst);
        return false;
    }
    left == 1 << gp_cpu && GP_STARTED.load(SeqCst) > GP_COMPLETED.load(SeqCst)
}

/// The last holdout reported: only the kthread's own CPU is left, whose kthread must run to
/// end the grace period. Tells the host (RcuWait: it may boost that vCPU if preempted) and
/// wakes the kthread.
fn last_holdout() {
    shared::rcu_wait(gp_seq() as u32);
    GP_KTHREAD_WQ.wake_all_first();
}

/// CPUs whose context switch made them the last holdout (see `after_switch`).
static LAST_HOLDOUT_AT_SWITCH: [AtomicBool; MAX_VCPUS] =
    [const { AtomicBool::new(false) }; MAX_VCPUS];

/// Context switch: a quiescent state (readers cannot be switched out). Whatever runs next
/// runs kernel code first, so an extended quiescent state (an interrupt in idle that
/// switches to a task) ends here. Runs under the run-queue lock, so the kthread is woken
/// after the switch (`after_switch`).
pub fn note_context_switch() {
    exit_idle();
    let c = cpu();
    if report_qs(c) {
        LAST_HOLDOUT_AT_SWITCH[c].store(true, SeqCst);
    }
}

/// Right after a context switch, the run-queue lock released (interrupts off).
pub fn after_switch() {
    if LAST_HOLDOUT_AT_SWITCH[cpu()].swap(false, SeqCst) {
        last_holdout();
    }
}

/// Entering idle (or user mode): an extended quiescent state. The counter becomes even.
pub fn enter_idle() {
    let c = cpu();
    if !EQS[c].load(SeqCst).is_multiple_of(2) {
        EQS[c].fetch_add(1, SeqCst);
    }
}

/// Leaving idle (or user mode): the counter becomes odd. Idempotent.
pub fn exit_idle() {
    let c = cpu();
    if EQS[c].load(SeqCst).is_multiple_of(2) {
        EQS[c].fetch_add(1, SeqCst);
    }
}

/// From an interrupt that asks for a quiescent state (the reschedule IPI a grace period
/// sends its holdouts): reports one if the interrupted code was outside any reader.
pub fn interrupt_qs(preemptible: bool) {
    let c = cpu();
    if preemptible && NESTING[c].load(SeqCst) == 0 && STARTED.load(SeqCst) && report_qs(c) {
        last_holdout();
    }
}

/// From the tick: `preemptible` says whether the interrupted code could have been preempted
/// (then it was not in a reader).
pub fn tick(preemptible: bool) {
    let c = cpu();
    if preemptible && NESTING[c].load(SeqCst) == 0 && report_qs(c) {
        // The kthread is woken below anyway; the host hears of it now.
        shared::rcu_wait(gp_seq() as u32);
    }
    // A grace period in progress (the kthread rechecks its holdouts) or one requested by
    // call_rcu since the last tick.
    if STARTED.load(SeqCst) && GP_REQUESTED.load(SeqCst) > GP_COMPLETED.load(SeqCst) {
        GP_KTHREAD_WQ.wake_all_first();
    }
    if c < MAX_VCPUS && QUEUED[c].load(SeqCst) != 0 && callbacks_ready(c) {
        CB_WQ[c].wake_all();
    }
}

/// The header's `rcu_gp_seq`: `2 * completed`, plus one while a grace period runs.
fn gp_seq() -> u64 {
    let completed = GP_COMPLETED.load(SeqCst);
    2 * completed + (GP_STARTED.load(SeqCst) > completed) as u64
}

fn publish_state() {
    shared::set_rcu_header(gp_seq(), PENDING.load(SeqCst));
}

/// Asks for a grace period that starts after this call; returns its number. `now`: a task
/// waits for it (synchronize, barrier), so the kthread is woken at once; otherwise
/// (call_rcu) the next tick starts it, and callbacks queued meanwhile share it.
fn request_gp(now: bool) -> u64 {
    // Store buffering: the caller's earlier stores (unpublishing the old pointer) must be in
    // memory before GP_STARTED is read, and x86 lets a load pass a store still in the store
    // buffer. Without this mfence (Linux has smp_mb() here) the caller can read the counter
    // just before a grace period starts and choose that one, while a reader that reported
    // its quiescent state for it still reads the old pointer from memory: the grace period
    // ends without waiting for that reader, and the element is freed under it. The kthread
    // and the readers order their side with SeqCst read-modify-writes and stores (locked
    // instructions). `rcu_model.rs` explores this handshake under x86-TSO and finds that
    // interleaving without the fence (test=rcu-model).
    fence(SeqCst);
    let target = GP_STARTED.load(SeqCst) + 1;
    // Wake the kthread (which then runs at once if it shares this CPU) only for a request
    // that raises the target while no grace period runs: a kthread inside one starts the
    // next by itself when it ends (it reads the requests after publishing the end, and we
    // read the end after raising the request).
    if GP_REQUESTED.fetch_max(target, SeqCst) < target
        && now
        && GP_STARTED.load(SeqCst) == GP_COMPLETED.load(SeqCst)
    {
        GP_KTHREAD_WQ.wake_all_first();
    }
    target
}

/// Waits until every reader that started before the call has finished.
pub fn synchronize() {
    assert!(
        NESTING[cpu()].load(SeqCst) == 0,
        "synchronize_rcu inside a read-side critical section"
    );
    if BROKEN.load(SeqCst) {
        return;
    }
    let target = request_gp(true);
    GP_DONE_WQ.wait_until(|| GP_COMPLETED.load(SeqCst) >= target);
}

fn post(c: usize, target: u64, f: Callback) {
    // Counted before it is queued: once queued, the callback kthread may run and uncount it
    // at once (its grace period can already be over), and the count must never go below 0.
    let p = PENDING.fetch_add(1, SeqCst) + 1;
    PEAK_PENDING.fetch_max(p, SeqCst);
    CBS[c].lock_irqsave().push_back((target, f));
    QUEUED[c].fetch_add(1, SeqCst);
    // The grace period may have ended since request_gp, its kthread finding nothing queued
    // here: then this is the wake-up (both sides count before they look; SeqCst).
    if GP_COMPLETED.load(SeqCst) >= target {
        CB_WQ[c].wake_all();
    }
    publish_state();
}

/// Runs `f` after a grace period, on this CPU, outside any reader.
pub fn call(f: impl FnOnce() + Send + 'static) {
    let target = request_gp(false);
    post(cpu(), target, Box::new(f));
}

/// Waits until every callback queued before the call has run.
pub fn barrier() {
    let cpus = ONLINE.load(SeqCst);
    let remaining = Arc::new(AtomicU32::new(cpus.count_ones()));
    let wq = Arc::new(WaitQueue::new());
    let target = request_gp(true);
    for c in (0..MAX_VCPUS).filter(|c| cpus & (1 << c) != 0) {
        let (r, w) = (remaining.clone(), wq.clone());
        post(
            c,
            target,
            Box::new(move || {
                r.fetch_sub(1, SeqCst);
                w.wake_all();
            }),
        );
        CB_WQ[c].wake_all();
    }
    wq.wait_until(|| remaining.load(SeqCst) == 0);
}

fn callbacks_ready(c: usize) -> bool {
    let done = GP_COMPLETED.load(SeqCst);
    CBS[c]
        .lock_irqsave()
        .front()
        .is_some_and(|(t, _)| *t <= done)
}

/// Per-CPU kthread: invokes callbacks whose grace period has completed, in order.
fn callback_thread(c: usize) {
    loop {
        CB_WQ[c].wait_until(|| callbacks_ready(c));
        let done = GP_COMPLETED.load(SeqCst);
        loop {
            let cb = {
                let mut q = CBS[c].lock_irqsave();
                if q.front().is_some_and(|(t, _)| *t <= done) {
                    q.pop_front().map(|(_, f)| f)
                } else {
                    None
                }
            };
            let Some(f) = cb else { break };
            QUEUED[c].fetch_sub(1, SeqCst);
            // Uncount before running: a barrier's callback wakes its waiter, which must then
            // see no callback of its own still counted.
            PENDING.fetch_sub(1, SeqCst);
            INVOKED.fetch_add(1, SeqCst);
            f();
        }
        publish_state();
    }
}

/// CPUs grace period `n` still waits for (bit per CPU).
fn holdouts(n: u64, snap: &[u64; MAX_VCPUS]) -> u64 {
    let cpus = ONLINE.load(SeqCst);
    (0..MAX_VCPUS)
        .filter(|&c| cpus & (1 << c) != 0)
        .filter(|&c| {
            !(snap[c].is_multiple_of(2)
                || EQS[c].load(SeqCst) != snap[c]
                || QS_GP[c].load(SeqCst) >= n)
        })
        .fold(0, |m, c| m | 1 << c)
}

/// After this long a grace period asks its holdouts for a quiescent state with a reschedule
/// IPI (Linux's RCU does the same with resched_cpu), instead of waiting for their ticks.
const NUDGE_AFTER_US: u64 = crate::irq::TICK_US;

/// The grace-period kthread.
fn gp_thread() {
    loop {
        GP_KTHREAD_WQ.wait_until(|| GP_REQUESTED.load(SeqCst) > GP_COMPLETED.load(SeqCst));
        let n = GP_COMPLETED.load(SeqCst) + 1;
        let start = tsc::now();
        let me = 1u64 << cpu();
        // The mask only shrinks while the grace period runs: every CPU first, then each bit is
        // cleared (atomic AND) by the CPU that reports or by this kthread when it finds the
        // CPU quiescent; it is never written whole, so a report is never undone and the host
        // never sees an empty mask with an odd sequence.
        shared::rcu_holdouts().store(ONLINE.load(SeqCst) | me, SeqCst);
        GP_STARTED.store(n, SeqCst);
        publish_state();
        let mut snap = [0u64; MAX_VCPUS];
        for (c, s) in snap.iter_mut().enumerate() {
            *s = EQS[c].load(SeqCst);
        }
        // This kthread is itself preemptible here: a quiescent state for its own CPU.
        report_qs(cpu());
        let nudge_at = start + tsc::us_to_cycles(NUDGE_AFTER_US);
        let mut nudged = false;
        let first = holdouts(n, &snap);
        shared::rcu_holdouts().fetch_and(first | me, SeqCst);
        if first != 0 {
            // One exit per grace period that has to wait: the host can run the preempted
            // holdouts (named in the header, with the sequence published above) at once.
            shared::rcu_wait(gp_seq() as u32);
        }
        GP_KTHREAD_WQ.wait_until(|| {
            let h = holdouts(n, &snap);
            // Published: the holdouts, and this kthread's CPU until the grace period ends.
            shared::rcu_holdouts().fetch_and(h | me, SeqCst);
            if h != 0 && !nudged && tsc::now() > nudge_at {
                nudged = true;
                for c in (0..MAX_VCPUS as u32).filter(|c| h & (1 << c) != 0) {
                    crate::arch::apic::send_ipi(c, crate::arch::vectors::RESCHEDULE);
                }
            }
            h == 0
        });
        let took = tsc::now() - start;
        GP_COMPLETED.store(n, SeqCst);
        GP_MIN.fetch_min(took, SeqCst);
        GP_MAX.fetch_max(took, SeqCst);
        GP_TOTAL.fetch_add(took, SeqCst);
        publish_state();
        // Cleared only once the even sequence is out.
        shared::rcu_holdouts().store(0, SeqCst);
        GP_DONE_WQ.wake_all();
        let cpus = ONLINE.load(SeqCst);
        for c in (0..MAX_VCPUS).filter(|c| cpus & (1 << c) != 0) {
            if QUEUED[c].load(SeqCst) != 0 {
                CB_WQ[c].wake_all();
            }
        }
    }
}

/// Starts RCU for the CPUs in `cpus` (all online, scheduler running).
/// Returns once every RCU kthread is up, waiting, and switched away from, so that a CPU's
/// published state after boot is its idle state, not a kthread's first steps.
pub fn start(cpus: &[u32]) {
    let mut threads = alloc::vec::Vec::new();
    for &c in cpus {
        ONLINE.fetch_or(1 << c, SeqCst);
        threads.push(sched::spawn(c, "rcu_cb", move || {
            callback_thread(c as usize)
        }));
    }
    GP_CPU.store(cpus[0] as u64, SeqCst);
    threads.push(sched::spawn(cpus[0], "rcu_gp", gp_thread));
    STARTED.store(true, SeqCst);
    while threads
        .iter()
        .any(|t| t.state() != sched::State::Blocked || sched::is_running(t))
    {
        sched::yield_now();
        core::hint::spin_loop();
    }
}

/// Counters, for results lines.
pub struct Stats {
    pub gps: u64,
    pub gp_min_cycles: u64,
    pub gp_avg_cycles: u64,
    pub gp_max_cycles: u64,
    pub pending: u64,
    pub peak_pending: u64,
    pub invoked: u64,
}

pub fn stats() -> Stats {
    let gps = GP_COMPLETED.load(SeqCst);
    Stats {
        gps,
        gp_min_cycles: if gps == 0 { 0 } else { GP_MIN.load(SeqCst) },
        gp_avg_cycles: GP_TOTAL.load(SeqCst).checked_div(gps).unwrap_or(0),
        gp_max_cycles: GP_MAX.load(SeqCst),
        pending: PENDING.load(SeqCst),
        peak_pending: PEAK_PENDING.load(SeqCst),
        invoked: INVOKED.load(SeqCst),
    }
}
