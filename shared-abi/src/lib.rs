//! The pvsync guest/host ABI: the one place where the shared-page layout, the I/O-port
//! hypercall numbers and the ABI version are written down.
//!
//! `docs/abi.md` is the prose contract; this crate is its executable form. Both the guest
//! kernel (`x86_64-unknown-none`) and the host VMM depend on it, so it is `no_std` and has
//! no dependencies.
//!
//! The ABI version ([`ABI_VERSION`]) is versioned apart from the crate's semver: it changes
//! whenever a byte of the layout or the meaning of a field changes, and the host refuses a
//! guest that embeds another version.
//!
//! ```
//! use shared_abi::{region_size, record_offset, HEADER_SIZE, RECORD_SIZE};
//! // Without event rings, four vCPUs fit in one 4 KiB page; 64 vCPUs need two.
//! assert_eq!(region_size(4, 0), 4096);
//! assert_eq!(region_size(64, 0), 8192);
//! assert_eq!(record_offset(0), HEADER_SIZE);
//! assert_eq!(record_offset(3), HEADER_SIZE + 3 * RECORD_SIZE);
//! ```
#![no_std]

mod events;
mod guest_tests;
mod hypercall;
pub mod kvm_para;
mod page;

pub use events::*;
pub use guest_tests::*;
pub use hypercall::*;
pub use page::*;

/// Version of this ABI. Bumped on any change of layout or meaning; never tied to semver.
pub const ABI_VERSION: u32 = 5;

/// Name of the ELF note in which the guest embeds [`ABI_VERSION`] (namesz = 7, NUL included).
pub const ELF_NOTE_NAME: &[u8; 7] = b"PVSYNC\0";

/// Type of the ELF note whose 4-byte descriptor is the guest's [`ABI_VERSION`].
pub const ELF_NOTE_TYPE_ABI_VERSION: u32 = 1;

/// Largest vCPU count the ABI describes: IPI wait sets are 64-bit masks indexed by vCPU id.
pub const MAX_VCPUS: usize = 64;

/// vCPU id meaning "nobody" in fields that name a vCPU.
pub const NO_VCPU: u32 = u32::MAX;
