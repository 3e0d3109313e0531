//! One vCPU thread: KVM_RUN while the backend grants it CPU, until the guest exits, crashes,
//! or the VM is stopped.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuExit;

use super::kick::KickTarget;
use super::steal_time::{self, PreemptedMarker, StealTimeError};
use super::Vcpu;
use crate::devices::PioBus;
use crate::guest_events::{EventLog, Traced, TracedEvent, TscSync};
use crate::hypercall::{Action, HypercallHost, VcpuHypercalls};
use crate::sched::Backend;

/// How often an application processor that waits for INIT-SIPI-SIPI is looked at (it waits
/// outside KVM_RUN and outside the scheduler): every ms at first, backing off to a period
/// that grows with the VM ([`ap_poll_max`]), so the VM's waiting vCPUs together make at
/// most about `AP_POLLS_PER_SEC` `KVM_GET_MP_STATE` calls a second. A call costs several
/// us on a nested host: 1023 APs polled every 8 ms took both host CPUs, and the BSP, which
/// needed them to boot, took 36 s to reach its first timer.
const AP_WAIT_POLL: Duration = Duration::from_millis(1);
const AP_POLLS_PER_SEC: u64 = 20_000;

/// Longest poll period for an AP of a VM of `nr_vcpus`: 8 ms up to 160 vCPUs, then growing
/// with them (51 ms at 1024), which is also the most an AP's start can lag its SIPI.
fn ap_poll_max(nr_vcpus: u32) -> Duration {
    let per_vcpu_us = 1_000_000 / AP_POLLS_PER_SEC;
    Duration::from_micros(per_vcpu_us * nr_vcpus as u64).max(Duration::from_millis(8))
}

/// Failure injection for the tests of the VMM's error paths: `PVSYNC_INJECT=vcpu-panic:MS`
/// makes vCPU 0's thread panic MS ms after it starts (the VM ends with a VMM fault).
pub const INJECT_ENV: &str = "PVSYNC_INJECT";

/// When vCPU `index`'s thread is to panic, if `INJECT_ENV` asks for it.
fn injected_panic(index: u32) -> Option<Instant> {
    let v = std::env::var(INJECT_ENV).ok()?;
    let ms: u64 = v.strip_prefix("vcpu-panic:")?.parse().ok()?;
    (index == 0)
        .then(|| Instant::now().checked_add(Duration::from_millis(ms)))
        .flatten()
}

/// The time stamp counter MSR (Intel SDM vol. 4, table 2-2).
const MSR_IA32_TSC: u32 = 0x10;

/// How the guest ended, as one vCPU saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// It wrote this code to the exit port.
    Exit(u32),
    /// It cannot go on (triple fault, failed entry, ...), for this reason.
    Crash(String),
}

/// What a vCPU thread needs from its VM, which implements it (so this module never names
/// the VM's types): its hypercalls, devices, backend, and whether it is stopping.
pub trait VcpuContext: HypercallHost {
    /// True once the VM is being torn down.
    fn stopping(&self) -> bool;
    /// The backend that gives the VM's vCPUs CPU time.
    fn backend(&self) -> &dyn Backend;
    /// Backend key of vCPU `index`.
    fn key(&self, index: u32) -> usize;
    /// Port I/O that is not a hypercall goes here.
    fn pio(&self) -> &PioBus;
    /// An MMIO access hit no device.
    fn count_unclaimed_mmio(&self);
    /// The guest ended (as vCPU `index` saw it): the VM stops.
    fn guest_ended(&self, index: u32, end: GuestEnd);
    /// Whether the guest writes events for the host to drain (the host asked for them and
    /// the guest's region has rings).
    fn traces_events(&self) -> bool;
    /// An empty log, capped at this vCPU's share of the VM's events.
    fn new_event_log(&self) -> EventLog;
    /// Copies vCPU `index`'s new events into `log`; `sync` reads the clock pair that places
    /// them in time (called only when there are events).
    fn drain_events(
        &self,
        index: u32,
        log: &mut EventLog,
        sync: &mut dyn FnMut() -> Option<TscSync>,
    );
    /// vCPU `index`'s RCU read-side nesting, as its record says (0 when not tracing).
    fn rcu_nesting(&self, index: u32) -> u32;
    /// vCPU `index`'s thread leaves: its events.
    fn events_done(&self, index: u32, log: EventLog);
    /// Guest memory (where a vCPU's steal-time area lies).
    fn memory(&self) -> &vm_memory::GuestMemoryMmap;
    /// A vCPU that gave up its slot was marked preempted in its steal-time area
    /// (`Ok(true)`), had no area (`Ok(false)`), or could not be marked.
    fn steal_time_marked(&self, result: &Result<bool, StealTimeError>);
}

