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
        for i in 0..r.yields_to.len() {
            let (_, m, run, wait) = vcpu_view(r, i);
            let _ = write!(
                s,
                "{:>5} {:>12.1} {:>22.1} {:>11} {:>6} {:>6} {:>13}",
                i,
                ms(run),
                ms(wait),
                m.preemptions,
                m.yields,
                m.halts,
                m.ipis_received
            );
            for b in m.boosts {
                let _ = write!(s, " {b:>8}");
            }
            s.push('\n');
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
