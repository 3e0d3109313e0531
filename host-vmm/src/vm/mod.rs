//! The VM lifecycle: create, load, boot, wait for the guest (or the timeout), stop.

mod shared;

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use shared_abi::MAX_VCPUS;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub use shared::VmShared;

use crate::arch::x86_64::{acpi, boot, layout, x2apic};
use crate::devices::PioBus;
use crate::guest_events::EventLog;
use crate::hoststat::{self, SchedStat, ThreadStat};
use crate::loader::{self, KernelInfo};
use crate::policy::PolicySpec;
use crate::sched::fair_share::{self, Progress, ProgressSeries};
use crate::sched::{Backend, GuestView, VcpuMetrics, VmMetrics};
use crate::shared_region::Snapshot;
use crate::taskstat::{self, TaskStatFile};
use crate::vcpu::{self, Vcpu, VcpuContext};

const MIB: u64 = 1 << 20;
/// Smallest VM: the kernel image, its heap and page tables, and a stack per vCPU.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest VM: guest RAM must end below the 32-bit MMIO gap.
pub const MAX_MEM_MIB: u64 = layout::MEM_32BIT_GAP_START / MIB;
/// How often a waiting run checks for SIGINT/SIGTERM.
const INTERRUPT_POLL: Duration = Duration::from_millis(20);
/// How long stopping may take before vCPU threads are reported stuck.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("--vcpus {0} is outside 1..={MAX_VCPUS}")]
    BadVcpuCount(u32),
    #[error(
        "--vcpus {asked} is more than this host's KVM allows per VM ({kvm_max}: KVM_CAP_MAX_VCPUS and KVM_CAP_MAX_VCPU_ID)"
    )]
    TooManyVcpus { asked: u32, kvm_max: usize },
    #[error(
        "--mem {mem_mib} MiB is too small for this kernel: it needs at least {needed_mib} MiB"
    )]
    TooLittleMemory { mem_mib: u64, needed_mib: u64 },
    #[error("--mem {0} MiB is too large: guest RAM must end below the 3 GiB MMIO gap")]
    TooMuchMemory(u64),
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM {op} failed: {source}")]
    KvmOp {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("allocating guest memory: {0}")]
    Memory(#[from] vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("spawning a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("vCPU threads did not stop within {grace:?} after the VM ended ({outcome:?})")]
    StuckVcpus { grace: Duration, outcome: Outcome },
}

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmOp { op, source }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Label for the console prefix, the metrics and the trace.
    pub name: String,
    pub kernel: PathBuf,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub cmdline: String,
    pub timeout: Duration,
    /// Boost policy (a policy or a chain).
    pub policy: PolicySpec,
    /// Ask the guest for its events (ABI v5 event rings), for the trace.
    pub guest_events: bool,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this code to the exit port.
    GuestExit(u32),
    /// The guest was stopped after the timeout.
    Timeout(Duration),
    /// The guest could not go on (triple fault, failed entry, ...).
    GuestCrash { vcpu: u32, reason: String },
    /// The VMM failed while running the guest (a vCPU thread died).
    VmmFault { vcpu: u32, reason: String },
    /// The scheduler backend failed and stopped the VM.
    SchedulerFault(String),
    /// The VMM was asked to stop (SIGINT or SIGTERM) before the guest ended.
    Interrupted,
}

/// Result of a run.
#[derive(Debug)]
pub struct RunReport {
    pub name: String,
    pub policy: String,
    pub outcome: Outcome,
    /// From this VM's start to its own end (its outcome), not to the end of the whole run.
    pub elapsed: Duration,
    /// The shared region at the end of the run, if the guest registered one.
    pub shared: Option<Snapshot>,
    /// Port and MMIO accesses no device claimed.
    pub unclaimed_io: u64,
    /// YieldTo hypercalls naming each vCPU.
    pub yields_to: Vec<u64>,
    /// What the host scheduler gave each vCPU thread during the run (empty if unavailable).
    pub vcpu_stats: Vec<SchedStat>,
    /// The VM's run time and runnable time over the run, as its backend scheduled it.
    pub progress: ProgressSeries,
    /// What the backend counted for the VM and each vCPU.
    pub sched: Option<(VmMetrics, Vec<VcpuMetrics>)>,
    /// SendIpi hypercalls KVM could not deliver.
    pub failed_ipis: u64,
    /// Times a vCPU's steal-time area was marked preempted as it gave up its slot, and
    /// markings that failed.
    pub steal_time_marks: u64,
    pub steal_time_failures: u64,
    /// Whether the VMM marked descheduled vCPUs preempted at all (a backend that takes
    /// vCPUs off, on a host whose KVM never sets the flag itself: `vcpu::steal_time`).
    pub steal_time_marking: bool,
    /// Each vCPU's guest events (empty logs unless `VmConfig::guest_events`).
    pub guest_events: Vec<EventLog>,
}

