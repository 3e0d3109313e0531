//! The `pvsync` command line: its flags, and the exit statuses (one table, `--help`).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use shared_abi::{ExitCode, GUEST_TESTS, MAX_VCPUS};

use crate::launch;
use crate::policy::PolicySpec;
use crate::printable::say_error;
use crate::vm::{Outcome, MAX_MEM_MIB};

/// Every guest exited with code 0.
pub const EXIT_OK: i32 = 0;
/// A guest reported failure (an exit code other than 0 and 2; its own code is in the log
/// and the metrics).
pub const EXIT_GUEST_FAILURE: i32 = 1;
/// A usage error: a bad flag, value, `--vm` spec or scenario, an unreadable or malformed
/// kernel or scenario file, an output path that cannot be written.
pub const EXIT_USAGE: i32 = 2;
/// A guest panicked (exit code 2, `ExitCode::Panic`).
pub const EXIT_GUEST_PANIC: i32 = 3;
/// The VMM itself failed (KVM error, scheduler fault, writing outputs failed mid-run).
pub const EXIT_HOST_ERROR: i32 = 70;
/// A guest did not exit before `--timeout`.
pub const EXIT_TIMEOUT: i32 = 124;
/// A guest crashed (triple fault, failed VM entry).
pub const EXIT_GUEST_CRASH: i32 = 125;
/// Interrupted by SIGINT or SIGTERM.
pub const EXIT_INTERRUPTED: i32 = 130;

const EXIT_STATUS_HELP: &str = "Exit status:
    0    every guest exited with code 0
    1    a guest reported failure (exit code other than 0 and 2)
    2    usage error (bad flag, value, --vm spec, scenario, unreadable kernel or
         scenario, unwritable output path)
    3    a guest panicked (exit code 2)
    70   the VMM failed (KVM error, scheduler fault, writing outputs failed)
    124  timeout
    125  a guest crashed (triple fault, failed VM entry)
    130  interrupted by SIGINT or SIGTERM
With several VMs: 130 if interrupted, else 70 if the VMM failed anywhere, else the first
failing VM's status in VM order.";

/// The status a guest's exit code gives the process.
pub fn guest_exit_status(code: u32) -> i32 {
    match code {
        0 => EXIT_OK,
        c if c == ExitCode::Panic as u32 => EXIT_GUEST_PANIC,
        _ => EXIT_GUEST_FAILURE,
    }
}

/// The status one VM's outcome gives the process.
pub fn outcome_status(o: &Outcome) -> i32 {
    match o {
        Outcome::GuestExit(code) => guest_exit_status(*code),
        Outcome::Timeout(_) => EXIT_TIMEOUT,
        Outcome::GuestCrash { .. } => EXIT_GUEST_CRASH,
        Outcome::VmmFault { .. } | Outcome::SchedulerFault(_) => EXIT_HOST_ERROR,
        Outcome::Interrupted => EXIT_INTERRUPTED,
    }
}

/// The process status of a run: 130 if interrupted, else 70 if the VMM failed anywhere
/// (`vmm_failed`, or a VM's outcome), else the first failing VM's status in VM order.
pub fn combined_status(vm_statuses: &[i32], interrupted: bool, vmm_failed: bool) -> i32 {
    if interrupted || vm_statuses.contains(&EXIT_INTERRUPTED) {
        EXIT_INTERRUPTED
    } else if vmm_failed || vm_statuses.contains(&EXIT_HOST_ERROR) {
        EXIT_HOST_ERROR
    } else {
        vm_statuses
            .iter()
            .copied()
            .find(|&s| s != EXIT_OK)
            .unwrap_or(EXIT_OK)
    }
}

/// `pvsync run --help`'s epilogue: the guest's tests, then the exit statuses.
fn run_after_help() -> String {
    let mut s = String::from(
        "Guest tests (--cmdline \"test=NAME ...\"; also duration=MS, threads=N, smp=N):\n",
    );
    for (name, what) in GUEST_TESTS {
        s.push_str(&format!("    {name:<20}{what}\n"));
    }
    s.push('\n');
    s.push_str(EXIT_STATUS_HELP);
    s
}

