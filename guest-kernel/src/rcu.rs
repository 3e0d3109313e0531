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
        let mut gp = s.rcu.gp_begin();
        s.gp_thread.wait_until(|| s.rcu.gp_poll(&mut gp));
        s.rcu.gp_end(gp);
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
