//! The `pvsync` command line.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::devices::prefixed::PrefixedConsole;
use crate::policy::PolicySpec;
use crate::report::{self, SchedSummary};
use crate::scenario::{Scenario, VmSpec, MAX_VMS};
use crate::sched::trace::Trace;
use crate::sched::{Backend, CoreConfig, LinuxBackend, Placement, SlotBackend};
use crate::vm::{self, Outcome, RunReport, VmConfig};

/// Process exit status for a usage error (as clap uses).
pub const EXIT_USAGE: i32 = 2;
/// Process exit status when the VMM itself fails (bad image, bad configuration, KVM error).
pub const EXIT_HOST_ERROR: i32 = 70;
/// Process exit status when the guest did not exit before `--timeout`.
pub const EXIT_TIMEOUT: i32 = 124;
/// Process exit status when the guest crashed (triple fault, failed VM entry).
pub const EXIT_GUEST_CRASH: i32 = 125;

#[derive(Debug, Parser)]
#[command(
    name = "pvsync",
    version,
    about = "KVM VMM for the pvsync paravirtual synchronization lab",
    after_help = "Exit status: the guest's exit code (0 = success), 2 for a usage error, \
                  70 when the VMM fails, 124 on timeout, 125 when the guest crashes. With \
                  several VMs: 0 if every guest succeeded, else the first failing VM's status."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a PVH guest kernel and run it until it exits.
    Run(RunArgs),
    /// Draw (part of) a trace written by `run --trace` as an SVG timeline.
    Timeline(TimelineArgs),
}

#[derive(Debug, Args)]
pub struct TimelineArgs {
    /// Trace JSON written by `pvsync run --trace`.
    pub trace: PathBuf,
    /// SVG file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Start of the window, in milliseconds from the trace's start [default: 0].
    #[arg(long, value_name = "MS")]
    pub from_ms: Option<f64>,
    /// End of the window, in milliseconds [default: the trace's end].
    #[arg(long, value_name = "MS")]
    pub to_ms: Option<f64>,
    /// Only tracks whose name contains one of these (comma-separated), e.g.
    /// "state,shootdown,mode".
    #[arg(long, value_delimiter = ',')]
    pub tracks: Vec<String>,
    /// Only processes whose name contains this (e.g. a VM's name, or "slots").
    #[arg(long, value_delimiter = ',')]
    pub processes: Vec<String>,
    /// Title over the drawing.
    #[arg(long, default_value = "")]
    pub title: String,
    /// Width in pixels.
    #[arg(long, default_value_t = 1400, value_parser = clap::value_parser!(u32).range(400..=20_000))]
    pub width: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// PVH ELF kernel image to boot (the default for every --vm).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=3072))]
    pub mem: u64,
    /// Guest kernel command line (e.g. "test=selftest").
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// A VM to run beside the others: "key=value,..." with keys name, kernel, vcpus, mem,
    /// policy, count, and cmdline last (it takes the rest). Missing keys come from the flags
    /// above. Repeat for several VMs.
    #[arg(long = "vm", value_name = "SPEC")]
    pub vms: Vec<String>,
    /// TOML scenario: [sched] (backend, slots, slice_us, placement, policy, timeout) and
    /// [[vm]] tables with the --vm keys.
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Stop the guests after this many seconds [default: 60].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: Option<u64>,
    /// How vCPUs get CPU time: "slots" (the VMM's scheduler) or "linux" (host threads)
    /// [default: slots].
    #[arg(long)]
    pub backend: Option<String>,
    /// Host CPU slots for the slot backend [default: host CPUs].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub slots: Option<u64>,
    /// Time slice of the slot backend in microseconds [default: 3000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    pub slice_us: Option<u64>,
    /// Placement of runnable vCPUs: "spread" or "wake-affine" [default: spread].
    #[arg(long)]
    pub placement: Option<String>,
    /// Bind each slot to a host CPU, so that a hand-off wakes the next vCPU thread on the
    /// CPU the previous one leaves [default: on].
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new())]
    pub pin_slots: Option<bool>,
    /// Boost policy: none, kvm, kvm-ipi, pv, or a comma-separated chain [default: pv].
    #[arg(long)]
    pub policy: Option<PolicySpec>,
    /// Print the decoded shared region when the guest stops.
    #[arg(long)]
    pub dump_shared: bool,
    /// Write per-VM and per-vCPU metrics as JSON.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Write slot occupancy and boosts as a Chrome trace (chrome://tracing, Perfetto).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
}

