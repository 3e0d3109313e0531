//! Hypercalls: 32-bit port I/O to fixed ports.
//!
//! KVM handles `vmcall`/`vmmcall` in the kernel and never forwards unknown numbers to a
//! userspace VMM, so pvsync's own hypercalls are port writes (one exit each, slow paths only).
//! A port that nobody claims is harmless: under stock QEMU a write is dropped and a read
//! returns all ones, which the guest reads as [`HypercallStatus::NoHost`].

/// Hypercall numbers. The discriminant is the I/O port the guest accesses.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// `out` a 32-bit exit code: the VM stops and the VMM exits with that code. Same port and
    /// width as QEMU's `isa-debug-exit` (which exits with `(code << 1) | 1`).
    Exit = 0x00f4,
    /// `out` the 32-bit guest-physical address of the shared region (header filled in), then
    /// `in` a 32-bit [`HypercallStatus`] saying whether the host accepted it.
    RegisterSharedRegion = 0x0500,
    /// `out` the 32-bit id of the vCPU the caller waits for (a lock holder, an IPI target):
    /// the caller has spun past its threshold and offers its CPU time. The host may run the
    /// named vCPU (or the one in its way) on the rest of the caller's turn: it then sets the
    /// boosted vCPU's `host_lent_by` to the caller's id plus one. A vCPU whose record says
    /// `host_lent_by == t + 1` gives the turn back with `YieldTo(t)` once it no longer holds
    /// `t` up: `t` runs at once (ABI v4). Status: `Ok` or `BadVcpu`.
    YieldTo = 0x0501,
    /// `out` a 32-bit timeout in microseconds, until the vCPU's next timer deadline (capped at
    /// [`IDLE_MAX_US`]; 0: no timer is armed, and the vCPU sleeps until a `SendIpi` targets
    /// it, ABI v6): the vCPU has nothing to run. Used instead of
    /// `hlt`, which with KVM's in-kernel irqchip would block inside `KVM_RUN` and keep the
    /// host CPU the vCPU was given. Made with interrupts enabled (an interrupt pending at the
    /// `out` is then taken on return without an interrupt-window exit). Returns at once if an
    /// interrupt was sent to this vCPU through [`Hypercall::SendIpi`] since its previous
    /// `Idle` returned, so a wake-up between the guest's last check and the `out` is never
    /// lost; else when the timeout passes or such an interrupt arrives. Status: `Ok`.
    Idle = 0x0502,
    /// `out` a 32-bit [`IpiRequest`]: the host injects a fixed interrupt (`KVM_SIGNAL_MSI`)
    /// and wakes the target if it is idle. The host thereby knows which vCPU has an
    /// interrupt pending. Status: `Ok`, `BadVcpu`, or `BadArgument`.
    SendIpi = 0x0503,
    /// `out` the low 32 bits of the header's `rcu_gp_seq` (odd: a grace period in progress):
    /// that grace period now waits on the vCPUs named in the header's `rcu_gp_holdouts`, and
    /// the caller asks the host to give the preempted ones CPU now rather than when their
    /// turn comes. Made by the grace-period kthread when it starts waiting, and by the last
    /// holdout when only the kthread's own vCPU is left. A value that is not the grace
    /// period in progress is stale: the host ignores it. Status: `Ok` (ABI v4).
    RcuWait = 0x0504,
}

/// Longest an [`Hypercall::Idle`] blocks, in microseconds, whatever the guest asks.
pub const IDLE_MAX_US: u32 = 100_000;

/// Where a [`Hypercall::SendIpi`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiDest {
    /// One vCPU, by id (below [`crate::MAX_VCPUS`]).
    Vcpu(u16),
    /// Every vCPU but the caller.
    AllButSelf,
}

