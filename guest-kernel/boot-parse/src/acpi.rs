//! Just enough ACPI to count CPUs: RSDP -> XSDT (or RSDT) -> MADT, and the MADT's enabled
//! local APIC (type 0) and x2APIC (type 9) entries.
//!
//! Every table is bounded (header length, at most [`MAX_TABLE_LEN`], no address overflow)
//! and checksummed before its contents are believed; every walk advances by at least two
//! bytes and stops at the table's end, so a hostile table ends in an error, not a hang.

use core::fmt;

use crate::{le_u32, le_u64, read_array, read_u32, OutOfRange, PhysRead};

pub const RSDP_SIGNATURE: [u8; 8] = *b"RSD PTR ";
/// Where firmware without a better channel leaves the RSDP, scanned on 16-byte boundaries.
pub const LEGACY_RSDP_AREA: core::ops::Range<u64> = 0xe0000..0x100000;
/// Every system description table starts with this header.
pub const SDT_HEADER_LEN: u32 = 36;
/// Largest table believed.
pub const MAX_TABLE_LEN: u32 = 1 << 20;
/// Largest RSDP `length` believed (ACPI 2.0+ defines 36).
pub const MAX_RSDP_LEN: u32 = 4096;
/// The MADT's entries start after its header, the local APIC address and the flags.
const MADT_ENTRIES: u32 = 44;

pub const MADT_LOCAL_APIC: u8 = 0;
pub const MADT_LOCAL_X2APIC: u8 = 9;

/// A table signature for messages: printable ASCII as is, anything else as '?'.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 4]);

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            let c = if b.is_ascii_graphic() { b as char } else { '?' };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// A table or pointer reaches outside readable memory.
    Read(OutOfRange),
    /// No RSDP in the legacy BIOS area and none handed over.
    NoRsdp,
    /// The handed-over RSDP address does not hold "RSD PTR ".
    RsdpSignature {
        paddr: u64,
    },
    RsdpChecksum {
        paddr: u64,
    },
    /// An ACPI 2.0+ RSDP whose length is below 36 or absurd.
    RsdpLength {
        paddr: u64,
        len: u32,
    },
    /// Neither an XSDT nor an RSDT address.
    NoRootTable,
    /// A table whose header length is below its minimum, above [`MAX_TABLE_LEN`], or runs
    /// past the end of the address space.
    TableLength {
        sig: Sig,
        paddr: u64,
        len: u32,
    },
    TableChecksum {
        sig: Sig,
        paddr: u64,
    },
    /// The RSDP points at something that is not the XSDT / RSDT.
    RootSignature {
        paddr: u64,
        found: Sig,
        expected: Sig,
    },
    /// The root table lists no MADT ("APIC").
    NoMadt,
    /// A MADT entry whose length is below 2, below its type's size, or runs past the table.
    MadtEntry {
        offset: u32,
        kind: u8,
        len: u8,
    },
    /// More enabled CPUs than the caller's limit.
    TooManyCpus {
        limit: usize,
    },
    /// An APIC ID at or beyond the caller's limit (IDs index per-CPU arrays of that size).
    ApicIdTooLarge {
        id: u32,
        limit: usize,
    },
    /// The MADT lists no enabled CPU.
    NoCpus,
}

