//! Per-CPU GDT and TSS. Each CPU gets its own pair (a TSS cannot be shared: loading it marks
//! its descriptor busy), with an interrupt stack for double faults.

use alloc::boxed::Box;
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

/// Builds and loads a GDT and TSS for the calling CPU. Both live for the kernel's lifetime.
pub fn init_this_cpu() -> Selectors {
    let ist_stack: &'static mut [u8] =
        Box::leak(alloc::vec![0u8; IST_STACK_SIZE].into_boxed_slice());
    let ist_top = VirtAddr::from_ptr(ist_stack.as_ptr_range().end).align_down(16u64);

    // The TSS stays reachable only through this raw pointer: the scheduler rewrites RSP0 on
    // every switch, so no shared reference to it may live.
    let tss_ptr: *mut TaskStateSegment = Box::into_raw(Box::new(TaskStateSegment::new()));
    // SAFETY: freshly allocated and leaked; no other reference exists.
    unsafe { (*tss_ptr).interrupt_stack_table[DOUBLE_FAULT_IST_INDEX as usize] = ist_top };

    let gdt: &'static mut GlobalDescriptorTable = Box::leak(Box::new(GlobalDescriptorTable::new()));
    let kernel_code = gdt.append(Descriptor::kernel_code_segment());
    let kernel_data = gdt.append(Descriptor::kernel_data_segment());
    // User data then user code, at 0x18 and 0x20: user_entry.S builds its iret frame with
    // these selectors (RPL 3).
    gdt.append(Descriptor::user_data_segment());
    gdt.append(Descriptor::user_code_segment());
    // SAFETY: the TSS is leaked (lives forever) and is only written through `tss_ptr`, at
    // fields the CPU reads on privilege changes.
    let tss = gdt.append(unsafe { Descriptor::tss_segment_unchecked(tss_ptr) });
    let selectors = Selectors {
        kernel_code,
        kernel_data,
        tss,
        tss_ptr,
    };
    let gdt: &'static GlobalDescriptorTable = gdt;
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which lives forever;
    // the code and data segments are flat 64-bit kernel segments, so reloading them does not
    // change how any live address is interpreted.
    unsafe {
        CS::set_reg(selectors.kernel_code);
        DS::set_reg(selectors.kernel_data);
        ES::set_reg(selectors.kernel_data);
        SS::set_reg(selectors.kernel_data);
        load_tss(selectors.tss);
    }
    selectors
}
