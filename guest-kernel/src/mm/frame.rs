//! Physical frame allocator: bump allocation over the usable RAM regions above 1 MiB (the
//! kernel image carved out), plus a free list threaded through freed frames.

use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame, Size4KiB};
use x86_64::PhysAddr;

use crate::bootinfo::{MemRegion, E820_RAM};
use crate::locks::{KernelLock, SpinLock};

pub const FRAME_SIZE: u64 = 4096;
/// Below this, memory belongs to firmware, boot data and the AP trampoline.
const LOW_MEMORY_END: u64 = 0x10_0000;
/// The allocator hands out frames below 4 GiB only: the AP trampoline loads CR3 in 32-bit
/// mode and hypercalls pass 32-bit addresses.
const HIGH_LIMIT: u64 = 1 << 32;
const MAX_RANGES: usize = 32;

struct Frames {
    ranges: [(u64, u64); MAX_RANGES],
    nranges: usize,
    cursor: usize,
    next: u64,
    free_head: u64,
    total: u64,
    in_use: u64,
}

/// No interrupt handler allocates frames, so the lock leaves interrupts as they are.
static FRAMES: KernelLock<Frames> = SpinLock::kernel(Frames {
    ranges: [(0, 0); MAX_RANGES],
    nranges: 0,
    cursor: 0,
    next: 0,
    free_head: 0,
    total: 0,
    in_use: 0,
});

fn align_up(x: u64) -> u64 {
    x.div_ceil(FRAME_SIZE) * FRAME_SIZE
}

/// Builds the usable ranges from the memory map, minus `kernel` = [start, end).
pub fn init(regions: &[MemRegion], kernel: (u64, u64)) {
    let mut f = FRAMES.lock();
    for r in regions.iter().filter(|r| r.kind == E820_RAM) {
        let start = align_up(r.start.max(LOW_MEMORY_END));
        let end = (r.end() & !(FRAME_SIZE - 1)).min(HIGH_LIMIT);
        // Split around the kernel image.
        for (s, e) in [
            (start, end.min(kernel.0)),
            (start.max(align_up(kernel.1)), end),
        ] {
            if s < e && f.nranges < MAX_RANGES {
                let n = f.nranges;
                f.ranges[n] = (s, e);
                f.nranges += 1;
                f.total += (e - s) / FRAME_SIZE;
            }
        }
    }
    f.next = if f.nranges > 0 { f.ranges[0].0 } else { 0 };
}

impl Frames {
    /// `n` physically contiguous frames from the bump region.
    fn bump(&mut self, n: u64) -> Option<u64> {
        while self.cursor < self.nranges {
            let (_, end) = self.ranges[self.cursor];
            if self.next + n * FRAME_SIZE <= end {
                let at = self.next;
                self.next += n * FRAME_SIZE;
                self.in_use += n;
                return Some(at);
            }
            self.cursor += 1;
            if self.cursor < self.nranges {
                self.next = self.ranges[self.cursor].0;
            }
        }
        None
    }

    fn alloc_one(&mut self) -> Option<u64> {
        if self.free_head != 0 {
            let at = self.free_head;
            // SAFETY: free frames are identity-mapped RAM that we own; the first 8 bytes of
            // each hold the next free frame's address, written by `free`.
            self.free_head = unsafe { core::ptr::read_volatile(at as *const u64) };
            self.in_use += 1;
            return Some(at);
        }
        self.bump(1)
    }

    /// The longest run of frames `bump` can still hand out in one piece.
    fn largest_run(&self) -> u64 {
        (self.cursor..self.nranges)
            .map(|i| {
                let (start, end) = self.ranges[i];
                let from = if i == self.cursor { self.next } else { start };
                end.saturating_sub(from) / FRAME_SIZE
            })
            .max()
            .unwrap_or(0)
    }
}

/// One frame, not zeroed.
pub fn alloc() -> Option<PhysFrame> {
    let at = FRAMES.lock().alloc_one()?;
    Some(PhysFrame::containing_address(PhysAddr::new(at)))
}

/// The most contiguous frames `alloc_contiguous` can return now.
pub fn largest_run() -> u64 {
    FRAMES.lock().largest_run()
}