/// The argument of [`Hypercall::SendIpi`] (ABI v6): bits 0..8 the vector (32..=255), bit 8
/// set for "all but self" (then bits 16..32 are zero), bits 9..16 zero, bits 16..32 the
/// destination vCPU id.
///
/// ```
/// use shared_abi::{IpiDest, IpiRequest};
/// let r = IpiRequest { vector: 0xf2, dest: IpiDest::Vcpu(1000) };
/// assert_eq!(r.encode(), 1000 << 16 | 0xf2);
/// assert_eq!(IpiRequest::decode(1000 << 16 | 0xf2), Some(r));
/// assert_eq!(IpiRequest::decode(0x01f2).map(|r| r.dest), Some(IpiDest::AllButSelf));
/// assert_eq!(IpiRequest::decode(0x0310), None, "exception vectors are refused");
/// assert_eq!(IpiRequest::decode(1 << 9 | 0xf2), None, "reserved bits must be zero");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpiRequest {
    pub vector: u8,
    pub dest: IpiDest,
}

impl IpiRequest {
    const ALL_BUT_SELF: u32 = 1 << 8;
    /// Bits 9..16: always zero.
    const RESERVED: u32 = 0xfe00;
    /// Lowest vector an IPI may use: 0..32 are exceptions.
    pub const MIN_VECTOR: u8 = 32;

    pub const fn encode(self) -> u32 {
        let dest = match self.dest {
            IpiDest::Vcpu(v) => (v as u32) << 16,
            IpiDest::AllButSelf => Self::ALL_BUT_SELF,
        };
        dest | self.vector as u32
    }

    /// None for a reserved bit set, an exception vector, or both destination forms at once.
    /// (Whether a destination id names a vCPU of the VM is the host's check.)
    pub const fn decode(raw: u32) -> Option<Self> {
        let vector = raw as u8;
        if raw & Self::RESERVED != 0 || vector < Self::MIN_VECTOR {
            return None;
        }
        let id = (raw >> 16) as u16;
        let dest = if raw & Self::ALL_BUT_SELF != 0 {
            if id != 0 {
                return None;
            }
            IpiDest::AllButSelf
        } else {
            IpiDest::Vcpu(id)
        };
        Some(IpiRequest { vector, dest })
    }
}

impl Hypercall {
    /// Every hypercall, for dispatch tables and tests.
    pub const ALL: [Hypercall; 6] = [
        Hypercall::Exit,
        Hypercall::RegisterSharedRegion,
        Hypercall::YieldTo,
        Hypercall::Idle,
        Hypercall::SendIpi,
        Hypercall::RcuWait,
    ];

    /// The port this hypercall uses.
    pub const fn port(self) -> u16 {
        self as u16
    }

    /// The hypercall behind `port`, if any.
    pub const fn from_port(port: u16) -> Option<Self> {
        match port {
            0x00f4 => Some(Hypercall::Exit),
            0x0500 => Some(Hypercall::RegisterSharedRegion),
            0x0501 => Some(Hypercall::YieldTo),
            0x0502 => Some(Hypercall::Idle),
            0x0503 => Some(Hypercall::SendIpi),
            0x0504 => Some(Hypercall::RcuWait),
            _ => None,
        }
    }
}

/// Result of a hypercall, read back with `in` from the hypercall's port.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallStatus {
    /// Accepted.
    Ok = 0,
    /// The address is not page-aligned, or the region does not lie inside guest RAM.
    BadAddress = 1,
    /// The header's magic is not [`crate::PAGE_MAGIC`].
    BadMagic = 2,
    /// The header's ABI version differs from the host's [`crate::ABI_VERSION`].
    VersionMismatch = 3,
    /// `nr_vcpus` differs from the VM's vCPU count.
    BadVcpuCount = 4,
    /// `region_size`, `record_size` or `records_offset` disagree with this ABI version.
    BadGeometry = 5,
    /// The region overlaps the loaded kernel image.
    OverlapsKernel = 6,
    /// A region is already registered for this VM.
    AlreadyRegistered = 7,
    /// No hypercall was made on this vCPU before the `in`.
    NothingPending = 8,
    /// The hypercall port was accessed with a width other than 32 bits.
    BadWidth = 9,
    /// A vCPU id argument names no vCPU of this VM.
    BadVcpu = 10,
    /// An argument is malformed (reserved bits set, a vector below 32).
    BadArgument = 11,
    /// What an unclaimed port reads as: no pvsync host is listening.
    NoHost = 0xffff_ffff,
}

