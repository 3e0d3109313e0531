//! TLB shootdown. Changing a mapping flushes it locally and sends an IPI to exactly the
//! other CPUs in the address space's CPU set; each target flushes and clears its bit in the
//! sender's request; the sender waits for every bit.
//!
//! One request slot per sender (a sender waits for its request before making another). While
//! waiting, a sender publishes whom it waits for (`ipi_wait`, which each target's
//! acknowledgement shrinks), keeps serving requests aimed at itself (two CPUs shooting each
//! other down at once cannot deadlock), and past a spin threshold makes a yield hypercall
//! naming a CPU that still owes an acknowledgement.
//!
//! A target the platform can have flushed by the host before it runs again (KVM's PV TLB
//! flush: [`Platform::flush_tlb_on_resume`], which succeeds only for a preempted target)
//! gets no IPI and is not waited for: its flush is deferred to the host, and counted
//! ([`Shootdowns::deferred`]) as evidence in place of its own.
//!
//! Evidence per (target, sender) pair would take `NR_CPUS²` counters; a test watches one
//! sender at a time ([`Shootdowns::watch_sender`]), and the counts are per target.
//!
//! A CPU joining the address space adds itself to the set (a sequentially consistent
//! read-modify-write) before its first page walk; the sender changes the page table, then a
//! full fence, then reads the set: either the sender sees the newcomer, or the newcomer's
//! walk sees the new entry.

use alloc::boxed::Box;
use core::marker::PhantomData;
use core::sync::atomic::{
    AtomicBool, AtomicU32 as StatU32, AtomicU64 as StatU64, Ordering::Relaxed,
};

use shared_abi::{EventKind, NO_VCPU};

use crate::cpuset::{AtomicCpuSet, CpuSet};
use crate::events;
use crate::locks::pacer::Pacer;
use crate::platform::{FlushRange, Ipi, Platform};
use crate::record;
use crate::sync::{fence, AtomicU64, Ordering::Acquire, Ordering::SeqCst};

/// Spin this long for acknowledgements before offering the CPU to a laggard.
const SPIN_THRESHOLD_US: u64 = 50;

struct Request {
    start: AtomicU64,
    /// 0 = flush everything.
    pages: AtomicU64,
    /// Targets that have not acknowledged yet.
    pending: AtomicCpuSet,
}

impl Request {
    fn range(&self) -> FlushRange {
        match self.pages.load(SeqCst) {
            0 => FlushRange::All,
            pages => FlushRange::Pages {
                start: self.start.load(SeqCst),
                pages,
            },
        }
    }
}

/// Faults a negative control can switch on.
#[derive(Default)]
pub struct TlbFaults {
    /// Leave out one target of every shootdown.
    pub skip_one_target: AtomicBool,
    /// Return without waiting for the targets' acknowledgements.
    pub skip_ack_wait: AtomicBool,
    /// Skip a target the platform reports preempted without asking the host to flush it
    /// (the CVE-2019-3016 class: that target may keep a stale translation).
    pub defer_without_flag: AtomicBool,
    /// Read the CPU set without the full fence after the page-table change (models only).
    #[cfg(test)]
    pub(crate) skip_fence: AtomicBool,
}

/// The shootdown protocol for CPUs `0..nr_cpus`.
pub struct Shootdowns<P> {
    requests: Box<[Request]>,
    /// `inbox[t]`: the senders with a request for target `t` (set after its `pending`). A
    /// CPU finds its requests without scanning every slot: `serve` runs in every busy
    /// wait's slow path, and usually finds nothing.
    inbox: Box<[AtomicCpuSet]>,
    /// Flushes each CPU made (served requests, its own shootdowns, whole-TLB flushes the
    /// kernel reports): evidence a test can check that does not come from any sender.
    flushes: Box<[StatU64]>,
    /// The sender whose requests `served` and `deferred` count ([`NO_VCPU`]: none).
    watched: StatU32,
    /// `served[t]`: requests of the watched sender that CPU `t` flushed and acknowledged
    /// (`t` the sender: its own local flushes), counted by `t` itself.
    served: Box<[StatU64]>,
    /// Whole-TLB flushes each CPU reported ([`Shootdowns::note_full_flush`]: CR3 loads).
    full_flushes: Box<[StatU64]>,
    /// `deferred[t]`: requests of the watched sender whose flush on `t` the host took on
    /// ([`Platform::flush_tlb_on_resume`] returned true), counted by the sender.
    deferred: Box<[StatU64]>,
    deferred_total: StatU64,
    shootdowns: StatU64,
    yields: StatU64,
    /// Negative controls.
    pub faults: TlbFaults,
    _p: PhantomData<fn() -> P>,
}

