//! Which CPUs to bring up: `smp=N`, else the ACPI MADT, parsed by `pvsync-boot-parse`
//! through the boot identity map (`arch::bootmem`; every table bounded and checksummed there).

use pvsync_boot_parse::acpi::{self, AcpiError};
use pvsync_guest::NR_CPUS;

use crate::arch::bootmem::BootMemory;
use crate::println;

/// Enabled APIC IDs, at most NR_CPUS of them, each below NR_CPUS (they index per-CPU
/// arrays and the shared region).
pub type CpuList = acpi::CpuList<NR_CPUS>;

/// CPUs 0..smp when given, else the MADT's, and whether they are every CPU the machine has
/// (the MADT's, none of its entries disabled). Without usable ACPI tables the kernel runs on
/// the boot CPU alone and says why; with more CPUs than it supports it stops.
pub fn cpus(mem: &BootMemory, smp: Option<usize>, rsdp_hint: u64) -> (CpuList, bool) {
    let result = match smp {
        Some(n) => CpuList::from_count(n),
        None => acpi::madt_cpus::<NR_CPUS, _>(mem, rsdp_hint),
    };
    match result {
        Ok(l) => {
            if l.duplicates() > 0 {
                println!(
                    "ACPI: the MADT lists {} APIC ID(s) more than once; each counted once",
                    l.duplicates()
                );
            }
            let whole = smp.is_none() && l.disabled() == 0;
            (l, whole)
        }
        Err(e @ (AcpiError::TooManyCpus { .. } | AcpiError::ApicIdTooLarge { .. })) => {
            crate::panic::fail(format_args!(
                "{e}: this kernel supports at most {NR_CPUS} vCPUs, APIC IDs 0..{NR_CPUS} (smp=N uses fewer)"
            ))
        }
        Err(e) => {
            println!("ACPI: {e}; assuming 1 CPU (pass smp=N to override)");
            let one =
                CpuList::from_count(1).unwrap_or_else(|e| crate::panic::fail(format_args!("{e}")));
            (one, false)
        }
    }
}
