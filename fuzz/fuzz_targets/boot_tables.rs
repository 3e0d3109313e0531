//! The guest's boot-time parsers, built for the host, over any bytes placed in the BIOS
//! area: the PVH start info with its command line and memory map, and the ACPI walk from the
//! RSDP to the MADT's CPUs. They never panic and never accept more than their limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvsync_boot_parse::{acpi, pvh, SliceMem};

/// Where the input lies: the start of the area the RSDP scan covers.
const BASE: u64 = 0xe_0000;
/// A small CPU limit, which short inputs reach, and the guest kernel's own
/// (`pvsync_guest::NR_CPUS`), which takes x2APIC IDs past 255.
const SMALL: usize = 64;
const KERNEL: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let mem = SliceMem::new(BASE, data);
    if let Ok(info) = pvh::start_info(&mem, BASE) {
        let mut buf = [0u8; 256];
        if let Ok(line) = pvh::cmdline(&mem, info.cmdline_paddr, &mut buf) {
            assert!(line.len() <= buf.len());
        }
        let mut regions = [pvh::MemRegion::default(); 16];
        if let Ok(n) = pvh::memory_map(&mem, &info, &mut regions) {
            assert!(n <= regions.len());
        }
    }
    if let Ok(cpus) = acpi::madt_cpus::<SMALL, _>(&mem, 0) {
        assert!(cpus.ids().len() <= SMALL && cpus.ids().iter().all(|&id| (id as usize) < SMALL));
    }
    if let Ok(cpus) = acpi::madt_cpus::<KERNEL, _>(&mem, 0) {
        assert!(cpus.ids().len() <= KERNEL && cpus.ids().iter().all(|&id| (id as usize) < KERNEL));
    }
    let _ = acpi::madt_cpus::<SMALL, _>(&mem, BASE);
});
