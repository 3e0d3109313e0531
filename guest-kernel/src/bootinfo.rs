//! The PVH `hvm_start_info` handed over in %ebx: command line, memory map, RSDP. Parsed by
//! `pvsync-boot-parse` through the boot identity map and copied into kernel memory at once,
//! before anything can overwrite it.

use pvsync_boot_parse::pvh::{self, PvhError};
use spin::Once;

pub use pvsync_boot_parse::pvh::{MemRegion, E820_ACPI, E820_NVS, E820_RAM};

use crate::arch::bootmem::BootMemory;

/// Most memory-map entries kept.
pub const MAX_REGIONS: usize = 64;
/// Same limit as the pvsync VMM's (4095 bytes and the NUL).
const MAX_CMDLINE: usize = 4096;

pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    regions: [MemRegion; MAX_REGIONS],
    nregions: usize,
    pub rsdp: u64,
}

impl BootInfo {
    pub fn cmdline(&self) -> &str {
        // Checked to be UTF-8 by pvh::cmdline.
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    pub fn regions(&self) -> &[MemRegion] {
        &self.regions[..self.nregions]
    }

    /// Total bytes of RAM in the map.
    pub fn ram_bytes(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .map(|r| r.size)
            .sum()
    }
}

static BOOT_INFO: Once<BootInfo> = Once::new();

fn read(mem: &BootMemory, paddr: u64) -> Result<BootInfo, PvhError> {
    let si = pvh::start_info(mem, paddr)?;
    let mut info = BootInfo {
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        regions: [MemRegion::default(); MAX_REGIONS],
        nregions: 0,
        rsdp: si.rsdp_paddr,
    };
    info.cmdline_len = pvh::cmdline(mem, si.cmdline_paddr, &mut info.cmdline)?.len();
    info.nregions = pvh::memory_map(mem, &si, &mut info.regions)?;
    if si.memmap_entries as usize > info.nregions {
        crate::println!(
            "memory map has {} entries; using the first {}",
            si.memmap_entries,
            info.nregions
        );
    }
    Ok(info)
}

/// Parses and copies the start info at `paddr`, read through the boot tables (`mem`). The
/// kernel cannot run without it: a bad one ends the VM with the reason.
pub fn parse(mem: &BootMemory, paddr: u64) -> &'static BootInfo {
    match read(mem, paddr) {
        Ok(info) => BOOT_INFO.call_once(|| info),
        Err(e) => crate::panic::fail(format_args!("{e} (start info at {paddr:#x})")),
    }
}
