//! The local APIC in x2APIC mode (MSR interface): enable, identify, send INIT/SIPI.

use x86_64::registers::model_specific::Msr;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const X2APIC_ID: u32 = 0x802;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_ICR: u32 = 0x830;
const SVR_ENABLE: u64 = 1 << 8;
/// Vector of the spurious interrupt.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const ICR_INIT: u64 = 0b101 << 8;
const ICR_STARTUP: u64 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u64 = 1 << 14;

/// Whether CPUID says this CPU has an x2APIC.
pub fn has_x2apic() -> bool {
    let leaf1 = core::arch::x86_64::__cpuid(1);
    leaf1.ecx & (1 << 21) != 0
}

/// The initial APIC ID from CPUID.1:EBX[31:24] (what the AP trampoline also uses).
pub fn initial_apic_id() -> u32 {
    core::arch::x86_64::__cpuid(1).ebx >> 24
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
    // allowed xAPIC -> x2APIC transition (disabled -> x2APIC directly would #GP). The SVR
    // write only enables the APIC with a spurious vector whose IDT entry exists.
    unsafe {
        let v = base.read();
        base.write(v | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        Msr::new(X2APIC_SVR).write(SVR_ENABLE | SPURIOUS_VECTOR as u64);
    }
}

/// The calling CPU's x2APIC ID (x2APIC mode must be on).
pub fn id() -> u32 {
    // SAFETY: reading the x2APIC ID MSR has no side effects once x2APIC mode is enabled.
    unsafe { Msr::new(X2APIC_ID).read() as u32 }
}

fn write_icr(dest: u32, low: u64) {
    // SAFETY: x2APIC mode is on (callers run after enable_x2apic); a 64-bit ICR write sends
    // exactly one IPI and touches no memory.
    unsafe { Msr::new(X2APIC_ICR).write(((dest as u64) << 32) | low) }
}

/// Sends INIT (level assert) to `dest`.
pub fn send_init(dest: u32) {
    write_icr(dest, ICR_INIT | ICR_LEVEL_ASSERT);
}

/// Sends a STARTUP IPI: `dest` starts in real mode at `page << 12`.
pub fn send_startup(dest: u32, page: u8) {
    write_icr(dest, ICR_STARTUP | ICR_LEVEL_ASSERT | page as u64);
}
