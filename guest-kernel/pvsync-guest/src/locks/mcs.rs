//! MCS queued lock: each waiter spins on its own node; per-CPU nodes per nesting level
//! (preemption is off while a lock is held or awaited, so a CPU's nodes cannot be reused
//! under it). The slow path halts the waiter (interrupts on) and has the releaser kick it
//! with an IPI.
//!
//! The halt/kick handshake: the waiter stores `halted` and then re-checks `granted`; the
//! releaser stores `granted` and then reads `halted`, each with a full fence between, so
//! at least one of them sees the other's store: either the waiter does not halt, or the
//! releaser kicks. The waiter halts with interrupts masked from its last check, so a kick
//! that lands in between stays pending and ends the halt at once.
//!
//! `holder` follows the lock: the releaser names its successor before it grants it, so
//! waiters further back name the new holder even before it runs again. Before halting, a
//! waiter looks (as Linux's pv_wait_node does) whether the vCPUs it depends on run: while
//! its predecessor and the holder both run, the lock is on its way and a halt would only add
//! a kick's latency, so it keeps spinning a few rounds more.

use core::cell::Cell;
use core::marker::PhantomData;
use core::ptr::null_mut;
use core::sync::atomic::Ordering::Relaxed as StatRelaxed;
use shared_abi::NO_VCPU;

use super::pacer::Pacer;
use super::slow::SlowPath;
use super::{give_back_turn, preempted, pv_yield, RawLock, PV_HALTS, PV_KICKS};
use crate::platform::{Ipi, Platform};
use crate::sync::{fence, AtomicBool, AtomicPtr, AtomicU32, Ordering::*};

/// Queued locks one CPU may hold or wait for at once.
pub const LEVELS: usize = 4;
/// Slow-path rounds (of PV_SPIN_US each) a waiter keeps spinning while its predecessor and
/// the holder both run, before it halts anyway.
#[cfg(not(test))]
const RUNNING_ROUNDS: u32 = 4;
/// Models halt at the first slow round (a smaller state space, the same handshake).
#[cfg(test)]
const RUNNING_ROUNDS: u32 = 0;

#[repr(align(64))]
pub(crate) struct Node {
    next: AtomicPtr<Node>,
    granted: AtomicBool,
    halted: AtomicBool,
    cpu: AtomicU32,
}

impl Node {
    crate::sync::const_fn! {
        fn new() -> Self {
            Node {
                next: AtomicPtr::new(null_mut()),
                granted: AtomicBool::new(false),
                halted: AtomicBool::new(false),
                cpu: AtomicU32::new(0),
            }
        }
    }
}

/// A CPU's queued-lock nodes, used as a stack (innermost lock on top).
pub(crate) struct McsNodes {
    depth: Cell<usize>,
    nodes: [Node; LEVELS],
}

impl McsNodes {
    crate::sync::const_fn! {
        pub(crate) fn new() -> Self {
            McsNodes {
                depth: Cell::new(0),
                nodes: crate::sync::array_of!(LEVELS, Node::new()),
            }
        }
    }
}

/// An MCS lock.
pub struct McsLock<P> {
    tail: AtomicPtr<Node>,
    /// The CPU holding the lock (or granted it and not yet running), NO_VCPU when free.
    holder: AtomicU32,
    /// The node of the current holder (for unlock).
    owner_node: AtomicPtr<Node>,
    /// Negative control: the releaser never kicks a halted successor (a lost wake-up).
    drops_kicks: bool,
    /// Negative control of the models: the halt/kick handshake without its full fences.
    #[cfg(test)]
    skip_fences: bool,
    _p: PhantomData<fn() -> P>,
}

impl<P: Platform> McsLock<P> {
    crate::sync::const_fn! {
        /// An MCS lock.
        pub fn new() -> Self {
            Self::with_kicks(false)
        }
    }

    crate::sync::const_fn! {
        /// A broken MCS lock for negative controls: its releaser never kicks a halted
        /// successor, which then sleeps until some other interrupt comes (or forever).
        pub fn dropping_kicks() -> Self {
            Self::with_kicks(true)
        }
    }

    crate::sync::const_fn! {
        fn with_kicks(drops_kicks: bool) -> Self {
            McsLock {
                tail: AtomicPtr::new(null_mut()),
                holder: AtomicU32::new(NO_VCPU),
                owner_node: AtomicPtr::new(null_mut()),
                drops_kicks,
                #[cfg(test)]
                skip_fences: false,
                _p: PhantomData,
            }
        }
    }

    /// The broken variant of the models' negative control (see `skip_fences`).
    #[cfg(test)]
    pub(crate) fn without_fences() -> Self {
        let mut l = Self::with_kicks(false);
        l.skip_fences = true;
        l
    }

