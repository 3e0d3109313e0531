//! The Linux backend applies the boost policies through the host scheduler: a boosted vCPU
//! thread runs `SCHED_FIFO` for a bounded budget, `spread` pins siblings apart, and every
//! exit path gives a raised thread its own scheduling back. What is checked here is what
//! the host kernel showed: every raise and restore is read back by the VMM
//! (`host_priority` in the metrics), and its monitor looks at each thread in `/proc`.

use std::process::Command;
use std::time::Duration;

use host_vmm::cli::{EXIT_HOST_ERROR, EXIT_INTERRUPTED, EXIT_TIMEOUT};
use pvsync_tests::{
    guest_kernel, may_raise, on_cpus, pvsync_bin, require_kvm, run_with_limit, Output,
};
use serde_json::Value;

/// Runs pvsync under the Linux backend with `args`; returns the output and the metrics.
fn linux_run(name: &str, args: &[&str], env: Option<(&str, &str)>) -> (Output, Value) {
    let path =
        std::env::temp_dir().join(format!("pvsync-linux-{name}-{}.json", std::process::id()));
    let k = guest_kernel().to_str().unwrap().to_owned();
    let mut cmd = on_cpus(2);
    cmd.arg(pvsync_bin())
        .args(["run", "--kernel", &k, "--mem", "128", "--backend", "linux"])
        .args(["--metrics", path.to_str().unwrap()])
        .args(args);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = run_with_limit(cmd, Duration::from_secs(120));
    let m = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| panic!("{name}: no metrics:\n{}", out.all()));
    let _ = std::fs::remove_file(&path);
    (out, m)
}

fn vcpus(m: &Value, vm: usize) -> &Vec<Value> {
    m["vms"][vm]["vcpus"].as_array().unwrap()
}

