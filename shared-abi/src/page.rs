//! The shared region: a 64-byte header, one 64-byte record per vCPU, the vCPU bitmaps
//! (ABI v6: the grace period's holdouts, then one `ipi_wait` bitmap per vCPU; `bitmap.rs`),
//! then (ABI v5) one event ring per vCPU (`events.rs`).
//!
//! Record `i` belongs to the vCPU whose x2APIC ID is `i` (the VMM numbers vCPUs so that
//! KVM vCPU id = APIC ID). Only that vCPU writes the guest half of its record; only the host
//! writes the host half. See `docs/abi.md` for the ordering rules.

use core::mem::{offset_of, size_of};

/// Magic at offset 0 of the header: the bytes `PVSYNC\0\0` read as a little-endian u64.
pub const PAGE_MAGIC: u64 = u64::from_le_bytes(*b"PVSYNC\0\0");

/// Guest page size the region is rounded up to.
pub const PAGE_SIZE: usize = 4096;
/// Size of [`PageHeader`].
pub const HEADER_SIZE: usize = 64;
/// Size of one [`VcpuRecord`]: one cache line.
pub const RECORD_SIZE: usize = 64;

/// Byte size of the whole shared region for `nr_vcpus` records and event rings of
/// `event_ring_entries` entries each, rounded up to whole pages.
pub const fn region_size(nr_vcpus: usize, event_ring_entries: u32) -> usize {
    let bytes = crate::event_ring_offset(nr_vcpus, event_ring_entries, nr_vcpus);
    bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Offset of record `vcpu` from the start of the region.
pub const fn record_offset(vcpu: usize) -> usize {
    HEADER_SIZE + vcpu * RECORD_SIZE
}

/// Offset of the grace period's holdout bitmap (ABI v6): right after the records, one
/// [`crate::bitmap_stride`] long.
pub const fn holdouts_offset(nr_vcpus: usize) -> usize {
    record_offset(nr_vcpus)
}

/// Offset of vCPU `vcpu`'s `ipi_wait` bitmap (ABI v6): the bitmaps follow the holdouts, one
/// [`crate::bitmap_stride`] apart.
pub const fn ipi_wait_offset(nr_vcpus: usize, vcpu: usize) -> usize {
    holdouts_offset(nr_vcpus) + (1 + vcpu) * crate::bitmap_stride(nr_vcpus)
}

/// Region header. The guest fills every field but `host_flags` before registering, and never
/// changes them afterwards.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageHeader {
    /// [`PAGE_MAGIC`]. Guest.
    pub magic: u64,
    /// [`crate::ABI_VERSION`] the guest was built with. Guest.
    pub abi_version: u32,
    /// Number of records that follow; must equal the VM's vCPU count. Guest.
    pub nr_vcpus: u32,
    /// Bytes of the region, `region_size(nr_vcpus, event_ring_entries)`. Guest.
    pub region_size: u32,
    /// [`RECORD_SIZE`]; lets a later version grow records. Guest.
    pub record_size: u32,
    /// Offset of record 0, [`HEADER_SIZE`]. Guest.
    pub records_offset: u32,
    /// [`HostFlags`] bits. Host.
    pub host_flags: u32,
    /// RCU grace-period sequence: `2 * completed + 1` while a grace period is in progress,
    /// `2 * completed` otherwise. Guest (any CPU, one aligned store).
    pub rcu_gp_seq: u64,
    /// RCU callbacks queued and not yet invoked. Guest (any CPU, one aligned store).
    pub rcu_callbacks_pending: u64,
    /// Offset of the holdout bitmap, [`holdouts_offset`]: bit i set while the grace period
    /// in progress still waits for a quiescent state from vCPU i. Guest (ABI v6).
    pub holdouts_offset: u32,
    /// Offset of vCPU 0's `ipi_wait` bitmap, [`ipi_wait_offset`]`(nr_vcpus, 0)`; vCPU i's is
    /// [`crate::bitmap_stride`] `* i` further. Guest (ABI v6).
    pub ipi_wait_offset: u32,
    /// Entries of each vCPU's event ring: 0 (no rings) or a power of two up to
    /// [`crate::MAX_EVENT_RING_ENTRIES`]. Guest (ABI v5).
    pub event_ring_entries: u32,
    /// Offset of vCPU 0's event ring, [`crate::event_rings_offset`] (where the rings would
    /// start when there are none). Guest (ABI v6).
    pub event_rings_offset: u32,
}

