//! MCS queued lock: each waiter spins on its own node; per-CPU nodes per nesting level
//! (preemption is off while a lock is held or awaited, so a CPU's nodes cannot be reused
//! under it). The slow path halts the waiter (interrupts on) and has the releaser kick it
//! with an IPI, which KVM's in-kernel APIC delivers without an exit to the VMM.
//!
//! `holder` follows the lock: the releaser names its successor before it grants it, so
//! waiters further back name the new holder even before it runs again. Before halting, a
//! waiter looks (as Linux's pv_wait_node does) whether the vCPUs it depends on run: while
//! its predecessor and the holder both run, the lock is on its way and a halt would only add
//! a kick's latency, so it keeps spinning a few rounds more.

use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering::*};
use shared_abi::{MAX_VCPUS, NO_VCPU};

use super::{
    acquired, give_back_turn, pv_yield, released, Pacer, RawLock, SlowPath, PV_HALTS, PV_KICKS,
};
use crate::arch::{apic, vectors};
use crate::{percpu, shared};

/// Queued locks one CPU may hold or wait for at once.
const LEVELS: usize = 4;
/// Slow-path rounds (of PV_SPIN_US each) a waiter keeps spinning while its predecessor and
/// the holder both run, before it halts anyway.
const RUNNING_ROUNDS: u32 = 4;

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
    /// The CPU holding the lock (or granted it and not yet running), NO_VCPU when free.
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

    /// Waits until `node`, queued behind CPU `pred`'s node, is granted the lock.
    #[cold]
    fn wait_slow(&self, node: &Node, pred: u32) {
        let irq_on = x86_64::instructions::interrupts::are_enabled();
        let mut pacer = Pacer::new();
        let mut slow = SlowPath::new(self);
        let mut running_rounds = 0;
        while !node.granted.load(Acquire) {
            core::hint::spin_loop();
            if !pacer.due() {
                continue;
            }
            // The holder is the vCPU in the way. NO_VCPU: a release is under way (or the
            // holder has not named itself yet); keep the last name, at first the predecessor.
            let holder = match self.holder.load(Relaxed) {
                NO_VCPU => slow.named().unwrap_or(pred),
                h => h,
            };
            slow.name(holder);
            let holder_preempted = shared::host_preempted(holder);
            let pred_preempted = pred != holder && shared::host_preempted(pred);
            if !holder_preempted && !pred_preempted && running_rounds < RUNNING_ROUNDS {
                running_rounds += 1;
            } else if irq_on {
                running_rounds = 0;
                Self::halt(node);
                pacer.restart();
            } else {
                // Cannot halt (the kick could not be taken): give the time to whoever is
                // preempted, the holder first.
                pv_yield(if pred_preempted && !holder_preempted {
                    pred
                } else {
                    holder
                });
            }
            crate::tlb::serve_requests();
        }
    }

    /// Halts until kicked (or any interrupt, the tick at worst), unless granted meanwhile.
    fn halt(node: &Node) {
        // Announce the halt, then re-check: the releaser sets `granted` before it reads
        // `halted` (both SeqCst), so one of us sees the other.
        node.halted.store(true, SeqCst);
        if !node.granted.load(SeqCst) {
            PV_HALTS.fetch_add(1, Relaxed);
            // Interrupts stay off from the re-check to the halt, so a kick that lands in
            // between stays pending and ends the wait at once.
            x86_64::instructions::interrupts::disable();
            if !node.granted.load(SeqCst) {
                apic::wait_for_interrupt();
            }
            x86_64::instructions::interrupts::enable();
        }
        node.halted.store(false, SeqCst);
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
        let me = percpu::this();
        me.preempt_disable();
        let cpu = me.id();
        let level = DEPTH[cpu as usize].fetch_add(1, Relaxed);
        assert!(
            level < LEVELS,
            "more than {LEVELS} queued locks nested on one CPU"
        );
        let node = &NODES[cpu as usize][level];
        node.next.store(null_mut(), Relaxed);
        node.granted.store(false, Relaxed);
        node.halted.store(false, Relaxed);
        node.cpu.store(cpu, Relaxed);
        let node_ptr = node as *const Node as *mut Node;
        let prev = self.tail.swap(node_ptr, AcqRel);
        if prev.is_null() {
            // Free: ours. A previous releaser cleared `holder` before its tail CAS, which
            // our swap follows.
            self.holder.store(cpu, Relaxed);
        } else {
            // SAFETY: `prev` is a node in the static array, queued ahead of us; its owner
            // reads `next` only after we store it, and its `cpu` is its CPU for good.
            let pred = unsafe {
                let pred = (*prev).cpu.load(Relaxed);
                (*prev).next.store(node_ptr, Release);
                pred
            };
            if !node.granted.load(Acquire) {
                self.wait_slow(node, pred);
            }
        }
        self.owner_node.store(node_ptr, Relaxed);
        acquired(me);
    }

    fn release(&self) {
        let me = self.owner_node.load(Relaxed);
        let this = percpu::this();
        let cpu = this.id() as usize;
        // Nodes are per-CPU stack slots: only the most recent acquisition may be released.
        let top = DEPTH[cpu]
            .load(Relaxed)
            .checked_sub(1)
            .expect("MCS unlock without lock");
        assert!(
            core::ptr::eq(me, &NODES[cpu][top]),
            "MCS locks released out of order on cpu {cpu}"
        );
        released(this);
        // SAFETY: `me` is our own node (we hold the lock).
        let node = unsafe { &*me };
        let mut next = node.next.load(Acquire);
        if next.is_null() {
            // Cleared before the tail: once the lock is free a new owner names itself.
            self.holder.store(NO_VCPU, Relaxed);
            if self
                .tail
                .compare_exchange(me, null_mut(), AcqRel, Acquire)
                .is_ok()
            {
                DEPTH[cpu].fetch_sub(1, Relaxed);
                give_back_turn(this, self as *const Self as u64);
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
        let succ_cpu = succ.cpu.load(Relaxed);
        // Hand-off: the successor holds the lock from here on, even before it runs again.
        self.holder.store(succ_cpu, Relaxed);
        succ.granted.store(true, SeqCst);
        if succ.halted.load(SeqCst) {
            PV_KICKS.fetch_add(1, Relaxed);
            apic::send_ipi(succ_cpu, vectors::RESCHEDULE);
        }
        DEPTH[cpu].fetch_sub(1, Relaxed);
        give_back_turn(this, self as *const Self as u64);
    }

    fn holder(&self) -> u32 {
        self.holder.load(Relaxed)
    }
}
