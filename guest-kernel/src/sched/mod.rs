//! A preemptive per-CPU scheduler: tasks are pinned to a CPU, each CPU round-robins its run
//! queue, the tick preempts a task whose slice is used up, and an idle task halts when
//! nothing is ready.
//!
//! The layers below reach the scheduler only through the hooks [`install_hooks`] installs:
//! the preemption point of `preempt_enable` (`preempt`), the interrupt return path
//! (`arch::idt`) and the tick (`irq`).
//!
//! RCU sits above the scheduler (its threads run on it, its waiters sleep in its wait
//! queues). The scheduler tells it about quiescent states through the hooks of
//! [`set_quiescent_hooks`] (installed by `main` for `rcu`): a context switch, the end of
//! one, entering and leaving idle, the tick. Default (nothing installed): nothing.

pub mod task;
mod wait;

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use pvsync_guest::NR_CPUS;
use shared_abi::VcpuMode;
use x86_64::instructions::interrupts;

pub use task::{State, Task};
pub use wait::WaitQueue;

use crate::arch::hook::Hook;
use crate::arch::{apic, context, idt, vectors};
use crate::locks::{KernelLock, SpinLock};
use crate::preempt::{clear_need_resched, need_resched, set_need_resched};
use crate::{irq, percpu, preempt};

/// Ticks a task may run before it is preempted in favour of another ready task.
pub const SLICE_TICKS: u64 = 2;

struct RunQueue {
    current: Option<Arc<Task>>,
    idle: Option<Arc<Task>>,
    ready: VecDeque<Arc<Task>>,
    /// The task switched away from, kept alive until the switch is over (it may be dead).
    prev: Option<Arc<Task>>,
}

impl RunQueue {
    const fn new() -> Self {
        RunQueue {
            current: None,
            idle: None,
            ready: VecDeque::new(),
            prev: None,
        }
    }
}

/// Taken with interrupts off everywhere: the tick and wake-ups from interrupt handlers use
/// it.
static RQ: [KernelLock<RunQueue>; NR_CPUS] = [const { SpinLock::kernel(RunQueue::new()) }; NR_CPUS];
/// A task was woken on this CPU from this CPU: the next tick switches to it.
static WOKEN_LOCALLY: [AtomicBool; NR_CPUS] = [const { AtomicBool::new(false) }; NR_CPUS];
static SWITCHES: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];

/// Hooks the scheduler into the layers below (once, on the BSP, before any CPU enables
/// interrupts): preemption points and the interrupt return path switch tasks when a
/// reschedule is due; the tick charges the running task.
pub fn install_hooks() {
    preempt::set_hook(preempt_on_interrupt_return);
    idt::set_interrupt_return_hook(preempt_on_interrupt_return);
    irq::set_tick_hook(on_tick);
}

/// What the scheduler reports to the quiescent-state tracker above it (RCU).
pub struct QuiescentHooks {
    /// A context switch, under the run-queue lock (interrupts off).
    pub context_switch: fn(),
    /// Right after a context switch, the run-queue lock released (interrupts off).
    pub after_switch: fn(),
    /// The idle task is about to halt (interrupts off).
    pub enter_idle: fn(),
    /// The idle task woke up (interrupts off).
    pub exit_idle: fn(),
    /// Every tick, before the scheduler's own accounting, with whether the interrupted code
    /// was preemptible (interrupts off).
    pub tick: fn(bool),
}

static QS_CONTEXT_SWITCH: Hook<fn()> = Hook::new();
static QS_AFTER_SWITCH: Hook<fn()> = Hook::new();
static QS_ENTER_IDLE: Hook<fn()> = Hook::new();
static QS_EXIT_IDLE: Hook<fn()> = Hook::new();
static QS_TICK: Hook<fn(bool)> = Hook::new();

/// Installs the quiescent-state hooks (once, on the BSP, before any CPU schedules).
pub fn set_quiescent_hooks(h: QuiescentHooks) {
    QS_CONTEXT_SWITCH.set(h.context_switch);
    QS_AFTER_SWITCH.set(h.after_switch);
    QS_ENTER_IDLE.set(h.enter_idle);
    QS_EXIT_IDLE.set(h.exit_idle);
    QS_TICK.set(h.tick);
}

#[inline]
fn qs(hook: &Hook<fn()>) {
    if let Some(f) = hook.get() {
        f();
    }
}

/// The tick (interrupts off). The quiescent-state hook first: a callback kthread RCU wakes
/// there is switched to on this tick's return (`tick` sees it).
fn on_tick(preemptible: bool) {
    if let Some(f) = QS_TICK.get() {
        f(preemptible);
    }
    tick();
}

