//! KVM's own paravirtual interface, as far as pvsync uses it (Linux's
//! `arch/x86/include/uapi/asm/kvm_para.h` and `Documentation/virt/kvm/x86/{cpuid,msr,
//! hypercalls}.rst`).
//!
//! Not pvsync's ABI and not covered by [`ABI_VERSION`](crate::ABI_VERSION): KVM defines it.
//! It is written down here because both sides of pvsync touch it: the guest reads the
//! steal-time area and sets its flush flag, and our VMM sets the area's preempted flag
//! when its slot scheduler takes a vCPU off (docs/abi.md, "KVM's paravirtual interface").
//!
//! ```
//! use shared_abi::kvm_para::{steal_time_gpa, KvmFeatures, KVM_MSR_ENABLED};
//! // This host's KVM offers 0x1007efb in CPUID 0x40000001 EAX.
//! let f = KvmFeatures::from_bits(0x0100_7efb);
//! assert!(f.has(KvmFeatures::STEAL_TIME) && f.has(KvmFeatures::PV_TLB_FLUSH));
//! // The MSR holds the area's address with the enable bit.
//! assert_eq!(steal_time_gpa(0x12_3440 | KVM_MSR_ENABLED), Some(0x12_3440));
//! assert_eq!(steal_time_gpa(0x12_3440), None, "not enabled");
//! ```

use core::mem::{offset_of, size_of};

/// CPUID leaf whose EBX, ECX, EDX spell [`KVM_SIGNATURE`]; EAX is the largest KVM leaf
/// (0 means [`KVM_CPUID_FEATURES`]).
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// The hypervisor signature of KVM (EBX, ECX, EDX of [`KVM_CPUID_SIGNATURE`]).
pub const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";
/// CPUID leaf whose EAX holds the [`KvmFeatures`] bits.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// The feature bits of CPUID [`KVM_CPUID_FEATURES`] EAX that pvsync knows by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmFeatures(u32);

impl KvmFeatures {
    /// `kvmclock` at the new MSRs.
    pub const CLOCKSOURCE2: u32 = 1 << 3;
    /// Steal time: [`MSR_KVM_STEAL_TIME`] and [`KvmStealTime`].
    pub const STEAL_TIME: u32 = 1 << 5;
    /// Paravirtual end of interrupt (`MSR_KVM_PV_EOI_EN`).
    pub const PV_EOI: u32 = 1 << 6;
    /// [`KvmHypercall::KickCpu`] wakes a vCPU halted in a lock's slow path.
    pub const PV_UNHALT: u32 = 1 << 7;
    /// The host flushes a preempted vCPU's TLB on request ([`KVM_VCPU_FLUSH_TLB`]).
    pub const PV_TLB_FLUSH: u32 = 1 << 9;
    /// [`KvmHypercall::SendIpi`]: one hypercall for an IPI to many vCPUs.
    pub const PV_SEND_IPI: u32 = 1 << 11;
    /// [`KvmHypercall::SchedYield`]: yield to a preempted vCPU.
    pub const PV_SCHED_YIELD: u32 = 1 << 13;