impl PageHeader {
    /// The header a guest with `nr_vcpus` vCPUs and event rings of `event_ring_entries`
    /// entries writes before registering.
    pub const fn new(nr_vcpus: u32, event_ring_entries: u32) -> Self {
        PageHeader {
            magic: PAGE_MAGIC,
            abi_version: crate::ABI_VERSION,
            nr_vcpus,
            region_size: region_size(nr_vcpus as usize, event_ring_entries) as u32,
            record_size: RECORD_SIZE as u32,
            records_offset: HEADER_SIZE as u32,
            host_flags: 0,
            rcu_gp_seq: 0,
            rcu_callbacks_pending: 0,
            holdouts_offset: holdouts_offset(nr_vcpus as usize) as u32,
            ipi_wait_offset: ipi_wait_offset(nr_vcpus as usize, 0) as u32,
            event_ring_entries,
            event_rings_offset: crate::event_rings_offset(nr_vcpus as usize) as u32,
        }
    }

    /// Whether the geometry fields (everything the guest fixes at registration but the
    /// magic and version) are the ones this ABI computes from `nr_vcpus` and
    /// `event_ring_entries`, and `host_flags` is still zero. A host refuses any other
    /// header (`BadGeometry`), so offsets it follows never point outside the region.
    pub const fn geometry_ok(&self) -> bool {
        // The bounds first: the layout of a larger region would not fit the arithmetic.
        if self.nr_vcpus as usize > crate::MAX_VCPUS
            || !crate::valid_event_ring_entries(self.event_ring_entries)
        {
            return false;
        }
        let canonical = PageHeader::new(self.nr_vcpus, self.event_ring_entries);
        self.region_size == canonical.region_size
            && self.record_size == canonical.record_size
            && self.records_offset == canonical.records_offset
            && self.host_flags == 0
            && self.holdouts_offset == canonical.holdouts_offset
            && self.ipi_wait_offset == canonical.ipi_wait_offset
            && self.event_rings_offset == canonical.event_rings_offset
    }

    /// The header's bytes in the ABI's (little-endian) order, as a guest writes them: for
    /// tools and tests that build a region.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(offset_of!(PageHeader, magic), &self.magic.to_le_bytes());
        put(
            offset_of!(PageHeader, abi_version),
            &self.abi_version.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, nr_vcpus),
            &self.nr_vcpus.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, region_size),
            &self.region_size.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, record_size),
            &self.record_size.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, records_offset),
            &self.records_offset.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, host_flags),
            &self.host_flags.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, rcu_gp_seq),
            &self.rcu_gp_seq.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, rcu_callbacks_pending),
            &self.rcu_callbacks_pending.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, holdouts_offset),
            &self.holdouts_offset.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, ipi_wait_offset),
            &self.ipi_wait_offset.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, event_ring_entries),
            &self.event_ring_entries.to_le_bytes(),
        );
        put(
            offset_of!(PageHeader, event_rings_offset),
            &self.event_rings_offset.to_le_bytes(),
        );
        b
    }

    /// Decodes a header from its bytes (any bit pattern is a valid `PageHeader`).
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Self {
        // SAFETY: PageHeader is repr(C), exactly HEADER_SIZE bytes (asserted below) and made
        // only of integers, so every bit pattern is a valid value; read_unaligned does not
        // require the byte buffer to be aligned.
        unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<PageHeader>()) }
    }
}

/// Bits of [`PageHeader::host_flags`].
pub struct HostFlags;

impl HostFlags {
    /// The host accepted the registration and reads the region.
    pub const ACCEPTED: u32 = 1 << 0;
    /// The host wants guest events (it traces): the guest writes its event rings (ABI v5).
    /// Set together with `ACCEPTED`, and only if the header has rings.
    pub const EVENTS: u32 = 1 << 1;
}

/// What a vCPU is executing, as far as its guest knows.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuMode {
    /// Not brought up yet (a zeroed record).
    Offline = 0,
    /// In the idle loop, waiting for work or an interrupt.
    Idle = 1,
    /// In the kernel (CPL 0).
    Kernel = 2,
    /// In a user task (CPL 3).
    User = 3,
}

