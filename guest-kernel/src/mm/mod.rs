//! Physical memory: a frame allocator over the PVH memory map, the kernel heap, and the
//! kernel's own identity-mapped page tables.

pub mod aspace;
pub mod frame;
pub mod heap;
pub mod paging;

use crate::arch::bootmem::BootMemory;
use crate::bootinfo::BootInfo;

/// Brings up frames, heap (sized for `ncpus` CPUs, see heap::size) and kernel page tables,
/// in that order. Consumes the boot-memory token: from here on the boot tables are gone and
/// frames get reused.
pub fn init(boot: &BootInfo, boot_memory: BootMemory, ncpus: usize) {
    frame::init(boot.regions(), crate::arch::kernel_image_range());
    heap::init(ncpus, boot.ram_bytes());
    paging::init(boot.regions(), boot_memory);
}
