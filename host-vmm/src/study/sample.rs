//! One run of one configuration, as the study keeps it: which configuration and repeat, how
//! it ended, and its figures by name. Written as JSON and as CSV (one row per run).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::experiments::Config;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub experiment: String,
    pub config: String,
    pub label: String,
    pub repeat: usize,
    pub seed: u64,
    pub backend: String,
    pub cpus: usize,
    pub slice_us: u64,
    pub placement: String,
    pub policy: String,
    pub overcommit: usize,
    pub vms: usize,
    pub vcpus: usize,
    /// The `pvsync run` exit status (0: every guest passed).
    pub status: i32,
    /// The figures: the workload's `RESULT` fields (the mean over the VMs), the scheduler's
    /// `stacking_fraction` (mean over the VMs) and `elapsed_ms` (the slowest VM).
    pub values: BTreeMap<String, f64>,
}

impl Sample {
    /// A sample of `c`, repeat `repeat`, before its figures are known.
    pub fn of(c: &Config, repeat: usize, seed: u64) -> Self {
        Sample {
            experiment: c.experiment.to_string(),
            config: c.id.clone(),
            label: c.label.clone(),
            repeat,
            seed,
            backend: c.backend.to_string(),
            cpus: c.cpus,
            slice_us: c.slice_us,
            placement: c.placement.to_string(),
            policy: c.policy.to_string(),
            overcommit: c.overcommit,
            vms: c.vms.len(),
            vcpus: c.vms.iter().map(|v| v.vcpus).sum(),
            status: -1,
            values: BTreeMap::new(),
        }
    }
}

const FIXED: [&str; 14] = [
    "experiment",
    "config",
    "label",
    "repeat",
    "seed",
    "backend",
    "cpus",
    "slice_us",
    "placement",
    "policy",
    "overcommit",
    "vms",
    "vcpus",
    "status",
];

/// A CSV field, quoted when it must be (RFC 4180).
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The samples as CSV: the fixed columns, then every figure any sample has (sorted; empty
/// where a sample lacks it).
pub fn csv(samples: &[Sample]) -> String {
    let mut names: Vec<&str> = samples
        .iter()
        .flat_map(|s| s.values.keys().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut out = FIXED.join(",");
    for n in &names {
        out.push(',');
        out.push_str(&field(n));
    }
    out.push('\n');
    for s in samples {
        let fixed = [
            field(&s.experiment),
            field(&s.config),
            field(&s.label),
            s.repeat.to_string(),
            s.seed.to_string(),
            field(&s.backend),
            s.cpus.to_string(),
            s.slice_us.to_string(),
            field(&s.placement),
            field(&s.policy),
            s.overcommit.to_string(),
            s.vms.to_string(),
            s.vcpus.to_string(),
            s.status.to_string(),
        ];
        out.push_str(&fixed.join(","));
        for n in &names {
            out.push(',');
            if let Some(v) = s.values.get(*n) {
                let _ = write!(out, "{v}");
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_a_column_per_figure_and_quotes_labels() {
        let mut a = Sample {
            experiment: "rcu".into(),
            config: "rcu/2x pv".into(),
            label: "2x, \"pv\"".into(),
            repeat: 0,
            seed: 1,
            backend: "slots".into(),
            cpus: 2,
            slice_us: 20000,
            placement: "spread".into(),
            policy: "pv".into(),
            overcommit: 2,
            vms: 1,
            vcpus: 4,
            status: 0,
            values: BTreeMap::new(),
        };
        a.values.insert("gp_max_us".into(), 12.5);
        let mut b = a.clone();
        b.values.clear();
        b.values.insert("tps".into(), 3.0);
        let text = csv(&[a, b]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with(",status,gp_max_us,tps"), "{}", lines[0]);
        assert!(lines[1].contains("\"2x, \"\"pv\"\"\""), "{}", lines[1]);
        assert!(lines[1].ends_with(",0,12.5,"), "{}", lines[1]);
        assert!(lines[2].ends_with(",0,,3"), "{}", lines[2]);
    }
}