impl VcpuMode {
    /// Decodes the `mode` byte of a record; `None` for a value no guest may write.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(VcpuMode::Offline),
            1 => Some(VcpuMode::Idle),
            2 => Some(VcpuMode::Kernel),
            3 => Some(VcpuMode::User),
            _ => None,
        }
    }
}

/// One vCPU's record. Bytes 0..44 are written by the guest, bytes 44..64 by the host.
///
/// Since ABI v4 only `mode` and the pair `spin_lock`/`spin_holder` are framed by `seq`
/// (written by the owner alone). `rcu_nesting`, `preempt_count`, `locks_held` and
/// `ipi_wait_count` are each one aligned store by the owner, outside the frame (they change
/// on hot paths, and each is meaningful alone). The owner's `ipi_wait` bitmap (ABI v6: outside
/// the record, at [`ipi_wait_offset`]) is set by the owner and cleared bit by bit, atomically,
/// by the vCPUs that acknowledge (a host read always sees whom the owner still waits for).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuRecord {
    /// Sequence counter: odd while the owner updates guest fields. Guest.
    pub seq: u32,
    /// [`VcpuMode`] as a byte. Guest.
    pub mode: u8,
    /// Zero; reserved. Guest.
    pub reserved0: [u8; 3],
    /// RCU read-side nesting depth of the task running (or preempted) on this vCPU. Guest.
    pub rcu_nesting: u32,
    /// Preempt-disable depth. Guest.
    pub preempt_count: u32,
    /// Number of spinlocks held. Guest.
    pub locks_held: u32,
    /// vCPU the owner believes holds `spin_lock`, or [`crate::NO_VCPU`]. Guest.
    pub spin_holder: u32,
    /// Identity (guest address) of the lock the owner spins on; 0 when not spinning. Guest.
    pub spin_lock: u64,
    /// Non-zero while the owner waits for IPI acknowledgements: the number of vCPUs it
    /// started waiting on, whose bits it set in its `ipi_wait` bitmap before this store; 0
    /// when it waits on none (ABI v6). A host copies the bitmap only while this is non-zero.
    /// Guest.
    pub ipi_wait_count: u32,
    /// Zero; reserved for later guest-written fields. Guest.
    pub reserved1: [u32; 2],
    /// While this vCPU runs on a turn another vCPU lent it (the host boosted it for a
    /// `YieldTo` of that vCPU): the lender's id plus one; else 0. Host (ABI v4). A guest that
    /// no longer holds the lender up (it released the lock, acknowledged the IPI) gives the
    /// turn back with `YieldTo(lender)`. [`crate::NO_VCPU`]: a turn the host gave because a
    /// grace period waits on this vCPU (RcuWait); given back with `YieldTo(own id)` once the
    /// vCPU has reported its quiescent state.
    pub host_lent_by: u32,
    /// 1 while the host has this vCPU descheduled, else 0. Host.
    pub host_preempted: u32,
    /// Boosts the host has given this vCPU. Host.
    pub host_boosts: u32,
    /// Total nanoseconds the host kept this vCPU runnable but descheduled. Host.
    pub host_preempted_ns: u64,
}

/// First byte of the host-written half of a [`VcpuRecord`].
pub const RECORD_HOST_OFFSET: usize = offset_of!(VcpuRecord, host_lent_by);

impl VcpuRecord {
    /// Decodes a record from its bytes (any bit pattern is a valid `VcpuRecord`; use
    /// [`VcpuRecord::mode`] and the `NO_VCPU`/range checks to validate fields).
    pub fn from_bytes(bytes: &[u8; RECORD_SIZE]) -> Self {
        // SAFETY: VcpuRecord is repr(C), exactly RECORD_SIZE bytes (asserted below) and made
        // only of integers, so every bit pattern is a valid value; read_unaligned does not
        // require the byte buffer to be aligned.
        unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<VcpuRecord>()) }
    }

    /// The decoded mode byte, `None` if the guest wrote a value outside [`VcpuMode`].
    pub const fn mode(&self) -> Option<VcpuMode> {
        VcpuMode::from_raw(self.mode)
    }

    /// Whether two reads of `seq` around a copy prove the copy is not torn.
    pub const fn seq_consistent(before: u32, after: u32) -> bool {
        before == after && before % 2 == 0
    }
}

