//! What the host scheduler did to each vCPU reaches both the guest (host fields of the shared
//! records) and the user (`--metrics FILE` JSON, a table on stderr).

use host_vmm::cli::EXIT_USAGE;
use pvsync_tests::{field, guest_kernel, pvsync, require_kvm};

const VCPUS: usize = 4;

#[test]
fn metrics_json_and_host_fields_report_runnable_wait() {
    if !require_kvm("metrics_json_and_host_fields_report_runnable_wait") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pvsync-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.json");
    let k = guest_kernel().to_str().unwrap().to_owned();
    let out = pvsync(&[
        "run",
        "--kernel",
        &k,
        "--vcpus",
        "4",
        "--mem",
        "128",
        "--cmdline",
        "test=locktorture duration=1000",
        "--dump-shared",
        "--metrics",
        path.to_str().unwrap(),
    ]);
    out.check(out.status == Some(0), "locktorture passes");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(all["schema_version"], 1);
    assert_eq!(all["settings"]["backend"], "slots");
    let m = &all["vms"][0];
    assert_eq!(m["outcome"]["kind"], "guest-exit");
    assert_eq!(m["invalid_shared_records"], 0);
    assert_eq!(m["invalid_page_events"], 0);
    let vcpus = m["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), VCPUS);
    for v in vcpus {
        assert!(
            v["run_total_ns"].as_u64().unwrap() > 0,
            "every vCPU ran: {v}"
        );
    }
    let waited: u64 = vcpus
        .iter()
        .map(|v| v["runnable_wait_total_ns"].as_u64().unwrap())
        .sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if VCPUS > cores {
        // Four busy vCPUs on fewer cores must wait for one.
        assert!(waited > 0, "overcommitted vCPUs never waited: {m}");
        let published: u64 = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("shared vcpu="))
            .map(|l| {
                field(l, "host_preempted_ns")
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        assert!(
            published > 0 && published <= waited,
            "host fields show the wait ({published} of {waited} ns)"
        );
    }
    out.check(
        out.stderr.contains("runnable_wait_total_ms"),
        "metrics table on stderr",
    );
}

/// Found before the guest starts: a usage error naming the flag and the path, and no guest
/// output at all.
#[test]
fn unwritable_metrics_path_is_refused_before_the_run() {
    let k = guest_kernel().to_str().unwrap().to_owned();
    for (flag, path) in [
        ("--metrics", "/nonexistent/dir/m.json"),
        ("--trace", "/nonexistent/dir/t.json"),
        ("--results", "/proc/pvsync-results"),
    ] {
        let out = pvsync(&["run", "--kernel", &k, flag, path]);
        out.check(out.status == Some(EXIT_USAGE), "usage error status");
        out.check(
            out.stderr
                .contains(&format!("{flag} {path}: cannot create it")),
            "names the flag and the path",
        );
        out.check(out.stdout.is_empty(), "no guest output: nothing ran");
        out.check(!out.stderr.contains("panicked"), "no panic");
    }
}
