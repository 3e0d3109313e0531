//! The PVH boot protocol's `hvm_start_info` (Xen's `arch-x86/hvm/start_info.h`): where the
//! command line, the RSDP and the memory map are.
//!
//! ```text
//! 0 magic u32 | 4 version u32 | 8 flags u32 | 12 nr_modules u32 | 16 modlist_paddr u64
//! 24 cmdline_paddr u64 | 32 rsdp_paddr u64 | version >= 1: 40 memmap_paddr u64
//! 48 memmap_entries u32 | 52 reserved u32
//! memory map entry (24 bytes): 0 addr u64 | 8 size u64 | 16 type u32 | 20 reserved u32
//! ```

use core::fmt;

use crate::{le_u32, le_u64, read_array, OutOfRange, PhysRead};

pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Bytes of one memory-map entry.
pub const MEMMAP_ENTRY_LEN: u64 = 24;
/// More memory-map entries than this is not a memory map (firmware gives a few dozen).
pub const MAX_MEMMAP_ENTRIES: u32 = 1024;

/// E820-style region types used in the PVH memory map.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
pub const E820_ACPI: u32 = 3;
pub const E820_NVS: u32 = 4;

/// The fields of `hvm_start_info` the kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartInfo {
    pub version: u32,
    /// 0: no command line.
    pub cmdline_paddr: u64,
    /// 0: none handed over (scan the BIOS area).
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    pub start: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemRegion {
    /// One past the last byte (never overflows: [`memory_map`] refuses such regions).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvhError {
    /// The start info, the command line or the memory map is outside readable memory.
    Read(OutOfRange),
    /// `%ebx` was 0.
    NullStartInfo,
    BadMagic(u32),
    /// Version 0 (no memory-map fields), no entries, or a null memory-map address.
    NoMemoryMap {
        version: u32,
    },
    /// An entry count no firmware gives.
    MemoryMapTooLong {
        entries: u32,
        max: u32,
    },
    /// An entry whose end is beyond the 64-bit address space.
    RegionOverflow {
        index: usize,
        start: u64,
        size: u64,
    },
    /// No RAM among the entries read.
    NoRam,
    /// No NUL within the first `max + 1` bytes.
    CmdlineTooLong {
        max: usize,
    },
    CmdlineNotUtf8,
}

impl From<OutOfRange> for PvhError {
    fn from(e: OutOfRange) -> Self {
        PvhError::Read(e)
    }
}

impl fmt::Display for PvhError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PvhError::Read(e) => write!(f, "PVH start info unreadable: {e}"),
            PvhError::NullStartInfo => f.write_str("no PVH start info (null address)"),
            PvhError::BadMagic(m) => write!(
                f,
                "bad PVH start info magic {m:#x} (expected {XEN_HVM_START_MAGIC:#x})"
            ),
            PvhError::NoMemoryMap { version } => {
                write!(
                    f,
                    "PVH start info (version {version}) carries no memory map"
                )
            }
            PvhError::MemoryMapTooLong { entries, max } => write!(
                f,
                "PVH memory map claims {entries} entries (at most {max} believed)"
            ),
            PvhError::RegionOverflow { index, start, size } => write!(
                f,
                "PVH memory map entry {index} ({start:#x} + {size:#x}) overflows"
            ),
            PvhError::NoRam => f.write_str("PVH memory map lists no RAM"),
            PvhError::CmdlineTooLong { max } => {
                write!(f, "command line longer than {max} bytes")
            }
            PvhError::CmdlineNotUtf8 => f.write_str("command line is not UTF-8"),
        }
    }
}

/// Reads and checks the start info at `paddr`.
pub fn start_info<R: PhysRead + ?Sized>(mem: &R, paddr: u64) -> Result<StartInfo, PvhError> {
    if paddr == 0 {
        return Err(PvhError::NullStartInfo);
    }
    let head: [u8; 40] = read_array(mem, paddr)?;
    let magic = le_u32(&head, 0);
    if magic != XEN_HVM_START_MAGIC {
        return Err(PvhError::BadMagic(magic));
    }
    let version = le_u32(&head, 4);
    let (memmap_paddr, memmap_entries) = if version >= 1 {
        let at = paddr.checked_add(40).ok_or(OutOfRange { paddr, len: 56 })?;
        let v1: [u8; 12] = read_array(mem, at)?;
        (le_u64(&v1, 0), le_u32(&v1, 8))
    } else {
        (0, 0)
    };
    if memmap_entries == 0 || memmap_paddr == 0 {
        return Err(PvhError::NoMemoryMap { version });
    }
    if memmap_entries > MAX_MEMMAP_ENTRIES {
        return Err(PvhError::MemoryMapTooLong {
            entries: memmap_entries,
            max: MAX_MEMMAP_ENTRIES,
        });
    }
    Ok(StartInfo {
        version,
        cmdline_paddr: le_u64(&head, 24),
        rsdp_paddr: le_u64(&head, 32),
        memmap_paddr,
        memmap_entries,
    })
}