impl Vcpu {
    /// An application processor waiting for INIT-SIPI-SIPI would block inside KVM_RUN; it
    /// waits here instead, before the backend knows it as runnable, so it holds and queues
    /// for no slot (KVM_GET_MP_STATE takes pending INIT/SIPI events).
    fn wait_for_sipi(&self, vm: &impl VcpuContext) {
        if self.index == 0 {
            return;
        }
        let mut poll = AP_WAIT_POLL;
        let max = ap_poll_max(self.nr_vcpus);
        while !vm.stopping() {
            match self.fd.get_mp_state() {
                Ok(s) if s.mp_state != KVM_MP_STATE_RUNNABLE => {
                    std::thread::sleep(poll);
                    poll = (poll * 2).min(max);
                }
                _ => return,
            }
        }
    }

    /// The vCPU loop, on the vCPU's own thread. Reports how the guest ended through
    /// `vm.guest_ended`.
    pub fn run(mut self, vm: &impl VcpuContext) {
        let index = self.index;
        let key = vm.key(index);
        let backend = vm.backend();
        let kick_target = KickTarget::publish(&mut self.fd);
        self.wait_for_sipi(vm);
        backend.start(key, Box::new(kick_target.kicker()));
        backend.wait_turn(key);
        let mut hypercalls = VcpuHypercalls::new(index);
        let mut events = vm.new_event_log();
        let mut tsc = TscClock::default();
        let panic_at = injected_panic(index);
        // Sets the preempted flag of the vCPU's steal-time area when the slot scheduler
        // takes it off (steal_time.rs says when that is allowed).
        let mut marker = PreemptedMarker::new(
            backend.takes_vcpus_off() && steal_time::kvm_never_marks_preempted(),
        );
        // Whether the last KVM_RUN returned at an instruction boundary (-EINTR/-EAGAIN:
        // no port or MMIO access left for KVM to complete at the next KVM_RUN).
        let mut at_boundary = true;
        // A kick held back until KVM has completed the pending instruction.
        let mut kick_held = false;
        while !vm.stopping() {
            if panic_at.is_some_and(|at| Instant::now() >= at) {
                panic!("vCPU {index}: failure injected by {INJECT_ENV}");
            }
            if std::mem::take(&mut kick_held) || backend.take_kick(key) {
                if marker.wants_to_mark() && !at_boundary {
                    // Finish the instruction first, running no guest code: KVM completes
                    // it at KVM_RUN before it looks at immediate_exit (KVM's api.rst),
                    // then returns -EINTR (or another exit to serve first).
                    kick_held = true;
                    self.fd.set_kvm_immediate_exit(1);
                } else {
                    self.fd.set_kvm_immediate_exit(0);
                    // Traced runs only: a reader taken off its CPU inside its read section.
                    let reader = vm.traces_events().then(|| vm.rcu_nesting(index));
                    let off = reader.filter(|&n| n > 0).map(|n| (n, Instant::now()));
                    // The CPL first: no vCPU ioctl between the marking and the next KVM_RUN
                    // (a second kick while waiting reads it again after an earlier mark:
                    // harmless where marking is allowed, since KVM never stores the flag).
                    let cpl = self.cpl();
                    if let Some(r) = marker.mark(&self.fd, vm.memory()) {
                        vm.steal_time_marked(&r);
                    }
                    backend.preempted(key, cpl);
                    if let Some((nesting, at)) = off {
                        events.push(TracedEvent {
                            at,
                            what: Traced::ReaderPreempted {
                                nesting,
                                dur: at.elapsed(),
                            },
                        });
                    }
                    continue;
                }
            }
            marker.entering();
            let run = self.fd.run();
            at_boundary =
                matches!(&run, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN);
            let end = match run {
                Ok(VcpuExit::IoOut(port, data)) => port_out(vm, &mut hypercalls, port, data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !hypercalls.handle_in(port, data) {
                        vm.pio().read(port, data);
                    }
                    None
                }
                Ok(VcpuExit::MmioRead(_, data)) => {
                    vm.count_unclaimed_mmio();
                    data.fill(0xff);
                    None
                }
                Ok(VcpuExit::MmioWrite(..)) => {
                    vm.count_unclaimed_mmio();
                    None
                }
                Ok(VcpuExit::Shutdown) => {
                    Some(GuestEnd::Crash("shutdown exit (triple fault)".into()))
                }
                Ok(VcpuExit::Hlt) => Some(GuestEnd::Crash(
                    "HLT exited to userspace despite the in-kernel irqchip".into(),
                )),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(GuestEnd::Crash(format!(
                    "VM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
                ))),
                Ok(VcpuExit::InternalError) => Some(GuestEnd::Crash("KVM internal error".into())),
                Ok(other) => Some(GuestEnd::Crash(format!("unhandled exit {other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(GuestEnd::Crash(format!("KVM_RUN failed: {e}"))),
            };
            if vm.traces_events() {
                vm.drain_events(index, &mut events, &mut || tsc.sync(&self.fd));
            }
            if let Some(end) = end {
                vm.guest_ended(index, end);
                break;
            }
        }
        if vm.traces_events() {
            vm.drain_events(index, &mut events, &mut || tsc.sync(&self.fd));
        }
        vm.events_done(index, events);
        drop(kick_target);
        self.fd.set_kvm_immediate_exit(0);
        backend.exit(key);
    }
}

/// A port write: a hypercall, else a device's.
fn port_out(
    vm: &impl VcpuContext,
    hypercalls: &mut VcpuHypercalls,
    port: u16,
    data: &[u8],
) -> Option<GuestEnd> {
    match hypercalls.handle_out(vm, port, data) {
        Some(Action::Exit(code)) => Some(GuestEnd::Exit(code)),
        Some(Action::Continue) => None,
        None => {
            vm.pio().write(port, data);
            None
        }
    }
}

/// Reads the guest's time stamp counter (KVM_GET_MSRS) with the host clock, from the vCPU's
/// own thread while it is out of KVM_RUN; the counter's rate is asked once.
#[derive(Default)]
struct TscClock {
    khz: Option<u32>,
    /// A read failed: KVM cannot give the counter here, so it is not asked again (the
    /// drain then places events at the time it runs).
    failed: bool,
}

impl TscClock {
    fn sync(&mut self, fd: &kvm_ioctls::VcpuFd) -> Option<TscSync> {
        if self.failed {
            return None;
        }
        let s = self.read(fd);
        self.failed = s.is_none();
        s
    }

    fn read(&mut self, fd: &kvm_ioctls::VcpuFd) -> Option<TscSync> {
        let khz = match self.khz {
            Some(k) => k,
            None => *self.khz.insert(fd.get_tsc_khz().ok().filter(|&k| k > 0)?),
        };
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .ok()?;
        let read = fd.get_msrs(&mut msrs).ok()?;
        let host = Instant::now();
        (read == 1).then(|| TscSync {
            guest_tsc: msrs.as_slice()[0].data,
            host,
            tsc_khz: khz,
        })
    }
}
