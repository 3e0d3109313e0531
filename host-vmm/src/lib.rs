//! pvsync host VMM: boots the pvsync guest (or any PVH kernel) on KVM and reads the per-vCPU
//! state the guest publishes in the shared region.
//!
//! Data flows one way through the modules: the guest's stores and hypercalls ->
//! `hypercall` (decode) and `shared_region` (snapshot, validate) -> `policy` (a pure
//! function of the snapshot and the backend's view of each vCPU: whom to boost) -> `sched`
//! (the backend: how a vCPU gets CPU time; the VMM's slot scheduler, or the host Linux
//! scheduler) -> metrics and trace (`results`, `report`, `outputs`). `cli` holds the flags
//! and exit statuses, `plan` checks what to run, `launch` runs it. `arch::x86_64` holds everything
//! x86-specific; `vm` the lifecycle; `vcpu` one vCPU (its fd, kick signal, CPL and loop),
//! which reaches its VM through a trait: `vm` uses `vcpu`, never the reverse.

pub mod arch;
pub mod cli;
pub mod devices;
pub mod files;
pub mod guest_events;
pub mod hostinfo;
pub mod hoststat;
pub mod hypercall;
pub mod launch;
pub mod loader;
pub mod outputs;
pub mod plan;
pub mod policy;
pub mod printable;
pub mod report;
pub mod results;
pub mod scenario;
pub mod sched;
pub mod shared_region;
pub mod signals;
pub mod study;
pub mod taskstat;
pub mod trace;
pub mod vcpu;
pub mod vm;
