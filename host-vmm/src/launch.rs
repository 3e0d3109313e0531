//! One `pvsync run`: settle the settings (flags over scenario over defaults), check all of
//! them and create every output before any guest starts (usage errors, status 2), run the
//! VMs, then report: outcome lines, table, metrics, trace, and the process status.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{self, RunArgs, EXIT_HOST_ERROR, EXIT_INTERRUPTED, EXIT_USAGE};
use crate::devices::capture::{Capture, Captured};
use crate::devices::console_writer::{self, ConsoleWriter};
use crate::devices::prefixed::PrefixedConsole;
use crate::hostinfo::HostInfo;
use crate::outputs::{ConsoleLogs, OutputError, Outputs};
use crate::plan::{self, Defaults, PlanError};
use crate::printable::say_error;
use crate::report;
use crate::results::{self, RunSettings, VmRun};
use crate::scenario::{Scenario, ScenarioError};
use crate::sched::trace::Trace;
use crate::sched::{
    Backend, CoreConfig, LinuxBackend, Placement, SlotBackend, LINUX_LEDGER, SLOT_LEDGER,
};
use crate::signals::INTERRUPTED;
use crate::vm::{self, Outcome, RunReport, VmConfig};

/// Longest `--timeout` (a day).
const MAX_TIMEOUT_S: u64 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("{what}: unknown backend '{name}' (known: slots, linux)")]
    Backend { what: &'static str, name: String },
    #[error("{what}: unknown placement '{name}' (known: spread, wake-affine)")]
    Placement { what: &'static str, name: String },
    #[error("{what} {value} is outside {range}")]
    Range {
        what: &'static str,
        value: u64,
        range: &'static str,
    },
}

/// Everything checked, before any guest starts.
struct Plan {
    settings: RunSettings,
    placement: Placement,
    timeout: Duration,
}

/// The flag's value, else the scenario's, each named for messages.
fn pick<T>(
    flag: Option<T>,
    scenario: Option<T>,
    flag_name: &'static str,
) -> Option<(T, &'static str)> {
    match flag {
        Some(v) => Some((v, flag_name)),
        None => scenario.map(|v| (v, "the scenario's [sched]")),
    }
}

fn in_range(
    v: Option<(u64, &'static str)>,
    range: std::ops::RangeInclusive<u64>,
    text: &'static str,
) -> Result<Option<u64>, LaunchError> {
    match v {
        Some((value, what)) if !range.contains(&value) => Err(LaunchError::Range {
            what,
            value,
            range: text,
        }),
        other => Ok(other.map(|(v, _)| v)),
    }
}

fn plan(a: &RunArgs, scenario: Option<(&Path, &Scenario)>) -> Result<Plan, LaunchError> {
    let sc = scenario.map(|(_, s)| s.sched.clone()).unwrap_or_default();
    let timeout_s = in_range(
        pick(a.timeout, sc.timeout, "--timeout"),
        1..=MAX_TIMEOUT_S,
        "1..=86400",
    )?
    .unwrap_or(60);
    let slots = in_range(
        pick(a.slots, sc.slots.map(|n| n as u64), "--slots"),
        1..=256,
        "1..=256",
    )?;
    let slice_us = in_range(
        pick(a.slice_us, sc.slice_us, "--slice-us"),
        100..=1_000_000,
        "100..=1000000",
    )?
    .unwrap_or(3000);
    let policy = a.policy.clone().or(sc.policy).unwrap_or_default();
    let (backend, what) = pick(a.backend.clone(), sc.backend, "--backend")
        .unwrap_or_else(|| ("slots".into(), "--backend"));
    if backend != "slots" && backend != "linux" {
        return Err(LaunchError::Backend {
            what,
            name: backend,
        });
    }
    let slotted = backend == "slots";
    let placement = match pick(a.placement.clone(), sc.placement, "--placement") {
        // The slot scheduler spreads by default; under the Linux backend the default is the
        // host's own placement.
        None if slotted => Placement::default(),
        None => Placement::WakeAffine,
        Some((name, what)) => {
            Placement::by_name(&name).ok_or(LaunchError::Placement { what, name })?
        }
    };
    let timeout = Duration::from_secs(timeout_s);
    let defaults = Defaults {
        kernel: a.kernel.as_deref(),
        vcpus: a.vcpus,
        mem_mib: a.mem,
        cmdline: &a.cmdline,
        policy: &policy,
        timeout,
    };
    let vms = plan::resolve(&defaults, scenario, &a.vms)?;
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let settings = RunSettings {
        backend,
        slots: slotted.then(|| slots.map_or(host_cpus, |n| n as usize)),
        slice_us: slotted.then_some(slice_us),
        placement: Some(placement.name().to_string()),
        pin_slots: slotted.then(|| a.pin_slots.unwrap_or(true)),
        ledger: if slotted { SLOT_LEDGER } else { LINUX_LEDGER },
        timeout_s,
        tracing: a.trace.is_some() || a.results.is_some(),
        vms,
    };
    Ok(Plan {
        settings,
        placement,
        timeout,
    })
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

pub(crate) fn usage(log: &mut dyn Write, e: impl std::fmt::Display) -> i32 {
    say_error(log, format_args!("{e}"));
    EXIT_USAGE
}

/// Runs `pvsync run`; returns the process exit status.
pub fn run(a: &RunArgs, console: Box<dyn Write + Send>, log: &mut dyn Write) -> i32 {
    // Only a run has guests to stop and results to save; without the handler Ctrl-C still
    // ends it, only without its results.
    if let Err(e) = crate::signals::install() {
        let _ = writeln!(log, "pvsync: warning: {e}");
    }
    let scenario = match &a.scenario {
        Some(p) => match Scenario::load(p) {
            Ok(s) => Some((p.as_path(), s)),
            Err(e) => return usage(log, e),
        },
        None => None,
    };
    let mut p = match plan(a, scenario.as_ref().map(|(p, s)| (*p, s))) {
        Ok(p) => p,
        Err(e) => return usage(log, e),
    };
    let slotted = p.settings.slots.is_some();
    let names: Vec<String> = p.settings.vms.iter().map(|c| c.name.clone()).collect();
    let (outputs, logs) = match Outputs::prepare(
        a.metrics.as_deref(),
        a.trace.as_deref(),
        a.results.as_deref(),
        &names,
    ) {
        Ok(o) => o,
        Err(e) => return usage(log, e),
    };
    for c in &mut p.settings.vms {
        c.guest_events = outputs.wants_trace();
    }
    let chosen = if slotted {
        let cfg = CoreConfig {
            slots: p.settings.slots.unwrap_or(1),
            slice: p.settings.slice_us.unwrap_or(3000) * 1000,
            placement: p.placement,
            trace: outputs.wants_trace(),
            pin_slots: p.settings.pin_slots.unwrap_or(true),
            ..CoreConfig::default()
        };
        match SlotBackend::new(cfg) {
            Ok(b) => Chosen::Slots(b),
            Err(e) => {
                say_error(log, format_args!("{e}"));
                return EXIT_HOST_ERROR;
            }
        }
    } else {
        Chosen::Linux(Arc::new(LinuxBackend::new(p.placement)))
    };

    // Guests write to a buffer a thread drains: a stdout that stops reading cannot stop them.
    let console = match ConsoleWriter::new(console, console_writer::CAPACITY) {
        Ok(w) => Box::new(w),
        Err(e) => {
            say_error(log, format_args!("starting the console writer thread: {e}"));
            return EXIT_HOST_ERROR;
        }
    };
    let (vms, seen) = consoles(&p.settings.vms, console, logs);
    if INTERRUPTED.load(Ordering::SeqCst) {
        let _ = writeln!(log, "pvsync: interrupted before the guests started");
        return EXIT_INTERRUPTED;
    }
    let run_start = Instant::now();
    let result = vm::run_all(vms, chosen.as_backend(), p.timeout, &INTERRUPTED);
    let signalled = INTERRUPTED.load(Ordering::SeqCst);
    let (trace, sched_failed) = match &chosen {
        Chosen::Slots(b) => match b.shutdown() {
            Ok(trace) => (trace, false),
            Err(e) => {
                say_error(log, format_args!("{e}"));
                (None, true)
            }
        },
        Chosen::Linux(_) => (None, false),
    };
    let reports = match result {
        Ok(r) => r,
        Err(e) => {
            say_error(log, format_args!("{e}"));
            return if signalled {
                EXIT_INTERRUPTED
            } else {
                EXIT_HOST_ERROR
            };
        }
    };
    let seen: Vec<Captured> = seen
        .into_iter()
        .map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(|e| e.into_inner())))
        .collect();
    let end = End {
        a,
        settings: &p.settings,
        outputs: &outputs,
        reports: &reports,
        seen: &seen,
        // A signal that came after every guest had ended interrupted nothing.
        interrupted: reports.iter().any(|r| r.outcome == Outcome::Interrupted),
        run_start,
    };
    end.finish(trace, sched_failed, log)
}

/// One console per VM: its lines prefixed with its name (when several VMs share the output)
/// and captured (RESULT lines; with `--results`, its own log file), all into `console`
/// (with `--results`, also into console.log).
#[allow(clippy::type_complexity)]
fn consoles(
    configs: &[VmConfig],
    console: Box<dyn Write + Send>,
    logs: Option<ConsoleLogs>,
) -> (
    Vec<(VmConfig, Box<dyn Write + Send>)>,
    Vec<Arc<Mutex<Captured>>>,
) {
    let (all_log, mut per_vm) = match logs {
        Some(l) => (Some(l.all), l.per_vm.into_iter().map(Some).collect()),
        None => (None, Vec::new()),
    };
    per_vm.resize_with(configs.len(), || None);
    let (all, all_seen) = Capture::new(console, all_log);
    let sink: Arc<Mutex<Box<dyn Write + Send>>> = Arc::new(Mutex::new(Box::new(all)));
    let many = configs.len() > 1;
    let mut seen = vec![all_seen];
    let vms = configs
        .iter()
        .zip(per_vm)
        .map(|(c, vm_log)| {
            let prefix = if many {
                format!("[{}] ", c.name)
            } else {
                String::new()
            };
            let prefixed = Box::new(PrefixedConsole::new(Arc::clone(&sink), prefix));
            let (out, vm_seen) = Capture::new(prefixed, vm_log);
            seen.push(vm_seen);
            (c.clone(), Box::new(out) as Box<dyn Write + Send>)
        })
        .collect();
    (vms, seen)
}

/// What the end of a run reports from.
struct End<'a> {
    a: &'a RunArgs,
    settings: &'a RunSettings,
    outputs: &'a Outputs,
    reports: &'a [RunReport],
    /// The combined console's capture, then one per VM.
    seen: &'a [Captured],
    interrupted: bool,
    /// When the guests started: the trace's time zero when no scheduler trace sets one.
    run_start: Instant,
}

