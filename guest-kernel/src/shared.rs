//! The kernel's side of the region shared with the host: allocating it and the calls the
//! rest of the kernel makes, on the calling CPU, into the synchronization crate's record
//! publication (`pvsync_guest::record`) and hypercall transport
//! (`pvsync_guest::hypercall`). The layout is `shared_abi`'s, the contract docs/abi.md.

use pvsync_guest::{hypercall, record, region, CpuSet};
use shared_abi::{Hypercall, HypercallStatus, IpiDest, VcpuMode, VcpuRecord, PAGE_SIZE};
use x86_64::instructions::port::Port;

use crate::platform::Kernel;

pub use pvsync_guest::region::{host_accepted, info, pv_host, rcu_header};

/// Allocates and fills the region for `nr_vcpus` CPUs and registers it with the host
/// (unless `tell_host` is false: `pvsync=off`, a run as on a stock host). Without a pvsync
/// host the status says so and the region is still used (unread). The calling CPU
/// publishes into its record from now on.
pub fn init(nr_vcpus: u32, tell_host: bool) -> HypercallStatus {
    let size = region::size(nr_vcpus);
    let base =
        crate::mm::frame::alloc_contiguous_or_panic((size / PAGE_SIZE) as u64, "the shared region");
    // SAFETY: freshly allocated, identity-mapped frames (so the guest-physical address is
    // the pointer) that nothing else uses, for good.
    unsafe {
        if tell_host {
            region::init::<Kernel>(base as *mut u8, base, nr_vcpus)
        } else {
            region::init_unregistered::<Kernel>(base as *mut u8, base, nr_vcpus)
        }
    }
}

/// Makes the calling CPU publish into its record of the region (a no-op before the region
/// exists), carrying over what it published so far.
pub fn attach_this_cpu() {
    region::attach_this_cpu::<Kernel>();
}

/// Makes the RegisterSharedRegion hypercall for `base` and reads back its status.
pub fn register(base: u64) -> HypercallStatus {
    region::register::<Kernel>(base)
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
    // SAFETY: a narrow write to the hypercall port only makes the host refuse the call.
    unsafe { narrow.write(base) };
    HypercallStatus::from_raw(crate::arch::port_in(Hypercall::RegisterSharedRegion.port()))
}

/// Publishes the calling CPU's execution mode.
#[inline]
pub fn set_mode(mode: VcpuMode) {
    record::publish_mode::<Kernel>(mode);
}

/// Publishes the set of CPUs the caller waits on for IPI acknowledgements (its `ipi_wait`
/// bitmap, then its `ipi_wait_count`).
pub fn set_ipi_wait(targets: &CpuSet) {
    record::publish_ipi_wait::<Kernel>(targets);
}

/// Ends the caller's wait on `targets` (`ipi_wait_count` 0, then the bitmap's words).
pub fn end_ipi_wait(targets: &CpuSet) {
    record::end_ipi_wait::<Kernel>(targets);
}

/// CPU `me` acknowledges an IPI of CPU `sender` in the sender's `ipi_wait` bitmap.
pub fn ack_ipi_wait(sender: u32, me: u32) {
    record::ack_ipi_wait(sender, me);
}

/// What CPU `cpu` publishes it waits on: its `ipi_wait_count` and the CPUs of its
/// `ipi_wait` bitmap (None without a region or for no such CPU).
pub fn ipi_wait(cpu: u32) -> Option<(u32, CpuSet)> {
    record::ipi_wait(cpu)
}

/// A consistent copy of CPU `cpu`'s record (self-tests).
pub fn snapshot(cpu: u32) -> Option<VcpuRecord> {
    record::snapshot(cpu)
}

/// Offers this vCPU's time to vCPU `target` (nothing without a pvsync host).
pub fn yield_to(target: u32) {
    hypercall::yield_to::<Kernel>(target);
}

/// Idles through the host for at most `timeout_us`; false without a pvsync host.
pub fn idle(timeout_us: u32) -> bool {
    hypercall::idle::<Kernel>(timeout_us)
}

/// Sends interrupt `vector` through the host; false without a pvsync host.
pub fn send_ipi(dest: IpiDest, vector: u8) -> bool {
    hypercall::send_ipi::<Kernel>(dest, vector)
}
