//! The local APIC in x2APIC mode (MSR interface): enable, identify, IPIs, EOI, and the
//! per-CPU tick (TSC-deadline mode where the CPU has it, else periodic mode calibrated
//! against the TSC).
//!
//! Two hooks let a paravirtual transport above take over (installed by `main` when a pvsync
//! host accepted the shared region; see docs/scheduling.md):
//! - [`set_ipi_sender`]: tried first by [`send_ipi`] and [`send_ipi_all_but_self`]; when it
//!   returns false (or nothing is installed, the default) the ICR is written.
//! - [`set_idle_hook`]: [`wait_for_interrupt`] calls it, with interrupts enabled, instead of
//!   `sti; hlt`; nothing installed (the default): `sti; hlt`.

use core::sync::atomic::{AtomicU64, Ordering};
use shared_abi::IpiDest;
use x86_64::registers::model_specific::Msr;

use super::hook::Hook;
use super::tsc;

/// Sends an IPI some other way (true) or declines (false: the ICR is written).
static IPI_SENDER: Hook<fn(IpiDest, u8) -> bool> = Hook::new();
/// Idles until an interrupt or `timeout_us` (true), or declines (false: `hlt`).
static IDLE: Hook<fn(u32) -> bool> = Hook::new();

/// Installs what [`send_ipi`] and [`send_ipi_all_but_self`] try before the ICR: it gets the
/// destination and the vector, and returns whether it sent the IPI.
pub fn set_ipi_sender(f: fn(IpiDest, u8) -> bool) {
    IPI_SENDER.set(f);
}

/// Installs what [`wait_for_interrupt`] does instead of `sti; hlt`: called with interrupts
/// enabled and the microseconds until this CPU's next tick; returns whether it waited.
/// Install it only where it will not decline (a decline costs a `hlt` that an interrupt
/// arriving in between no longer ends).
pub fn set_idle_hook(f: fn(u32) -> bool) {
    IDLE.set(f);
}

const IA32_APIC_BASE: u32 = 0x1b;
const IA32_TSC_DEADLINE: u32 = 0x6e0;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const X2APIC_ID: u32 = 0x802;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_TIMER_INITIAL: u32 = 0x838;
const X2APIC_TIMER_CURRENT: u32 = 0x839;
const X2APIC_TIMER_DIVIDE: u32 = 0x83e;
const SVR_ENABLE: u64 = 1 << 8;
const LVT_MASKED: u64 = 1 << 16;
const LVT_TIMER_PERIODIC: u64 = 0b01 << 17;
const LVT_TIMER_TSC_DEADLINE: u64 = 0b10 << 17;
const TIMER_DIVIDE_BY_16: u64 = 0b0011;
/// Vector of the spurious interrupt.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const ICR_INIT: u64 = 0b101 << 8;
const ICR_STARTUP: u64 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u64 = 1 << 14;
const ICR_ALL_BUT_SELF: u64 = 0b11 << 18;

/// Whether CPUID says this CPU has an x2APIC.
pub fn has_x2apic() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & (1 << 21) != 0
}

/// Whether the LAPIC timer has TSC-deadline mode (CPUID.1:ECX[24]).
pub fn has_tsc_deadline() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & (1 << 24) != 0
}

/// The initial APIC ID, as the AP path in boot.S finds it too: the x2APIC ID
/// (CPUID.0xB:EDX) where the CPU has leaf 0xB (its maximum basic leaf is at least 0xB and
/// the leaf's EBX[15:0] is non-zero, as the SDM says to check), else CPUID.1:EBX[31:24],
/// which holds only 8 bits.
pub fn initial_apic_id() -> u32 {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax >= 0xb {
        let topology = __cpuid_count(0xb, 0);
        if topology.ebx & 0xffff != 0 {
            return topology.edx;
        }
    }
    __cpuid(1).ebx >> 24
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: callers only write x2APIC registers and IA32_TSC_DEADLINE, with x2APIC mode
    // on; these writes send interrupts or program the local timer and touch no memory.
    unsafe { Msr::new(msr).write(value) }
}

fn rdmsr(msr: u32) -> u64 {
    // SAFETY: reading x2APIC registers has no side effects (x2APIC mode is on).
    unsafe { Msr::new(msr).read() }
}