/// Parses `args` and runs; returns the process exit status. Guest serial output goes to
/// `console`, the VMM's own messages to `log`.
pub fn main_with_args<I, T>(args: I, console: Box<dyn Write + Send>, log: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(log, "{}", e.render());
            return e.exit_code();
        }
    };
    match cli.command {
        Command::Run(a) => run(a, console, log),
        Command::Timeline(a) => timeline(a, log),
    }
}

/// `pvsync timeline`: reads a trace, keeps the tracks asked for, draws the window.
fn timeline(a: TimelineArgs, log: &mut dyn Write) -> i32 {
    let text = match std::fs::read_to_string(&a.trace) {
        Ok(t) => t,
        Err(e) => return usage(log, format!("reading {}: {e}", a.trace.display())),
    };
    let mut t = match crate::trace::json::read(&text) {
        Ok(t) => t,
        Err(e) => return usage(log, format!("{}: {e}", a.trace.display())),
    };
    let keep = |name: &str, filters: &[String]| {
        filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
    };
    t.processes.retain(|p| keep(&p.name, &a.processes));
    for p in &mut t.processes {
        p.tracks.retain(|tr| keep(&tr.name, &a.tracks));
    }
    let ms = |m: f64| (m.max(0.0) * 1e6) as u64;
    let from = a.from_ms.map_or(0, ms);
    let to = a.to_ms.map_or_else(|| t.end(), ms);
    if to <= from {
        return usage(log, "--to-ms must be after --from-ms");
    }
    let svg = crate::trace::svg::render(&t, from, to, a.width as f64, &a.title);
    match std::fs::write(&a.out, svg) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(log, "pvsync: error: writing {}: {e}", a.out.display());
            EXIT_HOST_ERROR
        }
    }
}

/// A usage error found after parsing (bad values, conflicting choices).
fn usage(log: &mut dyn Write, msg: impl std::fmt::Display) -> i32 {
    let _ = writeln!(log, "pvsync: error: {msg}");
    EXIT_USAGE
}

/// The backend chosen, kept concrete for its end-of-run duties.
enum Chosen {
    Slots(Arc<SlotBackend>),
    Linux(Arc<LinuxBackend>),
}

impl Chosen {
    fn as_backend(&self) -> Arc<dyn Backend> {
        match self {
            Chosen::Slots(b) => Arc::clone(b) as Arc<dyn Backend>,
            Chosen::Linux(b) => Arc::clone(b) as Arc<dyn Backend>,
        }
    }
}

/// Resolves the VMs to run: `--scenario` VMs, then `--vm` VMs, else the one VM of the flags.
fn vm_configs(
    a: &RunArgs,
    scenario: &Scenario,
    policy: &PolicySpec,
    timeout: Duration,
) -> Result<Vec<VmConfig>, String> {
    let mut specs = scenario.expand();
    for v in &a.vms {
        let spec = VmSpec::parse(v).map_err(|e| e.to_string())?;
        let count = spec.count.unwrap_or(1).min(MAX_VMS + 1);
        specs.extend(std::iter::repeat_n(
            VmSpec {
                count: None,
                ..spec
            },
            count,
        ));
    }
    if specs.len() > MAX_VMS {
        return Err(format!("at most {MAX_VMS} VMs per process"));
    }
    if specs.is_empty() {
        specs.push(VmSpec::default());
    }
    let many = specs.len() > 1;
    specs
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let kernel = v.kernel.or_else(|| a.kernel.clone()).ok_or_else(|| {
                "no kernel: give --kernel, or kernel= in every --vm or [[vm]]".to_string()
            })?;
            Ok(VmConfig {
                name: v
                    .name
                    .unwrap_or_else(|| if many { format!("vm{i}") } else { "vm".into() }),
                kernel,
                vcpus: v.vcpus.unwrap_or(a.vcpus),
                mem_mib: v.mem.unwrap_or(a.mem),
                cmdline: v.cmdline.unwrap_or_else(|| a.cmdline.clone()),
                timeout,
                policy: v.policy.unwrap_or_else(|| policy.clone()),
                guest_events: a.trace.is_some(),
            })
        })
        .collect()
}

