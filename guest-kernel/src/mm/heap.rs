//! The kernel heap: a fixed block of contiguous frames behind a locked linked-list allocator.
//! Interrupt handlers allocate (waking a task queues it), so the lock is taken with
//! interrupts off: an interrupt can never spin on a lock its own CPU holds.

use core::alloc::{GlobalAlloc, Layout};
use linked_list_allocator::LockedHeap;
use x86_64::instructions::interrupts::without_interrupts;

use super::frame::{self, FRAME_SIZE};

/// 4 MiB, or an eighth of usable memory on a small VM.
const HEAP_MAX_FRAMES: u64 = 1024;

struct IrqSafeHeap(LockedHeap);

// SAFETY: forwards to LockedHeap, which is a correct allocator; disabling interrupts around
// each call changes no allocation semantics.
unsafe impl GlobalAlloc for IrqSafeHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        without_interrupts(|| unsafe { self.0.alloc(layout) })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        without_interrupts(|| unsafe { self.0.dealloc(ptr, layout) })
    }
}

#[global_allocator]
static HEAP: IrqSafeHeap = IrqSafeHeap(LockedHeap::empty());

pub fn init() {
    let (total, _) = frame::stats();
    let frames = HEAP_MAX_FRAMES.min(total / 8).max(16);
    let start = frame::alloc_contiguous_or_panic(frames, "the kernel heap");
    // SAFETY: the frames were just taken from the allocator, are identity-mapped RAM used by
    // nothing else, and init is called once, before the first allocation.
    unsafe {
        HEAP.0
            .lock()
            .init(start as *mut u8, (frames * FRAME_SIZE) as usize)
    };
}
