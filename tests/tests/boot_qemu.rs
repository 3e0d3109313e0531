//! Boots the very same guest ELF under stock QEMU/KVM: the PVH entry, ACPI CPU discovery and
//! INIT-SIPI-SIPI must not depend on our VMM. Without a pvsync host the guest says so and
//! runs without the shared region.

use pvsync_tests::{field, qemu_guest, require_kvm, QemuMachine};
use shared_abi::ExitCode;

fn boot(machine: QemuMachine, cmdline: &str) -> pvsync_tests::Output {
    let out = qemu_guest(machine, 4, 128, cmdline);
    out.check(!out.timed_out, "QEMU run hung");
    out.check(
        out.status == Some(ExitCode::Success.qemu_status()),
        "isa-debug-exit status for success",
    );
    let boot = out
        .line("RESULT boot")
        .unwrap_or_else(|| panic!("no RESULT boot line:\n{}", out.all()));
    assert_eq!(
        field(boot, "cpus"),
        Some("4"),
        "CPU count from QEMU's ACPI MADT: {boot}"
    );
    assert_eq!(field(boot, "online"), Some("4"), "{boot}");
    assert_eq!(field(boot, "shared"), Some("no-host"), "{boot}");
    out.check(
        out.stdout
            .contains("shared: no pvsync host answered; running without it"),
        "guest says it runs without a host",
    );
    out
}

#[test]
fn qemu_microvm_boots_4_cpus_and_passes_selftests() {
    if !require_kvm("qemu_microvm_boots_4_cpus_and_passes_selftests") {
        return;
    }
    let out = boot(QemuMachine::Microvm, "test=selftest");
    for t in pvsync_tests::SELFTESTS {
        out.check(
            out.stdout.contains(&format!("TEST {t} ok")),
            &format!("self-test {t} under QEMU"),
        );
    }
}

#[test]
fn qemu_pc_boots_4_cpus() {
    if !require_kvm("qemu_pc_boots_4_cpus") {
        return;
    }
    boot(QemuMachine::Pc, "test=boot");
}

#[test]
fn qemu_guest_panic_is_a_failure_exit() {
    if !require_kvm("qemu_guest_panic_is_a_failure_exit") {
        return;
    }
    let out = qemu_guest(QemuMachine::Microvm, 2, 64, "test=panic");
    out.check(
        out.status == Some(ExitCode::Panic.qemu_status()),
        "panic exit status under QEMU",
    );
    out.check(
        out.stdout.contains("PANIC on cpu 0: panicked at"),
        "panic message on the console",
    );
}
