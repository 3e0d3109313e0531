//! Which CPUs to bring up: `smp=N`, else the ACPI MADT, parsed by `pvsync-boot-parse`
//! through the boot identity map (`arch::bootmem`; every table bounded and checksummed there).

use pvsync_boot_parse::acpi::{self, AcpiError};
use shared_abi::MAX_VCPUS;

use crate::arch::bootmem::BootMemory;
use crate::println;

/// Enabled APIC IDs, at most MAX_VCPUS of them, each below MAX_VCPUS (they index per-CPU
/// arrays and the shared region).
pub type CpuList = acpi::CpuList<MAX_VCPUS>;

/// CPUs 0..smp when given, else the MADT's. Without usable ACPI tables the kernel runs on
/// the boot CPU alone and says why; with more CPUs than it supports it stops.
pub fn cpus(mem: &BootMemory, smp: Option<usize>, rsdp_hint: u64) -> CpuList {
    let result = match smp {
        Some(n) => CpuList::from_count(n),
        None => acpi::madt_cpus::<MAX_VCPUS, _>(mem, rsdp_hint),
    };
    match result {
        Ok(l) => {
            if l.duplicates() > 0 {
                println!(
                    "ACPI: the MADT lists {} APIC ID(s) more than once; each counted once",
                    l.duplicates()
                );
            }
            l
        }
        Err(e @ (AcpiError::TooManyCpus { .. } | AcpiError::ApicIdTooLarge { .. })) => {
            crate::panic::fail(format_args!(
                "{e}: pvsync supports at most {MAX_VCPUS} vCPUs, APIC IDs 0..{MAX_VCPUS} (smp=N uses fewer)"
            ))
        }
        Err(e) => {
            println!("ACPI: {e}; assuming 1 CPU (pass smp=N to override)");
            CpuList::from_count(1).unwrap_or_else(|e| crate::panic::fail(format_args!("{e}")))
        }
    }
}
