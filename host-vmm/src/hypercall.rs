//! Guest hypercalls (port I/O, numbers in `shared_abi::Hypercall`): decoding and handling.

use shared_abi::{Hypercall, HypercallStatus, IpiRequest};

/// What hypercalls need from the VM: kept narrow so the decoding is testable without KVM.
pub trait HypercallHost {
    /// Validates and accepts (or refuses) the shared region at `gpa`.
    fn register_shared_region(&self, gpa: u64) -> HypercallStatus;
    /// `caller` spins waiting for vCPU `target` and offers its CPU time.
    fn yield_to(&self, caller: u32, target: u32) -> HypercallStatus;
    /// `caller` has nothing to do for at most `timeout_us` (0: no deadline of its own).
    fn idle(&self, caller: u32, timeout_us: u32) -> HypercallStatus;
    /// `caller` sends an interrupt.
    fn send_ipi(&self, caller: u32, request: IpiRequest) -> HypercallStatus;
    /// The grace period whose sequence ends in `seq` waits on the holdouts its header names.
    fn rcu_wait(&self, caller: u32, seq: u32) -> HypercallStatus;
    /// A hypercall of `caller` was refused with `status` (for the counters).
    fn refused(&self, caller: u32, status: HypercallStatus);
}

/// What the vCPU loop must do after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Resume the guest.
    Continue,
    /// The guest asked to stop with this exit code.
    Exit(u32),
}

/// Per-vCPU hypercall state: whose it is, and the status an `in` from a hypercall port
/// returns.
#[derive(Debug)]
pub struct VcpuHypercalls {
    vcpu: u32,
    last_status: HypercallStatus,
}

impl VcpuHypercalls {
    pub fn new(vcpu: u32) -> Self {
        VcpuHypercalls {
            vcpu,
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
            call => {
                let caller = self.vcpu;
                self.last_status = match (call, le_u32(data)) {
                    (_, None) => HypercallStatus::BadWidth,
                    (Hypercall::RegisterSharedRegion, Some(gpa)) => {
                        vm.register_shared_region(gpa as u64)
                    }
                    (Hypercall::YieldTo, Some(target)) => vm.yield_to(caller, target),
                    (Hypercall::Idle, Some(us)) => vm.idle(caller, us),
                    (Hypercall::RcuWait, Some(seq)) => vm.rcu_wait(caller, seq),
                    (Hypercall::SendIpi, Some(raw)) => match IpiRequest::decode(raw) {
                        Some(r) => vm.send_ipi(caller, r),
                        None => HypercallStatus::BadArgument,
                    },
                    // Decoded by the arm above; listed so the match stays exhaustive.
                    (Hypercall::Exit, Some(_)) => HypercallStatus::Ok,
                };
                if self.last_status != HypercallStatus::Ok {
                    vm.refused(caller, self.last_status);
                }
                Some(Action::Continue)
            }
        }
    }

