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
    record_offset, region_size, valid_event_ring_entries, HostFlags, HypercallStatus, PageHeader,
    VcpuMode, VcpuRecord, ABI_VERSION, HEADER_SIZE, NO_VCPU, PAGE_MAGIC, PAGE_SIZE, RECORD_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
    if !valid_event_ring_entries(h.event_ring_entries) {
        return Err(HypercallStatus::BadGeometry);
    }
    let size = region_size(h.nr_vcpus as usize, h.event_ring_entries) as u64;
    if h.region_size as u64 != size
        || h.record_size as usize != RECORD_SIZE
        || h.records_offset as usize != HEADER_SIZE
        || h.host_flags != 0
        || h.rcu_gp_holdouts != 0
        || h.reserved != 0
    {
        return Err(HypercallStatus::BadGeometry);
    }
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
        /// `ipi_wait` has bits for vCPUs this VM does not have.
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
    pub problems: Problems,
}

/// Checks the guest-written fields of `r` for a VM with `nr_vcpus` vCPUs.
pub fn check(r: &VcpuRecord, nr_vcpus: u32) -> Problems {
    let mut p = Problems::empty();
    if r.mode().is_none() {
        p |= Problems::BAD_MODE;
    }
    if r.spin_holder != NO_VCPU && r.spin_holder >= nr_vcpus {
        p |= Problems::BAD_HOLDER;
    }
    let valid_mask = if nr_vcpus >= 64 {
        u64::MAX
    } else {
        (1u64 << nr_vcpus) - 1
    };
    if r.ipi_wait & !valid_mask != 0 {
        p |= Problems::BAD_IPI_WAIT;
    }
    if r.reserved0 != [0; 3] || r.reserved1 != 0 {
        p |= Problems::RESERVED;
    }
    p
}

/// Reads record `vcpu` consistently: sequence counter even and unchanged around the copy.
pub fn read_record(
    mem: &GuestMemoryMmap,
    reg: &Registration,
    vcpu: u32,
) -> Result<RecordView, vm_memory::GuestMemoryError> {
    crate::sched::lock_audit::guest_read();
    let at = GuestAddress(reg.gpa + record_offset(vcpu as usize) as u64);
    let mut buf = [0u8; RECORD_SIZE];
    for _ in 0..MAX_READ_ATTEMPTS {
        let before: u32 = mem.load(at, Ordering::Acquire)?;
        mem.read_slice(&mut buf, at)?;
        fence(Ordering::Acquire);
        let after: u32 = mem.load(at, Ordering::Acquire)?;
        if VcpuRecord::seq_consistent(before, after) {
            let record = VcpuRecord::from_bytes(&buf);
            return Ok(RecordView {
                vcpu,
                problems: check(&record, reg.nr_vcpus),
                record,
            });
        }
        std::hint::spin_loop();
    }
    let record = VcpuRecord::from_bytes(&buf);
    Ok(RecordView {
        vcpu,
        problems: check(&record, reg.nr_vcpus) | Problems::TORN,
        record,
    })
}

/// A snapshot of the whole region.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub registration: Registration,
    pub header: PageHeader,
    pub records: Vec<RecordView>,
}

impl Snapshot {
    pub fn take(
        mem: &GuestMemoryMmap,
        reg: &Registration,
    ) -> Result<Self, vm_memory::GuestMemoryError> {
        crate::sched::lock_audit::guest_read();
        let mut h = [0u8; HEADER_SIZE];
        mem.read_slice(&mut h, GuestAddress(reg.gpa))?;
        let records = (0..reg.nr_vcpus)
            .map(|v| read_record(mem, reg, v))
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            registration: reg.clone(),
            header: PageHeader::from_bytes(&h),
            records,
        })
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
            "shared region gpa={:#x} size={} abi={} vcpus={} event_ring_entries={} host_flags={:#x} rcu_gp_seq={} rcu_callbacks_pending={} invalid_records={}\n",
            r.gpa,
            r.size,
            self.header.abi_version,
            r.nr_vcpus,
            r.event_ring_entries,
            self.header.host_flags,
            self.header.rcu_gp_seq,
            self.header.rcu_callbacks_pending,
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
                "shared vcpu={} seq={} mode={} rcu_nesting={} preempt_count={} locks_held={} spin_lock={:#x} spin_holder={} ipi_wait={:#x} host_preempted={} host_boosts={} host_preempted_ns={} problems={}",
                v.vcpu,
                rec.seq,
                mode,
                rec.rcu_nesting,
                rec.preempt_count,
                rec.locks_held,
                rec.spin_lock,
                holder,
                rec.ipi_wait,
                rec.host_preempted,
                rec.host_boosts,
                rec.host_preempted_ns,
                problem_names(v.problems)
            );
        }
        s
    }
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
        mem.write_obj(h.magic, GuestAddress(gpa)).unwrap();
        mem.write_obj(h.abi_version, GuestAddress(gpa + 8)).unwrap();
        mem.write_obj(h.nr_vcpus, GuestAddress(gpa + 12)).unwrap();
        mem.write_obj(h.region_size, GuestAddress(gpa + 16))
            .unwrap();
        mem.write_obj(h.record_size, GuestAddress(gpa + 20))
            .unwrap();
        mem.write_obj(h.records_offset, GuestAddress(gpa + 24))
            .unwrap();
        mem.write_obj(h.event_ring_entries, GuestAddress(gpa + 56))
            .unwrap();
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
        write_header(&m, 0x44_0000, PageHeader::new(4, 0));
        m.write_obj(1u32, GuestAddress(0x44_0000 + 60)).unwrap();
        assert_eq!(
            check_reg(&m, 0x44_0000, 4),
            Err(HypercallStatus::BadGeometry),
            "reserved"
        );
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
        m.write_obj(0b100u64, GuestAddress(r0 + 32)).unwrap(); // waits on vCPU 2 of 2
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
            let mut page = [0u8; 8192];
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
