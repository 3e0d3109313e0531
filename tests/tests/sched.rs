//! The slot scheduler and the boost policies on real KVM: 4-vCPU guests on the default 2
//! slots (overcommitted), or two VMs at once. Assertions are on the scheduler's counters
//! (`--metrics` JSON), never on timings.

use std::path::PathBuf;

use host_vmm::cli::{EXIT_GUEST_PANIC, EXIT_USAGE};
use pvsync_tests::{guest_kernel, pvsync, require_kvm, Output};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvsync-sched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs `pvsync run` with `args` plus `--metrics`; returns the output and the metrics.
fn run_metrics(tag: &str, args: &[&str]) -> (Output, Value) {
    let path = scratch(&format!("{tag}.json"));
    let k = guest_kernel().to_str().unwrap().to_owned();
    let mut all = vec![
        "run",
        "--kernel",
        &k,
        "--timeout",
        "120",
        "--metrics",
        path.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let out = pvsync(&all);
    out.check(!out.stderr.contains("panicked"), "VMM panicked");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let m = serde_json::from_str(&text).unwrap_or(Value::Null);
    out.check(m.is_object(), "metrics JSON written");
    (out, m)
}

/// Sum of `key` (a number, or a boost reason under "boosts") over VM `vm`'s vCPUs.
fn sum(m: &Value, vm: usize, key: &str) -> u64 {
    m["vms"][vm]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.get(key)
                .or_else(|| v["boosts"].get(key))
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("no counter {key} in {v}"))
        })
        .sum()
}

fn one_vm(tag: &str, policy: &str, cmdline: &str) -> (Output, Value) {
    let (out, m) = run_metrics(
        tag,
        &["--vcpus", "4", "--policy", policy, "--cmdline", cmdline],
    );
    out.check(out.status == Some(0), "the guest passes");
    (out, m)
}

/// tlbtorture: user-mode readers receive shootdown IPIs; the remapper spins for their
/// acknowledgements and yields. KVM's rule never boosts a vCPU preempted in user mode; the
/// upstream fix (kvm-ipi) boosts one with an interrupt pending; pv boosts the vCPU that owes
/// the acknowledgement whatever its mode.
#[test]
fn only_kvm_ipi_and_pv_boost_a_user_mode_ipi_receiver() {
    if !require_kvm("only_kvm_ipi_and_pv_boost_a_user_mode_ipi_receiver") {
        return;
    }
    let cmd = "test=tlbtorture duration=1500";
    let (out, kvm) = one_vm("kvm", "kvm", cmd);
    out.check(sum(&kvm, 0, "yields") > 0, "the sender spun and yielded");
    out.check(
        sum(&kvm, 0, "user_mode_boosts") == 0,
        "kvm never boosts a vCPU preempted in user mode",
    );
    out.check(
        sum(&kvm, 0, "user-mode-with-interrupt") == 0,
        "no such reason",
    );

    let (out, fixed) = one_vm("kvm-ipi", "kvm-ipi", cmd);
    out.check(
        sum(&fixed, 0, "user-mode-with-interrupt") > 0,
        "kvm-ipi boosts a user-mode receiver with an IPI pending",
    );
    out.check(
        sum(&fixed, 0, "user_mode_boosts") > 0,
        "counted as user mode",
    );

    let (out, pv) = one_vm("pv", "pv", cmd);
    out.check(
        sum(&pv, 0, "user_mode_boosts") > 0,
        "pv boosts the user-mode receiver",
    );
    out.check(
        sum(&pv, 0, "named-by-spinner") + sum(&pv, 0, "ipi-ack-owed") > 0,
        "because it was named or owes an acknowledgement",
    );
}

/// rcutorture: readers get preempted inside read-side sections by the slot scheduler. The
/// grace-period kthread names the holdouts it waits on (the RcuWait hypercall), and with pv
/// the preempted ones are boosted on that word. The control (no boosting) hears the same
/// word and boosts nobody.
#[test]
fn pv_boosts_the_preempted_holdouts_a_grace_period_names() {
    if !require_kvm("pv_boosts_the_preempted_holdouts_a_grace_period_names") {
        return;
    }
    let cmd = "test=rcutorture duration=1500";
    let (out, pv) = one_vm("rcu-pv", "pv", cmd);
    out.check(sum(&pv, 0, "rcu_waits") > 0, "the guest named its holdouts");
    out.check(
        sum(&pv, 0, "rcu-reader") + sum(&pv, 0, "rcu-holdout") > 0,
        "pv boosted a named holdout",
    );
    let (out, none) = one_vm("rcu-none", "none", cmd);
    out.check(
        sum(&none, 0, "rcu_waits") > 0,
        "the guest named its holdouts",
    );
    out.check(
        sum(&none, 0, "rcu-reader")
            + sum(&none, 0, "rcu-holdout")
            + sum(&none, 0, "user_mode_boosts")
            == 0,
        "round robin never boosts",
    );
    out.check(sum(&none, 0, "preemptions") > 0, "readers were preempted");
}

