//! The kernel heap: a fixed block of contiguous frames behind a kernel lock and a linked-list
//! allocator. Interrupt handlers allocate (waking a task queues it), so the lock is taken
//! with interrupts off: an interrupt can never spin on a lock its own CPU holds.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use linked_list_allocator::Heap;

use super::frame::{self, FRAME_SIZE};
use crate::locks::{KernelLock, SpinLock};

/// 4 MiB, or an eighth of usable memory on a small VM.
const HEAP_MAX_FRAMES: u64 = 1024;

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

pub fn init() {
    let (total, _) = frame::stats();
    let frames = HEAP_MAX_FRAMES.min(total / 8).max(16);
    let start = frame::alloc_contiguous_or_panic(frames, "the kernel heap");
    // SAFETY: the frames were just taken from the allocator, are identity-mapped RAM used by
    // nothing else, and init is called once, before the first allocation.
    unsafe {
        HEAP.0
            .lock_irqsave()
            .init(start as *mut u8, (frames * FRAME_SIZE) as usize)
    };
}