/// The CPU whose tick never stops (the boot CPU): it keeps time-driven work going, such as
/// starting a grace period that `call_rcu` asked for or rechecking the holdouts of one in
/// progress, when every other CPU idles without a tick.
static TIMEKEEPER: AtomicU32 = AtomicU32::new(u32::MAX);
/// This CPU's idle task stopped its tick; the switch to a task restarts it (`switch_in`:
/// from the idle loop, or from the return of the interrupt that woke the CPU).
static TICK_STOPPED: [AtomicBool; NR_CPUS] = [const { AtomicBool::new(false) }; NR_CPUS];

/// Makes the calling context this CPU's first task. `is_idle`: the context will run
/// `idle_loop` (APs); otherwise (the boot CPU, which becomes the timekeeper) an idle task is
/// created for the CPU.
pub fn init_this_cpu(name: &'static str, is_idle: bool) {
    let cpu = percpu::id();
    if !is_idle {
        TIMEKEEPER.store(cpu, Ordering::Relaxed);
    }
    let me = Task::adopt_current(name, cpu, is_idle);
    let idle = if is_idle {
        me.clone()
    } else {
        let t = Task::new(
            "idle",
            cpu,
            alloc::boxed::Box::new(|| idle_loop()),
            None,
            true,
        );
        t.set_state(State::Ready);
        t
    };
    set_first_task(me, idle);
}

/// An AP's start: `idle` (this CPU's task from [`Task::adopt_current`] with `is_idle`,
/// made beforehand by the boot CPU, so that APs coming up together take no heap lock)
/// becomes the calling context, which will run `idle_loop`.
pub fn init_this_cpu_idle(idle: Arc<Task>) {
    assert!(
        idle.is_idle && idle.cpu == percpu::id(),
        "another CPU's idle task"
    );
    set_first_task(idle.clone(), idle);
}

fn set_first_task(me: Arc<Task>, idle: Arc<Task>) {
    let mut rq = RQ[me.cpu as usize].lock_irqsave();
    rq.current = Some(me);
    rq.idle = Some(idle);
}

/// The task running on this CPU.
pub fn current() -> Arc<Task> {
    RQ[percpu::id() as usize]
        .lock_irqsave()
        .current
        .clone()
        .expect("scheduler not initialised")
}

/// Whether `t` is the task its CPU is running. The switch away from a task publishes the next
/// task's mode under the same run-queue lock, so once this is false that publish is complete.
pub fn is_running(t: &Arc<Task>) -> bool {
    RQ[t.cpu as usize]
        .lock_irqsave()
        .current
        .as_ref()
        .is_some_and(|c| Arc::ptr_eq(c, t))
}

/// Context switches this CPU has made.
pub fn switches(cpu: u32) -> u64 {
    SWITCHES[cpu as usize].load(Ordering::Relaxed)
}

/// Creates a kernel thread on `cpu` running `f`; its exit code (see `join`) is what `f`
/// returns.
pub fn spawn_returning(
    cpu: u32,
    name: &'static str,
    f: impl FnOnce() -> u64 + Send + 'static,
) -> Arc<Task> {
    spawn(cpu, name, move || {
        let code = f();
        current().set_exit_code(code);
    })
}

/// Creates a kernel thread on `cpu` running `f`.
pub fn spawn(cpu: u32, name: &'static str, f: impl FnOnce() + Send + 'static) -> Arc<Task> {
    let t = Task::new(name, cpu, alloc::boxed::Box::new(f), None, false);
    enqueue(t.clone());
    t
}

/// Like [`spawn_returning`], but an exhausted heap is an error (see [`Task::try_new`]).
pub fn try_spawn_returning(
    cpu: u32,
    name: &'static str,
    f: impl FnOnce() -> u64 + Send + 'static,
) -> Result<Arc<Task>, task::OutOfHeap> {
    try_spawn(cpu, name, move || {
        let code = f();
        current().set_exit_code(code);
    })
}

/// Like [`spawn`], but an exhausted heap is an error (see [`Task::try_new`]).
pub fn try_spawn(
    cpu: u32,
    name: &'static str,
    f: impl FnOnce() + Send + 'static,
) -> Result<Arc<Task>, task::OutOfHeap> {
    let t = Task::try_new(name, cpu, alloc::boxed::Box::new(f), None, false)?;
    enqueue(t.clone());
    Ok(t)
}

/// Puts a ready task on its CPU's run queue and makes that CPU look at it.
pub fn enqueue(t: Arc<Task>) {
    enqueue_at(t, false);
}

