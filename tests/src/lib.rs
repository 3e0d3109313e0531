//! Harness for pvsync's host-side integration tests: builds the guest kernel and the VMM
//! once per test binary, runs them (under pvsync or QEMU/KVM) with a hard timeout, and
//! parses what the guest prints.
//!
//! Tests that need KVM call [`require_kvm`]: without `/dev/kvm` they print a loud SKIP and
//! return; with `PVSYNC_REQUIRE_KVM=1` (set by `.ci/run` when `/dev/kvm` exists) a missing
//! KVM is a failure instead.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The guest's self-tests (`test=selftest`), in the order it runs them.
pub const SELFTESTS: [&str; 10] = [
    "frame-alloc",
    "heap",
    "paging",
    "percpu",
    "shared-records",
    "timer",
    "ipi",
    "preemption",
    "rcu",
    "user-mode",
];

/// Workspace root (the directory of the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// True if this test process may use KVM; prints a loud SKIP line if not.
/// Panics if KVM is required (`PVSYNC_REQUIRE_KVM=1`) but unusable.
pub fn require_kvm(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    match usable {
        Ok(_) => true,
        Err(e)
            if Path::new("/dev/kvm").exists()
                || std::env::var_os("PVSYNC_REQUIRE_KVM").is_some() =>
        {
            panic!("{test}: /dev/kvm is required but cannot be opened: {e}")
        }
        Err(_) => {
            eprintln!("\n*** SKIP {test}: /dev/kvm does not exist on this machine; KVM tests did NOT run ***\n");
            false
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Host-side flags must not leak into the guest build (RUSTFLAGS overrides the guest's
    // own target rustflags).
    for v in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        c.env_remove(v);
    }
    c
}

fn run_build(mut c: Command, what: &str) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("running cargo to build {what}: {e}"));
    assert!(
        out.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest kernel ELF, built on first use (release, `x86_64-unknown-none`).
pub fn guest_kernel() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // rustup does not add a toolchain file's targets to an installed toolchain by itself;
        // without rustup, cargo's own error names the missing target.
        let _ = Command::new("rustup")
            .args(["target", "add", "x86_64-unknown-none"])
            .output();
        let dir = target_dir().join("guest");
        let mut c = cargo();
        c.current_dir(workspace_root().join("guest-kernel"))
            .args(["build", "--release", "--target-dir"])
            .arg(&dir);
        run_build(c, "the guest kernel");
        dir.join("x86_64-unknown-none/release/guest-kernel")
    })
}

/// The `pvsync` VMM binary of this test's profile, built on first use (a no-op when
/// `cargo test` already built it).
pub fn pvsync_bin() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test exe in target/<profile>/deps");
        let mut c = cargo();
        c.current_dir(workspace_root())
            .args(["build", "-p", "host-vmm", "--bin", "pvsync"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        run_build(c, "the pvsync VMM");
        profile_dir.join("pvsync")
    })
}

/// What a finished process left behind.
#[derive(Debug)]
pub struct Output {
    /// Exit status; None if killed by a signal (or by our watchdog).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Output {
    /// stdout and stderr together, for assertions that do not care which.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Fails the test with both streams if `cond` is false.
    #[track_caller]
    pub fn check(&self, cond: bool, what: &str) {
        assert!(
            cond,
            "{what}\n--- status {:?} ---\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        );
    }

    /// The first console line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.stdout
            .lines()
            .chain(self.stderr.lines())
            .find(|l| l.starts_with(prefix))
    }
}

