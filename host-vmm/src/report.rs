//! The end-of-run table for people (stderr). It uses the metrics JSON's names (`results.rs`,
//! docs/metrics.md): a VM line of `name=value` pairs, then one row per vCPU under the JSON
//! field names, durations in ms (`_ms` where the JSON has `_ns`), and the boost reasons
//! abbreviated with a legend.

use std::fmt::Write as _;

use crate::policy::BoostReason;
use crate::results::{latencies, vcpu_view, RunSettings};
use crate::vm::RunReport;

/// Short column names for the boost reasons (the legend gives the JSON names).
fn reason_short(r: BoostReason) -> &'static str {
    match r {
        BoostReason::DirectedYield => "dy",
        BoostReason::UserModeWithInterrupt => "user-irq",
        BoostReason::NamedBySpinner => "named",
        BoostReason::LockHolder => "lock",
        BoostReason::IpiAckOwed => "ipi",
        BoostReason::RcuReader => "rcu",
        BoostReason::RcuHoldout => "rcu-qs",
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Up to this many vCPUs the table has a row per vCPU; past it, per-column summaries.
const FULL_TABLE_VCPUS: usize = 64;

#[derive(Clone, Copy)]
enum Pick {
    Sum,
    Min,
    Median,
    Max,
}

/// One statistic of every column of `rows` (all rows have the same length).
fn column_stat(rows: &[Vec<f64>], pick: Pick) -> Vec<f64> {
    let width = rows.first().map_or(0, Vec::len);
    (0..width)
        .map(|c| {
            let mut col: Vec<f64> = rows.iter().map(|r| r[c]).collect();
            col.sort_by(f64::total_cmp);
            match pick {
                Pick::Sum => col.iter().sum(),
                Pick::Min => col.first().copied().unwrap_or(0.0),
                Pick::Median => col.get(col.len() / 2).copied().unwrap_or(0.0),
                Pick::Max => col.last().copied().unwrap_or(0.0),
            }
        })
        .collect()
}

/// One table row: durations (the first two columns) with a decimal, counts without.
fn write_row(s: &mut String, label: &str, row: &[f64]) {
    let _ = write!(
        s,
        "{:>5} {:>12.1} {:>22.1} {:>11} {:>6} {:>6} {:>13}",
        label,
        row[0],
        row[1],
        row[2].round(),
        row[3].round(),
        row[4].round(),
        row[5].round()
    );
    for b in &row[6..] {
        let _ = write!(s, " {:>8}", b.round());
    }
    s.push('\n');
}

/// The settings line, then per VM a line of totals and one row per vCPU, then the legend.
pub fn table(settings: &RunSettings, reports: &[RunReport]) -> String {
    let mut s = String::new();
    let _ = write!(s, "backend={}", settings.backend);
    if let (Some(n), Some(us), Some(p)) = (settings.slots, settings.slice_us, &settings.placement) {
        let _ = write!(s, " slots={n} slice_us={us} placement={p}");
    }
    s.push('\n');
    for r in reports {
        let vm = r.sched.as_ref().map(|(m, _)| m.clone()).unwrap_or_default();
        let ((_, h), (_, k)) = latencies(r);
        let _ = writeln!(
            s,
            "vm name={} policy={} elapsed_ms={:.1} stacking_fraction={:.3} stacking_samples={} invalid_page_events={} torn_record_reads={} boost_debt_max_ms={:.1} handoff_latency_p50_ms={:.3} handoff_latency_p99_ms={:.3} kick_latency_p50_ms={:.3} kick_latency_p99_ms={:.3}",
            r.name,
            r.policy,
            ms(r.elapsed.as_nanos() as u64),
            vm.stacking_fraction(),
            vm.samples,
            vm.invalid_page_events,
            vm.torn_records,
            ms(vm.max_debt_ns),
            ms(h.quantile(0.5)),
            ms(h.quantile(0.99)),
            ms(k.quantile(0.5)),
            ms(k.quantile(0.99)),
        );
        let _ = write!(
            s,
            "{:>5} {:>12} {:>22} {:>11} {:>6} {:>6} {:>13}",
            "vcpu",
            "run_total_ms",
            "runnable_wait_total_ms",
            "preemptions",
            "yields",
            "halts",
            "ipis_received"
        );
        for r in BoostReason::ALL {
            let _ = write!(s, " {:>8}", reason_short(r));
        }
        s.push('\n');
        let rows: Vec<Vec<f64>> = (0..r.yields_to.len())
            .map(|i| {
                let (_, m, run, wait) = vcpu_view(r, i);
                let mut row = vec![
                    ms(run),
                    ms(wait),
                    m.preemptions as f64,
                    m.yields as f64,
                    m.halts as f64,
                    m.ipis_received as f64,
                ];
                row.extend(m.boosts.iter().map(|&b| b as f64));
                row
            })
            .collect();
        if rows.len() <= FULL_TABLE_VCPUS {
            for (i, row) in rows.iter().enumerate() {
                write_row(&mut s, &i.to_string(), row);
            }
        } else {
            // A row per vCPU is unreadable at hundreds of them (the metrics JSON keeps them):
            // each column's total and spread instead.
            for (label, pick) in [
                ("sum", Pick::Sum),
                ("min", Pick::Min),
                ("p50", Pick::Median),
                ("max", Pick::Max),
            ] {
                write_row(&mut s, label, &column_stat(&rows, pick));
            }
            let _ = writeln!(
                s,
                "({} vcpus: per-column total and spread; one row per vcpu in the metrics JSON)",
                rows.len()
            );
        }
    }
    let legend: Vec<String> = BoostReason::ALL
        .iter()
        .map(|&r| format!("{}=boosts.{}", reason_short(r), r.name()))
        .collect();
    let _ = writeln!(
        s,
        "(columns are the metrics JSON's fields, _ms for its _ns; {})",
        legend.join(" ")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_vms_get_column_summaries() {
        let rows: Vec<Vec<f64>> = (0..100).map(|i| vec![i as f64; 13]).collect();
        assert_eq!(column_stat(&rows, Pick::Sum)[0], 4950.0);
        assert_eq!(column_stat(&rows, Pick::Min)[12], 0.0);
        assert_eq!(column_stat(&rows, Pick::Median)[3], 50.0);
        assert_eq!(column_stat(&rows, Pick::Max)[6], 99.0);
        let mut s = String::new();
        write_row(&mut s, "p50", &column_stat(&rows, Pick::Median));
        assert!(s.starts_with("  p50         50.0"), "{s}");
        assert_eq!(s.lines().count(), 1);
    }
}
