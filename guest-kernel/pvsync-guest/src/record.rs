//! The calling CPU's vCPU record, and reads of other CPUs' records.
//!
//! Publication rules (ABI v4, docs/abi.md):
//! - `mode` and the pair `spin_lock`/`spin_holder` are framed by `seq`: the owner makes
//!   `seq` odd, stores, makes it even. Only the outermost update on a CPU moves `seq`; an
//!   interrupt handler that publishes inside one (its `mode`, or a kernel lock it spins on,
//!   restored as it found it) sees the CPU's depth counter above zero (never `seq`'s
//!   parity: shared memory) and leaves `seq` alone. Interrupts stay enabled: `cli`/`popf`
//!   are costly under virtualization, and the depth counter makes a handler's update safe.
//! - `rcu_nesting`, `preempt_count` and `locks_held` are each one aligned volatile store by
//!   the owner, outside the frame: they change on hot paths and each means something alone.
//! - The owner's `ipi_wait` bitmap (ABI v6: outside the record) is stored word by word
//!   (atomically) by the owner before its `ipi_wait_count`, and cleared bit by bit, with an
//!   atomic AND, by each CPU that acknowledges; the owner ends a wait by storing
//!   `ipi_wait_count = 0`, then zeroing the words it set.
//!
//! x86 is TSO: stores become visible in program order, so compiler fences suffice.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicU32, Ordering};
use shared_abi::{VcpuMode, VcpuRecord, NO_VCPU};

use crate::cpu::CpuSync;
use crate::cpuset::CpuSet;
use crate::platform::Platform;
use crate::region::{ipi_wait_bitmap, pv_host, record_ptr};

/// Starts publishing into `rec` (the CPU's record in the region), carrying over the
/// counters published so far into its sink.
pub(crate) fn attach(cpu: &CpuSync, rec: *mut VcpuRecord) {
    let old = cpu.record();
    // SAFETY: `old` is this CPU's sink and `rec` its record in the live region; this CPU is
    // the only writer of both guest halves; volatile accesses of plain integers.
    unsafe {
        write_volatile(
            addr_of_mut!((*rec).rcu_nesting),
            read_volatile(addr_of!((*old).rcu_nesting)),
        );
        write_volatile(
            addr_of_mut!((*rec).preempt_count),
            read_volatile(addr_of!((*old).preempt_count)),
        );
        write_volatile(
            addr_of_mut!((*rec).locks_held),
            read_volatile(addr_of!((*old).locks_held)),
        );
    }
    cpu.set_record(rec);
}

/// Updates `cpu`'s record (the caller's own) inside a `seq` frame: `f` stores fields
/// through the raw pointer it gets (only `mode`, `spin_lock` and `spin_holder` need this).
fn publish(cpu: &CpuSync, f: impl FnOnce(*mut VcpuRecord)) {
    let rec = cpu.record();
    let depth = cpu.publish_depth();
    let outer = depth.get() == 0;
    depth.set(depth.get() + 1);
    compiler_fence(Ordering::SeqCst);
    // SAFETY: this CPU is the only writer of its record's guest half (nested updates are
    // this CPU's interrupt handlers, ordered by the depth counter), and the record lives
    // forever.
    unsafe {
        let seq = addr_of_mut!((*rec).seq);
        if outer {
            write_volatile(seq, read_volatile(seq).wrapping_add(1));
        }
        compiler_fence(Ordering::SeqCst);
        f(rec);
        compiler_fence(Ordering::SeqCst);
        if outer {
            write_volatile(seq, read_volatile(seq).wrapping_add(1));
        }
    }
    compiler_fence(Ordering::SeqCst);
    depth.set(depth.get() - 1);
}

/// Publishes the calling CPU's execution mode.
#[inline]
pub fn publish_mode<P: Platform>(mode: VcpuMode) {
    if set_mode(P::cpu(), mode) {
        crate::events::emit::<P>(shared_abi::EventKind::Mode, mode as u32, 0);
    }
}

/// Publishes the calling CPU's execution mode (`cpu`: its own block).
/// Skips the update when the mode is unchanged: an idle CPU woken by its tick then writes
/// nothing (and is never caught mid-update by a host snapshot while it idles). True if the
/// mode changed.
pub(crate) fn set_mode(cpu: &CpuSync, mode: VcpuMode) -> bool {
    let rec = cpu.record();
    // SAFETY: this CPU is the only writer of its record's guest half; reading it back is a
    // plain volatile load of our own store.
    if unsafe { read_volatile(addr_of!((*rec).mode)) } == mode as u8 {
        return false;
    }
    // SAFETY: `rec` is this CPU's record, handed over by `publish`.
    publish(cpu, |rec| unsafe {
        write_volatile(addr_of_mut!((*rec).mode), mode as u8)
    });
    true
}

