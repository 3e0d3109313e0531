//! The metrics JSON (`--metrics FILE`, `--results DIR/metrics.json`), schema version
//! [`SCHEMA_VERSION`]: the run's settings, the host, and per VM its outcome, its own elapsed
//! time, the scheduler's counters and the guest's `RESULT` lines as fields. Every field is
//! listed in docs/metrics.md; a field's name says what it is: `*_total_ns` a sum of
//! durations, `*_mean_ns`/`*_p50_ns`/`*_p99_ns`/`*_max_ns` one distribution's statistics,
//! a bare plural noun a count.

use serde_json::{json, Map, Value};

use crate::hostinfo::HostInfo;
use crate::hoststat::SchedStat;
use crate::policy::BoostReason;
use crate::sched::fair_share::{self, ProgressSeries, Shortfall};
use crate::sched::metrics::LatencyHistogram;
use crate::sched::{LedgerLimits, VcpuMetrics};
use crate::vm::{Outcome, RunReport, VmConfig};

/// Bumped when a field is renamed, removed or changes meaning (adding fields does not).
pub const SCHEMA_VERSION: u32 = 1;

/// How the run was set up (the flags and scenario, resolved).
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub backend: String,
    /// Slot-backend settings (None under the Linux backend).
    pub slots: Option<usize>,
    pub slice_us: Option<u64>,
    pub placement: Option<String>,
    pub pin_slots: Option<bool>,
    /// The boost ledger's limits under the chosen backend.
    pub ledger: LedgerLimits,
    pub timeout_s: u64,
    /// The run wrote a trace: the guests wrote events and the scheduler kept its own, which
    /// costs (a TSC read per guest event), so figures of traced runs are not comparable with
    /// untraced ones.
    pub tracing: bool,
    pub vms: Vec<VmConfig>,
}

/// One VM's run as the outputs see it.
pub struct VmRun<'a> {
    pub report: &'a RunReport,
    /// The process exit status class of its outcome (`cli::outcome_status`).
    pub status: i32,
    /// Its console's `RESULT` lines, and how many more were not kept.
    pub result_lines: &'a [String],
    pub results_dropped: u64,
}

/// `RESULT <test> key=value ...` as `{"test": ..., "fields": {...}}`: values that parse as
/// integers or decimals become numbers, others stay strings; words without `=` are listed
/// under `"words"`. None for a line that is not a `RESULT` line.
pub fn parse_result_line(line: &str) -> Option<Value> {
    let mut words = line.strip_prefix("RESULT ")?.split_whitespace();
    let test = words.next()?;
    let mut fields = Map::new();
    let mut bare = Vec::new();
    for w in words {
        match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                fields.insert(k.to_string(), scalar(v));
            }
            _ => bare.push(Value::from(w)),
        }
    }
    let mut out = json!({ "test": test, "fields": fields });
    if !bare.is_empty() {
        out["words"] = bare.into();
    }
    Some(out)
}

fn scalar(v: &str) -> Value {
    if let Ok(n) = v.parse::<u64>() {
        return n.into();
    }
    if let Ok(n) = v.parse::<i64>() {
        return n.into();
    }
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() && v.bytes().any(|b| b.is_ascii_digit()) => f.into(),
        _ => v.into(),
    }
}

/// The outcome's kind and details, with the status class it gives the process.
pub fn outcome_json(o: &Outcome, status: i32) -> Value {
    let mut v = match o {
        Outcome::GuestExit(code) => json!({ "kind": "guest-exit", "code": code }),
        Outcome::Timeout(t) => json!({ "kind": "timeout", "timeout_s": t.as_secs() }),
        Outcome::GuestCrash { vcpu, reason } => {
            json!({ "kind": "guest-crash", "vcpu": vcpu, "reason": reason })
        }
        Outcome::VmmFault { vcpu, reason } => {
            json!({ "kind": "vmm-fault", "vcpu": vcpu, "reason": reason })
        }
        Outcome::SchedulerFault(reason) => json!({ "kind": "scheduler-fault", "reason": reason }),
        Outcome::Interrupted => json!({ "kind": "interrupted" }),
    };
    v["status"] = status.into();
    v
}

fn boosts_json(m: &VcpuMetrics) -> Value {
    let mut o = Map::new();
    for (i, r) in BoostReason::ALL.iter().enumerate() {
        o.insert(r.name().to_string(), m.boosts[i].into());
    }
    o.into()
}

