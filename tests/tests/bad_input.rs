//! Bad input to the VMM and failing guests: each must give a clear message and a non-zero
//! exit, never a host panic or a hang. A kernel image that cannot be read or is not a PVH
//! image of this ABI is the operator's input: a usage error (2) naming `--kernel` and the
//! file, found before any guest starts.

use std::path::PathBuf;

use host_vmm::cli::{EXIT_GUEST_FAILURE, EXIT_GUEST_PANIC, EXIT_TIMEOUT, EXIT_USAGE};
use pvsync_tests::{guest_kernel, pvsync, pvsync_bin, pvsync_guest, require_kvm, Output};
use shared_abi::{ABI_VERSION, ELF_NOTE_NAME};

fn no_host_panic(out: &Output) {
    out.check(!out.timed_out, "VMM hung");
    out.check(!out.stderr.contains("panicked"), "VMM panicked");
}

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvsync-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn run_kernel(kernel: &std::path::Path, mem_mib: &str) -> Output {
    let k = kernel.to_str().unwrap();
    pvsync(&[
        "run",
        "--kernel",
        k,
        "--vcpus",
        "2",
        "--mem",
        mem_mib,
        "--timeout",
        "60",
    ])
}

fn refused(out: &Output, message: &str) {
    refused_naming(out, "--kernel ", message);
}

fn refused_naming(out: &Output, flag: &str, message: &str) {
    no_host_panic(out);
    out.check(out.status == Some(EXIT_USAGE), "usage error exit status");
    out.check(out.stderr.contains(flag), "names the flag");
    out.check(out.stdout.is_empty(), "no guest started");
    out.check(
        out.stderr.contains(message),
        &format!("message should contain {message:?}"),
    );
}

#[test]
fn non_elf_file_is_refused() {
    let out = run_kernel(&scratch("not-elf", b"this is not a kernel image\n"), "64");
    refused(&out, "not a valid 64-bit little-endian ELF");
}

#[test]
fn missing_kernel_file_is_refused() {
    let out = run_kernel(std::path::Path::new("/nonexistent/kernel.elf"), "64");
    refused(&out, "reading kernel image /nonexistent/kernel.elf");
}

#[test]
fn elf_without_pvh_note_is_refused() {
    // The VMM binary itself: a perfectly good x86_64 ELF with no PVH entry note.
    let out = run_kernel(pvsync_bin(), "64");
    refused(&out, "no PVH entry note");
}

#[test]
fn truncated_elf_is_refused() {
    let full = std::fs::read(guest_kernel()).unwrap();
    let u64_at = |off: usize| u64::from_le_bytes(full[off..off + 8].try_into().unwrap()) as usize;
    // Halfway into the first program header's segment (e_phoff at 32; p_offset, p_filesz
    // at 8 and 32 within a program header).
    let phoff = u64_at(32);
    let mid_segment = u64_at(phoff + 8) + u64_at(phoff + 32) / 2;
    for len in [32, 100, mid_segment] {
        let out = run_kernel(&scratch(&format!("truncated-{len}"), &full[..len]), "64");
        refused(&out, "kernel image is not a valid 64-bit little-endian ELF");
    }
}

/// The guest with its embedded ABI version changed: the note `PVSYNC\0` (namesz 7, descsz 4,
/// type 1) is found by its header bytes and its descriptor patched.
fn guest_with_abi_version(v: u32) -> PathBuf {
    let mut elf = std::fs::read(guest_kernel()).unwrap();
    let mut header = Vec::new();
    header.extend(7u32.to_le_bytes());
    header.extend(4u32.to_le_bytes());
    header.extend(1u32.to_le_bytes());
    header.extend(ELF_NOTE_NAME);
    let at = elf
        .windows(header.len())
        .position(|w| w == header)
        .expect("guest embeds the ABI note");
    let desc = at + 12 + 8; // header words + name padded to 8
    assert_eq!(elf[desc..desc + 4], ABI_VERSION.to_le_bytes());
    elf[desc..desc + 4].copy_from_slice(&v.to_le_bytes());
    scratch(&format!("guest-abi-{v}"), &elf)
}

#[test]
fn mismatched_abi_version_is_refused() {
    let out = run_kernel(&guest_with_abi_version(ABI_VERSION + 1), "64");
    refused(
        &out,
        &format!(
            "guest ABI version {} does not match this VMM's ABI version {ABI_VERSION}",
            ABI_VERSION + 1
        ),
    );
}

