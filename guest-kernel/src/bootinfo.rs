//! The PVH `hvm_start_info` handed over in %ebx: command line, memory map, RSDP.
//! Everything is copied into kernel memory at once, before anything can overwrite it.

use spin::Once;

use crate::arch::bootmem::BootMemory;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Most memory-map entries kept.
pub const MAX_REGIONS: usize = 64;
/// Same limit as the pvsync VMM's (4095 bytes and the NUL).
const MAX_CMDLINE: usize = 4096;

/// E820-style region types used in the PVH memory map.
pub const E820_RAM: u32 = 1;
pub const E820_ACPI: u32 = 3;
pub const E820_NVS: u32 = 4;

#[derive(Clone, Copy, Debug, Default)]
pub struct MemRegion {
    pub start: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemRegion {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    regions: [MemRegion; MAX_REGIONS],
    nregions: usize,
    pub rsdp: u64,
}

impl BootInfo {
    pub fn cmdline(&self) -> &str {
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

/// Parses and copies the start info at `paddr`, read through the boot tables (`mem`).
/// Panics (with a message) on a bad magic, a missing memory map, or a pointer beyond the
/// boot tables' 4 GiB: the kernel cannot run without them.
pub fn parse(mem: &BootMemory, paddr: u64) -> &'static BootInfo {
    assert!(
        paddr != 0 && paddr < (1 << 32),
        "PVH start info address {paddr:#x} is invalid"
    );
    let magic = mem.read_u32(paddr);
    assert!(
        magic == XEN_HVM_START_MAGIC,
        "bad PVH start info magic {magic:#x}"
    );
    let version = mem.read_u32(paddr + 4);
    let cmdline_paddr = mem.read_u64(paddr + 24);
    let rsdp = mem.read_u64(paddr + 32);
    let (memmap_paddr, memmap_entries) = if version >= 1 {
        (mem.read_u64(paddr + 40), mem.read_u32(paddr + 48))
    } else {
        (0, 0)
    };
    assert!(
        memmap_entries > 0,
        "PVH start info (version {version}) carries no memory map"
    );

    let mut info = BootInfo {
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        regions: [MemRegion::default(); MAX_REGIONS],
        nregions: 0,
        rsdp,
    };
    if cmdline_paddr != 0 {
        loop {
            let b = mem.read_u8(cmdline_paddr + info.cmdline_len as u64);
            if b == 0 {
                break;
            }
            // Refuse rather than run a silently cut-off command.
            assert!(
                info.cmdline_len < MAX_CMDLINE - 1,
                "command line longer than {} bytes",
                MAX_CMDLINE - 1
            );
            info.cmdline[info.cmdline_len] = b;
            info.cmdline_len += 1;
        }
    }
    if memmap_entries as usize > MAX_REGIONS {
        crate::println!("memory map has {memmap_entries} entries; using the first {MAX_REGIONS}");
    }
    for i in 0..(memmap_entries as usize).min(MAX_REGIONS) {
        let e = memmap_paddr + i as u64 * 24;
        info.regions[i] = MemRegion {
            start: mem.read_u64(e),
            size: mem.read_u64(e + 8),
            kind: mem.read_u32(e + 16),
        };
        info.nregions += 1;
    }
    BOOT_INFO.call_once(|| info)
}
