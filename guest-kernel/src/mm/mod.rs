//! Physical memory: a frame allocator over the PVH memory map, the kernel heap, and the
//! kernel's own identity-mapped page tables.

pub mod aspace;
pub mod bootmem;
pub mod frame;
pub mod heap;
pub mod paging;

use crate::bootinfo::BootInfo;

/// Brings up frames, heap (sized for `ncpus` CPUs, see heap::size) and kernel page tables,
/// in that order. Boot data is no longer readable afterwards (bootmem).
pub fn init(boot: &BootInfo, ncpus: usize) {
    bootmem::retire();
    frame::init(boot.regions(), crate::arch::kernel_image_range());
    heap::init(ncpus);
    paging::init(boot.regions());
}