#[test]
fn too_little_memory_is_refused() {
    let out = run_kernel(guest_kernel(), "4");
    refused_naming(&out, "--mem ", "--mem 4 MiB is too small for kernel");
}

#[test]
fn bad_cli_flags_are_usage_errors() {
    let k = guest_kernel().to_str().unwrap().to_owned();
    for args in [
        vec!["run", "--kernel", &k, "--vcpus", "0"],
        vec!["run", "--kernel", &k, "--vcpus", "4097"],
        vec!["run", "--kernel", &k, "--mem", "4000"],
        vec!["run", "--kernel", &k, "--bogus"],
        vec!["run"],
        vec!["fly"],
    ] {
        let out = pvsync(&args);
        no_host_panic(&out);
        out.check(
            out.status == Some(EXIT_USAGE),
            &format!("usage error for {args:?}"),
        );
        out.check(out.stderr.contains("error:"), "clap explains the error");
    }
}

/// More vCPUs than this host's KVM allows per VM (but within the ABI's 4096): refused before
/// any vCPU is created, naming KVM's limit.
#[test]
fn more_vcpus_than_kvm_allows_are_refused_naming_the_limit() {
    if !require_kvm("more_vcpus_than_kvm_allows_are_refused_naming_the_limit") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let kvm_max = kvm.get_max_vcpus().min(kvm.get_max_vcpu_id());
    if kvm_max >= shared_abi::MAX_VCPUS {
        eprintln!("*** KVM allows {kvm_max} vCPUs, as many as the ABI: nothing to refuse ***");
        return;
    }
    let k = guest_kernel().to_str().unwrap().to_owned();
    let asked = (kvm_max + 1).to_string();
    let out = pvsync(&["run", "--kernel", &k, "--vcpus", &asked, "--mem", "1024"]);
    no_host_panic(&out);
    out.check(out.status.is_some_and(|s| s != 0), "a failure exit");
    out.check(
        out.stderr.contains(&format!(
            "--vcpus {asked} is more than this host's KVM allows per VM ({kvm_max}"
        )),
        "the error names KVM's limit",
    );
}

#[test]
fn guest_panic_exits_non_zero_with_its_message() {
    if !require_kvm("guest_panic_exits_non_zero_with_its_message") {
        return;
    }
    let out = pvsync_guest(2, 64, "test=panic");
    no_host_panic(&out);
    out.check(out.status == Some(EXIT_GUEST_PANIC), "panic exit status");
    out.check(
        out.stdout
            .contains("PANIC on cpu 0: panicked at src/main.rs"),
        "panic location on the console",
    );
    out.check(
        out.stdout
            .contains("deliberate panic requested by test=panic"),
        "panic message on the console",
    );
}

#[test]
fn guest_page_fault_is_reported() {
    if !require_kvm("guest_page_fault_is_reported") {
        return;
    }
    let out = pvsync_guest(2, 64, "test=fault");
    no_host_panic(&out);
    out.check(
        out.status == Some(EXIT_GUEST_PANIC),
        "exception exit status",
    );
    out.check(
        out.stdout
            .contains("EXCEPTION #PF page fault (vector 14) on cpu 0"),
        "exception report",
    );
    out.check(
        out.stdout.lines().any(|l| l.ends_with(" cr2=0x8")),
        "faulting address",
    );
}

#[test]
fn unknown_guest_command_line_fails() {
    if !require_kvm("unknown_guest_command_line_fails") {
        return;
    }
    let out = pvsync_guest(1, 64, "test=boot frobnicate");
    no_host_panic(&out);
    out.check(
        out.status == Some(EXIT_GUEST_FAILURE),
        "failure exit status",
    );
    out.check(
        out.stdout
            .contains("unknown command-line word 'frobnicate'"),
        "names the bad word",
    );
}

#[test]
fn hung_guest_is_stopped_at_the_timeout() {
    if !require_kvm("hung_guest_is_stopped_at_the_timeout") {
        return;
    }
    let k = guest_kernel().to_str().unwrap().to_owned();
    // Every vCPU ends halted with interrupts off: stopping must kick them out of KVM_RUN.
    let out = pvsync(&[
        "run",
        "--kernel",
        &k,
        "--vcpus",
        "4",
        "--cmdline",
        "test=hang",
        "--timeout",
        "2",
    ]);
    no_host_panic(&out);
    out.check(out.status == Some(EXIT_TIMEOUT), "timeout exit status");
    out.check(
        out.stderr
            .contains("guest did not exit within 2 s; stopped it"),
        "timeout message",
    );
}

