//! `pvsync study`: a CI-sized `--quick` run writes every output, the outputs parse and agree
//! with each other (CSV and JSON rows, the report's figures and the data, `--render` gives the
//! same report), and the direction that holds on any machine: with 20 ms slices `pv` lowers
//! the longest grace period against `none` under the same overcommit. Usage mistakes are
//! refused. No timing thresholds: every comparison is between runs of the same study.

use std::path::{Path, PathBuf};

use pvsync_tests::{guest_kernel, pvsync, require_kvm, run_with_limit, Output};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvsync-study-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `pvsync study ARGS` with the test guest, into `dir`.
fn study(dir: &Path, args: &[&str]) -> Output {
    let k = guest_kernel().to_str().unwrap().to_owned();
    let mut c = std::process::Command::new(pvsync_tests::pvsync_bin());
    c.args(["study", "--kernel", &k, "--out", dir.to_str().unwrap()])
        .args(args);
    run_with_limit(c, std::time::Duration::from_secs(1200))
}

fn read_json(p: PathBuf) -> Value {
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Median of a configuration's passing repeats of `figure`, from samples.json.
fn median(samples: &[Value], config: &str, figure: &str) -> Option<f64> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s["config"] == config && s["status"] == 0)
        .filter_map(|s| s["values"][figure].as_f64())
        .collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| {
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    })
}

#[test]
fn a_quick_study_writes_consistent_outputs_and_shows_the_robust_directions() {
    if !require_kvm("a_quick_study_writes_consistent_outputs_and_shows_the_robust_directions") {
        return;
    }
    let dir = scratch("quick");
    let out = study(&dir, &["--quick", "--reps", "3"]);
    out.check(out.status == Some(0), "every run of the study passed");
    for f in ["report.md", "samples.json", "samples.csv", "study.json"] {
        out.check(dir.join(f).is_file(), &format!("{f} written"));
    }
    let samples = read_json(dir.join("samples.json"));
    let samples = samples.as_array().expect("samples.json is an array");
    // ipi: 1:1, 2x and 4x under four policies, 2x under Linux (10); stacking: 1-3 VMs under
    // two placements, ebizzy under two placements and Linux (9); rcu: 1:1, 2x under four
    // policies, 2x under Linux (6). Three repeats each.
    out.check(
        samples.len() == (10 + 9 + 6) * 3,
        "one sample per configuration and repeat",
    );
    // The CSV has the same rows, in the same order, with the same figures.
    let csv = std::fs::read_to_string(dir.join("samples.csv")).unwrap();
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    out.check(rows.len() == samples.len(), "as many CSV rows as samples");
    let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
    for (row, s) in rows.iter().zip(samples) {
        out.check(row[col("config")] == s["config"], "same configuration");
        let status = row[col("status")].parse::<i64>().ok();
        out.check(status == s["status"].as_i64(), "same status");
        for (name, v) in s["values"].as_object().unwrap() {
            let cell = row[col(name)].parse::<f64>().ok();
            out.check(cell == v.as_f64(), &format!("same {name}"));
        }
    }
    // The report shows the data's medians.
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for config in ["rcu/1:1", "rcu/2x none", "rcu/2x pv"] {
        let m = median(samples, config, "gp_max_us").expect("a median");
        let label = config.trim_start_matches("rcu/");
        let cell = format!("| {label} | 3/3 | {:.3}", m / 1000.0);
        out.check(report.contains(&cell), &format!("report row {cell}"));
    }
    out.check(
        report.contains("VMs of 4 vCPUs on 4 slots"),
        "the stacking sentence names its slots",
    );
    out.check(
        report.contains("published 26.37x"),
        "the rcu sentence names the published figure",
    );
    let plots: Vec<_> = std::fs::read_dir(dir.join("plots")).unwrap().collect();
    out.check(plots.len() >= 6, "a plot per figure");
    // --render rebuilds the same report from the folder.
    std::fs::remove_file(dir.join("report.md")).unwrap();
    let again = pvsync(&["study", "--render", dir.to_str().unwrap()]);
    again.check(again.status == Some(0), "--render works");
    let rendered = std::fs::read_to_string(dir.join("report.md")).unwrap();
    again.check(rendered == report, "--render gives the same report");
    // The directions that hold on any machine, overcommitted with 20 ms slices: pv shortens
    // the longest grace period and the typical shootdown against no boosting; spread stacks
    // no siblings, wake-affine does with 2 VMs.
    let m = |c: &str, f: &str| median(samples, c, f).unwrap_or_else(|| panic!("{c} {f}"));
    let (none, pv) = (m("rcu/2x none", "gp_max_us"), m("rcu/2x pv", "gp_max_us"));
    out.check(
        pv < none,
        &format!("pv's longest grace period ({pv} us) is shorter than none's ({none} us)"),
    );
    let (none, pv) = (m("ipi/2x none", "sd_p50_us"), m("ipi/2x pv", "sd_p50_us"));
    out.check(
        pv < none,
        &format!("pv's median shootdown ({pv} us) is shorter than none's ({none} us)"),
    );
    let spread = m("stacking/2 VM spread", "stacking_fraction");
    let affine = m("stacking/2 VM wake-affine", "stacking_fraction");
    out.check(
        spread == 0.0 && affine > 0.0,
        &format!("stacking: spread {spread}, wake-affine {affine}"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn study_mistakes_are_usage_errors() {
    // Refused before any VM starts: no KVM needed.
    let dir = scratch("usage");
    let k = guest_kernel().to_str().unwrap().to_owned();
    let nothing = dir.join("nothing");
    for (args, says) in [
        (
            vec!["study", "--kernel", &k, "nope"],
            "unknown experiment 'nope'",
        ),
        (vec!["study", "rcu"], "needs --kernel"),
        (vec!["study", "--kernel", "/nonexistent"], "not a file"),
        (
            vec!["study", "--render", nothing.to_str().unwrap()],
            "study.json",
        ),
        (vec!["study", "--kernel", &k, "--reps", "0"], "--reps"),
    ] {
        let out = pvsync(&args);
        out.check(out.status == Some(2), &format!("{args:?} is a usage error"));
        out.check(
            out.stderr.contains(says),
            &format!("{args:?} says {says:?}"),
        );
    }
}