impl From<OutOfRange> for AcpiError {
    fn from(e: OutOfRange) -> Self {
        AcpiError::Read(e)
    }
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AcpiError::Read(e) => write!(f, "ACPI table unreadable: {e}"),
            AcpiError::NoRsdp => f.write_str("no ACPI RSDP found"),
            AcpiError::RsdpSignature { paddr } => {
                write!(f, "no RSDP signature at the given address {paddr:#x}")
            }
            AcpiError::RsdpChecksum { paddr } => write!(f, "RSDP at {paddr:#x}: bad checksum"),
            AcpiError::RsdpLength { paddr, len } => {
                write!(f, "RSDP at {paddr:#x}: bad length {len}")
            }
            AcpiError::NoRootTable => f.write_str("RSDP names neither an XSDT nor an RSDT"),
            AcpiError::TableLength { sig, paddr, len } => {
                write!(f, "{sig} table at {paddr:#x}: bad length {len}")
            }
            AcpiError::TableChecksum { sig, paddr } => {
                write!(f, "{sig} table at {paddr:#x}: bad checksum")
            }
            AcpiError::RootSignature {
                paddr,
                found,
                expected,
            } => write!(f, "table at {paddr:#x} is {found}, expected {expected}"),
            AcpiError::NoMadt => f.write_str("no MADT (APIC table) in the XSDT/RSDT"),
            AcpiError::MadtEntry { offset, kind, len } => write!(
                f,
                "MADT entry at offset {offset} (type {kind}) has a bad length {len}"
            ),
            AcpiError::TooManyCpus { limit } => {
                write!(f, "the MADT lists more than {limit} enabled CPUs")
            }
            AcpiError::ApicIdTooLarge { id, limit } => {
                write!(f, "the MADT lists APIC ID {id}; IDs must be below {limit}")
            }
            AcpiError::NoCpus => f.write_str("the MADT lists no enabled CPU"),
        }
    }
}

/// Enabled APIC IDs in MADT order, at most `N` of them, each below `N`.
#[derive(Clone, Debug)]
pub struct CpuList<const N: usize> {
    ids: [u32; N],
    len: usize,
    duplicates: usize,
    disabled: usize,
}

impl<const N: usize> Default for CpuList<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> CpuList<N> {
    pub const fn new() -> Self {
        CpuList {
            ids: [0; N],
            len: 0,
            duplicates: 0,
            disabled: 0,
        }
    }

    /// CPUs 0..n (`smp=n`).
    pub fn from_count(n: usize) -> Result<Self, AcpiError> {
        if n == 0 {
            return Err(AcpiError::NoCpus);
        }
        if n > N {
            return Err(AcpiError::TooManyCpus { limit: N });
        }
        let mut l = Self::new();
        for id in 0..n {
            l.push(id as u32)?;
        }
        Ok(l)
    }

    /// Adds `id`; a repeated ID is counted in [`Self::duplicates`], not added twice.
    pub fn push(&mut self, id: u32) -> Result<(), AcpiError> {
        if self.ids().contains(&id) {
            self.duplicates += 1;
            return Ok(());
        }
        if self.len >= N {
            return Err(AcpiError::TooManyCpus { limit: N });
        }
        if id as usize >= N {
            return Err(AcpiError::ApicIdTooLarge { id, limit: N });
        }
        self.ids[self.len] = id;
        self.len += 1;
        Ok(())
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }

    /// Entries that repeated an ID already listed.
    pub fn duplicates(&self) -> usize {
        self.duplicates
    }

    /// Processor entries the MADT marks not enabled (CPUs the machine may have but that
    /// are not to be started).
    pub fn disabled(&self) -> usize {
        self.disabled
    }
}

/// Sums `len` bytes at `paddr` (mod 256), reading in chunks.
fn byte_sum<R: PhysRead + ?Sized>(mem: &R, paddr: u64, len: u32) -> Result<u8, OutOfRange> {
    let mut buf = [0u8; 256];
    let mut sum = 0u8;
    let mut done = 0u32;
    while done < len {
        let n = (len - done).min(buf.len() as u32);
        let chunk = &mut buf[..n as usize];
        let at = paddr.checked_add(done as u64).ok_or(OutOfRange {
            paddr,
            len: len as usize,
        })?;
        mem.read(at, chunk)?;
        sum = chunk.iter().fold(sum, |a, &x| a.wrapping_add(x));
        done += n;
    }
    Ok(sum)
}

/// A table whose header and checksum have been checked.
#[derive(Clone, Copy, Debug)]
struct Table {
    paddr: u64,
    len: u32,
}

