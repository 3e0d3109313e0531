//! Mechanism floors on this host, measured in the benchmark's own run with raw KVM ioctls
//! and bare threads: what a slot hand-off and a kick could cost at best here.
//!
//! - null exit: a real-mode guest loops on `out`; each KVM_RUN round trip is one exit to
//!   userspace and back (what a hypercall costs before the VMM does anything);
//! - kick: a guest spins (`jmp $`); another thread signals the vCPU thread, whose KVM_RUN
//!   returns EINTR (what ending a slice costs before the scheduler does anything);
//! - futex wake: one thread unparks another, on the same host CPU or on another (what a
//!   hand-off costs before the woken thread does anything).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Guest-physical address (and real-mode linear address) of the code page.
const CODE: u64 = 0x1000;
const MEM_SIZE: usize = 0x10000;
/// Signal (offset from SIGRTMIN) the kick floor uses; the VMM uses offset 0.
const KICK_OFFSET: i32 = 1;

/// Medians and 99th percentiles in microseconds.
pub struct Floors {
    pub null_exit: (f64, f64),
    pub kick: (f64, f64),
    pub futex_same_cpu: (f64, f64),
    pub futex_other_cpu: (f64, f64),
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)));
    (
        at(0.5).copied().unwrap_or(0.0),
        at(0.99).copied().unwrap_or(0.0),
    )
}

/// A one-vCPU real-mode VM whose code page holds `code`.
struct TinyVm {
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: *mut libc::c_void,
}

impl TinyVm {
    fn new(code: &[u8]) -> TinyVm {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        // SAFETY: an anonymous private mapping of MEM_SIZE bytes, checked for failure.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED, "mmap");
        // SAFETY: `code` fits in the mapping, at offset CODE (< MEM_SIZE - code.len()).
        unsafe {
            std::ptr::copy_nonoverlapping(
                code.as_ptr(),
                (mem as *mut u8).add(CODE as usize),
                code.len(),
            )
        };
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem as u64,
            flags: 0,
        };
        // SAFETY: the mapping outlives the VM (unmapped in Drop, after the VM fd is gone
        // from use) and is MEM_SIZE bytes long.
        unsafe { vm.set_user_memory_region(region) }.expect("memory region");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let mut sregs = vcpu.get_sregs().expect("sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).expect("sregs");
        let mut regs = vcpu.get_regs().expect("regs");
        regs.rip = CODE;
        regs.rflags = 2;
        vcpu.set_regs(&regs).expect("regs");
        TinyVm { _vm: vm, vcpu, mem }
    }
}

impl Drop for TinyVm {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the vCPU no longer runs.
        unsafe { libc::munmap(self.mem, MEM_SIZE) };
    }
}

/// Round trips of a null port-I/O exit, µs.
fn null_exit(iters: usize) -> Vec<f64> {
    // mov dx, 0x10; out dx, al; jmp back to the out.
    let mut vm = TinyVm::new(&[0xba, 0x10, 0x00, 0xee, 0xeb, 0xfd]);
    let mut out = Vec::with_capacity(iters);
    for i in 0..iters + 100 {
        let t = Instant::now();
        match vm.vcpu.run() {
            Ok(VcpuExit::IoOut(0x10, _)) => {}
            other => panic!("null exit floor: unexpected {other:?}"),
        }
        if i >= 100 {
            out.push(t.elapsed().as_nanos() as f64 / 1e3);
        }
    }
    out
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Signal → KVM_RUN returns, µs.
fn kick(iters: usize) -> Vec<f64> {
    vmm_sys_util::signal::register_signal_handler(
        vmm_sys_util::signal::SIGRTMIN() + KICK_OFFSET,
        on_kick,
    )
    .expect("signal handler");
    let epoch = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (s, d) = (sent.clone(), done.clone());
    let t = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        tx.send(unsafe { libc::pthread_self() } as u64).unwrap();
        let mut vm = TinyVm::new(&[0xeb, 0xfe]); // jmp $
        let mut out = Vec::new();
        while !d.load(Ordering::Acquire) {
            match vm.vcpu.run() {
                Err(e) if e.errno() == libc::EINTR => {
                    let at = s.swap(0, Ordering::AcqRel);
                    if at != 0 {
                        out.push((epoch.elapsed().as_nanos() as u64 - at) as f64 / 1e3);
                    }
                }
                other => panic!("kick floor: unexpected {other:?}"),
            }
        }
        out
    });
    let thread = rx.recv().unwrap() as libc::pthread_t;
    for _ in 0..iters {
        std::thread::sleep(Duration::from_millis(1));
        sent.store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
        // SAFETY: the thread runs until `done`, so the id is valid.
        unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN() + KICK_OFFSET) };
    }
    done.store(true, Ordering::Release);
    // A kick that lands between two KVM_RUNs interrupts nothing: kick until it has left.
    while !t.is_finished() {
        // SAFETY: as above; the thread has not been joined.
        unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN() + KICK_OFFSET) };
        std::thread::sleep(Duration::from_millis(1));
    }
    t.join().unwrap()
}

/// Binds the calling thread to host CPU `cpu`.
fn bind_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for small `cpu`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Unpark → the parked thread runs, with both threads on `cpus`, µs.
fn futex_wake(cpus: (usize, usize), iters: usize) -> Vec<f64> {
    let epoch = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    // Round `i` is posted when `posted` reaches i + 1 and seen when `seen` does.
    let posted = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(AtomicU64::new(0));
    let (s, p, d) = (sent.clone(), posted.clone(), seen.clone());
    let sleeper = std::thread::spawn(move || {
        bind_self(cpus.1);
        let mut out = Vec::new();
        for i in 1..=iters as u64 {
            while p.load(Ordering::Acquire) < i {
                std::thread::park();
            }
            out.push((epoch.elapsed().as_nanos() as u64 - s.load(Ordering::Acquire)) as f64 / 1e3);
            d.store(i, Ordering::Release);
        }
        out
    });
    bind_self(cpus.0);
    for i in 1..=iters as u64 {
        // Let it park, then wake it; on one CPU the waker then sleeps, as a vCPU thread that
        // gives its slot up parks.
        std::thread::sleep(Duration::from_micros(500));
        sent.store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
        posted.store(i, Ordering::Release);
        sleeper.thread().unpark();
        while seen.load(Ordering::Acquire) < i {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let out = sleeper.join().unwrap();
    bind_all();
    out
}

/// Lets the calling thread run anywhere again.
fn bind_all() {
    // SAFETY: as in bind_self, with every CPU the set holds.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Every floor, `iters` samples each.
pub fn measure(iters: usize) -> Floors {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Floors {
        null_exit: quantiles(null_exit(iters)),
        kick: quantiles(kick(iters)),
        futex_same_cpu: quantiles(futex_wake((0, 0), iters)),
        futex_other_cpu: quantiles(futex_wake((0, 1.min(cpus - 1)), iters)),
    }
}