    /// Handles an `in` from `port`; false if the port is not a hypercall.
    pub fn handle_in(&mut self, port: u16, data: &mut [u8]) -> bool {
        match Hypercall::from_port(port) {
            Some(
                Hypercall::RegisterSharedRegion
                | Hypercall::YieldTo
                | Hypercall::Idle
                | Hypercall::SendIpi
                | Hypercall::RcuWait,
            ) => {
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
        refusals: RefCell<Vec<HypercallStatus>>,
        answer: HypercallStatus,
    }

    impl HypercallHost for FakeHost {
        fn register_shared_region(&self, gpa: u64) -> HypercallStatus {
            self.calls.borrow_mut().push(gpa);
            self.answer
        }

        fn yield_to(&self, _: u32, target: u32) -> HypercallStatus {
            if target < 4 {
                HypercallStatus::Ok
            } else {
                HypercallStatus::BadVcpu
            }
        }

        fn idle(&self, caller: u32, us: u32) -> HypercallStatus {
            self.calls
                .borrow_mut()
                .push(((caller as u64) << 32) | us as u64);
            HypercallStatus::Ok
        }

        fn send_ipi(&self, _: u32, r: IpiRequest) -> HypercallStatus {
            match r.dest {
                shared_abi::IpiDest::Vcpu(v) if v >= 4 => HypercallStatus::BadVcpu,
                _ => HypercallStatus::Ok,
            }
        }

        fn rcu_wait(&self, caller: u32, seq: u32) -> HypercallStatus {
            self.calls
                .borrow_mut()
                .push(((caller as u64) << 32) | seq as u64);
            HypercallStatus::Ok
        }

        fn refused(&self, _: u32, status: HypercallStatus) {
            self.refusals.borrow_mut().push(status);
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
            refusals: RefCell::new(vec![]),
            answer: HypercallStatus::BadMagic,
        };
        let mut h = VcpuHypercalls::new(0);
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
            read_status(&mut VcpuHypercalls::new(0), 4),
            HypercallStatus::NothingPending as u32
        );
    }

    #[test]
    fn narrow_accesses_are_bad_width_and_never_reach_the_host() {
        let host = FakeHost {
            calls: RefCell::new(vec![]),
            refusals: RefCell::new(vec![]),
            answer: HypercallStatus::Ok,
        };
        let mut h = VcpuHypercalls::new(0);
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
            refusals: RefCell::new(vec![]),
            answer: HypercallStatus::Ok,
        };
        let mut h = VcpuHypercalls::new(0);
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
            refusals: RefCell::new(vec![]),
            answer: HypercallStatus::Ok,
        };
        let mut h = VcpuHypercalls::new(0);
        let port = Hypercall::YieldTo as u16;
        h.handle_out(&host, port, &3u32.to_le_bytes());
        assert_eq!(read_status(&mut h, 4), HypercallStatus::Ok as u32);
        h.handle_out(&host, port, &4u32.to_le_bytes());
        assert_eq!(read_status(&mut h, 4), HypercallStatus::BadVcpu as u32);
        h.handle_out(&host, port, &[1]);
        assert_eq!(read_status(&mut h, 4), HypercallStatus::BadWidth as u32);
        assert_eq!(
            *host.refusals.borrow(),
            vec![HypercallStatus::BadVcpu, HypercallStatus::BadWidth]
        );
    }

    #[test]
    fn idle_and_send_ipi_decode_their_arguments() {
        let host = FakeHost {
            calls: RefCell::new(vec![]),
            refusals: RefCell::new(vec![]),
            answer: HypercallStatus::Ok,
        };
        let mut h = VcpuHypercalls::new(2);
        let idle = Hypercall::Idle as u16;
        assert_eq!(
            h.handle_out(&host, idle, &4000u32.to_le_bytes()),
            Some(Action::Continue)
        );
        assert_eq!(
            *host.calls.borrow(),
            vec![(2 << 32) | 4000],
            "caller and timeout"
        );
        let ipi = Hypercall::SendIpi as u16;
        let status = |h: &mut VcpuHypercalls| {
            let mut b = [0u8; 4];
            assert!(h.handle_in(ipi, &mut b));
            HypercallStatus::from_raw(u32::from_le_bytes(b))
        };
        h.handle_out(&host, ipi, &(3u32 << 16 | 0xf2).to_le_bytes());
        assert_eq!(status(&mut h), HypercallStatus::Ok);
        h.handle_out(&host, ipi, &(7u32 << 16 | 0xf2).to_le_bytes());
        assert_eq!(status(&mut h), HypercallStatus::BadVcpu);
        for garbage in [0x0300u32, u32::MAX, 1 << 16 | 0x0100 | 0xf2, 0x02f2] {
            h.handle_out(&host, ipi, &garbage.to_le_bytes());
            assert_eq!(status(&mut h), HypercallStatus::BadArgument, "{garbage:#x}");
        }
        assert_eq!(host.refusals.borrow().len(), 5);
    }
}
