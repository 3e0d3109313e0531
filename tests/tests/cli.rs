//! The `pvsync` command line as a script sees it: one exit status per class of outcome
//! (the table in `pvsync --help` and the README), mistakes refused before any guest starts,
//! SIGINT/SIGTERM still giving the table, metrics and trace, and metrics JSON (schema 1)
//! with the run's settings and the guests' RESULT fields. No timing thresholds.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use host_vmm::cli::{
    EXIT_GUEST_CRASH, EXIT_GUEST_FAILURE, EXIT_GUEST_PANIC, EXIT_HOST_ERROR, EXIT_INTERRUPTED,
    EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE,
};
use pvsync_tests::{
    guest_kernel, pvsync, pvsync_bin, require_kvm, run_with_limit, workspace_root, Output,
    RUN_LIMIT,
};
use serde_json::Value;
use shared_abi::GUEST_TESTS;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvsync-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn kernel() -> String {
    guest_kernel().to_str().unwrap().to_owned()
}

fn no_host_panic(out: &Output) {
    out.check(!out.timed_out, "VMM hung");
    out.check(!out.stderr.contains("panicked"), "VMM panicked");
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

/// A Chrome trace: an array of events, or an object with `traceEvents`.
fn is_trace(v: &Value) -> bool {
    v.is_array() || v["traceEvents"].is_array()
}

/// `pvsync run` of the test guest with `--metrics`; the output and the metrics.
fn run_with_metrics(tag: &str, args: &[&str]) -> (Output, Value) {
    let path = scratch(&format!("{tag}.json"));
    let k = kernel();
    let mut all = vec!["run", "--kernel", &k, "--metrics", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = pvsync(&all);
    no_host_panic(&out);
    (out, read_json(&path))
}

/// Each guest outcome gives its own status, in the process and in the metrics.
#[test]
fn every_guest_outcome_has_its_own_status() {
    if !require_kvm("every_guest_outcome_has_its_own_status") {
        return;
    }
    for (cmdline, timeout, status, kind) in [
        ("test=boot", "60", EXIT_OK, "guest-exit"),
        (
            "test=boot frobnicate",
            "60",
            EXIT_GUEST_FAILURE,
            "guest-exit",
        ),
        ("test=panic", "60", EXIT_GUEST_PANIC, "guest-exit"),
        ("test=hang", "2", EXIT_TIMEOUT, "timeout"),
    ] {
        let (out, m) = run_with_metrics(
            "status",
            &["--vcpus", "2", "--cmdline", cmdline, "--timeout", timeout],
        );
        out.check(
            out.status == Some(status),
            &format!("{cmdline}: status {status}"),
        );
        assert_eq!(m["status"], status, "{cmdline}: {m}");
        assert_eq!(m["vms"][0]["outcome"]["kind"], kind, "{cmdline}");
        assert_eq!(m["vms"][0]["outcome"]["status"], status, "{cmdline}");
    }
}

/// An unknown `test=` fails (status 1) and the guest names the tests it has.
#[test]
fn an_unknown_guest_test_fails_naming_the_known_ones() {
    if !require_kvm("an_unknown_guest_test_fails_naming_the_known_ones") {
        return;
    }
    let k = kernel();
    let out = pvsync(&["run", "--kernel", &k, "--cmdline", "test=nosuch"]);
    no_host_panic(&out);
    out.check(out.status == Some(EXIT_GUEST_FAILURE), "failure status");
    let names: Vec<&str> = GUEST_TESTS.iter().map(|(n, _)| *n).collect();
    let expected = format!("unknown test 'nosuch' (known: {})", names.join(", "));
    out.check(out.stdout.contains(&expected), &expected);
}

/// Every test `pvsync run --help` lists has an arm in the guest's dispatcher, and every arm
/// is listed: the dispatcher's `match cmd.test` block in guest-kernel/src/main.rs.
#[test]
fn the_listed_guest_tests_are_the_dispatched_ones() {
    let src = std::fs::read_to_string(workspace_root().join("guest-kernel/src/main.rs")).unwrap();
    let start = src
        .find("match cmd.test {")
        .expect("the dispatcher matches on cmd.test");
    let body = &src[start..];
    let body = &body[..body.find("\n    };").expect("end of the dispatcher")];
    let mut arms: Vec<&str> = body
        .lines()
        .filter_map(|l| {
            let l = l.trim_start().strip_prefix('"')?;
            let (name, rest) = l.split_once('"')?;
            rest.trim_start().starts_with("=>").then_some(name)
        })
        .collect();
    let mut listed: Vec<&str> = GUEST_TESTS.iter().map(|(n, _)| *n).collect();
    arms.sort_unstable();
    listed.sort_unstable();
    assert_eq!(arms, listed, "dispatcher arms vs shared_abi::GUEST_TESTS");

    let out = pvsync(&["run", "--help"]);
    out.check(out.status == Some(EXIT_OK), "help exits 0");
    for (name, what) in GUEST_TESTS {
        out.check(
            out.stdout.contains(name) && out.stdout.contains(what),
            &format!("help lists {name}"),
        );
    }
    out.check(
        out.stdout.contains("130  interrupted"),
        "help has the status table",
    );
}

/// `--vm`, scenario and flag mistakes: usage errors naming the flag, spec or file, and the
/// VM, before any guest starts.
#[test]
fn vm_mistakes_are_refused_before_any_guest_starts() {
    let k = kernel();
    let scenario = scratch("dup.toml");
    std::fs::write(
        &scenario,
        "[[vm]]\nname = \"db\"\ncount = 2\n\n[[vm]]\nname = \"db-1\"\n",
    )
    .unwrap();
    let zero = scratch("zero.toml");
    std::fs::write(&zero, "[[vm]]\nname = \"db\"\ncount = 0\n").unwrap();
    let sc = scenario.to_str().unwrap();
    let zero = zero.to_str().unwrap();
    for (args, msg) in [
        (vec!["--vm", "count=0"], "--vm 'count=0': count=0 starts no VM"),
        (vec!["--vm", "vcpus=2,vcpus=4"], "key 'vcpus' is given twice"),
        (
            vec!["--vm", "name=a", "--vm", "name=a"],
            "two VMs are named 'a'",
        ),
        (
            vec!["--vm", "name=w,count=3", "--vm", "name=w-2"],
            "two VMs are named 'w-2'",
        ),
        (
            vec!["--vm", "name=big,vcpus=4097"],
            "VM 'big': --vm 'name=big,vcpus=4097': vcpus=4097 is outside 1..=4096",
        ),
        (vec!["--mem", "1"], "VM 'vm': --mem 1 MiB is too small for kernel"),
        (
            vec!["--vm", "name=s,mem=2"],
            "VM 's': --vm 'name=s,mem=2': mem=2 MiB is too small for kernel",
        ),
        (
            vec!["--vm", "name=n,kernel=/nonexistent/k"],
            "VM 'n': --vm 'name=n,kernel=/nonexistent/k': kernel=/nonexistent/k: reading kernel image /nonexistent/k",
        ),
        (vec!["--scenario", sc], "two VMs are named 'db-1'"),
        (vec!["--scenario", zero], "[[vm]] #1: count=0 starts no VM"),
    ] {
        let mut all = vec!["run", "--kernel", &k];
        all.extend_from_slice(&args);
        let out = pvsync(&all);
        no_host_panic(&out);
        out.check(
            out.status == Some(EXIT_USAGE),
            &format!("{args:?} is a usage error"),
        );
        out.check(out.stderr.contains(msg), &format!("{args:?}: says {msg:?}"));
        out.check(out.stdout.is_empty(), "no guest output: nothing ran");
    }
    let out = pvsync(&["run", "--kernel", "/nonexistent/kernel"]);
    out.check(
        out.status == Some(EXIT_USAGE) && out.stderr.contains("--kernel /nonexistent/kernel"),
        "a missing --kernel names the flag",
    );
}

/// Metrics JSON of a short run: schema version, settings, host facts, and the guest's RESULT
/// lines as typed fields; with `--results`, the same metrics and the console logs.
#[test]
fn metrics_json_has_schema_settings_and_result_fields() {
    if !require_kvm("metrics_json_has_schema_settings_and_result_fields") {
        return;
    }
    let dir = scratch("results");
    let _ = std::fs::remove_dir_all(&dir);
    let (out, m) = run_with_metrics(
        "schema",
        &[
            "--vm",
            "name=lock,vcpus=2,mem=64,cmdline=test=locktorture duration=300",
            "--vm",
            "name=pan,vcpus=1,policy=kvm,cmdline=test=panic",
            "--results",
            dir.to_str().unwrap(),
        ],
    );
    out.check(
        out.status == Some(EXIT_GUEST_PANIC),
        "the panicking VM's status",
    );
    assert_eq!(m["schema_version"], 1);
    assert_eq!(m["status"], EXIT_GUEST_PANIC);
    assert_eq!(m["interrupted"], false);
    let s = &m["settings"];
    assert_eq!(s["backend"], "slots");
    assert_eq!(s["timeout_s"], 60);
    assert_eq!(s["vms"][0]["name"], "lock");
    assert_eq!(s["vms"][0]["mem_mib"], 64);
    assert_eq!(s["vms"][0]["cmdline"], "test=locktorture duration=300");
    assert_eq!(s["vms"][0]["kernel"], kernel());
    assert_eq!(s["vms"][1]["policy"], "kvm");
    assert!(m["host"]["cores"].as_u64().unwrap() >= 1, "{m}");
    assert!(m["host"]["kvm_flavour"].is_string(), "{m}");

    let vm = &m["vms"][0];
    assert_eq!(
        vm["outcome"],
        serde_json::json!({"kind": "guest-exit", "code": 0, "status": 0})
    );
    assert!(vm["elapsed_ns"].as_u64().unwrap() > 0);
    assert!(vm["handoff_latency_total_ns"].is_u64(), "{vm}");
    assert!(vm["vcpus"][0]["run_total_ns"].is_u64(), "{vm}");
    let results = vm["results"].as_array().unwrap();
    let lock = results
        .iter()
        .find(|r| r["test"] == "locktorture")
        .unwrap_or_else(|| panic!("no locktorture RESULT: {vm}"));
    assert_eq!(lock["fields"]["lock"], "ticket");
    assert!(lock["fields"]["threads"].is_u64(), "{lock}");
    assert_eq!(lock["fields"]["fail"], 0);
    assert!(results.iter().any(|r| r["test"] == "boot"), "{vm}");
    assert_eq!(m["vms"][1]["outcome"]["status"], EXIT_GUEST_PANIC);

    assert_eq!(read_json(&dir.join("metrics.json"))["schema_version"], 1);
    assert!(is_trace(&read_json(&dir.join("trace.json"))));
    let all = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert!(
        all.contains("[lock] RESULT locktorture") && all.contains("[pan] "),
        "{all}"
    );
    let lock_log = std::fs::read_to_string(dir.join("lock.console.log")).unwrap();
    assert!(
        lock_log
            .lines()
            .any(|l| l.starts_with("RESULT locktorture")),
        "{lock_log}"
    );
    let pan_log = std::fs::read_to_string(dir.join("pan.console.log")).unwrap();
    assert!(pan_log.contains("deliberate panic"), "{pan_log}");
}

/// Spawns `pvsync run` with `args`, waits for a console line containing `ready`, sends
/// `signal`; returns the finished process's output.
fn signal_mid_run(args: &[&str], ready: &str, signal: libc::c_int) -> Output {
    let mut child = Command::new(pvsync_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning pvsync");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let errs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let seen = rx.iter().any(|l| l.contains(ready));
    assert!(seen, "the guest never printed {ready:?}");
    // SAFETY: kill with the pid of our own live child and a valid signal number.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    // The rest of the output drains in the reader threads; the watchdog is the run's own
    // --timeout, far above anything the stop should take.
    let status = child.wait().expect("waiting for pvsync");
    Output {
        status: status.code(),
        stdout: reader.join().unwrap(),
        stderr: errs.join().unwrap(),
        elapsed: std::time::Duration::ZERO,
        timed_out: false,
    }
}

/// SIGINT (and SIGTERM) mid-run: the guests stop as interrupted, the table, metrics and
/// trace of what ran are still written, and the status is 130.
#[test]
fn sigint_stops_the_guests_and_still_writes_the_results() {
    if !require_kvm("sigint_stops_the_guests_and_still_writes_the_results") {
        return;
    }
    let k = kernel();
    for (signal, name) in [(libc::SIGINT, "sigint"), (libc::SIGTERM, "sigterm")] {
        let metrics = scratch(&format!("{name}-metrics.json"));
        let trace = scratch(&format!("{name}-trace.json"));
        let out = signal_mid_run(
            &[
                "run",
                "--kernel",
                &k,
                "--vcpus",
                "2",
                "--cmdline",
                "test=locktorture duration=600000",
                "--timeout",
                "600",
                "--metrics",
                metrics.to_str().unwrap(),
                "--trace",
                trace.to_str().unwrap(),
            ],
            "RESULT boot",
            signal,
        );
        no_host_panic(&out);
        out.check(
            out.status == Some(EXIT_INTERRUPTED),
            &format!("{name}: status 130"),
        );
        out.check(
            out.stderr.contains("run_total_ms"),
            &format!("{name}: the table"),
        );
        out.check(
            out.stderr.contains("interrupted after"),
            &format!("{name}: the outcome line"),
        );
        let m = read_json(&metrics);
        assert_eq!(m["schema_version"], 1);
        assert_eq!(m["interrupted"], true);
        assert_eq!(m["status"], EXIT_INTERRUPTED);
        assert_eq!(
            m["vms"][0]["outcome"],
            serde_json::json!({"kind": "interrupted", "status": EXIT_INTERRUPTED})
        );
        assert!(is_trace(&read_json(&trace)), "{name}: a trace");
    }
}

/// The VMM failing to write its outputs at the end (the metrics directory removed mid-run)
/// is the VMM's failure: 70, whatever the guest did.
#[test]
fn failing_to_write_outputs_mid_run_is_a_vmm_failure() {
    if !require_kvm("failing_to_write_outputs_mid_run_is_a_vmm_failure") {
        return;
    }
    let dir = scratch("vanishing");
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = dir.join("m.json");
    let k = kernel();
    let mut child = Command::new(pvsync_bin())
        .args([
            "run",
            "--kernel",
            &k,
            "--cmdline",
            "test=hang",
            "--timeout",
            "3",
        ])
        .arg("--metrics")
        .arg(&metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning pvsync");
    // The guest prints its banner once it runs: by then the metrics file was created.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("hanging on purpose"))),
        "the guest started"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_HOST_ERROR), "{stderr}");
    assert!(stderr.contains("writing metrics to"), "{stderr}");
}

/// A PVH ELF whose entry is `ud2` with no IDT: the guest triple-faults at once.
fn triple_fault_kernel() -> PathBuf {
    const LOAD: u64 = 0x10_0000;
    let mut elf = vec![0u8; 0x1000];
    let put = |elf: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        elf[at..at + bytes.len()].copy_from_slice(bytes);
    };
    // ELF header: 64-bit, little-endian, executable, x86_64, two program headers at 64.
    put(&mut elf, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    put(&mut elf, 16, &2u16.to_le_bytes());
    put(&mut elf, 18, &0x3eu16.to_le_bytes());
    put(&mut elf, 20, &1u32.to_le_bytes());
    put(&mut elf, 24, &LOAD.to_le_bytes());
    put(&mut elf, 32, &64u64.to_le_bytes());
    put(&mut elf, 52, &64u16.to_le_bytes());
    put(&mut elf, 54, &56u16.to_le_bytes());
    put(&mut elf, 56, &2u16.to_le_bytes());
    put(&mut elf, 58, &64u16.to_le_bytes());
    // The Xen PVH entry note at 0x200: namesz 4, descsz 4, type 18, "Xen\0", entry.
    let note_at = 0x200;
    let mut note = Vec::new();
    for w in [4u32, 4, 18] {
        note.extend(w.to_le_bytes());
    }
    note.extend(b"Xen\0");
    note.extend((LOAD as u32).to_le_bytes());
    put(&mut elf, note_at, &note);
    let phdr = |p_type: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        let mut h = Vec::new();
        h.extend(p_type.to_le_bytes());
        h.extend(flags.to_le_bytes());
        for v in [off, addr, addr, size, size, align] {
            h.extend(v.to_le_bytes());
        }
        h
    };
    // PT_LOAD of the code page (file offset 0x1000), PT_NOTE of the note.
    put(&mut elf, 64, &phdr(1, 5, 0x1000, LOAD, 16, 0x1000));
    put(
        &mut elf,
        120,
        &phdr(4, 4, note_at as u64, 0, note.len() as u64, 4),
    );
    elf.extend([0x0f, 0x0b]); // ud2
    elf.resize(0x1000 + 16, 0xf4);
    let path = scratch("triple-fault.elf");
    std::fs::write(&path, elf).unwrap();
    path
}

#[test]
fn a_crashing_guest_is_status_125() {
    if !require_kvm("a_crashing_guest_is_status_125") {
        return;
    }
    let k = triple_fault_kernel();
    let mut c = Command::new(pvsync_bin());
    c.args(["run", "--timeout", "30", "--kernel"]).arg(&k);
    let out = run_with_limit(c, RUN_LIMIT);
    no_host_panic(&out);
    out.check(out.status == Some(EXIT_GUEST_CRASH), "guest crash status");
    out.check(out.stderr.contains("guest crashed on vcpu 0"), "says so");
}

/// The shipped example scenario parses and runs (briefly: it is the example's own setting).
#[test]
fn the_example_scenario_parses_and_runs() {
    let path = workspace_root().join("examples/two-vms.toml");
    let s = host_vmm::scenario::Scenario::load(&path).expect("the example parses");
    assert!(s.vms.len() >= 2, "two VMs");
    if !require_kvm("the_example_scenario_parses_and_runs") {
        return;
    }
    let k = kernel();
    let out = pvsync(&["run", "--kernel", &k, "--scenario", path.to_str().unwrap()]);
    no_host_panic(&out);
    out.check(out.status == Some(EXIT_OK), "the example's guests pass");
}

/// run.sh answers help with its usage (exit 0) and an unknown command with usage (exit 2).
#[test]
fn run_sh_usage() {
    let run_sh = workspace_root().join("run.sh");
    for (args, status) in [
        (vec!["help"], 0),
        (vec!["-h"], 0),
        (vec!["--help"], 0),
        (vec!["frobnicate"], 2),
    ] {
        let mut c = Command::new("bash");
        c.arg(&run_sh).args(&args);
        let out = run_with_limit(c, RUN_LIMIT);
        out.check(
            out.status == Some(status),
            &format!("run.sh {args:?}: status {status}"),
        );
        let usage = out.all();
        for cmd in ["test", "bench", "study", "qemu", "help"] {
            out.check(usage.contains(cmd), &format!("usage lists {cmd}"));
        }
    }
}

/// `./run.sh qemu` exits with pvsync's status for the guest's outcome: its `qemu_status`
/// maps QEMU's `(code << 1) | 1` the way `guest_exit_status` maps the code.
#[test]
fn run_sh_maps_qemu_statuses_to_pvsyncs() {
    use shared_abi::ExitCode;
    let run_sh = workspace_root().join("run.sh");
    for code in [ExitCode::Success, ExitCode::Failure, ExitCode::Panic] {
        let script = format!(
            "source <(sed -n '/^qemu_status()/,/^}}/p' '{}'); qemu_status {}",
            run_sh.display(),
            code.qemu_status()
        );
        let mut c = Command::new("bash");
        c.args(["-c", &script]);
        let out = run_with_limit(c, RUN_LIMIT);
        let want = host_vmm::cli::guest_exit_status(code as u32);
        out.check(
            out.stdout.trim() == want.to_string(),
            &format!("{code:?}: status {want}"),
        );
    }
}
