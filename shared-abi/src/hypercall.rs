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
    /// the caller has spun past its threshold and offers its CPU time. Status: `Ok` or
    /// `BadVcpu`.
    YieldTo = 0x0501,
}

impl Hypercall {
    /// Every hypercall, for dispatch tables and tests.
    pub const ALL: [Hypercall; 3] = [
        Hypercall::Exit,
        Hypercall::RegisterSharedRegion,
        Hypercall::YieldTo,
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
        for raw in 0..=10 {
            assert_eq!(HypercallStatus::from_raw(raw) as u32, raw);
        }
        assert_eq!(HypercallStatus::from_raw(11), HypercallStatus::NoHost);
        assert_eq!(HypercallStatus::from_raw(u32::MAX), HypercallStatus::NoHost);
    }

    #[test]
    fn qemu_exit_status_matches_isa_debug_exit() {
        assert_eq!(ExitCode::Success.qemu_status(), 1);
        assert_eq!(ExitCode::Failure.qemu_status(), 3);
        assert_eq!(ExitCode::Panic.qemu_status(), 5);
    }
}
