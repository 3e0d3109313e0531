//! What KVM leaves out of steal time on this host, supplied by the VMM: the
//! `KVM_VCPU_PREEMPTED` flag of a vCPU's steal-time area (`shared_abi::kvm_para`).
//!
//! KVM sets the flag only when the host scheduler preempts a vCPU thread inside KVM_RUN;
//! under the slot scheduler a descheduled vCPU waits outside KVM_RUN, where KVM never
//! looks (and on this nested host KVM never sets it at all). So the vCPU's own thread sets
//! it when it gives up its slot, after KVM_RUN has returned, and KVM clears it at the next
//! entry, exchanging the byte for 0 and flushing the TLB first if a guest sender asked
//! (`KVM_VCPU_FLUSH_TLB`). Only that thread may set it, and only then: a flag set while
//! the vCPU runs guest code would let a sender skip a shootdown the vCPU needs (the
//! CVE-2019-3016 class). The bit is or-ed in atomically, so a flush request a sender made
//! since an earlier marking (with no entry in between) survives.

use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use shared_abi::kvm_para::{
    steal_time_gpa, KVM_VCPU_PREEMPTED, MSR_KVM_STEAL_TIME, STEAL_TIME_PREEMPTED_OFFSET,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

#[derive(Debug, thiserror::Error)]
pub enum StealTimeError {
    #[error("KVM_GET_MSRS (MSR_KVM_STEAL_TIME) failed: {0}")]
    ReadMsr(kvm_ioctls::Error),
    #[error("building the MSR list for KVM_GET_MSRS")]
    MsrList,
    #[error("the guest's steal-time area at {gpa:#x} is not in guest memory")]
    OutsideMemory { gpa: u64 },
}

/// Reads the vCPU's `MSR_KVM_STEAL_TIME` (KVM_GET_MSRS, from the vCPU's thread, outside
/// KVM_RUN): the area's address if the guest enabled steal time.
fn area(fd: &VcpuFd) -> Result<Option<u64>, StealTimeError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KVM_STEAL_TIME,
        ..Default::default()
    }])
    .map_err(|_| StealTimeError::MsrList)?;
    let read = fd.get_msrs(&mut msrs).map_err(StealTimeError::ReadMsr)?;
    Ok((read == 1)
        .then(|| steal_time_gpa(msrs.as_slice()[0].data))
        .flatten())
}

/// Sets `KVM_VCPU_PREEMPTED` in the steal-time area of the vCPU of `fd`, which has left
/// KVM_RUN and is about to wait for CPU; call it only from that vCPU's thread, between
/// KVM_RUN calls. Ok(false) if the guest has no area enabled.
pub fn mark_preempted(fd: &VcpuFd, mem: &GuestMemoryMmap) -> Result<bool, StealTimeError> {
    let Some(gpa) = area(fd)? else {
        return Ok(false);
    };
    let at = gpa
        .checked_add(STEAL_TIME_PREEMPTED_OFFSET)
        .ok_or(StealTimeError::OutsideMemory { gpa })?;
    let slice = mem
        .get_slice(GuestAddress(at), 1)
        .map_err(|_| StealTimeError::OutsideMemory { gpa })?;
    // An atomic read-modify-write of one byte of guest memory: the guest's senders
    // compare-and-exchange the same byte (a u8 is always aligned).
    let byte: &AtomicU8 = slice
        .get_atomic_ref(0)
        .map_err(|_| StealTimeError::OutsideMemory { gpa })?;
    byte.fetch_or(KVM_VCPU_PREEMPTED, Ordering::AcqRel);
    Ok(true)
}
