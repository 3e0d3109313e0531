//! The guest side of the shared region (layout in `shared_abi`, contract in docs/abi.md):
//! allocation, registration and the header. Each CPU's own record is written in
//! `record.rs`; the hypercalls are in `hypercall.rs`.

mod hypercall;
mod record;

pub use hypercall::{idle, rcu_wait, send_ipi, yield_to};
pub use record::{
    ack_ipi_wait, boosted_for_grace_period, host_preempted, lent_by, own_spin, set_ipi_wait,
    set_locks_held, set_mode, set_preempt_count, set_rcu_nesting, set_spin, snapshot, spinning_on,
};

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use shared_abi::{
    record_offset, region_size, HostFlags, Hypercall, HypercallStatus, PageHeader, VcpuRecord,
    NO_VCPU, PAGE_SIZE,
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
/// The calling CPU publishes into its record from now on.
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
    let status = REGION
        .call_once(|| Region {
            base,
            nr_vcpus,
            status,
        })
        .status;
    attach_this_cpu();
    status
}

/// Makes the calling CPU publish into its record of the region (a no-op before the region
/// exists), carrying over what it published so far.
pub fn attach_this_cpu() {
    if let Some(rec) = record_ptr(crate::percpu::id()) {
        record::attach(rec);
    }
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

/// CPU `cpu`'s record in the region, if there is a region and such a CPU.
fn record_ptr(cpu: u32) -> Option<*mut VcpuRecord> {
    let r = REGION.get()?;
    (cpu < r.nr_vcpus).then(|| (r.base + record_offset(cpu as usize) as u64) as *mut VcpuRecord)
}

/// Publishes the RCU grace-period sequence and callback backlog in the header. Any CPU may
/// call this. The sequence only moves forward (an atomic max: a CPU preempted between
/// computing it and storing it must not take it back, or the host would read the grace
/// period in progress as over); the backlog is one aligned store, a hint.
pub fn set_rcu_header(gp_seq: u64, pending: u64) {
    if let Some(r) = REGION.get() {
        let h = r.base as *mut PageHeader;
        // SAFETY: the header lies in the live region for the kernel's lifetime; `rcu_gp_seq`
        // is 8-byte aligned (offset 32 of a 64-byte aligned header) and the guest only
        // updates it atomically (the host only reads it); the backlog is a single aligned
        // store.
        unsafe {
            AtomicU64::from_ptr(addr_of_mut!((*h).rcu_gp_seq)).fetch_max(gp_seq, Ordering::SeqCst);
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
