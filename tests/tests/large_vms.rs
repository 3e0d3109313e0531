//! Every torture suite on large VMs, past the 64 vCPUs one machine word holds: 96 vCPUs (the
//! published user-mode-IPI setting) under pvsync and under stock QEMU/KVM, and 256 (APIC IDs
//! past 255: x2APIC MADT entries, CPUID leaf 0xb, 32-bit MSI destinations) under pvsync,
//! with modest memory: the kernel sizes its heap from RAM and CPU count, so the default two
//! threads per CPU fit. And a VM too small for what a suite asks fails with the reason, not
//! an allocation panic.
//!
//! 256 vCPUs on a CI machine's two cores is 128x overcommit, so the suites run briefly
//! (`duration=300`, or PVSYNC_TORTURE_MS) and one VM at a time: two such VMs at once would
//! only slow each other down.

use std::sync::Mutex;
use std::time::Instant;

use pvsync_tests::{
    field, num, pvsync_guest_command, qemu_guest, require_kvm, run_with_limit, Output, QemuMachine,
    RUN_LIMIT,
};
use shared_abi::ExitCode;

/// MiB of guest RAM for `vcpus`: modest on purpose.
fn mem_mib(vcpus: u32) -> u32 {
    256 + 2 * vcpus
}

/// One large VM at a time.
static ONE_VM: Mutex<()> = Mutex::new(());

fn duration() -> String {
    std::env::var("PVSYNC_TORTURE_MS").unwrap_or_else(|_| "300".into())
}

#[derive(Clone, Copy, Debug)]
enum Host {
    Pvsync,
    Qemu,
}

fn run(host: Host, vcpus: u32, mem_mib: u32, cmdline: &str) -> Output {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let out = match host {
        Host::Pvsync => run_with_limit(pvsync_guest_command(vcpus, mem_mib, cmdline), RUN_LIMIT),
        Host::Qemu => qemu_guest(QemuMachine::Microvm, vcpus, mem_mib, cmdline),
    };
    eprintln!(
        "{host:?} {vcpus} vCPUs {mem_mib} MiB '{cmdline}': {:.1} s",
        start.elapsed().as_secs_f64()
    );
    out
}

fn exited(out: &Output, host: Host, code: ExitCode) -> bool {
    match host {
        Host::Pvsync => out.status == Some(host_vmm::cli::guest_exit_status(code as u32)),
        Host::Qemu => out.status == Some(code.qemu_status()),
    }
}

/// Runs `cmdline` on `vcpus` vCPUs; checks every CPU came up, the suite passed and nothing
/// panicked; returns the `RESULT <suite>` line.
fn suite(host: Host, vcpus: u32, cmdline: &str, suite: &str) -> String {
    let cmdline = format!("{cmdline} duration={}", duration());
    let out = run(host, vcpus, mem_mib(vcpus), &cmdline);
    out.check(
        !out.timed_out && !out.all().contains("panicked") && !out.stdout.contains("PANIC"),
        "hang or panic",
    );
    let boot = out
        .line("RESULT boot")
        .unwrap_or_else(|| panic!("no RESULT boot line:\n{}", out.all()));
    let n = vcpus.to_string();
    assert_eq!(field(boot, "cpus"), Some(n.as_str()), "{boot}");
    assert_eq!(field(boot, "online"), Some(n.as_str()), "{boot}");
    out.check(
        exited(&out, host, ExitCode::Success),
        &format!("{cmdline}: expected exit for SUCCESS"),
    );
    out.check(
        out.stdout.lines().any(|l| l == "SUCCESS"),
        &format!("{cmdline}: expected SUCCESS"),
    );
    out.line(&format!("RESULT {suite}"))
        .unwrap_or_else(|| panic!("no RESULT {suite} line"))
        .to_owned()
}

/// The threads a suite runs on `vcpus`: the default (two per CPU) up to 128 vCPUs; past
/// that, 64, since a FIFO lock handed through 512 waiters at 128x overcommit, or a shootdown
/// acknowledged by 256 user-mode readers, takes minutes here (docs/design.md, "Scale").
fn threads(vcpus: u32) -> (String, u64) {
    if vcpus > 128 {
        (" threads=64".into(), 64)
    } else {
        (String::new(), 2 * vcpus as u64)
    }
}

fn locktorture(host: Host, vcpus: u32) {
    let (arg, n) = threads(vcpus);
    let r = suite(
        host,
        vcpus,
        &format!("test=locktorture{arg}"),
        "locktorture",
    );
    assert_eq!(num(&r, "threads"), n, "{r}");
    assert_eq!(num(&r, "fail"), 0, "{r}");
    assert!(num(&r, "total") > 0, "{r}");
}

