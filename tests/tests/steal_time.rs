//! KVM's steal time as the guest reads it under stock QEMU/KVM: it grows when the vCPUs are
//! overcommitted. Alone in its test binary so that no other guest shares the host CPU the
//! comparison pins its runs to.

use pvsync_tests::{
    field, num, pinned, qemu_command, require_kvm, run_with_limit, Output, QemuMachine, RUN_LIMIT,
};
use shared_abi::ExitCode;

/// `test=cpu-bound` under QEMU/KVM with `vcpus` vCPUs, the whole VM on one host CPU.
fn cpu_bound_on_one_cpu(vcpus: u32) -> Output {
    let cmd = qemu_command(
        QemuMachine::Microvm,
        vcpus,
        128,
        "test=cpu-bound work=20000",
    );
    let out = run_with_limit(pinned(&cmd, 1), RUN_LIMIT);
    out.check(!out.timed_out, "QEMU run hung");
    out.check(
        out.status == Some(ExitCode::Success.qemu_status()),
        "cpu-bound succeeds",
    );
    out
}

/// Steal time per vCPU per second of the run, and the stats line.
fn steal_share(out: &Output, vcpus: u32) -> (f64, String) {
    let stats = out
        .line("RESULT kvm-stats")
        .unwrap_or_else(|| panic!("no kvm-stats line:\n{}", out.all()))
        .to_string();
    assert_eq!(num(&stats, "steal_cpus"), vcpus as u64, "{stats}");
    let steal = num(&stats, "steal_ns") as f64;
    let share = steal / vcpus as f64 / out.elapsed.as_nanos() as f64;
    (share, stats)
}

#[test]
fn qemu_steal_time_grows_with_overcommit() {
    if !require_kvm("qemu_steal_time_grows_with_overcommit") {
        return;
    }
    // The first value KVM writes can already be large (it counts from the vCPU's
    // creation): the guest reports what came after it enabled its area.
    let over = cpu_bound_on_one_cpu(4);
    let alone = cpu_bound_on_one_cpu(1);
    let found = over.line("RESULT kvm ").expect("kvm report line");
    assert_eq!(field(found, "found"), Some("KVMKVMKVM"), "{found}");
    assert_eq!(field(found, "used"), Some("steal,pvtlb,pvlock"), "{found}");
    let (over_share, over_stats) = steal_share(&over, 4);
    let (alone_share, alone_stats) = steal_share(&alone, 1);
    eprintln!(
        "steal per vCPU-second: 4 vCPUs on one host CPU {over_share:.3}, 1 vCPU {alone_share:.3}"
    );
    assert!(num(&over_stats, "steal_ns") > 0, "{over_stats}");
    assert!(
        over_share > alone_share,
        "overcommitted vCPUs must see more steal time than one alone:\n{over_stats}\n{alone_stats}"
    );
}
