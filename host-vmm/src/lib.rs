//! pvsync host VMM: boots the pvsync guest (or any PVH kernel) on KVM and reads the per-vCPU
//! state the guest publishes in the shared region.
//!
//! Data flows one way through the modules: `hypercall` (registration) ->
//! `shared_region` (snapshot, validate) -> report. `arch::x86_64` holds everything
//! x86-specific; `vm` and `vcpu` the lifecycle.

pub mod arch;
pub mod cli;
pub mod devices;
pub mod hoststat;
pub mod hypercall;
pub mod loader;
pub mod policy;
pub mod shared_region;
pub mod vcpu;
pub mod vm;