fn stacking(placement: &str) -> (Output, f64, f64) {
    let vm = "vcpus=4,cmdline=test=locktorture lock=mcs duration=1200";
    let (out, m) = run_metrics(
        &format!("stack-{placement}"),
        &[
            "--slots",
            "4",
            "--placement",
            placement,
            "--vm",
            vm,
            "--vm",
            vm,
        ],
    );
    out.check(out.status == Some(0), "both guests pass");
    let f = |i: usize| m["vms"][i]["stacking_fraction"].as_f64().unwrap();
    out.check(
        m["vms"][0]["stacking_samples"].as_u64().unwrap() > 0,
        "stacking was sampled",
    );
    (out, f(0), f(1))
}

/// Two 4-vCPU VMs on 4 slots, the paper's set-up: wake-affine queues woken vCPUs behind
/// their waker (a sibling); spread never does when another slot has no sibling.
#[test]
fn spread_stacks_siblings_less_than_wake_affine() {
    if !require_kvm("spread_stacks_siblings_less_than_wake_affine") {
        return;
    }
    let (_, wa0, wa1) = stacking("wake-affine");
    let (out, sp0, sp1) = stacking("spread");
    out.check(
        sp0 < wa0 && sp1 < wa1,
        &format!("spread {sp0:.3}/{sp1:.3} vs wake-affine {wa0:.3}/{wa1:.3}"),
    );
}

/// A guest that scribbles random bytes over its shared page and floods the host with random
/// hypercalls runs beside a normal guest: no host panic, the garbage is counted and ignored,
/// and the normal guest passes with at least a third of the slot time (its fair share is a
/// half; the hostile VM also idles).
#[test]
fn hostile_guest_beside_a_normal_one() {
    if !require_kvm("hostile_guest_beside_a_normal_one") {
        return;
    }
    let (out, m) = run_metrics(
        "hostile",
        &[
            "--vcpus",
            "4",
            "--vm",
            "name=hostile,cmdline=test=hostile-page duration=1500",
            "--vm",
            "name=normal,cmdline=test=locktorture duration=1500",
        ],
    );
    out.check(out.status == Some(0), "both VMs exit 0");
    out.check(
        out.stdout.contains("[normal] SUCCESS") && out.stdout.contains("[hostile] SUCCESS"),
        "each console has its prefix",
    );
    let (hostile, normal) = (&m["vms"][0], &m["vms"][1]);
    assert_eq!(hostile["name"], "hostile");
    out.check(
        hostile["invalid_page_events"].as_u64().unwrap() > 0,
        "garbage in the page was seen",
    );
    out.check(sum(&m, 0, "bad_hypercalls") > 0, "bad hypercalls counted");
    out.check(
        sum(&m, 0, "invalid_records") == hostile["invalid_page_events"].as_u64().unwrap(),
        "per-vCPU invalid records add up to the VM's events",
    );
    out.check(
        normal["invalid_page_events"].as_u64().unwrap() == 0,
        "the normal VM's page stays valid",
    );
    out.check(
        m["audit"]["guest_reads_under_scheduler_lock"] == 0,
        "no region read under the scheduler's lock",
    );
    let (h, n) = (sum(&m, 0, "run_total_ns"), sum(&m, 1, "run_total_ns"));
    out.check(
        3 * n >= h + n,
        &format!("normal VM kept its share: {n} of {} ns", h + n),
    );
}

