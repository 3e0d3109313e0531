//! The kernel heap: a fixed block of contiguous frames behind a locked linked-list allocator.

use linked_list_allocator::LockedHeap;

use super::frame::{self, FRAME_SIZE};

/// 4 MiB, or an eighth of usable memory on a small VM.
const HEAP_MAX_FRAMES: u64 = 1024;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

pub fn init() {
    let (total, _) = frame::stats();
    let frames = HEAP_MAX_FRAMES.min(total / 8).max(16);
    let start = frame::alloc_contiguous_or_panic(frames, "the kernel heap");
    // SAFETY: the frames were just taken from the allocator, are identity-mapped RAM used by
    // nothing else, and init is called once, before the first allocation.
    unsafe {
        HEAP.lock()
            .init(start as *mut u8, (frames * FRAME_SIZE) as usize)
    };
}
