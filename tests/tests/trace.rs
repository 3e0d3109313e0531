//! `--trace`: the Perfetto trace of real runs has its metadata, the slot and vCPU tracks and
//! the guest's events (ABI v5 event rings), in numbers that agree with what the guest and
//! the scheduler counted; `pvsync timeline` draws it. Assertions on counts, never timings.

use std::collections::HashMap;
use std::path::PathBuf;

use pvsync_tests::{guest_kernel, num, pvsync, require_kvm, Output};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvsync-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A traced run of a 4-vCPU guest; returns the output, the trace and the metrics.
fn traced(tag: &str, extra: &[&str], cmdline: &str) -> (Output, Value, Value) {
    let trace = scratch(&format!("{tag}.trace.json"));
    let metrics = scratch(&format!("{tag}.metrics.json"));
    let k = guest_kernel().to_str().unwrap().to_owned();
    let mut args = vec![
        "run",
        "--kernel",
        &k,
        "--vcpus",
        "4",
        // 2x overcommitted on any host: vCPUs queue, so there are queued spans and boosts.
        "--slots",
        "2",
        "--timeout",
        "120",
        "--cmdline",
        cmdline,
        "--trace",
        trace.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = pvsync(&args);
    out.check(out.status == Some(0), "the traced guest passes");
    let read = |p: &PathBuf| -> Value {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };
    let (t, m) = (read(&trace), read(&metrics));
    out.check(
        t["traceEvents"].is_array(),
        "the trace parses as trace-event JSON",
    );
    (out, t, m)
}

fn events(t: &Value) -> &Vec<Value> {
    t["traceEvents"].as_array().unwrap()
}

/// Names given by metadata events `what` ("process_name" or "thread_name").
fn names(t: &Value, what: &str) -> Vec<String> {
    events(t)
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == what)
        .map(|e| e["args"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// Spans ("X") and marks ("i") per category.
fn by_category(t: &Value) -> HashMap<(String, String), usize> {
    let mut c = HashMap::new();
    for e in events(t) {
        if let (Some(ph), Some(cat)) = (e["ph"].as_str(), e["cat"].as_str()) {
            *c.entry((ph.to_string(), cat.to_string())).or_default() += 1;
        }
    }
    c
}

fn count(c: &HashMap<(String, String), usize>, ph: &str, cat: &str) -> usize {
    c.get(&(ph.to_string(), cat.to_string()))
        .copied()
        .unwrap_or(0)
}

/// Whether the trace says nothing was lost.
fn lossless(t: &Value) -> bool {
    let l = &t["otherData"]["losses"];
    [
        "sched_dropped",
        "guest_dropped",
        "guest_invalid",
        "guest_capped",
    ]
    .iter()
    .all(|k| l[k] == 0)
}

/// Boosts the scheduler counted, over every vCPU and reason.
fn metric_boosts(m: &Value) -> u64 {
    m["vms"][0]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["boosts"].as_object().unwrap().values())
        .map(|b| b.as_u64().unwrap())
        .sum()
}

fn check_layout(out: &Output, t: &Value, slots: bool) {
    let procs = names(t, "process_name");
    out.check(procs.contains(&"VM vm".to_string()), "a process per VM");
    out.check(
        procs.contains(&"slots (host CPUs)".to_string()) == slots,
        "a slots process exactly under the slot backend",
    );
    let threads = names(t, "thread_name");
    for v in 0..4 {
        for kind in [
            "state",
            "lock wait",
            "lock held",
            "shootdown",
            "rcu",
            "mode",
        ] {
            let n = format!("vcpu{v} {kind}");
            out.check(threads.contains(&n), &format!("a track named {n}"));
        }
    }
    out.check(
        threads.contains(&"rcu grace periods".to_string()),
        "a grace-period track",
    );
    if slots {
        out.check(threads.contains(&"slot 0".to_string()), "slot tracks");
    }
    // Every span and mark sits on a named track.
    let named: Vec<(u64, u64)> = events(t)
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .map(|e| (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap()))
        .collect();
    for e in events(t).iter().filter(|e| e["ph"] != "M") {
        let at = (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap());
        out.check(
            named.contains(&at),
            &format!("event on an unnamed track: {e}"),
        );
    }
}

#[test]
fn tlbtorture_trace_shows_shootdown_waits_acks_and_user_mode() {
    if !require_kvm("tlbtorture_trace_shows_shootdown_waits_acks_and_user_mode") {
        return;
    }
    let (out, t, m) = traced("tlb", &[], "test=tlbtorture duration=500");
    check_layout(&out, &t, true);
    let c = by_category(&t);
    let result = out.line("RESULT tlbtorture").expect("RESULT line");
    let shootdowns = num(result, "shootdowns") as usize;
    out.check(shootdowns > 0, "shootdowns happened");
    let waits = count(&c, "X", "ipi-wait");
    let acks = count(&c, "i", "ipi-ack");
    out.check(count(&c, "X", "mode-user") > 0, "user-mode spans");
    out.check(count(&c, "X", "running") > 0, "running spans");
    out.check(count(&c, "X", "queued") > 0, "queued spans (overcommitted)");
    // Each boost is marked on its slot's track (pid 1) and on the vCPU's state track.
    let boosts = events(&t)
        .iter()
        .filter(|e| e["cat"] == "boost" && e["pid"] == 1)
        .count();
    out.check(
        boosts * 2 == count(&c, "i", "boost"),
        "each boost on its slot and on its vCPU",
    );
    if lossless(&t) {
        // The guest counts the shootdowns of its timed window; the trace has every one (a
        // few more come before the window opens and after it closes).
        out.check(waits >= shootdowns, "a shootdown wait per shootdown");
        out.check(acks >= shootdowns, "every shootdown was acknowledged");
        out.check(
            boosts as u64 == metric_boosts(&m),
            "one boost mark per boost the scheduler counted",
        );
    } else {
        out.check(waits > 0, "shootdown waits, some lost");
    }
}

#[test]
fn rcutorture_trace_shows_grace_periods_and_preempted_readers() {
    if !require_kvm("rcutorture_trace_shows_grace_periods_and_preempted_readers") {
        return;
    }
    let (out, t, _) = traced("rcu", &[], "test=rcutorture duration=1000");
    check_layout(&out, &t, true);
    let c = by_category(&t);
    let result = out.line("RESULT rcutorture").expect("RESULT line");
    let gps = num(result, "gps") as usize;
    let spans = count(&c, "X", "grace-period");
    if lossless(&t) {
        // As for shootdowns: the guest counts those of its timed window.
        out.check(spans >= gps, "a grace-period span per grace period");
    } else {
        out.check(spans > 0, "grace periods, some lost");
    }
    // Each grace period names its holdouts at the start.
    for e in events(&t).iter().filter(|e| e["cat"] == "grace-period") {
        out.check(
            e["args"]["holdouts_at_start"].is_array(),
            "a grace period's holdouts",
        );
    }
}

#[test]
fn linux_backend_trace_has_guest_tracks_only_and_timeline_draws_it() {
    if !require_kvm("linux_backend_trace_has_guest_tracks_only_and_timeline_draws_it") {
        return;
    }
    let (out, t, _) = traced(
        "linux",
        &["--backend", "linux"],
        "test=locktorture duration=300",
    );
    check_layout(&out, &t, false);
    let c = by_category(&t);
    out.check(count(&c, "X", "running") == 0, "no scheduler spans");
    out.check(count(&c, "X", "mode-kernel") > 0, "guest mode spans");
    let trace = scratch("linux.trace.json");
    let svg = scratch("linux.svg");
    let drawn = pvsync(&[
        "timeline",
        trace.to_str().unwrap(),
        "--out",
        svg.to_str().unwrap(),
        "--tracks",
        "mode",
    ]);
    drawn.check(drawn.status == Some(0), "timeline draws the trace");
    let text = std::fs::read_to_string(&svg).unwrap_or_default();
    drawn.check(text.starts_with("<svg"), "an SVG");
    drawn.check(text.contains("vcpu0 mode"), "the tracks asked for");
    drawn.check(!text.contains("vcpu0 state"), "and only those");
    let bad = pvsync(&["timeline", svg.to_str().unwrap(), "--out", "/dev/null"]);
    bad.check(
        bad.status == Some(2),
        "a file that is no trace is a usage error",
    );
}

#[test]
fn without_trace_the_guest_is_not_asked_for_events() {
    if !require_kvm("without_trace_the_guest_is_not_asked_for_events") {
        return;
    }
    let out = pvsync_tests::pvsync_guest(2, 64, "test=selftest");
    out.check(out.status == Some(0), "the guest passes");
    let region = out.line("shared region").expect("--dump-shared line");
    out.check(
        region.contains("host_flags=0x1 ") && region.contains("event_ring_entries=128"),
        "rings present, events not asked for",
    );
}