fn rcutorture(host: Host, vcpus: u32) {
    let (arg, _) = threads(vcpus);
    let r = suite(host, vcpus, &format!("test=rcutorture{arg}"), "rcutorture");
    assert_eq!(num(&r, "bad_pipe"), 0, "{r}");
    assert_eq!(num(&r, "freed_seen"), 0, "{r}");
    assert!(num(&r, "gps") > 0 && num(&r, "updates") > 0, "{r}");
}

fn rcuflood(host: Host, vcpus: u32) {
    let r = suite(host, vcpus, "test=rcuflood", "rcuflood");
    assert!(num(&r, "posted") > 0, "{r}");
    assert_eq!(num(&r, "posted"), num(&r, "invoked"), "{r}");
    assert_eq!(num(&r, "pending_after_barrier"), 0, "{r}");
}

fn tlbtorture(host: Host, vcpus: u32) {
    let (arg, n) = threads(vcpus);
    let r = suite(host, vcpus, &format!("test=tlbtorture{arg}"), "tlbtorture");
    assert_eq!(num(&r, "readers"), n / 2, "a reader per two threads: {r}");
    assert_eq!(num(&r, "stale"), 0, "{r}");
    assert_eq!(num(&r, "missed_flushes"), 0, "{r}");
    assert_eq!(num(&r, "failed_tasks"), 0, "{r}");
    assert!(num(&r, "reads") > 0 && num(&r, "shootdowns") > 0, "{r}");
}

/// Not a torture suite, but cheap at this size: the self-tests (allocators, per-CPU data,
/// every CPU's tick and IPIs, preemption, RCU, user mode) and the waiters' published names.
fn selftest(host: Host, vcpus: u32) {
    let r = suite(host, vcpus, "test=selftest", "selftest");
    assert_eq!(num(&r, "failed"), 0, "{r}");
    assert_eq!(
        num(&r, "passed"),
        pvsync_tests::SELFTESTS.len() as u64,
        "{r}"
    );
}

fn pvwait(host: Host, vcpus: u32) {
    let r = suite(host, vcpus, "test=pvwait", "pvwait");
    assert_eq!(num(&r, "failed"), 0, "{r}");
    assert_eq!(num(&r, "passed"), 4, "{r}");
}

/// 96 vCPUs: two bitmap words, one of them partial; under pvsync and QEMU/KVM.
mod vcpus96 {
    use super::*;
    const N: u32 = 96;
    pvsync_tests::host_tests! {
        both {
            locktorture_passes => |h| locktorture(h, N);
            rcutorture_passes => |h| rcutorture(h, N);
            rcuflood_drains => |h| rcuflood(h, N);
            tlbtorture_passes => |h| tlbtorture(h, N);
            selftests_pass => |h| selftest(h, N);
            waiters_name_whom_they_wait_for => |h| pvwait(h, N);
        }
        pvsync {}
    }
}

/// 256 vCPUs: APIC IDs past 255 (x2APIC MADT entries, CPUID leaf 0xb, 32-bit MSI
/// destinations), under pvsync; QEMU/KVM runs the suites at 96 only, to keep CI short.
mod vcpus256 {
    use super::*;
    const N: u32 = 256;
    pvsync_tests::host_tests! {
        both {}
        pvsync {
            locktorture_passes => |h| locktorture(h, N);
            rcutorture_passes => |h| rcutorture(h, N);
            rcuflood_drains => |h| rcuflood(h, N);
            tlbtorture_passes => |h| tlbtorture(h, N);
            selftests_pass => |h| selftest(h, N);
            waiters_name_whom_they_wait_for => |h| pvwait(h, N);
        }
    }
}

/// More threads than the memory has room for: the suite says what it needs and what there
/// is, and the guest exits with a failure, not an allocation panic.
#[test]
fn a_suite_too_big_for_the_memory_fails_with_the_reason() {
    if !require_kvm("a_suite_too_big_for_the_memory_fails_with_the_reason") {
        return;
    }
    let out = run(
        Host::Pvsync,
        64,
        256,
        "test=locktorture threads=2048 duration=100",
    );
    out.check(!out.timed_out, "hang");
    out.check(
        !out.stdout.contains("PANIC") && !out.all().contains("memory allocation"),
        "an allocation panic instead of a clear failure",
    );
    out.check(
        exited(&out, Host::Pvsync, ExitCode::Failure),
        "a failure exit (1)",
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("FAILURE: locktorture with 2048 threads needs ~"))
        .unwrap_or_else(|| panic!("no clear FAILURE line:\n{}", out.stdout));
    assert!(
        line.contains("KiB of kernel heap, only ")
            && line.ends_with("available; give the VM more memory (--mem)"),
        "{line}"
    );
    // 2048 threads x 32 KiB stacks: the need is at least 64 MiB, more than the VM has.
    let need: u64 = line
        .split('~')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no need in {line}"));
    assert!(need >= 2048 * 32, "{line}");
}
