//! What a VM's vCPU threads, its monitor and the scheduler backend share: guest memory, the
//! devices, the shared-region registration, how the VM ended; the hypercalls that act on
//! them; and what a vCPU thread (`VcpuContext`) and the backend (`GuestView`) ask of the VM.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use shared_abi::{HypercallStatus, IpiDest, IpiRequest, IDLE_MAX_US};
use vm_memory::GuestMemoryMmap;

use super::Outcome;
use crate::arch::x86_64::x2apic;
use crate::devices::PioBus;
use crate::guest_events::{self, EventLog, TscSync, MAX_EVENTS_PER_VM};
use crate::hoststat;
use crate::hypercall::HypercallHost;
use crate::sched::{Backend, GuestView, VmHandle};
use crate::shared_region::{self, Registration, Snapshot};
use crate::vcpu::steal_time::StealTimeError;
use crate::vcpu::{GuestEnd, VcpuContext};

/// State the vCPU threads share.
pub struct VmShared {
    /// Declared before `mem`: fields drop in order, and KVM must let go of the memory first.
    pub(super) vm: VmFd,
    pub mem: GuestMemoryMmap,
    /// Guest RAM as the memory map describes it (the legacy hole is not RAM).
    pub(super) ram: Vec<Range<u64>>,
    pub pio: PioBus,
    pub(super) nr_vcpus: u32,
    pub(super) kernel_image: Range<u64>,
    /// The accepted registration, set once for the VM's life: read without a lock, so that
    /// a backend holding its own lock (to publish a host field) never waits on a
    /// registration being validated.
    pub(super) shared_region: OnceLock<Registration>,
    /// Held while a registration is validated and accepted (one at a time).
    pub(super) registering: Mutex<()>,
    pub(super) outcome: Mutex<Option<Outcome>>,
    pub(super) outcome_cv: Condvar,
    /// When the outcome was recorded: the VM's own end, for its elapsed time.
    pub(super) ended: OnceLock<Instant>,
    pub(super) stop: AtomicBool,
    pub(super) unclaimed_mmio: AtomicU64,
    /// YieldTo hypercalls naming each vCPU.
    pub(super) yields_to: Vec<AtomicU64>,
    /// Host thread id of each vCPU thread (0 until it starts).
    pub(super) tids: Vec<AtomicI32>,
    /// KVM_SIGNAL_MSI failures (SendIpi hypercalls that could not be delivered).
    pub(super) failed_ipis: AtomicU64,
    /// Steal-time areas marked preempted as their vCPU gave up its slot.
    pub(super) steal_time_marks: AtomicU64,
    /// Markings that could not be made (no MSR, or an area outside guest memory).
    pub(super) steal_time_failures: AtomicU64,
    /// The host asks for guest events (it traces).
    pub(super) events_wanted: bool,
    /// The region, once the guest registered one with event rings and events were asked
    /// for: what vCPU threads drain (set once, read without a lock on every exit).
    pub(super) event_region: OnceLock<Registration>,
    /// Each vCPU thread's events, handed over when it leaves.
    pub(super) event_logs: Mutex<Vec<EventLog>>,
    pub backend: Arc<dyn Backend>,
    pub handle: VmHandle,
}

impl VmShared {
    /// Records how the VM ended (the first report wins), wakes the waiter, and releases the
    /// VM's vCPUs from the backend.
    pub fn finish(&self, outcome: Outcome) {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            *o = Some(outcome);
            let _ = self.ended.set(Instant::now());
        }
        self.stop.store(true, Ordering::Release);
        self.outcome_cv.notify_all();
        drop(o);
        self.backend.end_vm(self.handle.vm);
    }

    pub fn registration(&self) -> Option<Registration> {
        self.shared_region.get().cloned()
    }

    /// Injects fixed interrupt `vector` into vCPU `index` (APIC id = vCPU index).
    fn inject(&self, index: u32, vector: u8) -> bool {
        self.vm.signal_msi(x2apic::fixed_msi(index, vector)).is_ok()
    }
}