    /// The named bits and their names, for reports.
    pub const NAMED: [(u32, &'static str); 7] = [
        (Self::CLOCKSOURCE2, "clocksource2"),
        (Self::STEAL_TIME, "steal-time"),
        (Self::PV_EOI, "pv-eoi"),
        (Self::PV_UNHALT, "pv-unhalt"),
        (Self::PV_TLB_FLUSH, "pv-tlb-flush"),
        (Self::PV_SEND_IPI, "pv-send-ipi"),
        (Self::PV_SCHED_YIELD, "pv-sched-yield"),
    ];

    /// The features of CPUID EAX `eax`.
    pub const fn from_bits(eax: u32) -> Self {
        KvmFeatures(eax)
    }

    /// The raw EAX.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `feature` is offered.
    pub const fn has(self, feature: u32) -> bool {
        self.0 & feature == feature
    }
}

/// The steal-time MSR: the guest writes its area's 64-byte-aligned guest-physical address
/// with [`KVM_MSR_ENABLED`]; KVM updates the area at each entry.
pub const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
/// Low bit of a KVM paravirtual MSR: the feature is enabled.
pub const KVM_MSR_ENABLED: u64 = 1;
/// Bits of [`MSR_KVM_STEAL_TIME`] below the area's address (bit 0: enable; 1..=5 reserved).
pub const STEAL_TIME_ADDR_MASK: u64 = !0x3f;

/// `preempted` bit: the vCPU is off its CPU while runnable (set by the host when it
/// deschedules the vCPU; cleared by KVM at the next entry).
pub const KVM_VCPU_PREEMPTED: u8 = 1 << 0;
/// `preempted` bit: a guest asks the host to flush this preempted vCPU's TLB before it runs
/// again. Set only with a compare-and-exchange that still finds [`KVM_VCPU_PREEMPTED`];
/// KVM exchanges the byte for 0 at the next entry and flushes if this bit was set.
pub const KVM_VCPU_FLUSH_TLB: u8 = 1 << 1;

/// One vCPU's steal-time area (`struct kvm_steal_time`), 64 bytes, 64-byte aligned, in
/// guest memory. KVM writes `steal` under the `version` seqcount (odd while it writes).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmStealTime {
    /// Time the vCPU was runnable but not running, ns, since the area was enabled.
    pub steal: u64,
    /// Odd while KVM updates the area.
    pub version: u32,
    /// Unused by KVM (0).
    pub flags: u32,
    /// [`KVM_VCPU_PREEMPTED`] and [`KVM_VCPU_FLUSH_TLB`].
    pub preempted: u8,
    /// Padding (KVM's `u8_pad`).
    pub u8_pad: [u8; 3],
    /// Padding to 64 bytes.
    pub pad: [u32; 11],
}

/// Offset of [`KvmStealTime::preempted`] in the area.
pub const STEAL_TIME_PREEMPTED_OFFSET: u64 = offset_of!(KvmStealTime, preempted) as u64;

const _: () = {
    assert!(size_of::<KvmStealTime>() == 64);
    assert!(offset_of!(KvmStealTime, steal) == 0);
    assert!(offset_of!(KvmStealTime, version) == 8);
    assert!(offset_of!(KvmStealTime, flags) == 12);
    assert!(offset_of!(KvmStealTime, preempted) == 16);
    assert!(offset_of!(KvmStealTime, pad) == 20);
};

/// The area's guest-physical address in a [`MSR_KVM_STEAL_TIME`] value, if the value
/// enables steal time.
pub const fn steal_time_gpa(msr: u64) -> Option<u64> {
    if msr & KVM_MSR_ENABLED == 0 {
        None
    } else {
        Some(msr & STEAL_TIME_ADDR_MASK)
    }
}

/// KVM's hypercall numbers (RAX of `vmcall`/`vmmcall`; arguments in RBX, RCX, RDX, RSI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmHypercall {
    /// Wakes vCPU `a1` (APIC id; `a0` flags = 0) from a halt ([`KvmFeatures::PV_UNHALT`]).
    KickCpu = 5,
    /// Sends ICR-low `a3` to the APIC ids `a2 + i` for every bit `i` of the 128-bit bitmap
    /// `a1:a0`; returns how many were delivered ([`KvmFeatures::PV_SEND_IPI`]).
    SendIpi = 10,
    /// Yields to the vCPU of APIC id `a0` if it is preempted ([`KvmFeatures::PV_SCHED_YIELD`]).
    SchedYield = 11,
}

/// Bits of the [`KvmHypercall::SendIpi`] bitmap in 64-bit mode (two registers).
pub const SEND_IPI_BITMAP_BITS: u32 = 128;

/// One [`KvmHypercall::SendIpi`]: APIC ids `min + i` for each bit `i` of `bitmap` (`a0` is
/// `bitmap[0]`, `a1` `bitmap[1]`, `a2` `min`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendIpiWindow {
    pub min: u32,
    pub bitmap: [u64; 2],
}

impl SendIpiWindow {
    /// How many APIC ids it names (what KVM returns when it delivers them all).
    pub const fn count(&self) -> u32 {
        self.bitmap[0].count_ones() + self.bitmap[1].count_ones()
    }

    /// The APIC ids it names, ascending.
    pub fn ids(self) -> impl Iterator<Item = u32> {
        (0..SEND_IPI_BITMAP_BITS)
            .filter(move |&i| self.bitmap[(i / 64) as usize] & (1 << (i % 64)) != 0)
            .filter_map(move |i| self.min.checked_add(i))
    }
}