/// A scenario file runs several VMs; each keeps its own exit status and the process reports
/// the first failure.
#[test]
fn scenario_file_runs_vms_with_their_own_status() {
    if !require_kvm("scenario_file_runs_vms_with_their_own_status") {
        return;
    }
    let path = scratch("scenario.toml");
    let k = guest_kernel().to_str().unwrap().to_owned();
    std::fs::write(
        &path,
        format!(
            "[sched]\nslots = 2\nplacement = \"wake-affine\"\npolicy = \"kvm-ipi\"\n\n\
             [[vm]]\nname = \"good\"\nkernel = \"{k}\"\nvcpus = 2\ncmdline = \"test=selftest\"\n\n\
             [[vm]]\nname = \"bad\"\nkernel = \"{k}\"\nvcpus = 1\ncmdline = \"test=panic\"\n"
        ),
    )
    .unwrap();
    let out = pvsync(&["run", "--scenario", path.to_str().unwrap()]);
    out.check(
        out.status == Some(EXIT_GUEST_PANIC),
        "the panicking VM's status",
    );
    out.check(out.stdout.contains("[good] SUCCESS"), "the good VM passed");
    out.check(out.stdout.contains("[bad] "), "the bad VM's console");
    out.check(
        out.stderr.contains("good: guest exited with code 0")
            && out.stderr.contains("bad: guest exited with code 2"),
        "per-VM outcome lines",
    );
    out.check(
        out.stderr.contains("placement=wake-affine") && out.stderr.contains("policy=kvm-ipi"),
        "scenario settings applied",
    );
}

/// The Linux backend (host threads scheduled by Linux) still runs the guest, idling through
/// the same hypercall.
#[test]
fn linux_backend_runs_the_selftests() {
    if !require_kvm("linux_backend_runs_the_selftests") {
        return;
    }
    let (out, m) = run_metrics(
        "linux",
        &[
            "--vcpus",
            "4",
            "--backend",
            "linux",
            "--cmdline",
            "test=selftest",
        ],
    );
    out.check(out.status == Some(0), "selftests pass");
    assert_eq!(m["settings"]["backend"], "linux");
    out.check(
        sum(&m, 0, "halts") > 0,
        "idle vCPUs used the Idle hypercall",
    );
}

#[test]
fn bad_scheduler_flags_are_usage_errors() {
    let k = guest_kernel().to_str().unwrap().to_owned();
    let bad_toml = scratch("bad.toml");
    std::fs::write(&bad_toml, "[[vm]]\nvcpu = 4\n").unwrap();
    for (args, msg) in [
        (
            vec!["--policy", "fastest"],
            "unknown boost policy 'fastest'",
        ),
        (vec!["--policy", "pv,nope"], "unknown boost policy 'nope'"),
        (vec!["--placement", "random"], "unknown placement 'random'"),
        (vec!["--backend", "xen"], "unknown backend 'xen'"),
        (vec!["--vm", "vcpus=lots"], "is not a number"),
        (vec!["--vm", "gpu=1"], "unknown key 'gpu'"),
        (vec!["--vm", "count=99"], "at most 16 VMs"),
        (
            vec!["--scenario", bad_toml.to_str().unwrap()],
            "unknown field `vcpu`",
        ),
        (
            vec!["--scenario", "/nonexistent.toml"],
            "reading /nonexistent.toml",
        ),
    ] {
        let mut all = vec!["run", "--kernel", &k];
        all.extend_from_slice(&args);
        let out = pvsync(&all);
        out.check(
            out.status == Some(EXIT_USAGE),
            &format!("{args:?} is a usage error"),
        );
        out.check(out.stderr.contains(msg), &format!("{args:?}: says {msg:?}"));
        out.check(!out.stderr.contains("panicked"), "no panic");
    }
    let out = pvsync(&["run", "--vm", "vcpus=2"]);
    out.check(
        out.status == Some(EXIT_USAGE) && out.stderr.contains("no kernel"),
        "a VM without a kernel",
    );
}

/// A lock holder boosted on a waiter's lent turn reads `host_lent_by` and gives the turn
/// back when it releases the lock: the waiter runs at once instead of at the end of the
/// boost. Round robin lends nothing, so nothing is given back.
#[test]
fn a_boosted_lock_holder_gives_the_lent_turn_back() {
    if !require_kvm("a_boosted_lock_holder_gives_the_lent_turn_back") {
        return;
    }
    let cmd = "test=locktorture lock=ticket duration=1500";
    let (out, pv) = one_vm("lend-pv", "pv", cmd);
    out.check(
        sum(&pv, 0, "named-by-spinner") + sum(&pv, 0, "lock-holder") > 0,
        "pv boosted a holder a waiter named",
    );
    out.check(
        sum(&pv, 0, "turns_given_back") > 0,
        "a boosted holder gave its lent turn back",
    );
    let (out, none) = one_vm("lend-none", "none", cmd);
    out.check(sum(&none, 0, "turns_given_back") == 0, "nothing lent");
}