impl VcpuContext for VmShared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    fn key(&self, index: u32) -> usize {
        self.handle.first + index as usize
    }

    fn pio(&self) -> &PioBus {
        &self.pio
    }

    fn count_unclaimed_mmio(&self) {
        self.unclaimed_mmio.fetch_add(1, Ordering::Relaxed);
    }

    fn traces_events(&self) -> bool {
        self.event_region.get().is_some()
    }

    fn new_event_log(&self) -> EventLog {
        EventLog::with_cap(MAX_EVENTS_PER_VM / self.nr_vcpus.max(1) as usize)
    }

    fn drain_events(
        &self,
        index: u32,
        log: &mut EventLog,
        sync: &mut dyn FnMut() -> Option<TscSync>,
    ) {
        if let Some(reg) = self.event_region.get() {
            // Guest memory the VM owns for its whole life: a failed copy is a bug of ours,
            // not the guest's; the events are lost, the run goes on.
            let _ = guest_events::drain(&self.mem, reg, index, log, sync);
        }
    }

    fn rcu_nesting(&self, index: u32) -> u32 {
        self.event_region
            .get()
            .map_or(0, |reg| guest_events::rcu_nesting(&self.mem, reg, index))
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn steal_time_marked(&self, result: &Result<bool, StealTimeError>) {
        match result {
            Ok(true) => self.steal_time_marks.fetch_add(1, Ordering::Relaxed),
            Ok(false) => 0,
            Err(_) => self.steal_time_failures.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn events_done(&self, index: u32, mut log: EventLog) {
        log.sort();
        let mut logs = self.event_logs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = logs.get_mut(index as usize) {
            *slot = log;
        }
    }

    fn guest_ended(&self, index: u32, end: GuestEnd) {
        self.finish(match end {
            GuestEnd::Exit(code) => Outcome::GuestExit(code),
            GuestEnd::Crash(reason) => Outcome::GuestCrash {
                vcpu: index,
                reason,
            },
        });
    }
}

impl HypercallHost for VmShared {
    /// The RegisterSharedRegion hypercall.
    fn register_shared_region(&self, gpa: u64) -> HypercallStatus {
        let _one_at_a_time = self.registering.lock().unwrap_or_else(|e| e.into_inner());
        if self.shared_region.get().is_some() {
            return HypercallStatus::AlreadyRegistered;
        }
        match shared_region::validate(&self.mem, gpa, self.nr_vcpus, &self.kernel_image, &self.ram)
        {
            Ok(reg) => {
                if shared_region::mark_accepted(&self.mem, &reg, self.events_wanted).is_err() {
                    return HypercallStatus::BadAddress;
                }
                if self.events_wanted && reg.event_ring_entries > 0 {
                    let _ = self.event_region.set(reg.clone());
                }
                let _ = self.shared_region.set(reg);
                HypercallStatus::Ok
            }
            Err(status) => status,
        }
    }

    fn yield_to(&self, caller: u32, target: u32) -> HypercallStatus {
        let Some(counter) = self.yields_to.get(target as usize) else {
            return HypercallStatus::BadVcpu;
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // The policy reads the spinner's record (what it spins on, whom it waits for).
        let snapshot = self
            .registration()
            .and_then(|reg| Snapshot::take_some(&self.mem, &reg, &[caller]).ok());
        self.backend
            .spin_yield(self.key(caller), Some(target), snapshot.as_ref());
        HypercallStatus::Ok
    }

    fn idle(&self, caller: u32, timeout_us: u32) -> HypercallStatus {
        // 0: no timer armed (a tickless idle CPU): it sleeps until an IPI, as `hlt` would.
        let timeout =
            (timeout_us != 0).then(|| Duration::from_micros(timeout_us.min(IDLE_MAX_US) as u64));
        self.backend.idle(self.key(caller), timeout);
        HypercallStatus::Ok
    }

    fn send_ipi(&self, caller: u32, request: IpiRequest) -> HypercallStatus {
        let n = self.nr_vcpus;
        let targets = match request.dest {
            IpiDest::Vcpu(v) if (v as u32) < n => v as u32..v as u32 + 1,
            IpiDest::Vcpu(_) => return HypercallStatus::BadVcpu,
            IpiDest::AllButSelf => 0..n,
        };
        for t in targets.filter(|&t| t != caller || request.dest != IpiDest::AllButSelf) {
            if self.inject(t, request.vector) {
                self.backend.ipi(self.key(caller), t);
            } else {
                self.failed_ipis.fetch_add(1, Ordering::Relaxed);
            }
        }
        HypercallStatus::Ok
    }

    fn rcu_wait(&self, caller: u32, seq: u32) -> HypercallStatus {
        let snapshot = self
            .registration()
            .and_then(|reg| Snapshot::take_holdouts(&self.mem, &reg).ok());
        self.backend
            .rcu_wait(self.key(caller), seq, snapshot.as_ref());
        HypercallStatus::Ok
    }

    fn refused(&self, caller: u32, _: HypercallStatus) {
        self.backend.bad_hypercall(self.key(caller));
    }
}

impl GuestView for VmShared {
    fn snapshot(&self) -> Option<Result<Snapshot, ()>> {
        let reg = self.registration()?;
        Some(Snapshot::take(&self.mem, &reg).map_err(|_| ()))
    }

    fn publish_lent_by(&self, index: u32, value: u32) {
        if let Some(reg) = self.registration() {
            hoststat::publish_lent_by(&self.mem, &reg, index, value);
        }
    }

    fn backend_failed(&self, reason: &str) {
        self.finish(Outcome::SchedulerFault(reason.to_string()));
    }

    fn publish_host(&self, index: u32, preempted: bool, preempted_ns: u64, boosts: u64) {
        if let Some(reg) = self.registration() {
            hoststat::publish(&self.mem, &reg, index, preempted, preempted_ns);
            hoststat::publish_boosts(&self.mem, &reg, index, boosts);
        }
    }
}