/// Groups APIC ids into [`SendIpiWindow`]s: a window starts at the first id that does not
/// fit the previous one (`id < min` or `id >= min + 128`), so ascending ids take
/// `ceil(span / 128)` calls at most; any order is correct, only slower.
///
/// ```
/// use shared_abi::kvm_para::{send_ipi_windows, SendIpiWindow};
/// let w: Vec<SendIpiWindow> = send_ipi_windows([1, 2, 100, 300].into_iter()).collect();
/// // 1, 2 and 100 (bit 99: the high word's bit 35); 300 is past 1 + 127.
/// assert_eq!(w[0], SendIpiWindow { min: 1, bitmap: [0b11, 1 << 35] });
/// assert_eq!(w[1], SendIpiWindow { min: 300, bitmap: [1, 0] });
/// ```
pub fn send_ipi_windows<I: Iterator<Item = u32>>(ids: I) -> SendIpiWindows<I> {
    SendIpiWindows {
        ids: ids.peekable(),
    }
}

/// The iterator of [`send_ipi_windows`].
pub struct SendIpiWindows<I: Iterator<Item = u32>> {
    ids: core::iter::Peekable<I>,
}

impl<I: Iterator<Item = u32>> Iterator for SendIpiWindows<I> {
    type Item = SendIpiWindow;

    fn next(&mut self) -> Option<SendIpiWindow> {
        let min = self.ids.next()?;
        let mut bitmap = [1, 0];
        while let Some(off) = self
            .ids
            .peek()
            .and_then(|&id| id.checked_sub(min))
            .filter(|&off| off < SEND_IPI_BITMAP_BITS)
        {
            bitmap[(off / 64) as usize] |= 1 << (off % 64);
            self.ids.next();
        }
        Some(SendIpiWindow { min, bitmap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_by_name() {
        let f = KvmFeatures::from_bits(KvmFeatures::STEAL_TIME | KvmFeatures::PV_EOI);
        let named: usize = KvmFeatures::NAMED.iter().filter(|(b, _)| f.has(*b)).count();
        assert_eq!(named, 2);
        assert!(!f.has(KvmFeatures::PV_TLB_FLUSH));
    }

    extern crate std;
    use std::vec::Vec;

    fn windows(ids: &[u32]) -> Vec<SendIpiWindow> {
        send_ipi_windows(ids.iter().copied()).collect()
    }

    #[test]
    fn send_ipi_windows_cover_every_id_once() {
        assert!(windows(&[]).is_empty());
        // 0..300 ascending: windows at 0, 128, 256.
        let all: Vec<u32> = (0..300).collect();
        let w = windows(&all);
        assert_eq!(w.iter().map(|w| w.min).collect::<Vec<_>>(), [0, 128, 256]);
        assert_eq!(w.iter().map(|w| w.count()).sum::<u32>(), 300);
        let back: Vec<u32> = w.iter().flat_map(|w| w.ids()).collect();
        assert_eq!(back, all);
        // Gaps, an id from 64 up in the high word, ids past 64 and past u16.
        let w = windows(&[5, 64, 132, 133, 70_000]);
        assert_eq!(
            w[0],
            SendIpiWindow {
                min: 5,
                bitmap: [1 | 1 << 59, 1 << 63]
            }
        );
        assert_eq!(w[1].min, 133, "132 - 5 = 127 fits, 133 - 5 = 128 does not");
        assert_eq!(
            w[2],
            SendIpiWindow {
                min: 70_000,
                bitmap: [1, 0]
            }
        );
        // Not ascending: an id below the window's first starts a new one.
        let w = windows(&[10, 3, 4]);
        assert_eq!(w.len(), 2);
        assert_eq!(
            w[1],
            SendIpiWindow {
                min: 3,
                bitmap: [0b11, 0]
            }
        );
        // Near u32::MAX nothing overflows.
        let w = windows(&[u32::MAX - 1, u32::MAX]);
        assert_eq!(w[0].count(), 2);
    }

    #[test]
    fn steal_time_msr_drops_reserved_bits() {
        assert_eq!(steal_time_gpa(0x1000 | 0x3f), Some(0x1000));
        assert_eq!(steal_time_gpa(0), None);
    }
}
