//! Paravirtual synchronization for a guest kernel.
//!
//! What a kernel takes from this crate to run well on an overcommitted host that cooperates
//! through pvsync's shared region (docs/abi.md):
//!
//! - [`region`] and [`record`]: the shared region, and each CPU's record in it (mode, lock
//!   it spins on and who holds it, preemption and RCU nesting, IPI acknowledgements awaited);
//! - [`hypercall`]: the transport (yield to a vCPU, idle, send an IPI, name grace-period
//!   holdouts);
//! - [`locks`]: ticket and MCS locks whose slow paths name the vCPU in the way and yield to
//!   it, or halt until kicked;
//! - [`tlb`]: the TLB-shootdown request/acknowledge protocol;
//! - [`rcu`]: readers, quiescent states, grace periods and callbacks;
//! - [`events`]: what the primitives were doing (spins, shootdown waits, grace periods,
//!   mode changes), appended to per-CPU rings the host drains when it traces.
//!
//! The crate reaches the machine only through [`Platform`], which the kernel implements.
//! Without a pvsync host every primitive still works: the region is not read, and no
//! pvsync hypercall is made. What a stock KVM host offers comes in through optional
//! [`Platform`] functions (their defaults do nothing): whether a CPU is preempted
//! (`vcpu_is_preempted`, KVM's steal-time flag), a flush left to the host for a preempted
//! shootdown target (`flush_tlb_on_resume`, KVM's PV TLB flush), a yield to a preempted CPU
//! and multi-target IPIs.
//!
//! # Example
//!
//! A kernel's platform, here a fake one for a single-threaded host program:
//!
//! ```
//! use pvsync_guest::locks::{RawLock, SpinLock, TicketLock};
//! use pvsync_guest::{CpuSync, FlushRange, Ipi, Platform, Wake};
//!
//! struct Fake;
//! static CPU0: CpuSync = CpuSync::new();
//!
//! // SAFETY: a single-threaded program: CPU0 is the only CPU, and nothing else runs.
//! unsafe impl Platform for Fake {
//!     fn cpu() -> &'static CpuSync { &CPU0 }
//!     fn preempt_disable() {}
//!     fn preempt_enable() {}
//!     fn preemptible() -> bool { true }
//!     fn irqs_enabled() -> bool { true }
//!     fn irqs_save() -> bool { true }
//!     fn irqs_restore(_: bool) {}
//!     fn halt_while(_: &dyn Fn() -> bool) {}
//!     fn send_ipi(_: u32, _: Ipi) {}
//!     fn now() -> u64 { 0 }
//!     fn tsc() -> u64 { 0 }
//!     fn us_to_ticks(us: u64) -> u64 { us }
//!     fn flush_tlb(_: FlushRange) {}
//!     fn hypercall_out(_: u16, _: u32) {}
//!     fn hypercall_in(_: u16) -> u32 { u32::MAX }
//!     fn wake(_: Wake) {}
//! }
//!
//! CPU0.init(0);
//! static COUNTER: SpinLock<u64, TicketLock<Fake>> = SpinLock::kernel(0);
//! *COUNTER.lock() += 1;
//! assert_eq!(*COUNTER.lock(), 1);
//! // Free again: nobody has taken the ticket being served.
//! assert_eq!(COUNTER.raw().holder(), shared_abi::NO_VCPU);
//!
//! // A shootdown in an address space only CPU 0 uses flushes locally and sends nothing.
//! let tlb = pvsync_guest::tlb::Shootdowns::<Fake>::new(1);
//! let cpus = pvsync_guest::AtomicCpuSet::new();
//! cpus.insert(0);
//! let reached = tlb.shootdown_reaching(&cpus, FlushRange::All);
//! assert!(reached.contains(0) && tlb.flushes(0) == 1);
//! ```
//!
//! The README's "Using it in your own kernel" says what each [`Platform`] function must do.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod cpu;
pub mod cpuset;
pub mod events;
pub mod hypercall;
pub mod locks;
pub mod platform;
pub mod rcu;
pub mod record;
pub mod region;
mod sync;
pub mod tlb;

#[cfg(test)]
mod models;

pub use cpu::CpuSync;
pub use cpuset::{set_nr_cpu_ids, AtomicCpuSet, CpuSet};

/// The most CPUs a kernel built on this crate runs (ids `0..NR_CPUS`), like Linux's
/// `CONFIG_NR_CPUS`: it sizes every [`CpuSet`] (`NR_CPUS / 8` bytes, copied by value) and a
/// kernel's static per-CPU tables. The ABI describes up to `shared_abi::MAX_VCPUS` (4096)
/// vCPUs, but a kernel pays for its limit in memory whatever the VM, so it builds for the
/// VMs it runs; the shared region itself is sized by the VM's own count.
pub const NR_CPUS: usize = 1024;
const _: () = assert!(NR_CPUS <= shared_abi::MAX_VCPUS);
pub use platform::{FlushRange, Ipi, Platform, Wake};
