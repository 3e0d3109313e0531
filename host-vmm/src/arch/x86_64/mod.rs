//! x86_64 guest set-up: memory layout, CPUID, boot registers, ACPI and PVH boot data.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
pub mod x2apic;
