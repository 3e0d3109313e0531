//! The study's report: `report.md` with each measured figure beside the published one and
//! the ideal, a sentence per experiment on what this run shows, and the plots.

use std::fmt::Write as _;
use std::path::Path;

use super::calibrate::Calibration;
use super::experiments::{Config, Experiment, Published};
use super::plots::{self, Reference};
use super::sample::Sample;
use super::stats::{self, Stat};
use super::StudyInfo;

/// A figure the report shows for an experiment, and how.
struct Shown {
    field: &'static str,
    /// Column heading.
    name: &'static str,
    /// Divide the raw value by this (1e3: µs → ms; 0.01: fraction → %).
    scale: f64,
    /// Also show it as a ratio to the ideal.
    ratio: bool,
}

const fn shown(field: &'static str, name: &'static str, scale: f64, ratio: bool) -> Shown {
    Shown {
        field,
        name,
        scale,
        ratio,
    }
}

fn figures_of(e: &Experiment) -> Vec<Shown> {
    match e.name {
        "ipi" => vec![
            shown("elapsed_us", "time to finish, ms", 1e3, true),
            shown("blocks_per_s", "blocks/s", 1.0, false),
            shown("sd_p50_us", "shootdown p50, µs", 1.0, false),
            shown("sd_p99_us", "shootdown p99, µs", 1.0, false),
            shown("sd_max_us", "shootdown max, µs", 1.0, false),
        ],
        "stacking" => vec![
            shown("stacking_fraction", "stacked, %", 0.01, false),
            shown("records_per_s", "ebizzy records/s per VM", 1.0, false),
            shown("lock_wait_p99_us", "lock wait p99, µs", 1.0, false),
        ],
        "rcu" => vec![
            shown("gp_max_us", "GP max, ms", 1e3, true),
            shown("gp_avg_us", "GP avg, ms", 1e3, true),
            shown("gp_cpu_us", "CPU per GP, µs", 1.0, true),
            shown("cbs_peak", "callbacks peak", 1.0, true),
            shown(
                "cb_mem_peak_bytes",
                "callback memory peak, KiB",
                1024.0,
                true,
            ),
            shown("tps", "transactions/s", 1.0, false),
        ],
        _ => vec![shown(e.primary, e.primary, 1.0, true)],
    }
}

/// The configuration whose figures `c`'s are divided by: its ideal, or itself if it is
/// the ideal of others (so the ideal's row reads 1.00x).
fn ideal_of<'a>(e: &'a Experiment, c: &'a Config) -> Option<&'a str> {
    c.ideal.as_deref().or_else(|| {
        e.configs
            .iter()
            .any(|o| o.ideal.as_deref() == Some(c.id.as_str()))
            .then_some(c.id.as_str())
    })
}

fn cell(s: Option<Stat>, scale: f64) -> String {
    match s {
        Some(s) if s.n > 1 => format!(
            "{:.3} ({:.3}–{:.3})",
            s.median / scale,
            s.min / scale,
            s.max / scale
        ),
        Some(s) => format!("{:.3}", s.median / scale),
        None => "—".into(),
    }
}

fn ratio_cell(s: Option<Stat>) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.2}x ({:.2}–{:.2})", s.median, s.min, s.max),
        Some(s) => format!("{:.2}x", s.median),
        None => "—".into(),
    }
}

fn published_line(p: &Published) -> String {
    format!("{}: **{}{}** ({})", p.what, p.value, p.unit, p.source)
}