/// Puts the calling CPU's local APIC in x2APIC mode and software-enables it.
pub fn enable_x2apic() {
    assert!(
        has_x2apic(),
        "this CPU has no x2APIC (CPUID.1:ECX[21] clear)"
    );
    let mut base = Msr::new(IA32_APIC_BASE);
    // SAFETY: CPUID reported x2APIC support. After reset (and PVH entry) the APIC is enabled
    // in xAPIC mode and nothing here disables it, so setting EXTD with EN kept set is the
    // allowed xAPIC -> x2APIC transition (disabled -> x2APIC directly would #GP).
    unsafe {
        let v = base.read();
        base.write(v | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
    }
    // The spurious vector's IDT entry exists before any CPU enables its APIC.
    wrmsr(X2APIC_SVR, SVR_ENABLE | SPURIOUS_VECTOR as u64);
}

/// The calling CPU's x2APIC ID (x2APIC mode must be on).
pub fn id() -> u32 {
    rdmsr(X2APIC_ID) as u32
}

/// Signals end of interrupt to the local APIC.
#[inline]
pub fn eoi() {
    wrmsr(X2APIC_EOI, 0);
}

/// Where an IPI of the bring-up goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// One CPU, by x2APIC ID.
    Cpu(u32),
    /// Every CPU but the caller (the ICR's "all excluding self" shorthand: one write).
    AllButSelf,
}

impl Dest {
    fn icr(self) -> u64 {
        match self {
            Dest::Cpu(id) => (id as u64) << 32,
            Dest::AllButSelf => ICR_ALL_BUT_SELF,
        }
    }
}

/// Sends INIT (level assert) to `dest`.
pub fn send_init(dest: Dest) {
    // The APs' stacks and boot data are stored before this: order them before the IPI.
    ipi_fence();
    wrmsr(X2APIC_ICR, dest.icr() | ICR_INIT | ICR_LEVEL_ASSERT);
}

/// Sends a STARTUP IPI: `dest` starts in real mode at `page << 12`.
pub fn send_startup(dest: Dest, page: u8) {
    ipi_fence();
    wrmsr(
        X2APIC_ICR,
        dest.icr() | ICR_STARTUP | ICR_LEVEL_ASSERT | page as u64,
    );
}

/// x2APIC ICR writes are not ordered after earlier stores (SDM; Linux's weak_wrmsr_fence):
/// without this, a target could take the IPI before it can see what the IPI announces.
fn ipi_fence() {
    // SAFETY: fences only order memory accesses.
    unsafe { core::arch::asm!("mfence", "lfence", options(nostack, preserves_flags)) };
}

/// Sends a fixed interrupt `vector` to CPU `dest`.
pub fn send_ipi(dest: u32, vector: u8) {
    if let (Some(send), Ok(id)) = (IPI_SENDER.get(), u16::try_from(dest)) {
        if send(IpiDest::Vcpu(id), vector) {
            return;
        }
    }
    ipi_fence();
    wrmsr(
        X2APIC_ICR,
        ((dest as u64) << 32) | ICR_LEVEL_ASSERT | vector as u64,
    );
}

/// Sends a fixed interrupt `vector` to every CPU but the caller.
pub fn send_ipi_all_but_self(vector: u8) {
    if let Some(send) = IPI_SENDER.get() {
        if send(IpiDest::AllButSelf, vector) {
            return;
        }
    }
    ipi_fence();
    wrmsr(
        X2APIC_ICR,
        ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | vector as u64,
    );
}

/// APIC timer ticks (at divide-by-16) per millisecond, for periodic mode; 0 in TSC-deadline
/// mode.
static APIC_TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);
/// Tick period in TSC cycles (TSC-deadline mode).
static TICK_CYCLES: AtomicU64 = AtomicU64::new(0);
/// Tick period in microseconds (periodic mode restarts with it).
static TICK_PERIOD_US: AtomicU64 = AtomicU64::new(0);

/// How the tick is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    TscDeadline,
    Periodic,
}

/// Measures the APIC timer against the TSC (once, on the BSP) for periodic mode.
fn calibrate_apic_timer() -> u64 {
    wrmsr(X2APIC_LVT_TIMER, LVT_MASKED);
    wrmsr(X2APIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_16);
    wrmsr(X2APIC_TIMER_INITIAL, u32::MAX as u64);
    tsc::spin_cycles(tsc::us_to_cycles(10_000));
    let elapsed = u32::MAX as u64 - rdmsr(X2APIC_TIMER_CURRENT);
    wrmsr(X2APIC_TIMER_INITIAL, 0);
    (elapsed / 10).max(1)
}

