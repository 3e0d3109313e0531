//! The kernel's RCU: the synchronization crate's core (`pvsync_guest::rcu`) for this
//! kernel's CPUs, with the threads that drive it (a grace-period thread on the first CPU,
//! a callback thread per CPU) and the wait queues they and the updaters sleep on.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering::Relaxed, Ordering::SeqCst};
use pvsync_guest::rcu::{Rcu, ReadGuard};
use pvsync_guest::{CpuSet, Wake};
use spin::Once;

pub use pvsync_guest::rcu::Stats;

use crate::arch::tsc;
use crate::locks::{KernelLock, SpinLock};
use crate::platform::{self, Kernel};
use crate::sched::{self, WaitQueue};

struct State {
    rcu: Rcu<Kernel>,
    /// The grace-period thread waits here; it is woken to the head of its run queue, since
    /// every updater waits on it.
    gp_thread: WaitQueue,
    gp_done: WaitQueue,
    callbacks: Box<[WaitQueue]>,
}

static STATE: Once<State> = Once::new();

/// The grace-period thread's own account of the grace periods it ran, in TSC cycles: how
/// long each took from its start to its end, and how long the thread ran to drive it (the
/// start, every look at the holdouts, the end; not the time it slept in between), so that a
/// workload can report CPU time per grace period. `min`/`max` cover the grace periods since
/// the last [`reset_gp_extremes`]; the sums run from boot.
#[derive(Clone, Copy, Debug, Default)]
pub struct GpAccount {
    pub gps: u64,
    pub total_cycles: u64,
    pub busy_cycles: u64,
    pub min_cycles: u64,
    pub max_cycles: u64,
}

/// Taken once per grace period by its thread, and by a workload at its start and its end.
static GP_ACCOUNT: KernelLock<GpAccount> = SpinLock::kernel(GpAccount {
    gps: 0,
    total_cycles: 0,
    busy_cycles: 0,
    min_cycles: u64::MAX,
    max_cycles: 0,
});

/// The account so far (`min_cycles` is 0 while no grace period ended since the reset).
pub fn gp_account() -> GpAccount {
    let mut a = *GP_ACCOUNT.lock_irqsave();
    if a.min_cycles == u64::MAX {
        a.min_cycles = 0;
    }
    a
}

/// Starts a new window for `min_cycles`/`max_cycles`; returns the account at that moment.
pub fn reset_gp_extremes() -> GpAccount {
    let mut a = GP_ACCOUNT.lock_irqsave();
    a.min_cycles = u64::MAX;
    a.max_cycles = 0;
    *a
}

/// Runs `f`, adding the TSC cycles it took to `busy`.
fn timed<R>(busy: &mut u64, f: impl FnOnce() -> R) -> R {
    let t0 = tsc::now();
    let r = f();
    *busy += tsc::now().wrapping_sub(t0);
    r
}

/// Sets RCU up for CPUs `0..nr_cpus`. Negative controls: `no_wait` makes `synchronize`
/// return at once; `early_end` ends grace periods slightly early.
pub fn init(nr_cpus: usize, no_wait: bool, early_end: bool) {
    let s = STATE.call_once(|| State {
        rcu: Rcu::new(nr_cpus, crate::irq::TICK_US),
        gp_thread: WaitQueue::new(),
        gp_done: WaitQueue::new(),
        callbacks: (0..nr_cpus).map(|_| WaitQueue::new()).collect(),
    });
    s.rcu.faults.no_wait.store(no_wait, Relaxed);
    s.rcu.faults.early_end.store(early_end, Relaxed);
    platform::set_waker(wake);
}

fn state() -> &'static State {
    STATE.get().expect("RCU used before rcu::init")
}

fn rcu() -> &'static Rcu<Kernel> {
    &state().rcu
}

fn wake(who: Wake) {
    let s = state();
    match who {
        Wake::GracePeriodThread => s.gp_thread.wake_all_first(),
        Wake::GracePeriodWaiters => s.gp_done.wake_all(),
        Wake::Callbacks(c) => {
            if let Some(wq) = s.callbacks.get(c as usize) {
                wq.wake_all();
            }
        }
    }
}

/// A reader guard: `let _g = rcu::read();`.
pub fn read() -> ReadGuard<'static, Kernel> {
    rcu().read()
}