/// `n` contiguous frames (not zeroed), as a physical start address.
pub fn alloc_contiguous(n: u64) -> Option<u64> {
    FRAMES.lock().bump(n)
}

/// `n` contiguous frames or a panic naming the request: running out is a guest bug or a VM
/// configured with too little memory, and both must be loud.
pub fn alloc_contiguous_or_panic(n: u64, what: &str) -> u64 {
    alloc_contiguous(n).unwrap_or_else(|| {
        let (total, in_use) = stats();
        panic!("out of physical memory allocating {n} frames for {what} ({in_use}/{total} frames in use)")
    })
}

/// Returns a frame to the free list.
///
/// # Safety
/// `frame` must have come from this allocator and no longer be used by anyone.
pub unsafe fn free(frame: PhysFrame) {
    let mut f = FRAMES.lock();
    let at = frame.start_address().as_u64();
    // SAFETY: per the contract the frame is ours and unused; it is identity-mapped RAM.
    unsafe { core::ptr::write_volatile(at as *mut u64, f.free_head) };
    f.free_head = at;
    f.in_use -= 1;
}

/// A frame owned by its holder, freed when dropped. It is never mapped anywhere (it offers
/// no way to), so dropping it cannot leave a translation to a free frame behind.
pub struct OwnedFrame(PhysFrame);

impl OwnedFrame {
    /// One frame, not zeroed.
    pub fn alloc() -> Option<OwnedFrame> {
        alloc().map(OwnedFrame)
    }

    /// Its physical address.
    pub fn addr(&self) -> u64 {
        self.0.start_address().as_u64()
    }
}

impl Drop for OwnedFrame {
    fn drop(&mut self) {
        // SAFETY: the frame came from this allocator and only this value refers to it; it
        // was never mapped (see the type's docs).
        unsafe { free(self.0) }
    }
}

/// A frame taken for the rest of the kernel's life: never freed, so it may be mapped into
/// any address space and written through its identity map at any time (what it holds is
/// nobody's Rust object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticFrame(PhysFrame);

impl StaticFrame {
    /// One frame (not zeroed), from the free list first.
    pub fn alloc() -> Option<StaticFrame> {
        alloc().map(StaticFrame)
    }

    /// One frame (not zeroed) from the bump region, or a panic naming `what`.
    pub fn alloc_or_panic(what: &str) -> StaticFrame {
        let at = alloc_contiguous_or_panic(1, what);
        StaticFrame(PhysFrame::containing_address(PhysAddr::new(at)))
    }

    pub fn frame(self) -> PhysFrame {
        self.0
    }

    /// Its physical address.
    pub fn addr(self) -> u64 {
        self.0.start_address().as_u64()
    }

    /// Zeroes the whole frame.
    pub fn zero(self) {
        // SAFETY: a frame of our own that is never freed, identity-mapped; no Rust object
        // lives in it.
        unsafe { core::ptr::write_bytes(self.addr() as *mut u8, 0, FRAME_SIZE as usize) }
    }

    /// Stores `v` at byte `offset` with one volatile write (`offset` aligned for `T`, the
    /// value inside the frame).
    pub fn write<T: Copy>(self, offset: usize, v: T) {
        assert!(
            offset.is_multiple_of(core::mem::align_of::<T>())
                && offset + core::mem::size_of::<T>() <= FRAME_SIZE as usize,
            "write at {offset:#x} outside the frame or unaligned"
        );
        // SAFETY: inside a frame of our own that is never freed, identity-mapped, aligned
        // for T (the frame is page-aligned); no Rust object lives in it.
        unsafe { core::ptr::write_volatile((self.addr() + offset as u64) as *mut T, v) }
    }
}

/// (total usable frames, frames in use).
pub fn stats() -> (u64, u64) {
    let f = FRAMES.lock();
    (f.total, f.in_use)
}

/// The global allocator as the `x86_64` crate's mapper wants it.
pub struct GlobalFrames;

// SAFETY: frames come from usable RAM in the memory map, never handed out twice.
unsafe impl FrameAllocator<Size4KiB> for GlobalFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        alloc()
    }
}

impl FrameDeallocator<Size4KiB> for GlobalFrames {
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size4KiB>) {
        // SAFETY: forwarded contract of FrameDeallocator.
        unsafe { free(frame) }
    }
}