/// Value of `key=` in a `key=value` line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The number after `key=` in a `RESULT` line; panics, naming the key and the line, if there
/// is none.
pub fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Runs `cmd` to completion, killing it after `limit` (the test's own watchdog, on top of
/// any timeout the program has).
pub fn run_with_limit(mut cmd: Command, limit: Duration) -> Output {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for child") {
            break s;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("waiting for killed child");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// Watchdog for a whole guest run: generous, since CI machines are slow and overcommitted.
pub const RUN_LIMIT: Duration = Duration::from_secs(240);

/// `pvsync <args>`.
pub fn pvsync(args: &[&str]) -> Output {
    let mut c = Command::new(pvsync_bin());
    c.args(args);
    run_with_limit(c, RUN_LIMIT)
}

/// A `pvsync run` command for the test guest (no watchdog: see [`run_with_limit`]).
pub fn pvsync_guest_command(vcpus: u32, mem_mib: u32, cmdline: &str) -> Command {
    let mut c = Command::new(pvsync_bin());
    c.args([
        "run",
        "--vcpus",
        &vcpus.to_string(),
        "--mem",
        &mem_mib.to_string(),
    ])
    .args(["--cmdline", cmdline, "--timeout", "180", "--kernel"])
    .arg(guest_kernel());
    c
}

/// `pvsync run` of the test guest with `vcpus`, `mem` MiB and `cmdline`, shared region dumped.
pub fn pvsync_guest(vcpus: u32, mem_mib: u32, cmdline: &str) -> Output {
    let mut c = pvsync_guest_command(vcpus, mem_mib, cmdline);
    c.arg("--dump-shared");
    run_with_limit(c, RUN_LIMIT)
}

/// The QEMU binary; panics with an install hint if missing (QEMU tests run wherever KVM does).
pub fn qemu_bin() -> PathBuf {
    let p = PathBuf::from("qemu-system-x86_64");
    let ok = Command::new(&p)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "qemu-system-x86_64 not found: install it (apt-get install -y qemu-system-x86)"
    );
    p
}

/// QEMU machine types the guest is tested under.
#[derive(Clone, Copy, Debug)]
pub enum QemuMachine {
    /// `-machine microvm`: no PCI, no firmware delay.
    Microvm,
    /// `-machine pc`: SeaBIOS-era PC, the default machine.
    Pc,
}

/// The CPU model the guest runs on under QEMU: `qemu64` (nested KVM here rejects `-cpu
/// host`'s MSR set) with the x2APIC and every KVM paravirtual feature the guest can use
/// (QEMU leaves PV TLB flush, PV send-IPI, PV sched-yield and PV unhalt off by default).
pub const QEMU_CPU: &str =
    "qemu64,+x2apic,kvm-pv-tlb-flush=on,kvm-pv-ipi=on,kvm-pv-sched-yield=on,kvm-pv-unhalt=on";

/// A stock QEMU/KVM command for the test guest, on [`QEMU_CPU`].
pub fn qemu_command(machine: QemuMachine, smp: u32, mem_mib: u32, cmdline: &str) -> Command {
    let machine = match machine {
        QemuMachine::Microvm => "microvm",
        QemuMachine::Pc => "pc",
    };
    let mut c = Command::new(qemu_bin());
    c.args(["-accel", "kvm", "-cpu", QEMU_CPU, "-machine", machine])
        .args([
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .args(["-smp", &smp.to_string(), "-m", &mem_mib.to_string()])
        .arg("-kernel")
        .arg(guest_kernel())
        .args(["-append", cmdline]);
    c
}

/// Boots the test guest under stock QEMU/KVM.
pub fn qemu_guest(machine: QemuMachine, smp: u32, mem_mib: u32, cmdline: &str) -> Output {
    run_with_limit(qemu_command(machine, smp, mem_mib, cmdline), RUN_LIMIT)
}

/// Declares host-specific integration tests: every test of `both` under `mod pvsync` (our
/// VMM) and `mod qemu` (QEMU/KVM), every test of `pvsync` under `mod pvsync` only. Each body
/// is a `fn(Host)`; the calling file defines `Host` with `Pvsync` and `Qemu` variants. A test
/// runs only where KVM exists ([`require_kvm`], which fails it instead when KVM is required).
#[macro_export]
macro_rules! host_tests {
    (both { $($name:ident => $body:expr;)* } pvsync { $($pname:ident => $pbody:expr;)* }) => {
        mod pvsync {
            use super::*;
            $(
                #[test]
                fn $name() {
                    if $crate::require_kvm(concat!(module_path!(), "::", stringify!($name))) {
                        let f: fn(Host) = $body;
                        f(Host::Pvsync);
                    }
                }
            )*
            $(
                #[test]
                fn $pname() {
                    if $crate::require_kvm(concat!(module_path!(), "::", stringify!($pname))) {
                        let f: fn(Host) = $pbody;
                        f(Host::Pvsync);
                    }
                }
            )*
        }
        mod qemu {
            use super::*;
            $(
                #[test]
                fn $name() {
                    if $crate::require_kvm(concat!(module_path!(), "::", stringify!($name))) {
                        let f: fn(Host) = $body;
                        f(Host::Qemu);
                    }
                }
            )*
        }
    };
}

/// A command that runs what follows on at most `n` of the CPUs this process may use: four
/// vCPUs are overcommitted (and get preempted) on any host.
pub fn on_cpus(n: usize) -> Command {
    let cpus = host_vmm::sched::affinity::allowed_cpus().expect("allowed CPUs");
    let list: Vec<String> = cpus.iter().take(n).map(|c| c.to_string()).collect();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &list.join(",")]);
    cmd
}

/// `cmd` run on at most `n` of this process's CPUs ([`on_cpus`]).
pub fn pinned(cmd: &Command, n: usize) -> Command {
    let mut c = on_cpus(n);
    c.arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        c.current_dir(dir);
    }
    c
}

/// Whether this process may run a thread real-time at priority 2 (the boost timer's); if
/// not, says loudly that `test` does not run.
pub fn may_raise(test: &str) -> bool {
    let ok = std::thread::spawn(|| {
        let param = libc::sched_param { sched_priority: 2 };
        // SAFETY: sched_setscheduler(0, ..) changes only this short-lived thread, and reads
        // `param`, which outlives the call.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
    })
    .join()
    .unwrap_or(false);
    if !ok {
        eprintln!("*** {test}: this process may not run threads real-time: NOT RUN ***");
    }
    ok
}