/// Context switch (under the run-queue lock): a quiescent state.
pub fn note_context_switch() {
    if let Some(s) = STATE.get() {
        s.rcu.note_context_switch();
    }
}

/// Right after a context switch, the run-queue lock released.
pub fn after_switch() {
    if let Some(s) = STATE.get() {
        s.rcu.after_switch();
    }
}

/// Entering idle (or user mode): an extended quiescent state.
pub fn enter_idle() {
    if let Some(s) = STATE.get() {
        s.rcu.enter_idle();
    }
}

/// Leaving idle (or user mode).
pub fn exit_idle() {
    if let Some(s) = STATE.get() {
        s.rcu.exit_idle();
    }
}

/// From the IPI a grace period sends its holdouts.
pub fn interrupt_qs(preemptible: bool) {
    if let Some(s) = STATE.get() {
        s.rcu.interrupt_qs(preemptible);
    }
}

/// From the tick.
pub fn tick(preemptible: bool) {
    if let Some(s) = STATE.get() {
        s.rcu.tick(preemptible);
    }
}

/// Waits until every reader that started before the call has finished.
pub fn synchronize() {
    let s = state();
    if let Some(target) = s.rcu.synchronize_target() {
        s.gp_done.wait_until(|| s.rcu.completed() >= target);
    }
}

/// Runs `f` after a grace period, on this CPU, outside any reader.
pub fn call(f: impl FnOnce() + Send + 'static) {
    rcu().call(Box::new(f));
}

/// Waits until every callback queued before the call has run.
pub fn barrier() {
    let s = state();
    let cpus = s.rcu.online();
    let remaining = Arc::new(AtomicU32::new(cpus.len() as u32));
    let wq = Arc::new(WaitQueue::new());
    let target = s.rcu.request_gp(true);
    for c in cpus.iter() {
        let (r, w) = (remaining.clone(), wq.clone());
        s.rcu.post(
            c,
            target,
            Box::new(move || {
                r.fetch_sub(1, SeqCst);
                w.wake_all();
            }),
        );
        s.callbacks[c as usize].wake_all();
    }
    wq.wait_until(|| remaining.load(SeqCst) == 0);
}

/// Per-CPU thread: invokes callbacks whose grace period has completed, in order.
fn callback_thread(c: u32) {
    let s = state();
    loop {
        s.callbacks[c as usize].wait_until(|| s.rcu.callbacks_ready(c));
        s.rcu.run_callbacks(c);
    }
}

/// The grace-period thread.
fn gp_thread() {
    let s = state();
    loop {
        s.gp_thread.wait_until(|| s.rcu.gp_wanted());
        let start = tsc::now();
        let mut busy = 0;
        let mut gp = timed(&mut busy, || s.rcu.gp_begin());
        s.gp_thread
            .wait_until(|| timed(&mut busy, || s.rcu.gp_poll(&mut gp)));
        timed(&mut busy, || s.rcu.gp_end(gp));
        let took = tsc::now().wrapping_sub(start);
        let mut a = GP_ACCOUNT.lock_irqsave();
        a.gps += 1;
        a.total_cycles += took;
        a.busy_cycles += busy;
        a.min_cycles = a.min_cycles.min(took);
        a.max_cycles = a.max_cycles.max(took);
    }
}

/// Starts RCU for the CPUs in `cpus` (all online, scheduler running).
/// Returns once every RCU thread is up, waiting, and switched away from, so that a CPU's
/// published state after boot is its idle state, not a thread's first steps.
pub fn start(cpus: &[u32]) {
    let s = state();
    s.rcu
        .start(&cpus.iter().copied().collect::<CpuSet>(), cpus[0]);
    let mut threads = Vec::new();
    for &c in cpus {
        threads.push(sched::spawn(c, "rcu_cb", move || callback_thread(c)));
    }
    threads.push(sched::spawn(cpus[0], "rcu_gp", gp_thread));
    while threads
        .iter()
        .any(|t| t.state() != sched::State::Blocked || sched::is_running(t))
    {
        sched::yield_now();
        core::hint::spin_loop();
    }
}

/// Counters, for results lines (grace-period lengths in TSC cycles).
pub fn stats() -> Stats {
    rcu().stats()
}
