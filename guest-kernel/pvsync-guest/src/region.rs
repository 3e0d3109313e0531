//! The shared region (layout in `shared_abi`, contract in docs/abi.md): set-up,
//! registration with the host, and the header.
//!
//! The region is guest memory the host reads (and writes, in the host halves): the crate
//! only ever touches it through raw pointers with volatile or atomic accesses, never
//! through references.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use shared_abi::{
    bitmap_stride, bitmap_word_bit, bitmap_words, event_ring_offset, holdouts_offset,
    ipi_wait_offset, record_offset, region_size, EventRingHeader, HostFlags, Hypercall,
    HypercallStatus, PageHeader, VcpuRecord, NO_VCPU,
};
use spin::Once;

use crate::cpu::CpuSync;
use crate::cpuset::CpuSet;
use crate::platform::Platform;

struct Region {
    base: *mut u8,
    guest_phys: u64,
    nr_vcpus: u32,
    status: HypercallStatus,
    /// Where vCPU 0's `ipi_wait` bitmap starts and the bytes between two of them, computed
    /// once: each acknowledger reaches its sender's.
    ipi_wait: (usize, usize),
    /// The grace period's holdout bitmap, found once (every quiescent-state report clears
    /// a bit of it).
    holdouts: SharedBitmap,
}

// SAFETY: `base` points at memory that lives as long as the kernel and that the crate only
// accesses with volatile or atomic operations (the rules in docs/abi.md say who writes what).
unsafe impl Sync for Region {}
// SAFETY: as above; the pointer is only an address.
unsafe impl Send for Region {}

static REGION: Once<Region> = Once::new();

/// A pvsync host accepted the region: hypercalls are made from now on.
static PV_HOST: AtomicBool = AtomicBool::new(false);

/// Whether a pvsync host accepted the shared region (hypercalls are only made then).
#[inline]
pub fn pv_host() -> bool {
    PV_HOST.load(Ordering::Relaxed)
}

/// Entries of each CPU's event ring. The host drains a vCPU's ring whenever the vCPU exits
/// (every hypercall, every end of a turn), and events mark slow paths, so a turn rarely
/// holds more.
pub const EVENT_RING_ENTRIES: u32 = 128;

/// The host asked for events (`HostFlags::EVENTS`) when it accepted the region.
static EVENTS_ON: AtomicBool = AtomicBool::new(false);

/// Whether the host asked for [`events`](crate::events).
#[inline]
pub fn events_on() -> bool {
    EVENTS_ON.load(Ordering::Relaxed)
}

/// Bytes of the region for `nr_vcpus` CPUs (records, bitmaps and event rings), whole
/// pages: what [`init`] needs at `base`.
pub const fn size(nr_vcpus: u32) -> usize {
    region_size(nr_vcpus as usize, EVENT_RING_ENTRIES)
}

/// Fills the region at `base` for `nr_vcpus` CPUs, registers it with the host (telling it
/// `guest_phys`) and makes the calling CPU publish into its record. Without a pvsync host
/// the status says so and the region is still used (unread). Only the first call sets the
/// region up; later calls return its status.
///
/// # Safety
/// `base` must point at [`size`]`(nr_vcpus)` bytes, 4 KiB aligned, used by nothing else
/// for the rest of the kernel's life, at guest-physical address `guest_phys` (below 4 GiB).
pub unsafe fn init<P: Platform>(base: *mut u8, guest_phys: u64, nr_vcpus: u32) -> HypercallStatus {
    // SAFETY: the caller's promise, passed on.
    unsafe { set_up::<P>(base, guest_phys, nr_vcpus, true) }
}

/// As [`init`], but the host is never told: the kernel runs as on a stock host (status
/// `NoHost`), for comparisons.
///
/// # Safety
/// As for [`init`].
pub unsafe fn init_unregistered<P: Platform>(
    base: *mut u8,
    guest_phys: u64,
    nr_vcpus: u32,
) -> HypercallStatus {
    // SAFETY: the caller's promise, passed on.
    unsafe { set_up::<P>(base, guest_phys, nr_vcpus, false) }
}