/// Like `enqueue`, at the head of the queue when `first` (for kthreads that others wait on,
/// as Linux may run its RCU kthreads at a real-time priority).
///
/// When the switch happens: a task woken on another CPU preempts what runs there at once
/// (the reschedule IPI's return). On this CPU, a task woken to the head preempts the caller
/// at the next preemption point: the `preempt_enable` of this very call's lock when it
/// runs in thread context (the last RCU reader waking the grace-period kthread), else the
/// interrupt return. One woken to the tail waits for the next tick, as a task whose turn
/// it is not: switching to each at once (a callback kthread after every grace period)
/// would only add switches. A CPU running its idle task switches at once whatever the
/// wake-up, which lets the idle loop test one flag instead of taking the run-queue lock.
fn enqueue_at(t: Arc<Task>, first: bool) {
    let cpu = t.cpu;
    let local = cpu == percpu::id();
    {
        let mut rq = RQ[cpu as usize].lock_irqsave();
        if first {
            rq.ready.push_front(t);
        } else {
            rq.ready.push_back(t);
        }
        // Set before the lock's release, whose preempt_enable is the preemption point.
        let idle = rq.current.as_ref().is_some_and(|c| c.is_idle);
        if local && !first && !idle {
            WOKEN_LOCALLY[cpu as usize].store(true, Ordering::Relaxed);
        } else {
            set_need_resched(cpu);
        }
    }
    if !local {
        apic::send_ipi(cpu, vectors::RESCHEDULE);
    }
}

/// Wakes a blocked task; false if it was not blocked.
pub fn wake(t: &Arc<Task>) -> bool {
    wake_at(t, false)
}

/// Wakes a blocked task to the head of its CPU's run queue; false if it was not blocked.
pub fn wake_first(t: &Arc<Task>) -> bool {
    wake_at(t, true)
}

fn wake_at(t: &Arc<Task>, first: bool) -> bool {
    if t.transition(State::Blocked, State::Ready) {
        enqueue_at(t.clone(), first);
        true
    } else {
        false
    }
}

/// Yields until `ms` milliseconds have passed (other tasks on this CPU run meanwhile).
pub fn sleep_ms(ms: u64) {
    let deadline = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(ms * 1000);
    while crate::arch::tsc::now() < deadline {
        yield_now();
        core::hint::spin_loop();
    }
}

/// Gives up the CPU to the next ready task, if any.
pub fn yield_now() {
    schedule();
}

/// Called from the tick: charge the running task and ask for a reschedule when its slice is
/// used up (or a task was woken locally since the last tick) and someone else is waiting.
pub fn tick() {
    let cpu = percpu::id();
    let woken = WOKEN_LOCALLY[cpu as usize].swap(false, Ordering::Relaxed);
    let rq = RQ[cpu as usize].lock(); // an interrupt handler: interrupts are off
    if let Some(cur) = rq.current.as_ref() {
        let used = cur.slice_ticks.fetch_add(1, Ordering::Relaxed) + 1;
        if !rq.ready.is_empty() && (cur.is_idle || woken || used >= SLICE_TICKS) {
            set_need_resched(cpu);
        }
    }
}

/// On the way out of an interrupt, and at a preemption point (`preempt::preempt_point`,
/// which has checked that interrupts are on): switch if asked to and preemption is enabled.
/// Never in the middle of a shared-record update (its sequence counter is odd until it
/// ends, and the update must not interleave with another task's).
fn preempt_on_interrupt_return() {
    if need_resched(percpu::id())
        && percpu::preempt_count() == 0
        && !percpu::this().sync().publishing()
    {
        schedule();
    }
}

/// Picks the next task and switches to it. Interrupt state is preserved across the call.
pub fn schedule() {
    assert!(
        percpu::preempt_count() == 0,
        "schedule with preemption disabled (sleeping in a reader or under a spinlock)"
    );
    let was_enabled = interrupts::are_enabled();
    interrupts::disable();
    let cpu = percpu::id() as usize;
    clear_need_resched(cpu as u32);
    let (prev_rsp, next_rsp) = {
        // Released before the switch: preemption is per CPU, and the next task starts with
        // it enabled. Its preempt_enable cannot recurse here, interrupts being off.
        let mut rq = RQ[cpu].lock();
        let prev = rq.current.clone().expect("scheduler not initialised");
        if prev.transition(State::Running, State::Ready) && !prev.is_idle {
            rq.ready.push_back(prev.clone());
        }
        let next = match rq.ready.pop_front() {
            Some(t) => t,
            None if prev.state() == State::Ready && prev.is_idle => prev.clone(),
            None => rq.idle.clone().expect("idle task"),
        };
        next.set_state(State::Running);
        next.slice_ticks.store(0, Ordering::Relaxed);
        if Arc::ptr_eq(&prev, &next) {
            drop(rq);
            if was_enabled {
                interrupts::enable();
            }
            return;
        }
        switch_in(&prev, &next);
        let ptrs = (prev.saved_rsp_ptr(), next.saved_rsp());
        rq.current = Some(next);
        rq.prev = Some(prev);
        ptrs
    };
    SWITCHES[cpu].fetch_add(1, Ordering::Relaxed);
    // SAFETY: both stack pointers belong to tasks of this CPU: `prev` is the running context
    // (its slot, in the task that the run queue keeps alive as `prev` until the switch is
    // over, receives its stack pointer); `next` is not running (only this CPU's scheduler
    // runs it, and it is switching away from `prev`), its stack pointer saved by an earlier
    // switch or built by Task::new, and its stack lives as long as the task. The run-queue
    // lock is released and interrupts are off.
    unsafe { context::switch(prev_rsp, next_rsp) };
    finish_switch();
    if was_enabled {
        interrupts::enable();
    }
}

