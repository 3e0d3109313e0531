//! The time-stamp counter: the kernel's clock. Its frequency comes from KVM's pvclock (exact,
//! what the hypervisor itself uses), else CPUID leaves 0x15/0x40000010, else the PIT.

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

/// TSC frequency in kHz; 0 until `calibrate`.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
/// TSC at calibration: time zero for `now_ns`.
static TSC_EPOCH: AtomicU64 = AtomicU64::new(0);

const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const CPUID_TSC_KHZ_LEAF: u32 = 0x4000_0010;

/// Reads the TSC (not serialising; good enough for intervals of microseconds and up).
#[inline]
pub fn now() -> u64 {
    // SAFETY: RDTSC has no memory effects; CR4.TSD is clear, so it is allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Spins until `cycles` TSC cycles have passed.
pub fn spin_cycles(cycles: u64) {
    let start = now();
    while now().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

/// TSC cycles per millisecond (after `calibrate`).
pub fn khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Nanoseconds since calibration.
pub fn now_ns() -> u64 {
    cycles_to_ns(now().wrapping_sub(TSC_EPOCH.load(Ordering::Relaxed)))
}

/// TSC cycles to nanoseconds.
pub fn cycles_to_ns(cycles: u64) -> u64 {
    let khz = khz().max(1);
    (cycles as u128 * 1_000_000 / khz as u128) as u64
}

/// Microseconds to TSC cycles.
pub fn us_to_cycles(us: u64) -> u64 {
    us.saturating_mul(khz()) / 1000
}

/// Whether the hypervisor is KVM (signature "KVMKVMKVM\0\0\0").
pub fn is_kvm() -> bool {
    if !super::under_hypervisor() {
        return false;
    }
    let r = core::arch::x86_64::__cpuid(KVM_CPUID_SIGNATURE);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&r.edx.to_le_bytes());
    &sig == b"KVMKVMKVM\0\0\0"
}

/// KVM paravirt feature bits (CPUID 0x40000001 EAX), 0 when not on KVM.
pub fn kvm_features() -> u32 {
    if is_kvm() {
        core::arch::x86_64::__cpuid(KVM_CPUID_FEATURES).eax
    } else {
        0
    }
}

/// pvclock_vcpu_time_info, as KVM writes it.
#[repr(C, align(64))]
#[derive(Default)]
struct PvclockTimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

/// From pvclock: ns = ((tsc << shift) * mul) >> 32, so kHz = 10^6 * 2^32 / (mul * 2^shift).
fn khz_from_kvmclock() -> Option<u64> {
    if kvm_features() & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let info = PvclockTimeInfo::default();
    let addr = &info as *const PvclockTimeInfo as u64;
    let mut msr = Msr::new(MSR_KVM_SYSTEM_TIME_NEW);
    // SAFETY: `info` is identity-mapped, suitably aligned, and outlives KVM's writes: the
    // clock is disabled again (write 0) before it goes out of scope.
    let (mul, shift) = unsafe {
        msr.write(addr | 1);
        let mut v = (0, 0, 0);
        for _ in 0..1000 {
            let version = core::ptr::read_volatile(&info.version);
            let mul = core::ptr::read_volatile(&info.tsc_to_system_mul);
            let shift = core::ptr::read_volatile(&info.tsc_shift);
            if version != 0 && version % 2 == 0 && mul != 0 {
                v = (version, mul, shift);
                break;
            }
            core::hint::spin_loop();
        }
        msr.write(0);
        (v.1, v.2)
    };
    if mul == 0 {
        return None;
    }
    let base = (1_000_000u128 << 32) / mul as u128;
    let khz = if shift >= 0 {
        base >> shift
    } else {
        base << -shift
    };
    u64::try_from(khz).ok().filter(|&k| k > 0)
}

fn khz_from_cpuid() -> Option<u64> {
    if is_kvm() && core::arch::x86_64::__cpuid(KVM_CPUID_SIGNATURE).eax >= CPUID_TSC_KHZ_LEAF {
        let khz = core::arch::x86_64::__cpuid(CPUID_TSC_KHZ_LEAF).eax as u64;
        if khz != 0 {
            return Some(khz);
        }
    }
    if core::arch::x86_64::__cpuid(0).eax >= 0x15 {
        let r = core::arch::x86_64::__cpuid(0x15);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            return Some(r.ecx as u64 * r.ebx as u64 / r.eax as u64 / 1000);
        }
    }
    None
}

/// PIT channel 2 in one-shot mode gated through port 0x61: 10 ms of PIT time in TSC cycles.
/// Bounded, so a machine without a PIT gives None instead of a hang.
fn khz_from_pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 10;
    let count = (PIT_HZ * MS / 1000) as u16;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut cmd: Port<u8> = Port::new(0x43);
    let mut ch2: Port<u8> = Port::new(0x42);
    // SAFETY: legacy PIT/speaker ports; nothing else in the kernel uses them.
    unsafe {
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // speaker off, gate on
        cmd.write(0b1011_0000); // channel 2, lo/hi, mode 0
        ch2.write(count as u8);
        ch2.write((count >> 8) as u8);
        let start = now();
        for _ in 0..50_000_000u64 {
            if gate.read() & 0x20 != 0 {
                return Some((now() - start) / MS);
            }
        }
    }
    None
}

/// Establishes the TSC frequency. Panics if no source works: every timeout depends on it.
pub fn calibrate() -> (u64, &'static str) {
    let (khz, source) = if let Some(k) = khz_from_kvmclock() {
        (k, "kvmclock")
    } else if let Some(k) = khz_from_cpuid() {
        (k, "cpuid")
    } else if let Some(k) = khz_from_pit() {
        (k, "pit")
    } else {
        panic!("cannot determine the TSC frequency (no kvmclock, CPUID leaf or PIT)");
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    TSC_EPOCH.store(now(), Ordering::Relaxed);
    (khz, source)
}
