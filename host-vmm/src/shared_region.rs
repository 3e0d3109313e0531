//! The host side of the shared region: validating a registration, taking consistent
//! snapshots, checking every guest-written field, and printing the decoded region.
//!
//! The region is guest memory and therefore hostile input. It is only ever copied out with
//! volatile/atomic accesses (vm-memory), never referenced, and every loop over it is bounded.

use std::fmt::Write as _;
use std::mem::offset_of;
use std::ops::Range;
use std::sync::atomic::{fence, Ordering};

use shared_abi::{
    bitmap_contains, bitmap_iter, bitmap_within, bitmap_word_bit, bitmap_words, holdouts_offset,
    ipi_wait_offset, record_offset, HostFlags, HypercallStatus, PageHeader, VcpuMode, VcpuRecord,
    ABI_VERSION, HEADER_SIZE, NO_VCPU, PAGE_MAGIC, PAGE_SIZE, RECORD_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// How often a torn record is re-read before it is reported as torn.
pub const MAX_READ_ATTEMPTS: usize = 8;

/// An accepted region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub gpa: u64,
    pub nr_vcpus: u32,
    pub size: u64,
    /// Entries of each vCPU's event ring (0: the guest keeps none).
    pub event_ring_entries: u32,
}

/// Checks a registration request for `gpa` from a VM with `vm_vcpus` vCPUs whose kernel
/// occupies `kernel` and whose RAM (per the memory map it was given) is `ram`. Returns the
/// status to hand back to the guest on refusal.
pub fn validate(
    mem: &GuestMemoryMmap,
    gpa: u64,
    vm_vcpus: u32,
    kernel: &Range<u64>,
    ram: &[Range<u64>],
) -> Result<Registration, HypercallStatus> {
    crate::sched::lock_audit::guest_read();
    if gpa % PAGE_SIZE as u64 != 0 {
        return Err(HypercallStatus::BadAddress);
    }
    let mut bytes = [0u8; HEADER_SIZE];
    mem.read_slice(&mut bytes, GuestAddress(gpa))
        .map_err(|_| HypercallStatus::BadAddress)?;
    let h = PageHeader::from_bytes(&bytes);
    if h.magic != PAGE_MAGIC {
        return Err(HypercallStatus::BadMagic);
    }
    if h.abi_version != ABI_VERSION {
        return Err(HypercallStatus::VersionMismatch);
    }
    if h.nr_vcpus != vm_vcpus {
        return Err(HypercallStatus::BadVcpuCount);
    }
    // Every offset the host will follow (records, bitmaps, rings) must be the one this
    // version computes from the vCPU count: none can then point outside the region.
    if !h.geometry_ok() {
        return Err(HypercallStatus::BadGeometry);
    }
    let size = h.region_size as u64;
    // Inside one RAM range of the memory map: the legacy hole holds the ACPI tables, and the
    // host will write into the region.
    let end = gpa.checked_add(size).ok_or(HypercallStatus::BadAddress)?;
    let in_ram = ram.iter().any(|r| r.start <= gpa && end <= r.end);
    if !in_ram || !mem.check_range(GuestAddress(gpa), size as usize) {
        return Err(HypercallStatus::BadAddress);
    }
    if gpa < kernel.end && kernel.start < gpa + size {
        return Err(HypercallStatus::OverlapsKernel);
    }
    Ok(Registration {
        gpa,
        nr_vcpus: h.nr_vcpus,
        size,
        event_ring_entries: h.event_ring_entries,
    })
}

/// Tells the guest its region is read: sets ACCEPTED in the header's host flags, and
/// EVENTS if the host wants guest events (`events`) and the region has rings for them.
pub fn mark_accepted(
    mem: &GuestMemoryMmap,
    reg: &Registration,
    events: bool,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut flags = HostFlags::ACCEPTED;
    if events && reg.event_ring_entries > 0 {
        flags |= HostFlags::EVENTS;
    }
    mem.store(
        flags,
        GuestAddress(reg.gpa + offset_of!(PageHeader, host_flags) as u64),
        Ordering::Release,
    )
}