/// vCPU `i` of a report: what the host thread got, what the backend counted, and its run and
/// runnable-wait time (the scheduler's own under the slot backend, the thread's schedstat
/// under the Linux backend).
pub fn vcpu_view(r: &RunReport, i: usize) -> (SchedStat, VcpuMetrics, u64, u64) {
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

/// A distribution's fields under `prefix`: `<prefix>_total_ns` (the sum), `_mean_ns`,
/// `_p50_ns`, `_p99_ns`, `_max_ns` (quantiles to within 12.5 %, the histogram's buckets).
fn latency_fields(o: &mut Map<String, Value>, prefix: &str, total_ns: u64, h: &LatencyHistogram) {
    let n = h.count();
    let mean = total_ns.checked_div(n).unwrap_or(0);
    o.insert(format!("{prefix}_total_ns"), total_ns.into());
    o.insert(format!("{prefix}_mean_ns"), mean.into());
    o.insert(format!("{prefix}_p50_ns"), h.quantile(0.5).into());
    o.insert(format!("{prefix}_p99_ns"), h.quantile(0.99).into());
    o.insert(format!("{prefix}_max_ns"), h.quantile(1.0).into());
}

fn vcpu_json(r: &RunReport, i: usize) -> Value {
    let (host, m, run, wait) = vcpu_view(r, i);
    let mut v = json!({
        "vcpu": i,
        "run_total_ns": run,
        "runnable_wait_total_ns": wait,
        "idle_total_ns": m.idle_ns,
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
        "kicks": m.kicks,
        "rcu_waits": m.rcu_waits,
        "turns_given_back": m.turns_given_back,
        "host_priority": {
            "raised": m.host_priority.raised,
            "expired": m.host_priority.expired,
            "restored": m.host_priority.restored,
            "restore_failures": m.host_priority.restore_failures,
            "samples_raised": m.host_priority.samples_raised,
            "samples_unaccounted": m.host_priority.samples_unaccounted,
            "raised_at_exit": m.host_priority.raised_at_exit,
            "max_overrun_ns": m.host_priority.max_overrun_ns,
        },
        "host_thread": {
            "run_total_ns": host.run_ns,
            "wait_total_ns": host.wait_ns,
            "timeslices": host.slices,
        },
    });
    let o = v.as_object_mut().expect("an object");
    latency_fields(o, "handoff_latency", m.handoff_ns, &m.handoff_hist);
    latency_fields(o, "kick_latency", m.kick_latency_ns, &m.kick_hist);
    v
}

/// Every hand-off and every kick of a VM's vCPUs: (hand-off total, histogram), (kick total,
/// histogram).
pub fn latencies(r: &RunReport) -> ((u64, LatencyHistogram), (u64, LatencyHistogram)) {
    let (mut ht, mut h, mut kt, mut k) = (
        0,
        LatencyHistogram::default(),
        0,
        LatencyHistogram::default(),
    );
    for m in r.sched.iter().flat_map(|(_, v)| v.iter()) {
        ht += m.handoff_ns;
        h.merge(&m.handoff_hist);
        kt += m.kick_latency_ns;
        k.merge(&m.kick_hist);
    }
    ((ht, h), (kt, k))
}

/// A VM's fair share over time, beside the other VMs of the run (`sched::fair_share`).
fn fair_share_json(s: &Shortfall) -> Value {
    json!({
        "shortfall_max_ns": s.max_ns,
        "shortfall_from_ns": s.from_ns,
        "shortfall_to_ns": s.to_ns,
        "share_ns": s.share_ns,
        "received_ns": s.received_ns,
    })
}

fn vm_json(run: &VmRun, fair: &Shortfall) -> Value {
    let r = run.report;
    let vm = r.sched.as_ref().map(|(m, _)| m.clone()).unwrap_or_default();
    let ((ht, h), (kt, k)) = latencies(r);
    let results: Vec<Value> = run
        .result_lines
        .iter()
        .filter_map(|l| parse_result_line(l))
        .collect();
    let mut v = json!({
        "name": r.name,
        "policy": r.policy,
        "outcome": outcome_json(&r.outcome, run.status),
        "elapsed_ns": r.elapsed.as_nanos() as u64,
        "unclaimed_io": r.unclaimed_io,
        "failed_ipis": r.failed_ipis,
        "steal_time_marking": r.steal_time_marking,
        "steal_time_marks": r.steal_time_marks,
        "steal_time_mark_failures": r.steal_time_failures,
        "invalid_shared_records": r.shared.as_ref().map(|s| s.invalid_records()),
        "invalid_page_events": vm.invalid_page_events,
        "torn_record_reads": vm.torn_records,
        "stacking_samples": vm.samples,
        "stacking_fraction": vm.stacking_fraction(),
        "boost_debt_max_ns": vm.max_debt_ns,
        "fair_share": fair_share_json(fair),
        "rcu_words_ignored": vm.rcu_words_ignored,
        "dispatches": h.count(),
        "kicks": k.count(),
        "results": results,
        "results_dropped": run.results_dropped,
        "vcpus": (0..r.yields_to.len()).map(|i| vcpu_json(r, i)).collect::<Vec<_>>(),
    });
    let o = v.as_object_mut().expect("an object");
    latency_fields(o, "handoff_latency", ht, &h);
    latency_fields(o, "kick_latency", kt, &k);
    v
}

fn settings_json(s: &RunSettings) -> Value {
    let vms: Vec<Value> = s
        .vms
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "kernel": c.kernel.display().to_string(),
                "vcpus": c.vcpus,
                "mem_mib": c.mem_mib,
                "cmdline": c.cmdline,
                "policy": c.policy.to_string(),
            })
        })
        .collect();
    json!({
        "backend": s.backend,
        "slots": s.slots,
        "slice_us": s.slice_us,
        "placement": s.placement,
        "pin_slots": s.pin_slots,
        "ledger_budget_ns": s.ledger.budget,
        "ledger_max_debt_ns": s.ledger.max_debt,
        "tracing": s.tracing,
        "timeout_s": s.timeout_s,
        "vms": vms,
    })
}

