//! `pvsync study`: the three problems and their fixes on workloads, run side by side with
//! repeats, and written up as a results folder (raw samples as JSON and CSV, the machine,
//! a calibration of this host, plots, and `report.md`). docs/study.md says how to read it.
//!
//! `experiments` plans the runs, `runner` makes each (a `pvsync run` child process),
//! `sample` and `stats` keep and summarise them, `calibrate` measures the host, `plots`
//! and `report` write them up. `--render DIR` rewrites plots and report from a folder.

pub mod calibrate;
pub mod experiments;
pub mod plots;
pub mod report;
pub mod runner;
pub mod sample;
pub mod stats;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use std::sync::atomic::Ordering;

use crate::cli::{EXIT_GUEST_FAILURE, EXIT_HOST_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE};
use crate::hostinfo::HostInfo;
use crate::printable::say_error;
use crate::signals::INTERRUPTED;
use calibrate::Calibration;
use experiments::{Experiment, Scale};
use runner::Runner;
use sample::Sample;

#[derive(Debug, Args)]
pub struct StudyArgs {
    /// Experiments to run: ipi, stacking, rcu [default: all three].
    pub experiments: Vec<String>,
    /// The pvsync guest kernel (required unless --render).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Small amounts of work: a smoke test of a few minutes (CI), not a study.
    #[arg(long)]
    pub quick: bool,
    /// Repeats of each configuration.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub reps: u64,
    /// The results folder [default: results/study-<unix time>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Rewrite the plots and report.md of an existing results folder, without running.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "out"])]
    pub render: Option<PathBuf>,
    /// Timeout of each run, seconds.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(10..=3600))]
    pub timeout: u64,
}

/// The machine and software a study ran on, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudyInfo {
    pub cores: usize,
    pub kernel_release: String,
    pub kvm_flavour: String,
    pub under_hypervisor: bool,
    pub pvsync_version: String,
    pub git_revision: String,
    pub quick: bool,
    pub reps: usize,
    /// The experiments run, by name.
    pub experiments: Vec<String>,
    pub started_unix: u64,
}

/// Everything a results folder holds, as `study.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudyData {
    pub info: StudyInfo,
    pub calibration: Calibration,
    pub samples: Vec<Sample>,
}

impl StudyData {
    fn experiments(&self) -> Result<Vec<Experiment>, String> {
        let scale = Scale {
            cores: self.info.cores,
            quick: self.info.quick,
        };
        experiments::select(scale, &self.info.experiments)
            .map_err(|n| format!("study.json names an unknown experiment '{n}'"))
    }
}

fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Writes `data` into `dir` (study.json, samples.json, samples.csv), then plots and report.
fn write_all(dir: &Path, data: &StudyData) -> Result<(), String> {
    std::fs::write(dir.join("study.json"), pretty(data)?).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("samples.json"), pretty(&data.samples)?).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("samples.csv"), sample::csv(&data.samples))
        .map_err(|e| e.to_string())?;
    write_report(dir, data)
}

/// The plots and report.md of `data` (the data files are left as they are).
fn write_report(dir: &Path, data: &StudyData) -> Result<(), String> {
    let exps = data.experiments()?;
    report::write(dir, &data.info, &exps, &data.samples, &data.calibration).map(|_| ())
}

fn pretty<T: Serialize>(v: &T) -> Result<String, String> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| e.to_string())
}

