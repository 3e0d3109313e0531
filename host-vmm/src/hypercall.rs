//! Guest hypercalls (port I/O, numbers in `shared_abi::Hypercall`): decoding and handling.

use shared_abi::{Hypercall, HypercallStatus};

/// What hypercalls need from the VM: kept narrow so the decoding is testable without KVM.
pub trait HypercallHost {
    /// Validates and accepts (or refuses) the shared region at `gpa`.
    fn register_shared_region(&self, gpa: u64) -> HypercallStatus;
    /// The caller spins waiting for vCPU `target` and offers its CPU time.
    fn yield_to(&self, target: u32) -> HypercallStatus;
}

/// What the vCPU loop must do after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Resume the guest.
    Continue,
    /// The guest asked to stop with this exit code.
    Exit(u32),
}

/// Per-vCPU hypercall state: the status an `in` from a hypercall port returns.
#[derive(Debug)]
pub struct VcpuHypercalls {
    last_status: HypercallStatus,
}

impl Default for VcpuHypercalls {
    fn default() -> Self {
        VcpuHypercalls {
            last_status: HypercallStatus::NothingPending,
        }
    }
}

fn le_u32(data: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes)
}

impl VcpuHypercalls {
    /// Handles an `out` to `port`; None if the port is not a hypercall.
    pub fn handle_out(
        &mut self,
        vm: &impl HypercallHost,
        port: u16,
        data: &[u8],
    ) -> Option<Action> {
        match Hypercall::from_port(port)? {
            Hypercall::Exit => {
                // isa-debug-exit accepts any width; so do we.
                let mut code = [0u8; 4];
                let n = data.len().min(4);
                code[..n].copy_from_slice(&data[..n]);
                Some(Action::Exit(u32::from_le_bytes(code)))
            }
            Hypercall::RegisterSharedRegion => {
                self.last_status = match le_u32(data) {
                    Some(gpa) => vm.register_shared_region(gpa as u64),
                    None => HypercallStatus::BadWidth,
                };
                Some(Action::Continue)
            }
            Hypercall::YieldTo => {
                self.last_status = match le_u32(data) {
                    Some(target) => vm.yield_to(target),
                    None => HypercallStatus::BadWidth,
                };
                Some(Action::Continue)
            }
        }
    }

    /// Handles an `in` from `port`; false if the port is not a hypercall.
    pub fn handle_in(&mut self, port: u16, data: &mut [u8]) -> bool {
        match Hypercall::from_port(port) {
            Some(Hypercall::RegisterSharedRegion | Hypercall::YieldTo) => {
                let status = if data.len() == 4 {
                    self.last_status
                } else {
                    HypercallStatus::BadWidth
                };
                let bytes = (status as u32).to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
                true
            }
            Some(Hypercall::Exit) => {
                data.fill(0xff);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records registrations and answers with a fixed status.
    struct FakeHost {
        calls: RefCell<Vec<u64>>,
        answer: HypercallStatus,
    }

    impl HypercallHost for FakeHost {
        fn register_shared_region(&self, gpa: u64) -> HypercallStatus {
            self.calls.borrow_mut().push(gpa);
            self.answer
        }

        fn yield_to(&self, target: u32) -> HypercallStatus {
            if target < 4 {
                HypercallStatus::Ok
            } else {
                HypercallStatus::BadVcpu
            }
        }
    }

    const REG: u16 = Hypercall::RegisterSharedRegion as u16;

    fn read_status(h: &mut VcpuHypercalls, width: usize) -> u32 {
        let mut buf = [0u8; 4];
        assert!(h.handle_in(REG, &mut buf[..width]));
        u32::from_le_bytes(buf)
    }

    #[test]
    fn status_reads_back_per_vcpu() {
        let host = FakeHost {
            calls: RefCell::new(vec![]),
            answer: HypercallStatus::BadMagic,
        };
        let mut h = VcpuHypercalls::default();
        assert_eq!(
            read_status(&mut h, 4),
            HypercallStatus::NothingPending as u32
        );
        assert_eq!(
            h.handle_out(&host, REG, &0x5000u32.to_le_bytes()),
            Some(Action::Continue)
        );
        assert_eq!(*host.calls.borrow(), vec![0x5000]);
        assert_eq!(read_status(&mut h, 4), HypercallStatus::BadMagic as u32);
        // Another vCPU's state is its own.
        assert_eq!(
            read_status(&mut VcpuHypercalls::default(), 4),
            HypercallStatus::NothingPending as u32
        );
    }

    #[test]
    fn narrow_accesses_are_bad_width_and_never_reach_the_host() {
        let host = FakeHost {
            calls: RefCell::new(vec![]),
            answer: HypercallStatus::Ok,
        };
        let mut h = VcpuHypercalls::default();
        for data in [&[1u8][..], &[1, 2], &[1, 2, 3, 4, 5, 6, 7, 8]] {
            h.handle_out(&host, REG, data);
            assert_eq!(read_status(&mut h, 4), HypercallStatus::BadWidth as u32);
        }
        assert!(host.calls.borrow().is_empty());
        h.handle_out(&host, REG, &0x5000u32.to_le_bytes());
        assert_eq!(
            read_status(&mut h, 1),
            HypercallStatus::BadWidth as u32,
            "narrow in"
        );
    }

    #[test]
    fn exit_takes_any_width_and_other_ports_are_not_hypercalls() {
        let host = FakeHost {
            calls: RefCell::new(vec![]),
            answer: HypercallStatus::Ok,
        };
        let mut h = VcpuHypercalls::default();
        assert_eq!(h.handle_out(&host, 0xf4, &[3]), Some(Action::Exit(3)));
        assert_eq!(
            h.handle_out(&host, 0xf4, &7u32.to_le_bytes()),
            Some(Action::Exit(7))
        );
        assert_eq!(h.handle_out(&host, 0x3f8, b"x"), None);
        assert!(!h.handle_in(0x3f8, &mut [0u8]));
    }

    #[test]
    fn yield_to_checks_its_target() {
        let host = FakeHost {
            calls: RefCell::new(vec![]),
            answer: HypercallStatus::Ok,
        };
        let mut h = VcpuHypercalls::default();
        let port = Hypercall::YieldTo as u16;
        h.handle_out(&host, port, &3u32.to_le_bytes());
        assert_eq!(read_status(&mut h, 4), HypercallStatus::Ok as u32);
        h.handle_out(&host, port, &4u32.to_le_bytes());
        assert_eq!(read_status(&mut h, 4), HypercallStatus::BadVcpu as u32);
        h.handle_out(&host, port, &[1]);
        assert_eq!(read_status(&mut h, 4), HypercallStatus::BadWidth as u32);
    }
}