bitflags::bitflags! {
    /// What is wrong with a record, as far as the host can tell.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Problems: u8 {
        /// The sequence counter never read consistent (odd or moving) within the retries.
        const TORN = 1 << 0;
        /// `mode` is not a [`VcpuMode`].
        const BAD_MODE = 1 << 1;
        /// `spin_holder` names no vCPU of this VM.
        const BAD_HOLDER = 1 << 2;
        /// `ipi_wait_count` exceeds the vCPU count, or the `ipi_wait` bitmap has bits for
        /// vCPUs this VM does not have.
        const BAD_IPI_WAIT = 1 << 3;
        /// A reserved field is not zero.
        const RESERVED = 1 << 4;
    }
}

/// One record as the host read it.
#[derive(Clone, Debug)]
pub struct RecordView {
    pub vcpu: u32,
    /// The copy (the last one read, if torn).
    pub record: VcpuRecord,
    /// The owner's `ipi_wait` bitmap, copied after the record only while its
    /// `ipi_wait_count` is non-zero (else empty: it waits on nobody).
    pub ipi_wait: Vec<u64>,
    pub problems: Problems,
}

impl RecordView {
    /// A view of `record` as validated for a VM of `nr_vcpus`, with no bitmap.
    pub fn new(vcpu: u32, record: VcpuRecord, nr_vcpus: u32) -> Self {
        RecordView {
            vcpu,
            record,
            ipi_wait: Vec::new(),
            problems: check(&record, nr_vcpus),
        }
    }

    /// This view with the owner waiting on `targets` (as if copied from its bitmap): for
    /// synthetic snapshots in tests and benchmarks.
    pub fn waiting_on(mut self, nr_vcpus: u32, targets: &[u32]) -> Self {
        self.ipi_wait = bitmap_of(nr_vcpus, targets);
        self.record.ipi_wait_count = targets.len() as u32;
        self
    }

    /// Whether the owner waits for an IPI acknowledgement from `vcpu`.
    pub fn waits_on(&self, vcpu: u32) -> bool {
        bitmap_contains(&self.ipi_wait, vcpu)
    }

    /// The vCPUs the owner waits on, ascending.
    pub fn ipi_targets(&self) -> impl Iterator<Item = u32> + '_ {
        bitmap_iter(&self.ipi_wait)
    }
}

/// Checks the guest-written fields of `r` for a VM with `nr_vcpus` vCPUs (the `ipi_wait`
/// bitmap is checked where it is copied, [`read_record`]).
pub fn check(r: &VcpuRecord, nr_vcpus: u32) -> Problems {
    let mut p = Problems::empty();
    if r.mode().is_none() {
        p |= Problems::BAD_MODE;
    }
    if r.spin_holder != NO_VCPU && r.spin_holder >= nr_vcpus {
        p |= Problems::BAD_HOLDER;
    }
    if r.ipi_wait_count > nr_vcpus {
        p |= Problems::BAD_IPI_WAIT;
    }
    if r.reserved0 != [0; 3] || r.reserved1 != [0; 2] {
        p |= Problems::RESERVED;
    }
    p
}

/// A bitmap for a VM of `nr_vcpus` naming `vcpus` (ids past the VM are dropped).
fn bitmap_of(nr_vcpus: u32, vcpus: &[u32]) -> Vec<u64> {
    let mut words = vec![0u64; bitmap_words(nr_vcpus as usize)];
    for &v in vcpus.iter().filter(|&&v| v < nr_vcpus) {
        let (w, b) = bitmap_word_bit(v);
        words[w] |= b;
    }
    words
}

/// The registered region's bytes, for copying out of. One volatile slice over the whole
/// region (it lies inside one RAM range: [`validate`]), so a copy costs no guest-address
/// lookup per field: a periodic look at a 1024-vCPU region copies 64 KiB of records.
struct RegionReader<'a> {
    slice: VolatileSlice<'a, ()>,
    reg: &'a Registration,
}

