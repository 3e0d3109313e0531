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

/// Boost reasons that come from what a record claims (not from the YieldTo argument).
const CLAIMED: &[&str] = &["lock-holder", "ipi-ack-owed", "rcu-reader", "rcu-holdout"];

/// One run at a time: the two backends' runs would otherwise share the two CPUs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the hostile VM beside the normal one under `backend` on two host CPUs; returns
/// the metrics and the hostile VM's records as dumped at the end (`problems=` of each).
fn beside_a_normal_vm(backend: &str) -> (Value, Vec<String>) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::env::temp_dir().join(format!(
        "pvsync-claims-{backend}-{}.json",
        std::process::id()
    ));
    let k = guest_kernel().to_str().unwrap().to_owned();
    let mut cmd: Command = on_cpus(2);
    cmd.arg(pvsync_bin())
        .args(["run", "--kernel", &k, "--vcpus", "4", "--mem", "128"])
        .args(["--backend", backend, "--policy", "pv", "--timeout", "90"])
        .args(["--metrics", path.to_str().unwrap(), "--dump-shared"])
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
    // The dump (on stderr) lists the VMs in order: the hostile VM's region first.
    let problems: Vec<String> = out
        .stderr
        .lines()
        .skip_while(|l| !l.starts_with("shared region "))
        .skip(1)
        .take_while(|l| l.starts_with("shared vcpu="))
        .map(|l| {
            pvsync_tests::field(l, "problems")
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    (m, problems)
}

/// Boosts VM `vm`'s vCPUs received for `reasons`.
fn boosts_for(vm: &Value, reasons: &[&str]) -> u64 {
    vm["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| {
            reasons
                .iter()
                .map(move |r| v["boosts"][*r].as_u64().unwrap())
        })
        .sum()
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

fn check_the_promise(backend: &str, m: &Value, problems: &[String]) {
    let (hostile, normal) = (&m["vms"][0], &m["vms"][1]);
    assert_eq!(
        (hostile["name"].as_str(), normal["name"].as_str()),
        (Some("hostile"), Some("normal"))
    );
    // The lies are valid: at the end every record passes the host's checks, but the one
    // kept mid-update reads torn.
    assert_eq!(
        problems.len(),
        4,
        "{backend}: four records dumped: {problems:?}"
    );
    assert!(
        problems[..3].iter().all(|p| p == "none") && problems[3] == "torn",
        "{backend}: records pass validation, the last is torn: {problems:?}"
    );
    // The policies acted on what the records claim, not only on the YieldTo argument.
    assert!(
        boosts_for(hostile, CLAIMED) > 0,
        "{backend}: claimed holders, IPI debtors or readers were boosted"
    );
    // Beside a VM that is always active, the ledger ran up to its limit.
    let cap = m["settings"]["ledger_max_debt_ns"].as_u64().unwrap();
    assert!(cap > 0);
    assert!(
        hostile["boost_debt_max_ns"].as_u64().unwrap() >= cap,
        "{backend}: the hostile VM owed the limit: {}",
        hostile["boost_debt_max_ns"]
    );
    // No guest region was read under a scheduler lock.
    assert_eq!(
        m["audit"]["guest_reads_under_scheduler_lock"], 0,
        "{backend}"
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
    let (m, problems) = beside_a_normal_vm("slots");
    check_the_promise("slots", &m, &problems);
    // The slot backend snapshots at every look: nothing failed validation, the record kept
    // mid-update was seen torn, and the ledger said no.
    let hostile = &m["vms"][0];
    assert!(boosts_for(hostile, &["lock-holder", "ipi-ack-owed"]) > 0);
    assert!(boosts_for(hostile, &["rcu-reader", "rcu-holdout"]) > 0);
    assert_eq!(hostile["invalid_page_events"], 0);
    assert!(hostile["torn_record_reads"].as_u64().unwrap() > 0);
    assert!(sum(hostile, "boosts_refused") > 0);
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
    let (m, problems) = beside_a_normal_vm("linux");
    check_the_promise("linux", &m, &problems);
}
