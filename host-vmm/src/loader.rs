//! Guest kernel images: inspect the ELF (PVH entry note, pvsync ABI note, load extent) before
//! anything is written to guest memory, then load it with linux-loader.

use std::io::Cursor;
use std::ops::Range;
use std::path::Path;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use object::elf::{FileHeader64, ELFCLASS64, EM_X86_64, PT_LOAD, PT_NOTE};
use object::read::elf::{FileHeader, ProgramHeader};
use object::LittleEndian as LE;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// PVH enters in 32-bit mode with paging off: the image must lie below this.
const FOUR_GIB: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("reading kernel image {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel image is not a valid 64-bit little-endian ELF: {0}")]
    NotElf(String),
    #[error("kernel image is an ELF for machine {0}, not x86_64")]
    WrongMachine(u16),
    #[error(
        "kernel image has no PVH entry note (Xen ELF note type 18); pvsync boots PVH kernels only"
    )]
    NoPvhNote,
    #[error("kernel image {0} is not a regular file")]
    NotAFile(String),
    #[error("kernel image is larger than {0} bytes")]
    TooLarge(u64),
    #[error(
        "kernel image loads at {0:#x}, above 4 GiB: PVH kernels load at 32-bit physical addresses"
    )]
    Above4GiB(u64),
    #[error("kernel image has no loadable segment")]
    NoLoadSegment,
    #[error(
        "kernel image segment at {addr:#x}+{size:#x} lies outside guest RAM ({mem_size:#x} bytes)"
    )]
    SegmentOutsideRam { addr: u64, size: u64, mem_size: u64 },
    #[error("guest ABI version {guest} does not match this VMM's ABI version {host}; rebuild the guest against this shared-abi")]
    AbiMismatch { guest: u32, host: u32 },
    #[error("loading kernel image: {0}")]
    Load(#[from] linux_loader::loader::Error),
}

/// What the VMM needs to know about a kernel before loading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// Physical address of the 32-bit PVH entry point.
    pub pvh_entry: u64,
    /// The pvsync ABI version the guest embeds, if it embeds one.
    pub abi_version: Option<u32>,
    /// Guest-physical extent of all loadable segments (memsz, so .bss included).
    pub image: Range<u64>,
}

fn elf_err(e: object::Error) -> LoaderError {
    LoaderError::NotElf(e.to_string())
}

