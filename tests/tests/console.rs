//! The guests' console output can never stall the VMM: a stdout that stops reading and a
//! guest that prints without end must not keep vCPUs from running, nor other VMs.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pvsync_tests::{guest_kernel, pvsync_bin, require_kvm};
use serde_json::Value;

#[test]
fn a_stdout_that_never_reads_cannot_stall_the_guests() {
    if !require_kvm("a_stdout_that_never_reads_cannot_stall_the_guests") {
        return;
    }
    // A pipe nobody reads while the run lasts, made as small as the kernel allows (one
    // page): the flooding guest fills it within its first second.
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just made and are owned here alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe descriptor this test owns.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) };
    let metrics = std::env::temp_dir().join(format!("pvsync-console-{}.json", std::process::id()));
    let k = guest_kernel().to_str().unwrap().to_owned();
    let mut child = Command::new(pvsync_bin())
        .args(["run", "--kernel", &k, "--mem", "64", "--timeout", "60"])
        .args([
            "--vm",
            "name=flood,cmdline=test=console-flood duration=3000",
        ])
        .args([
            "--vm",
            "name=normal,vcpus=2,cmdline=test=locktorture duration=1000",
        ])
        .args(["--metrics", metrics.to_str().unwrap()])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pvsync stalled behind a stdout that does not read");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(read_end);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    // The output that did not fit was dropped, and the user is told.
    assert!(stderr.contains("bytes of guest output dropped"), "{stderr}");
    // Both guests ran to their end; the normal one's results were captured all the same.
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let _ = std::fs::remove_file(&metrics);
    for vm in m["vms"].as_array().unwrap() {
        assert_eq!(vm["outcome"]["kind"], "guest-exit", "{vm}");
        assert_eq!(vm["outcome"]["code"], 0, "{vm}");
    }
    let results = m["vms"][1]["results"].as_array().unwrap();
    assert!(
        results.iter().any(|r| r["test"] == "locktorture"),
        "the normal VM's RESULT line: {results:?}"
    );
}