impl<P: Platform> Shootdowns<P> {
    /// The protocol's state for CPUs `0..nr_cpus`.
    pub fn new(nr_cpus: usize) -> Self {
        Shootdowns {
            requests: (0..nr_cpus)
                .map(|_| Request {
                    start: AtomicU64::new(0),
                    pages: AtomicU64::new(0),
                    pending: AtomicCpuSet::new(),
                })
                .collect(),
            inbox: (0..nr_cpus).map(|_| AtomicCpuSet::new()).collect(),
            flushes: (0..nr_cpus).map(|_| StatU64::new(0)).collect(),
            watched: StatU32::new(NO_VCPU),
            served: (0..nr_cpus).map(|_| StatU64::new(0)).collect(),
            full_flushes: (0..nr_cpus).map(|_| StatU64::new(0)).collect(),
            deferred: (0..nr_cpus).map(|_| StatU64::new(0)).collect(),
            deferred_total: StatU64::new(0),
            shootdowns: StatU64::new(0),
            yields: StatU64::new(0),
            faults: TlbFaults::default(),
            _p: PhantomData,
        }
    }

    /// Shootdowns sent so far.
    pub fn shootdowns(&self) -> u64 {
        self.shootdowns.load(Relaxed)
    }

    /// Yield hypercalls senders made while waiting.
    pub fn yields(&self) -> u64 {
        self.yields.load(Relaxed)
    }

    /// Flushes CPU `cpu` has made so far (0 for a CPU beyond the set).
    pub fn flushes(&self, cpu: u32) -> u64 {
        self.flushes.get(cpu as usize).map_or(0, |f| f.load(SeqCst))
    }

    /// Makes [`Shootdowns::served`] and [`Shootdowns::deferred`] count the requests of CPU
    /// `sender` from now on (in place of the sender watched so far; the counts go on).
    pub fn watch_sender(&self, sender: u32) {
        self.watched.store(sender, SeqCst);
    }

    /// Requests of the watched sender that CPU `target` has flushed and acknowledged so far
    /// (`target` the sender: its own local flushes), as `target` counted them: which CPU
    /// flushed for the sender, whatever range the other senders asked for.
    pub fn served(&self, target: u32) -> u64 {
        self.served
            .get(target as usize)
            .map_or(0, |c| c.load(SeqCst))
    }

    /// Requests of the watched sender whose flush on CPU `target` was deferred to the host
    /// (`target` was preempted and the host took the request).
    pub fn deferred(&self, target: u32) -> u64 {
        self.deferred
            .get(target as usize)
            .map_or(0, |c| c.load(SeqCst))
    }

    /// Target flushes deferred to the host so far (all senders).
    pub fn deferred_total(&self) -> u64 {
        self.deferred_total.load(Relaxed)
    }

    /// Whole-TLB flushes CPU `cpu` reported with [`Shootdowns::note_full_flush`].
    pub fn full_flushes(&self, cpu: u32) -> u64 {
        self.full_flushes
            .get(cpu as usize)
            .map_or(0, |f| f.load(SeqCst))
    }

    /// The calling CPU flushed its whole TLB some other way (a CR3 load).
    pub fn note_full_flush(&self) {
        let id = P::cpu().id();
        self.count_flush(id);
        if let Some(f) = self.full_flushes.get(id as usize) {
            f.fetch_add(1, SeqCst);
        }
    }

    fn count_flush(&self, cpu: u32) {
        if let Some(f) = self.flushes.get(cpu as usize) {
            f.fetch_add(1, SeqCst);
        }
    }

