//! KVM's own paravirtual interface (`shared_abi::kvm_para`): finding KVM in CPUID, each
//! CPU's steal-time area, and KVM's hypercalls. The kernel decides what it uses
//! ([`set_used`]); this module only reaches the hardware and the areas.
//!
//! The steal-time areas are KVM's: KVM writes `steal` and `version` at each entry of the
//! vCPU, exchanges the `preempted` byte for 0 (flushing the TLB if a sender asked), and a
//! host sets `KVM_VCPU_PREEMPTED` while it keeps the vCPU off its CPU. Every access here
//! is atomic or volatile: the host writes the areas at any time.

use core::arch::asm;
use core::ptr::{addr_of, read_volatile};
use core::sync::atomic::{
    compiler_fence, fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering,
};

use shared_abi::kvm_para::{
    send_ipi_windows, KvmFeatures, KvmHypercall, KvmStealTime, KVM_CPUID_FEATURES,
    KVM_CPUID_SIGNATURE, KVM_MSR_ENABLED, KVM_SIGNATURE, KVM_VCPU_FLUSH_TLB, KVM_VCPU_PREEMPTED,
    MSR_KVM_STEAL_TIME,
};
use x86_64::registers::model_specific::Msr;

/// CPUID leaf 1 ECX: running under a hypervisor (the 0x4000_0000 leaves mean something).
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 0 vendors whose hypercall instruction is `vmmcall`.
const AMD_VENDORS: [&[u8; 12]; 2] = [b"AuthenticAMD", b"HygonGenuine"];

static AMD: AtomicBool = AtomicBool::new(false);
static AREAS: AtomicPtr<KvmStealTime> = AtomicPtr::new(core::ptr::null_mut());
static AREAS_LEN: AtomicU32 = AtomicU32::new(0);
static USED: AtomicU32 = AtomicU32::new(0);

static SAMPLES: AtomicU64 = AtomicU64::new(0);
static SEEN_PREEMPTED: AtomicU64 = AtomicU64::new(0);
static FLAG_WHILE_RUNNING: AtomicU64 = AtomicU64::new(0);
static KICKS: AtomicU64 = AtomicU64::new(0);
static SEND_IPI_CALLS: AtomicU64 = AtomicU64::new(0);
static SEND_IPI_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// What the ticks saw of the steal-time areas, and the hypercalls made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observations {
    /// Another CPU's `preempted` byte read at a tick.
    pub samples: u64,
    /// ... and found `KVM_VCPU_PREEMPTED` set.
    pub seen_preempted: u64,
    /// A CPU found its own `preempted` byte non-zero at a tick, while running: the host
    /// set the flag (or left a flush request) on a running vCPU. Must stay 0.
    pub flag_while_running: u64,
    /// `KVM_HC_KICK_CPU` hypercalls.
    pub kicks: u64,
    /// `KVM_HC_SEND_IPI` hypercalls.
    pub send_ipi_calls: u64,
    /// ... that KVM did not wholly deliver (their IPIs then went through the APIC).
    pub send_ipi_fallbacks: u64,
}

/// The counters so far.
pub fn observations() -> Observations {
    Observations {
        samples: SAMPLES.load(Ordering::Relaxed),
        seen_preempted: SEEN_PREEMPTED.load(Ordering::Relaxed),
        flag_while_running: FLAG_WHILE_RUNNING.load(Ordering::Relaxed),
        kicks: KICKS.load(Ordering::Relaxed),
        send_ipi_calls: SEND_IPI_CALLS.load(Ordering::Relaxed),
        send_ipi_fallbacks: SEND_IPI_FALLBACKS.load(Ordering::Relaxed),
    }
}