/// Copies the NUL-terminated command line at `paddr` into `buf` (at most `buf.len() - 1`
/// bytes: a cut-off command would run something else than asked). `paddr` 0 is "".
pub fn cmdline<'b, R: PhysRead + ?Sized>(
    mem: &R,
    paddr: u64,
    buf: &'b mut [u8],
) -> Result<&'b str, PvhError> {
    if paddr == 0 {
        return Ok("");
    }
    let mut len = None;
    for (i, slot) in buf.iter_mut().enumerate() {
        let at = paddr
            .checked_add(i as u64)
            .ok_or(OutOfRange { paddr, len: i + 1 })?;
        let [b] = read_array(mem, at)?;
        if b == 0 {
            len = Some(i);
            break;
        }
        *slot = b;
    }
    let Some(len) = len else {
        return Err(PvhError::CmdlineTooLong {
            max: buf.len().saturating_sub(1),
        });
    };
    core::str::from_utf8(&buf[..len]).map_err(|_| PvhError::CmdlineNotUtf8)
}

/// The memory map, as much of it as `out` holds; returns how many entries were kept
/// (`info.memmap_entries` may be more: the caller says so).
pub fn memory_map<R: PhysRead + ?Sized>(
    mem: &R,
    info: &StartInfo,
    out: &mut [MemRegion],
) -> Result<usize, PvhError> {
    let n = (info.memmap_entries.min(MAX_MEMMAP_ENTRIES) as usize).min(out.len());
    let mut ram = false;
    for (i, slot) in out[..n].iter_mut().enumerate() {
        let at = info
            .memmap_paddr
            .checked_add(i as u64 * MEMMAP_ENTRY_LEN)
            .ok_or(OutOfRange {
                paddr: info.memmap_paddr,
                len: n * MEMMAP_ENTRY_LEN as usize,
            })?;
        let e: [u8; 24] = read_array(mem, at)?;
        let (start, size, kind) = (le_u64(&e, 0), le_u64(&e, 8), le_u32(&e, 16));
        if start.checked_add(size).is_none() {
            return Err(PvhError::RegionOverflow {
                index: i,
                start,
                size,
            });
        }
        ram |= kind == E820_RAM && size > 0;
        *slot = MemRegion { start, size, kind };
    }
    if !ram {
        return Err(PvhError::NoRam);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::Mem;
    use std::vec::Vec;

    const SI: u64 = 0x6000;
    const CMD: u64 = 0x7000;
    const MAP: u64 = 0x8000;

    pub fn start_info_bytes(version: u32, cmdline: u64, rsdp: u64, map: u64, n: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&[0; 8]); // flags, nr_modules
        b.extend_from_slice(&0u64.to_le_bytes()); // modlist
        b.extend_from_slice(&cmdline.to_le_bytes());
        b.extend_from_slice(&rsdp.to_le_bytes());
        b.extend_from_slice(&map.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b
    }

    pub fn entry(start: u64, size: u64, kind: u32) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&start.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&kind.to_le_bytes());
        e.extend_from_slice(&[0; 4]);
        e
    }

    fn pvsync_like() -> Mem {
        let mut m = Mem::default();
        m.put(SI, start_info_bytes(1, CMD, 0xe0000, MAP, 3));
        m.put(CMD, b"test=selftest smp=2\0".to_vec());
        let mut map = entry(0, 0x9fc00, E820_RAM);
        map.extend(entry(0x9fc00, 0x60400, E820_RESERVED));
        map.extend(entry(0x10_0000, 0x7f0_0000, E820_RAM));
        m.put(MAP, map);
        m
    }

    #[test]
    fn a_well_formed_start_info_is_read() {
        let m = pvsync_like();
        let si = start_info(&m, SI).unwrap();
        assert_eq!(
            si,
            StartInfo {
                version: 1,
                cmdline_paddr: CMD,
                rsdp_paddr: 0xe0000,
                memmap_paddr: MAP,
                memmap_entries: 3
            }
        );
        let mut buf = [0u8; 4096];
        assert_eq!(
            cmdline(&m, si.cmdline_paddr, &mut buf),
            Ok("test=selftest smp=2")
        );
        let mut regions = [MemRegion::default(); 64];
        assert_eq!(memory_map(&m, &si, &mut regions), Ok(3));
        assert_eq!(
            regions[2],
            MemRegion {
                start: 0x10_0000,
                size: 0x7f0_0000,
                kind: E820_RAM
            }
        );
        assert_eq!(regions[2].end(), 0x800_0000);
    }

    #[test]
    fn bad_magic_null_and_unreadable_start_info_are_errors() {
        let mut m = pvsync_like();
        m.poke(SI, 0x79);
        assert_eq!(start_info(&m, SI), Err(PvhError::BadMagic(0x336e_c579)));
        assert_eq!(start_info(&m, 0), Err(PvhError::NullStartInfo));
        assert!(matches!(
            start_info(&m, 0x1234_0000),
            Err(PvhError::Read(_))
        ));
        assert!(matches!(
            start_info(&m, u64::MAX - 8),
            Err(PvhError::Read(_))
        ));
        // Truncated: a version-1 start info cut after the version-0 fields.
        let mut m = Mem::default();
        let mut b = start_info_bytes(1, 0, 0, MAP, 1);
        b.truncate(44);
        m.put(SI, b);
        assert!(matches!(start_info(&m, SI), Err(PvhError::Read(_))));
    }

    #[test]
    fn a_missing_memory_map_is_an_error() {
        for (version, map, n) in [(0, MAP, 3), (1, MAP, 0), (1, 0, 3)] {
            let mut m = pvsync_like();
            m.put(SI, start_info_bytes(version, CMD, 0, map, n));
            assert_eq!(
                start_info(&m, SI),
                Err(PvhError::NoMemoryMap { version }),
                "version {version} map {map:#x} entries {n}"
            );
        }
    }

    #[test]
    fn absurd_memory_map_counts_are_errors() {
        for n in [MAX_MEMMAP_ENTRIES + 1, u32::MAX] {
            let mut m = pvsync_like();
            m.put(SI, start_info_bytes(1, CMD, 0, MAP, n));
            assert_eq!(
                start_info(&m, SI),
                Err(PvhError::MemoryMapTooLong {
                    entries: n,
                    max: MAX_MEMMAP_ENTRIES
                })
            );
        }
    }

    #[test]
    fn memory_maps_longer_than_the_buffer_are_cut_and_shorter_memory_is_an_error() {
        let mut m = pvsync_like();
        let mut map = Vec::new();
        for i in 0..100u64 {
            map.extend(entry(0x10_0000 * (i + 1), 0x1000, E820_RAM));
        }
        m.put(MAP, map);
        m.put(SI, start_info_bytes(1, CMD, 0, MAP, 100));
        let si = start_info(&m, SI).unwrap();
        let mut regions = [MemRegion::default(); 64];
        assert_eq!(memory_map(&m, &si, &mut regions), Ok(64));
        // The count claims more entries than memory holds: truncated table.
        m.put(SI, start_info_bytes(1, CMD, 0, MAP, 101));
        let si = start_info(&m, SI).unwrap();
        let mut regions = [MemRegion::default(); 128];
        assert!(matches!(
            memory_map(&m, &si, &mut regions),
            Err(PvhError::Read(_))
        ));
    }

    #[test]
    fn overflowing_regions_and_maps_without_ram_are_errors() {
        let mut m = pvsync_like();
        let mut map = entry(0, 0x9fc00, E820_RAM);
        map.extend(entry(u64::MAX - 0xfff, 0x2000, E820_RAM));
        m.put(MAP, map);
        m.put(SI, start_info_bytes(1, CMD, 0, MAP, 2));
        let si = start_info(&m, SI).unwrap();
        let mut regions = [MemRegion::default(); 8];
        assert_eq!(
            memory_map(&m, &si, &mut regions),
            Err(PvhError::RegionOverflow {
                index: 1,
                start: u64::MAX - 0xfff,
                size: 0x2000
            })
        );
        m.put(MAP, entry(0, 0x10_0000, E820_RESERVED));
        m.put(SI, start_info_bytes(1, CMD, 0, MAP, 1));
        let si = start_info(&m, SI).unwrap();
        assert_eq!(memory_map(&m, &si, &mut regions), Err(PvhError::NoRam));
    }

    #[test]
    fn command_lines_are_bounded_and_checked() {
        let mut m = pvsync_like();
        let mut buf = [0u8; 8];
        m.put(CMD, b"1234567\0".to_vec());
        assert_eq!(cmdline(&m, CMD, &mut buf), Ok("1234567"));
        m.put(CMD, b"12345678\0".to_vec());
        assert_eq!(
            cmdline(&m, CMD, &mut buf),
            Err(PvhError::CmdlineTooLong { max: 7 })
        );
        m.put(CMD, b"1234".to_vec()); // no NUL before memory ends
        assert!(matches!(cmdline(&m, CMD, &mut buf), Err(PvhError::Read(_))));
        m.put(CMD, b"ab\xffc\0".to_vec());
        assert_eq!(cmdline(&m, CMD, &mut buf), Err(PvhError::CmdlineNotUtf8));
        assert_eq!(cmdline(&m, 0, &mut buf), Ok(""));
        assert_eq!(
            cmdline(&m, CMD, &mut []),
            Err(PvhError::CmdlineTooLong { max: 0 })
        );
    }
}