impl End<'_> {
    /// Prints and writes what the run produced; returns the process exit status.
    fn finish(&self, trace: Option<Trace>, sched_failed: bool, log: &mut dyn Write) -> i32 {
        let a = self.a;
        let reports = self.reports;
        let many = reports.len() > 1;
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
        let statuses: Vec<i32> = reports
            .iter()
            .map(|r| cli::outcome_status(&r.outcome))
            .collect();
        let mut vmm_failed = sched_failed;
        for (what, c) in [("console.log", &self.seen[0])].into_iter().chain(
            reports
                .iter()
                .zip(&self.seen[1..])
                .map(|(r, c)| (r.name.as_str(), c)),
        ) {
            if let Some(e) = &c.log_error {
                say_error(log, format_args!("writing the console log of {what}: {e}"));
                vmm_failed = true;
            }
        }
        let wrote_outputs = a.metrics.is_some() || a.trace.is_some() || a.results.is_some();
        if a.dump_shared || wrote_outputs || many || self.interrupted {
            let _ = write!(log, "{}", report::table(self.settings, reports));
        }
        if self.outputs.wants_trace() {
            if self.settings.slots.is_some() && trace.is_none() {
                say_error(log, "the scheduler kept no trace");
                vmm_failed = true;
            }
            let timeline = crate::trace::of_run(self.run_start, trace.as_ref(), reports);
            let run = serde_json::json!({
                "backend": self.settings.backend,
                "vms": reports.iter().map(|r| serde_json::json!({
                    "name": r.name, "vcpus": r.yields_to.len(), "policy": r.policy,
                })).collect::<Vec<_>>(),
            });
            match self.outputs.write_trace(&timeline, run) {
                Ok(paths) => {
                    for p in paths {
                        let _ = writeln!(
                            log,
                            "pvsync: trace: {} spans to {} ({})",
                            timeline.spans().count(),
                            p.display(),
                            timeline.losses
                        );
                    }
                }
                Err(e) => {
                    say_error(log, format_args!("{e}"));
                    vmm_failed = true;
                }
            }
        }
        let status = cli::combined_status(&statuses, self.interrupted, vmm_failed);
        let runs: Vec<VmRun> = reports
            .iter()
            .zip(&statuses)
            .zip(&self.seen[1..])
            .map(|((r, &status), c)| VmRun {
                report: r,
                status,
                result_lines: &c.results,
                results_dropped: c.results_dropped,
            })
            .collect();
        let json = results::json(
            self.settings,
            &HostInfo::probe(),
            status,
            self.interrupted,
            &runs,
        );
        let mut status = status;
        if let Err(e) = self.outputs.write_metrics(&json) {
            say_error(log, format_args!("{e}"));
            status = cli::combined_status(&statuses, self.interrupted, true);
        }
        if let Some(dir) = self.outputs.results_dir() {
            let _ = writeln!(log, "pvsync: results in {}", dir.display());
        }
        for r in reports {
            report_outcome(r, many, log);
        }
        status
    }
}

