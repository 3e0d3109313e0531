//! The kernel's page tables: identity maps of low memory (page 0 left out, so a null
//! dereference faults) and of every RAM/ACPI region of the memory map, with 2 MiB pages where
//! alignment allows. Replaces the boot tables, which mapped all of the first 4 GiB.

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, PageTable, PageTableFlags as F, PhysFrame, Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use super::frame::{self, GlobalFrames, FRAME_SIZE};
use crate::bootinfo::{MemRegion, E820_ACPI, E820_NVS, E820_RAM};

const HUGE: u64 = 2 * 1024 * 1024;
const LOW_MEMORY_END: u64 = 0x10_0000;

/// Physical address of the kernel PML4 (what APs load into CR3).
static KERNEL_PML4: AtomicU64 = AtomicU64::new(0);

/// The kernel PML4's physical address.
pub fn kernel_pml4() -> u64 {
    KERNEL_PML4.load(Ordering::Acquire)
}

/// A mapper over the active tables (identity: physical = virtual).
///
/// # Safety
/// The caller must not create two live mappers over the same tables at once.
pub unsafe fn active_mapper() -> OffsetPageTable<'static> {
    let (l4, _) = Cr3::read();
    // SAFETY: the PML4 is identity-mapped RAM owned by the kernel; exclusivity is the
    // caller's contract.
    unsafe {
        let table = &mut *(l4.start_address().as_u64() as *mut PageTable);
        OffsetPageTable::new(table, VirtAddr::new(0))
    }
}

fn identity_map(mapper: &mut OffsetPageTable, start: u64, end: u64, flags: F) {
    let mut a = start & !(FRAME_SIZE - 1);
    while a < end {
        if a.is_multiple_of(HUGE) && a + HUGE <= end {
            let f = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(a));
            // SAFETY: an identity map of RAM or firmware tables, into tables that are not
            // active yet, so no live translation changes.
            unsafe { mapper.identity_map(f, flags | F::HUGE_PAGE, &mut GlobalFrames) }
                .expect("identity map 2 MiB")
                .ignore();
            a += HUGE;
        } else {
            let f = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(a));
            // SAFETY: as above, for a 4 KiB page.
            unsafe { mapper.identity_map(f, flags, &mut GlobalFrames) }
                .expect("identity map 4 KiB")
                .ignore();
            a += FRAME_SIZE;
        }
    }
}

pub fn init(regions: &[MemRegion]) {
    let l4 = frame::alloc().expect("out of memory for the kernel PML4");
    let l4_addr = l4.start_address().as_u64();
    // SAFETY: a fresh frame, identity-mapped by the boot tables, used by nothing else.
    let table = unsafe {
        core::ptr::write_bytes(l4_addr as *mut u8, 0, FRAME_SIZE as usize);
        &mut *(l4_addr as *mut PageTable)
    };
    // SAFETY: the offset is 0 because every table frame is identity-mapped.
    let mut mapper = unsafe { OffsetPageTable::new(table, VirtAddr::new(0)) };
    let rw = F::PRESENT | F::WRITABLE;

    identity_map(&mut mapper, FRAME_SIZE, LOW_MEMORY_END, rw);
    for r in regions
        .iter()
        .filter(|r| matches!(r.kind, E820_RAM | E820_ACPI | E820_NVS))
    {
        let start = r.start.max(LOW_MEMORY_END);
        if start < r.end() {
            identity_map(&mut mapper, start, r.end(), rw);
        }
    }
    KERNEL_PML4.store(l4_addr, Ordering::Release);
    // SAFETY: the new tables map the kernel image, its stack and heap, and every frame the
    // allocator can hand out exactly as the boot tables did.
    unsafe { Cr3::write(l4, Cr3Flags::empty()) };
}
