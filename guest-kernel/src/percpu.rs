//! Per-CPU data reached through the GS base: `gs:[0]` holds the block's own address.

use alloc::boxed::Box;
use core::arch::asm;
use core::fmt;
use x86_64::registers::model_specific::GsBase;
use x86_64::VirtAddr;

use crate::arch::gdt::Selectors;

#[repr(C)]
pub struct PerCpu {
    /// Must stay first: `this()` loads it from `gs:[0]`.
    self_ptr: *const PerCpu,
    /// x2APIC ID, which is also this CPU's index in the shared region.
    pub id: u32,
    pub selectors: Selectors,
}

// SAFETY: a PerCpu is written once before GS points at it and then only read.
unsafe impl Sync for PerCpu {}

/// Creates the calling CPU's block and points GS at it.
pub fn init_this_cpu(id: u32, selectors: Selectors) {
    let block = Box::leak(Box::new(PerCpu {
        self_ptr: core::ptr::null(),
        id,
        selectors,
    }));
    block.self_ptr = block;
    GsBase::write(VirtAddr::from_ptr(block));
}

/// The calling CPU's block. Must not be called before `init_this_cpu` on this CPU.
pub fn this() -> &'static PerCpu {
    let p: *const PerCpu;
    // SAFETY: GS base points at this CPU's leaked PerCpu, whose first field is its address.
    unsafe { asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags)) };
    // SAFETY: the block is leaked ('static) and never mutated after init.
    unsafe { &*p }
}

/// Whether the GS base MSR holds the address `gs:[0]` claims (the block points at itself).
pub fn gs_points_at_this() -> bool {
    GsBase::read().as_u64() == this() as *const PerCpu as u64
}

/// The calling CPU's id (fast path; per-CPU data must be set up).
pub fn id() -> u32 {
    this().id
}

/// The calling CPU's id for messages that may come before per-CPU set-up (panics).
pub struct CpuLabel;

impl fmt::Display for CpuLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if GsBase::read().as_u64() == 0 {
            f.write_str("?")
        } else {
            write!(f, "{}", id())
        }
    }
}