/// At CPU `me`'s tick number `tick` (guest code running, so its own byte must be 0: KVM
/// cleared it at entry, and a sender sets the flush flag only beside `KVM_VCPU_PREEMPTED`):
/// checks its own byte, and samples another CPU's, each CPU walking the others from its own
/// tick count (no cursor shared by every CPU's tick). Nothing without areas.
pub fn observe_tick(me: u32, tick: u64) {
    let len = AREAS_LEN.load(Ordering::Relaxed);
    if len == 0 || AREAS.load(Ordering::Relaxed).is_null() {
        return;
    }
    if preempted_flags(me) != 0 {
        FLAG_WHILE_RUNNING.fetch_add(1, Ordering::Relaxed);
    }
    let other = ((me as u64 + tick) % len as u64) as u32;
    if other != me {
        SAMPLES.fetch_add(1, Ordering::Relaxed);
        if preempted(other) {
            SEEN_PREEMPTED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `KVM_HC_KICK_CPU`: wakes CPU `apic_id` from a halt (or makes its next halt return).
/// Returns KVM's answer: 0, or a negative error (the kick did not go out).
pub fn kick(apic_id: u32) -> i64 {
    KICKS.fetch_add(1, Ordering::Relaxed);
    hypercall(KvmHypercall::KickCpu, 0, apic_id as u64, 0, 0)
}

/// ICR delivery mode "fixed" (its bits are 0) with `vector`: what `KVM_HC_SEND_IPI` takes.
const ICR_FIXED: u64 = 0;

/// `KVM_HC_SEND_IPI`: sends `vector` to every APIC id `ids` yields, one hypercall per
/// window of 128 consecutive ids (`shared_abi::kvm_para::send_ipi_windows`). Returns the
/// ids of each window KVM did not wholly deliver (an error, or fewer than asked) to
/// `fallback`, which sends them another way: a lost shootdown IPI would hang its sender.
pub fn send_ipi_many(ids: impl Iterator<Item = u32>, vector: u8, fallback: impl Fn(u32)) {
    // Stores before the IPI must be visible to its handler (as for an x2APIC ICR write).
    fence(Ordering::SeqCst);
    for w in send_ipi_windows(ids) {
        SEND_IPI_CALLS.fetch_add(1, Ordering::Relaxed);
        let delivered = hypercall(
            KvmHypercall::SendIpi,
            w.bitmap[0],
            w.bitmap[1],
            w.min as u64,
            ICR_FIXED | vector as u64,
        );
        if delivered != w.count() as i64 {
            SEND_IPI_FALLBACKS.fetch_add(1, Ordering::Relaxed);
            // Some may have been delivered: a second shootdown IPI finds nothing to serve.
            w.ids().for_each(&fallback);
        }
    }
}

/// KVM's signature and feature bits, if this CPU runs under KVM.
pub fn detect() -> Option<KvmFeatures> {
    use core::arch::x86_64::__cpuid;
    if __cpuid(1).ecx & ECX_HYPERVISOR == 0 {
        return None;
    }
    let sig = __cpuid(KVM_CPUID_SIGNATURE);
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&sig.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&sig.ecx.to_le_bytes());
    name[8..].copy_from_slice(&sig.edx.to_le_bytes());
    if name != KVM_SIGNATURE {
        return None;
    }
    // EAX 0 means the features leaf is the last (KVM's cpuid.rst).
    let max = if sig.eax == 0 {
        KVM_CPUID_FEATURES
    } else {
        sig.eax
    };
    let vendor = __cpuid(0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&vendor.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&vendor.edx.to_le_bytes());
    v[8..].copy_from_slice(&vendor.ecx.to_le_bytes());
    AMD.store(AMD_VENDORS.contains(&&v), Ordering::Relaxed);
    Some(KvmFeatures::from_bits(if max >= KVM_CPUID_FEATURES {
        __cpuid(KVM_CPUID_FEATURES).eax
    } else {
        0
    }))
}

/// Records what the kernel uses (its own bits: `pvsync_boot_parse::cmdline::KvmUse`),
/// before any CPU but the first runs.
pub fn set_used(bits: u32) {
    USED.store(bits, Ordering::Release);
}

/// What the kernel uses now (its `set_used` bits).
pub fn used() -> u32 {
    USED.load(Ordering::Acquire)
}

/// Whether the kernel uses every bit of `feature`.
#[inline]
pub fn uses(feature: u32) -> bool {
    USED.load(Ordering::Relaxed) & feature == feature
}

/// Hands over `len` steal-time areas at `areas`, one per CPU id, before any CPU enables
/// its own.
///
/// # Safety
/// `areas` must point at `len` zeroed areas, identity-mapped (guest-physical = virtual),
/// that nothing else uses for the rest of the kernel's life.
pub unsafe fn set_steal_areas(areas: *mut KvmStealTime, len: u32) {
    AREAS_LEN.store(len, Ordering::Relaxed);
    AREAS.store(areas, Ordering::Release);
}

fn area(cpu: u32) -> Option<*mut KvmStealTime> {
    let base = AREAS.load(Ordering::Acquire);
    if base.is_null() || cpu >= AREAS_LEN.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: `cpu` is below the number of areas handed over at `base`.
    Some(unsafe { base.add(cpu as usize) })
}

/// Tells KVM where CPU `cpu`'s (the calling CPU's) steal-time area is. False if there is
/// no area for it.
pub fn enable_steal_time(cpu: u32) -> bool {
    let Some(a) = area(cpu) else {
        return false;
    };
    // SAFETY: the MSR exists (KVM offers STEAL_TIME: the caller checked); the value is the
    // calling CPU's own 64-byte-aligned, identity-mapped area, which KVM may write from now
    // on and nothing else in the kernel writes but the preempted byte's atomics.
    unsafe { Msr::new(MSR_KVM_STEAL_TIME).write(a as u64 | KVM_MSR_ENABLED) };
    true
}

/// Writes `value` to the calling CPU's `MSR_KVM_STEAL_TIME` as it is (for hostile tests: an
/// area anywhere, or none). Only where KVM offers steal time.
pub fn set_steal_time_msr(value: u64) {
    // SAFETY: KVM checks the value (reserved bits raise #GP); whatever address it names, the
    // kernel never reads an area through it, and KVM and the host write only guest memory.
    unsafe { Msr::new(MSR_KVM_STEAL_TIME).write(value) };
}

/// The `preempted` byte of CPU `cpu`'s area, as an atomic.
fn preempted_byte(cpu: u32) -> Option<&'static AtomicU8> {
    let a = area(cpu)?;
    // SAFETY: the area lives for good and is only ever accessed atomically or volatilely;
    // the byte is aligned (any address is, for a u8).
    Some(unsafe { AtomicU8::from_ptr(addr_of!((*a).preempted).cast_mut()) })
}

/// CPU `cpu`'s steal time, ns, read under the area's version seqcount; None without an
/// area or if KVM kept rewriting it.
pub fn steal_ns(cpu: u32) -> Option<u64> {
    let a = area(cpu)?;
    for _ in 0..1000 {
        // SAFETY: volatile reads of plain integers of a live area.
        let (v1, steal, v2) = unsafe {
            let v1 = read_volatile(addr_of!((*a).version));
            compiler_fence(Ordering::SeqCst);
            let steal = read_volatile(addr_of!((*a).steal));
            compiler_fence(Ordering::SeqCst);
            (v1, steal, read_volatile(addr_of!((*a).version)))
        };
        if v1 == v2 && v1 % 2 == 0 {
            return Some(steal);
        }
        core::hint::spin_loop();
    }
    None
}

/// CPU `cpu`'s area `version` (KVM adds 2 at each update, after it has dealt with the
/// `preempted` byte).
pub fn steal_version(cpu: u32) -> Option<u32> {
    // SAFETY: a volatile read of a plain integer of a live area.
    area(cpu).map(|a| unsafe { read_volatile(addr_of!((*a).version)) })
}

/// CPU `cpu`'s `preempted` byte as it is now.
pub fn preempted_flags(cpu: u32) -> u8 {
    preempted_byte(cpu).map_or(0, |b| b.load(Ordering::Acquire))
}

/// Whether the host reports CPU `cpu` preempted.
#[inline]
pub fn preempted(cpu: u32) -> bool {
    preempted_flags(cpu) & KVM_VCPU_PREEMPTED != 0
}

/// Asks the host to flush preempted CPU `cpu`'s TLB before it runs again: sets
/// `KVM_VCPU_FLUSH_TLB` with a compare-and-exchange against a value that has
/// `KVM_VCPU_PREEMPTED`, as Linux's `kvm_flush_tlb_multi` does. True only if the exchange
/// found the vCPU preempted: KVM then exchanges the byte for 0 at the vCPU's next entry and
/// flushes first. A running vCPU's byte is 0 (KVM cleared it on entry), so it never passes.
pub fn request_flush(cpu: u32) -> bool {
    let Some(b) = preempted_byte(cpu) else {
        return false;
    };
    let state = b.load(Ordering::Acquire);
    state & KVM_VCPU_PREEMPTED != 0
        && b.compare_exchange(
            state,
            state | KVM_VCPU_FLUSH_TLB,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_ok()
}

/// One KVM hypercall: `vmcall` (Intel) or `vmmcall` (AMD), number in RAX, arguments in RBX,
/// RCX, RDX, RSI; KVM's result in RAX. On some nested hosts the instruction never returns:
/// the kernel makes these only where the command line asks.
pub fn hypercall(nr: KvmHypercall, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let ret: u64;
    // LLVM reserves RBX, so the first argument is swapped into it around the instruction.
    if AMD.load(Ordering::Relaxed) {
        // SAFETY: KVM's hypercall ABI: it reads the named registers, writes RAX, and
        // touches no guest memory for the calls the kernel makes.
        unsafe {
            asm!(
                "xchg {a0}, rbx",
                "vmmcall",
                "xchg {a0}, rbx",
                a0 = inout(reg) a0 => _,
                inlateout("rax") nr as u64 => ret,
                in("rcx") a1,
                in("rdx") a2,
                in("rsi") a3,
                options(nostack),
            );
        }
    } else {
        // SAFETY: as above, with Intel's instruction.
        unsafe {
            asm!(
                "xchg {a0}, rbx",
                "vmcall",
                "xchg {a0}, rbx",
                a0 = inout(reg) a0 => _,
                inlateout("rax") nr as u64 => ret,
                in("rcx") a1,
                in("rdx") a2,
                in("rsi") a3,
                options(nostack),
            );
        }
    }
    ret as i64
}
