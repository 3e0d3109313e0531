//! Preemption points below the scheduler: each CPU's need-resched flag and the hook that
//! switches tasks.
//!
//! `percpu::preempt_enable` (below the scheduler) calls [`preempt_point`] when the count
//! drops to 0. The flag is tested inline first: it is almost always clear, and reading the
//! interrupt flag (`pushf`) is costly in a VM. Only when a reschedule is due and interrupts
//! are on does it call the hook, which `sched` installs (`sched::install_hooks`): the same
//! switch the interrupt return path makes. Default (nothing installed): no switch; only the
//! scheduler ever sets the flag.

use core::sync::atomic::{AtomicBool, Ordering};
use pvsync_guest::NR_CPUS;
use x86_64::instructions::interrupts;

use crate::arch::hook::Hook;

static NEED_RESCHED: [AtomicBool; NR_CPUS] = [const { AtomicBool::new(false) }; NR_CPUS];
static SWITCH: Hook<fn()> = Hook::new();

/// Installs what a preemption point runs when a reschedule is due and interrupts are on.
pub fn set_hook(f: fn()) {
    SWITCH.set(f);
}

/// Asks CPU `cpu` to reschedule at its next preemption point (or interrupt return).
#[inline]
pub fn set_need_resched(cpu: u32) {
    NEED_RESCHED[cpu as usize].store(true, Ordering::Release);
}

/// Clears CPU `cpu`'s request (the scheduler, as it picks the next task).
#[inline]
pub fn clear_need_resched(cpu: u32) {
    NEED_RESCHED[cpu as usize].store(false, Ordering::Release);
}

/// Whether a reschedule is due on CPU `cpu`.
#[inline]
pub fn need_resched(cpu: u32) -> bool {
    NEED_RESCHED[cpu as usize].load(Ordering::Acquire)
}

/// From `preempt_enable` when the count drops to 0 on CPU `cpu`: switch now if a reschedule
/// is due and interrupts are on. With interrupts off the caller is the scheduler itself, an
/// interrupt handler or a section that must not switch; the interrupt return path or the
/// next `preempt_enable` with interrupts on picks the reschedule up.
#[inline]
pub fn preempt_point(cpu: u32) {
    if need_resched(cpu) && interrupts::are_enabled() {
        if let Some(switch) = SWITCH.get() {
            switch();
        }
    }
}
