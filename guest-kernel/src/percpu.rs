//! Per-CPU data reached through the GS base: `gs:[0]` holds the block's own address.

use alloc::boxed::Box;
use core::arch::asm;
use core::cell::Cell;
use core::fmt;
use core::ptr::{addr_of_mut, write_volatile};
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
    preempt_count: Cell<u32>,
    /// Nesting of shared-record updates on this CPU (see shared::publish).
    publish_depth: Cell<u32>,
}

// SAFETY: a PerCpu is only ever used by the CPU whose GS base points at it (the Cells are
// CPU-local state; interrupt handlers that touch them restore what they change).
unsafe impl Sync for PerCpu {}

/// Creates the calling CPU's block and points GS at it.
pub fn init_this_cpu(id: u32, selectors: Selectors) {
    let block = Box::leak(Box::new(PerCpu {
        self_ptr: core::ptr::null(),
        id,
        selectors,
        preempt_count: Cell::new(0),
        publish_depth: Cell::new(0),
    }));
    block.self_ptr = block;
    GsBase::write(VirtAddr::from_ptr(block));
}

/// The calling CPU's block. Must not be called before `init_this_cpu` on this CPU.
pub fn this() -> &'static PerCpu {
    let p: *const PerCpu;
    // SAFETY: GS base points at this CPU's leaked PerCpu, whose first field is its address.
    unsafe { asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags)) };
    // SAFETY: the block is leaked ('static).
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

/// Sets the kernel stack used on entry from user mode (TSS.RSP0).
pub fn set_kernel_stack(top: u64) {
    let me = this();
    // SAFETY: the TSS is this CPU's, reachable only through this pointer; RSP0 is read by the
    // CPU only on a privilege change, which cannot happen while we run here with it.
    unsafe {
        write_volatile(
            addr_of_mut!((*me.selectors.tss_ptr).privilege_stack_table[0]),
            VirtAddr::new(top),
        )
    };
}

/// This CPU's shared-record update nesting counter.
pub fn publish_depth() -> &'static Cell<u32> {
    &this().publish_depth
}

/// Current preempt-disable depth.
pub fn preempt_count() -> u32 {
    this().preempt_count.get()
}

/// Disables preemption (nests); published to the host.
pub fn preempt_disable() {
    let c = &this().preempt_count;
    c.set(c.get() + 1);
    crate::shared::set_preempt_count(c.get());
}

/// Re-enables preemption; switches if a reschedule became due meanwhile.
pub fn preempt_enable() {
    let c = &this().preempt_count;
    let v = c
        .get()
        .checked_sub(1)
        .expect("preempt_enable without preempt_disable");
    c.set(v);
    crate::shared::set_preempt_count(v);
    if v == 0 && x86_64::instructions::interrupts::are_enabled() {
        crate::sched::preempt_on_interrupt_return();
    }
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