// The layout is the contract: any change here is an ABI_VERSION bump and a docs/abi.md edit.
const _: () = {
    assert!(size_of::<PageHeader>() == HEADER_SIZE);
    assert!(offset_of!(PageHeader, magic) == 0);
    assert!(offset_of!(PageHeader, abi_version) == 8);
    assert!(offset_of!(PageHeader, nr_vcpus) == 12);
    assert!(offset_of!(PageHeader, region_size) == 16);
    assert!(offset_of!(PageHeader, record_size) == 20);
    assert!(offset_of!(PageHeader, records_offset) == 24);
    assert!(offset_of!(PageHeader, host_flags) == 28);
    assert!(offset_of!(PageHeader, rcu_gp_seq) == 32);
    assert!(offset_of!(PageHeader, rcu_callbacks_pending) == 40);
    assert!(offset_of!(PageHeader, holdouts_offset) == 48);
    assert!(offset_of!(PageHeader, ipi_wait_offset) == 52);
    assert!(offset_of!(PageHeader, event_ring_entries) == 56);
    assert!(offset_of!(PageHeader, event_rings_offset) == 60);

    assert!(size_of::<VcpuRecord>() == RECORD_SIZE);
    assert!(offset_of!(VcpuRecord, seq) == 0);
    assert!(offset_of!(VcpuRecord, mode) == 4);
    assert!(offset_of!(VcpuRecord, reserved0) == 5);
    assert!(offset_of!(VcpuRecord, rcu_nesting) == 8);
    assert!(offset_of!(VcpuRecord, preempt_count) == 12);
    assert!(offset_of!(VcpuRecord, locks_held) == 16);
    assert!(offset_of!(VcpuRecord, spin_holder) == 20);
    assert!(offset_of!(VcpuRecord, spin_lock) == 24);
    assert!(offset_of!(VcpuRecord, ipi_wait_count) == 32);
    assert!(offset_of!(VcpuRecord, reserved1) == 36);
    assert!(offset_of!(VcpuRecord, host_lent_by) == 44);
    assert!(offset_of!(VcpuRecord, host_preempted) == 48);
    assert!(offset_of!(VcpuRecord, host_boosts) == 52);
    assert!(offset_of!(VcpuRecord, host_preempted_ns) == 56);

    // Bitmaps start 64-byte aligned at every vCPU count.
    assert!(holdouts_offset(1) % 64 == 0 && ipi_wait_offset(65, 1) % 64 == 0);
    // The largest region (every vCPU, the biggest rings) still has a u32 size.
    assert!(region_size(crate::MAX_VCPUS, crate::MAX_EVENT_RING_ENTRIES) < u32::MAX as usize);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_spells_pvsync() {
        assert_eq!(&PAGE_MAGIC.to_le_bytes(), b"PVSYNC\0\0");
    }

    #[test]
    fn region_rounds_to_pages() {
        // Header, 4 records, holdouts and 4 ipi_wait bitmaps (a line each): 640 bytes.
        assert_eq!(crate::event_rings_offset(4), 64 + 4 * 64 + 5 * 64);
        assert_eq!(region_size(4, 0), PAGE_SIZE);
        // 31 vCPUs: 64 + 31 * 64 + 32 * 64 bytes fill one page exactly.
        assert_eq!(region_size(31, 0), PAGE_SIZE);
        assert_eq!(region_size(32, 0), 2 * PAGE_SIZE);
        // One vCPU with a 128-entry ring: 64 + 64 + 2 * 64 + 64 + 128 * 24 bytes.
        assert_eq!(region_size(1, 128), PAGE_SIZE);
        assert_eq!(region_size(2, 128), 2 * PAGE_SIZE);
        assert_eq!(
            record_offset(63) + RECORD_SIZE,
            HEADER_SIZE + 64 * RECORD_SIZE
        );
    }

    /// Where the bitmaps sit at sizes that are not multiples of 64 (ABI v6).
    #[test]
    fn bitmaps_follow_the_records() {
        for (nr, stride) in [(65usize, 64usize), (96, 64), (1000, 128), (1024, 128)] {
            assert_eq!(crate::bitmap_stride(nr), stride);
            let h = PageHeader::new(nr as u32, 128);
            assert_eq!(h.holdouts_offset as usize, 64 + nr * 64);
            assert_eq!(h.ipi_wait_offset as usize, 64 + nr * 64 + stride);
            assert_eq!(ipi_wait_offset(nr, nr - 1), 64 + nr * 64 + nr * stride);
            assert_eq!(
                h.event_rings_offset as usize,
                64 + nr * 64 + (nr + 1) * stride
            );
            assert!(h.geometry_ok());
            assert!(region_size(nr, 128) >= crate::event_ring_offset(nr, 128, nr));
        }
        // 1024 vCPUs with the pvsync guest's rings: 64 KiB of records, 1025 * 128 bytes of
        // bitmaps, 1024 rings of 3136 bytes.
        assert_eq!(
            region_size(1024, 128),
            (64 + 65536 + 1025 * 128 + 1024 * 3136usize).div_ceil(PAGE_SIZE) * PAGE_SIZE
        );
    }

    #[test]
    fn geometry_refuses_moved_offsets() {
        let good = PageHeader::new(96, 128);
        assert!(good.geometry_ok());
        let moved: [fn(&mut PageHeader); 6] = [
            |h| h.holdouts_offset = h.region_size,
            |h| h.ipi_wait_offset = u32::MAX - 8,
            |h| h.ipi_wait_offset -= 64,
            |h| h.event_rings_offset += 64,
            |h| h.region_size -= PAGE_SIZE as u32,
            |h| h.nr_vcpus = crate::MAX_VCPUS as u32 + 1,
        ];
        // Past every bound at once: refused without computing a layout that overflows.
        let mut huge = good;
        huge.nr_vcpus = u32::MAX;
        huge.event_ring_entries = u32::MAX;
        assert!(!huge.geometry_ok());
        for m in moved {
            let mut h = good;
            m(&mut h);
            assert!(!h.geometry_ok(), "{h:?}");
        }
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let mut h = PageHeader::new(300, 128);
        h.rcu_gp_seq = 7;
        h.rcu_callbacks_pending = 9;
        h.host_flags = 3;
        assert_eq!(PageHeader::from_bytes(&h.to_bytes()), h);
        let h = PageHeader::new(8, 0);
        // SAFETY: PageHeader is plain integers of HEADER_SIZE bytes, so viewing it as bytes is
        // sound for the lifetime of `h`.
        let bytes: &[u8; HEADER_SIZE] = unsafe { &*(&h as *const PageHeader).cast() };
        assert_eq!(&bytes[0..8], b"PVSYNC\0\0");
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            crate::ABI_VERSION
        );
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 8);
        assert_eq!(PageHeader::from_bytes(bytes), h);
    }

    #[test]
    fn record_decodes_fields_at_documented_offsets() {
        let mut b = [0u8; RECORD_SIZE];
        b[0..4].copy_from_slice(&6u32.to_le_bytes());
        b[4] = VcpuMode::User as u8;
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        b[20..24].copy_from_slice(&crate::NO_VCPU.to_le_bytes());
        b[24..32].copy_from_slice(&0xdead_beefu64.to_le_bytes());
        b[32..36].copy_from_slice(&2u32.to_le_bytes());
        b[56..64].copy_from_slice(&1234u64.to_le_bytes());
        let r = VcpuRecord::from_bytes(&b);
        assert_eq!(r.seq, 6);
        assert_eq!(r.mode(), Some(VcpuMode::User));
        assert_eq!(r.rcu_nesting, 2);
        assert_eq!(r.spin_holder, crate::NO_VCPU);
        assert_eq!(r.spin_lock, 0xdead_beef);
        assert_eq!(r.ipi_wait_count, 2);
        assert_eq!(r.host_preempted_ns, 1234);
        assert_eq!(RECORD_HOST_OFFSET, 44);
    }

    #[test]
    fn garbage_mode_is_rejected() {
        for raw in 4..=u8::MAX {
            assert_eq!(VcpuMode::from_raw(raw), None);
        }
    }

    #[test]
    fn seq_consistency() {
        assert!(VcpuRecord::seq_consistent(4, 4));
        assert!(!VcpuRecord::seq_consistent(5, 5), "odd = write in progress");
        assert!(!VcpuRecord::seq_consistent(4, 6), "changed = torn");
    }
}
