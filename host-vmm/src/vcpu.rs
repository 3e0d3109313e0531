//! One vCPU thread: KVM_RUN while the backend grants it CPU, until the guest exits, crashes,
//! or the VM is stopped.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_run, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::hypercall::{Action, VcpuHypercalls};
use crate::sched;
use crate::vm::{Outcome, VmShared};

/// Signal (offset from SIGRTMIN) that kicks a vCPU thread out of KVM_RUN.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

/// How often an application processor that waits for INIT-SIPI-SIPI is looked at: it waits
/// outside KVM_RUN and outside the scheduler.
const AP_WAIT_POLL: Duration = Duration::from_millis(1);

thread_local! {
    /// This thread's `kvm_run` area while it runs a vCPU, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal handler's work: make this thread's next (or current) KVM_RUN return at
/// once. A signal that lands just before KVM_RUN is entered would otherwise be lost.
pub fn on_kick_signal() {
    // `try_with`: a const-initialised thread local without destructor needs no lazy set-up,
    // so this is async-signal-safe.
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's own kvm_run mapping, published by `run` below
            // and cleared before the VcpuFd that owns it is dropped; the byte is one the
            // kernel reads on entry to KVM_RUN. A raw place (no `&mut`), written volatile:
            // the interrupted code may hold a reference to the struct, never reads this byte
            // but through the kernel, and clears it after KVM_RUN returns.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
}

/// Sets the published `kvm_run` pointer for the life of the guard.
struct KickTarget;

impl KickTarget {
    fn publish(fd: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        // A signal handler on this thread must see the pointer cleared before the mapping
        // can go away.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// An application processor waiting for INIT-SIPI-SIPI would block inside KVM_RUN; it
/// waits here instead, before the backend knows it as runnable, so it holds and queues for
/// no slot (KVM_GET_MP_STATE takes pending INIT/SIPI events).
fn wait_for_sipi(index: u8, fd: &VcpuFd, vm: &VmShared) {
    if index == 0 {
        return;
    }
    while !vm.stopping() {
        match fd.get_mp_state() {
            Ok(s) if s.mp_state != KVM_MP_STATE_RUNNABLE => std::thread::sleep(AP_WAIT_POLL),
            _ => return,
        }
    }
}

/// The vCPU loop. Reports how the guest ended through `vm.finish`.
pub fn run(index: u8, mut fd: VcpuFd, vm: Arc<VmShared>) {
    let key = vm.key(index as u32);
    let backend = Arc::clone(&vm.backend);
    let kick_target = KickTarget::publish(&mut fd);
    wait_for_sipi(index, &fd, &vm);
    backend.start(key);
    backend.wait_turn(key);
    let mut hypercalls = VcpuHypercalls::new(index as u32);
    let crash = |reason: String| Outcome::GuestCrash {
        vcpu: index,
        reason,
    };
    while !vm.stopping() {
        if backend.take_kick(key) {
            fd.set_kvm_immediate_exit(0);
            backend.preempted(key, sched::read_cpl(&fd));
            continue;
        }
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
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(crash(format!("KVM_RUN failed: {e}"))),
        };
        if let Some(o) = outcome {
            vm.finish(o);
            break;
        }
    }
    drop(kick_target);
    fd.set_kvm_immediate_exit(0);
    backend.exit(key);
}