/// Per-switch work for the incoming task: its kernel stack for traps from user mode, its
/// address space, the mode the host sees, and a quiescent state for RCU.
fn switch_in(prev: &Arc<Task>, next: &Arc<Task>) {
    if TICK_STOPPED[next.cpu as usize].swap(false, Ordering::Relaxed) {
        crate::arch::apic::resume_tick();
    }
    if let Some(top) = next.kstack_top() {
        percpu::set_kernel_stack(top);
    }
    crate::mm::aspace::switch(prev.aspace.as_ref(), next.aspace.as_ref());
    crate::shared::set_mode(if next.is_idle {
        VcpuMode::Idle
    } else {
        VcpuMode::Kernel
    });
    qs(&QS_CONTEXT_SWITCH);
}

/// Runs right after a switch, on the incoming task's stack: releases the outgoing task.
fn finish_switch() {
    // Interrupts are off (schedule, or a new task's first instructions).
    let prev = RQ[percpu::id() as usize].lock().prev.take();
    drop(prev);
    qs(&QS_AFTER_SWITCH);
}

/// First code of every task created with Task::new (see `arch::context::initial_frame`).
extern "C" fn task_entry() -> ! {
    finish_switch();
    // Not held across exit(), which never returns: the task must be freeable.
    let f = current().take_entry();
    interrupts::enable();
    if let Some(f) = f {
        f();
    }
    let code = current().exit_code();
    exit(code)
}

/// Ends the calling task.
pub fn exit(code: u64) -> ! {
    let me = current();
    me.mark_done(code);
    me.joiners.wake_all();
    interrupts::disable();
    me.set_state(State::Dead);
    drop(me);
    schedule();
    unreachable!("a dead task was scheduled again")
}

/// Leaves the calling task for user mode at `rip` with stack `rsp` and arguments `arg0`,
/// `arg1` (see `arch::user::enter`); the task comes back to the kernel only through traps
/// (system calls, interrupts, exceptions). Panics if the calling task runs on a stack it
/// was adopted from (the boot stacks): traps from user mode land on its own kernel stack.
pub fn enter_user(rip: u64, rsp: u64, arg0: u64, arg1: u64) -> ! {
    assert!(
        current().kstack_top().is_some(),
        "user mode entered from a task without a kernel stack of its own"
    );
    // SAFETY: the calling task has its own kernel stack, and `switch_in` pointed TSS.RSP0 at
    // its top when it switched to the task; the task stays on this CPU (tasks never
    // migrate), and no other task uses its stack.
    unsafe { crate::arch::user::enter(rip, rsp, arg0, arg1) }
}

/// Waits until `t` has exited; returns its exit code.
pub fn join(t: &Arc<Task>) -> u64 {
    t.joiners.wait_until(|| t.is_done());
    t.exit_code()
}

/// The idle task: halt until an interrupt, publishing `idle` to the host meanwhile. An idle
/// CPU stays `idle` while it handles an interrupt; it becomes `kernel` when it switches to a
/// task (`switch_in`).
///
/// Every CPU but the timekeeper stops its tick while it idles: an idle CPU is in an RCU
/// extended quiescent state, and whatever gives it work (a wake-up, the end of the grace
/// period its callbacks wait for) sends it an IPI. 64 idle vCPUs ticking every 4 ms took
/// about one host core on a nested host, whatever the guest did.
pub fn idle_loop() -> ! {
    let cpu = percpu::id();
    let tickless = cpu != TIMEKEEPER.load(Ordering::Relaxed);
    loop {
        interrupts::disable();
        // Every wake-up of a task on a CPU whose idle task runs sets it (enqueue_at).
        if need_resched(cpu) {
            schedule();
            continue;
        }
        crate::shared::set_mode(VcpuMode::Idle);
        qs(&QS_ENTER_IDLE);
        // sti; hlt (or the Idle hypercall): no wake-up slips in between. The tick is stopped
        // again each time: one that was pending when it was last stopped re-arms itself.
        if tickless {
            crate::arch::apic::stop_tick();
            TICK_STOPPED[cpu as usize].store(true, Ordering::Relaxed);
            crate::arch::apic::wait_for_interrupt_tickless();
        } else {
            crate::arch::apic::wait_for_interrupt();
        }
        interrupts::disable();
        qs(&QS_EXIT_IDLE);
    }
}
