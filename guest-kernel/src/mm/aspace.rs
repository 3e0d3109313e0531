//! User address spaces: a PML4 of their own whose kernel half (the identity map in slot 0)
//! is shared with the kernel's tables, plus the set of CPUs that may cache its translations.
//!
//! Below the TLB-shootdown layer, which uses this set: [`switch`] tells it about every CR3
//! load through a hook (`set_cr3_reload_hook`, installed by `main` with
//! `tlb::note_cr3_reload`; default: nothing).

use pvsync_guest::{AtomicCpuSet, CpuSet};
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::page_table::PageTableEntry;
use x86_64::structures::paging::{
    mapper::TranslateResult, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags as F,
    PhysFrame, Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

use super::frame::{self, GlobalFrames, FRAME_SIZE};
use super::paging;
use crate::arch::hook::Hook;
use crate::locks::{KernelLock, SpinLock};
use crate::percpu;

/// Told about every CR3 load `switch` makes on the calling CPU.
static CR3_RELOAD: Hook<fn()> = Hook::new();

/// Installs what [`switch`] calls after each CR3 load (interrupts off, on the switching CPU).
pub fn set_cr3_reload_hook(f: fn()) {
    CR3_RELOAD.set(f);
}

/// Why [`AddressSpace::map_zeroed`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapZeroedError {
    /// No free frame.
    NoMemory,
    /// The page is mapped already (or a page table could not be allocated).
    Mapping,
}

/// User virtual addresses live in PML4 slots 1..256 (slot 0 is the kernel's identity map).
pub const USER_START: u64 = 0x0000_0080_0000_0000;
pub const USER_END: u64 = 0x0000_8000_0000_0000;

pub struct AddressSpace {
    pml4: PhysFrame,
    /// CPUs that have this address space loaded, so may hold its translations in their TLB.
    cpus: AtomicCpuSet,
    /// Serialises page-table changes (never taken by interrupt handlers).
    lock: KernelLock<()>,
}

impl AddressSpace {
    pub fn new() -> AddressSpace {
        let f = frame::alloc().expect("out of memory for a PML4");
        let kernel = paging::kernel_pml4();
        // SAFETY: a fresh identity-mapped frame; the kernel PML4 is live and only read.
        unsafe {
            let dst = f.start_address().as_u64() as *mut PageTable;
            core::ptr::write_bytes(dst as *mut u8, 0, FRAME_SIZE as usize);
            let src = &*(kernel as *const PageTable);
            (&mut *dst)[0] = src[0].clone();
        }
        AddressSpace {
            pml4: f,
            cpus: AtomicCpuSet::new(),
            lock: SpinLock::kernel(()),
        }
    }

    /// The CPUs that have the space loaded now.
    pub fn cpus(&self) -> CpuSet {
        self.cpus.load()
    }

    /// The set itself, which CPUs join and leave concurrently (for shootdowns).
    pub fn cpu_set(&self) -> &AtomicCpuSet {
        &self.cpus
    }

