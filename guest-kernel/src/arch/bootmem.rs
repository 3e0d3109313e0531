//! Boot-time reads of physical memory through the boot page tables of boot.S, which
//! identity-map the first 4 GiB: the PVH start info with the command line and memory map it
//! points at, and the ACPI tables.
//!
//! Only while those tables are live and no frame has been handed out: the kernel's own
//! tables map less, and the frame allocator may reuse the memory. Hence a token: there is
//! one [`BootMemory`], every view borrows it, and `mm::init`, which installs the kernel's
//! tables and starts the allocator, takes it by value, so no view outlives the boot tables.
//!
//! The parsers of `pvsync-boot-parse` (start info, command line, memory map, ACPI tables)
//! read through the token's [`PhysRead`] implementation, which copies bytes out and refuses,
//! rather than panics on, what the boot tables do not map.

use core::sync::atomic::{AtomicBool, Ordering};
use pvsync_boot_parse::{OutOfRange, PhysRead};

/// Boot views must end below this (what boot.S maps).
pub const LIMIT: u64 = 1 << 32;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The right to read physical memory through the boot tables (see the module docs).
pub struct BootMemory {
    _private: (),
}

impl BootMemory {
    /// The token, the first time (on the BSP, before `mm::init`); None afterwards.
    pub fn take() -> Option<BootMemory> {
        (!TAKEN.swap(true, Ordering::AcqRel)).then_some(BootMemory { _private: () })
    }

    /// `len` bytes at physical address `paddr`. Panics unless they lie below [`LIMIT`].
    pub fn bytes(&self, paddr: u64, len: usize) -> &[u8] {
        assert!(
            paddr
                .checked_add(len as u64)
                .is_some_and(|end| end <= LIMIT),
            "boot memory view {paddr:#x}+{len:#x} beyond 4 GiB"
        );
        // SAFETY: [paddr, paddr + len) lies below 4 GiB, identity-mapped by the boot page
        // tables, and holds firmware or loader data, not Rust objects. The view borrows the
        // token, which `mm::init` consumes before it installs the kernel's tables or hands
        // out any frame, so the memory stays mapped and unchanged while the view lives.
        unsafe { core::slice::from_raw_parts(paddr as *const u8, len) }
    }
}

impl PhysRead for BootMemory {
    /// Copies `[paddr, paddr + buf.len())` out; a range starting at address 0
    /// (never a table, and not a valid pointer) or one reaching past [`LIMIT`] is refused.
    fn read(&self, paddr: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let err = OutOfRange {
            paddr,
            len: buf.len(),
        };
        let end = paddr.checked_add(buf.len() as u64).ok_or(err)?;
        if paddr == 0 || end > LIMIT {
            return Err(err);
        }
        buf.copy_from_slice(self.bytes(paddr, buf.len()));
        Ok(())
    }
}
