//! The kernel heap: one block of contiguous frames behind a kernel lock and a linked-list
//! allocator, sized at boot from the RAM and the CPU count (see [`size`]). Interrupt handlers
//! allocate (waking a task queues it), so the lock is taken with interrupts off: an interrupt
//! can never spin on a lock its own CPU holds.
//!
//! What takes heap: every task's 32 KiB kernel stack (the boot CPU's idle task, one RCU
//! callback kthread per CPU, every worker a suite starts), each CPU's 16 KiB double-fault
//! stack, GDT and TSS, task structs, run and wait queues, RCU callbacks. Page tables, AP boot
//! stacks, the shared region and user pages take frames outside the heap.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use linked_list_allocator::Heap;

use super::frame::{self, FRAME_SIZE};
use crate::locks::{KernelLock, SpinLock};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Heap a task takes: its 32 KiB kernel stack, plus the task itself, its entry closure and
/// its run-queue slot, rounded up. Defined here, below the scheduler, because the heap is
/// sized by it; the scheduler checks at compile time that its stack size fits.
pub const TASK_HEAP_BYTES: u64 = 33 * KIB;

/// Heap the kernel takes for itself whatever the CPU count (console, RCU state, the boot
/// CPU's idle task, slack).
const BASE_BYTES: u64 = MIB;
/// Heap the kernel takes per CPU at boot: the RCU callback kthread (a kernel stack and its
/// task), the double-fault stack, GDT, TSS, run-queue slots, with slack.
pub const BOOT_BYTES_PER_CPU: u64 = TASK_HEAP_BYTES + 32 * KIB;
/// Heap per CPU that the default-size suites need on top: two worker threads per CPU
/// (`threads=` defaults to two per CPU), and an rcuflood's 1000 queued callbacks.
const SUITE_BYTES_PER_CPU: u64 = 2 * TASK_HEAP_BYTES + 128 * KIB;
/// Frames kept outside the heap: page tables, the shared region, user pages ...
const FRAMES_KEPT_BYTES: u64 = 2 * MIB;
/// ... and per CPU its AP boot stack (32 KiB), with room for user stacks and page tables.
const FRAMES_KEPT_PER_CPU: u64 = 64 * KIB;

/// The heap for `ncpus` CPUs out of `total` free frames, `contiguous` of them in one run:
/// a quarter of RAM, but at least what the kernel and the default-size suites need for
/// `ncpus` CPUs (`BASE + ncpus * (boot + suites)`: 17 MiB for 64 CPUs), and at most what
/// leaves the frames the rest of the kernel takes. Err(the bytes of free RAM the kernel
/// needs to boot that many: its heap and the frames it keeps) when even that does not fit.
pub fn size(total: u64, contiguous: u64, ncpus: u64) -> Result<u64, u64> {
    let boot_need = BASE_BYTES + ncpus * BOOT_BYTES_PER_CPU;
    let floor = boot_need + ncpus * SUITE_BYTES_PER_CPU;
    let kept = FRAMES_KEPT_BYTES + ncpus * FRAMES_KEPT_PER_CPU;
    let room = (total * FRAME_SIZE)
        .saturating_sub(kept)
        .min(contiguous * FRAME_SIZE);
    let bytes = ((total * FRAME_SIZE) / 4).max(floor).min(room);
    if bytes < boot_need {
        return Err(boot_need + kept);
    }
    Ok(bytes / FRAME_SIZE)
}

struct LockedHeap(KernelLock<Heap>);

// SAFETY: forwards to linked_list_allocator's Heap, a correct allocator, under a lock that
// serialises every use; the locking changes no allocation semantics.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .lock_irqsave()
            .allocate_first_fit(layout)
            .map_or(core::ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: per GlobalAlloc's contract `ptr` came from `alloc` with this layout, so it
        // is non-null and Heap::deallocate's contract holds.
        unsafe {
            self.0
                .lock_irqsave()
                .deallocate(NonNull::new_unchecked(ptr), layout)
        }
    }
}

#[global_allocator]
static HEAP: LockedHeap = LockedHeap(SpinLock::kernel(Heap::empty()));

/// Sets the heap up for `ncpus` CPUs (see [`size`]) out of a VM with `ram_bytes` of RAM; a
/// VM too small to boot that many ends with how much memory it needs, before anything
/// could fail to allocate.
pub fn init(ncpus: usize, ram_bytes: u64) {
    let (total, _) = frame::stats();
    let free = total * FRAME_SIZE;
    let frames = size(total, frame::largest_run(), ncpus as u64).unwrap_or_else(|need| {
        // RAM the frame allocator never gets (low memory, the kernel image) comes on top.
        let least = ram_bytes.saturating_sub(free) + need;
        crate::panic::fail(format_args!(
            "VM too small for {ncpus} CPUs: give at least {} MiB (--mem); the kernel needs {} KiB of free RAM for them, {} KiB are free",
            least.div_ceil(MIB),
            need / KIB,
            free / KIB
        ))
    });
    let start = frame::alloc_contiguous_or_panic(frames, "the kernel heap");
    // SAFETY: the frames were just taken from the allocator, are identity-mapped RAM used by
    // nothing else, and init is called once, before the first allocation.
    unsafe {
        HEAP.0
            .lock_irqsave()
            .init(start as *mut u8, (frames * FRAME_SIZE) as usize)
    };
}

/// (heap size, bytes free) now.
pub fn stats() -> (u64, u64) {
    let h = HEAP.0.lock_irqsave();
    (h.size() as u64, h.free() as u64)
}
