//! The guest side of the shared region (layout in `shared_abi`, contract in docs/abi.md).
//!
//! Each CPU writes only its own record, with plain volatile stores framed by the record's
//! sequence counter; x86 keeps stores in program order, so compiler fences suffice. Updates
//! run with interrupts off so that an interrupt handler never nests inside one.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU64, Ordering};
use shared_abi::{
    record_offset, region_size, HostFlags, Hypercall, HypercallStatus, IpiDest, IpiRequest,
    PageHeader, VcpuMode, VcpuRecord, NO_VCPU, PAGE_SIZE,
};
use spin::Once;
use x86_64::instructions::port::Port;

struct Region {
    base: u64,
    nr_vcpus: u32,
    status: HypercallStatus,
}

static REGION: Once<Region> = Once::new();

/// A pvsync host accepted the region: idle and IPIs go through its hypercalls.
static PV_HOST: AtomicBool = AtomicBool::new(false);

/// Whether a pvsync host accepted the shared region.
#[inline]
pub fn pv_host() -> bool {
    PV_HOST.load(Ordering::Relaxed)
}

/// Allocates and fills the region for `nr_vcpus` CPUs and registers it with the host.
/// Without a pvsync host the status says so and the region is still used (unread).
pub fn init(nr_vcpus: u32) -> HypercallStatus {
    let size = region_size(nr_vcpus as usize);
    let base =
        crate::mm::frame::alloc_contiguous_or_panic((size / PAGE_SIZE) as u64, "the shared region");
    // SAFETY: freshly allocated, identity-mapped frames that only this module uses; the
    // header is written before the host learns the address.
    unsafe {
        core::ptr::write_bytes(base as *mut u8, 0, size);
        write_volatile(base as *mut PageHeader, PageHeader::new(nr_vcpus));
        for cpu in 0..nr_vcpus as usize {
            let rec = (base + record_offset(cpu) as u64) as *mut VcpuRecord;
            write_volatile(addr_of_mut!((*rec).spin_holder), NO_VCPU);
        }
    }
    let status = register(base);
    PV_HOST.store(status == HypercallStatus::Ok, Ordering::Release);
    REGION
        .call_once(|| Region {
            base,
            nr_vcpus,
            status,
        })
        .status
}

/// Makes the RegisterSharedRegion hypercall for `base` and reads back its status.
pub fn register(base: u64) -> HypercallStatus {
    let addr = u32::try_from(base).expect("shared region above 4 GiB");
    let mut port: Port<u32> = Port::new(Hypercall::RegisterSharedRegion.port());
    // SAFETY: the hypercall port only makes the host read guest memory at `base`; an
    // unclaimed port drops the write and reads all ones.
    unsafe {
        port.write(addr);
        HypercallStatus::from_raw(port.read())
    }
}

/// Reads the last hypercall status with an 8-bit `in` (an ABI violation): the low byte.
pub fn status_byte() -> u8 {
    let mut narrow: Port<u8> = Port::new(Hypercall::RegisterSharedRegion.port());
    // SAFETY: reading the status port has no effect on guest memory.
    unsafe { narrow.read() }
}

/// The RegisterSharedRegion hypercall made with an 8-bit write (an ABI violation).
pub fn register_with_byte_write(base: u8) -> HypercallStatus {
    let mut narrow: Port<u8> = Port::new(Hypercall::RegisterSharedRegion.port());
    let mut port: Port<u32> = Port::new(Hypercall::RegisterSharedRegion.port());
    // SAFETY: as in `register`; a narrow write only makes the host refuse the call.
    unsafe {
        narrow.write(base);
        HypercallStatus::from_raw(port.read())
    }
}

/// Guest-physical address of the region, its vCPU count and registration status.
pub fn info() -> Option<(u64, u32, HypercallStatus)> {
    REGION.get().map(|r| (r.base, r.nr_vcpus, r.status))
}

/// Whether the host has set ACCEPTED in the header.
pub fn host_accepted() -> bool {
    REGION.get().is_some_and(|r| {
        // SAFETY: the header lies in the region, which lives forever; volatile because the
        // host writes host_flags.
        let flags = unsafe { read_volatile(addr_of!((*(r.base as *const PageHeader)).host_flags)) };
        flags & HostFlags::ACCEPTED != 0
    })
}

fn record_ptr(cpu: u32) -> Option<*mut VcpuRecord> {
    let r = REGION.get()?;
    (cpu < r.nr_vcpus).then(|| (r.base + record_offset(cpu as usize) as u64) as *mut VcpuRecord)
}

/// Updates the calling CPU's record: `f` stores fields through the raw pointer it gets.
///
/// Plain stores only (no interrupt masking, which is costly in a VM): only the outermost
/// update on a CPU moves `seq`. An interrupt handler that publishes in the middle of an
/// update (handlers only ever publish `mode`, one store) finds `seq` already odd and leaves
/// it alone, so the host never accepts a copy taken during either.
pub fn publish(f: impl FnOnce(*mut VcpuRecord)) {
    if let Some(rec) = record_ptr(crate::percpu::id()) {
        publish_at(rec, f);
    }
}

