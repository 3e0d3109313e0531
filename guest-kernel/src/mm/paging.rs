//! The kernel's page tables: identity maps of low memory (page 0 left out, so a null
//! dereference faults) and of every RAM/ACPI region of the memory map, with 2 MiB pages where
//! alignment allows. Replaces the boot tables, which mapped all of the first 4 GiB.

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageTable, PageTableFlags as F, PhysFrame, Size2MiB, Size4KiB,
    Translate,
};
use x86_64::{PhysAddr, VirtAddr};

use super::frame::{self, GlobalFrames, FRAME_SIZE};
use crate::arch::bootmem::BootMemory;
use crate::bootinfo::{MemRegion, E820_ACPI, E820_NVS, E820_RAM};
use crate::locks::{KernelLock, SpinLock};

const HUGE: u64 = 2 * 1024 * 1024;
const LOW_MEMORY_END: u64 = 0x10_0000;

/// Physical address of the kernel PML4 (what APs load into CR3).
static KERNEL_PML4: AtomicU64 = AtomicU64::new(0);

/// The kernel PML4's physical address.
pub fn kernel_pml4() -> u64 {
    KERNEL_PML4.load(Ordering::Acquire)
}

/// Serialises changes to the active kernel tables after `init` (`check_map_unmap`).
static ACTIVE_TABLES: KernelLock<()> = SpinLock::kernel(());

/// A mapper over the active tables (identity: physical = virtual).
///
/// # Safety
/// The caller must not create two live mappers over the same tables at once.
unsafe fn active_mapper() -> OffsetPageTable<'static> {
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

/// Builds the kernel's tables and switches to them. Takes the boot-memory token: no view
/// through the boot tables may outlive them.
pub(super) fn init(regions: &[MemRegion], _boot_tables: BootMemory) {
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
    let (start, end) = crate::arch::user::image();
    expose_user_image(start, end);
}

/// Makes the user image (`arch::user::image()`: the pages of the user programs' code and
/// read-only data, linker.ld) readable and executable by user mode at the addresses it is
/// linked at, and read-only for everyone: its identity-map entries get USER and lose
/// WRITABLE, and the entries above them get USER (which grants nothing by itself: every
/// other leaf stays supervisor-only). User address spaces share slot 0 of the kernel PML4,
/// so this holds in all of them. Called once by `init` on the boot CPU, before any other
/// CPU or address space exists. Panics if the image is not mapped with 4 KiB pages.
fn expose_user_image(start: u64, end: u64) {
    let l4 = KERNEL_PML4.load(Ordering::Acquire) as *mut PageTable;
    for va in (start..end).step_by(FRAME_SIZE as usize) {
        let v = VirtAddr::new(va);
        let mut table = l4;
        for index in [v.p4_index(), v.p3_index(), v.p2_index()] {
            // SAFETY: the kernel's tables, identity-mapped; only this CPU runs and nothing
            // else walks or changes them yet.
            let e = unsafe { &mut (&mut *table)[index] };
            assert!(
                e.flags().contains(F::PRESENT) && !e.flags().contains(F::HUGE_PAGE),
                "user image at {va:#x} is not mapped with 4 KiB pages"
            );
            let (addr, flags) = (e.addr(), e.flags());
            e.set_addr(addr, flags | F::USER_ACCESSIBLE);
            table = addr.as_u64() as *mut PageTable;
        }
        // SAFETY: as above.
        let e = unsafe { &mut (&mut *table)[v.p1_index()] };
        assert!(
            e.flags().contains(F::PRESENT),
            "user image page {va:#x} not mapped"
        );
        e.set_addr(PhysAddr::new(va), F::PRESENT | F::USER_ACCESSIBLE);
    }
    // Drop the old translations (only this CPU ran with them).
    let (frame, flags) = Cr3::read();
    // SAFETY: reloading the current tables changes no mapping but the ones just made.
    unsafe { Cr3::write(frame, flags) };
}

/// The self-test of the kernel's tables (`test=selftest`, "paging"): maps a fresh frame at
/// the unused kernel address `va` in the active tables, checks that a write through the
/// mapping shows through the frame's identity map, unmaps and frees it, and checks that
/// neither `va` nor page 0 translates (so null dereferences fault).
pub fn check_map_unmap(va: u64) -> Result<(), &'static str> {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va));
    let frame = frame::alloc().ok_or("no frame")?;
    let _g = ACTIVE_TABLES.lock();
    // SAFETY: the only mapper over the active tables after `init`, under their lock.
    let mut mapper = unsafe { active_mapper() };
    // SAFETY: `va` is unmapped (or map_to fails) and the frame is fresh, so no existing
    // reference is affected.
    unsafe { mapper.map_to(page, frame, F::PRESENT | F::WRITABLE, &mut GlobalFrames) }
        .map_err(|_| "map_to failed")?
        .flush();
    // SAFETY: the page was just mapped to `frame`, which is identity-mapped too; nobody else
    // knows either address.
    let (via_page, via_frame) = unsafe {
        core::ptr::write_volatile(va as *mut u64, 0x5eed_cafe);
        (
            core::ptr::read_volatile(va as *const u64),
            core::ptr::read_volatile(frame.start_address().as_u64() as *const u64),
        )
    };
    if via_page != 0x5eed_cafe || via_frame != 0x5eed_cafe {
        return Err("write through the new mapping not visible");
    }
    let (f, flush) = mapper.unmap(page).map_err(|_| "unmap failed")?;
    flush.flush();
    // SAFETY: the frame is no longer mapped at `va` (flushed on this CPU; the address was
    // never used anywhere else) and nothing else refers to it.
    unsafe { frame::free(f) };
    if mapper.translate_addr(VirtAddr::new(va)).is_some() {
        return Err("page still translates after unmap");
    }
    if mapper.translate_addr(VirtAddr::new(0)).is_some() {
        return Err("page 0 is mapped: null dereferences would not fault");
    }
    Ok(())
}
