//! A guest whose records pass validation but lie (`test=hostile-claims`: every vCPU an RCU
//! reader and a lock holder in a ring, a frozen grace period with a huge backlog, full
//! IPI-wait masks, one record kept mid-update, YieldTo just before each turn ends) runs
//! beside a normal CPU-bound VM with `--policy pv`, on each backend. The lies must be taken
//! as valid, the ledger must cap what they win, and over every interval of the run the
//! normal VM must receive its fair share but for the ledger's limit (`fair_share` in the
//! metrics: the worst interval, measured on both VMs' run and runnable time).

use std::process::Command;
use std::time::Duration;

use pvsync_tests::{guest_kernel, may_raise, on_cpus, pvsync_bin, require_kvm, run_with_limit};
use serde_json::Value;

/// Grid intervals of slack for the scheduler's granularity (turns, looks, interpolation):
/// the shortfall is measured on a 20 ms grid from 10 ms looks.
const GRANULARITY_NS: u64 = 4 * host_vmm::sched::fair_share::GRID_NS;

/// Runs the hostile VM beside the normal one under `backend` on two host CPUs; returns
/// the metrics.
fn beside_a_normal_vm(backend: &str) -> Value {
    let path = std::env::temp_dir().join(format!(
        "pvsync-claims-{backend}-{}.json",
        std::process::id()
    ));
    let k = guest_kernel().to_str().unwrap().to_owned();
    let mut cmd: Command = on_cpus(2);
    cmd.arg(pvsync_bin())
        .args(["run", "--kernel", &k, "--vcpus", "4", "--mem", "128"])
        .args(["--backend", backend, "--policy", "pv", "--timeout", "90"])
        .args(["--metrics", path.to_str().unwrap()])
        .args([
            "--vm",
            "name=hostile,cmdline=test=hostile-claims duration=3000",
        ])
        .args(["--vm", "name=normal,cmdline=test=cpu-bound work=50000"]);
    let out = run_with_limit(cmd, Duration::from_secs(120));
    out.check(out.status == Some(0), "both VMs exit 0");
    out.check(!out.stderr.contains("panicked"), "no VMM panic");
    out.check(
        out.stdout.contains("[hostile] RESULT hostile-claims"),
        "the hostile guest ran",
    );
    let m: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| panic!("{backend}: no metrics:\n{}", out.all()));
    let _ = std::fs::remove_file(&path);
    m
}

fn sum(vm: &Value, key: &str) -> u64 {
    vm["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| match key {
            "boosts" => v["boosts"]
                .as_object()
                .unwrap()
                .values()
                .map(|b| b.as_u64().unwrap())
                .sum(),
            _ => v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}")),
        })
        .sum()
}

fn check_the_promise(backend: &str, m: &Value) {
    let (hostile, normal) = (&m["vms"][0], &m["vms"][1]);
    assert_eq!(
        (hostile["name"].as_str(), normal["name"].as_str()),
        (Some("hostile"), Some("normal"))
    );
    // The lies are valid: nothing was refused as malformed, and the policies acted on them.
    assert_eq!(
        hostile["invalid_page_events"], 0,
        "{backend}: lies pass validation"
    );
    assert_eq!(sum(hostile, "invalid_records"), 0, "{backend}");
    assert!(sum(hostile, "boosts") > 0, "{backend}: the lies won boosts");
    assert!(sum(hostile, "rcu_waits") > 0, "{backend}: RcuWait taken");
    // Beside a VM that always waits, the ledger ran out and said no.
    let cap = m["settings"]["ledger_max_debt_ns"].as_u64().unwrap();
    assert!(cap > 0);
    assert!(
        sum(hostile, "boosts_refused") > 0,
        "{backend}: the ledger refused boosts once the hostile VM owed its limit"
    );
    assert!(
        hostile["boost_debt_max_ns"].as_u64().unwrap() >= cap,
        "{backend}: the hostile VM reached the limit: {}",
        hostile["boost_debt_max_ns"]
    );
    // The promise, over the worst interval of the run.
    let f = &normal["fair_share"];
    let short = f["shortfall_max_ns"].as_u64().unwrap();
    assert!(
        f["share_ns"].as_u64().unwrap() > 0 && f["received_ns"].as_u64().unwrap() > 0,
        "{backend}: the VMs competed: {f}"
    );
    assert!(
        short <= cap + GRANULARITY_NS,
        "{backend}: the normal VM fell {short} ns short of its fair share over \
         [{}, {}] ns; the ledger promises at most {cap} ns plus {GRANULARITY_NS} ns",
        f["shortfall_from_ns"],
        f["shortfall_to_ns"]
    );
}

#[test]
fn lies_beside_a_normal_vm_on_the_slot_backend() {
    if !require_kvm("lies_beside_a_normal_vm_on_the_slot_backend") {
        return;
    }
    let m = beside_a_normal_vm("slots");
    check_the_promise("slots", &m);
    // The slot backend snapshots every look: the record kept mid-update is seen torn.
    assert!(
        m["vms"][0]["torn_record_reads"].as_u64().unwrap() > 0,
        "the record kept mid-update is read as torn"
    );
}

#[test]
fn lies_beside_a_normal_vm_on_the_linux_backend() {
    let name = "lies_beside_a_normal_vm_on_the_linux_backend";
    if !require_kvm(name) || !may_raise(name) {
        return;
    }
    // With one CPU the Linux backend boosts nothing (a boost would starve the rest).
    let cpus = host_vmm::sched::affinity::allowed_cpus().map_or(1, |c| c.len());
    if cpus < 2 {
        eprintln!("*** {name}: needs two CPUs: NOT RUN ***");
        return;
    }
    let m = beside_a_normal_vm("linux");
    check_the_promise("linux", &m);
}
