//! Rust programs that the pvsync guest kernel runs at CPL 3, and their system-call wrappers.
//!
//! The kernel's linker script places every code and read-only-data section of this crate
//! (and of the compression crate it uses, `lzss`, and the compiler's `memcpy` family) in
//! the page range `__user_image_start..__user_image_end`, which `mm::paging` makes
//! user-accessible and read-only at the address it is linked at (the kernel is
//! identity-mapped, so absolute addresses in the code stay right). Hence the rules for code
//! here (docs/design.md, "Rust user programs"):
//!
//! - no `static mut`, no interior-mutable statics, no `.data`/`.bss`: user code has no
//!   writable memory but its stack and the pages the kernel maps for it;
//! - no allocation (the global allocator is the kernel's heap, supervisor-only);
//! - call only code of this crate, of `lzss`, generic/inline `core` code (instantiated
//!   here), and the `memcpy` family. A call to any other kernel function, e.g. a panic
//!   path, faults at its first instruction fetch (kernel pages are supervisor-only) and
//!   the kernel kills the task; `tests/tests/pbzip2.rs` checks the linked kernel so that
//!   only panic paths leave the range.
//!
//! The pure parts (block generation, compression round trip) also build for the host,
//! where their unit tests run.
#![no_std]

pub mod pbzip2;
pub mod sys;
