//! Ticket lock: FIFO by ticket number.

use core::sync::atomic::{AtomicU32, Ordering};
use shared_abi::NO_VCPU;

use super::{acquired, pv_yield, releasing, slow_path_enter, slow_path_exit, RawLock, PV_SPIN_US};
use crate::arch::tsc;
use crate::percpu;

pub struct TicketLock {
    next: AtomicU32,
    owner: AtomicU32,
    holder: AtomicU32,
}

impl TicketLock {
    pub const fn new() -> Self {
        TicketLock {
            next: AtomicU32::new(0),
            owner: AtomicU32::new(0),
            holder: AtomicU32::new(NO_VCPU),
        }
    }
}

impl Default for TicketLock {
    fn default() -> Self {
        Self::new()
    }
}

impl RawLock for TicketLock {
    const NAME: &'static str = "ticket";

    fn lock(&self) {
        percpu::preempt_disable();
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        if self.owner.load(Ordering::Acquire) != ticket {
            let threshold = tsc::us_to_cycles(PV_SPIN_US);
            let mut since = tsc::now();
            let mut slow = false;
            while self.owner.load(Ordering::Acquire) != ticket {
                core::hint::spin_loop();
                if tsc::now() - since > threshold {
                    let holder = self.holder.load(Ordering::Relaxed);
                    if !slow {
                        slow_path_enter(self as *const Self as *const (), holder);
                        slow = true;
                    }
                    pv_yield(holder);
                    crate::tlb::serve_requests();
                    since = tsc::now();
                }
            }
            if slow {
                slow_path_exit();
            }
        }
        acquired(&self.holder);
    }

    fn unlock(&self) {
        releasing(&self.holder);
        self.owner.fetch_add(1, Ordering::Release);
        percpu::preempt_enable();
    }

    fn holder(&self) -> u32 {
        self.holder.load(Ordering::Relaxed)
    }
}
