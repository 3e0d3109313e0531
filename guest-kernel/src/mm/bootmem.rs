//! Guest-physical memory as the boot page tables show it (the first 4 GiB, identity-mapped),
//! for the boot-time parsers of `pvsync-boot-parse`: the PVH start info, the command line,
//! the memory map and the ACPI tables are read through it, by copying, before `mm::init`.
//! After that the kernel's own tables map only RAM and ACPI regions and the frame allocator
//! may hand out what the start info occupied, so every later read is refused.

use core::sync::atomic::{AtomicBool, Ordering};
use pvsync_boot_parse::{OutOfRange, PhysRead};

/// The boot tables identity-map this much.
const LIMIT: u64 = 1 << 32;

static LIVE: AtomicBool = AtomicBool::new(true);

/// Reads through the boot identity map (see the module documentation).
pub struct BootPhys;

/// Called by `mm::init` before it hands out the first frame.
pub(super) fn retire() {
    LIVE.store(false, Ordering::Release);
}

impl PhysRead for BootPhys {
    fn read(&self, paddr: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let err = OutOfRange {
            paddr,
            len: buf.len(),
        };
        let end = paddr.checked_add(buf.len() as u64).ok_or(err)?;
        // Address 0 is never a table (and a null pointer is never valid to read).
        if paddr == 0 || end > LIMIT || !LIVE.load(Ordering::Acquire) {
            return Err(err);
        }
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: [paddr, end) is non-null and below 4 GiB, which the boot page tables
            // identity-map (boot.S) until mm::init replaces them, and LIVE says mm::init has
            // not run. Volatile byte reads: firmware memory is not Rust data, and no
            // reference to it is ever formed.
            *b = unsafe { core::ptr::read_volatile((paddr + i as u64) as *const u8) };
        }
        Ok(())
    }
}