impl<'a> RegionReader<'a> {
    fn new(
        mem: &'a GuestMemoryMmap,
        reg: &'a Registration,
    ) -> Result<Self, vm_memory::GuestMemoryError> {
        crate::sched::lock_audit::guest_read();
        let slice = mem.get_slice(GuestAddress(reg.gpa), reg.size as usize)?;
        Ok(RegionReader { slice, reg })
    }

    fn header(&self) -> Result<PageHeader, vm_memory::GuestMemoryError> {
        let mut h = [0u8; HEADER_SIZE];
        self.slice.read_slice(&mut h, 0)?;
        Ok(PageHeader::from_bytes(&h))
    }

    /// Copies the bitmap at `offset`, one atomic load per word (each word is written whole,
    /// by atomic stores and ANDs).
    fn bitmap(&self, offset: usize) -> Result<Vec<u64>, vm_memory::GuestMemoryError> {
        (0..bitmap_words(self.reg.nr_vcpus as usize))
            .map(|w| Ok(self.slice.load(offset + 8 * w, Ordering::Acquire)?))
            .collect()
    }

    /// Reads record `vcpu` consistently: sequence counter even and unchanged around the
    /// copy; then its `ipi_wait` bitmap if it waits.
    fn record(&self, vcpu: u32) -> Result<RecordView, vm_memory::GuestMemoryError> {
        let nr = self.reg.nr_vcpus;
        let at = record_offset(vcpu as usize);
        let mut buf = [0u8; RECORD_SIZE];
        for _ in 0..MAX_READ_ATTEMPTS {
            let before: u32 = self.slice.load(at, Ordering::Acquire)?;
            self.slice.read_slice(&mut buf, at)?;
            fence(Ordering::Acquire);
            let after: u32 = self.slice.load(at, Ordering::Acquire)?;
            if VcpuRecord::seq_consistent(before, after) {
                return self.with_ipi_wait(RecordView::new(vcpu, VcpuRecord::from_bytes(&buf), nr));
            }
            std::hint::spin_loop();
        }
        let mut view = RecordView::new(vcpu, VcpuRecord::from_bytes(&buf), nr);
        view.problems |= Problems::TORN;
        self.with_ipi_wait(view)
    }

    /// Adds the owner's `ipi_wait` bitmap to `view` if it says it waits (the count was copied
    /// with the record; the owner set the bitmap before it). A bitmap naming vCPUs past the
    /// VM is a problem. Nothing else can be checked: the owner may have ended that wait and
    /// started another (with other targets) between the record copy and the bitmap copy, so
    /// the bits need not match the count, and an acknowledged bit is already clear.
    fn with_ipi_wait(
        &self,
        mut view: RecordView,
    ) -> Result<RecordView, vm_memory::GuestMemoryError> {
        let count = view.record.ipi_wait_count;
        if count == 0 || view.problems.contains(Problems::BAD_IPI_WAIT) {
            return Ok(view);
        }
        let nr = self.reg.nr_vcpus as usize;
        let words = self.bitmap(ipi_wait_offset(nr, view.vcpu as usize))?;
        if !bitmap_within(&words, nr) {
            view.problems |= Problems::BAD_IPI_WAIT;
        }
        view.ipi_wait = words;
        Ok(view)
    }
}

/// Reads record `vcpu` consistently (see [`Snapshot`] for many at once).
pub fn read_record(
    mem: &GuestMemoryMmap,
    reg: &Registration,
    vcpu: u32,
) -> Result<RecordView, vm_memory::GuestMemoryError> {
    RegionReader::new(mem, reg)?.record(vcpu)
}

/// A snapshot of the region: the header, the holdouts, and every record ([`Snapshot::take`])
/// or only those a decision reads ([`Snapshot::take_some`]).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub registration: Registration,
    pub header: PageHeader,
    /// The holdout bitmap, copied while a grace period is in progress (`rcu_gp_seq` odd),
    /// else empty.
    pub holdouts: Vec<u64>,
    /// The records copied, ascending by vCPU.
    pub records: Vec<RecordView>,
}

impl Snapshot {
    /// Copies the header, the holdouts and every record.
    pub fn take(
        mem: &GuestMemoryMmap,
        reg: &Registration,
    ) -> Result<Self, vm_memory::GuestMemoryError> {
        Self::take_with(mem, reg, |_, _| (0..reg.nr_vcpus).collect())
    }

