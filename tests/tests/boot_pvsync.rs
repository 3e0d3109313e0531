//! Boots the guest under the pvsync VMM with 1 to 64 vCPUs (more vCPUs than host cores is
//! the point) and checks every CPU came online and the host decoded a region the guest filled.

use pvsync_tests::{field, pvsync_guest, require_kvm, Output};

fn assert_boot(out: &Output, n: u32) {
    out.check(out.status == Some(0), "guest did not exit with success");
    out.check(
        !out.timed_out && !out.all().contains("panicked"),
        "host panicked or hung",
    );
    let boot = out
        .line("RESULT boot")
        .unwrap_or_else(|| panic!("no RESULT boot line:\n{}", out.all()));
    assert_eq!(field(boot, "cpus"), Some(n.to_string().as_str()), "{boot}");
    assert_eq!(
        field(boot, "online"),
        Some(n.to_string().as_str()),
        "{boot}"
    );
    assert_eq!(field(boot, "shared"), Some("ok"), "{boot}");
    for cpu in 1..n {
        let want = format!("cpu {cpu} online");
        out.check(
            out.stdout.lines().any(|l| l == want),
            &format!("cpu {cpu} never reported online"),
        );
    }

    let region = out
        .line("shared region")
        .unwrap_or_else(|| panic!("no shared-region dump:\n{}", out.all()));
    assert_eq!(
        field(region, "vcpus"),
        Some(n.to_string().as_str()),
        "{region}"
    );
    assert_eq!(
        field(region, "host_flags"),
        Some("0x1"),
        "ACCEPTED flag: {region}"
    );
    assert_eq!(field(region, "invalid_records"), Some("0"), "{region}");
    let records: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("shared vcpu="))
        .collect();
    assert_eq!(records.len(), n as usize, "one record line per vCPU");
    for (i, rec) in records.iter().enumerate() {
        assert_eq!(field(rec, "vcpu"), Some(i.to_string().as_str()));
        // The BSP runs the test in the kernel; every AP parked itself idle.
        let want = if i == 0 { "kernel" } else { "idle" };
        assert_eq!(field(rec, "mode"), Some(want), "{rec}");
        let seq: u32 = field(rec, "seq").unwrap().parse().unwrap();
        assert!(
            seq >= 2 && seq % 2 == 0,
            "record was published and is not mid-update: {rec}"
        );
        assert_eq!(field(rec, "spin_holder"), Some("none"), "{rec}");
        assert_eq!(field(rec, "problems"), Some("none"), "{rec}");
    }
}

fn boot(n: u32) {
    if !require_kvm(&format!("boot_{n}_vcpus")) {
        return;
    }
    let out = pvsync_guest(n, 256, "test=boot");
    assert_boot(&out, n);
}

#[test]
fn boot_1_vcpu() {
    boot(1);
}

#[test]
fn boot_2_vcpus() {
    boot(2);
}

#[test]
fn boot_4_vcpus() {
    boot(4);
}

#[test]
fn boot_8_vcpus() {
    boot(8);
}

#[test]
fn boot_64_vcpus() {
    boot(64);
}

#[test]
fn selftests_pass_on_4_vcpus() {
    if !require_kvm("selftests_pass_on_4_vcpus") {
        return;
    }
    let out = pvsync_guest(4, 128, "test=selftest");
    assert_boot(&out, 4);
    for t in pvsync_tests::SELFTESTS {
        out.check(
            out.stdout.contains(&format!("TEST {t} ok")),
            &format!("self-test {t} did not pass"),
        );
    }
    let summary = format!(
        "RESULT selftest passed={} failed=0",
        pvsync_tests::SELFTESTS.len()
    );
    out.check(out.stdout.contains(&summary), "self-test summary");
}

#[test]
fn host_refuses_every_bad_registration() {
    if !require_kvm("host_refuses_every_bad_registration") {
        return;
    }
    let out = pvsync_guest(2, 64, "test=hostile-hypercalls");
    let cases: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("HOSTILE "))
        .collect();
    for case in [
        "misaligned",
        "outside-ram",
        "bad-magic",
        "version",
        "vcpu-count",
        "geometry",
        "ring-entries",
        "overlaps-kernel",
        "crosses-ram-end",
        "byte-write",
        "byte-read",
        "registered",
        "second-registration",
    ] {
        let ran = cases
            .iter()
            .any(|c| c.starts_with(&format!("HOSTILE {case} ")));
        out.check(ran, &format!("hostile case {case} did not run"));
    }
    for c in &cases {
        assert!(
            c.ends_with(" ok"),
            "host answered a bad registration wrongly: {c}"
        );
    }
    out.check(out.status == Some(0), "guest reported success");
}