/// What the calling CPU has published as (lock it spins on, vCPU in the way).
pub(crate) fn own_spin(cpu: &CpuSync) -> (u64, u32) {
    let rec = cpu.record();
    // SAFETY: this CPU is the only writer of these fields; volatile reads of our own stores.
    unsafe {
        (
            read_volatile(addr_of!((*rec).spin_lock)),
            read_volatile(addr_of!((*rec).spin_holder)),
        )
    }
}

/// Publishes "spinning on `lock`, held by `holder`" (lock 0 and NO_VCPU: not spinning).
/// One frame: the host never pairs a lock with the holder of another.
pub(crate) fn set_spin(cpu: &CpuSync, lock: u64, holder: u32) {
    // SAFETY: `rec` is this CPU's record, handed over by `publish`.
    publish(cpu, |rec| unsafe {
        write_volatile(addr_of_mut!((*rec).spin_lock), lock);
        write_volatile(addr_of_mut!((*rec).spin_holder), holder);
    });
}

macro_rules! single_store_setter {
    ($(#[$doc:meta])* $name:ident, $field:ident) => {
        $(#[$doc])*
        /// `cpu` is the calling CPU's block.
        #[inline]
        pub(crate) fn $name(cpu: &CpuSync, v: u32) {
            // SAFETY: `cpu.record()` is this CPU's record (or its sink), which only this CPU
            // writes and which lives forever; one aligned 4-byte store, which the host may
            // read alone (ABI v4: outside the seq frame).
            unsafe { write_volatile(addr_of_mut!((*cpu.record()).$field), v) }
        }
    };
}

single_store_setter!(
    /// Publishes the calling CPU's preempt-disable depth (one store, no frame).
    set_preempt_count, preempt_count
);
single_store_setter!(
    /// Publishes the calling CPU's RCU read-side nesting (one store, no frame).
    set_rcu_nesting, rcu_nesting
);
single_store_setter!(
    /// Publishes how many spinlocks the calling CPU holds (one store, no frame).
    set_locks_held, locks_held
);

/// The `ipi_wait_count` field of `rec`, which only its owner stores (atomically: the host
/// reads it alone).
///
/// # Safety
/// `rec` must be a live record (in the region, or a CPU's sink).
unsafe fn ipi_wait_count(rec: *mut VcpuRecord) -> &'static AtomicU32 {
    // SAFETY: per the contract the record lives forever; the field is 4-byte aligned (the
    // record is 64-byte aligned, the field at offset 32) and the guest only accesses it
    // atomically (the host only reads it).
    unsafe { AtomicU32::from_ptr(addr_of_mut!((*rec).ipi_wait_count)) }
}

/// Publishes, for the calling CPU, that it waits on `targets` for IPI acknowledgements
/// (see [`Shootdowns`](crate::tlb::Shootdowns), which does this itself); end the wait with
/// [`end_ipi_wait`].
pub fn publish_ipi_wait<P: Platform>(targets: &CpuSet) {
    set_ipi_wait(P::cpu(), targets, targets.len() as u32);
}

/// Ends the wait [`publish_ipi_wait`] published for `targets` on the calling CPU.
pub fn end_ipi_wait<P: Platform>(targets: &CpuSet) {
    clear_ipi_wait(P::cpu(), targets);
}

/// Publishes the set of CPUs the caller waits on for IPI acknowledgements: every word of
/// its `ipi_wait` bitmap, then `ipi_wait_count` (release: a host that reads the count finds
/// the bitmap set), `count` being `targets.len()` (which the caller counted as it built
/// the set). Call it before the targets can see the request: an acknowledgement that came
/// first would have its bit set again here.
#[inline]
pub(crate) fn set_ipi_wait(cpu: &CpuSync, targets: &CpuSet, count: u32) {
    debug_assert_eq!(targets.len(), count as usize);
    cpu.ipi_wait().store(targets);
    // SAFETY: `record()` is this CPU's record or sink, live forever.
    unsafe { ipi_wait_count(cpu.record()) }.store(count, Ordering::Release);
}

/// Ends the caller's wait on `targets`: `ipi_wait_count` 0 first (the host stops reading
/// the bitmap), then the words `targets` set are zeroed (every target cleared its bit
/// already; this only drops what a hostile scribble left).
#[inline]
pub(crate) fn clear_ipi_wait(cpu: &CpuSync, targets: &CpuSet) {
    // SAFETY: as in `set_ipi_wait`.
    unsafe { ipi_wait_count(cpu.record()) }.store(0, Ordering::Release);
    cpu.ipi_wait().clear_words_of(targets);
}

/// CPU `me` acknowledges an IPI of CPU `sender`: clears bit `me` of the sender's
/// `ipi_wait` bitmap (atomic AND on its word: several CPUs acknowledge at once).
#[inline]
pub fn ack_ipi_wait(sender: u32, me: u32) {
    ipi_wait_bitmap(sender).remove(me);
}

/// What CPU `cpu` publishes it waits on: its `ipi_wait_count` and its `ipi_wait` bitmap
/// (None without a region or for no such CPU).
pub fn ipi_wait(cpu: u32) -> Option<(u32, CpuSet)> {
    let rec = record_ptr(cpu)?;
    // SAFETY: a record of the live region.
    let count = unsafe { ipi_wait_count(rec) }.load(Ordering::Acquire);
    Some((count, ipi_wait_bitmap(cpu).load()))
}

/// The vCPU that lent the calling vCPU the turn it runs on (`host_lent_by` minus one), if
/// any: one volatile load of the caller's own record; never set without a pvsync host.
#[inline]
pub fn lent_by(cpu: &CpuSync) -> Option<u32> {
    // SAFETY: the caller's record (or sink) lives forever; the host half is written by the
    // host only, read here with one volatile load of an aligned u32.
    let v = unsafe { read_volatile(addr_of!((*cpu.record()).host_lent_by)) };
    // NO_VCPU is a turn given for a grace period, not lent by anyone.
    (v != NO_VCPU).then(|| v.checked_sub(1)).flatten()
}

/// Whether the host runs this vCPU on a turn it gave because a grace period waits on it
/// (`host_lent_by == NO_VCPU`, ABI v4): the turn goes back with `YieldTo(self)` once this
/// CPU has reported its quiescent state.
pub fn boosted_for_grace_period(cpu: &CpuSync) -> bool {
    // SAFETY: as in `lent_by`: one volatile load of an aligned host-written u32.
    unsafe { read_volatile(addr_of!((*cpu.record()).host_lent_by)) == NO_VCPU }
}

/// The lock CPU `cpu` publishes it spins on (0: none, or no such CPU). One aligned field,
/// readable without the frame.
pub fn spinning_on(cpu: u32) -> u64 {
    // SAFETY: a record of the live region; volatile read of an aligned u64.
    record_ptr(cpu).map_or(0, |rec| unsafe {
        read_volatile(addr_of!((*rec).spin_lock))
    })
}

/// Whether the host says it keeps CPU `cpu` runnable but descheduled (`host_preempted`);
/// false without a pvsync host, which never writes it.
pub fn host_preempted(cpu: u32) -> bool {
    if !pv_host() {
        return false;
    }
    // SAFETY: a record of the live region; the host half is written by the host only, read
    // here with one volatile load.
    record_ptr(cpu)
        .is_some_and(|rec| unsafe { read_volatile(addr_of!((*rec).host_preempted)) } != 0)
}

/// Attempts before a record that keeps changing (or stays odd) is given up on.
const SNAPSHOT_ATTEMPTS: usize = 1000;

/// A consistent copy of CPU `cpu`'s record, or None if out of range or never consistent
/// within the attempts. Fields outside the frame are each as one store left them.
pub fn snapshot(cpu: u32) -> Option<VcpuRecord> {
    let rec = record_ptr(cpu)?;
    for _ in 0..SNAPSHOT_ATTEMPTS {
        // SAFETY: the record lies in the live region; volatile reads of plain integers.
        unsafe {
            let before = read_volatile(addr_of!((*rec).seq));
            compiler_fence(Ordering::SeqCst);
            let copy = read_volatile(rec);
            compiler_fence(Ordering::SeqCst);
            let after = read_volatile(addr_of!((*rec).seq));
            if VcpuRecord::seq_consistent(before, after) {
                // `ipi_wait_count` is only ever accessed atomically.
                let mut copy = copy;
                copy.ipi_wait_count = ipi_wait_count(rec).load(Ordering::Acquire);
                return Some(copy);
            }
        }
        core::hint::spin_loop();
    }
    None
}
