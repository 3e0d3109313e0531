//! Guest-physical memory layout.
//!
//! ```text
//! 0x0000_6000  hvm_start_info           (PVH_INFO_START)
//! 0x0000_7000  PVH memory map           (MEMMAP_START)
//! 0x0000_8000  left free: the guest copies its AP trampoline here
//! 0x0002_0000  kernel command line      (CMDLINE_START)
//! 0x0009_fc00  start of the reserved legacy hole (EBDA_START .. HIMEM_START)
//! 0x000e_0000  RSDP, XSDT, MADT         (ACPI_START, inside the hole)
//! 0x0010_0000  kernel image             (HIMEM_START)
//! ...          RAM up to the configured size, at most MEM_32BIT_GAP_START
//! ```

/// Where the `hvm_start_info` structure goes.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH memory map goes (at most 4 KiB, before the AP trampoline page).
pub const MEMMAP_START: u64 = 0x7000;
/// Where the kernel command line goes.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the legacy hole below 1 MiB (EBDA, VGA, BIOS), reserved in the memory map.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the ACPI tables go (the guest also finds the RSDP by scanning 0xe0000..0x100000).
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// First byte above the legacy hole: the kernel loads here.
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM must end below the 32-bit MMIO gap (LAPIC, IOAPIC, TSS): at most 3 GiB.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// Three pages KVM needs for the real-mode TSS on Intel, inside the gap.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// xAPIC MMIO base the MADT reports (the guest uses x2APIC MSRs).
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
