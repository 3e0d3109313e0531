//! The Linux backend: the host scheduler runs every vCPU thread as it likes. Only what KVM
//! cannot do inside KVM_RUN goes through here: the Idle hypercall (a timed wait ended by an
//! IPI) and the counters. Policies are not consulted: a boost here would be a priority or
//! affinity change of the target thread, which is the next backend's job.

use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::metrics::{VcpuMetrics, VmMetrics};
use super::{Backend, GuestView, Kick, VmHandle};
use crate::policy::{BoostPolicy, Cpl};
use crate::shared_region::Snapshot;

#[derive(Default)]
struct Vcpu {
    vm: usize,
    /// An IPI arrived: the next (or current) idle ends.
    wake_token: bool,
    idle: bool,
    gone: bool,
    metrics: VcpuMetrics,
}

#[derive(Default)]
struct State {
    vcpus: Vec<Vcpu>,
    /// Per VM: key of vCPU 0 and count.
    vms: Vec<(usize, usize)>,
}

#[derive(Default)]
pub struct LinuxBackend {
    state: Mutex<State>,
    /// One for all: idle waits are slow paths.
    wake: Condvar,
}

impl LinuxBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for LinuxBackend {
    fn name(&self) -> &'static str {
        "linux"
    }

    fn add_vm(&self, _: Box<dyn BoostPolicy>, vcpus: usize, _: Weak<dyn GuestView>) -> VmHandle {
        let mut s = self.lock();
        let vm = s.vms.len();
        let first = s.vcpus.len();
        s.vms.push((first, vcpus));
        s.vcpus.extend((0..vcpus).map(|_| Vcpu {
            vm,
            ..Default::default()
        }));
        VmHandle { vm, first }
    }

    fn start(&self, _: usize, _: Box<dyn Kick>) {}

    fn wait_turn(&self, _: usize) {}

    fn take_kick(&self, _: usize) -> bool {
        false
    }

    fn preempted(&self, _: usize, _: Cpl) {}

    fn spin_yield(&self, v: usize, named: Option<u32>, _: Option<&Snapshot>) {
        {
            let mut s = self.lock();
            let Some(c) = s.vcpus.get_mut(v) else {
                return;
            };
            c.metrics.yields += 1;
            let vm = c.vm;
            if let Some(&(first, len)) = s.vms.get(vm) {
                if let Some(n) = named.filter(|&n| (n as usize) < len) {
                    s.vcpus[first + n as usize].metrics.named_by_yields += 1;
                }
            }
        }
        // No directed yield from userspace: give this thread's CPU to whoever Linux picks.
        std::thread::yield_now();
    }

    fn idle(&self, v: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        let Some(c) = s.vcpus.get_mut(v) else {
            return;
        };
        if std::mem::take(&mut c.wake_token) {
            return;
        }
        c.metrics.halts += 1;
        c.idle = true;
        let started = Instant::now();
        loop {
            let c = &mut s.vcpus[v];
            if c.gone || std::mem::take(&mut c.wake_token) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .wake
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let c = &mut s.vcpus[v];
        c.idle = false;
        c.metrics.idle_ns += started.elapsed().as_nanos() as u64;
    }

    fn ipi(&self, v: usize, to: u32) {
        let mut s = self.lock();
        let Some(c) = s.vcpus.get_mut(v) else {
            return;
        };
        c.metrics.ipis_sent += 1;
        let vm = c.vm;
        let Some(&(first, len)) = s.vms.get(vm) else {
            return;
        };
        if (to as usize) < len {
            let t = &mut s.vcpus[first + to as usize];
            t.metrics.ipis_received += 1;
            t.wake_token = true;
            if t.idle {
                self.wake.notify_all();
            }
        }
    }

    /// Counted only: a boost here would be a priority change of the holdouts' threads.
    fn rcu_wait(&self, v: usize, _seq: u32, _shared: Option<&Snapshot>) {
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            c.metrics.rcu_waits += 1;
        }
    }

    fn bad_hypercall(&self, v: usize) {
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            c.metrics.bad_hypercalls += 1;
        }
    }

    fn exit(&self, v: usize) {
        if let Some(c) = self.lock().vcpus.get_mut(v) {
            c.gone = true;
        }
        self.wake.notify_all();
    }

    fn end_vm(&self, vm: usize) {
        let mut s = self.lock();
        if let Some(&(first, len)) = s.vms.get(vm) {
            for c in &mut s.vcpus[first..first + len] {
                c.gone = true;
            }
        }
        self.wake.notify_all();
    }

    fn report(&self, vm: usize) -> Option<(VmMetrics, Vec<VcpuMetrics>)> {
        let s = self.lock();
        let &(first, len) = s.vms.get(vm)?;
        let vcpus = s.vcpus[first..first + len]
            .iter()
            .map(|c| c.metrics.clone())
            .collect();
        Some((VmMetrics::default(), vcpus))
    }

    fn publishes_host_fields(&self) -> bool {
        false
    }
}
