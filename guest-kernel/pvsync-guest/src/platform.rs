//! What the crate needs from the kernel that uses it.
//!
//! A kernel implements [`Platform`] once, on a unit type, and names that type in the crate's
//! generic types (`TicketLock<MyPlatform>`, `Shootdowns<MyPlatform>`, `Rcu<MyPlatform>`).
//! Every function is associated (no `self`): a kernel has one platform, and static dispatch
//! keeps a lock's fast path free of indirect calls.

use crate::cpu::CpuSync;
use crate::cpuset::CpuSet;

/// Interrupts the crate sends between CPUs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ipi {
    /// Wakes a CPU halted in a lock's slow path, or asks a grace period's holdout for a
    /// quiescent state (the handler only has to return: a tick-like interruption).
    Reschedule,
    /// Asks the target to call [`Shootdowns::serve`](crate::tlb::Shootdowns::serve).
    TlbShootdown,
    /// Wakes a CPU halted in a queued lock's slow path; no handler has to run, so a
    /// platform may use a cheaper wake-up than an interrupt (KVM's kick).
    Kick,
}

/// Sleepers the RCU core wakes (kernel threads and waiters the kernel schedules).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wake {
    /// The grace-period thread (every updater waits on it: it should run first).
    GracePeriodThread,
    /// Tasks waiting for a grace period to complete.
    GracePeriodWaiters,
    /// CPU `cpu`'s callback thread.
    Callbacks(u32),
}

/// A range of pages to flush from the calling CPU's TLB.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FlushRange {
    /// Every non-global translation (a CR3 reload).
    All,
    /// `pages` 4 KiB pages from virtual address `start`.
    Pages {
        /// First page's address.
        start: u64,
        /// Number of pages (at least 1).
        pages: u64,
    },
}

/// The machine as the crate reaches it.
///
/// # Safety
/// The crate's per-CPU state relies on this contract:
/// - [`Platform::cpu`] returns the running CPU's own [`CpuSync`], initialised
///   ([`CpuSync::init`]) with that CPU's id, and never one that code running concurrently
///   (another CPU) also gets;
/// - while preemption is disabled ([`Platform::preempt_disable`]) the calling code stays on
///   its CPU, and nothing else runs there but interrupt handlers, which nest;
/// - [`Platform::halt_while`] and the interrupt functions do what they say.
pub unsafe trait Platform: 'static {
    /// The calling CPU's state (set up with [`CpuSync::init`] before the CPU takes any lock).
    fn cpu() -> &'static CpuSync;

    /// Disables preemption (nests). The kernel counts it and publishes the count with
    /// [`CpuSync::publish_preempt_count`].
    fn preempt_disable();
    /// Re-enables preemption; may switch tasks when the count reaches 0.
    fn preempt_enable();
    /// Whether the calling code could be preempted now (preemption count 0): then it is
    /// in no RCU reader.
    fn preemptible() -> bool;

    /// Whether interrupts are enabled on the calling CPU.
    fn irqs_enabled() -> bool;
    /// Disables interrupts; returns whether they were enabled.
    fn irqs_save() -> bool;
    /// Enables interrupts again if `were_enabled`.
    fn irqs_restore(were_enabled: bool);

    /// Called with interrupts enabled (a halt with them off would let handlers run inside
    /// the caller's interrupts-off section). With interrupts disabled, checks
    /// `still_waiting` and, if it holds, halts until an interrupt arrives; an interrupt sent after the check must end the halt (it stays
    /// pending while interrupts are off: `sti; hlt`, or the host's idle hypercall). Returns
    /// with interrupts as they were. May return early (any interrupt).
    fn halt_while(still_waiting: &dyn Fn() -> bool);

    /// Sends `ipi` to CPU `cpu`.
    fn send_ipi(cpu: u32, ipi: Ipi);

    /// Sends `ipi` to every CPU of `cpus` (in one hypercall where the host has one).
    fn send_ipi_many(cpus: &CpuSet, ipi: Ipi) {
        cpus.iter().for_each(|c| Self::send_ipi(c, ipi));
    }

    /// Whether the host reports CPU `cpu` preempted (off its physical CPU while runnable)
    /// through a channel of the platform's own, such as KVM's steal-time area; false when
    /// it cannot tell. Advisory: the crate only uses it to stop spinning on, or to yield
    /// to, a CPU that will not make progress soon.
    fn vcpu_is_preempted(_cpu: u32) -> bool {
        false
    }

    /// Asks the host to flush CPU `cpu`'s TLB before `cpu` next runs, if `cpu` is preempted
    /// now (KVM's PV TLB flush). True only if the request is certain to be honoured before
    /// `cpu` runs guest code again: the shootdown then sends it no IPI and does not wait for
    /// it. Never true for a CPU that may be running.
    fn flush_tlb_on_resume(_cpu: u32) -> bool {
        false
    }

    /// Where no pvsync host answers: offers this CPU's time to CPU `cpu`, which the host
    /// reports preempted, by the platform's own means (KVM's PV sched yield). False if the
    /// platform has none.
    fn yield_to_preempted(_cpu: u32) -> bool {
        false
    }

    /// A monotonic clock, in ticks of the platform's choice.
    fn now() -> u64;
    /// `us` microseconds in ticks of [`Platform::now`].
    fn us_to_ticks(us: u64) -> u64;

    /// The time stamp counter, which stamps [`events`](crate::events): the host maps it to
    /// its own clock (a platform whose [`Platform::now`] is the TSC returns the same).
    fn tsc() -> u64;

    /// Flushes `range` from the calling CPU's TLB.
    fn flush_tlb(range: FlushRange);

    /// A 32-bit write to hypercall port `port` (one VM exit).
    fn hypercall_out(port: u16, value: u32);
    /// A 32-bit read from hypercall port `port` (the last call's status).
    fn hypercall_in(port: u16) -> u32;

    /// Called in each slow round of every busy wait (a lock waiter, a shootdown sender):
    /// serves what other CPUs may be waiting on from this one, so that two waiters never
    /// wait on each other. A kernel serves its TLB shootdown requests here.
    fn serve_waiters() {}

    /// Wakes `who` (RCU's threads and waiters).
    fn wake(who: Wake);
}
