//! Guest event rings (ABI v5): what a guest was doing, for the host's trace.
//!
//! After the records, the region holds one ring per vCPU of `event_ring_entries` entries (a
//! header field; 0 means the guest keeps no rings). A ring is a 64-byte [`EventRingHeader`]
//! followed by its entries. Only the owning vCPU writes entries, `head` and `dropped`; only
//! the host writes `tail`. The guest writes events only while the host has set
//! [`HostFlags::EVENTS`](crate::HostFlags::EVENTS) (it asks for them when tracing), so a
//! run without a trace costs one flag test per event site.
//!
//! Protocol (single producer, single consumer, no overwrite):
//! - guest: if `head - tail == entries` (tail read with acquire), count `dropped` and stop;
//!   else write entry `head % entries`, then store `head + 1` with release;
//! - host: load `head` with acquire, copy entries `tail..head` (at most `entries` of them:
//!   a larger gap is a corrupt ring), then store `tail = head` with release.
//!
//! ```
//! use shared_abi::{event_ring_offset, event_rings_offset, region_size, EventKind};
//! // The rings follow the records and the five bitmaps (holdouts, four ipi_wait); four
//! // vCPUs with 128-entry rings fit in four pages.
//! assert_eq!(event_rings_offset(4), 64 + 4 * 64 + 5 * 64);
//! assert_eq!(event_ring_offset(4, 128, 1), 640 + (64 + 128 * 24));
//! assert_eq!(region_size(4, 128), 16384);
//! assert_eq!(region_size(4, 0), 4096, "no rings: one page");
//! assert_eq!(EventKind::from_raw(1), Some(EventKind::LockSpin));
//! assert_eq!(EventKind::from_raw(0), None);
//! ```

use core::mem::{offset_of, size_of};

/// Size of one [`GuestEvent`].
pub const EVENT_SIZE: usize = 24;
/// Size of an [`EventRingHeader`].
pub const EVENT_RING_HEADER_SIZE: usize = 64;
/// Largest `event_ring_entries` a host accepts (a power of two, like every valid value).
pub const MAX_EVENT_RING_ENTRIES: u32 = 4096;
/// Smallest non-zero `event_ring_entries`: with 8 or more (a power of two), a ring's size is
/// a multiple of 64 bytes, so every ring header is 64-byte aligned.
pub const MIN_EVENT_RING_ENTRIES: u32 = 8;

/// Offset, from the region's start, of vCPU 0's event ring: right after the records and
/// the vCPU bitmaps (ABI v6).
pub const fn event_rings_offset(nr_vcpus: usize) -> usize {
    crate::ipi_wait_offset(nr_vcpus, nr_vcpus)
}

/// Bytes of one vCPU's ring of `entries` entries (none when `entries` is 0: no rings).
pub const fn event_ring_size(entries: u32) -> usize {
    if entries == 0 {
        return 0;
    }
    EVENT_RING_HEADER_SIZE + entries as usize * EVENT_SIZE
}

/// Offset, from the region's start, of vCPU `vcpu`'s ring.
pub const fn event_ring_offset(nr_vcpus: usize, entries: u32, vcpu: usize) -> usize {
    event_rings_offset(nr_vcpus) + vcpu * event_ring_size(entries)
}

/// Whether a header's `event_ring_entries` is one a host accepts: 0, or a power of two from
/// [`MIN_EVENT_RING_ENTRIES`] to [`MAX_EVENT_RING_ENTRIES`].
pub const fn valid_event_ring_entries(entries: u32) -> bool {
    entries == 0
        || (entries.is_power_of_two()
            && entries >= MIN_EVENT_RING_ENTRIES
            && entries <= MAX_EVENT_RING_ENTRIES)
}

/// Head of one vCPU's event ring.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRingHeader {
    /// Events ever written; entry `i` lives at index `i % entries`. Guest (release store).
    pub head: u64,
    /// Events the guest did not write because the ring was full. Guest.
    pub dropped: u64,
    /// Events the host has consumed. Host (release store).
    pub tail: u64,
    /// Zero.
    pub reserved: [u64; 5],
}

/// One event. `tsc` is the guest's time stamp counter when it happened (the host maps it
/// to its own clock); `a` and `b` depend on `kind`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestEvent {
    pub tsc: u64,
    /// [`EventKind`] as a u16.
    pub kind: u16,
    /// Zero.
    pub reserved: u16,
    pub a: u32,
    pub b: u64,
}