/// `pvsync study`; returns the process exit status.
pub fn run(a: StudyArgs, log: &mut dyn Write) -> i32 {
    if let Some(dir) = &a.render {
        return render(dir, log);
    }
    let Some(kernel) = a.kernel.clone() else {
        say_error(log, "study needs --kernel (or --render DIR)");
        return EXIT_USAGE;
    };
    if !kernel.is_file() {
        say_error(
            log,
            format_args!("--kernel {}: not a file", kernel.display()),
        );
        return EXIT_USAGE;
    }
    let host = HostInfo::probe();
    let scale = Scale {
        cores: host.cores,
        quick: a.quick,
    };
    let exps = match experiments::select(scale, &a.experiments) {
        Ok(e) => e,
        Err(n) => {
            say_error(
                log,
                format_args!("unknown experiment '{n}' (known: ipi, stacking, rcu)"),
            );
            return EXIT_USAGE;
        }
    };
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("results/study-{started}")));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        say_error(log, format_args!("--out {}: {e}", dir.display()));
        return EXIT_USAGE;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            say_error(log, format_args!("finding the pvsync binary: {e}"));
            return EXIT_HOST_ERROR;
        }
    };
    let runner = Runner {
        exe,
        kernel,
        timeout_s: a.timeout,
        dir: dir.clone(),
    };
    let info = StudyInfo {
        cores: host.cores,
        kernel_release: host.kernel_release.clone().unwrap_or_default(),
        kvm_flavour: host.kvm_flavour.to_string(),
        under_hypervisor: host.under_hypervisor,
        pvsync_version: env!("CARGO_PKG_VERSION").to_string(),
        git_revision: git_revision(),
        quick: a.quick,
        reps: a.reps as usize,
        experiments: exps.iter().map(|e| e.name.to_string()).collect(),
        started_unix: started,
    };
    // Ctrl-C stops the study between runs (the run in progress, which gets the signal
    // too, stops its guests and writes its metrics); what ran is still written up.
    if let Err(e) = crate::signals::install() {
        let _ = writeln!(log, "pvsync: warning: {e}");
    }
    let _ = writeln!(log, "pvsync study: calibrating this host");
    let calibration = calibrate::measure(&runner);
    let samples = run_all(&runner, &exps, a.reps as usize, log);
    let failed = samples.iter().filter(|s| s.status != 0).count();
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    let data = StudyData {
        info,
        calibration,
        samples,
    };
    if let Err(e) = write_all(&dir, &data) {
        say_error(log, format_args!("writing {}: {e}", dir.display()));
        return EXIT_HOST_ERROR;
    }
    let _ = writeln!(
        log,
        "pvsync study: {} runs ({failed} failed); report: {}",
        data.samples.len(),
        dir.join("report.md").display()
    );
    if interrupted {
        EXIT_INTERRUPTED
    } else if failed > 0 {
        EXIT_GUEST_FAILURE
    } else {
        EXIT_OK
    }
}

/// Every configuration `reps` times, interleaved (repeat 0 of every configuration, then
/// repeat 1, ...), so that a drift of the host spreads over all of them. Seeds are the
/// repeat number plus one: every configuration does the same work in a repeat.
fn run_all(r: &Runner, exps: &[Experiment], reps: usize, log: &mut dyn Write) -> Vec<Sample> {
    let plan: Vec<&experiments::Config> = exps.iter().flat_map(|e| &e.configs).collect();
    let bar = ProgressBar::new((plan.len() * reps) as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut samples = Vec::with_capacity(plan.len() * reps);
    'all: for rep in 0..reps {
        for c in &plan {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bar.suspend(|| {
                    let _ = writeln!(log, "pvsync study: interrupted; writing up what ran");
                });
                break 'all;
            }
            bar.set_message(format!("{} #{rep}", c.id));
            let seed = rep as u64 + 1;
            match r.run(c, c.workload(), rep, seed) {
                Ok(s) => samples.push(s),
                Err(err) => {
                    bar.suspend(|| {
                        let _ = writeln!(log, "pvsync study: {}: {err}", c.id);
                    });
                    samples.push(Sample::of(c, rep, seed));
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    samples
}

/// `--render DIR`: plots and report from `DIR/study.json`.
fn render(dir: &Path, log: &mut dyn Write) -> i32 {
    let path = dir.join("study.json");
    // A study's samples are a few thousand lines.
    const MAX_STUDY_BYTES: u64 = 64 << 20;
    let data: StudyData = match crate::files::read_text(&path, MAX_STUDY_BYTES)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            say_error(log, format_args!("--render {}: {e}", path.display()));
            return EXIT_USAGE;
        }
    };
    match write_report(dir, &data) {
        Ok(()) => {
            let _ = writeln!(
                log,
                "pvsync study: rewrote {}",
                dir.join("report.md").display()
            );
            EXIT_OK
        }
        Err(e) => {
            say_error(log, format_args!("rendering {}: {e}", dir.display()));
            EXIT_HOST_ERROR
        }
    }
}
