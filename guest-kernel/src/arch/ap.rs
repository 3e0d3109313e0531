//! Application-processor bring-up data shared with the assembly: the real-mode trampoline
//! (trampoline.S, copied to [`super::AP_TRAMPOLINE_ADDR`]), the page tables and stacks it
//! hands the APs (`ap_boot_cr3`, `ap_stack_tops`, read by trampoline.S and boot.S), and an
//! AP's first Rust code, which calls the entry the layer above installs.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use pvsync_guest::NR_CPUS;

use super::hook::Hook;
use super::AP_TRAMPOLINE_ADDR;

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// Stack tops by APIC ID, taken by boot.S (`ap_stack_tops`: an AP swaps its entry for 0,
/// and halts where its ID is past the table or it finds 0).
#[export_name = "ap_stack_tops"]
static AP_STACK_TOPS: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
/// CR3 the trampoline loads, read by trampoline.S (`ap_boot_cr3`, 32-bit).
#[export_name = "ap_boot_cr3"]
static AP_BOOT_CR3: AtomicU32 = AtomicU32::new(0);

/// An AP's entry: `smp` installs it before it starts any AP. Default (nothing installed):
/// the AP halts for good.
static AP_ENTRY: Hook<fn(u32) -> !> = Hook::new();

/// The trampoline's bytes.
fn trampoline_bytes() -> &'static [u8] {
    // SAFETY: both symbols are defined in trampoline.S around the trampoline code, in one
    // section, start before end; the bytes are immutable code for the kernel's lifetime.
    unsafe {
        let start = core::ptr::addr_of!(ap_trampoline_start);
        let end = core::ptr::addr_of!(ap_trampoline_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// Copies the trampoline to [`AP_TRAMPOLINE_ADDR`] (one page), where a STARTUP IPI sends
/// the APs.
pub fn install_trampoline() {
    let code = trampoline_bytes();
    assert!(code.len() <= 4096, "AP trampoline larger than a page");
    // SAFETY: the trampoline page is low memory that the frame allocator never hands out
    // (it starts at 1 MiB) and that both the boot and the kernel tables identity-map; the
    // bytes are the same immutable code every time, so an AP already running from the page
    // reads the same instructions.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), AP_TRAMPOLINE_ADDR as *mut u8, code.len())
    };
}

/// Publishes the physical address of the page tables the trampoline loads (below 4 GiB).
pub fn set_boot_cr3(cr3: u32) {
    AP_BOOT_CR3.store(cr3, Ordering::Release);
}

/// Publishes the top of the stack AP `apic_id` starts on.
pub fn set_stack_top(apic_id: u32, top: u64) {
    AP_STACK_TOPS[apic_id as usize].store(top, Ordering::Release);
}

/// Installs what every AP runs first, with its initial APIC ID (`apic::initial_apic_id`).
pub fn set_entry(f: fn(u32) -> !) {
    AP_ENTRY.set(f);
}

/// First Rust code on an AP, called by boot.S on the stack from `ap_stack_tops`.
#[no_mangle]
extern "C" fn ap_entry(cpuid_apic_id: u32) -> ! {
    match AP_ENTRY.get() {
        Some(entry) => entry(cpuid_apic_id),
        None => super::halt_forever(),
    }
}