fn prio(v: &Value, key: &str) -> u64 {
    v["host_priority"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no host_priority.{key} in {v}"))
}

fn boosts(v: &Value) -> u64 {
    v["boosts"]
        .as_object()
        .unwrap()
        .values()
        .map(|b| b.as_u64().unwrap())
        .sum()
}

/// What must hold of every vCPU thread after any run: each boost counted was one the host
/// showed (read back `SCHED_FIFO`), each was given back and read back as the thread's own
/// scheduling, the monitor never saw a real-time thread that no live boost accounted for,
/// and no thread left the VM raised. Returns the boosts made.
fn all_given_back(name: &str, m: &Value) -> u64 {
    let mut raised = 0;
    for vm in 0..m["vms"].as_array().unwrap().len() {
        for v in vcpus(m, vm) {
            assert_eq!(
                boosts(v),
                prio(v, "raised"),
                "{name}: counted = raised: {v}"
            );
            assert_eq!(prio(v, "restored"), prio(v, "raised"), "{name}: {v}");
            assert_eq!(prio(v, "restore_failures"), 0, "{name}: {v}");
            assert_eq!(prio(v, "samples_unaccounted"), 0, "{name}: {v}");
            assert_eq!(
                v["host_priority"]["raised_at_exit"], false,
                "{name}: left raised: {v}"
            );
            raised += prio(v, "raised");
        }
    }
    raised
}

#[test]
fn boosts_raise_the_thread_and_give_it_back() {
    if !require_kvm("boosts_raise_the_thread_and_give_it_back")
        || !may_raise("boosts_raise_the_thread_and_give_it_back")
    {
        return;
    }
    // Four vCPUs on this host's cores: readers get preempted and grace periods wait.
    let (out, m) = linux_run(
        "rcu",
        &[
            "--vcpus",
            "4",
            "--policy",
            "pv",
            "--cmdline",
            "test=rcutorture duration=1500",
        ],
        None,
    );
    out.check(out.status == Some(0), "rcutorture passes");
    assert_eq!(m["settings"]["backend"], "linux");
    let raised = all_given_back("rcu", &m);
    assert!(
        raised > 0,
        "the pv policy boosted no thread:\n{}",
        out.all()
    );
    // Alone, its boosts take the CPU from no other VM: the ledger charges nothing.
    assert_eq!(m["vms"][0]["boost_debt_max_ns"], 0, "{m}");

    // The `none` policy boosts nothing, and nothing is raised.
    let (out, m) = linux_run(
        "none",
        &[
            "--vcpus",
            "4",
            "--policy",
            "none",
            "--cmdline",
            "test=rcutorture duration=500",
        ],
        None,
    );
    out.check(out.status == Some(0), "rcutorture passes");
    assert_eq!(all_given_back("none", &m), 0);
}

#[test]
fn a_guest_that_never_exits_cannot_keep_a_raised_priority() {
    if !require_kvm("a_guest_that_never_exits_cannot_keep_a_raised_priority")
        || !may_raise("a_guest_that_never_exits_cannot_keep_a_raised_priority")
    {
        return;
    }
    // Odd vCPUs spin with interrupts off and never exit to the VMM while the even ones name
    // them: the boosts they get can only end by the backend's timer.
    let (out, m) = linux_run(
        "hold",
        &[
            "--vcpus",
            "4",
            "--policy",
            "pv",
            "--cmdline",
            "test=hostile-hold duration=2000",
        ],
        None,
    );
    out.check(out.status == Some(0), "hostile-hold runs to its end");
    let raised = all_given_back("hold", &m);
    assert!(raised > 0, "no holder was boosted:\n{}", out.all());
    let holders = vcpus(&m, 0).iter().skip(1).step_by(2);
    for h in holders.clone() {
        // A holder never exits while it holds, nor gives anything back: every boost of its
        // but the last (which the VM's end may cut) was ended by the timer.
        assert!(prio(h, "restored") <= prio(h, "expired") + 1, "{h}");
    }
    let expired: u64 = holders.map(|v| prio(v, "expired")).sum();
    assert!(
        expired > 0,
        "a holder's boost ended other than by its budget: {m}"
    );
}

#[test]
fn spread_keeps_siblings_on_different_host_cpus() {
    if !require_kvm("spread_keeps_siblings_on_different_host_cpus") {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("*** spread test needs two host CPUs; this host has {cores}: not run ***");
        return;
    }
    let vm = "vcpus=2,cmdline=test=locktorture lock=mcs duration=1000";
    let (out, m) = linux_run(
        "spread",
        &[
            "--placement",
            "spread",
            "--policy",
            "pv",
            "--vm",
            vm,
            "--vm",
            vm,
        ],
        None,
    );
    out.check(out.status == Some(0), "both VMs pass");
    assert_eq!(m["settings"]["placement"], "spread");
    for vm in m["vms"].as_array().unwrap() {
        assert!(vm["stacking_samples"].as_u64().unwrap() > 0, "{vm}");
        // Sampled from the CPU each thread last ran on: pinned apart, never together.
        assert_eq!(vm["stacking_fraction"].as_f64().unwrap(), 0.0, "{vm}");
    }
    // The control: the whole VMM confined to one host CPU, where siblings can only stack.
    // The same sampling must see it.
    let k = guest_kernel().to_str().unwrap().to_owned();
    let path = std::env::temp_dir().join(format!("pvsync-linux-one-{}.json", std::process::id()));
    let mut cmd = on_cpus(1);
    cmd.arg(pvsync_bin())
        .args(["run", "--kernel", &k, "--mem", "128", "--backend", "linux"])
        .args(["--placement", "wake-affine", "--vm", vm, "--vm", vm])
        .args(["--metrics", path.to_str().unwrap()]);
    let out = run_with_limit(cmd, Duration::from_secs(120));
    out.check(out.status == Some(0), "both VMs pass on one CPU");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    for vm in m["vms"].as_array().unwrap() {
        assert!(vm["stacking_fraction"].as_f64().unwrap() > 0.0, "{vm}");
    }
}

#[test]
fn every_exit_path_gives_the_priority_back() {
    if !require_kvm("every_exit_path_gives_the_priority_back")
        || !may_raise("every_exit_path_gives_the_priority_back")
    {
        return;
    }
    let args = |cmdline: &'static str, timeout: &'static str| {
        vec![
            "--vcpus",
            "4",
            "--policy",
            "pv",
            "--timeout",
            timeout,
            "--cmdline",
            cmdline,
        ]
    };
    // The guest exits.
    let (out, m) = linux_run("exit", &args("test=hostile-hold duration=1500", "60"), None);
    out.check(out.status == Some(0), "guest exit");
    let mut raised = all_given_back("exit", &m);
    // The timeout stops a guest that holds on.
    let (out, m) = linux_run(
        "timeout",
        &args("test=hostile-hold duration=60000", "3"),
        None,
    );
    out.check(out.status == Some(EXIT_TIMEOUT), "the timeout stops it");
    assert_eq!(m["vms"][0]["outcome"]["kind"], "timeout", "{m}");
    raised += all_given_back("timeout", &m);
    // The VMM fails: vCPU 0's thread (one that names the holders) dies mid-run, and the
    // holders, which may be raised at that moment, must be given back as the VM ends.
    let (out, m) = linux_run(
        "fault",
        &args("test=hostile-hold duration=60000", "60"),
        Some(("PVSYNC_INJECT", "vcpu-panic:2000")),
    );
    out.check(
        out.status == Some(EXIT_HOST_ERROR),
        "a VMM fault ends the run",
    );
    assert_eq!(m["vms"][0]["outcome"]["kind"], "vmm-fault", "{m}");
    raised += all_given_back("fault", &m);
    // SIGTERM.
    let k = guest_kernel().to_str().unwrap().to_owned();
    let path = std::env::temp_dir().join(format!("pvsync-linux-term-{}.json", std::process::id()));
    let mut child = Command::new(pvsync_bin())
        .args(["run", "--kernel", &k, "--mem", "128", "--backend", "linux"])
        .args(["--metrics", path.to_str().unwrap()])
        .args(args("test=hostile-hold duration=60000", "60"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill sends a signal to our own child, which is still ours to signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("pvsync did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(EXIT_INTERRUPTED),
        "SIGTERM ends the run"
    );
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(m["vms"][0]["outcome"]["kind"], "interrupted", "{m}");
    raised += all_given_back("sigterm", &m);
    // Across the four runs the holders were boosted (a run alone may happen not to).
    assert!(raised > 0, "no run raised a thread");
}

#[test]
fn without_cap_sys_nice_it_says_so_once_and_still_runs() {
    if !require_kvm("without_cap_sys_nice_it_says_so_once_and_still_runs") {
        return;
    }
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !setpriv.exists() || !root || cores < 2 {
        eprintln!(
            "*** without_cap_sys_nice: needs root, /usr/bin/setpriv and two CPUs: NOT RUN ***"
        );
        return;
    }
    // Two VMs of two vCPUs on this host's cores: overcommitted (the policy wants boosts),
    // and each VM fits its own CPUs (spread can keep siblings apart).
    const VM: &str = "vcpus=2,cmdline=test=rcutorture duration=1500";
    let k = guest_kernel().to_str().unwrap().to_owned();
    let path = std::env::temp_dir().join(format!("pvsync-linux-nocap-{}.json", std::process::id()));
    // No capability, and no real-time budget either (root's RLIMIT_RTPRIO may allow some).
    let mut cmd = on_cpus(2);
    cmd.args(["prlimit", "--rtprio=0:0", "--"])
        .arg(setpriv)
        .args(["--inh-caps=-sys_nice", "--bounding-set=-sys_nice"])
        .arg(pvsync_bin())
        .args(["run", "--kernel", &k, "--mem", "128", "--backend", "linux"])
        .args(["--policy", "pv", "--placement", "spread"])
        .args(["--metrics", path.to_str().unwrap()])
        .args(["--vm", VM, "--vm", VM]);
    let out = run_with_limit(cmd, Duration::from_secs(120));
    out.check(
        out.status == Some(0),
        "the run passes without the privilege",
    );
    let warned = out.stderr.matches("no CAP_SYS_NICE").count();
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    let refused: u64 = (0..2)
        .flat_map(|vm| vcpus(&m, vm))
        .map(|v| v["boosts_refused"].as_u64().unwrap())
        .sum();
    assert_eq!(all_given_back("nocap", &m), 0, "nothing was raised");
    if refused > 0 {
        // The policy wanted boosts: the user hears it once, not once per boost.
        assert_eq!(warned, 1, "{}", out.stderr);
    } else {
        assert_eq!(warned, 0, "{}", out.stderr);
    }
    // What needs no privilege still applies: the threads were placed apart.
    for vm in m["vms"].as_array().unwrap() {
        assert!(vm["stacking_samples"].as_u64().unwrap() > 0, "{vm}");
        assert_eq!(vm["stacking_fraction"].as_f64().unwrap(), 0.0, "{vm}");
    }
}
