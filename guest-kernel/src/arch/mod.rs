//! x86_64 specifics: boot and trap assembly, descriptor tables, the local APIC, the TSC,
//! the serial port and the exit port, user-mode entry and the context switch, KVM's own
//! paravirtual interface.
//!
//! The floor of the kernel: nothing here imports another kernel module (checked by
//! `tests/tests/layers.rs`). Where arch must reach the layers above (traps, IPIs through
//! the host, idle, an AP's first Rust code) it calls a [`hook::Hook`] they install.

pub mod ap;
pub mod apic;
pub mod bootmem;
pub mod context;
pub mod gdt;
pub mod hook;
pub mod idt;
pub mod kvm;
pub mod pic;
pub mod serial;
pub mod tsc;
pub mod user;
pub mod vectors;

use core::arch::global_asm;
use shared_abi::{ExitCode, Hypercall};
use x86_64::instructions::port::Port;

/// Physical page the AP real-mode trampoline is copied to; SIPI vector = page number.
pub const AP_TRAMPOLINE_ADDR: u64 = 0x8000;
/// Size of the BSP's boot stack (in .bss).
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    include_str!("boot.S"),
    note_type_abi = const shared_abi::ELF_NOTE_TYPE_ABI_VERSION,
    abi_version = const shared_abi::ABI_VERSION,
    boot_stack_size = const BOOT_STACK_SIZE,
    nr_cpus = const pvsync_guest::NR_CPUS,
    options(att_syntax)
);
global_asm!(
    include_str!("trampoline.S"),
    tramp_base = const AP_TRAMPOLINE_ADDR,
    options(att_syntax)
);
global_asm!(include_str!("traps.S"), options(att_syntax));
global_asm!(include_str!("switch.S"), options(att_syntax));
global_asm!(
    include_str!("user_entry.S"),
    user_ss = const 0x18 | 3,
    user_cs = const 0x20 | 3,
    options(att_syntax)
);
global_asm!(include_str!("user.S"), options(att_syntax));

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// Physical range [start, end) of the loaded kernel image, .bss included.
pub fn kernel_image_range() -> (u64, u64) {
    // Linker-script symbols: only their addresses are taken.
    (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    )
}

/// Whether CPUID says we run under a hypervisor (CPUID.1:ECX[31]).
pub fn under_hypervisor() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & (1 << 31) != 0
}

/// Stops this CPU for good (interrupts off).
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Drops every non-global translation from this CPU's TLB (a CR3 reload).
pub fn flush_tlb_all() {
    x86_64::instructions::tlb::flush_all();
}

/// Drops the translations of `pages` 4 KiB pages from `start` (INVLPG each).
pub fn flush_tlb_pages(start: u64, pages: u64) {
    for i in 0..pages {
        x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(start + i * 4096));
    }
}

/// A 32-bit `out` to I/O port `port` (pvsync's hypercall ports).
pub fn port_out(port: u16, value: u32) {
    // SAFETY: the kernel only writes pvsync hypercall ports through this, which ask the host
    // to schedule, idle or interrupt vCPUs, or read the region the guest registers; the write
    // orders all earlier stores before it. An unclaimed port drops the write.
    unsafe { x86_64::instructions::port::Port::<u32>::new(port).write(value) }
}

/// A 32-bit `in` from I/O port `port` (a pvsync hypercall's status).
pub fn port_in(port: u16) -> u32 {
    // SAFETY: reading a hypercall status port has no side effect on guest memory; an
    // unclaimed port reads all ones.
    unsafe { x86_64::instructions::port::Port::<u32>::new(port).read() }
}

/// Leaves the VM: writes `code` to the exit port (pvsync's Exit hypercall, QEMU's
/// isa-debug-exit). Under a VMM without an exit device the CPU halts instead.
pub fn exit(code: ExitCode) -> ! {
    let mut port: Port<u32> = Port::new(Hypercall::Exit.port());
    // SAFETY: the exit port has no effect on guest memory; the host stops the VM.
    unsafe { port.write(code as u32) };
    halt_forever()
}

/// Writes to address 8, in page 0, which the kernel's page tables leave unmapped (`mm`), so
/// the write faults and the fatal-exception path must report it (`test=fault`). Returns
/// only if page 0 is mapped after all.
pub fn deliberate_fault() {
    // SAFETY: page 0 holds no Rust object (the kernel image starts at 1 MiB): with the
    // kernel's tables the write faults; were it mapped (the boot tables), it would only
    // overwrite the real-mode interrupt table, which nothing uses in long mode.
    unsafe { core::ptr::write_volatile(core::ptr::null_mut::<u64>().wrapping_add(1), 1) };
}