/// Memory the kernel needs: its image, then room for heap, page tables and vCPU stacks.
pub fn min_mem_bytes(info: &KernelInfo, vcpus: u32) -> u64 {
    let per_vcpu = 128 * 1024;
    // The loader caps image.end at 4 GiB; saturate anyway rather than trust that here.
    info.image
        .end
        .saturating_add(MIB - 1)
        .saturating_add(8 * MIB)
        .saturating_add(vcpus as u64 * per_vcpu)
        .max(MIN_MEM_MIB * MIB)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("region has a host mapping");
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live anonymous mapping of exactly `memory_size` bytes owned
        // by `mem`, which outlives the VM: `build` creates `mem` before the VM (so early returns
        // drop the VM first) and VmShared declares `vm` before `mem` (so it drops first
        // there too). The slots do not overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_op("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// A VM that is built but not started: its vCPUs and the state they will share.
pub struct BuiltVm {
    shared: Arc<VmShared>,
    vcpus: Vec<Vcpu>,
}

/// A running VM.
pub struct RunningVm {
    shared: Arc<VmShared>,
    threads: Vec<JoinHandle<()>>,
    monitor: JoinHandle<Monitored>,
    started: Instant,
    name: String,
    policy: String,
}

/// Creates the VM described by `config` (serial output to `console`) and registers its
/// vCPUs with `backend`; nothing runs yet.
pub fn build(
    config: &VmConfig,
    console: Box<dyn Write + Send>,
    backend: Arc<dyn Backend>,
) -> Result<BuiltVm, VmError> {
    if config.vcpus == 0 || config.vcpus as usize > MAX_VCPUS {
        return Err(VmError::BadVcpuCount(config.vcpus));
    }
    let mem_size = config.mem_mib * MIB;
    if mem_size > layout::MEM_32BIT_GAP_START {
        return Err(VmError::TooMuchMemory(config.mem_mib));
    }
    let policy = config.policy.build();
    let kernel = loader::read_kernel(&config.kernel)?;
    let info = &kernel.info;
    let needed = min_mem_bytes(info, config.vcpus);
    if mem_size < needed {
        return Err(VmError::TooLittleMemory {
            mem_mib: config.mem_mib,
            needed_mib: needed.div_ceil(MIB),
        });
    }
    // Memory is created before the VM so that, on every early return, the VM (and with it
    // KVM's use of the mapping) goes first.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])?;
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    // vCPU i has id and APIC ID i: both limits bind.
    let kvm_max = kvm.get_max_vcpus().min(kvm.get_max_vcpu_id());
    if config.vcpus as usize > kvm_max {
        return Err(VmError::TooManyVcpus {
            asked: config.vcpus,
            kvm_max,
        });
    }
    let vm = kvm.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?;
    register_memory(&vm, &mem)?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS)
        .map_err(kvm_op("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_op("KVM_CREATE_IRQCHIP"))?;
    x2apic::enable_32bit_ids(&vm).map_err(kvm_op("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_op("KVM_CREATE_PIT2"))?;

    let entry = loader::load(&kernel, &mem, mem_size)?;
    let rsdp = acpi::write_tables(&mem, config.vcpus)?;
    let start_info = boot::write_pvh_boot_data(&mem, mem_size, &config.cmdline, rsdp)?;

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        let v = Vcpu::create(&vm, id, config.vcpus, &supported)?;
        if id == 0 {
            v.set_pvh_entry(entry.0, start_info.0)?;
        }
        vcpus.push(v);
    }

    let ram = boot::memory_map(mem_size)
        .iter()
        .filter(|e| e.type_ == boot::E820_RAM)
        .map(|e| e.addr..e.addr + e.size)
        .collect();
    let n = config.vcpus;
    let shared = Arc::new_cyclic(|me: &Weak<VmShared>| {
        let view: Weak<dyn GuestView> = me.clone();
        let handle = backend.add_vm(policy, n as usize, view);
        VmShared {
            vm,
            mem,
            ram,
            pio: PioBus::new(console),
            nr_vcpus: n,
            kernel_image: info.image.clone(),
            shared_region: OnceLock::new(),
            registering: Mutex::new(()),
            outcome: Mutex::new(None),
            outcome_cv: Condvar::new(),
            ended: OnceLock::new(),
            stop: AtomicBool::new(false),
            unclaimed_mmio: AtomicU64::new(0),
            yields_to: (0..n).map(|_| AtomicU64::new(0)).collect(),
            tids: (0..n).map(|_| AtomicI32::new(0)).collect(),
            failed_ipis: AtomicU64::new(0),
            steal_time_marks: AtomicU64::new(0),
            steal_time_failures: AtomicU64::new(0),
            events_wanted: config.guest_events,
            event_region: OnceLock::new(),
            event_logs: Mutex::new(vec![EventLog::default(); n as usize]),
            backend,
            handle,
        }
    });
    Ok(BuiltVm { shared, vcpus })
}

impl BuiltVm {
    /// Starts the vCPU threads and the monitor.
    pub fn start(self, config: &VmConfig) -> Result<RunningVm, VmError> {
        let shared = self.shared;
        let started = Instant::now();
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (i, v) in self.vcpus.into_iter().enumerate() {
            let vm_shared = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name(format!("{}-vcpu{i}", config.name))
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    vm_shared.tids[i].store(unsafe { libc::gettid() }, Ordering::Release);
                    let run = std::panic::catch_unwind(AssertUnwindSafe(|| v.run(&*vm_shared)));
                    if run.is_err() {
                        vm_shared.finish(Outcome::VmmFault {
                            vcpu: i as u32,
                            reason: "vCPU thread panicked".into(),
                        });
                        vm_shared.backend.exit(vm_shared.key(i as u32));
                    }
                })
                .map_err(VmError::Thread);
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let outcome = Outcome::VmmFault {
                        vcpu: i as u32,
                        reason: "vCPU thread not started".into(),
                    };
                    shared.finish(outcome.clone());
                    stop_vcpus(threads, &outcome)?;
                    return Err(e);
                }
            }
        }
        let monitor = {
            let vm_shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("{}-monitor", config.name))
                .spawn(move || monitor(&vm_shared))
        };
        let monitor = match monitor {
            Ok(m) => m,
            Err(e) => {
                let outcome = Outcome::VmmFault {
                    vcpu: 0,
                    reason: "monitor thread not started".into(),
                };
                shared.finish(outcome.clone());
                stop_vcpus(threads, &outcome)?;
                return Err(VmError::Thread(e));
            }
        };
        Ok(RunningVm {
            shared,
            threads,
            monitor,
            started,
            name: config.name.clone(),
            policy: config.policy.to_string(),
        })
    }
}

