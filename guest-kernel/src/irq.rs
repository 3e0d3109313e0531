//! Interrupt sources: the per-CPU tick, the reschedule IPI and the ping IPI, each counted
//! per CPU.
//!
//! Below the scheduler, TLB shootdown and RCU (which read [`TICK_US`] and the ping counts):
//! what the tick and the reschedule IPI do beyond counting is theirs, reached through two
//! hooks: the tick's, installed by `sched` (`sched::install_hooks`, which passes it on to
//! RCU), and the reschedule IPI's, installed by `main` for `rcu` (a grace period's nudge to
//! its holdouts). Each gets whether the interrupted code was preemptible (user mode, or
//! kernel code with preemption enabled). Default (nothing installed): the tick only re-arms
//! and counts, the reschedule IPI does nothing more (the interrupt return path is where a
//! reschedule happens).

use core::sync::atomic::{AtomicU64, Ordering};
use pvsync_guest::NR_CPUS;

use crate::arch::hook::Hook;
use crate::arch::idt::{self, TrapFrame};
use crate::arch::{apic, vectors};
use crate::percpu;

/// Tick period.
pub const TICK_US: u64 = 4000;

static TICKS: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
static PINGS: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];

/// What the tick does after re-arming and counting.
static ON_TICK: Hook<fn(bool)> = Hook::new();
/// What the reschedule IPI does.
static ON_RESCHEDULE: Hook<fn(bool)> = Hook::new();

/// Installs what every tick runs (interrupts off), with whether the interrupted code was
/// preemptible.
pub fn set_tick_hook(f: fn(bool)) {
    ON_TICK.set(f);
}

/// Installs what the reschedule IPI runs (interrupts off), with whether the interrupted
/// code was preemptible.
pub fn set_reschedule_hook(f: fn(bool)) {
    ON_RESCHEDULE.set(f);
}

/// User code and preemptible kernel code are outside any RCU reader.
fn preemptible(frame: &TrapFrame) -> bool {
    idt::from_user(frame) || percpu::preempt_count() == 0
}

fn timer(frame: &mut TrapFrame) {
    apic::rearm_tick();
    let tick = TICKS[percpu::id() as usize].fetch_add(1, Ordering::Relaxed);
    crate::arch::kvm::observe_tick(percpu::id(), tick);
    if let Some(tick) = ON_TICK.get() {
        tick(preemptible(frame));
    }
}

/// The reschedule IPI: the interrupt return path checks the run queue; a grace period that
/// sent it wants a quiescent state reported.
fn reschedule(frame: &mut TrapFrame) {
    if let Some(resched) = ON_RESCHEDULE.get() {
        resched(preemptible(frame));
    }
}

fn ping(_: &mut TrapFrame) {
    PINGS[percpu::id() as usize].fetch_add(1, Ordering::Release);
}

/// Installs the handlers (once, on the BSP, before any CPU enables interrupts).
pub fn install_handlers() {
    idt::register(vectors::TIMER, timer);
    idt::register(vectors::RESCHEDULE, reschedule);
    idt::register(vectors::PING, ping);
}

/// Starts the calling CPU's tick; returns the timer mode.
pub fn start_tick() -> apic::TimerMode {
    apic::start_tick(vectors::TIMER, TICK_US)
}

pub fn ticks(cpu: u32) -> u64 {
    TICKS[cpu as usize].load(Ordering::Relaxed)
}

pub fn pings(cpu: u32) -> u64 {
    PINGS[cpu as usize].load(Ordering::Acquire)
}
