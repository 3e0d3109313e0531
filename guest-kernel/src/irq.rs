//! Interrupt sources the kernel handles: the tick, the reschedule IPI and the ping IPI.

use core::sync::atomic::{AtomicU64, Ordering};
use shared_abi::MAX_VCPUS;

use crate::arch::idt::{self, TrapFrame};
use crate::arch::{apic, vectors};
use crate::percpu;

/// Tick period.
pub const TICK_US: u64 = 4000;

static TICKS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static PINGS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];

fn timer(frame: &mut TrapFrame) {
    apic::rearm_tick();
    TICKS[percpu::id() as usize].fetch_add(1, Ordering::Relaxed);
    // User code and preemptible kernel code are outside any reader. First: a callback
    // kthread it wakes here is switched to on this tick's return (sched::tick sees it).
    crate::rcu::tick(idt::from_user(frame) || percpu::preempt_count() == 0);
    crate::sched::tick();
}

/// The reschedule IPI: the interrupt return path checks the run queue; a grace period that
/// sent it wants a quiescent state reported.
fn reschedule(frame: &mut TrapFrame) {
    crate::rcu::interrupt_qs(idt::from_user(frame) || percpu::preempt_count() == 0);
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