/// Writes `report.md` and the plots into `dir`; returns the report's text.
pub fn write(
    dir: &Path,
    info: &StudyInfo,
    experiments: &[Experiment],
    samples: &[Sample],
    calibration: &Calibration,
) -> Result<String, String> {
    std::fs::create_dir_all(dir.join("plots")).map_err(|e| e.to_string())?;
    let mut md = String::new();
    let _ = writeln!(md, "# pvsync study\n");
    let _ = writeln!(
        md,
        "Run on {} host cores, Linux {}, KVM flavour `{}`{}; pvsync {} at git revision `{}`; \
         {} repeats per configuration, configurations interleaved, seed = repeat number + 1{}.\n",
        info.cores,
        info.kernel_release,
        info.kvm_flavour,
        if info.under_hypervisor {
            " (nested: the host itself is a guest)"
        } else {
            ""
        },
        info.pvsync_version,
        info.git_revision,
        info.reps,
        if info.quick {
            "; **quick mode** (small amounts of work: a smoke test, not a study)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "Cells: median (min–max) over the repeats that passed.\n"
    );
    calibration_section(&mut md, calibration);
    for e in experiments {
        experiment_section(&mut md, dir, e, samples, calibration, info.cores)?;
    }
    std::fs::write(dir.join("report.md"), &md).map_err(|e| e.to_string())?;
    Ok(md)
}

/// A kernel loop this many times slower than the same user loop: kernel code is emulated.
const EMULATED: f64 = 10.0;

/// Kernel-mode time over user-mode time of the calibration loop.
fn emulation(c: &Calibration) -> Option<f64> {
    c.figures
        .get("guest_kernel_over_user")
        .copied()
        .filter(|r| r.is_finite())
}

/// How an experiment's dependence on the host reads, given the calibration.
fn depends(c: &Calibration, why: &str) -> String {
    match emulation(c) {
        Some(r) if r > EMULATED => {
            format!("*Depends on the host* (kernel code ran {r:.0}x slower here): {why}")
        }
        _ => format!("(Guest kernel code ran at hardware speed here; {why})"),
    }
}

fn calibration_section(md: &mut String, c: &Calibration) {
    let _ = writeln!(md, "## This host\n");
    let _ = writeln!(
        md,
        "{}; a conclusion marked *depends on the host* would likely differ where guest kernel \
         code runs at hardware speed.\n",
        match emulation(c) {
            Some(r) if r > EMULATED => format!(
                "The same loop ran {r:.0}x slower in guest kernel mode than in guest user mode: \
                 this host emulates guest kernel code"
            ),
            Some(r) => format!(
                "The same loop ran {r:.1}x as long in guest kernel mode as in user mode: guest \
                 kernel code runs at hardware speed here"
            ),
            None => "Whether this host emulates guest kernel code was not measured".into(),
        }
    );
    let _ = writeln!(
        md,
        "| measured at the start of this run | value |\n|---|---:|"
    );
    for (k, v) in &c.figures {
        let _ = writeln!(md, "| {k} | {v:.3} |");
    }
    for n in &c.notes {
        let _ = writeln!(md, "\nNote: {n}");
    }
    let _ = writeln!(md);
}

fn experiment_section(
    md: &mut String,
    dir: &Path,
    e: &Experiment,
    samples: &[Sample],
    cal: &Calibration,
    host_cores: usize,
) -> Result<(), String> {
    let _ = writeln!(md, "## {}\n", e.title);
    let figs = figures_of(e);
    let mut head = String::from("| configuration | runs passed |");
    let mut rule = String::from("|---|---:|");
    for f in &figs {
        let _ = write!(head, " {} |", f.name);
        rule.push_str("---:|");
        if f.ratio {
            let _ = write!(
                head,
                " {} / ideal |",
                f.name.split(',').next().unwrap_or(f.name)
            );
            rule.push_str("---:|");
        }
    }
    let _ = writeln!(md, "{head}\n{rule}");
    for c in &e.configs {
        let (ran, ok) = stats::runs(samples, &c.id);
        let _ = write!(md, "| {} | {ok}/{ran} |", c.label);
        for f in &figs {
            let _ = write!(
                md,
                " {} |",
                cell(stats::figure(samples, &c.id, f.field), f.scale)
            );
            if f.ratio {
                let r = ideal_of(e, c).and_then(|i| stats::ratio(samples, &c.id, i, f.field));
                let _ = write!(md, " {} |", ratio_cell(r));
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md);
    for p in &e.published {
        let _ = writeln!(md, "- Published: {}", published_line(p));
    }
    let _ = writeln!(md, "\n{}\n", sentence(e, samples, cal, host_cores));
    for (file, title, rows, refs) in plot_specs(e, samples) {
        if rows.is_empty() {
            continue;
        }
        let path = dir.join("plots").join(&file);
        plots::bars(&path, &title, "", &rows, &refs).map_err(|e| e.to_string())?;
        let _ = writeln!(md, "![{title}](plots/{file})\n");
    }
    Ok(())
}

/// The bars of each plot of `e`: (file, title, rows, reference lines).
type PlotSpec = (String, String, Vec<(String, Stat)>, Vec<Reference>);

fn plot_specs(e: &Experiment, samples: &[Sample]) -> Vec<PlotSpec> {
    let mut out = Vec::new();
    for f in figures_of(e) {
        let rows: Vec<(String, Stat)> = if f.ratio {
            e.configs
                .iter()
                .filter_map(|c| {
                    let r = stats::ratio(samples, &c.id, ideal_of(e, c)?, f.field)?;
                    Some((c.label.clone(), r))
                })
                .collect()
        } else {
            e.configs
                .iter()
                .filter_map(|c| {
                    let s = stats::figure(samples, &c.id, f.field)?;
                    let s = Stat {
                        median: s.median / f.scale,
                        min: s.min / f.scale,
                        max: s.max / f.scale,
                        n: s.n,
                    };
                    Some((c.label.clone(), s))
                })
                .collect()
        };
        let mut refs = Vec::new();
        if f.ratio {
            refs.push(Reference {
                label: "ideal (1:1)".into(),
                value: 1.0,
            });
            for p in e
                .published
                .iter()
                .filter(|p| p.unit == "x" && p.field == f.field)
            {
                refs.push(Reference {
                    label: format!("published {}x", p.value),
                    value: p.value,
                });
            }
        }
        if !f.ratio {
            for p in e
                .published
                .iter()
                .filter(|p| p.unit == "%" && p.field == f.field)
            {
                refs.push(Reference {
                    label: format!("published: {} {}%", p.what, p.value),
                    value: p.value,
                });
            }
        }
        let title = if f.ratio {
            let bare = f.name.split(',').next().unwrap_or(f.name);
            format!("{}: {bare} / ideal", e.title)
        } else {
            format!("{}: {}", e.title, f.name)
        };
        out.push((format!("{}-{}.svg", e.name, f.field), title, rows, refs));
    }
    out
}

/// What the experiment shows on this run, in a sentence or two (from the data).
fn sentence(e: &Experiment, samples: &[Sample], cal: &Calibration, host_cores: usize) -> String {
    let ratio = |id: &str, fig: &str| {
        let c = e.configs.iter().find(|c| c.id == id)?;
        stats::ratio(samples, id, c.ideal.as_deref()?, fig).map(|s| s.median)
    };
    let fig = |id: &str, f: &str| stats::figure(samples, id, f).map(|s| s.median);
    let x = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}x"));
    match e.name {
        "ipi" => {
            let mut s = String::from("**What this run shows:** ");
            for over in [2, 4] {
                let r = |p: &str| ratio(&format!("ipi/{over}x {p}"), "elapsed_us");
                let _ = write!(
                    s,
                    "at {over}x overcommit pbzip2 takes {} the 1:1 time with `pv`, {} with \
                     `kvm-ipi` (the upstream fix), {} with `kvm` and {} without boosting. ",
                    x(r("pv")),
                    x(r("kvm-ipi")),
                    x(r("kvm")),
                    x(r("none"))
                );
            }
            s.push_str(&depends(
                cal,
                "an acknowledgement needs the receiver's kernel to run the IPI handler",
            ));
            s
        }
        "stacking" => {
            let pct = |id: &str| {
                fig(id, "stacking_fraction")
                    .map_or("—".to_string(), |v| format!("{:.1}%", v * 100.0))
            };
            format!(
                "**What this run shows:** with `wake-affine` placement {} / {} / {} of the samples \
                 had two or more siblings of a VM on one slot (1 / 2 / 3 VMs of 4 vCPUs on {} \
                 slots, on {} host cores; published 5.6 / 43.1 / 45.9%); `spread` keeps it at {} \
                 / {} / {}. ebizzy does {} records/s per VM under `wake-affine` and {} under \
                 `spread`. Stacking itself does not depend on the host (it is the placement's \
                 doing); ebizzy's throughput does.",
                pct("stacking/1 VM wake-affine"),
                pct("stacking/2 VM wake-affine"),
                pct("stacking/3 VM wake-affine"),
                e.configs.first().map_or(0, |c| c.cpus),
                host_cores,
                pct("stacking/1 VM spread"),
                pct("stacking/2 VM spread"),
                pct("stacking/3 VM spread"),
                fig("stacking/ebizzy 2 VM wake-affine", "records_per_s")
                    .map_or("—".to_string(), |v| format!("{v:.0}")),
                fig("stacking/ebizzy 2 VM spread", "records_per_s")
                    .map_or("—".to_string(), |v| format!("{v:.0}")),
            )
        }
        "rcu" => format!(
            "**What this run shows:** at 2x overcommit the longest grace period is {} of 1:1 \
             without boosting (published 26.37x) and {} with `pv`; the average {} and {} \
             (published 2.18x); CPU per grace period {} and {} (published 2.9x). {}",
            x(ratio("rcu/2x none", "gp_max_us")),
            x(ratio("rcu/2x pv", "gp_max_us")),
            x(ratio("rcu/2x none", "gp_avg_us")),
            x(ratio("rcu/2x pv", "gp_avg_us")),
            x(ratio("rcu/2x none", "gp_cpu_us")),
            x(ratio("rcu/2x pv", "gp_cpu_us")),
            depends(cal, "grace periods wait for kernel code on every vCPU"),
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::experiments::{select, Scale};

    fn info() -> StudyInfo {
        StudyInfo {
            cores: 2,
            kernel_release: "6.x".into(),
            kvm_flavour: "pvm".into(),
            under_hypervisor: true,
            pvsync_version: "0".into(),
            git_revision: "abc".into(),
            quick: true,
            reps: 3,
            experiments: vec!["rcu".into()],
            started_unix: 0,
        }
    }

    #[test]
    fn the_report_shows_the_data_its_ratios_and_plots() {
        let e = select(
            Scale {
                cores: 2,
                quick: true,
            },
            &["rcu".into()],
        )
        .unwrap();
        let mut samples = Vec::new();
        for c in &e[0].configs {
            for rep in 0..3 {
                let mut s = Sample::of(c, rep, rep as u64 + 1);
                s.status = 0;
                let base = if c.label == "1:1" { 10_000.0 } else { 30_000.0 };
                s.values
                    .insert("gp_max_us".into(), base + rep as f64 * 1000.0);
                samples.push(s);
            }
        }
        let dir = std::env::temp_dir().join(format!("pvsync-report-{}", std::process::id()));
        let md = write(&dir, &info(), &e, &samples, &Calibration::default()).unwrap();
        // 1:1: 10, 11, 12 ms; 2x: 30, 31, 32 ms, 3.1x of the ideal's median (range 3.0–3.2).
        assert!(
            md.contains("| 1:1 | 3/3 | 11.000 (10.000–12.000) | 1.00x (0.91–1.09) |"),
            "{md}"
        );
        assert!(
            md.contains("| 2x pv | 3/3 | 31.000 (30.000–32.000) | 2.82x (2.73–2.91) |"),
            "{md}"
        );
        assert!(md.contains("longest grace period is 2.82x of 1:1 without boosting"));
        assert!(md.contains(
            "![RCU-reader preemption (postmark): GP max / ideal](plots/rcu-gp_max_us.svg)"
        ));
        assert!(dir.join("plots/rcu-gp_max_us.svg").is_file());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
