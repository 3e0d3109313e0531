//! The end-of-run report: a table for people (stderr) and JSON for programs (`--metrics`).

use std::fmt::Write as _;

use crate::hoststat::SchedStat;
use crate::policy::BoostReason;
use crate::sched::metrics::LatencyHistogram;
use crate::sched::VcpuMetrics;
use crate::vm::{Outcome, RunReport};

/// How the run was scheduled, for the report header.
#[derive(Clone, Debug)]
pub struct SchedSummary {
    pub backend: String,
    pub slots: Option<usize>,
    pub slice_us: Option<u64>,
    pub placement: Option<String>,
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
        Outcome::SchedulerFault(reason) => {
            serde_json::json!({ "kind": "scheduler-fault", "reason": reason })
        }
    }
}

fn boosts_json(m: &VcpuMetrics) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    for (i, r) in BoostReason::ALL.iter().enumerate() {
        o.insert(r.name().to_string(), m.boosts[i].into());
    }
    o.into()
}

/// vCPU `i` of a report: what the host thread got, what the backend counted, and its run and
/// runnable-wait time (the scheduler's own under the slot backend, the thread's schedstat
/// under the Linux backend).
fn vcpu_view(r: &RunReport, i: usize) -> (SchedStat, VcpuMetrics, u64, u64) {
    let host = r.vcpu_stats.get(i).copied().unwrap_or_default();
    let m = r
        .sched
        .as_ref()
        .and_then(|(_, v)| v.get(i))
        .cloned()
        .unwrap_or_default();
    let (run, wait) = if m.dispatches > 0 {
        (m.run_ns, m.wait_ns)
    } else {
        (host.run_ns, host.wait_ns)
    };
    (host, m, run, wait)
}

fn vm_json(r: &RunReport) -> serde_json::Value {
    let n = r.yields_to.len();
    let vcpus: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let (host, m, run, wait) = vcpu_view(r, i);
            serde_json::json!({
                "vcpu": i,
                "run_ns": run,
                "runnable_wait_ns": wait,
                "idle_ns": m.idle_ns,
                "preemptions": m.preemptions,
                "yields": m.yields,
                "yields_target_running": m.yields_target_running,
                "yield_to_hypercalls_naming_it": r.yields_to[i],
                "halts": m.halts,
                "ipis_sent": m.ipis_sent,
                "ipis_received": m.ipis_received,
                "bad_hypercalls": m.bad_hypercalls,
                "invalid_records": m.invalid_records,
                "boosts": boosts_json(&m),
                "boosts_refused": m.boosts_refused,
                "user_mode_boosts": m.user_mode_boosts,
                "dispatches": m.dispatches,
                "handoff_ns": m.handoff_ns,
                "kicks": m.kicks,
                "kick_latency_ns": m.kick_latency_ns,
                "rcu_waits": m.rcu_waits,
                "turns_given_back": m.turns_given_back,
                "host_thread": {
                    "run_ns": host.run_ns, "wait_ns": host.wait_ns, "timeslices": host.slices,
                },
            })
        })
        .collect();
    let vm = r.sched.as_ref().map(|(m, _)| m.clone()).unwrap_or_default();
    let (handoffs, kicks) = latencies(r);
    serde_json::json!({
        "name": r.name,
        "handoff_latency": latency_json(&handoffs),
        "kick_latency": latency_json(&kicks),
        "policy": r.policy,
        "outcome": outcome_json(&r.outcome),
        "elapsed_ns": r.elapsed.as_nanos() as u64,
        "unclaimed_io": r.unclaimed_io,
        "failed_ipis": r.failed_ipis,
        "invalid_shared_records": r.shared.as_ref().map(|s| s.invalid_records()),
        "invalid_page_events": vm.invalid_page_events,
        "torn_record_reads": vm.torn_records,
        "stacking_samples": vm.samples,
        "stacking_fraction": vm.stacking_fraction(),
        "max_boost_debt_ns": vm.max_debt_ns,
        "rcu_words_ignored": vm.rcu_words_ignored,
        "vcpus": vcpus,
    })
}

/// Every hand-off and every kick of a VM's vCPUs.
fn latencies(r: &RunReport) -> (LatencyHistogram, LatencyHistogram) {
    let mut h = LatencyHistogram::default();
    let mut k = LatencyHistogram::default();
    for m in r.sched.iter().flat_map(|(_, v)| v.iter()) {
        h.merge(&m.handoff_hist);
        k.merge(&m.kick_hist);
    }
    (h, k)
}

/// Median and 99th percentile (to within 12.5 %), and the count.
fn latency_json(h: &LatencyHistogram) -> serde_json::Value {
    serde_json::json!({ "count": h.count(), "median": h.quantile(0.5), "p99": h.quantile(0.99) })
}

/// The run as JSON: how it was scheduled, then per VM its outcome and per-vCPU counters.
pub fn json(summary: &SchedSummary, reports: &[RunReport]) -> serde_json::Value {
    serde_json::json!({
        "backend": summary.backend,
        "slots": summary.slots,
        "slice_us": summary.slice_us,
        "placement": summary.placement,
        "vms": reports.iter().map(vm_json).collect::<Vec<_>>(),
    })
}

/// Short column names for the boost reasons.
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

/// Per VM a header line, then one row per vCPU.
pub fn table(summary: &SchedSummary, reports: &[RunReport]) -> String {
    let mut s = String::new();
    let _ = write!(s, "backend {}", summary.backend);
    if let (Some(n), Some(us), Some(p)) = (summary.slots, summary.slice_us, &summary.placement) {
        let _ = write!(s, ": {n} slots, {us} us slice, placement {p}");
    }
    s.push('\n');
    for r in reports {
        let vm = r.sched.as_ref().map(|(m, _)| m.clone()).unwrap_or_default();
        let (h, k) = latencies(r);
        let _ = writeln!(
            s,
            "vm {} policy {}: stacking {:.1}% of {} samples, invalid page events {}, torn reads {}, max boost debt {:.1} ms, hand-off median/p99 {:.1}/{:.1} us, kick {:.1}/{:.1} us",
            r.name,
            r.policy,
            vm.stacking_fraction() * 100.0,
            vm.samples,
            vm.invalid_page_events,
            vm.torn_records,
            vm.max_debt_ns as f64 / 1e6,
            h.quantile(0.5) as f64 / 1e3,
            h.quantile(0.99) as f64 / 1e3,
            k.quantile(0.5) as f64 / 1e3,
            k.quantile(0.99) as f64 / 1e3,
        );
        let _ = write!(
            s,
            "{:>5} {:>10} {:>12} {:>8} {:>7} {:>7} {:>7}",
            "vcpu", "run ms", "runnable ms", "preempt", "yields", "halts", "ipis-in"
        );
        for r in BoostReason::ALL {
            let _ = write!(s, " {:>8}", reason_short(r));
        }
        s.push('\n');
        for i in 0..r.yields_to.len() {
            let (_, m, run, wait) = vcpu_view(r, i);
            let _ = write!(
                s,
                "{:>5} {:>10.1} {:>12.1} {:>8} {:>7} {:>7} {:>7}",
                i,
                run as f64 / 1e6,
                wait as f64 / 1e6,
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
    s
}