/// The table at `paddr`, at least `min_len` long, bounded and checksummed.
fn table<R: PhysRead + ?Sized>(mem: &R, paddr: u64, min_len: u32) -> Result<Table, AcpiError> {
    let head: [u8; 8] = read_array(mem, paddr)?;
    let sig = Sig([head[0], head[1], head[2], head[3]]);
    let len = le_u32(&head, 4);
    if !(min_len..=MAX_TABLE_LEN).contains(&len) || paddr.checked_add(len as u64).is_none() {
        return Err(AcpiError::TableLength { sig, paddr, len });
    }
    if byte_sum(mem, paddr, len)? != 0 {
        return Err(AcpiError::TableChecksum { sig, paddr });
    }
    Ok(Table { paddr, len })
}

/// Whether a checksummed RSDP sits at `paddr`; `Err` only when it cannot be read.
fn rsdp_at<R: PhysRead + ?Sized>(mem: &R, paddr: u64) -> Result<Option<AcpiError>, AcpiError> {
    let r: [u8; 20] = read_array(mem, paddr)?;
    if r[..8] != RSDP_SIGNATURE {
        return Ok(Some(AcpiError::RsdpSignature { paddr }));
    }
    if r.iter().fold(0u8, |a, &x| a.wrapping_add(x)) != 0 {
        return Ok(Some(AcpiError::RsdpChecksum { paddr }));
    }
    Ok(None)
}

/// The RSDP's address: `hint` (from the boot protocol) if non-zero, else the first valid one
/// in the legacy BIOS area.
pub fn find_rsdp<R: PhysRead + ?Sized>(mem: &R, hint: u64) -> Result<u64, AcpiError> {
    if hint != 0 {
        return match rsdp_at(mem, hint)? {
            None => Ok(hint),
            Some(e) => Err(e),
        };
    }
    LEGACY_RSDP_AREA
        .step_by(16)
        .find(|&a| matches!(rsdp_at(mem, a), Ok(None)))
        .ok_or(AcpiError::NoRsdp)
}

/// The root table (XSDT for an ACPI 2.0+ RSDP that names one, else RSDT) and its entry size.
fn root_table<R: PhysRead + ?Sized>(mem: &R, rsdp: u64) -> Result<(Table, u32), AcpiError> {
    let r: [u8; 36] = {
        let mut b = [0u8; 36];
        mem.read(rsdp, &mut b[..20])?;
        if b[15] >= 2 {
            mem.read(rsdp + 20, &mut b[20..])?;
        }
        b
    };
    let rsdt = le_u32(&r, 16) as u64;
    let (addr, entry, expected) = if r[15] >= 2 {
        let len = le_u32(&r, 20);
        if !(36..=MAX_RSDP_LEN).contains(&len) {
            return Err(AcpiError::RsdpLength { paddr: rsdp, len });
        }
        if byte_sum(mem, rsdp, len)? != 0 {
            return Err(AcpiError::RsdpChecksum { paddr: rsdp });
        }
        match le_u64(&r, 24) {
            0 => (rsdt, 4, *b"RSDT"),
            xsdt => (xsdt, 8, *b"XSDT"),
        }
    } else {
        (rsdt, 4, *b"RSDT")
    };
    if addr == 0 {
        return Err(AcpiError::NoRootTable);
    }
    let t = table(mem, addr, SDT_HEADER_LEN)?;
    let found: [u8; 4] = read_array(mem, addr)?;
    if found != expected {
        return Err(AcpiError::RootSignature {
            paddr: addr,
            found: Sig(found),
            expected: Sig(expected),
        });
    }
    Ok((t, entry))
}

/// The MADT listed in the root table.
fn find_madt<R: PhysRead + ?Sized>(mem: &R, root: Table, entry: u32) -> Result<Table, AcpiError> {
    let n = (root.len - SDT_HEADER_LEN) / entry;
    for i in 0..n {
        let at = root.paddr + (SDT_HEADER_LEN + i * entry) as u64;
        let addr = if entry == 8 {
            crate::read_u64(mem, at)?
        } else {
            read_u32(mem, at)? as u64
        };
        // Tables other than the MADT are not our business: only their signature is read.
        if addr != 0 && read_array::<4, R>(mem, addr).ok() == Some(*b"APIC") {
            return table(mem, addr, MADT_ENTRIES);
        }
    }
    Err(AcpiError::NoMadt)
}

