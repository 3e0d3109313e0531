//! Kicking a vCPU thread out of KVM_RUN: a real-time signal whose handler sets the thread's
//! `immediate_exit`, so a kick that lands just before KVM_RUN is entered is not lost (KVM_RUN
//! then returns at once). Everything about it is here: the signal number, the handler, the
//! thread-local the handler reads, and the two ways to send it (a [`Kicker`] for a backend,
//! [`kick_thread`] for the VM lifecycle stopping its threads).

use std::cell::Cell;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::VcpuError;
use crate::sched::Kick;

/// The kick signal is SIGRTMIN plus this.
const KICK_SIGNAL_OFFSET: i32 = 0;

fn kick_signal() -> libc::c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// This thread's `kvm_run` area while it runs a vCPU, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: makes this thread's next (or current) KVM_RUN return at once.
extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with`: a const-initialised thread local without destructor needs no lazy set-up,
    // so this is async-signal-safe.
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's own kvm_run mapping, published by
            // `KickTarget::publish` and cleared (by its Drop) before the VcpuFd that owns it
            // is dropped; the byte is one the kernel reads on entry to KVM_RUN. A raw place
            // (no `&mut`), written volatile: the interrupted code may hold a reference to the
            // struct, never reads this byte but through the kernel, and clears it after
            // KVM_RUN returns.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
}

/// Installs the kick handler once per process; every later call gets the first outcome (a
/// failed install must fail every VM: an unhandled kick signal would end the process).
pub(super) fn install_kick_handler() -> Result<(), VcpuError> {
    static RESULT: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    (*RESULT.get_or_init(|| register_signal_handler(kick_signal(), on_kick_signal)))
        .map_err(VcpuError::Signal)
}

/// Sends the kick signal to a vCPU thread that has not been joined (holding its JoinHandle
/// proves that). A thread outside KVM_RUN only has its next KVM_RUN return at once.
pub fn kick_thread<T>(t: &JoinHandle<T>) {
    let _ = t.kill(kick_signal());
}

/// Kicks one vCPU thread from any thread, for as long as the vCPU thread runs its loop;
/// afterwards `kick` does nothing. Cheap to clone.
#[derive(Clone)]
pub struct Kicker {
    /// The thread, while it is in its loop. Cleared under this lock by the thread itself
    /// before it leaves, and a signal is sent only with the lock held: none can reach a
    /// thread that has returned (and may have been joined, its id reused).
    thread: Arc<Mutex<Option<libc::pthread_t>>>,
}

impl Kicker {
    pub fn kick(&self) {
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = *t {
            // SAFETY: `p` is the vCPU thread, which has not yet cleared it (it does so under
            // this lock before it returns), so the thread is alive and the id valid. The
            // signal has a handler: `Vcpu::create` installs it before any vCPU exists.
            unsafe { libc::pthread_kill(p, kick_signal()) };
        }
    }
}

impl Kick for Kicker {
    fn kick(&self) {
        Kicker::kick(self)
    }
}

/// While alive, on the vCPU's own thread: the signal handler sees this thread's `kvm_run`,
/// and the [`Kicker`] reaches the thread. Dropped (on this thread, also when unwinding)
/// before the thread returns and before the vCPU fd goes.
pub(super) struct KickTarget {
    kicker: Kicker,
}

impl KickTarget {
    pub(super) fn publish(fd: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        KickTarget {
            kicker: Kicker {
                thread: Arc::new(Mutex::new(Some(me))),
            },
        }
    }

    pub(super) fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        *self.kicker.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        // A signal handler on this thread must see the pointer cleared before the mapping
        // can go away.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}