    /// `target` flushed a request of `sender` (counted before it acknowledges).
    fn count_served(&self, target: u32, sender: u32) {
        self.count_flush(target);
        if sender == self.watched.load(SeqCst) {
            if let Some(f) = self.served.get(target as usize) {
                f.fetch_add(1, SeqCst);
            }
        }
    }

    /// Serves every request aimed at the calling CPU. Safe anywhere (any lock's slow path,
    /// interrupts on or off): flushing and acknowledging never wait for anything, and take
    /// no lock.
    pub fn serve(&self) {
        let me = P::cpu();
        let id = me.id();
        let Some(inbox) = self.inbox.get(id as usize) else {
            return;
        };
        // Nothing announced: the usual case, one load. An announcement racing with this load
        // comes with an IPI, served in the handler.
        if inbox.is_empty() {
            return;
        }
        // Interrupts off: a shootdown IPI nesting in here could serve and acknowledge the
        // request this loop is reading, and this loop would then acknowledge the sender's
        // next one unflushed.
        let were = P::irqs_save();
        let mut give_back = None;
        // A sender announces after publishing `pending`, so a bit taken here finds its
        // request; one announced after the take is found next time (or by its IPI).
        inbox.take_each(|sender| {
            let r = &self.requests[sender as usize];
            if r.pending.contains(id) {
                P::flush_tlb(r.range());
                self.count_served(id, sender);
                // The sender's published bit first, `pending` last: once `pending` is empty
                // the sender may publish its next shootdown's set, which a late clear of this
                // one must never touch.
                record::ack_ipi_wait(sender, id);
                r.pending.remove(id);
                events::emit::<P>(EventKind::IpiAck, sender, 0);
                if record::lent_by(me) == Some(sender) {
                    give_back = Some(sender);
                }
            }
        });
        P::irqs_restore(were);
        // A turn the sender lent us (it yielded to us while waiting for this
        // acknowledgement) goes back to it once every request found here is served (ABI
        // v4); not while the interrupted code holds a lock: queued, this vCPU would hold up
        // whoever waits for that lock.
        if let Some(lender) = give_back.filter(|_| me.locks_held() == 0) {
            crate::hypercall::yield_to::<P>(lender);
        }
    }

    /// Flushes `range` on every CPU in `cpus` (an address space's set, which CPUs join
    /// concurrently) that may cache it, and returns once all have done so. Call it after
    /// changing the page table.
    pub fn shootdown(&self, cpus: &AtomicCpuSet, range: FlushRange) {
        let mut reached = CpuSet::new();
        self.shootdown_into(cpus, range, &mut reached);
    }

    /// [`Shootdowns::shootdown`], which also returns the CPUs it flushed on (for tests).
    pub fn shootdown_reaching(&self, cpus: &AtomicCpuSet, range: FlushRange) -> CpuSet {
        let mut reached = CpuSet::new();
        self.shootdown_into(cpus, range, &mut reached);
        reached
    }

    /// The shootdown, which leaves in `reached` (replacing what it held) the CPUs it
    /// flushed on. The set is
    /// read once into `reached` and worked on there, never copied: a set has room for
    /// `NR_CPUS` CPUs, and every word moved shows on this path.
    fn shootdown_into(&self, cpus: &AtomicCpuSet, range: FlushRange, reached: &mut CpuSet) {
        P::preempt_disable();
        let me = P::cpu().id();
        // The page-table change (a plain store) must be visible before the CPU set is read:
        // a CPU that joins later then walks the new entry. x86 lets a load pass an earlier
        // store; mfence.
        #[cfg(test)]
        let fenced = !self.faults.skip_fence.load(Relaxed);
        #[cfg(not(test))]
        let fenced = true;
        if fenced {
            fence(SeqCst);
        }
        // The fence orders this read; the read itself is a plain load on x86.
        cpus.load_into(reached, Acquire);
        let targets = reached;
        let local = targets.contains(me);
        if local {
            P::flush_tlb(range);
            self.count_served(me, me);
            targets.remove(me);
        }
        if self.faults.skip_one_target.load(Relaxed) {
            if let Some(last) = targets.last_cpu() {
                targets.remove(last);
            }
        }
        if !targets.is_empty() {
            self.send_and_wait(me, targets, range);
        }
        P::preempt_enable();
        if local {
            targets.insert(me);
        }
    }