/// Enabled CPUs of the MADT found from `rsdp_hint` (0: scan the BIOS area), at most `N`,
/// with APIC IDs below `N`.
pub fn madt_cpus<const N: usize, R: PhysRead + ?Sized>(
    mem: &R,
    rsdp_hint: u64,
) -> Result<CpuList<N>, AcpiError> {
    let rsdp = find_rsdp(mem, rsdp_hint)?;
    let (root, entry) = root_table(mem, rsdp)?;
    let madt = find_madt(mem, root, entry)?;

    let mut cpus = CpuList::new();
    let mut off = MADT_ENTRIES;
    let mut e = [0u8; 255];
    while off < madt.len {
        let bad = |kind, len| AcpiError::MadtEntry {
            offset: off,
            kind,
            len,
        };
        if madt.len - off < 2 {
            return Err(bad(0, 0));
        }
        let [kind, len] = read_array(mem, madt.paddr + off as u64)?;
        let min = match kind {
            MADT_LOCAL_APIC => 8,
            MADT_LOCAL_X2APIC => 16,
            _ => 2,
        };
        if len < min || len as u32 > madt.len - off {
            return Err(bad(kind, len));
        }
        let e = &mut e[..len as usize];
        mem.read(madt.paddr + off as u64, e)?;
        match kind {
            MADT_LOCAL_APIC if le_u32(e, 4) & 1 != 0 => cpus.push(e[3] as u32)?,
            MADT_LOCAL_X2APIC if le_u32(e, 8) & 1 != 0 => cpus.push(le_u32(e, 4))?,
            MADT_LOCAL_APIC | MADT_LOCAL_X2APIC => cpus.disabled += 1,
            _ => {}
        }
        off += len as u32;
    }
    if cpus.ids().is_empty() {
        return Err(AcpiError::NoCpus);
    }
    Ok(cpus)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testmem::Mem;
    use std::vec::Vec;

    pub fn fix_checksum(t: &mut [u8], at: usize) {
        t[at] = 0;
        let s = t.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        t[at] = 0u8.wrapping_sub(s);
    }

    pub fn sdt(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(sig);
        t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
        t.push(1); // revision
        t.push(0); // checksum
        t.extend_from_slice(b"PVSYNC");
        t.extend_from_slice(b"TESTTABL");
        t.extend_from_slice(&[0; 12]);
        t.extend_from_slice(body);
        fix_checksum(&mut t, 9);
        t
    }

    pub fn lapic(id: u8, enabled: bool) -> Vec<u8> {
        vec![0, 8, id, id, enabled as u8, 0, 0, 0]
    }

    pub fn x2apic(id: u32, enabled: bool) -> Vec<u8> {
        let mut e = vec![9, 16, 0, 0];
        e.extend_from_slice(&id.to_le_bytes());
        e.extend_from_slice(&(enabled as u32).to_le_bytes());
        e.extend_from_slice(&id.to_le_bytes());
        e
    }

    pub fn madt(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![0, 0, 0xe0, 0xfe, 1, 0, 0, 0]; // LAPIC address, PC-AT compat
        for e in entries {
            body.extend_from_slice(e);
        }
        sdt(b"APIC", &body)
    }

    pub fn rsdp_v2(xsdt: u64) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(b"RSD PTR ");
        r.push(0);
        r.extend_from_slice(b"PVSYNC");
        r.push(2);
        r.extend_from_slice(&0u32.to_le_bytes()); // RSDT
        r.extend_from_slice(&36u32.to_le_bytes());
        r.extend_from_slice(&xsdt.to_le_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        fix_checksum(&mut r[..20], 8);
        fix_checksum(&mut r, 32);
        r
    }

    pub fn rsdp_v1(rsdt: u32) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(b"RSD PTR ");
        r.push(0);
        r.extend_from_slice(b"PVSYNC");
        r.push(0);
        r.extend_from_slice(&rsdt.to_le_bytes());
        fix_checksum(&mut r, 8);
        r
    }

    pub const RSDP: u64 = 0xe0000;
    pub const XSDT: u64 = 0xe1000;
    pub const FACP: u64 = 0xe2000;
    pub const MADT: u64 = 0xe3000;

    /// RSDP (v2) -> XSDT -> [FACP, MADT] in the BIOS area.
    pub fn machine(madt_bytes: Vec<u8>) -> Mem {
        let mut m = Mem::default();
        m.put(RSDP, rsdp_v2(XSDT));
        let mut x = Vec::new();
        x.extend_from_slice(&FACP.to_le_bytes());
        x.extend_from_slice(&MADT.to_le_bytes());
        m.put(XSDT, sdt(b"XSDT", &x));
        m.put(FACP, sdt(b"FACP", &[0; 16]));
        m.put(MADT, madt_bytes);
        m
    }

    fn cpus(m: &Mem, hint: u64) -> Result<Vec<u32>, AcpiError> {
        madt_cpus::<64, _>(m, hint).map(|l| l.ids().to_vec())
    }

    #[test]
    fn qemu_like_tables_list_enabled_cpus_in_order() {
        let m = machine(madt(&[
            lapic(0, true),
            lapic(1, true),
            lapic(2, false),
            x2apic(3, true),
            vec![1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0], // an I/O APIC
        ]));
        assert_eq!(cpus(&m, 0), Ok(vec![0, 1, 3]), "found by scanning");
        assert_eq!(cpus(&m, RSDP), Ok(vec![0, 1, 3]), "found from the hint");
    }

    #[test]
    fn a_v1_rsdp_leads_through_the_rsdt() {
        let mut m = Mem::default();
        m.put(0xf0010, rsdp_v1(0x2000));
        m.put(0x2000, sdt(b"RSDT", &(MADT as u32).to_le_bytes()));
        m.put(MADT, madt(&[lapic(0, true), lapic(5, true)]));
        assert_eq!(cpus(&m, 0), Ok(vec![0, 5]));
    }

    #[test]
    fn duplicate_ids_are_listed_once_and_counted() {
        let m = machine(madt(&[
            lapic(0, true),
            x2apic(0, true),
            lapic(1, true),
            lapic(1, true),
        ]));
        let l = madt_cpus::<64, _>(&m, 0).unwrap();
        assert_eq!(l.ids(), &[0, 1]);
        assert_eq!(l.duplicates(), 2);
    }

    #[test]
    fn the_cpu_limit_is_the_callers() {
        let entries: Vec<_> = (0..8).map(|i| lapic(i, true)).collect();
        let m = machine(madt(&entries));
        assert_eq!(madt_cpus::<8, _>(&m, 0).unwrap().ids().len(), 8);
        assert_eq!(
            madt_cpus::<4, _>(&m, 0).unwrap_err(),
            AcpiError::TooManyCpus { limit: 4 }
        );
        let m = machine(madt(&[lapic(0, true), x2apic(200, true)]));
        assert_eq!(
            madt_cpus::<64, _>(&m, 0).unwrap_err(),
            AcpiError::ApicIdTooLarge { id: 200, limit: 64 }
        );
        assert_eq!(madt_cpus::<256, _>(&m, 0).unwrap().ids(), &[0, 200]);
        let m = machine(madt(&(0..=255).map(|i| lapic(i, true)).collect::<Vec<_>>()));
        assert_eq!(madt_cpus::<256, _>(&m, 0).unwrap().ids().len(), 256);
        assert_eq!(
            madt_cpus::<255, _>(&m, 0).unwrap_err(),
            AcpiError::TooManyCpus { limit: 255 }
        );
    }

    /// x2APIC entries (type 9) carry 32-bit IDs: a machine of 300 CPUs, IDs past 255 and
    /// past 1000 included, fits a 1024-CPU list; disabled entries are counted, not listed.
    #[test]
    fn x2apic_entries_list_ids_past_255() {
        let mut entries: Vec<_> = (0..300).map(|i| x2apic(i, true)).collect();
        entries.push(x2apic(1023, true));
        entries.push(x2apic(700, false));
        entries.push(lapic(9, false));
        let m = machine(madt(&entries));
        let l = madt_cpus::<1024, _>(&m, 0).unwrap();
        let mut want: Vec<u32> = (0..300).collect();
        want.push(1023);
        assert_eq!(l.ids(), &want[..]);
        assert_eq!((l.duplicates(), l.disabled()), (0, 2));
        assert_eq!(
            madt_cpus::<1023, _>(&m, 0).unwrap_err(),
            AcpiError::ApicIdTooLarge {
                id: 1023,
                limit: 1023
            }
        );
        assert_eq!(
            madt_cpus::<256, _>(&m, 0).unwrap_err(),
            AcpiError::TooManyCpus { limit: 256 }
        );
        let all = machine(madt(
            &(0..1024).map(|i| x2apic(i, true)).collect::<Vec<_>>(),
        ));
        let l = madt_cpus::<1024, _>(&all, 0).unwrap();
        assert_eq!((l.ids().len(), l.disabled()), (1024, 0));
    }

    #[test]
    fn from_count_respects_the_limit() {
        assert_eq!(CpuList::<4>::from_count(4).unwrap().ids(), &[0, 1, 2, 3]);
        assert_eq!(
            CpuList::<4>::from_count(5).unwrap_err(),
            AcpiError::TooManyCpus { limit: 4 }
        );
        assert_eq!(CpuList::<4>::from_count(0).unwrap_err(), AcpiError::NoCpus);
    }

    #[test]
    fn no_enabled_cpu_is_an_error() {
        let m = machine(madt(&[lapic(0, false)]));
        assert_eq!(cpus(&m, 0), Err(AcpiError::NoCpus));
        let m = machine(madt(&[]));
        assert_eq!(cpus(&m, 0), Err(AcpiError::NoCpus));
    }

    #[test]
    fn bad_checksums_are_refused() {
        let mut t = madt(&[lapic(0, true)]);
        t[20] ^= 1;
        assert_eq!(
            cpus(&machine(t), 0),
            Err(AcpiError::TableChecksum {
                sig: Sig(*b"APIC"),
                paddr: MADT
            })
        );
        let mut m = machine(madt(&[lapic(0, true)]));
        m.poke(XSDT + 20, 0x55);
        assert!(matches!(
            cpus(&m, 0),
            Err(AcpiError::TableChecksum { paddr: XSDT, .. })
        ));
        // A v1 checksum error hides the RSDP from the scan; given as a hint it is reported.
        let mut m = machine(madt(&[lapic(0, true)]));
        m.poke(RSDP + 9, b'X');
        assert_eq!(cpus(&m, 0), Err(AcpiError::NoRsdp));
        assert_eq!(cpus(&m, RSDP), Err(AcpiError::RsdpChecksum { paddr: RSDP }));
        // The extended (v2) checksum covers the XSDT address.
        let mut m = machine(madt(&[lapic(0, true)]));
        m.poke(RSDP + 33, 1);
        assert_eq!(cpus(&m, RSDP), Err(AcpiError::RsdpChecksum { paddr: RSDP }));
    }

    #[test]
    fn a_wrong_hint_is_reported() {
        let m = machine(madt(&[lapic(0, true)]));
        assert_eq!(
            cpus(&m, XSDT),
            Err(AcpiError::RsdpSignature { paddr: XSDT })
        );
        assert!(matches!(cpus(&m, 0xdead_0000), Err(AcpiError::Read(_))));
        assert!(matches!(cpus(&m, u64::MAX - 3), Err(AcpiError::Read(_))));
        assert_eq!(cpus(&Mem::default(), 0), Err(AcpiError::NoRsdp));
    }

    #[test]
    fn table_lengths_are_bounded() {
        // Length below the header, and absurdly large (the checksum would be read forever).
        for len in [0u32, 35, MAX_TABLE_LEN + 1, u32::MAX] {
            let mut t = madt(&[lapic(0, true)]);
            t[4..8].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut t, 9);
            assert!(
                matches!(cpus(&machine(t), 0), Err(AcpiError::TableLength { .. })),
                "{len}"
            );
        }
        // A MADT shorter than its fixed fields.
        let mut t = sdt(b"APIC", &[0; 4]);
        fix_checksum(&mut t, 9);
        assert!(matches!(
            cpus(&machine(t), 0),
            Err(AcpiError::TableLength { len: 40, .. })
        ));
        // Truncated: the header claims more bytes than memory holds.
        let mut t = madt(&[lapic(0, true)]);
        let claimed = t.len() as u32 + 64;
        t[4..8].copy_from_slice(&claimed.to_le_bytes());
        fix_checksum(&mut t, 9);
        assert!(matches!(cpus(&machine(t), 0), Err(AcpiError::Read(_))));
        // A table at the very top of the address space.
        let mut m = machine(madt(&[lapic(0, true)]));
        let mut x = Vec::new();
        x.extend_from_slice(&(u64::MAX - 7).to_le_bytes());
        m.put(XSDT, sdt(b"XSDT", &x));
        assert!(matches!(cpus(&m, 0), Err(AcpiError::NoMadt)));
    }

    #[test]
    fn zero_length_and_overlong_entries_end_the_walk_with_an_error() {
        let zero = madt(&[lapic(0, true), vec![4, 0, 0, 0]]);
        assert_eq!(
            cpus(&machine(zero), 0),
            Err(AcpiError::MadtEntry {
                offset: 52,
                kind: 4,
                len: 0
            })
        );
        let one = madt(&[vec![7, 1]]);
        assert!(matches!(
            cpus(&machine(one), 0),
            Err(AcpiError::MadtEntry { len: 1, .. })
        ));
        let past_end = madt(&[lapic(0, true), vec![1, 40, 0, 0]]);
        assert!(matches!(
            cpus(&machine(past_end), 0),
            Err(AcpiError::MadtEntry { len: 40, .. })
        ));
        let short_lapic = madt(&[vec![0, 6, 0, 0, 1, 0]]);
        assert!(matches!(
            cpus(&machine(short_lapic), 0),
            Err(AcpiError::MadtEntry {
                kind: 0,
                len: 6,
                ..
            })
        ));
        let short_x2apic = madt(&[vec![9, 8, 0, 0, 1, 0, 0, 0]]);
        assert!(matches!(
            cpus(&machine(short_x2apic), 0),
            Err(AcpiError::MadtEntry {
                kind: 9,
                len: 8,
                ..
            })
        ));
        let trailing_byte = madt(&[lapic(0, true), vec![0xff]]);
        assert!(matches!(
            cpus(&machine(trailing_byte), 0),
            Err(AcpiError::MadtEntry { .. })
        ));
    }

    #[test]
    fn root_tables_are_checked() {
        let mut m = machine(madt(&[lapic(0, true)]));
        m.put(XSDT, sdt(b"RSDT", &MADT.to_le_bytes()));
        assert!(matches!(
            cpus(&m, 0),
            Err(AcpiError::RootSignature { paddr: XSDT, .. })
        ));
        let mut m = machine(madt(&[lapic(0, true)]));
        m.put(XSDT, sdt(b"XSDT", &FACP.to_le_bytes()));
        assert_eq!(cpus(&m, 0), Err(AcpiError::NoMadt));
        let mut m = Mem::default();
        m.put(RSDP, rsdp_v2(0));
        assert_eq!(cpus(&m, 0), Err(AcpiError::NoRootTable));
        let mut r = rsdp_v2(XSDT);
        r[20..24].copy_from_slice(&20u32.to_le_bytes());
        fix_checksum(&mut r, 32);
        let mut m = machine(madt(&[lapic(0, true)]));
        m.put(RSDP, r);
        assert_eq!(
            cpus(&m, 0),
            Err(AcpiError::RsdpLength {
                paddr: RSDP,
                len: 20
            })
        );
    }

    #[test]
    fn errors_read_well() {
        let e = AcpiError::TableChecksum {
            sig: Sig([b'A', 0, b'I', 0xff]),
            paddr: 0x1000,
        };
        assert_eq!(e.to_string(), "A?I? table at 0x1000: bad checksum");
        assert_eq!(
            AcpiError::TooManyCpus { limit: 64 }.to_string(),
            "the MADT lists more than 64 enabled CPUs"
        );
    }
}