impl RunningVm {
    /// Waits until the guest ends, `deadline` passes (then it is stopped as timed out after
    /// `timeout`) or `interrupt` is set (then it is stopped as interrupted).
    pub fn wait(&self, deadline: Instant, timeout: Duration, interrupt: &AtomicBool) -> Outcome {
        wait_for_outcome(&self.shared, deadline, timeout, interrupt)
    }

    /// Stops the vCPU threads and gathers the report.
    pub fn stop(self, outcome: Outcome) -> Result<RunReport, VmError> {
        let shared = self.shared;
        shared.finish(outcome.clone());
        stop_vcpus(self.threads, &outcome)?;
        let Monitored {
            vcpu_stats,
            progress,
        } = self.monitor.join().unwrap_or_default();
        shared.pio.flush();
        let elapsed = match shared.ended.get() {
            Some(end) => end.saturating_duration_since(self.started),
            None => self.started.elapsed(),
        };
        let snapshot = shared
            .registration()
            .and_then(|reg| Snapshot::take(&shared.mem, &reg).ok());
        let yields_to = shared
            .yields_to
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let unclaimed_io =
            shared.pio.unclaimed_accesses() + shared.unclaimed_mmio.load(Ordering::Relaxed);
        let guest_events =
            std::mem::take(&mut *shared.event_logs.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(RunReport {
            name: self.name,
            policy: self.policy,
            outcome,
            elapsed,
            shared: snapshot,
            unclaimed_io,
            yields_to,
            vcpu_stats,
            progress,
            sched: shared.backend.report(shared.handle.vm),
            failed_ipis: shared.failed_ipis.load(Ordering::Relaxed),
            steal_time_marks: shared.steal_time_marks.load(Ordering::Relaxed),
            steal_time_failures: shared.steal_time_failures.load(Ordering::Relaxed),
            steal_time_marking: shared.backend.takes_vcpus_off()
                && crate::vcpu::steal_time::kvm_never_marks_preempted(),
            guest_events,
        })
    }
}

/// Runs every VM in `vms` on `backend` at once until each has ended, `timeout` passed or
/// `interrupt` is set (SIGINT/SIGTERM: the guests still running are stopped as
/// `Outcome::Interrupted`); one report per VM, in order. A VM that cannot be built fails
/// the whole run before any guest starts.
pub fn run_all(
    vms: Vec<(VmConfig, Box<dyn Write + Send>)>,
    backend: Arc<dyn Backend>,
    timeout: Duration,
    interrupt: &AtomicBool,
) -> Result<Vec<RunReport>, VmError> {
    let mut built = Vec::with_capacity(vms.len());
    for (config, console) in vms {
        let b = build(&config, console, Arc::clone(&backend))?;
        built.push((config, b));
    }
    let mut running = Vec::with_capacity(built.len());
    for (config, b) in built {
        match b.start(&config) {
            Ok(r) => running.push(r),
            Err(e) => {
                for r in running {
                    let _ = r.stop(Outcome::VmmFault {
                        vcpu: 0,
                        reason: "another VM failed to start".into(),
                    });
                }
                return Err(e);
            }
        }
    }
    let deadline = Instant::now() + timeout;
    let outcomes: Vec<Outcome> = running
        .iter()
        .map(|r| r.wait(deadline, timeout, interrupt))
        .collect();
    running
        .into_iter()
        .zip(outcomes)
        .map(|(r, o)| r.stop(o))
        .collect()
}

/// What a VM's monitor saw over the run.
#[derive(Default)]
struct Monitored {
    /// Each vCPU thread's schedstat totals.
    vcpu_stats: Vec<SchedStat>,
    progress: ProgressSeries,
}

/// Samples each vCPU thread's schedstat until the VM stops, publishing the host fields of
/// the shared records, and the VM's progress for its fair share.
fn monitor(vm: &VmShared) -> Monitored {
    let mut progress = ProgressSeries::default();
    let n = vm.tids.len();
    let mut files: Vec<Option<ThreadStat>> = (0..n).map(|_| None).collect();
    let mut first: Vec<Option<SchedStat>> = vec![None; n];
    let mut last: Vec<SchedStat> = vec![SchedStat::default(); n];
    let mut tasks: Vec<Option<TaskStatFile>> = (0..n).map(|_| None).collect();
    let mut looked = Instant::now();
    while !vm.stopping() {
        std::thread::sleep(hoststat::INTERVAL);
        // The real interval: the monitor itself may be kept off a CPU (by boosted threads).
        let at = Instant::now();
        let interval = at.duration_since(looked);
        looked = at;
        let reg = vm.registration();
        let mut seen = Vec::with_capacity(n);
        for i in 0..n {
            let tid = vm.tids[i].load(Ordering::Acquire);
            if files[i].is_none() && tid != 0 {
                files[i] = ThreadStat::open(tid).ok();
            }
            if tasks[i].is_none() && tid != 0 {
                tasks[i] = TaskStatFile::open(tid).ok();
            }
            let task = tasks[i].as_mut().and_then(TaskStatFile::read);
            seen.extend(task);
            let Some(now) = files[i].as_mut().and_then(ThreadStat::read) else {
                // No wait figures: not known to be preempted, still looked at.
                if tid != 0 {
                    vm.backend.observe(vm.key(i as u32), false);
                }
                continue;
            };
            let base = *first[i].get_or_insert(now);
            let waited = now
                .wait_ns
                .saturating_sub(last[i].wait_ns.max(base.wait_ns));
            last[i] = now;
            // Preempted, as KVM's flag would say: runnable now (not asleep in an idle wait)
            // and kept waiting for a CPU most of the last interval.
            let preempted =
                hoststat::mostly_waiting(waited, interval) && task.is_none_or(|t| t.runnable());
            vm.backend.observe(vm.key(i as u32), preempted);
            if let Some(reg) = reg.as_ref().filter(|_| !vm.backend.publishes_host_fields()) {
                hoststat::publish(
                    &vm.mem,
                    reg,
                    i as u32,
                    preempted,
                    now.wait_ns - base.wait_ns,
                );
            }
        }
        // A look stands for the time since the previous one, but no more than two periods:
        // a late look (the monitor kept waiting) says little about the time it missed.
        let weight = interval.min(2 * hoststat::INTERVAL).as_nanos() as u64;
        vm.backend
            .sampled(vm.handle.vm, taskstat::stacked(&seen), weight);
        let (run_ns, runnable_ns) = vm.backend.progress(vm.handle.vm).unwrap_or_else(|| {
            first
                .iter()
                .zip(&last)
                .filter_map(|(b, l)| Some((b.as_ref()?, l)))
                .fold((0, 0), |(run, runnable), (b, l)| {
                    let r = l.run_ns.saturating_sub(b.run_ns);
                    (run + r, runnable + r + l.wait_ns.saturating_sub(b.wait_ns))
                })
        });
        progress.push(Progress {
            at_ns: at.saturating_duration_since(fair_share::epoch()).as_nanos() as u64,
            run_ns,
            runnable_ns,
        });
    }
    let vcpu_stats = (0..n)
        .map(|i| match first[i] {
            Some(b) => SchedStat {
                run_ns: last[i].run_ns.saturating_sub(b.run_ns),
                wait_ns: last[i].wait_ns.saturating_sub(b.wait_ns),
                slices: last[i].slices.saturating_sub(b.slices),
            },
            None => SchedStat::default(),
        })
        .collect();
    Monitored {
        vcpu_stats,
        progress,
    }
}

fn wait_for_outcome(
    vm: &VmShared,
    deadline: Instant,
    timeout: Duration,
    interrupt: &AtomicBool,
) -> Outcome {
    let mut o = vm.outcome.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(outcome) = o.clone() {
            return outcome;
        }
        let now = Instant::now();
        let stop_as = if interrupt.load(Ordering::Relaxed) {
            Some(Outcome::Interrupted)
        } else {
            (now >= deadline).then_some(Outcome::Timeout(timeout))
        };
        if let Some(stop_as) = stop_as {
            drop(o);
            vm.finish(stop_as.clone());
            // The guest may have ended just before: the first outcome recorded wins.
            return vm
                .outcome
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or(stop_as);
        }
        // Wake up now and then to see the interrupt flag (a signal handler cannot notify).
        let nap = (deadline - now).min(INTERRUPT_POLL);
        o = vm
            .outcome_cv
            .wait_timeout(o, nap)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Kicks every vCPU thread out of KVM_RUN until all have returned, then joins them.
///
/// A kick that lands just before a thread re-enters KVM_RUN is lost, so kicks repeat until
/// the thread is seen finished; `stop` is already set, so the thread leaves at its next check.
fn stop_vcpus(threads: Vec<JoinHandle<()>>, outcome: &Outcome) -> Result<(), VmError> {
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let running: Vec<_> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(VmError::StuckVcpus {
                grace: STOP_GRACE,
                outcome: outcome.clone(),
            });
        }
        for t in running {
            vcpu::kick_thread(t);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
