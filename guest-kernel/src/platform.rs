//! The kernel as the paravirtual synchronization crate (`pvsync_guest`) sees it: its
//! [`Platform`] implementation. It sits just above `arch` and `percpu`; the two things it
//! must reach higher up (waking RCU's threads, serving TLB requests in a busy wait) are
//! hooks that the `rcu` and `tlb` modules install.

use pvsync_boot_parse::cmdline::KvmUse;
use pvsync_guest::{CpuSet, CpuSync, FlushRange, Ipi, Platform, Wake};
use spin::Once;
use x86_64::instructions::interrupts;

use crate::arch::{self, apic, kvm, tsc, vectors};
use crate::percpu;

/// Ranges longer than this are flushed whole (CR3 reload) rather than page by page.
pub const FULL_FLUSH_PAGES: u64 = 32;

/// The kernel's platform, named in the crate's generic types.
pub struct Kernel;

static WAKER: Once<fn(Wake)> = Once::new();
static SERVE_WAITERS: Once<fn()> = Once::new();

/// Installs what `Platform::wake` does (the RCU module's wait queues).
pub fn set_waker(f: fn(Wake)) {
    WAKER.call_once(|| f);
}

/// Installs what a busy wait serves in each slow round (the TLB module's requests).
pub fn set_serve_waiters(f: fn()) {
    SERVE_WAITERS.call_once(|| f);
}

// SAFETY: `cpu()` is the block the running CPU's GS base points at, set up by
// `percpu::init_this_cpu` before it takes a lock; tasks never migrate, so preemption off
// keeps code on its CPU; the interrupt and halt functions are the x86 instructions they name.
unsafe impl Platform for Kernel {
    #[inline]
    fn cpu() -> &'static CpuSync {
        percpu::this().sync()
    }

    #[inline]
    fn preempt_disable() {
        percpu::preempt_disable();
    }

    #[inline]
    fn preempt_enable() {
        percpu::preempt_enable();
    }

    #[inline]
    fn preemptible() -> bool {
        percpu::preempt_count() == 0
    }

    #[inline]
    fn irqs_enabled() -> bool {
        interrupts::are_enabled()
    }

    #[inline]
    fn irqs_save() -> bool {
        let were = interrupts::are_enabled();
        interrupts::disable();
        were
    }

    #[inline]
    fn irqs_restore(were_enabled: bool) {
        if were_enabled {
            interrupts::enable();
        }
    }

    fn halt_while(still_waiting: &dyn Fn() -> bool) {
        // Never halt with the caller's interrupts off (the contract): halting enables them,
        // and a handler would run inside the caller's section. The caller spins instead.
        if !interrupts::are_enabled() {
            return;
        }
        // Interrupts stay off from the check to the halt, so a kick that lands in between
        // stays pending and ends the halt at once.
        interrupts::disable();
        if still_waiting() {
            // Returns with interrupts enabled.
            apic::wait_for_interrupt();
        } else {
            interrupts::enable();
        }
    }

    #[inline]
    fn send_ipi(cpu: u32, ipi: Ipi) {
        let vector = match ipi {
            Ipi::Reschedule => vectors::RESCHEDULE,
            Ipi::TlbShootdown => vectors::TLB_SHOOTDOWN,
            // KVM's kick wakes a halted vCPU without an interrupt (`kvm=kick`).
            Ipi::Kick if kvm::uses(KvmUse::KICK) => {
                // A kick KVM refused is sent as an interrupt after all.
                if kvm::kick(cpu) == 0 {
                    return;
                }
                vectors::RESCHEDULE
            }
            Ipi::Kick => vectors::RESCHEDULE,
        };
        apic::send_ipi(cpu, vector);
    }

    /// Inlined: a shootdown's hot path (every instruction shows where guest kernel code is
    /// emulated).
    #[inline]
    fn send_ipi_many(cpus: &CpuSet, ipi: Ipi) {
        let vector = match ipi {
            Ipi::Reschedule => vectors::RESCHEDULE,
            Ipi::TlbShootdown => vectors::TLB_SHOOTDOWN,
            // Not broadcast: KVM's kick delivers without an interrupt.
            Ipi::Kick => return cpus.iter().for_each(|c| Self::send_ipi(c, ipi)),
        };
        // Every online CPU but this one (a shootdown of an address space all CPUs run in, a
        // grace period's nudge): one "all excluding self" IPI, one exit where one per CPU
        // would be hundreds.
        if cpus.has_several() && percpu::is_every_other_online(cpus) {
            apic::send_ipi_all_but_self(vector);
            return;
        }
        if ipi == Ipi::TlbShootdown && kvm::uses(KvmUse::SENDIPI) {
            // One hypercall per 128 CPUs (`kvm=sendipi`); the APIC id is the CPU id.
            kvm::send_ipi_many(cpus.iter(), vector, |c| apic::send_ipi(c, vector));
            return;
        }
        cpus.iter().for_each(|c| apic::send_ipi(c, vector));
    }

    #[inline]
    fn vcpu_is_preempted(cpu: u32) -> bool {
        kvm::uses(KvmUse::PVLOCK) && kvm::preempted(cpu)
    }

    fn flush_tlb_on_resume(cpu: u32) -> bool {
        kvm::uses(KvmUse::PVTLB) && kvm::request_flush(cpu)
    }

    /// KVM answers 0 whether or not it yielded (it does only to a target whose thread is
    /// runnable: not to one parked by our slot scheduler), so true means "asked".
    fn yield_to_preempted(cpu: u32) -> bool {
        if !kvm::uses(KvmUse::YIELD) {
            return false;
        }
        kvm::hypercall(
            shared_abi::kvm_para::KvmHypercall::SchedYield,
            cpu as u64,
            0,
            0,
            0,
        );
        true
    }

    #[inline]
    fn now() -> u64 {
        tsc::now()
    }

    #[inline]
    fn tsc() -> u64 {
        tsc::now()
    }

    fn us_to_ticks(us: u64) -> u64 {
        tsc::us_to_cycles(us)
    }

    fn flush_tlb(range: FlushRange) {
        match range {
            FlushRange::Pages { start, pages } if pages <= FULL_FLUSH_PAGES => {
                arch::flush_tlb_pages(start, pages)
            }
            _ => arch::flush_tlb_all(),
        }
    }

    #[inline]
    fn hypercall_out(port: u16, value: u32) {
        arch::port_out(port, value);
    }

    fn hypercall_in(port: u16) -> u32 {
        arch::port_in(port)
    }

    #[inline]
    fn serve_waiters() {
        if let Some(f) = SERVE_WAITERS.get() {
            f();
        }
    }

    fn wake(who: Wake) {
        if let Some(f) = WAKER.get() {
            f(who);
        }
    }
}
