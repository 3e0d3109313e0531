//! A vCPU: its KVM fd (created with its CPUID; the bootstrap vCPU also gets the PVH entry
//! state), its CPL, the signal that kicks its thread out of KVM_RUN (`kick`), and the loop
//! that thread runs (`run`). It knows nothing of the VM lifecycle: the loop reaches its VM
//! through [`VcpuContext`], which the VM implements.

mod kick;
mod run;
pub mod steal_time;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};

pub use kick::{kick_thread, Kicker};
pub use run::{GuestEnd, VcpuContext};

use crate::arch::x86_64::{cpuid, regs};
use crate::policy::Cpl;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM {op} failed: {source}")]
    KvmOp {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("building the vCPU's CPUID: {0:?}")]
    Cpuid(vmm_sys_util::fam::Error),
}

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::KvmOp { op, source }
}

/// One vCPU of a VM, not yet running.
pub struct Vcpu {
    index: u32,
    /// vCPUs of its VM.
    nr_vcpus: u32,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm` (of `nr_vcpus`), with KVM's `supported` CPUID patched for
    /// it (its APIC ID is its index). The kick signal's handler is installed first (once per process), so
    /// no vCPU thread can be sent a kick it does not handle.
    pub fn create(
        vm: &VmFd,
        index: u32,
        nr_vcpus: u32,
        supported: &CpuId,
    ) -> Result<Self, VcpuError> {
        kick::install_kick_handler()?;
        let fd = vm
            .create_vcpu(index as u64)
            .map_err(kvm_op("KVM_CREATE_VCPU"))?;
        let mut c = supported.clone();
        cpuid::patch_for_vcpu(&mut c, index, nr_vcpus).map_err(VcpuError::Cpuid)?;
        fd.set_cpuid2(&c).map_err(kvm_op("KVM_SET_CPUID2"))?;
        Ok(Vcpu {
            index,
            nr_vcpus,
            fd,
        })
    }

    /// Sets the PVH entry state: 32-bit protected mode at `entry`, %ebx = `start_info`.
    /// Only the bootstrap vCPU needs it; the others wait in KVM for INIT-SIPI-SIPI.
    pub fn set_pvh_entry(&self, entry: u64, start_info: u64) -> Result<(), VcpuError> {
        let sregs = self.fd.get_sregs().map_err(kvm_op("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&regs::pvh_sregs(sregs))
            .map_err(kvm_op("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::pvh_regs(entry, start_info))
            .map_err(kvm_op("KVM_SET_REGS"))
    }

    /// Its privilege level, read the way KVM's directed yield does
    /// (`kvm_arch_vcpu_get_cpl`): from the segment registers, while it is out of KVM_RUN.
    pub fn cpl(&self) -> Cpl {
        match self.fd.get_sregs() {
            // Real mode runs at CPL 0; otherwise CPL is SS.DPL.
            Ok(s) if s.cr0 & regs::X86_CR0_PE == 0 => Cpl::Kernel,
            Ok(s) if s.ss.dpl == 3 => Cpl::User,
            Ok(_) => Cpl::Kernel,
            Err(_) => Cpl::Unknown,
        }
    }
}
