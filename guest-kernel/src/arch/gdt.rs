//! Per-CPU GDT and TSS. Each CPU gets its own pair (a TSS cannot be shared: loading it marks
//! its descriptor busy), with an interrupt stack for double faults.

use alloc::boxed::Box;
use core::mem::MaybeUninit;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot used by the double-fault handler.
pub const DOUBLE_FAULT_IST_INDEX: u16 = 0;
const IST_STACK_SIZE: usize = 16 * 1024;

/// Selectors of the current CPU's GDT. The user segments follow the kernel ones in the
/// order SYSRET requires (user data, then user code).
#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    pub kernel_code: SegmentSelector,
    pub kernel_data: SegmentSelector,
    pub tss: SegmentSelector,
    /// This CPU's TSS (RSP0 changes on every switch to a user task).
    pub tss_ptr: *mut TaskStateSegment,
}

/// A CPU's GDT and TSS (with its double-fault stack), built but not loaded. They live for
/// the kernel's lifetime. The boot CPU builds every AP's before it starts them: hundreds of
/// APs allocating at once would queue on the heap lock, one after the other.
pub struct CpuTables {
    gdt: &'static GlobalDescriptorTable,
    selectors: Selectors,
}

// SAFETY: the tables are leaked and never freed; the TSS behind `selectors.tss_ptr` is
// written only by the CPU that loads the tables (`load`, then through `tss_ptr` on that
// CPU), and loaded by one CPU only (the caller's contract in `load`).
unsafe impl Send for CpuTables {}
// SAFETY: as above; a shared `CpuTables` only hands out copies of addresses.
unsafe impl Sync for CpuTables {}

/// Builds and loads a GDT and TSS for the calling CPU. Both live for the kernel's lifetime.
pub fn init_this_cpu() -> Selectors {
    CpuTables::build().load()
}

impl CpuTables {
    /// Allocates and fills a GDT and TSS for one CPU.
    pub fn build() -> Self {
        // Not zeroed: a stack needs no initial contents, and the boot CPU, building these
        // for every AP, would otherwise touch four fresh pages per AP.
        let ist_stack: &'static mut [MaybeUninit<u8>] =
            Box::leak(Box::new_uninit_slice(IST_STACK_SIZE));
        let ist_top = VirtAddr::from_ptr(ist_stack.as_ptr_range().end).align_down(16u64);

        // The TSS stays reachable only through this raw pointer: the scheduler rewrites RSP0
        // on every switch, so no shared reference to it may live.
        let tss_ptr: *mut TaskStateSegment = Box::into_raw(Box::new(TaskStateSegment::new()));
        // SAFETY: freshly allocated and leaked; no other reference exists.
        unsafe { (*tss_ptr).interrupt_stack_table[DOUBLE_FAULT_IST_INDEX as usize] = ist_top };

        let gdt: &'static mut GlobalDescriptorTable =
            Box::leak(Box::new(GlobalDescriptorTable::new()));
        let kernel_code = gdt.append(Descriptor::kernel_code_segment());
        let kernel_data = gdt.append(Descriptor::kernel_data_segment());
        // User data then user code, at 0x18 and 0x20: user_entry.S builds its iret frame
        // with these selectors (RPL 3).
        gdt.append(Descriptor::user_data_segment());
        gdt.append(Descriptor::user_code_segment());
        // SAFETY: the TSS is leaked (lives forever) and is only written through `tss_ptr`,
        // at fields the CPU reads on privilege changes.
        let tss = gdt.append(unsafe { Descriptor::tss_segment_unchecked(tss_ptr) });
        let selectors = Selectors {
            kernel_code,
            kernel_data,
            tss,
            tss_ptr,
        };
        CpuTables { gdt, selectors }
    }

    /// Loads the tables on the calling CPU. Each `CpuTables` is for one CPU: loading the TSS
    /// marks its descriptor busy, so a second CPU loading it faults (#GP).
    pub fn load(&self) -> Selectors {
        let (gdt, selectors) = (self.gdt, self.selectors);
        gdt.load();
        // SAFETY: the selectors index descriptors of the GDT just loaded, which lives
        // forever; the code and data segments are flat 64-bit kernel segments, so reloading
        // them does not change how any live address is interpreted.
        unsafe {
            CS::set_reg(selectors.kernel_code);
            DS::set_reg(selectors.kernel_data);
            ES::set_reg(selectors.kernel_data);
            SS::set_reg(selectors.kernel_data);
            load_tss(selectors.tss);
        }
        selectors
    }
}
