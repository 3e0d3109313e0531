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
//! // Without event rings, four vCPUs fit in one 4 KiB page; 64 vCPUs need three
//! // (64 records and 65 one-line bitmaps).
//! assert_eq!(region_size(4, 0), 4096);
//! assert_eq!(region_size(64, 0), 3 * 4096);
//! assert_eq!(record_offset(0), HEADER_SIZE);
//! assert_eq!(record_offset(3), HEADER_SIZE + 3 * RECORD_SIZE);
//! ```
#![no_std]

mod bitmap;
mod events;
mod guest_tests;
mod hypercall;
pub mod kvm_para;
mod page;

pub use bitmap::*;
pub use events::*;
pub use guest_tests::*;
pub use hypercall::*;
pub use page::*;

/// Version of this ABI. Bumped on any change of layout or meaning; never tied to semver.
pub const ABI_VERSION: u32 = 6;

/// Name of the ELF note in which the guest embeds [`ABI_VERSION`] (namesz = 7, NUL included).
pub const ELF_NOTE_NAME: &[u8; 7] = b"PVSYNC\0";

/// Type of the ELF note whose 4-byte descriptor is the guest's [`ABI_VERSION`].
pub const ELF_NOTE_TYPE_ABI_VERSION: u32 = 1;

/// Largest vCPU count the ABI describes: the most x86 KVM can be built for
/// (`KVM_MAX_NR_VCPUS`), and what a `SendIpi` request's 16-bit destination holds with room
/// to spare. The region's CPU sets are bitmaps sized by the VM's own count (ABI v6), so this
/// only bounds what a host accepts; a VM's count is further bounded by its host's KVM
/// (`KVM_CAP_MAX_VCPUS`) and by what a guest kernel was built for.
pub const MAX_VCPUS: usize = 4096;

/// vCPU id meaning "nobody" in fields that name a vCPU.
pub const NO_VCPU: u32 = u32::MAX;
