//! Placement under the Linux backend: `spread` pins vCPU threads so that siblings share no
//! host CPU while another is free; `wake-affine` leaves the host's own placement.

use super::{LinuxBackend, State};
use crate::sched::affinity::pin_thread;
use crate::sched::placement::{spread_pins, Placement};
use crate::sched::rtboost;

impl LinuxBackend {
    /// Under `spread`, pins every live vCPU thread to the CPU `spread_pins` gives it now;
    /// only threads whose CPU changed move. A pin the kernel refuses (a CPU gone offline, a
    /// cpuset changed under the VMM) is said once and tried again at the next change.
    pub(super) fn repin(&self, s: &mut State) {
        if self.placement != Placement::Spread {
            return;
        }
        let spans: Vec<(usize, usize)> = s.vms.iter().map(|m| (m.first, m.len)).collect();
        let live: Vec<Vec<bool>> = spans
            .iter()
            .map(|&(f, n)| {
                s.vcpus[f..f + n]
                    .iter()
                    .map(|c| c.tid != 0 && !c.gone)
                    .collect()
            })
            .collect();
        let current: Vec<Vec<Option<usize>>> = spans
            .iter()
            .map(|&(f, n)| s.vcpus[f..f + n].iter().map(|c| c.pinned).collect())
            .collect();
        let pins = spread_pins(&live, &current, self.host_cpus.len());
        let mut failed = None;
        for (&(f, n), vm_pins) in spans.iter().zip(pins) {
            for (c, pin) in s.vcpus[f..f + n].iter_mut().zip(vm_pins) {
                let Some(p) = pin.filter(|_| pin != c.pinned) else {
                    continue;
                };
                match pin_thread(c.tid, self.host_cpus[p]) {
                    Ok(()) => c.pinned = pin,
                    Err(e) => failed = Some(e),
                }
            }
        }
        if let Some(e) = failed {
            if !std::mem::replace(&mut s.warned_pin, true) {
                eprintln!("pvsync: warning: spread could not pin a vCPU thread: {e}");
            }
        }
    }
}

/// Whether thread `tid` runs under a real-time policy now.
pub(super) fn real_time(tid: libc::pid_t) -> bool {
    rtboost::current(tid).is_some_and(|(p, _)| rtboost::is_real_time(p))
}