fn run(a: RunArgs, console: Box<dyn Write + Send>, log: &mut dyn Write) -> i32 {
    let scenario = match &a.scenario {
        Some(p) => match Scenario::load(p) {
            Ok(s) => s,
            Err(e) => return usage(log, e),
        },
        None => Scenario::default(),
    };
    let sc = &scenario.sched;
    let timeout = Duration::from_secs(a.timeout.or(sc.timeout).unwrap_or(60).clamp(1, 86_400));
    let policy = a
        .policy
        .clone()
        .or_else(|| sc.policy.clone())
        .unwrap_or_default();
    let configs = match vm_configs(&a, &scenario, &policy, timeout) {
        Ok(c) => c,
        Err(e) => return usage(log, e),
    };
    let backend_name = a
        .backend
        .clone()
        .or_else(|| sc.backend.clone())
        .unwrap_or_else(|| "slots".into());
    let placement_name = a
        .placement
        .clone()
        .or_else(|| sc.placement.clone())
        .unwrap_or_else(|| Placement::default().name().into());
    let Some(placement) = Placement::by_name(&placement_name) else {
        return usage(
            log,
            format!("unknown placement '{placement_name}' (known: spread, wake-affine)"),
        );
    };
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let slots = a
        .slots
        .map(|n| n as usize)
        .or(sc.slots)
        .unwrap_or(host_cpus);
    let slice_us = a.slice_us.or(sc.slice_us).unwrap_or(3000);
    if !(1..=256).contains(&slots) || !(100..=1_000_000).contains(&slice_us) {
        return usage(log, "slots must be 1..=256 and slice_us 100..=1000000");
    }
    let chosen = match backend_name.as_str() {
        "slots" => {
            let cfg = CoreConfig {
                slots,
                slice: slice_us * 1000,
                placement,
                trace: a.trace.is_some(),
                pin_slots: a.pin_slots.unwrap_or(true),
                ..CoreConfig::default()
            };
            match SlotBackend::new(cfg) {
                Ok(b) => Chosen::Slots(b),
                Err(e) => {
                    let _ = writeln!(log, "pvsync: error: {e}");
                    return EXIT_HOST_ERROR;
                }
            }
        }
        "linux" => Chosen::Linux(Arc::new(LinuxBackend::new())),
        other => {
            return usage(
                log,
                format!("unknown backend '{other}' (known: slots, linux)"),
            )
        }
    };
    let summary = SchedSummary {
        backend: backend_name.clone(),
        slots: matches!(chosen, Chosen::Slots(_)).then_some(slots),
        slice_us: matches!(chosen, Chosen::Slots(_)).then_some(slice_us),
        placement: matches!(chosen, Chosen::Slots(_)).then(|| placement.name().to_string()),
    };

    let many = configs.len() > 1;
    let sink: Arc<Mutex<Box<dyn Write + Send>>> = Arc::new(Mutex::new(console));
    let vms: Vec<(VmConfig, Box<dyn Write + Send>)> = configs
        .into_iter()
        .map(|c| {
            let prefix = if many {
                format!("[{}] ", c.name)
            } else {
                String::new()
            };
            let out: Box<dyn Write + Send> =
                Box::new(PrefixedConsole::new(Arc::clone(&sink), prefix));
            (c, out)
        })
        .collect();
    let run_start = std::time::Instant::now();
    let result = vm::run_all(vms, chosen.as_backend(), timeout);
    let (trace, sched_failed) = match &chosen {
        Chosen::Slots(b) => match b.shutdown() {
            Ok(trace) => (trace, false),
            Err(e) => {
                let _ = writeln!(log, "pvsync: error: {e}");
                (None, true)
            }
        },
        Chosen::Linux(_) => (None, false),
    };
    let reports = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(log, "pvsync: error: {e}");
            return EXIT_HOST_ERROR;
        }
    };
    let status = finish(&a, &summary, &reports, trace, run_start, log);
    // A VM that ended before the scheduler failed may have succeeded; the run did not.
    if sched_failed {
        return EXIT_HOST_ERROR;
    }
    status
}