/// # Safety
/// As for [`init`].
unsafe fn set_up<P: Platform>(
    base: *mut u8,
    guest_phys: u64,
    nr_vcpus: u32,
    tell_host: bool,
) -> HypercallStatus {
    if let Some(r) = REGION.get() {
        return r.status;
    }
    // SAFETY: the caller hands over `size(nr_vcpus)` bytes at `base`; the header and records
    // are written before the host learns the address.
    unsafe {
        core::ptr::write_bytes(base, 0, size(nr_vcpus));
        write_volatile(
            base.cast::<PageHeader>(),
            PageHeader::new(nr_vcpus, EVENT_RING_ENTRIES),
        );
        for cpu in 0..nr_vcpus as usize {
            let rec = base.add(record_offset(cpu)).cast::<VcpuRecord>();
            write_volatile(addr_of_mut!((*rec).spin_holder), NO_VCPU);
        }
    }
    let status = if tell_host {
        register::<P>(guest_phys)
    } else {
        HypercallStatus::NoHost
    };
    PV_HOST.store(status == HypercallStatus::Ok, Ordering::Release);
    // SAFETY: the header lies in the region the caller handed over; volatile because the
    // host writes host_flags (before the status `in` returned).
    let flags = unsafe { read_volatile(addr_of!((*base.cast::<PageHeader>()).host_flags)) };
    if status == HypercallStatus::Ok && flags & HostFlags::EVENTS != 0 {
        EVENTS_ON.store(true, Ordering::Release);
    }
    let status = REGION
        .call_once(|| Region {
            base,
            guest_phys,
            nr_vcpus,
            status,
            ipi_wait: ipi_wait_layout(nr_vcpus),
            // SAFETY: `holdouts_offset` is one of the ABI's bitmap offsets for `nr_vcpus`.
            holdouts: unsafe { bitmap_at(base, holdouts_offset(nr_vcpus as usize), nr_vcpus) },
        })
        .status;
    attach_this_cpu::<P>();
    status
}

/// Makes the calling CPU publish into its record of the region (nothing before the region
/// exists), carrying over what it published so far.
pub fn attach_this_cpu<P: Platform>() {
    let cpu = P::cpu();
    if let Some(rec) = record_ptr(cpu.id()) {
        // The bitmap with the record (interrupts are off here: nothing publishes between).
        cpu.set_ipi_wait(ipi_wait_bitmap(cpu.id()));
        crate::record::attach(cpu, rec);
    }
}

/// Makes the RegisterSharedRegion hypercall for `guest_phys` and reads back its status.
pub fn register<P: Platform>(guest_phys: u64) -> HypercallStatus {
    let Ok(addr) = u32::try_from(guest_phys) else {
        return HypercallStatus::BadAddress;
    };
    let port = Hypercall::RegisterSharedRegion.port();
    P::hypercall_out(port, addr);
    HypercallStatus::from_raw(P::hypercall_in(port))
}

/// Guest-physical address of the region, its vCPU count and registration status.
pub fn info() -> Option<(u64, u32, HypercallStatus)> {
    REGION.get().map(|r| (r.guest_phys, r.nr_vcpus, r.status))
}

/// Whether the host has set ACCEPTED in the header.
pub fn host_accepted() -> bool {
    REGION.get().is_some_and(|r| {
        // SAFETY: the header lies in the region, which lives forever; volatile because the
        // host writes host_flags.
        let flags = unsafe { read_volatile(addr_of!((*header(r)).host_flags)) };
        flags & HostFlags::ACCEPTED != 0
    })
}

fn header(r: &Region) -> *mut PageHeader {
    r.base.cast()
}

/// CPU `cpu`'s record in the region, if there is a region and such a CPU.
pub(crate) fn record_ptr(cpu: u32) -> Option<*mut VcpuRecord> {
    let r = REGION.get()?;
    // SAFETY: `cpu < nr_vcpus`, so the offset stays inside the region.
    (cpu < r.nr_vcpus).then(|| unsafe { r.base.add(record_offset(cpu as usize)) }.cast())
}