/// Starts this CPU's periodic tick on `vector` every `period_us` microseconds. The BSP
/// calls it first (it calibrates); APs reuse the calibration.
pub fn start_tick(vector: u8, period_us: u64) -> TimerMode {
    TICK_PERIOD_US.store(period_us, Ordering::Relaxed);
    if has_tsc_deadline() {
        let cycles = tsc::us_to_cycles(period_us).max(1);
        TICK_CYCLES.store(cycles, Ordering::Relaxed);
        wrmsr(X2APIC_LVT_TIMER, LVT_TIMER_TSC_DEADLINE | vector as u64);
        wrmsr(IA32_TSC_DEADLINE, tsc::now() + cycles);
        TimerMode::TscDeadline
    } else {
        let mut per_ms = APIC_TICKS_PER_MS.load(Ordering::Relaxed);
        if per_ms == 0 {
            per_ms = calibrate_apic_timer();
            APIC_TICKS_PER_MS.store(per_ms, Ordering::Relaxed);
        }
        wrmsr(X2APIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_16);
        wrmsr(X2APIC_LVT_TIMER, LVT_TIMER_PERIODIC | vector as u64);
        wrmsr(X2APIC_TIMER_INITIAL, (per_ms * period_us / 1000).max(1));
        TimerMode::Periodic
    }
}

/// Stops this CPU's tick (an idle CPU with nothing to time: see sched::idle_loop). A tick
/// already pending is still delivered; `resume_tick` starts it again.
pub fn stop_tick() {
    if TICK_CYCLES.load(Ordering::Relaxed) != 0 {
        wrmsr(IA32_TSC_DEADLINE, 0);
    } else {
        wrmsr(X2APIC_TIMER_INITIAL, 0);
    }
}

/// Restarts this CPU's tick after `stop_tick`, a full period from now.
pub fn resume_tick() {
    if TICK_CYCLES.load(Ordering::Relaxed) != 0 {
        rearm_tick();
    } else {
        let per_ms = APIC_TICKS_PER_MS.load(Ordering::Relaxed);
        let period_us = TICK_PERIOD_US.load(Ordering::Relaxed);
        wrmsr(X2APIC_TIMER_INITIAL, (per_ms * period_us / 1000).max(1));
    }
}

/// Re-arms the TSC deadline after a tick (periodic mode re-arms itself).
#[inline]
pub fn rearm_tick() {
    let cycles = TICK_CYCLES.load(Ordering::Relaxed);
    if cycles != 0 {
        wrmsr(IA32_TSC_DEADLINE, tsc::now() + cycles);
    }
}

/// Microseconds until this CPU's next tick (at most one tick period), for an idle vCPU that
/// must tell the host when to wake it.
pub fn us_until_tick() -> u32 {
    let period = TICK_CYCLES.load(Ordering::Relaxed);
    if period == 0 {
        return TICK_PERIOD_FALLBACK_US;
    }
    let deadline = rdmsr(IA32_TSC_DEADLINE);
    let left = if deadline == 0 {
        period
    } else {
        deadline.saturating_sub(tsc::now()).min(period)
    };
    ((tsc::cycles_to_ns(left) / 1000) as u32).max(1)
}

/// Idle timeout when the tick is periodic (its phase is not tracked).
const TICK_PERIOD_FALLBACK_US: u32 = 4_000;

/// Waits for an interrupt with interrupts disabled on entry and enabled on return, like
/// `sti; hlt`. With an idle hook (under a pvsync host: the Idle hypercall) the hook waits
/// instead, so the vCPU gives its host CPU back. Interrupts are enabled before the hook: an
/// interrupt pending when it returns is then injected on VM entry, where with IF=0 it would
/// need an interrupt-window exit (which takes seconds on nested hosts). A tick that fires
/// before the hook's `out` only shortens the wait (the timeout was measured to it); an IPI
/// leaves a host wake token that ends the wait at once.
pub fn wait_for_interrupt() {
    wait(us_until_tick);
}

/// `wait_for_interrupt` for a CPU whose tick is stopped (`stop_tick`): the idle hook (the
/// Idle hypercall) then names no deadline (0: only a `SendIpi` ends it, ABI 6, and every
/// remote wake-up is sent that way while the host accepts the region).
pub fn wait_for_interrupt_tickless() {
    wait(|| 0);
}

fn wait(timeout_us: impl FnOnce() -> u32) {
    match IDLE.get() {
        Some(idle) => {
            let timeout = timeout_us();
            x86_64::instructions::interrupts::enable();
            if !idle(timeout) {
                x86_64::instructions::hlt();
            }
        }
        None => x86_64::instructions::interrupts::enable_and_hlt(),
    }
}