    /// Whether the host takes on `t`'s flush (`t` preempted now: KVM flushes it before it
    /// runs again); counts it if so.
    fn deferred_to_host(&self, t: u32, watched: bool) -> bool {
        if self.faults.defer_without_flag.load(Relaxed) {
            // The negative control: skipped, nothing asked of the host, nothing counted.
            return P::vcpu_is_preempted(t);
        }
        if !P::flush_tlb_on_resume(t) {
            return false;
        }
        // Counted before anything else can see the new page table's effect.
        if let Some(d) = self.deferred.get(t as usize).filter(|_| watched) {
            d.fetch_add(1, SeqCst);
        }
        self.deferred_total.fetch_add(1, Relaxed);
        true
    }

    /// Asks every CPU of `targets` (not empty) to flush `range` and waits for each but those
    /// whose flush the host takes on.
    fn send_and_wait(&self, me: u32, targets: &CpuSet, range: FlushRange) {
        let r = &self.requests[me as usize];
        let watched = me == self.watched.load(SeqCst);
        // The range before the set: a target that found this request early (through an
        // inbox bit left over, which the protocol never leaves but a fault could) flushes
        // this range, not the last one.
        let (start, pages) = match range {
            FlushRange::All => (0, 0),
            FlushRange::Pages { start, pages } => (start, pages),
        };
        r.start.store(start, SeqCst);
        r.pages.store(pages, SeqCst);
        // The request's set: the targets whose flush the host does not take on, built in
        // the request itself (no copy of the set). A target looks at it only once it finds
        // this sender in its inbox (below), and none is left there from the last request:
        // each target takes the bit before it leaves `pending`, which the sender waited
        // to see empty.
        r.pending.store(targets);
        // Counted here, where each target is visited anyway: the count the host reads.
        let mut count = 0u32;
        let mut deferred = false;
        for t in targets.iter() {
            if self.deferred_to_host(t, watched) {
                r.pending.remove(t);
                deferred = true;
            } else {
                count += 1;
            }
        }
        if count == 0 {
            return;
        }
        let rest;
        let targets = if deferred {
            rest = r.pending.load();
            &rest
        } else {
            targets
        };
        let cpu = P::cpu();
        // Published before any target can see the request, so each acknowledgement shrinks
        // it.
        record::set_ipi_wait(cpu, targets, count);
        if events::on() {
            events::emit::<P>(EventKind::IpiWait, count, targets.first_word());
        }
        self.shootdowns.fetch_add(1, Relaxed);
        for t in targets.iter() {
            self.inbox[t as usize].insert(me);
        }
        P::send_ipi_many(targets, Ipi::TlbShootdown);
        if self.faults.skip_ack_wait.load(Relaxed) {
            events::emit::<P>(EventKind::IpiWaitEnd, 0, 0);
            return;
        }
        let mut pacer = Pacer::<P>::every_us(SPIN_THRESHOLD_US);
        // Polls the request's set in place: the first word still pending, no copy.
        while let Some(laggard) = r.pending.first_cpu() {
            self.serve();
            if pacer.due() {
                // Offer the CPU to the laggard: through the pvsync host, or else through the
                // platform's own yield if it reports the laggard preempted (as Linux's
                // kvm_smp_send_call_func_ipi does with KVM's PV sched yield).
                if crate::region::pv_host() {
                    self.yields.fetch_add(1, Relaxed);
                    crate::hypercall::yield_to::<P>(laggard);
                } else if P::vcpu_is_preempted(laggard) && P::yield_to_preempted(laggard) {
                    self.yields.fetch_add(1, Relaxed);
                }
            }
            crate::sync::spin_loop();
        }
        record::clear_ipi_wait(cpu, targets);
        events::emit::<P>(EventKind::IpiWaitEnd, 0, 0);
    }
}