    /// Copies the header, the holdouts and the records of `vcpus` (ids past the VM are
    /// skipped): what a decision about a few vCPUs needs (a spinner's `YieldTo` reads the
    /// spinner's record), at a cost that does not grow with the VM.
    pub fn take_some(
        mem: &GuestMemoryMmap,
        reg: &Registration,
        vcpus: &[u32],
    ) -> Result<Self, vm_memory::GuestMemoryError> {
        Self::take_with(mem, reg, |_, _| vcpus.to_vec())
    }

    /// Copies the header, the holdouts and the holdouts' records: what an `RcuWait`
    /// decision reads. No records when no grace period is in progress (the decision is then
    /// to do nothing); every record when one is but the guest names no holdout (its readers
    /// are then the candidates).
    pub fn take_holdouts(
        mem: &GuestMemoryMmap,
        reg: &Registration,
    ) -> Result<Self, vm_memory::GuestMemoryError> {
        Self::take_with(mem, reg, |gp_in_progress, holdouts| {
            let named: Vec<u32> = bitmap_iter(holdouts).collect();
            if !gp_in_progress || named.iter().any(|&v| v < reg.nr_vcpus) {
                named
            } else {
                (0..reg.nr_vcpus).collect()
            }
        })
    }

    /// Copies the header and the holdouts, then the records `pick` names given whether a
    /// grace period is in progress and the holdouts (sorted and deduplicated here; ids past
    /// the VM are skipped).
    fn take_with(
        mem: &GuestMemoryMmap,
        reg: &Registration,
        pick: impl FnOnce(bool, &[u64]) -> Vec<u32>,
    ) -> Result<Self, vm_memory::GuestMemoryError> {
        let region = RegionReader::new(mem, reg)?;
        let header = region.header()?;
        // The holdouts the guest stored before its odd `rcu_gp_seq` are read after it.
        fence(Ordering::Acquire);
        let holdouts = if header.rcu_gp_seq % 2 == 1 {
            region.bitmap(holdouts_offset(reg.nr_vcpus as usize))?
        } else {
            Vec::new()
        };
        let mut ids = pick(header.rcu_gp_seq % 2 == 1, &holdouts);
        ids.retain(|&v| v < reg.nr_vcpus);
        ids.sort_unstable();
        ids.dedup();
        let records = ids
            .into_iter()
            .map(|v| region.record(v))
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            registration: reg.clone(),
            header,
            holdouts,
            records,
        })
    }

    /// vCPU `vcpu`'s record, if it was copied.
    pub fn record(&self, vcpu: u32) -> Option<&RecordView> {
        if self.records.len() == self.registration.nr_vcpus as usize {
            return self.records.get(vcpu as usize);
        }
        let i = self.records.binary_search_by_key(&vcpu, |r| r.vcpu).ok()?;
        self.records.get(i)
    }

    /// Sets the holdouts as if copied from the region: for synthetic snapshots in tests and
    /// benchmarks.
    pub fn set_holdouts(&mut self, vcpus: &[u32]) {
        self.holdouts = bitmap_of(self.registration.nr_vcpus, vcpus);
    }

    /// Whether the grace period in progress waits on `vcpu` (bits past the VM never count).
    pub fn holdout(&self, vcpu: u32) -> bool {
        vcpu < self.registration.nr_vcpus && bitmap_contains(&self.holdouts, vcpu)
    }

    /// Whether the guest published any holdout for the grace period in progress.
    pub fn has_holdouts(&self) -> bool {
        bitmap_iter(&self.holdouts).any(|v| v < self.registration.nr_vcpus)
    }

    /// Records with at least one problem.
    pub fn invalid_records(&self) -> usize {
        self.records
            .iter()
            .filter(|r| !r.problems.is_empty())
            .count()
    }

    /// One line for the region, then one `key=value` line per vCPU.
    pub fn render(&self) -> String {
        let r = &self.registration;
        let mut s = format!(
            "shared region gpa={:#x} size={} abi={} vcpus={} event_ring_entries={} host_flags={:#x} rcu_gp_seq={} rcu_callbacks_pending={} rcu_gp_holdouts={} invalid_records={}\n",
            r.gpa,
            r.size,
            self.header.abi_version,
            r.nr_vcpus,
            r.event_ring_entries,
            self.header.host_flags,
            self.header.rcu_gp_seq,
            self.header.rcu_callbacks_pending,
            cpu_list(bitmap_iter(&self.holdouts).filter(|&v| v < r.nr_vcpus)),
            self.invalid_records()
        );
        for v in &self.records {
            let rec = &v.record;
            let mode = match rec.mode() {
                Some(VcpuMode::Offline) => "offline".to_string(),
                Some(VcpuMode::Idle) => "idle".to_string(),
                Some(VcpuMode::Kernel) => "kernel".to_string(),
                Some(VcpuMode::User) => "user".to_string(),
                None => format!("invalid({})", rec.mode),
            };
            let holder = if rec.spin_holder == NO_VCPU {
                "none".to_string()
            } else {
                rec.spin_holder.to_string()
            };
            let _ = writeln!(
                s,
                "shared vcpu={} seq={} mode={} rcu_nesting={} preempt_count={} locks_held={} spin_lock={:#x} spin_holder={} ipi_wait={} host_preempted={} host_boosts={} host_preempted_ns={} problems={}",
                v.vcpu,
                rec.seq,
                mode,
                rec.rcu_nesting,
                rec.preempt_count,
                rec.locks_held,
                rec.spin_lock,
                holder,
                cpu_list(v.ipi_targets()),
                rec.host_preempted,
                rec.host_boosts,
                rec.host_preempted_ns,
                problem_names(v.problems)
            );
        }
        s
    }
}