/// How many yield targets the end-of-run line names: it stays one short line at 1024 vCPUs.
const TOP_YIELD_TARGETS: usize = 8;

/// The `n` vCPUs named most often, as `vcpu:count` by count (ties by id), and how many
/// others were named at all.
fn top_targets(counts: &[u64], n: usize) -> String {
    let mut named: Vec<(usize, u64)> = counts
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, c)| c > 0)
        .collect();
    named.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut s = named
        .iter()
        .take(n)
        .map(|(v, c)| format!("{v}:{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if named.len() > n {
        s += &format!(" (+{} more vcpus)", named.len() - n);
    }
    s
}

/// Prints how one VM ended.
fn report_outcome(r: &RunReport, many: bool, log: &mut dyn Write) {
    let who = if many {
        format!("{}: ", r.name)
    } else {
        String::new()
    };
    let yields: u64 = r.yields_to.iter().sum();
    if yields > 0 {
        let _ = writeln!(
            log,
            "pvsync: {who}yield-to hypercalls: {yields}; by target vcpu: {}",
            top_targets(&r.yields_to, TOP_YIELD_TARGETS)
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
    let _ = match &r.outcome {
        Outcome::GuestExit(code) => writeln!(
            log,
            "pvsync: {who}guest exited with code {code} after {secs:.3} s"
        ),
        Outcome::Timeout(t) => writeln!(
            log,
            "pvsync: {who}error: guest did not exit within {} s; stopped it",
            t.as_secs()
        ),
        Outcome::VmmFault { vcpu, reason } => writeln!(
            log,
            "pvsync: {who}error: VMM fault on vcpu {vcpu}: {reason}"
        ),
        Outcome::GuestCrash { vcpu, reason } => writeln!(
            log,
            "pvsync: {who}error: guest crashed on vcpu {vcpu}: {reason}"
        ),
        Outcome::SchedulerFault(reason) => {
            writeln!(log, "pvsync: {who}error: the scheduler failed: {reason}")
        }
        Outcome::Interrupted => writeln!(
            log,
            "pvsync: {who}interrupted after {secs:.3} s; stopped the guest"
        ),
    };
}

#[cfg(test)]
mod tests {
    use super::top_targets;

    #[test]
    fn yield_targets_stay_one_short_line() {
        assert_eq!(top_targets(&[0, 3, 0, 7], 8), "3:7 1:3");
        let mut many = vec![0u64; 1024];
        for (i, c) in many.iter_mut().enumerate().step_by(3) {
            *c = (i % 7) as u64 + 1;
        }
        let s = top_targets(&many, 3);
        assert!(s.starts_with("6:7 27:7 48:7 (+"), "{s}");
        assert!(s.ends_with(" more vcpus)"), "{s}");
    }
}