/// Prints and writes what the run produced; returns the process exit status.
fn finish(
    a: &RunArgs,
    summary: &SchedSummary,
    reports: &[RunReport],
    trace: Option<Trace>,
    run_start: std::time::Instant,
    log: &mut dyn Write,
) -> i32 {
    let mut status = 0;
    if a.dump_shared {
        for r in reports {
            match &r.shared {
                Some(snap) => {
                    let _ = write!(log, "{}", snap.render());
                }
                None => {
                    let _ = writeln!(log, "shared region: none registered ({})", r.name);
                }
            }
        }
    }
    if a.dump_shared || a.metrics.is_some() || a.trace.is_some() || reports.len() > 1 {
        let _ = write!(log, "{}", report::table(summary, reports));
    }
    if let Some(path) = &a.metrics {
        let json = report::json(summary, reports);
        if let Err(e) = std::fs::write(path, json.to_string() + "\n") {
            let _ = writeln!(
                log,
                "pvsync: error: writing metrics to {}: {e}",
                path.display()
            );
            status = EXIT_HOST_ERROR;
        }
    }
    if let Some(path) = &a.trace {
        let timeline = crate::trace::of_run(run_start, trace.as_ref(), reports);
        let settings = serde_json::json!({
            "backend": summary.backend,
            "vms": reports.iter().map(|r| serde_json::json!({
                "name": r.name, "vcpus": r.yields_to.len(), "policy": r.policy,
            })).collect::<Vec<_>>(),
        });
        let written = std::fs::File::create(path).and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            crate::trace::json::write(&timeline, settings, &mut w)?;
            w.flush()
        });
        match written {
            Ok(()) => {
                let spans = timeline.spans().count();
                let _ = writeln!(
                    log,
                    "pvsync: trace: {spans} spans to {} (lost: {:?})",
                    path.display(),
                    timeline.losses
                );
            }
            Err(e) => {
                let _ = writeln!(
                    log,
                    "pvsync: error: writing trace to {}: {e}",
                    path.display()
                );
                status = EXIT_HOST_ERROR;
            }
        }
    }
    let mut first_failure = None;
    for r in reports {
        let code = report_outcome(r, reports.len() > 1, log);
        if code != 0 && first_failure.is_none() {
            first_failure = Some(code);
        }
    }
    if status != 0 {
        return status;
    }
    first_failure.unwrap_or(0)
}

/// Prints how one VM ended; returns its exit status.
fn report_outcome(r: &RunReport, many: bool, log: &mut dyn Write) -> i32 {
    let who = if many {
        format!("{}: ", r.name)
    } else {
        String::new()
    };
    let yields: u64 = r.yields_to.iter().sum();
    if yields > 0 {
        let _ = writeln!(
            log,
            "pvsync: {who}yield-to hypercalls by target vcpu: {:?}",
            r.yields_to
        );
    }
    if r.unclaimed_io > 0 {
        let _ = writeln!(
            log,
            "pvsync: {who}note: {} I/O accesses hit no device",
            r.unclaimed_io
        );
    }
    let secs = r.elapsed.as_secs_f64();
    match &r.outcome {
        Outcome::GuestExit(code) => {
            let _ = writeln!(
                log,
                "pvsync: {who}guest exited with code {code} after {secs:.3} s"
            );
            (*code).min(255) as i32
        }
        Outcome::Timeout(t) => {
            let _ = writeln!(
                log,
                "pvsync: {who}error: guest did not exit within {} s; stopped it",
                t.as_secs()
            );
            EXIT_TIMEOUT
        }
        Outcome::VmmFault { vcpu, reason } => {
            let _ = writeln!(
                log,
                "pvsync: {who}error: VMM fault on vcpu {vcpu}: {reason}"
            );
            EXIT_HOST_ERROR
        }
        Outcome::GuestCrash { vcpu, reason } => {
            let _ = writeln!(
                log,
                "pvsync: {who}error: guest crashed on vcpu {vcpu}: {reason}"
            );
            EXIT_GUEST_CRASH
        }
        Outcome::SchedulerFault(reason) => {
            let _ = writeln!(log, "pvsync: {who}error: the scheduler failed: {reason}");
            EXIT_HOST_ERROR
        }
    }
}