/// Inspects an image held in memory. Never panics, whatever the bytes.
pub fn inspect(data: &[u8]) -> Result<KernelInfo, LoaderError> {
    let header = FileHeader64::<LE>::parse(data).map_err(elf_err)?;
    if header.e_ident.class != ELFCLASS64 {
        return Err(LoaderError::NotElf("not ELFCLASS64".into()));
    }
    let endian = header.endian().map_err(elf_err)?;
    let machine = header.e_machine(endian);
    if machine != EM_X86_64 {
        return Err(LoaderError::WrongMachine(machine.0));
    }
    let mut pvh_entry = None;
    let mut abi_version = None;
    let mut image: Option<Range<u64>> = None;
    for phdr in header.program_headers(endian, data).map_err(elf_err)? {
        match phdr.p_type(endian) {
            PT_LOAD => {
                let start = phdr.p_paddr(endian);
                let end = start
                    .checked_add(phdr.p_memsz(endian))
                    .ok_or_else(|| LoaderError::NotElf("segment size overflows".into()))?;
                // The file bytes must exist: a truncated image fails here, not half-loaded.
                phdr.data(endian, data)
                    .map_err(|_| LoaderError::NotElf("segment extends past end of file".into()))?;
                image = Some(match image {
                    Some(r) => r.start.min(start)..r.end.max(end),
                    None => start..end,
                });
            }
            PT_NOTE => {
                let Some(mut notes) = phdr.notes(endian, data).map_err(elf_err)? else {
                    continue;
                };
                while let Some(note) = notes.next().map_err(elf_err)? {
                    let desc = note.desc();
                    match (note.name(), note.n_type(endian).0) {
                        (b"Xen", XEN_ELFNOTE_PHYS32_ENTRY) if desc.len() >= 4 => {
                            pvh_entry =
                                Some(u32::from_le_bytes(desc[..4].try_into().unwrap()) as u64);
                        }
                        (name, t)
                            if name == &shared_abi::ELF_NOTE_NAME[..6]
                                && t == shared_abi::ELF_NOTE_TYPE_ABI_VERSION
                                && desc.len() >= 4 =>
                        {
                            abi_version = Some(u32::from_le_bytes(desc[..4].try_into().unwrap()));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let image = image.ok_or(LoaderError::NoLoadSegment)?;
    if image.end > FOUR_GIB {
        return Err(LoaderError::Above4GiB(image.end));
    }
    Ok(KernelInfo {
        pvh_entry: pvh_entry.ok_or(LoaderError::NoPvhNote)?,
        abi_version,
        image,
    })
}

/// Largest kernel image read (guest RAM is at most 3 GiB; a real image is far smaller).
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// A kernel image read into memory once: what was inspected is exactly what is loaded.
#[derive(Debug)]
pub struct Kernel {
    pub info: KernelInfo,
    data: Vec<u8>,
}

/// Reads and inspects the image at `path`, refusing an ABI version other than ours.
pub fn read_kernel(path: &Path) -> Result<Kernel, LoaderError> {
    use crate::files::{read_bounded, FileError};
    let data = read_bounded(path, MAX_IMAGE_BYTES).map_err(|e| match e {
        FileError::Read { path, source } => LoaderError::Read {
            path: path.display().to_string(),
            source,
        },
        FileError::NotAFile(p) => LoaderError::NotAFile(p.display().to_string()),
        FileError::TooLarge { max, .. } => LoaderError::TooLarge(max),
        // Only text is checked for UTF-8.
        FileError::NotText(p) => LoaderError::NotAFile(p.display().to_string()),
    })?;
    let info = inspect(&data)?;
    match info.abi_version {
        Some(v) if v != shared_abi::ABI_VERSION => Err(LoaderError::AbiMismatch {
            guest: v,
            host: shared_abi::ABI_VERSION,
        }),
        _ => Ok(Kernel { info, data }),
    }
}

/// Loads the image into `mem` (`mem_size` bytes from 0). Returns the PVH entry point.
pub fn load(
    kernel: &Kernel,
    mem: &GuestMemoryMmap,
    mem_size: u64,
) -> Result<GuestAddress, LoaderError> {
    let info = &kernel.info;
    if info.image.end > mem_size {
        return Err(LoaderError::SegmentOutsideRam {
            addr: info.image.start,
            size: info.image.end - info.image.start,
            mem_size,
        });
    }
    let result = Elf::load(mem, None, &mut Cursor::new(&kernel.data), None)?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(entry),
        _ => Err(LoaderError::NoPvhNote),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_elf() {
        assert!(matches!(
            inspect(b"hello, world"),
            Err(LoaderError::NotElf(_))
        ));
        assert!(matches!(inspect(&[]), Err(LoaderError::NotElf(_))));
        let mut fake = vec![0u8; 64];
        fake[..4].copy_from_slice(b"\x7fELF");
        assert!(inspect(&fake).is_err());
    }

    #[test]
    fn every_truncation_of_a_tiny_elf_is_an_error_not_a_panic() {
        let elf = tiny_pvh_elf();
        assert!(inspect(&elf).is_ok());
        for len in 0..elf.len() {
            assert!(inspect(&elf[..len]).is_err(), "truncated to {len} bytes");
        }
    }

    #[test]
    fn tiny_elf_reports_entry_version_and_extent() {
        let info = inspect(&tiny_pvh_elf()).unwrap();
        assert_eq!(info.pvh_entry, 0x10_0000);
        assert_eq!(info.abi_version, Some(shared_abi::ABI_VERSION));
        assert_eq!(info.image, 0x10_0000..0x10_2000);
    }

    #[test]
    fn hostile_segment_addresses_are_refused() {
        const P_PADDR: usize = 64 + 24; // first program header's p_paddr
        for (paddr, want_above) in [(u64::MAX - 0x1000, false), (0xffff_0000_0000, true)] {
            let mut elf = tiny_pvh_elf();
            elf[P_PADDR..P_PADDR + 8].copy_from_slice(&paddr.to_le_bytes());
            match inspect(&elf) {
                Err(LoaderError::Above4GiB(_)) => assert!(want_above),
                Err(LoaderError::NotElf(m)) => assert!(!want_above && m.contains("overflows")),
                other => panic!("{paddr:#x}: {other:?}"),
            }
        }
    }

    /// A hand-assembled ELF64: one PT_LOAD (16 file bytes, 8 KiB in memory) and one PT_NOTE
    /// with the Xen PVH note and the pvsync ABI note.
    fn tiny_pvh_elf() -> Vec<u8> {
        let mut notes = Vec::new();
        let note = |v: &mut Vec<u8>, name: &[u8], ty: u32, desc: &[u8]| {
            v.extend((name.len() as u32).to_le_bytes());
            v.extend((desc.len() as u32).to_le_bytes());
            v.extend(ty.to_le_bytes());
            v.extend(name);
            v.resize(v.len().div_ceil(4) * 4, 0);
            v.extend(desc);
            v.resize(v.len().div_ceil(4) * 4, 0);
        };
        note(&mut notes, b"Xen\0", 18, &0x10_0000u64.to_le_bytes());
        note(
            &mut notes,
            shared_abi::ELF_NOTE_NAME,
            1,
            &shared_abi::ABI_VERSION.to_le_bytes(),
        );
        let phoff = 64u64;
        let load_off = phoff + 2 * 56;
        let note_off = load_off + 16;
        let mut e = Vec::new();
        e.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        e.extend(2u16.to_le_bytes()); // ET_EXEC
        e.extend(62u16.to_le_bytes()); // EM_X86_64
        e.extend(1u32.to_le_bytes());
        e.extend(0x10_0000u64.to_le_bytes()); // entry
        e.extend(phoff.to_le_bytes());
        e.extend(0u64.to_le_bytes()); // shoff
        e.extend(0u32.to_le_bytes());
        e.extend(64u16.to_le_bytes());
        e.extend(56u16.to_le_bytes());
        e.extend(2u16.to_le_bytes());
        e.extend([0u8; 6]);
        let phdr = |e: &mut Vec<u8>, ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            e.extend(ty.to_le_bytes());
            e.extend(5u32.to_le_bytes());
            e.extend(off.to_le_bytes());
            e.extend(addr.to_le_bytes());
            e.extend(addr.to_le_bytes());
            e.extend(filesz.to_le_bytes());
            e.extend(memsz.to_le_bytes());
            e.extend(4u64.to_le_bytes());
        };
        phdr(&mut e, PT_LOAD.0, load_off, 0x10_0000, 16, 0x2000);
        phdr(
            &mut e,
            PT_NOTE.0,
            note_off,
            0,
            notes.len() as u64,
            notes.len() as u64,
        );
        e.extend([0x90u8; 16]);
        e.extend(notes);
        e
    }
}
