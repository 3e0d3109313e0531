//! `cargo bench -p pvsync-tests --bench boot` (or `./run.sh bench boot`): time from process
//! start to "all CPUs online" for 1, 8 and 64 vCPUs, under pvsync and under stock QEMU/KVM
//! (microvm and pc), measured side by side in one run. Prints medians and ratios.
//!
//! Environment: BENCH_REPS (default 5), BENCH_VCPUS (default "1,8,64").

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pvsync_tests::{field, pvsync_guest_command, qemu_command, QemuMachine};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Runner {
    Pvsync,
    QemuMicrovm,
    QemuPc,
}

impl Runner {
    const ALL: [Runner; 3] = [Runner::Pvsync, Runner::QemuMicrovm, Runner::QemuPc];

    fn name(self) -> &'static str {
        match self {
            Runner::Pvsync => "pvsync",
            Runner::QemuMicrovm => "qemu-microvm",
            Runner::QemuPc => "qemu-pc",
        }
    }

    fn command(self, vcpus: u32) -> Command {
        const MEM_MIB: u32 = 256;
        match self {
            Runner::Pvsync => pvsync_guest_command(vcpus, MEM_MIB, "test=boot"),
            Runner::QemuMicrovm => qemu_command(QemuMachine::Microvm, vcpus, MEM_MIB, "test=boot"),
            Runner::QemuPc => qemu_command(QemuMachine::Pc, vcpus, MEM_MIB, "test=boot"),
        }
    }
}

/// One boot: wall time to the "RESULT boot" line, to process exit, and the guest's own TSC
/// cycles from kernel entry to all-online.
struct Sample {
    online: Duration,
    exit: Duration,
    guest_cycles: u64,
}

fn boot_once(runner: Runner, vcpus: u32) -> Sample {
    let start = Instant::now();
    let mut child = runner
        .command(vcpus)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut online = None;
    let mut guest_cycles = 0;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("read console");
        if line.starts_with("RESULT boot") && online.is_none() {
            online = Some(start.elapsed());
            let n = field(&line, "online").and_then(|v| v.parse::<u32>().ok());
            assert_eq!(
                n,
                Some(vcpus),
                "{} booted only {n:?} of {vcpus} CPUs",
                runner.name()
            );
            guest_cycles = field(&line, "online_cycles")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        }
    }
    let status = child.wait().expect("wait");
    let online = online.unwrap_or_else(|| {
        panic!(
            "{} with {vcpus} vCPUs never reached all-online ({status})",
            runner.name()
        )
    });
    Sample {
        online,
        exit: start.elapsed(),
        guest_cycles,
    }
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo bench` passes --bench; any filter argument is ignored.
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let sizes: Vec<u32> = std::env::var("BENCH_VCPUS")
        .unwrap_or_else(|_| "1,8,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** boot benchmark needs /dev/kvm; not run ***");
        std::process::exit(1);
    }
    println!(
        "boot benchmark: median of {reps} runs each, runners interleaved; host has {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "online = wall time from process start to the guest's 'RESULT boot' line (all CPUs online)"
    );
    println!(
        "guest Mcyc = guest TSC from kernel entry to all-online (excludes VMM/firmware set-up)\n"
    );
    println!(
        "{:>5} | {:>12} | {:>10} | {:>10} | {:>12} | {:>14}",
        "vcpus", "runner", "online ms", "exit ms", "guest Mcyc", "online vs pvsync"
    );
    println!("{}", "-".repeat(80));
    for &n in &sizes {
        let mut samples: Vec<Vec<Sample>> = Runner::ALL.iter().map(|_| Vec::new()).collect();
        // Interleave runners so that drift on a shared machine hits them alike.
        for _ in 0..reps {
            for (i, r) in Runner::ALL.iter().enumerate() {
                samples[i].push(boot_once(*r, n));
            }
        }
        let online: Vec<f64> = samples
            .iter()
            .map(|s| median(s.iter().map(|x| ms(x.online)).collect()))
            .collect();
        for (i, r) in Runner::ALL.iter().enumerate() {
            let exit = median(samples[i].iter().map(|x| ms(x.exit)).collect());
            let cycles = median(samples[i].iter().map(|x| x.guest_cycles).collect()) as f64 / 1e6;
            println!(
                "{:>5} | {:>12} | {:>10.1} | {:>10.1} | {:>12.1} | {:>13.2}x",
                n,
                r.name(),
                online[i],
                exit,
                cycles,
                online[i] / online[0]
            );
        }
    }
}
