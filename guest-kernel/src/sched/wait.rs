//! Wait queues: block until a condition holds, woken by whoever makes it hold.

use alloc::sync::Arc;
use alloc::vec::Vec;
use x86_64::instructions::interrupts;

use super::{current, schedule, wake, wake_first, State, Task};
use crate::locks::{KernelLock, SpinLock};

pub struct WaitQueue {
    /// Taken with interrupts off everywhere: interrupt handlers wake waiters.
    waiters: KernelLock<Vec<Arc<Task>>>,
}

impl Default for WaitQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl WaitQueue {
    pub const fn new() -> Self {
        WaitQueue {
            waiters: SpinLock::kernel(Vec::new()),
        }
    }

    /// Blocks the calling task until `cond()` is true. The task marks itself blocked and
    /// queues itself before testing, so a wake-up between the test and the switch is not lost.
    pub fn wait_until(&self, mut cond: impl FnMut() -> bool) {
        let me = current();
        let irq_was_enabled = interrupts::are_enabled();
        loop {
            // Interrupts stay off from "blocked" to the switch: a preemption in between would
            // take this task off the CPU without queueing it, and a wake-up already spent
            // would leave it asleep for good.
            interrupts::disable();
            me.set_state(State::Blocked);
            self.waiters.lock().push(me.clone());
            if cond() {
                if !me.transition(State::Blocked, State::Running) {
                    // Woken concurrently: it sits on the run queue; let it run through there.
                    schedule();
                }
                self.remove(&me);
                break;
            }
            schedule();
            if irq_was_enabled {
                interrupts::enable();
            }
        }
        if irq_was_enabled {
            interrupts::enable();
        }
    }

    fn remove(&self, t: &Arc<Task>) {
        self.waiters.lock_irqsave().retain(|w| !Arc::ptr_eq(w, t));
    }

    /// Wakes every waiter.
    pub fn wake_all(&self) {
        let waiters = core::mem::take(&mut *self.waiters.lock_irqsave());
        for w in &waiters {
            wake(w);
        }
    }

    /// Wakes every waiter to the head of its CPU's run queue: they run at the next
    /// scheduling point, before tasks that were already ready.
    pub fn wake_all_first(&self) {
        let waiters = core::mem::take(&mut *self.waiters.lock_irqsave());
        for w in &waiters {
            wake_first(w);
        }
    }
}
