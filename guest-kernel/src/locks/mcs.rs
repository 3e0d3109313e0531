//! MCS queued lock: each waiter spins on its own node; per-CPU nodes per nesting level
//! (preemption is off while a lock is held or awaited, so a CPU's nodes cannot be reused
//! under it). The slow path halts the waiter (interrupts on) and has the releaser kick it
//! with an IPI, which KVM's in-kernel APIC delivers without an exit to the VMM.

use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering::*};
use shared_abi::{MAX_VCPUS, NO_VCPU};

use super::{
    acquired, pv_yield, releasing, slow_path_enter, slow_path_exit, RawLock, PV_HALTS, PV_KICKS,
    PV_SPIN_US,
};
use crate::arch::{apic, tsc, vectors};
use crate::percpu;

/// Queued locks one CPU may hold or wait for at once.
const LEVELS: usize = 4;

#[repr(align(64))]
struct Node {
    next: AtomicPtr<Node>,
    granted: AtomicBool,
    halted: AtomicBool,
    cpu: AtomicU32,
}

static NODES: [[Node; LEVELS]; MAX_VCPUS] = [const {
    [const {
        Node {
            next: AtomicPtr::new(null_mut()),
            granted: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            cpu: AtomicU32::new(0),
        }
    }; LEVELS]
}; MAX_VCPUS];
static DEPTH: [AtomicUsize; MAX_VCPUS] = [const { AtomicUsize::new(0) }; MAX_VCPUS];

pub struct McsLock {
    tail: AtomicPtr<Node>,
    holder: AtomicU32,
    /// The node of the current holder (for unlock).
    owner_node: AtomicPtr<Node>,
}

impl McsLock {
    pub const fn new() -> Self {
        McsLock {
            tail: AtomicPtr::new(null_mut()),
            holder: AtomicU32::new(NO_VCPU),
            owner_node: AtomicPtr::new(null_mut()),
        }
    }
}

impl Default for McsLock {
    fn default() -> Self {
        Self::new()
    }
}

impl RawLock for McsLock {
    const NAME: &'static str = "mcs";

    fn lock(&self) {
        let irq_on = x86_64::instructions::interrupts::are_enabled();
        percpu::preempt_disable();
        let cpu = percpu::id() as usize;
        let level = DEPTH[cpu].fetch_add(1, Relaxed);
        assert!(
            level < LEVELS,
            "more than {LEVELS} queued locks nested on one CPU"
        );
        let node = &NODES[cpu][level];
        node.next.store(null_mut(), Relaxed);
        node.granted.store(false, Relaxed);
        node.halted.store(false, Relaxed);
        node.cpu.store(cpu as u32, Relaxed);
        let me = node as *const Node as *mut Node;
        let prev = self.tail.swap(me, AcqRel);
        if !prev.is_null() {
            // SAFETY: `prev` is a node in the static array, queued ahead of us; its owner
            // reads `next` only after we store it.
            unsafe { (*prev).next.store(me, Release) };
            let threshold = tsc::us_to_cycles(PV_SPIN_US);
            let mut since = tsc::now();
            let mut slow = false;
            while !node.granted.load(Acquire) {
                core::hint::spin_loop();
                if tsc::now() - since <= threshold {
                    continue;
                }
                let holder = self.holder.load(Relaxed);
                if !slow {
                    slow_path_enter(self as *const Self as *const (), holder);
                    slow = true;
                }
                if irq_on {
                    // Announce the halt, then re-check: the releaser sets `granted` before
                    // it reads `halted` (both SeqCst), so one of us sees the other.
                    node.halted.store(true, SeqCst);
                    if !node.granted.load(SeqCst) {
                        PV_HALTS.fetch_add(1, Relaxed);
                        // The kick IPI (or any interrupt, the tick at worst) ends the wait.
                        // Interrupts stay off from the re-check to the halt, so a kick that
                        // lands in between stays pending and ends the wait at once.
                        x86_64::instructions::interrupts::disable();
                        if !node.granted.load(SeqCst) {
                            apic::wait_for_interrupt();
                        }
                        x86_64::instructions::interrupts::enable();
                    }
                    node.halted.store(false, SeqCst);
                } else {
                    pv_yield(holder);
                }
                crate::tlb::serve_requests();
                since = tsc::now();
            }
            if slow {
                slow_path_exit();
            }
        }
        self.owner_node.store(me, Relaxed);
        acquired(&self.holder);
    }

    fn unlock(&self) {
        let me = self.owner_node.load(Relaxed);
        let cpu = percpu::id() as usize;
        // Nodes are per-CPU stack slots: only the most recent acquisition may be released.
        let top = DEPTH[cpu]
            .load(Relaxed)
            .checked_sub(1)
            .expect("MCS unlock without lock");
        assert!(
            core::ptr::eq(me, &NODES[cpu][top]),
            "MCS locks released out of order on cpu {cpu}"
        );
        releasing(&self.holder);
        // SAFETY: `me` is our own node (we hold the lock).
        let node = unsafe { &*me };
        let mut next = node.next.load(Acquire);
        if next.is_null() {
            if self
                .tail
                .compare_exchange(me, null_mut(), AcqRel, Acquire)
                .is_ok()
            {
                DEPTH[percpu::id() as usize].fetch_sub(1, Relaxed);
                percpu::preempt_enable();
                return;
            }
            // A successor swapped the tail but has not linked itself yet.
            loop {
                next = node.next.load(Acquire);
                if !next.is_null() {
                    break;
                }
                core::hint::spin_loop();
            }
        }
        // SAFETY: `next` is the successor's node in the static array.
        let succ = unsafe { &*next };
        succ.granted.store(true, SeqCst);
        if succ.halted.load(SeqCst) {
            PV_KICKS.fetch_add(1, Relaxed);
            apic::send_ipi(succ.cpu.load(Relaxed), vectors::RESCHEDULE);
        }
        DEPTH[percpu::id() as usize].fetch_sub(1, Relaxed);
        percpu::preempt_enable();
    }

    fn holder(&self) -> u32 {
        self.holder.load(Relaxed)
    }
}