    /// A mapper over this space's tables. Callers hold `lock`.
    ///
    /// # Safety
    /// No other mapper over these tables may be live.
    unsafe fn mapper(&self) -> OffsetPageTable<'static> {
        // SAFETY: identity-mapped table frame owned by this space; exclusivity per contract.
        unsafe {
            OffsetPageTable::new(
                &mut *(self.pml4.start_address().as_u64() as *mut PageTable),
                VirtAddr::new(0),
            )
        }
    }

    fn page(va: u64) -> Page<Size4KiB> {
        assert!(
            (USER_START..USER_END).contains(&va),
            "{va:#x} is not a user address"
        );
        Page::containing_address(VirtAddr::new(va))
    }

    /// Maps `va` to `frame` with user access. No flush needed: the page was not mapped.
    pub fn map(
        &self,
        va: u64,
        frame: PhysFrame,
        writable: bool,
        executable: bool,
    ) -> Result<(), &'static str> {
        let _g = self.lock.lock();
        let mut flags = F::PRESENT | F::USER_ACCESSIBLE;
        if writable {
            flags |= F::WRITABLE;
        }
        if !executable {
            flags |= F::NO_EXECUTE;
        }
        // SAFETY: under the lock; mapping a previously unmapped user page changes no live
        // translation. Intermediate tables get USER because flags has it.
        unsafe {
            self.mapper()
                .map_to(Self::page(va), frame, flags, &mut GlobalFrames)
        }
        .map(|f| f.ignore())
        .map_err(|_| "page already mapped or out of memory")
    }

    /// Maps `frames` at consecutive pages from `va` (user access, never executable), under
    /// one lock hold. No flush needed: the pages were not mapped. On an error the pages
    /// mapped so far stay mapped.
    pub fn map_range(
        &self,
        va: u64,
        frames: &[PhysFrame],
        writable: bool,
    ) -> Result<(), &'static str> {
        let _g = self.lock.lock();
        let mut flags = F::PRESENT | F::USER_ACCESSIBLE | F::NO_EXECUTE;
        if writable {
            flags |= F::WRITABLE;
        }
        for (i, &f) in frames.iter().enumerate() {
            let page = Self::page(va + i as u64 * FRAME_SIZE);
            // SAFETY: under the lock; mapping a previously unmapped user page changes no live
            // translation.
            unsafe { self.mapper().map_to(page, f, flags, &mut GlobalFrames) }
                .map(|fl| fl.ignore())
                .map_err(|_| "page already mapped or out of memory")?;
        }
        Ok(())
    }

    /// Unmaps `pages` consecutive pages from `va` under one lock hold and appends their
    /// frames to `out`. The caller must shoot the range down on `cpus()` before reusing
    /// them. Stops at the first page that is not mapped (an error).
    pub fn unmap_range(
        &self,
        va: u64,
        pages: u64,
        out: &mut alloc::vec::Vec<PhysFrame>,
    ) -> Result<(), &'static str> {
        let _g = self.lock.lock();
        for i in 0..pages {
            let page = Self::page(va + i * FRAME_SIZE);
            // SAFETY: under the lock; the caller flushes TLBs before the frames are reused.
            let (f, fl) = unsafe { self.mapper() }
                .unmap(page)
                .map_err(|_| "page not mapped")?;
            fl.ignore();
            out.push(f);
        }
        Ok(())
    }

    /// Maps a fresh zeroed frame at `va` (user access, never executable) and returns its
    /// physical address. The frame then belongs to the mapping: whoever unmaps it frees it,
    /// once no CPU can still reach it.
    pub fn map_zeroed(&self, va: u64, writable: bool) -> Result<u64, MapZeroedError> {
        let f = frame::alloc().ok_or(MapZeroedError::NoMemory)?;
        let pa = f.start_address().as_u64();
        // SAFETY: a fresh, identity-mapped frame nobody else uses yet.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, FRAME_SIZE as usize) };
        match self.map(va, f, writable, false) {
            Ok(()) => Ok(pa),
            Err(_) => {
                // SAFETY: the frame was never mapped.
                unsafe { frame::free(f) };
                Err(MapZeroedError::Mapping)
            }
        }
    }

    /// The physical address behind user address `va` if it is mapped with user access.
    /// Callers hold `lock`.
    fn user_pa(&self, va: u64) -> Option<u64> {
        if !(USER_START..USER_END).contains(&va) {
            return None;
        }
        // SAFETY: the caller holds the lock; read-only use.
        match unsafe { self.mapper() }.translate(VirtAddr::new(va)) {
            TranslateResult::Mapped {
                frame,
                offset,
                flags,
            } if flags.contains(F::USER_ACCESSIBLE) => {
                Some((frame.start_address() + offset).as_u64())
            }
            _ => None,
        }
    }

    /// Reads the 8-byte word at user address `va` (8-byte aligned) with one volatile load,
    /// holding the lock so that the page cannot be unmapped and reused meanwhile. None if it
    /// is not mapped with user access.
    pub fn read_u64(&self, va: u64) -> Option<u64> {
        assert!(va.is_multiple_of(8), "unaligned user word {va:#x}");
        let _g = self.lock.lock();
        let pa = self.user_pa(va)?;
        // SAFETY: user memory (RAM mapped user-accessible in this space, which no Rust object
        // lives in), identity-mapped, aligned, and kept mapped by the lock.
        Some(unsafe { core::ptr::read_volatile(pa as *const u64) })
    }

    /// Writes the 8-byte word at user address `va` (8-byte aligned) with one volatile store,
    /// holding the lock. False if it is not mapped with user access (read-only pages are
    /// written too: this is the kernel writing).
    pub fn write_u64(&self, va: u64, v: u64) -> bool {
        assert!(va.is_multiple_of(8), "unaligned user word {va:#x}");
        let _g = self.lock.lock();
        let Some(pa) = self.user_pa(va) else {
            return false;
        };
        // SAFETY: as in `read_u64`.
        unsafe { core::ptr::write_volatile(pa as *mut u64, v) };
        true
    }

    /// The leaf entry for `va`, walking this space's tables. Callers hold `lock` while they
    /// use it.
    fn leaf(&self, va: u64) -> Option<*mut PageTableEntry> {
        let v = VirtAddr::new(va);
        let mut table = self.pml4.start_address().as_u64() as *const PageTable;
        for index in [v.p4_index(), v.p3_index(), v.p2_index()] {
            // SAFETY: page-table frames are identity-mapped and owned by this space; the
            // caller holds the lock, so nobody changes them under us.
            let e = unsafe { &(&*table)[index] };
            if !e.flags().contains(F::PRESENT) || e.flags().contains(F::HUGE_PAGE) {
                return None;
            }
            table = e.addr().as_u64() as *const PageTable;
        }
        // SAFETY: as above.
        let e = unsafe { &(&*table)[v.p1_index()] };
        e.flags()
            .contains(F::PRESENT)
            .then_some(e as *const PageTableEntry as *mut PageTableEntry)
    }

    /// Points `va` at `new` (writable or not) with one PTE store, or unmaps it (`None`), and
    /// returns the old frame. Readers see the old page or the new one, never a hole. The
    /// caller must shoot the page down on `cpus()` before reusing the old frame.
    pub fn update(
        &self,
        va: u64,
        new: Option<(PhysFrame, bool)>,
    ) -> Result<Option<PhysFrame>, &'static str> {
        let page = Self::page(va);
        let _g = self.lock.lock();
        match new {
            None => {
                // SAFETY: under the lock; the caller flushes TLBs before the frame is reused.
                let (f, fl) = unsafe { self.mapper() }
                    .unmap(page)
                    .map_err(|_| "page not mapped")?;
                fl.ignore();
                Ok(Some(f))
            }
            Some((frame, writable)) => {
                let e = self.leaf(va).ok_or("page not mapped")?;
                let mut flags = F::PRESENT | F::USER_ACCESSIBLE | F::NO_EXECUTE;
                if writable {
                    flags |= F::WRITABLE;
                }
                // SAFETY: the entry lives in a table frame of this space and we hold the
                // lock; set_addr is one aligned 8-byte store, so the MMU sees old or new.
                let old = unsafe {
                    let old = PhysFrame::containing_address((*e).addr());
                    (*e).set_addr(frame.start_address(), flags);
                    old
                };
                Ok(Some(old))
            }
        }
    }

    /// Changes only the writable bit of `va`.
    pub fn protect(&self, va: u64, writable: bool) -> Result<(), &'static str> {
        let _g = self.lock.lock();
        let mut flags = F::PRESENT | F::USER_ACCESSIBLE | F::NO_EXECUTE;
        if writable {
            flags |= F::WRITABLE;
        }
        // SAFETY: under the lock; the caller shoots the page down afterwards.
        unsafe { self.mapper().update_flags(Self::page(va), flags) }
            .map(|f| f.ignore())
            .map_err(|_| "page not mapped")
    }

    /// Copies `len` bytes at user address `va`, holding the lock so that no page can be
    /// unmapped and reused mid-copy. None if any byte is not user-readable.
    pub fn read_user(&self, va: u64, len: usize) -> Option<alloc::vec::Vec<u8>> {
        let _g = self.lock.lock();
        // SAFETY: under the lock; read-only use.
        let m = unsafe { self.mapper() };
        let mut out = alloc::vec::Vec::with_capacity(len);
        for a in va..va.checked_add(len as u64)? {
            if !(USER_START..USER_END).contains(&a) {
                return None;
            }
            match m.translate(VirtAddr::new(a)) {
                TranslateResult::Mapped {
                    frame,
                    offset,
                    flags,
                } if flags.contains(F::USER_ACCESSIBLE) => {
                    let pa = frame.start_address() + offset;
                    // SAFETY: RAM mapped user-readable in this space, identity-mapped, and
                    // kept mapped by the lock.
                    out.push(unsafe { core::ptr::read_volatile(pa.as_u64() as *const u8) });
                }
                _ => return None,
            }
        }
        Some(out)
    }
}