fn host_json(h: &HostInfo) -> Value {
    json!({
        "cores": h.cores,
        "kernel_release": h.kernel_release,
        "kvm_modules": h.kvm_modules,
        "kvm_flavour": h.kvm_flavour,
        "under_hypervisor": h.under_hypervisor,
    })
}

/// The whole run: schema version, process status, settings, host, then per VM.
pub fn json(
    settings: &RunSettings,
    host: &HostInfo,
    status: i32,
    interrupted: bool,
    vms: &[VmRun],
) -> Value {
    let series: Vec<&ProgressSeries> = vms.iter().map(|v| &v.report.progress).collect();
    let fair = fair_share::shortfalls(&series, fair_share::GRID_NS);
    json!({
        "schema_version": SCHEMA_VERSION,
        "pvsync_version": env!("CARGO_PKG_VERSION"),
        "status": status,
        "interrupted": interrupted,
        "settings": settings_json(settings),
        "host": host_json(host),
        "audit": {
            "guest_reads_under_scheduler_lock": crate::sched::lock_audit::reads_under_lock(),
        },
        "vms": vms.iter().zip(&fair).map(|(v, f)| vm_json(v, f)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_become_typed_fields() {
        let v =
            parse_result_line("RESULT locktorture lock=mcs threads=8 ratio=0.5 d=-3 ok").unwrap();
        assert_eq!(v["test"], "locktorture");
        assert_eq!(v["fields"]["lock"], "mcs");
        assert_eq!(v["fields"]["threads"], 8);
        assert_eq!(v["fields"]["ratio"], 0.5);
        assert_eq!(v["fields"]["d"], -3);
        assert_eq!(v["words"][0], "ok");
        // Not numbers: "inf", "nan" and the like stay strings.
        let v = parse_result_line("RESULT x a=inf b=nan c=1e3").unwrap();
        assert_eq!(v["fields"]["a"], "inf");
        assert_eq!(v["fields"]["b"], "nan");
        assert_eq!(v["fields"]["c"], 1000.0);
        assert!(parse_result_line("RESULTS x").is_none());
        assert!(parse_result_line("RESULT ").is_none());
    }

    #[test]
    fn outcomes_carry_their_status() {
        let v = outcome_json(&Outcome::Interrupted, 130);
        assert_eq!(v, json!({ "kind": "interrupted", "status": 130 }));
        let v = outcome_json(&Outcome::GuestExit(2), 3);
        assert_eq!(v["code"], 2);
        assert_eq!(v["status"], 3);
    }
}
