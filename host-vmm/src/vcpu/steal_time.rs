//! What KVM leaves out of steal time on this host, supplied by the VMM: the
//! `KVM_VCPU_PREEMPTED` flag of a vCPU's steal-time area (`shared_abi::kvm_para`).
//!
//! KVM sets the flag (a plain store) only when the host scheduler preempts a vCPU thread
//! inside KVM_RUN at an instruction boundary; under the slot scheduler a descheduled vCPU
//! waits outside KVM_RUN, where KVM never looks, and on this nested host ("PVM") KVM never
//! sets it at all. So when the slot scheduler takes a vCPU off its slot, the vCPU's own
//! thread sets it, after KVM_RUN has returned at an instruction boundary (the caller's
//! duty: no port or MMIO access left for KVM to complete), and KVM clears it at the next
//! entry, exchanging the byte for 0 and flushing the TLB first if a guest sender asked
//! (`KVM_VCPU_FLUSH_TLB`). A flag set while the vCPU can still run guest code, or finish an
//! instruction, would let a sender skip a flush the vCPU needs (CVE-2019-3016, and
//! CVE-2022-39189 for the instruction boundary). The bit is or-ed in atomically.
//!
//! Only where KVM never writes the byte itself ([`kvm_never_marks_preempted`]): KVM's own
//! store would overwrite a flush request our marking let a sender make (KVM, not knowing of
//! our mark, believes the byte clear).

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

/// After this many markings in a row found no steal-time area (a guest with `kvm=none`),
/// only every [`MISS_STRIDE`]-th deschedule looks again: each look is a vCPU ioctl.
const MISS_LIMIT: u32 = 16;
const MISS_STRIDE: u32 = 16;

/// Whether this host's KVM never sets `KVM_VCPU_PREEMPTED` itself, so that the VMM may:
/// true on nested "PVM" KVM (module `kvm_pvm`), which never reports a preemption (measured
/// here: its `preemption_reported` counter stays 0). Elsewhere KVM sets it with a plain
/// store that could overwrite a sender's flush request made after our mark, so the VMM
/// leaves the flag to KVM.
pub fn kvm_never_marks_preempted() -> bool {
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| {
        let loaded = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
        // PVM serves /dev/kvm only where no hardware KVM module is loaded beside it.
        loaded("kvm_pvm") && !loaded("kvm_intel") && !loaded("kvm_amd")
    })
}

/// One vCPU thread's marking state.
#[derive(Debug)]
pub struct PreemptedMarker {
    enabled: bool,
    /// Marked since the vCPU last called KVM_RUN: a second marking adds nothing.
    marked: bool,
    /// Markings in a row that found no area (wrapping: after 2^32 it looks 16 times).
    misses: u32,
}

impl PreemptedMarker {
    /// A marker that marks only if `enabled` (a backend that takes vCPUs off, on a host
    /// whose KVM leaves the flag to us).
    /// Whether it marks at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn new(enabled: bool) -> Self {
        PreemptedMarker {
            enabled,
            marked: false,
            misses: 0,
        }
    }

    /// Whether it would mark now (the caller then brings the vCPU to an instruction
    /// boundary first): enabled, not marked since the last entry, and not skipping this
    /// deschedule while backing off a guest without an area.
    pub fn wants_to_mark(&self) -> bool {
        self.enabled && !self.marked && !self.backing_off(self.misses.wrapping_add(1))
    }

    fn backing_off(&self, misses: u32) -> bool {
        misses > MISS_LIMIT && misses % MISS_STRIDE != 0
    }

    /// The vCPU is about to call KVM_RUN (whose next entry clears the flag).
    pub fn entering(&mut self) {
        self.marked = false;
    }

    /// The vCPU of `fd` has given up its slot, out of KVM_RUN at an instruction boundary:
    /// marks its area. None if it did not look (disabled, already marked, or backing off
    /// a guest without an area); a failed MSR read disables the marker.
    pub fn mark(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemoryMmap,
    ) -> Option<Result<bool, StealTimeError>> {
        if !self.enabled || self.marked {
            return None;
        }
        self.misses = self.misses.wrapping_add(1);
        if self.backing_off(self.misses) {
            return None;
        }
        let r = mark_preempted(fd, mem);
        match &r {
            Ok(true) => {
                self.marked = true;
                self.misses = 0;
            }
            Ok(false) | Err(StealTimeError::OutsideMemory { .. }) => {}
            Err(StealTimeError::ReadMsr(_) | StealTimeError::MsrList) => self.enabled = false,
        }
        Some(r)
    }
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
/// KVM_RUN at an instruction boundary and is about to wait for CPU; call it only from that
/// vCPU's thread, between KVM_RUN calls. Ok(false) if the guest has no area enabled.
fn mark_preempted(fd: &VcpuFd, mem: &GuestMemoryMmap) -> Result<bool, StealTimeError> {
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