impl HypercallStatus {
    /// Decodes a status word; unknown values read as [`HypercallStatus::NoHost`].
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            0 => HypercallStatus::Ok,
            1 => HypercallStatus::BadAddress,
            2 => HypercallStatus::BadMagic,
            3 => HypercallStatus::VersionMismatch,
            4 => HypercallStatus::BadVcpuCount,
            5 => HypercallStatus::BadGeometry,
            6 => HypercallStatus::OverlapsKernel,
            7 => HypercallStatus::AlreadyRegistered,
            8 => HypercallStatus::NothingPending,
            9 => HypercallStatus::BadWidth,
            10 => HypercallStatus::BadVcpu,
            11 => HypercallStatus::BadArgument,
            _ => HypercallStatus::NoHost,
        }
    }

    /// A short lower-case name for console lines.
    pub const fn name(self) -> &'static str {
        match self {
            HypercallStatus::Ok => "ok",
            HypercallStatus::BadAddress => "bad-address",
            HypercallStatus::BadMagic => "bad-magic",
            HypercallStatus::VersionMismatch => "version-mismatch",
            HypercallStatus::BadVcpuCount => "bad-vcpu-count",
            HypercallStatus::BadGeometry => "bad-geometry",
            HypercallStatus::OverlapsKernel => "overlaps-kernel",
            HypercallStatus::AlreadyRegistered => "already-registered",
            HypercallStatus::NothingPending => "nothing-pending",
            HypercallStatus::BadWidth => "bad-width",
            HypercallStatus::BadVcpu => "bad-vcpu",
            HypercallStatus::BadArgument => "bad-argument",
            HypercallStatus::NoHost => "no-host",
        }
    }
}

/// Codes the guest writes to [`Hypercall::Exit`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// Everything the command line asked for passed.
    Success = 0,
    /// A test or suite reported failure.
    Failure = 1,
    /// The guest kernel panicked or took an unexpected exception.
    Panic = 2,
}

impl ExitCode {
    /// The process exit status QEMU's `isa-debug-exit` produces for this code.
    pub const fn qemu_status(self) -> i32 {
        ((self as i32) << 1) | 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_round_trip() {
        for h in Hypercall::ALL {
            assert_eq!(Hypercall::from_port(h.port()), Some(h));
        }
        assert_eq!(Hypercall::from_port(0x3f8), None);
    }

    #[test]
    fn status_round_trips_and_unknown_is_no_host() {
        for raw in 0..=11 {
            assert_eq!(HypercallStatus::from_raw(raw) as u32, raw);
        }
        assert_eq!(HypercallStatus::from_raw(12), HypercallStatus::NoHost);
        assert_eq!(HypercallStatus::from_raw(u32::MAX), HypercallStatus::NoHost);
    }

    #[test]
    fn ipi_requests_round_trip() {
        for vector in [32u8, 0xf1, 0xff] {
            for dest in [
                IpiDest::Vcpu(0),
                IpiDest::Vcpu(63),
                IpiDest::Vcpu(1023),
                IpiDest::Vcpu(u16::MAX),
                IpiDest::AllButSelf,
            ] {
                let r = IpiRequest { vector, dest };
                assert_eq!(IpiRequest::decode(r.encode()), Some(r));
            }
        }
        assert_eq!(
            IpiRequest::decode(1 << 16 | 1 << 8 | 0xf1),
            None,
            "both forms"
        );
        for reserved in 9..16 {
            assert_eq!(
                IpiRequest::decode(1 << reserved | 0xf1),
                None,
                "bit {reserved}"
            );
        }
        assert_eq!(IpiRequest::decode(u32::MAX), None);
    }

    #[test]
    fn qemu_exit_status_matches_isa_debug_exit() {
        assert_eq!(ExitCode::Success.qemu_status(), 1);
        assert_eq!(ExitCode::Failure.qemu_status(), 3);
        assert_eq!(ExitCode::Panic.qemu_status(), 5);
    }
}