/// A CPU set as ranges, `0-3,8,10-95` (`-` when empty): readable at any vCPU count.
pub fn cpu_list(cpus: impl IntoIterator<Item = u32>) -> String {
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for c in cpus {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == c => *end = c,
            _ => ranges.push((c, c)),
        }
    }
    if ranges.is_empty() {
        return "-".into();
    }
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn problem_names(p: Problems) -> String {
    if p.is_empty() {
        return "none".into();
    }
    p.iter_names()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB)]).unwrap()
    }

    fn write_header(mem: &GuestMemoryMmap, gpa: u64, h: PageHeader) {
        mem.write_slice(&h.to_bytes(), GuestAddress(gpa)).unwrap();
    }

    const KERNEL: Range<u64> = 0x10_0000..0x20_0000;
    /// RAM of a 16 MiB guest: below the legacy hole and from 1 MiB.
    const RAM: [Range<u64>; 2] = [0..0x9_fc00, 0x10_0000..(16 * MIB) as u64];

    fn check_reg(m: &GuestMemoryMmap, gpa: u64, n: u32) -> Result<Registration, HypercallStatus> {
        validate(m, gpa, n, &KERNEL, &RAM)
    }

    #[test]
    fn accepts_a_good_region_and_marks_it() {
        let m = mem();
        write_header(&m, 0x40_0000, PageHeader::new(4, 0));
        let reg = check_reg(&m, 0x40_0000, 4).unwrap();
        assert_eq!(
            reg,
            Registration {
                gpa: 0x40_0000,
                nr_vcpus: 4,
                size: 4096,
                event_ring_entries: 0,
            }
        );
        mark_accepted(&m, &reg, true).unwrap();
        let flags: u32 = m.read_obj(GuestAddress(0x40_0000 + 28)).unwrap();
        assert_eq!(flags, HostFlags::ACCEPTED, "no rings: no events asked for");
    }

    #[test]
    fn rings_grow_the_region_and_events_are_asked_for_only_when_tracing() {
        let m = mem();
        write_header(&m, 0x40_0000, PageHeader::new(4, 128));
        let reg = check_reg(&m, 0x40_0000, 4).unwrap();
        assert_eq!((reg.size, reg.event_ring_entries), (16384, 128));
        mark_accepted(&m, &reg, false).unwrap();
        let flags: u32 = m.read_obj(GuestAddress(0x40_0000 + 28)).unwrap();
        assert_eq!(flags, HostFlags::ACCEPTED);
        mark_accepted(&m, &reg, true).unwrap();
        let flags: u32 = m.read_obj(GuestAddress(0x40_0000 + 28)).unwrap();
        assert_eq!(flags, HostFlags::ACCEPTED | HostFlags::EVENTS);

        for bad in [100, 8192] {
            let mut h = PageHeader::new(4, 128);
            h.event_ring_entries = bad;
            write_header(&m, 0x48_0000, h);
            assert_eq!(
                check_reg(&m, 0x48_0000, 4),
                Err(HypercallStatus::BadGeometry),
                "{bad} entries"
            );
        }
    }

    #[test]
    fn refuses_each_kind_of_bad_registration() {
        let m = mem();
        write_header(&m, 0x40_0000, PageHeader::new(4, 0));
        assert_eq!(
            check_reg(&m, 0x40_0010, 4),
            Err(HypercallStatus::BadAddress)
        );
        assert_eq!(
            check_reg(&m, 0x4000_0000, 4),
            Err(HypercallStatus::BadAddress),
            "outside RAM"
        );
        assert_eq!(
            check_reg(&m, 0x40_0000, 8),
            Err(HypercallStatus::BadVcpuCount)
        );
        assert_eq!(
            check_reg(&m, 0x50_0000, 4),
            Err(HypercallStatus::BadMagic),
            "zeroed page"
        );

        let mut h = PageHeader::new(4, 0);
        h.abi_version = ABI_VERSION + 1;
        write_header(&m, 0x41_0000, h);
        assert_eq!(
            check_reg(&m, 0x41_0000, 4),
            Err(HypercallStatus::VersionMismatch)
        );

        let mut h = PageHeader::new(4, 0);
        h.region_size = 1 << 30;
        write_header(&m, 0x42_0000, h);
        assert_eq!(
            check_reg(&m, 0x42_0000, 4),
            Err(HypercallStatus::BadGeometry)
        );

        write_header(&m, 0x1f_f000, PageHeader::new(4, 0));
        assert_eq!(
            check_reg(&m, 0x1f_f000, 4),
            Err(HypercallStatus::OverlapsKernel)
        );

        // A region whose second page would be past the end of RAM.
        let last = (16 * MIB - 4096) as u64;
        write_header(&m, last, PageHeader::new(64, 0));
        assert_eq!(check_reg(&m, last, 64), Err(HypercallStatus::BadAddress));

        // Mapped memory that is not RAM: the legacy hole, and a page crossing into it.
        for gpa in [0xe_0000, 0x9_f000] {
            write_header(&m, gpa, PageHeader::new(4, 0));
            assert_eq!(
                check_reg(&m, gpa, 4),
                Err(HypercallStatus::BadAddress),
                "{gpa:#x}"
            );
        }

        // Fields this version defines as zero.
        write_header(&m, 0x43_0000, PageHeader::new(4, 0));
        m.write_obj(1u32, GuestAddress(0x43_0000 + 28)).unwrap();
        assert_eq!(
            check_reg(&m, 0x43_0000, 4),
            Err(HypercallStatus::BadGeometry),
            "host_flags"
        );
    }

    /// A named change to a header.
    type Move = (&'static str, fn(&mut PageHeader));

    /// Hostile headers whose offsets point the bitmaps or rings elsewhere, inside the region
    /// or out of it: refused before the host follows any of them.
    #[test]
    fn refuses_offsets_other_than_the_computed_ones() {
        let m = mem();
        for nr in [4u32, 65, 96] {
            let good = PageHeader::new(nr, 8);
            let moves: [Move; 6] = [
                ("holdouts past the end", |h| {
                    h.holdouts_offset = h.region_size
                }),
                ("holdouts far away", |h| h.holdouts_offset = u32::MAX - 7),
                ("holdouts over the records", |h| h.holdouts_offset = 64),
                ("ipi_wait past the end", |h| {
                    h.ipi_wait_offset = h.region_size - 8
                }),
                ("ipi_wait shifted", |h| h.ipi_wait_offset += 8),
                ("rings elsewhere", |h| h.event_rings_offset = 0),
            ];
            for (what, mv) in moves {
                let mut h = good;
                mv(&mut h);
                write_header(&m, 0x44_0000, h);
                assert_eq!(
                    check_reg(&m, 0x44_0000, nr),
                    Err(HypercallStatus::BadGeometry),
                    "{nr} vCPUs: {what}"
                );
            }
            write_header(&m, 0x44_0000, good);
            assert!(check_reg(&m, 0x44_0000, nr).is_ok(), "{nr} vCPUs");
        }
    }

    /// The `ipi_wait` bitmap is copied only while its owner's count says it waits, and a
    /// bitmap that names vCPUs past the VM is a problem, at sizes that are not multiples of 64.
    #[test]
    fn ipi_wait_bitmaps_are_copied_and_checked() {
        let m = mem();
        for nr in [65u32, 96, 1000] {
            let gpa = 0x40_0000;
            write_header(&m, gpa, PageHeader::new(nr, 0));
            let reg = check_reg(&m, gpa, nr).unwrap();
            let sender = nr - 2;
            let rec = gpa + record_offset(sender as usize) as u64;
            let bm = gpa + ipi_wait_offset(nr as usize, sender as usize) as u64;
            let words = bitmap_of(nr, &[0, nr / 2, nr - 1]);
            for (i, w) in words.iter().enumerate() {
                m.write_obj(*w, GuestAddress(bm + 8 * i as u64)).unwrap();
            }
            // Count 0: the bitmap is not even read.
            let v = read_record(&m, &reg, sender).unwrap();
            assert!(v.ipi_wait.is_empty() && v.problems.is_empty());
            m.write_obj(3u32, GuestAddress(rec + 32)).unwrap();
            let v = read_record(&m, &reg, sender).unwrap();
            assert_eq!(
                v.ipi_targets().collect::<Vec<_>>(),
                [0, nr / 2, nr - 1],
                "{nr}"
            );
            assert!(v.problems.is_empty(), "{nr}");
            assert!(v.waits_on(nr - 1) && !v.waits_on(1));
            // A bit for vCPU `nr` (past the VM) in the last word.
            let (w, b) = bitmap_word_bit(nr);
            if w < words.len() {
                m.write_obj(words[w] | b, GuestAddress(bm + 8 * w as u64))
                    .unwrap();
                let v = read_record(&m, &reg, sender).unwrap();
                assert_eq!(v.problems, Problems::BAD_IPI_WAIT, "{nr}: bit {nr}");
                m.write_obj(words[w], GuestAddress(bm + 8 * w as u64))
                    .unwrap();
            }
            // More bits than the count: a later wait's targets, read after the count (not a
            // problem); a count past the VM is.
            m.write_obj(2u32, GuestAddress(rec + 32)).unwrap();
            assert!(read_record(&m, &reg, sender).unwrap().problems.is_empty());
            m.write_obj(nr + 1, GuestAddress(rec + 32)).unwrap();
            assert_eq!(
                read_record(&m, &reg, sender).unwrap().problems,
                Problems::BAD_IPI_WAIT
            );
            m.write_obj(0u32, GuestAddress(rec + 32)).unwrap();
        }
    }

    /// Holdouts are copied while a grace period runs; a partial snapshot copies only the
    /// records asked for and finds them by id.
    #[test]
    fn holdouts_and_partial_snapshots() {
        let m = mem();
        let (gpa, nr) = (0x40_0000u64, 300u32);
        write_header(&m, gpa, PageHeader::new(nr, 0));
        let reg = check_reg(&m, gpa, nr).unwrap();
        let h = gpa + holdouts_offset(nr as usize) as u64;
        for (i, w) in bitmap_of(nr, &[3, 200, 299]).iter().enumerate() {
            m.write_obj(*w, GuestAddress(h + 8 * i as u64)).unwrap();
        }
        let snap = Snapshot::take(&m, &reg).unwrap();
        assert!(
            snap.holdouts.is_empty() && !snap.has_holdouts(),
            "no grace period"
        );
        m.write_obj(5u64, GuestAddress(gpa + 32)).unwrap();
        let snap = Snapshot::take(&m, &reg).unwrap();
        assert!(snap.holdout(200) && snap.holdout(299) && !snap.holdout(4));
        assert!(snap.render().contains("rcu_gp_holdouts=3,200,299"));
        assert_eq!(snap.records.len(), 300);
        let some = Snapshot::take_some(&m, &reg, &[250, 7, 250, 400]).unwrap();
        assert_eq!(
            some.records.iter().map(|r| r.vcpu).collect::<Vec<_>>(),
            [7, 250]
        );
        assert_eq!(some.record(250).map(|r| r.vcpu), Some(250));
        assert!(some.record(8).is_none());
        assert!(some.holdout(3));
        let rcu = Snapshot::take_holdouts(&m, &reg).unwrap();
        assert_eq!(
            rcu.records.iter().map(|r| r.vcpu).collect::<Vec<_>>(),
            [3, 200, 299]
        );
    }

    #[test]
    fn cpu_lists_stay_short() {
        assert_eq!(cpu_list([]), "-");
        assert_eq!(cpu_list([0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(0..1024), "0-1023");
    }

    #[test]
    fn odd_sequence_reads_as_torn_and_garbage_is_flagged() {
        let m = mem();
        write_header(&m, 0x40_0000, PageHeader::new(2, 0));
        let reg = check_reg(&m, 0x40_0000, 2).unwrap();
        let r0 = 0x40_0000 + record_offset(0) as u64;
        m.write_obj(3u32, GuestAddress(r0)).unwrap(); // odd: a write in progress forever
        m.write_obj(9u8, GuestAddress(r0 + 4)).unwrap(); // no such mode
        m.write_obj(7u32, GuestAddress(r0 + 20)).unwrap(); // holder 7 of 2 vCPUs
        m.write_obj(3u32, GuestAddress(r0 + 32)).unwrap(); // waits on 3 of 2 vCPUs
        let v = read_record(&m, &reg, 0).unwrap();
        assert_eq!(
            v.problems,
            Problems::TORN | Problems::BAD_MODE | Problems::BAD_HOLDER | Problems::BAD_IPI_WAIT
        );
        let snap = Snapshot::take(&m, &reg).unwrap();
        assert_eq!(
            snap.invalid_records(),
            1,
            "record 1 is a clean zeroed (offline) record"
        );
        assert!(snap.render().contains("mode=invalid(9)"));
    }

    #[test]
    fn random_pages_never_panic() {
        // A small xorshift generator: deterministic garbage.
        let m = mem();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..200 {
            let mut page = [0u8; 16384];
            for b in page.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if round % 2 == 0 {
                // Half the time, a valid header over garbage records.
                page[..8].copy_from_slice(&PAGE_MAGIC.to_le_bytes());
                page[8..12].copy_from_slice(&ABI_VERSION.to_le_bytes());
                page[12..16].copy_from_slice(&64u32.to_le_bytes());
                page[16..20].copy_from_slice(&8192u32.to_le_bytes());
                page[20..24].copy_from_slice(&64u32.to_le_bytes());
                page[24..28].copy_from_slice(&64u32.to_le_bytes());
                let h = PageHeader::new(64, 0);
                page[48..52].copy_from_slice(&h.holdouts_offset.to_le_bytes());
                page[52..56].copy_from_slice(&h.ipi_wait_offset.to_le_bytes());
                page[56..60].copy_from_slice(&0u32.to_le_bytes());
                page[60..64].copy_from_slice(&h.event_rings_offset.to_le_bytes());
                page[16..20].copy_from_slice(&h.region_size.to_le_bytes());
                page[28..32].fill(0);
            }
            m.write_slice(&page, GuestAddress(0x80_0000)).unwrap();
            if let Ok(reg) = check_reg(&m, 0x80_0000, 64) {
                let snap = Snapshot::take(&m, &reg).unwrap();
                assert_eq!(snap.records.len(), 64);
                let _ = snap.render();
            }
        }
    }
}
