//! The guest's workloads (`test=ebizzy`, `test=postmark`, `test=cpu-bound`) under pvsync at
//! 4 vCPUs with small `work=`: each passes its self-check, and its RESULT line has every
//! field with consistent numbers (the work asked for was done; quantiles and grace-period
//! lengths in order). No timing thresholds.

use pvsync_tests::{field, num, pvsync_guest, require_kvm};
use shared_abi::ExitCode;

const VCPUS: u32 = 4;

/// Runs `cmdline`, which must pass; returns its `RESULT <name>` line after checking that
/// it has exactly the fields `keys`, in that order.
fn workload(cmdline: &str, name: &str, keys: &[&str]) -> String {
    let out = pvsync_guest(VCPUS, 128, cmdline);
    out.check(
        !out.timed_out && !out.all().contains("panicked") && !out.stdout.contains("PANIC"),
        "hang or panic",
    );
    out.check(
        out.status == Some(host_vmm::cli::guest_exit_status(ExitCode::Success as u32)),
        &format!("{cmdline}: expected success"),
    );
    out.check(
        out.stdout.lines().any(|l| l == "SUCCESS"),
        &format!("{cmdline}: expected SUCCESS"),
    );
    let line = out
        .line(&format!("RESULT {name} "))
        .unwrap_or_else(|| panic!("no RESULT {name} line"))
        .to_owned();
    let got: Vec<&str> = line
        .split_whitespace()
        .skip(2)
        .map(|w| w.split_once('=').map_or(w, |(k, _)| k))
        .collect();
    assert_eq!(got, keys, "{line}");
    for k in keys {
        assert!(
            field(&line, k).is_some_and(|v| v.parse::<u64>().is_ok()),
            "{k}: {line}"
        );
    }
    line
}

#[test]
fn ebizzy_does_its_work_and_checks_it() {
    if !require_kvm("ebizzy_does_its_work_and_checks_it") {
        return;
    }
    // Three workers: 301 operations do not split evenly.
    let r = workload(
        "test=ebizzy work=301 threads=3 seed=7",
        "ebizzy",
        &[
            "threads",
            "records",
            "elapsed_us",
            "records_per_s",
            "lock_waits",
            "lock_wait_p50_us",
            "lock_wait_p99_us",
            "lock_wait_max_us",
            "checksum_ok",
        ],
    );
    assert_eq!(num(&r, "threads"), 3, "{r}");
    assert_eq!(num(&r, "records"), 301, "{r}");
    assert_eq!(num(&r, "checksum_ok"), 1, "{r}");
    // One bucket-lock acquisition per operation.
    assert_eq!(num(&r, "lock_waits"), 301, "{r}");
    assert!(num(&r, "elapsed_us") > 0, "{r}");
    let (p50, p99, max) = (
        num(&r, "lock_wait_p50_us"),
        num(&r, "lock_wait_p99_us"),
        num(&r, "lock_wait_max_us"),
    );
    assert!(p50 <= p99 && p99 <= max, "{r}");
}

const POSTMARK_KEYS: [&str; 13] = [
    "threads",
    "transactions",
    "files_final",
    "elapsed_us",
    "tps",
    "gps",
    "gp_min_us",
    "gp_avg_us",
    "gp_max_us",
    "gp_cpu_us",
    "cbs_peak",
    "cb_mem_peak_bytes",
    "model_ok",
];

#[test]
fn postmark_does_its_work_and_checks_it() {
    if !require_kvm("postmark_does_its_work_and_checks_it") {
        return;
    }
    let cmdline = "test=postmark work=300 seed=5";
    let r = workload(cmdline, "postmark", &POSTMARK_KEYS);
    assert_eq!(num(&r, "threads"), u64::from(VCPUS), "one per CPU: {r}");
    assert_eq!(num(&r, "transactions"), 300, "{r}");
    assert_eq!(num(&r, "model_ok"), 1, "{r}");
    assert!(
        num(&r, "gps") > 0,
        "deletes and updates wait for grace periods: {r}"
    );
    let (min, avg, max) = (
        num(&r, "gp_min_us"),
        num(&r, "gp_avg_us"),
        num(&r, "gp_max_us"),
    );
    assert!(min <= avg && avg <= max, "{r}");
    // Nodes were retired through call_rcu, each holding at least its own bytes.
    assert!(num(&r, "cbs_peak") > 0, "{r}");
    // Each pending callback holds a whole node (at least its name and its link, 16 bytes),
    // and the memory peak is at least what the callback peak held.
    assert!(
        num(&r, "cb_mem_peak_bytes") >= 16 * num(&r, "cbs_peak"),
        "{r}"
    );
    // Each worker's transactions depend on the seed alone, not on the interleaving: the
    // same seed leaves the same files.
    let again = workload(cmdline, "postmark", &POSTMARK_KEYS);
    assert_eq!(
        num(&again, "files_final"),
        num(&r, "files_final"),
        "{r}\n{again}"
    );
}

#[test]
fn cpu_bound_does_its_work() {
    if !require_kvm("cpu_bound_does_its_work") {
        return;
    }
    let r = workload(
        "test=cpu-bound work=1001",
        "cpu-bound",
        &["threads", "rounds", "elapsed_us"],
    );
    assert_eq!(num(&r, "threads"), u64::from(VCPUS), "one per CPU: {r}");
    assert_eq!(num(&r, "rounds"), 1001, "{r}");
}

/// The negative control: a model that misses one delete must be caught (FAILURE, exit 1).
#[test]
fn postmark_catches_a_model_that_misses_a_delete() {
    if !require_kvm("postmark_catches_a_model_that_misses_a_delete") {
        return;
    }
    let out = pvsync_guest(VCPUS, 128, "test=postmark work=300 model=skip-delete");
    out.check(
        !out.timed_out && !out.all().contains("panicked") && !out.stdout.contains("PANIC"),
        "hang or panic",
    );
    out.check(
        out.status == Some(host_vmm::cli::guest_exit_status(ExitCode::Failure as u32)),
        "expected failure",
    );
    out.check(
        out.stdout.lines().any(|l| l == "FAILURE"),
        "expected FAILURE",
    );
    let r = out
        .line("RESULT postmark ")
        .expect("a RESULT postmark line");
    assert_eq!(num(r, "model_ok"), 0, "{r}");
    assert_eq!(num(r, "transactions"), 300, "{r}");
}
