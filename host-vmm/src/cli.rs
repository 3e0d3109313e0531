//! The `pvsync` command line.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::vm::{self, Outcome, RunReport, VmConfig};

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
                  70 when the VMM fails, 124 on timeout, 125 when the guest crashes."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a PVH guest kernel and run it until it exits.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// PVH ELF kernel image to boot.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=3072))]
    pub mem: u64,
    /// Guest kernel command line (e.g. "test=selftest").
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Stop the guest after this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    /// Print the decoded shared region when the guest stops.
    #[arg(long)]
    pub dump_shared: bool,
    /// Write per-vCPU metrics (run time, runnable-wait time, timeslices, yields) as JSON.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
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
    }
}

fn run(a: RunArgs, console: Box<dyn Write + Send>, log: &mut dyn Write) -> i32 {
    let config = VmConfig {
        kernel: a.kernel,
        vcpus: a.vcpus,
        mem_mib: a.mem,
        cmdline: a.cmdline,
        timeout: Duration::from_secs(a.timeout),
    };
    let report = match vm::run(&config, console) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(log, "pvsync: error: {e}");
            return EXIT_HOST_ERROR;
        }
    };
    if a.dump_shared {
        match &report.shared {
            Some(snap) => {
                let _ = write!(log, "{}", snap.render());
            }
            None => {
                let _ = writeln!(log, "shared region: none registered");
            }
        }
    }
    if a.dump_shared || a.metrics.is_some() {
        let _ = write!(log, "{}", metrics_table(&report));
    }
    if let Some(path) = &a.metrics {
        let json = metrics_json(&report);
        if let Err(e) = std::fs::write(path, json.to_string() + "\n") {
            let _ = writeln!(
                log,
                "pvsync: error: writing metrics to {}: {e}",
                path.display()
            );
            return EXIT_HOST_ERROR;
        }
    }
    let yields: u64 = report.yields_to.iter().sum();
    if yields > 0 {
        let _ = writeln!(
            log,
            "pvsync: yield-to hypercalls by target vcpu: {:?}",
            report.yields_to
        );
    }
    if report.unclaimed_io > 0 {
        let _ = writeln!(
            log,
            "pvsync: note: {} I/O accesses hit no device",
            report.unclaimed_io
        );
    }
    let secs = report.elapsed.as_secs_f64();
    match report.outcome {
        Outcome::GuestExit(code) => {
            let _ = writeln!(
                log,
                "pvsync: guest exited with code {code} after {secs:.3} s"
            );
            code.min(255) as i32
        }
        Outcome::Timeout(t) => {
            let _ = writeln!(
                log,
                "pvsync: error: guest did not exit within {} s; stopped it",
                t.as_secs()
            );
            EXIT_TIMEOUT
        }
        Outcome::VmmFault { vcpu, reason } => {
            let _ = writeln!(log, "pvsync: error: VMM fault on vcpu {vcpu}: {reason}");
            EXIT_HOST_ERROR
        }
        Outcome::GuestCrash { vcpu, reason } => {
            let _ = writeln!(log, "pvsync: error: guest crashed on vcpu {vcpu}: {reason}");
            EXIT_GUEST_CRASH
        }
    }
}

fn outcome_json(o: &Outcome) -> serde_json::Value {
    match o {
        Outcome::GuestExit(code) => serde_json::json!({ "kind": "guest-exit", "code": code }),
        Outcome::Timeout(t) => serde_json::json!({ "kind": "timeout", "seconds": t.as_secs() }),
        Outcome::GuestCrash { vcpu, reason } => {
            serde_json::json!({ "kind": "guest-crash", "vcpu": vcpu, "reason": reason })
        }
        Outcome::VmmFault { vcpu, reason } => {
            serde_json::json!({ "kind": "vmm-fault", "vcpu": vcpu, "reason": reason })
        }
    }
}

/// The run as JSON: outcome, elapsed time, and per vCPU what the host gave it.
pub fn metrics_json(r: &RunReport) -> serde_json::Value {
    let vcpus: Vec<serde_json::Value> = r
        .vcpu_stats
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "vcpu": i,
                "run_ns": s.run_ns,
                "runnable_wait_ns": s.wait_ns,
                "timeslices": s.slices,
                "yield_to_hypercalls_naming_it": r.yields_to.get(i).copied().unwrap_or(0),
            })
        })
        .collect();
    serde_json::json!({
        "outcome": outcome_json(&r.outcome),
        "elapsed_ns": r.elapsed.as_nanos() as u64,
        "unclaimed_io": r.unclaimed_io,
        "invalid_shared_records": r.shared.as_ref().map(|s| s.invalid_records()),
        "vcpus": vcpus,
    })
}

/// Per-vCPU run and wait times as a table.
pub fn metrics_table(r: &RunReport) -> String {
    let mut s = format!(
        "{:>5} {:>12} {:>14} {:>10} {:>8}\n",
        "vcpu", "run ms", "runnable ms", "slices", "yields"
    );
    for (i, st) in r.vcpu_stats.iter().enumerate() {
        s += &format!(
            "{:>5} {:>12.1} {:>14.1} {:>10} {:>8}\n",
            i,
            st.run_ns as f64 / 1e6,
            st.wait_ns as f64 / 1e6,
            st.slices,
            r.yields_to.get(i).copied().unwrap_or(0)
        );
    }
    s
}