#[test]
fn non_regular_kernel_files_are_refused() {
    // /dev/zero would never end and a directory cannot be read: both refused up front.
    for path in ["/dev/zero", "/tmp"] {
        let out = run_kernel(std::path::Path::new(path), "64");
        refused(&out, &format!("kernel image {path} is not a regular file"));
    }
}

#[test]
fn non_regular_or_huge_operator_files_are_refused() {
    // Every file the operator names is read only if it is a regular file of bounded size:
    // /dev/zero would never end, a directory cannot be read.
    let k = guest_kernel().to_str().unwrap().to_owned();
    for path in ["/dev/zero", "/tmp"] {
        for args in [
            vec!["run", "--kernel", &k, "--scenario", path],
            vec!["timeline", path, "--out", "/tmp/pvsync-never.svg"],
        ] {
            let out = pvsync(&args);
            no_host_panic(&out);
            out.check(out.status == Some(EXIT_USAGE), "usage error exit status");
            out.check(
                out.stderr
                    .contains(&format!("{path} is not a regular file")),
                "says why",
            );
        }
    }
    // A scenario past its bound (1 MiB) is refused, not parsed.
    let big = scratch("big.toml", &vec![b'#'; (1 << 20) + 1]);
    let out = pvsync(&["run", "--scenario", big.to_str().unwrap()]);
    no_host_panic(&out);
    out.check(out.status == Some(EXIT_USAGE), "usage error exit status");
    out.check(
        out.stderr.contains("is larger than 1048576 bytes"),
        "says why",
    );
    // A study directory whose data file is a device.
    let dir = std::env::temp_dir().join(format!("pvsync-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(dir.join("study.json"));
    std::os::unix::fs::symlink("/dev/zero", dir.join("study.json")).unwrap();
    let out = pvsync(&["study", "--render", dir.to_str().unwrap()]);
    no_host_panic(&out);
    out.check(out.status == Some(EXIT_USAGE), "usage error exit status");
    out.check(out.stderr.contains("is not a regular file"), "says why");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn operator_text_reaches_the_terminal_escaped() {
    // A control character in a name or a spec is refused, and the message shows it escaped:
    // nothing an operator (or a script fed untrusted names) types can forge console output.
    let k = guest_kernel().to_str().unwrap().to_owned();
    for spec in ["name=a\u{1b}[2Jb", "name=x\ny", "vcpus=\u{7}"] {
        let out = pvsync(&["run", "--kernel", &k, "--vm", spec]);
        no_host_panic(&out);
        out.check(out.status == Some(EXIT_USAGE), "usage error exit status");
        out.check(
            !out.stderr.contains('\u{1b}') && !out.stderr.contains('\u{7}'),
            "no raw control character in the message",
        );
        out.check(out.stderr.lines().count() == 1, "one line");
    }
    // The same for paths, quoted file contents and command lines, whatever the error.
    let scenario = scratch("esc.toml", b"[[vm]]\nkernel = \"/tmp/a\x1b[2Jb\"\n");
    let fifo = std::env::temp_dir().join(format!("pvsync-fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let long = "a".repeat(5000);
    for args in [
        vec!["run", "--scenario", scenario.to_str().unwrap()],
        vec!["run", "--kernel", "/tmp/\u{1b}[2J"],
        vec!["run", "--kernel", &k, "--cmdline", "x\ny"],
        vec!["run", "--kernel", &k, "--cmdline", &long],
        // A FIFO nobody writes: refused at once, not waited on.
        vec!["run", "--kernel", fifo.to_str().unwrap()],
    ] {
        let out = pvsync(&args);
        no_host_panic(&out);
        out.check(out.status == Some(EXIT_USAGE), "usage error exit status");
        out.check(!out.stderr.contains('\u{1b}'), "no raw escape");
        out.check(out.stderr.lines().count() == 1, "one line");
        out.check(out.stderr.len() < 400, "a short line");
    }
    let _ = std::fs::remove_file(&fifo);
}