/// What happened. The arguments are named `a` (u32) and `b` (u64) in [`GuestEvent`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The vCPU spins in a lock's slow path: `b` the lock (its guest address), `a` the vCPU
    /// it names as holder (or [`crate::NO_VCPU`]). Ends with the next `LockSpin` or
    /// `LockSpinEnd`.
    LockSpin = 1,
    /// It stopped spinning (it holds the lock now, or went back to an outer spin).
    LockSpinEnd = 2,
    /// It released lock `b` while other vCPUs waited for it; `a` is the vCPU it handed the
    /// lock to, or [`crate::NO_VCPU`] when the lock does not know.
    LockRelease = 3,
    /// It waits for IPI acknowledgements (a TLB shootdown) from `a` vCPUs; `b` is the set
    /// of those below 64 (the first word of its bitmap).
    IpiWait = 4,
    /// Every acknowledgement arrived.
    IpiWaitEnd = 5,
    /// It started RCU grace period `a` (low 32 bits of the header's `rcu_gp_seq`); `b` the
    /// holdouts below 64 it must wait for (the first word of the bitmap).
    GpStart = 6,
    /// Grace period `a` now waits on holdouts `b` (it tells the host: RcuWait).
    GpWait = 7,
    /// Grace period `a` ended.
    GpEnd = 8,
    /// It entered mode `a` (a [`crate::VcpuMode`]).
    Mode = 9,
    /// It acknowledged vCPU `a`'s IPI (flushed for its shootdown).
    IpiAck = 10,
}

impl EventKind {
    /// Decodes a `kind` field; `None` for a value no guest may write.
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => EventKind::LockSpin,
            2 => EventKind::LockSpinEnd,
            3 => EventKind::LockRelease,
            4 => EventKind::IpiWait,
            5 => EventKind::IpiWaitEnd,
            6 => EventKind::GpStart,
            7 => EventKind::GpWait,
            8 => EventKind::GpEnd,
            9 => EventKind::Mode,
            10 => EventKind::IpiAck,
            _ => return None,
        })
    }
}

impl GuestEvent {
    /// Decodes an event from its bytes (any bit pattern is a valid `GuestEvent`; check
    /// `kind` with [`EventKind::from_raw`]).
    pub fn from_bytes(bytes: &[u8; EVENT_SIZE]) -> Self {
        // SAFETY: GuestEvent is repr(C), exactly EVENT_SIZE bytes (asserted below) and made
        // only of integers, so every bit pattern is a valid value; read_unaligned does not
        // require the buffer to be aligned.
        unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<GuestEvent>()) }
    }
}

// The layout is the contract: any change here is an ABI_VERSION bump and a docs/abi.md edit.
const _: () = {
    assert!(size_of::<EventRingHeader>() == EVENT_RING_HEADER_SIZE);
    assert!(offset_of!(EventRingHeader, head) == 0);
    assert!(offset_of!(EventRingHeader, dropped) == 8);
    assert!(offset_of!(EventRingHeader, tail) == 16);
    assert!(size_of::<GuestEvent>() == EVENT_SIZE);
    assert!(offset_of!(GuestEvent, tsc) == 0);
    assert!(offset_of!(GuestEvent, kind) == 8);
    assert!(offset_of!(GuestEvent, reserved) == 10);
    assert!(offset_of!(GuestEvent, a) == 12);
    assert!(offset_of!(GuestEvent, b) == 16);
    // Ring headers stay 64-byte aligned (head and tail are accessed atomically).
    assert!(event_rings_offset(1) % 64 == 0);
    assert!(event_ring_size(MIN_EVENT_RING_ENTRIES) % 64 == 0);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_checked() {
        assert!(valid_event_ring_entries(0));
        assert!(valid_event_ring_entries(128));
        assert!(valid_event_ring_entries(MAX_EVENT_RING_ENTRIES));
        assert!(!valid_event_ring_entries(100), "not a power of two");
        assert!(
            !valid_event_ring_entries(4),
            "rings would not stay 64-byte aligned"
        );
        assert!(!valid_event_ring_entries(2 * MAX_EVENT_RING_ENTRIES));
    }

    #[test]
    fn event_decodes_fields_at_documented_offsets() {
        let mut b = [0u8; EVENT_SIZE];
        b[0..8].copy_from_slice(&77u64.to_le_bytes());
        b[8..10].copy_from_slice(&(EventKind::IpiWait as u16).to_le_bytes());
        b[12..16].copy_from_slice(&3u32.to_le_bytes());
        b[16..24].copy_from_slice(&0b1110u64.to_le_bytes());
        let e = GuestEvent::from_bytes(&b);
        assert_eq!(e.tsc, 77);
        assert_eq!(EventKind::from_raw(e.kind), Some(EventKind::IpiWait));
        assert_eq!((e.a, e.b, e.reserved), (3, 0b1110, 0));
    }

    #[test]
    fn every_kind_round_trips() {
        for raw in 0..=u16::MAX {
            if let Some(k) = EventKind::from_raw(raw) {
                assert_eq!(k as u16, raw);
            }
        }
    }
}
