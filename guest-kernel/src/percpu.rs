//! Per-CPU data reached through the GS base: `gs:[0]` holds the block's own address.
//!
//! The blocks are static, one per possible CPU, and each CPU points GS at its own as the
//! very first thing it does in Rust, before it prints, allocates or takes a lock. So every
//! lock (console, heap, frames included) can count itself in the per-CPU preemption and
//! lock counts from the start; only the panic path must cope with a CPU that has not got
//! that far (see [`ready`]).

use core::arch::asm;
use core::cell::Cell;
use core::fmt;
use core::ptr::{addr_of_mut, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};
use pvsync_guest::{AtomicCpuSet, CpuSet, CpuSync, NR_CPUS};
use x86_64::registers::model_specific::GsBase;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

#[repr(C)]
pub struct PerCpu {
    /// Must stay first: `this()` loads it from `gs:[0]`.
    self_ptr: Cell<*const PerCpu>,
    /// x2APIC ID, which is also this CPU's index in the shared region.
    id: Cell<u32>,
    preempt_count: Cell<u32>,
    /// This CPU's TSS (RSP0 changes on every switch to a user task).
    tss: Cell<*mut TaskStateSegment>,
    /// What the synchronization crate keeps per CPU (where the CPU publishes, its lock
    /// count, its queued-lock nodes).
    sync: CpuSync,
}

// SAFETY: a PerCpu is only ever used by the CPU whose GS base points at it (the Cells are
// CPU-local state; interrupt handlers that touch them restore what they change).
unsafe impl Sync for PerCpu {}

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            self_ptr: Cell::new(core::ptr::null()),
            id: Cell::new(0),
            preempt_count: Cell::new(0),
            tss: Cell::new(core::ptr::null_mut()),
            sync: CpuSync::new(),
        }
    }
}

static BLOCKS: [PerCpu; NR_CPUS] = [const { PerCpu::new() }; NR_CPUS];

/// CPUs that have finished bring-up (`smp` marks them); the platform reads it to send one
/// all-but-self IPI where a broadcast names every other online CPU.
static ONLINE: AtomicCpuSet = AtomicCpuSet::new();

/// Points GS at CPU `id`'s block (`id`: CPUID's initial APIC ID, readable before the
/// x2APIC is on). First Rust code on every CPU: nothing before it may take a lock.
pub fn init_this_cpu(id: u32) {
    let Some(block) = BLOCKS.get(id as usize) else {
        panic!("APIC ID {id} is beyond this kernel's NR_CPUS ({NR_CPUS})");
    };
    block.self_ptr.set(block);
    block.id.set(id);
    block.sync.init(id);
    GsBase::write(VirtAddr::from_ptr(block));
}

/// Counts CPU `id` online (it has finished bring-up).
pub fn mark_online(id: u32) {
    ONLINE.insert(id);
}

/// The CPUs online now.
pub fn online() -> CpuSet {
    ONLINE.load()
}

/// Whether `cpus` is exactly every online CPU but the caller: an all-but-self IPI then
/// reaches exactly them (CPUs of the VM never started, `smp=N`, have their local APIC
/// software-disabled, which drops fixed interrupts).
pub fn is_every_other_online(cpus: &CpuSet) -> bool {
    let me = id();
    !cpus.contains(me) && ONLINE.equals_with(cpus, me)
}

/// Records this CPU's TSS (set up after the block, since building it allocates).
pub fn set_tss(tss: *mut TaskStateSegment) {
    this().tss.set(tss);
}

/// The calling CPU's block. Must not be called before `init_this_cpu` on this CPU.
#[inline]
pub fn this() -> &'static PerCpu {
    let p: *const PerCpu;
    // SAFETY: GS base points at this CPU's static PerCpu, whose first field is its address.
    // `pure`: the value never changes for the running code (tasks never migrate; the GS
    // write in init_this_cpu clobbers memory, so no load is moved across it).
    unsafe {
        asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, pure, preserves_flags))
    };
    // SAFETY: the blocks are static.
    unsafe { &*p }
}

/// Whether this CPU has set up its block (panic path only: reads an MSR, which exits).
pub fn ready() -> bool {
    GsBase::read().as_u64() != 0
}

/// Whether the GS base MSR holds the address `gs:[0]` claims (the block points at itself).
pub fn gs_points_at_this() -> bool {
    GsBase::read().as_u64() == this() as *const PerCpu as u64
}

/// The calling CPU's id (fast path; per-CPU data must be set up).
#[inline]
pub fn id() -> u32 {
    this().id()
}

/// Sets the kernel stack used on entry from user mode (TSS.RSP0).
pub fn set_kernel_stack(top: u64) {
    let tss = this().tss.get();
    // SAFETY: the TSS is this CPU's, leaked by gdt::init_this_cpu and reachable only through
    // this pointer; RSP0 is read by the CPU only on a privilege change, which cannot happen
    // while we run here with it.
    unsafe {
        write_volatile(
            addr_of_mut!((*tss).privilege_stack_table[0]),
            VirtAddr::new(top),
        )
    };
}

/// Current preempt-disable depth.
#[inline]
pub fn preempt_count() -> u32 {
    this().preempt_count.get()
}

/// Disables preemption (nests); published to the host with one store.
#[inline]
pub fn preempt_disable() {
    this().preempt_disable();
}

/// Re-enables preemption; switches at once if a reschedule became due meanwhile (a wake-up
/// of a task at the head of the queue, a used-up slice) and interrupts are on.
#[inline]
pub fn preempt_enable() {
    this().preempt_enable();
}

/// The methods take the block the caller already has, so that a hot path (a lock, an RCU
/// reader) reads `gs:[0]` once.
impl PerCpu {
    /// x2APIC ID, which is also this CPU's index in the shared region.
    #[inline]
    pub fn id(&self) -> u32 {
        self.id.get()
    }

    /// The synchronization crate's state for this CPU.
    #[inline]
    pub fn sync(&self) -> &CpuSync {
        &self.sync
    }

    /// See [`preempt_disable`].
    #[inline]
    pub fn preempt_disable(&self) {
        let v = self.preempt_count.get().wrapping_add(1);
        self.preempt_count.set(v);
        // SAFETY: `self` is the calling CPU's block (reached through its GS base).
        unsafe { self.sync.publish_preempt_count(v) };
        // The section's accesses stay after the count that protects them (an interrupt
        // reads it to decide whether it may switch tasks).
        compiler_fence(Ordering::SeqCst);
    }

    /// See [`preempt_enable`].
    #[inline]
    pub fn preempt_enable(&self) {
        compiler_fence(Ordering::SeqCst);
        let v = self
            .preempt_count
            .get()
            .checked_sub(1)
            .expect("preempt_enable without preempt_disable");
        self.preempt_count.set(v);
        // SAFETY: `self` is the calling CPU's block (reached through its GS base).
        unsafe { self.sync.publish_preempt_count(v) };
        if v == 0 {
            crate::preempt::preempt_point(self.id());
        }
    }
}

/// The calling CPU's id for messages that may come before per-CPU set-up (panics).
pub struct CpuLabel;

impl fmt::Display for CpuLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if ready() {
            write!(f, "{}", id())
        } else {
            f.write_str("?")
        }
    }
}
