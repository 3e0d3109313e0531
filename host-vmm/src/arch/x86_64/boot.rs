//! PVH boot data: command line, memory map and `hvm_start_info`, written with linux-loader.

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MEMMAP_START, PVH_INFO_START,
};

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Memory-map type of usable RAM.
pub const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("writing the kernel command line: {0}")]
    LoadCmdline(linux_loader::loader::Error),
    #[error("writing the PVH start info: {0}")]
    StartInfo(#[from] linux_loader::configurator::Error),
}

/// The memory map the guest sees for `mem_size` bytes of RAM.
pub fn memory_map(mem_size: u64) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, end: u64, type_| hvm_memmap_table_entry {
        addr,
        size: end - addr,
        type_,
        reserved: 0,
    };
    vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START, E820_RESERVED),
        entry(HIMEM_START, mem_size, E820_RAM),
    ]
}

/// Writes command line, memory map and start info; returns the start info's address.
pub fn write_pvh_boot_data(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &str,
    rsdp: GuestAddress,
) -> Result<GuestAddress, BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(BootError::LoadCmdline)?;

    let memmap = memory_map(mem_size);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem)?;
    Ok(GuestAddress(PVH_INFO_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reserves_the_legacy_hole() {
        let m = memory_map(64 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].addr, m[0].size, m[0].type_),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(m[1].type_, E820_RESERVED);
        assert_eq!(m[2].addr + m[2].size, 64 << 20);
    }
}