impl Default for AddressSpace {
    fn default() -> Self {
        Self::new()
    }
}

/// Switches from `prev`'s address space to `next`'s (None: kernel tables). The CPU joins
/// `next`'s set before loading it and leaves `prev`'s after, so a shootdown that reads the
/// set never misses a CPU that might cache a translation.
pub fn switch(
    prev: Option<&alloc::sync::Arc<AddressSpace>>,
    next: Option<&alloc::sync::Arc<AddressSpace>>,
) {
    let same = match (prev, next) {
        (Some(a), Some(b)) => alloc::sync::Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    if same {
        return;
    }
    let me = percpu::id();
    let frame = match next {
        Some(n) => {
            n.cpus.insert(me);
            n.pml4
        }
        None => PhysFrame::containing_address(PhysAddr::new(paging::kernel_pml4())),
    };
    // SAFETY: both table sets map the kernel identically (slot 0 is shared), so the kernel
    // code and stack running now stay mapped.
    unsafe { Cr3::write(frame, Cr3Flags::empty()) };
    if let Some(p) = prev {
        p.cpus.remove(me);
    }
    // Counted once out of `prev`'s set: whoever reads this CPU's count and then finds it
    // still in the set knows the count will move again (tlbtorture's evidence).
    if let Some(reloaded) = CR3_RELOAD.get() {
        reloaded();
    }
}