#[derive(Debug, Parser)]
#[command(
    name = "pvsync",
    version,
    about = "KVM VMM for the pvsync paravirtual synchronization lab",
    after_help = EXIT_STATUS_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a PVH guest kernel and run it until it exits.
    #[command(after_help = run_after_help())]
    Run(RunArgs),
    /// Draw (part of) a trace written by `run --trace` as an SVG timeline.
    Timeline(TimelineArgs),
    /// Run the study: the three problems and their fixes on workloads, repeated, written
    /// up as a results folder with plots and report.md (docs/study.md).
    Study(crate::study::StudyArgs),
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
    /// Centre the window on the longest span of this category (e.g. "ipi-wait",
    /// "grace-period", "lock-spin"), with --margin-ms on each side; overrides --from-ms and
    /// --to-ms.
    #[arg(long, value_name = "CATEGORY")]
    pub focus: Option<String>,
    /// Room on each side of the --focus span.
    #[arg(long, value_name = "MS", default_value_t = 2.0)]
    pub margin_ms: f64,
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
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=MAX_VCPUS as i64))]
    pub vcpus: u32,
    /// Guest RAM in MiB (at least what the kernel needs for its vCPUs).
    #[arg(long, default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..=MAX_MEM_MIB))]
    pub mem: u64,
    /// Guest kernel command line (e.g. "test=selftest").
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// A VM to run beside the others: "key=value,..." with keys name, kernel, vcpus, mem,
    /// policy, count, and cmdline last (it takes the rest). Missing keys come from the flags
    /// above; each key at most once. count=N (N >= 1) starts N such VMs, named NAME-0,
    /// NAME-1, ... VM names are unique. Repeat for several VMs.
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
    /// Write the run's settings, host, per-VM outcome, counters and the guests' RESULT
    /// fields as JSON (schema: docs/metrics.md).
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Write what the host and the guests did as trace-event JSON (Perfetto,
    /// chrome://tracing): slot turns, vCPU states and boosts, and the guests' events (lock
    /// spins and holds, shootdown waits, grace periods, mode changes); docs/tracing.md.
    /// The guests write events only in a traced run.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Write metrics.json, trace.json (a traced run), console.log and <vm>.console.log
    /// into DIR (created if missing).
    #[arg(long, value_name = "DIR")]
    pub results: Option<PathBuf>,
}

/// Parses `args` and runs; returns the process exit status. Guest serial output goes to
/// `console`, the VMM's own messages to `log`.
pub fn main_with_args<I, T>(args: I, console: Box<dyn Write + Send>, log: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut console = console;
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            // --help and --version are answers, not errors: stdout, status 0.
            let out: &mut dyn Write = if e.use_stderr() { log } else { &mut console };
            let _ = write!(out, "{}", e.render());
            let _ = out.flush();
            return e.exit_code();
        }
    };
    match cli.command {
        Command::Run(a) => launch::run(&a, console, log),
        Command::Timeline(a) => timeline(a, log),
        Command::Study(a) => crate::study::run(a, log),
    }
}

/// `pvsync timeline`: reads a trace, keeps the tracks asked for, draws the window.
fn timeline(a: TimelineArgs, log: &mut dyn Write) -> i32 {
    // A trace holds at most 2^21 guest events and the slots' turns: well under this.
    const MAX_TRACE_BYTES: u64 = 1 << 30;
    let text = match crate::files::read_text(&a.trace, MAX_TRACE_BYTES) {
        Ok(t) => t,
        Err(e) => return launch::usage(log, e),
    };
    let mut t = match crate::trace::json::read(&text) {
        Ok(t) => t,
        Err(e) => return launch::usage(log, format!("{}: {e}", a.trace.display())),
    };
    // `as` saturates: a huge or NaN value cannot overflow (NaN becomes 0).
    let ms = |m: f64| (m.max(0.0) * 1e6) as u64;
    let (mut from, mut to) = (a.from_ms.map_or(0, ms), a.to_ms.map_or_else(|| t.end(), ms));
    if let Some(cat) = &a.focus {
        // Chosen before the track filter applies: any track's span may be the focus.
        let Some(s) = t
            .spans()
            .map(|(_, _, s)| s)
            .filter(|s| s.cat == cat.as_str())
            .max_by_key(|s| s.dur)
        else {
            return launch::usage(log, format!("--focus {cat}: no span of that category"));
        };
        let margin = ms(a.margin_ms);
        let end = s.start.saturating_add(s.dur).saturating_add(margin);
        (from, to) = (s.start.saturating_sub(margin), end);
    }
    let keep = |name: &str, filters: &[String]| {
        filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
    };
    t.processes.retain(|p| keep(&p.name, &a.processes));
    for p in &mut t.processes {
        p.tracks.retain(|tr| keep(&tr.name, &a.tracks));
    }
    if to <= from {
        return launch::usage(log, "--to-ms must be after --from-ms");
    }
    let svg = crate::trace::svg::render(&t, from, to, a.width as f64, &a.title);
    match std::fs::write(&a.out, svg) {
        Ok(()) => 0,
        Err(e) => {
            say_error(log, format_args!("writing {}: {e}", a.out.display()));
            EXIT_HOST_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_do_not_overlap_and_combine_by_rule() {
        assert_eq!(guest_exit_status(0), EXIT_OK);
        assert_eq!(guest_exit_status(1), EXIT_GUEST_FAILURE);
        assert_eq!(guest_exit_status(ExitCode::Panic as u32), EXIT_GUEST_PANIC);
        assert_eq!(guest_exit_status(7), EXIT_GUEST_FAILURE);
        assert_eq!(combined_status(&[0, 3, 1], false, false), 3);
        assert_eq!(combined_status(&[0, 3, 124], false, true), 70);
        assert_eq!(combined_status(&[0, 70, 1], false, false), 70);
        assert_eq!(combined_status(&[0, 3], true, true), 130);
        assert_eq!(combined_status(&[0, 0], false, false), 0);
    }

    #[test]
    fn run_help_lists_every_guest_test() {
        let help = run_after_help();
        for (name, _) in GUEST_TESTS {
            assert!(help.contains(&format!("    {name} ")), "{name}");
        }
        assert!(help.contains("130  interrupted"));
    }
}