/// `publish` for a record pointer the caller already looked up (this CPU's own).
fn publish_at(rec: *mut VcpuRecord, f: impl FnOnce(*mut VcpuRecord)) {
    let depth = crate::percpu::publish_depth();
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
/// Skips the update when the mode is unchanged: an idle CPU woken by its tick then writes
/// nothing (and is never caught mid-update by a host snapshot while it idles).
pub fn set_mode(mode: VcpuMode) {
    let Some(rec) = record_ptr(crate::percpu::id()) else {
        return;
    };
    // SAFETY: this CPU is the only writer of its record's guest half; reading it back is a
    // plain volatile load of our own store.
    if unsafe { read_volatile(addr_of!((*rec).mode)) } == mode as u8 {
        return;
    }
    // SAFETY: `rec` is this CPU's record, handed over by `publish_at`.
    publish_at(rec, |rec| unsafe {
        write_volatile(addr_of_mut!((*rec).mode), mode as u8)
    });
}

/// Attempts before a record that keeps changing (or stays odd) is given up on.
const SNAPSHOT_ATTEMPTS: usize = 1000;

/// A consistent copy of CPU `cpu`'s record (used by self-tests), or None if out of range or
/// never consistent within the attempts.
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
                return Some(copy);
            }
        }
        core::hint::spin_loop();
    }
    None
}

macro_rules! record_setter {
    ($(#[$doc:meta])* $name:ident, $field:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(v: $ty) {
            // SAFETY: `rec` is this CPU's record, handed over by `publish`.
            publish(|rec| unsafe { write_volatile(addr_of_mut!((*rec).$field), v) });
        }
    };
}

record_setter!(
    /// Publishes the calling CPU's preempt-disable depth.
    set_preempt_count, preempt_count: u32
);
record_setter!(
    /// Publishes the calling CPU's RCU read-side nesting.
    set_rcu_nesting, rcu_nesting: u32
);
record_setter!(
    /// Publishes how many spinlocks the calling CPU holds.
    set_locks_held, locks_held: u32
);
record_setter!(
    /// Publishes the set of CPUs the caller waits on for IPI acknowledgements.
    set_ipi_wait, ipi_wait: u64
);

/// Publishes "spinning on `lock`, held by `holder`" (lock 0 and NO_VCPU: not spinning).
pub fn set_spin(lock: u64, holder: u32) {
    // SAFETY: `rec` is this CPU's record, handed over by `publish`.
    publish(|rec| unsafe {
        write_volatile(addr_of_mut!((*rec).spin_lock), lock);
        write_volatile(addr_of_mut!((*rec).spin_holder), holder);
    });
}

/// Publishes the RCU grace-period sequence and callback backlog in the header. Any CPU may
/// call this: each field is one aligned 64-bit store.
pub fn set_rcu_header(gp_seq: u64, pending: u64) {
    if let Some(r) = REGION.get() {
        let h = r.base as *mut PageHeader;
        // SAFETY: the header lies in the live region; single aligned stores.
        unsafe {
            write_volatile(addr_of_mut!((*h).rcu_gp_seq), gp_seq);
            write_volatile(addr_of_mut!((*h).rcu_callbacks_pending), pending);
        }
    }
}

/// The header's `rcu_gp_holdouts` word, which CPUs update concurrently (the grace-period
/// kthread sets it, each CPU clears its own bit when it reports); a private word when there
/// is no region, so callers need not care.
pub fn rcu_holdouts() -> &'static AtomicU64 {
    static UNSHARED: AtomicU64 = AtomicU64::new(0);
    match REGION.get() {
        // SAFETY: the header lives as long as the kernel, the field is 8-byte aligned (the
        // header is 64-byte aligned, the field at offset 48), and the guest only ever
        // accesses it atomically; the host only reads it.
        Some(r) => unsafe {
            AtomicU64::from_ptr(addr_of_mut!((*(r.base as *mut PageHeader)).rcu_gp_holdouts))
        },
        None => &UNSHARED,
    }
}

/// The header's RCU fields as last published (for tests).
pub fn rcu_header() -> Option<(u64, u64)> {
    REGION.get().map(|r| {
        let h = r.base as *const PageHeader;
        // SAFETY: as above; volatile reads of plain integers.
        unsafe {
            (
                read_volatile(addr_of!((*h).rcu_gp_seq)),
                read_volatile(addr_of!((*h).rcu_callbacks_pending)),
            )
        }
    })
}

/// Offers this vCPU's time to vCPU `target`, which the caller waits for: the pvsync YieldTo
/// hypercall when a pvsync host accepted the region, else nothing (the caller keeps
/// spinning). KVM's own `vmcall`/`vmmcall` PV sched-yield is not used: on the nested (PVM)
/// hosts this runs on, the hypercall instruction does not return.
pub fn yield_to(target: u32) {
    if REGION
        .get()
        .is_some_and(|r| r.status == HypercallStatus::Ok)
    {
        let mut port: Port<u32> = Port::new(Hypercall::YieldTo.port());
        // SAFETY: the hypercall only asks the host to run someone else; no memory effects.
        unsafe { port.write(target) };
    }
}

/// Idles through the host (the `Idle` hypercall) for at most `timeout_us`; false, without
/// waiting, when no pvsync host accepted the region (the caller halts instead). Call it with
/// interrupts enabled, right after checking for work: a wake-up IPI sent after that check
/// makes the hypercall return at once.
pub fn idle(timeout_us: u32) -> bool {
    if !pv_host() {
        return false;
    }
    let mut port: Port<u32> = Port::new(Hypercall::Idle.port());
    // SAFETY: the hypercall only blocks this vCPU in the host; no memory effects.
    unsafe { port.write(timeout_us) };
    true
}

/// Sends fixed interrupt `vector` to vCPU `dest` (or to all but the caller) through the host
/// (the `SendIpi` hypercall); false when no pvsync host accepted the region (the caller
/// writes the APIC's ICR instead).
pub fn send_ipi(dest: IpiDest, vector: u8) -> bool {
    if !pv_host() {
        return false;
    }
    let mut port: Port<u32> = Port::new(Hypercall::SendIpi.port());
    // SAFETY: the host injects an interrupt; the port write orders all earlier stores before
    // it, so the target sees what the IPI announces.
    unsafe { port.write(IpiRequest { vector, dest }.encode()) };
    true
}
