//! Guest hypercalls (port I/O, numbers in `shared_abi::Hypercall`): decoding and handling.

use shared_abi::{Hypercall, HypercallStatus};

use crate::vm::VmShared;

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
    pub fn handle_out(&mut self, vm: &VmShared, port: u16, data: &[u8]) -> Option<Action> {
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
        }
    }

    /// Handles an `in` from `port`; false if the port is not a hypercall.
    pub fn handle_in(&mut self, port: u16, data: &mut [u8]) -> bool {
        match Hypercall::from_port(port) {
            Some(Hypercall::RegisterSharedRegion) => {
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