/// CPU `cpu`'s event ring (header pointer, entries), if there is a region and such a CPU.
pub(crate) fn event_ring(cpu: u32) -> Option<(*mut EventRingHeader, u32)> {
    let r = REGION.get()?;
    let entries = EVENT_RING_ENTRIES;
    (cpu < r.nr_vcpus).then(|| {
        let at = event_ring_offset(r.nr_vcpus as usize, entries, cpu as usize);
        // SAFETY: `cpu < nr_vcpus`, so the ring lies inside the region (`size`).
        let ring = unsafe { r.base.add(at) };
        (ring.cast(), entries)
    })
}

/// Publishes the RCU grace-period sequence and callback backlog in the header. Any CPU may
/// call this. The sequence only moves forward (an atomic max: a CPU preempted between
/// computing it and storing it must not take it back, or the host would read the grace
/// period in progress as over); the backlog is one atomic store, a hint.
pub fn set_rcu_header(gp_seq: u64, pending: u64) {
    if let Some(r) = REGION.get() {
        let h = header(r);
        // SAFETY: the header lies in the live region for the kernel's lifetime; `rcu_gp_seq`
        // is 8-byte aligned (offset 32 of a 64-byte aligned header) and the guest only
        // updates it atomically (the host only reads it); the backlog, 8-byte aligned at
        // offset 40, is stored atomically too (any CPU may store it).
        unsafe {
            AtomicU64::from_ptr(addr_of_mut!((*h).rcu_gp_seq)).fetch_max(gp_seq, Ordering::SeqCst);
            AtomicU64::from_ptr(addr_of_mut!((*h).rcu_callbacks_pending))
                .store(pending, Ordering::Relaxed);
        }
    }
}

/// The grace period's holdout bitmap in the region (ABI v6), which CPUs update concurrently;
/// an empty one when there is no region, so callers need not care.
#[inline]
pub fn rcu_holdouts() -> SharedBitmap {
    REGION.get().map_or(SharedBitmap::NONE, |r| r.holdouts)
}

/// CPU `cpu`'s `ipi_wait` bitmap in the region (ABI v6); an empty one when there is no
/// region or no such CPU.
#[inline]
pub(crate) fn ipi_wait_bitmap(cpu: u32) -> SharedBitmap {
    match REGION.get() {
        // SAFETY: `cpu < nr_vcpus`: the ABI's `ipi_wait_offset(nr_vcpus, cpu)`, which the
        // layout computed at set-up gives.
        Some(r) if cpu < r.nr_vcpus => unsafe {
            bitmap_at(r.base, ipi_wait_at(r.ipi_wait, cpu), r.nr_vcpus)
        },
        _ => SharedBitmap::NONE,
    }
}

/// Where vCPU 0's `ipi_wait` bitmap lies in a region for `nr_vcpus` vCPUs, and the bytes
/// from one vCPU's to the next: vCPU `i`'s is at `at + i * stride`, the ABI's
/// `ipi_wait_offset(nr_vcpus, i)`.
fn ipi_wait_layout(nr_vcpus: u32) -> (usize, usize) {
    (
        ipi_wait_offset(nr_vcpus as usize, 0),
        bitmap_stride(nr_vcpus as usize),
    )
}

/// vCPU `cpu`'s `ipi_wait` bitmap's offset, from a layout of [`ipi_wait_layout`].
#[inline]
fn ipi_wait_at((at, stride): (usize, usize), cpu: u32) -> usize {
    at + cpu as usize * stride
}