    /// The full fence between a store and a load of the halt/kick handshake.
    #[inline]
    fn handshake_fence(&self) {
        #[cfg(test)]
        if self.skip_fences {
            return;
        }
        fence(SeqCst);
    }

    /// Waits until `node`, queued behind CPU `pred`'s node, is granted the lock.
    #[cold]
    fn wait_slow(&self, node: &Node, pred: u32) {
        let irq_on = P::irqs_enabled();
        let mut pacer = Pacer::<P>::new();
        let mut slow = SlowPath::<P>::new(self);
        let mut running_rounds = 0;
        while !node.granted.load(Acquire) {
            crate::sync::spin_loop();
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
            let holder_preempted = preempted::<P>(holder);
            let pred_preempted = pred != holder && preempted::<P>(pred);
            #[allow(clippy::absurd_extreme_comparisons)] // RUNNING_ROUNDS is 0 in the models
            let keep_spinning = running_rounds < RUNNING_ROUNDS;
            if !holder_preempted && !pred_preempted && keep_spinning {
                running_rounds += 1;
            } else if irq_on {
                running_rounds = 0;
                self.halt(node);
                pacer.restart();
            } else {
                // Cannot halt (the kick could not be taken): give the time to whoever is
                // preempted, the holder first.
                pv_yield::<P>(if pred_preempted && !holder_preempted {
                    pred
                } else {
                    holder
                });
            }
            P::serve_waiters();
        }
    }

    /// Halts until kicked (or any interrupt), unless granted meanwhile.
    fn halt(&self, node: &Node) {
        // Announce the halt, then re-check: the releaser sets `granted` before it reads
        // `halted`, each side with a full fence between its store and its load (Linux's
        // smp_store_mb), so one of us sees the other.
        node.halted.store(true, Relaxed);
        self.handshake_fence();
        if !node.granted.load(Acquire) {
            PV_HALTS.fetch_add(1, StatRelaxed);
            P::halt_while(&|| !node.granted.load(Acquire));
        }
        node.halted.store(false, Relaxed);
    }
}

impl<P: Platform> Default for McsLock<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Platform> RawLock for McsLock<P> {
    type Platform = P;
    const NAME: &'static str = "mcs";

    fn lock(&self) {
        P::preempt_disable();
        let me = P::cpu();
        let cpu = me.id();
        let level = me.mcs.depth.get();
        assert!(
            level < LEVELS,
            "more than {LEVELS} queued locks nested on one CPU"
        );
        me.mcs.depth.set(level + 1);
        let node = &me.mcs.nodes[level];
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
            // SAFETY: `prev` is a node of a CPU's `'static` block, queued ahead of us; its
            // owner reads `next` only after we store it, and its `cpu` is its CPU for good.
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
        me.add_locks_held(1);
    }

    fn release(&self) {
        let mine = self.owner_node.load(Relaxed);
        let me = P::cpu();
        // Nodes are per-CPU stack slots: only the most recent acquisition may be released.
        let top = me
            .mcs
            .depth
            .get()
            .checked_sub(1)
            .expect("MCS unlock without lock");
        assert!(
            core::ptr::eq(mine, &me.mcs.nodes[top]),
            "MCS locks released out of order on cpu {}",
            me.id()
        );
        me.add_locks_held(-1);
        let node = &me.mcs.nodes[top];
        let mut next = node.next.load(Acquire);
        if next.is_null() {
            // Cleared before the tail: once the lock is free a new owner names itself.
            self.holder.store(NO_VCPU, Relaxed);
            if self
                .tail
                .compare_exchange(mine, null_mut(), AcqRel, Acquire)
                .is_ok()
            {
                me.mcs.depth.set(top);
                give_back_turn::<P>(self as *const Self as u64);
                return;
            }
            // A successor swapped the tail but has not linked itself yet.
            loop {
                next = node.next.load(Acquire);
                if !next.is_null() {
                    break;
                }
                crate::sync::spin_loop();
            }
        }
        // SAFETY: `next` is the successor's node, in its CPU's `'static` block.
        let succ = unsafe { &*next };
        let succ_cpu = succ.cpu.load(Relaxed);
        // Hand-off: the successor holds the lock from here on, even before it runs again.
        self.holder.store(succ_cpu, Relaxed);
        succ.granted.store(true, Release);
        crate::events::emit::<P>(
            shared_abi::EventKind::LockRelease,
            succ_cpu,
            self as *const Self as u64,
        );
        self.handshake_fence();
        if succ.halted.load(Relaxed) && !self.drops_kicks {
            PV_KICKS.fetch_add(1, StatRelaxed);
            P::send_ipi(succ_cpu, Ipi::Kick);
        }
        me.mcs.depth.set(top);
        give_back_turn::<P>(self as *const Self as u64);
    }

    fn holder(&self) -> u32 {
        self.holder.load(Relaxed)
    }
}
