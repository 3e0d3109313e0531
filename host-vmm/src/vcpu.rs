//! One vCPU thread: KVM_RUN until the guest exits, crashes, or the VM is stopped.

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::hypercall::{Action, VcpuHypercalls};
use crate::vm::{Outcome, VmShared};

/// Signal (offset from SIGRTMIN) that kicks a vCPU thread out of KVM_RUN.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

/// The vCPU loop. Reports how the guest ended through `vm.finish`.
pub fn run(index: u8, mut fd: VcpuFd, vm: Arc<VmShared>) {
    let mut hypercalls = VcpuHypercalls::default();
    let crash = |reason: String| Outcome::GuestCrash {
        vcpu: index,
        reason,
    };
    while !vm.stopping() {
        let outcome = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match hypercalls.handle_out(&*vm, port, data) {
                Some(Action::Exit(code)) => Some(Outcome::GuestExit(code)),
                Some(Action::Continue) => None,
                None => {
                    vm.pio.write(port, data);
                    None
                }
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                if !hypercalls.handle_in(port, data) {
                    vm.pio.read(port, data);
                }
                None
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                vm.count_unclaimed_mmio();
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::MmioWrite(..)) => {
                vm.count_unclaimed_mmio();
                None
            }
            Ok(VcpuExit::Shutdown) => Some(crash("shutdown exit (triple fault)".into())),
            Ok(VcpuExit::Hlt) => Some(crash(
                "HLT exited to userspace despite the in-kernel irqchip".into(),
            )),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(crash(format!(
                "VM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
            ))),
            Ok(VcpuExit::InternalError) => Some(crash("KVM internal error".into())),
            Ok(other) => Some(crash(format!("unhandled exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(crash(format!("KVM_RUN failed: {e}"))),
        };
        if let Some(o) = outcome {
            vm.finish(o);
            break;
        }
    }
    // Leave immediate_exit clear for anyone who reuses the fd (nobody does today).
    fd.set_kvm_immediate_exit(0);
}