/// The vCPU bitmap at `offset` of the region at `base` for `nr_vcpus` vCPUs.
///
/// # Safety
/// `base` must be the region's and `offset` one of the ABI's bitmap offsets for
/// `nr_vcpus`.
unsafe fn bitmap_at(base: *mut u8, offset: usize, nr_vcpus: u32) -> SharedBitmap {
    let words = bitmap_words(nr_vcpus as usize);
    // SAFETY: per the contract the bitmap's words lie inside the region, which lives as long
    // as the kernel; the ABI's bitmaps are 64-byte aligned; the guest only ever accesses
    // them atomically (the host only reads them).
    SharedBitmap(unsafe {
        core::slice::from_raw_parts(base.add(offset).cast::<AtomicU64>(), words)
    })
}

/// A vCPU bitmap of the shared region (ABI v6: bit `i % 64` of word `i / 64` for vCPU `i`,
/// as many words as the VM's vCPUs need), updated with one atomic operation per word. CPUs
/// past the VM's count have no bit: operations on them do nothing.
#[derive(Clone, Copy)]
pub struct SharedBitmap(&'static [AtomicU64]);

impl SharedBitmap {
    /// No bitmap (no region): every update does nothing, every read finds nobody.
    pub(crate) const NONE: SharedBitmap = SharedBitmap(&[]);

    /// Calls `f` on each word of the bitmap with the same word of `set` (words past either
    /// are left alone). One word (up to 64 vCPUs) takes no loop: see the `cpuset` module.
    #[inline]
    fn with_words(&self, set: &CpuSet, f: impl Fn(&AtomicU64, u64)) {
        match (self.0, set.words()) {
            ([w], [v, ..]) => f(w, *v),
            (w, v) => w.iter().zip(v).for_each(|(w, &v)| f(w, v)),
        }
    }

    /// Stores every word: the bitmap becomes `set` (its CPUs past the VM dropped).
    #[inline]
    pub fn store(&self, set: &CpuSet) {
        self.with_words(set, |w, v| w.store(v, Ordering::Release));
    }

    /// Zeroes the words in which `set` has a CPU (the words a [`SharedBitmap::store`] of it
    /// set).
    #[inline]
    pub fn clear_words_of(&self, set: &CpuSet) {
        self.with_words(set, |w, v| {
            if v != 0 {
                w.store(0, Ordering::Release);
            }
        });
    }

    /// Zeroes every word.
    #[inline]
    pub fn clear(&self) {
        match self.0 {
            [w] => w.store(0, Ordering::Release),
            words => words.iter().for_each(|w| w.store(0, Ordering::Release)),
        }
    }

    /// Clears the bits of the CPUs not in `keep` (one atomic AND per word).
    #[inline]
    pub fn retain(&self, keep: &CpuSet) {
        self.with_words(keep, |w, k| _ = w.fetch_and(k, Ordering::SeqCst));
    }

    /// Clears `cpu`'s bit (one atomic AND: others clear theirs at once).
    pub fn remove(&self, cpu: u32) {
        let (i, b) = bitmap_word_bit(cpu);
        if let Some(w) = self.0.get(i) {
            w.fetch_and(!b, Ordering::SeqCst);
        }
    }

    /// Sets `cpu`'s bit (one atomic OR).
    pub fn insert(&self, cpu: u32) {
        let (i, b) = bitmap_word_bit(cpu);
        if let Some(w) = self.0.get(i) {
            w.fetch_or(b, Ordering::SeqCst);
        }
    }

    /// The CPUs set now (word by word).
    pub fn load(&self) -> CpuSet {
        let mut words = [0; crate::cpuset::CPU_SET_WORDS];
        words
            .iter_mut()
            .zip(self.0)
            .for_each(|(d, w)| *d = w.load(Ordering::SeqCst));
        CpuSet::from_words(&words)
    }

    /// The first word (vCPUs below 64), what an event's payload carries; 0 without a region.
    pub fn first_word(&self) -> u64 {
        self.0.first().map_or(0, |w| w.load(Ordering::Relaxed))
    }
}

/// The header's RCU fields as last published (sequence, backlog), for tests.
pub fn rcu_header() -> Option<(u64, u64)> {
    REGION.get().map(|r| {
        let h = header(r);
        // SAFETY: as above; volatile reads of plain integers.
        // `rcu_gp_seq` is only ever accessed atomically (CPUs raise it with fetch_max).
        unsafe {
            (
                AtomicU64::from_ptr(addr_of_mut!((*h).rcu_gp_seq)).load(Ordering::SeqCst),
                read_volatile(addr_of!((*h).rcu_callbacks_pending)),
            )
        }
    })
}

/// Whether `cpu` publishes into the region (rather than its private sink).
pub fn attached(cpu: &CpuSync) -> bool {
    record_ptr(cpu.id()) == Some(cpu.record())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// A bitmap of the ABI's size for `nr` vCPUs, on its own memory.
    fn bitmap(nr: usize) -> SharedBitmap {
        let words: Vec<AtomicU64> = (0..bitmap_words(nr)).map(|_| AtomicU64::new(0)).collect();
        SharedBitmap(Vec::leak(words))
    }

    /// The `ipi_wait` bitmaps found from the layout computed once are the ABI's, at every
    /// vCPU count: the last one ends before the event rings.
    #[test]
    fn ipi_wait_bitmaps_from_the_cached_layout_are_the_abis() {
        for nr in [
            1u32,
            2,
            63,
            64,
            65,
            96,
            1000,
            1024,
            shared_abi::MAX_VCPUS as u32,
        ] {
            let layout = ipi_wait_layout(nr);
            for cpu in [0, nr / 2, nr - 1] {
                assert_eq!(
                    ipi_wait_at(layout, cpu),
                    ipi_wait_offset(nr as usize, cpu as usize),
                    "{nr} vCPUs, vCPU {cpu}"
                );
            }
            let last_end = ipi_wait_at(layout, nr - 1) + bitmap_words(nr as usize) * 8;
            assert!(
                last_end <= shared_abi::event_rings_offset(nr as usize),
                "{nr}"
            );
        }
    }

    /// At vCPU counts that are not multiples of 64: the operations the shootdown and the
    /// grace period make on the region's bitmaps, word by word, and nothing past the VM.
    #[test]
    fn shared_bitmaps_at_counts_that_are_not_word_multiples() {
        for nr in [65usize, 96, 1000] {
            let b = bitmap(nr);
            let last = nr as u32 - 1;
            let all = CpuSet::first(nr);
            b.store(&all);
            assert_eq!(b.load(), all, "{nr}");
            let raw: Vec<u64> = b.0.iter().map(|w| w.load(Ordering::Relaxed)).collect();
            assert!(
                shared_abi::bitmap_within(&raw, nr) && !shared_abi::bitmap_within(&raw, nr - 1)
            );
            // Acknowledgements and reports clear one bit each, in the right word.
            b.remove(last);
            b.remove(1);
            assert_eq!(b.load().len(), nr - 2);
            assert!(!b.load().contains(last) && b.load().contains(last - 1));
            b.insert(last);
            assert!(b.load().contains(last));
            // A CPU past the bitmap has no bit: nothing happens.
            b.insert(bitmap_words(nr) as u32 * 64);
            b.remove(bitmap_words(nr) as u32 * 64);
            let keep: CpuSet = [0, 63, last].into_iter().collect();
            b.retain(&keep);
            assert_eq!(b.load(), keep);
            assert_eq!(b.first_word(), 1 | 1 << 63);
            // The end of a wait zeroes the words its targets set, and only those.
            let targets: CpuSet = [last].into_iter().collect();
            b.clear_words_of(&targets);
            assert_eq!(b.load().iter().collect::<Vec<_>>(), [0, 63]);
            b.clear();
            assert_eq!(b.load(), CpuSet::new());
        }
    }

    #[test]
    fn without_a_region_bitmaps_are_empty_and_updates_do_nothing() {
        let b = SharedBitmap::NONE;
        b.store(&CpuSet::first(100));
        b.insert(3);
        assert_eq!(b.load(), CpuSet::new());
        assert_eq!(b.first_word(), 0);
    }
}
