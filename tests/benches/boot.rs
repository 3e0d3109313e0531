//! `cargo bench -p pvsync-tests --bench boot` (or `./run.sh bench boot`): time from process
//! start to "all CPUs online" and to exit for 1, 64, 96, 256 and 1024 vCPUs, under pvsync and
//! under stock QEMU/KVM (microvm and pc, where QEMU accepts the count), measured side by side
//! in one run, and memory per vCPU: the host process's peak RSS and the guest's own use
//! (frames and heap, from its `RESULT boot` line). Prints medians and ratios.
//!
//! Environment: BENCH_REPS (default 3), BENCH_VCPUS (default "1,64,96,256,1024").

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
        let mem = mem_mib(vcpus);
        match self {
            Runner::Pvsync => pvsync_guest_command(vcpus, mem, "test=boot"),
            Runner::QemuMicrovm => qemu_command(QemuMachine::Microvm, vcpus, mem, "test=boot"),
            Runner::QemuPc => qemu_command(QemuMachine::Pc, vcpus, mem, "test=boot"),
        }
    }
}

/// Guest RAM for `vcpus`: the same for every runner, enough for the guest's per-CPU stacks
/// and region at any count.
fn mem_mib(vcpus: u32) -> u32 {
    256 + vcpus / 2
}

/// One boot: wall time to the "RESULT boot" line, to process exit, the guest's own TSC
/// cycles from kernel entry to all-online, the host process's peak RSS and the guest's
/// memory in use at all-online.
struct Sample {
    online: Duration,
    exit: Duration,
    guest_cycles: u64,
    rss_kib: u64,
    guest_kib: u64,
}

/// Boots once; Err with the runner's first error line if it refused the count (QEMU caps
/// vCPUs by machine type) or never got all CPUs online.
fn boot_once(runner: Runner, vcpus: u32) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = runner
        .command(vcpus)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| !l.trim().is_empty())
    });
    let mut online = None;
    let mut guest_cycles = 0;
    let mut guest_kib = 0;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("read console");
        if line.starts_with("RESULT boot") && online.is_none() {
            let n = field(&line, "online").and_then(|v| v.parse::<u32>().ok());
            if n == Some(vcpus) {
                online = Some(start.elapsed());
            }
            guest_cycles = field(&line, "online_cycles")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            guest_kib = field(&line, "mem_used_kib")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        }
    }
    let (status, rss_kib) = wait_with_rss(&mut child);
    let exit = start.elapsed();
    let first_error = errors.join().ok().flatten().unwrap_or_default();
    let online = online.ok_or_else(|| {
        format!(
            "{} {vcpus} vCPUs: not all online ({status}): {first_error}",
            runner.name()
        )
    })?;
    Ok(Sample {
        online,
        exit,
        guest_cycles,
        rss_kib,
        guest_kib,
    })
}

/// Waits for `child`; returns how it ended and its peak resident set (KiB, `wait4`).
fn wait_with_rss(child: &mut std::process::Child) -> (String, u64) {
    let mut status = 0;
    // SAFETY: rusage is plain integers; zeroed is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child (not yet reaped: `child` was never waited on) and
    // writes only into the two locals.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    if pid < 0 {
        return (format!("wait4: {}", std::io::Error::last_os_error()), 0);
    }
    let how = if libc::WIFEXITED(status) {
        format!("exit {}", libc::WEXITSTATUS(status))
    } else {
        format!("signal {}", libc::WTERMSIG(status))
    };
    (how, usage.ru_maxrss.max(0) as u64)
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
        .unwrap_or(3)
        .max(1);
    let sizes: Vec<u32> = std::env::var("BENCH_VCPUS")
        .unwrap_or_else(|_| "1,64,96,256,1024".into())
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
        "guest Mcyc = guest TSC from kernel entry to all-online (excludes VMM/firmware set-up)"
    );
    println!(
        "RSS/vCPU = host process peak RSS over vCPUs; guest/vCPU = guest frames+heap in use at all-online over vCPUs\n"
    );
    println!(
        "{:>5} | {:>12} | {:>5} | {:>10} | {:>10} | {:>10} | {:>8} | {:>8} | {:>9} | {:>10}",
        "vcpus",
        "runner",
        "MiB",
        "online ms",
        "exit ms",
        "guest Mcyc",
        "ms/vCPU",
        "RSS MiB",
        "RSS/vCPU",
        "guest/vCPU"
    );
    println!("{}", "-".repeat(118));
    let mut pvsync_online: Vec<(u32, f64)> = Vec::new();
    for &n in &sizes {
        let mut samples: Vec<Vec<Sample>> = Runner::ALL.iter().map(|_| Vec::new()).collect();
        let mut refused: Vec<Option<String>> = vec![None; Runner::ALL.len()];
        // Interleave runners so that drift on a shared machine hits them alike.
        for _ in 0..reps {
            for (i, r) in Runner::ALL.iter().enumerate() {
                if refused[i].is_some() {
                    continue;
                }
                match boot_once(*r, n) {
                    Ok(s) => samples[i].push(s),
                    // pvsync must boot every size; QEMU may refuse a count.
                    Err(e) if *r == Runner::Pvsync => panic!("{e}"),
                    Err(e) => refused[i] = Some(e),
                }
            }
        }
        for (i, r) in Runner::ALL.iter().enumerate() {
            if let Some(e) = &refused[i] {
                println!("{n:>5} | {:>12} | not run: {}", r.name(), truncate(e, 90));
                continue;
            }
            let s = &samples[i];
            let online = median(s.iter().map(|x| ms(x.online)).collect());
            let exit = median(s.iter().map(|x| ms(x.exit)).collect());
            let cycles = median(s.iter().map(|x| x.guest_cycles).collect()) as f64 / 1e6;
            let rss = median(s.iter().map(|x| x.rss_kib).collect()) as f64 / 1024.0;
            let guest = median(s.iter().map(|x| x.guest_kib).collect()) as f64;
            if *r == Runner::Pvsync {
                pvsync_online.push((n, online));
            }
            println!(
                "{:>5} | {:>12} | {:>5} | {:>10.1} | {:>10.1} | {:>10.1} | {:>8.2} | {:>8.1} | {:>6.0} KiB | {:>6.0} KiB",
                n,
                r.name(),
                mem_mib(n),
                online,
                exit,
                cycles,
                online / n as f64,
                rss,
                rss * 1024.0 / n as f64,
                guest / n as f64,
            );
        }
    }
    // Growth: time to all-online per added vCPU between sizes (linear growth keeps it flat).
    if pvsync_online.len() > 1 {
        println!("\npvsync: ms to all-online per added vCPU");
        for w in pvsync_online.windows(2) {
            let ((a, ta), (b, tb)) = (w[0], w[1]);
            println!(
                "  {a:>5} -> {b:>5}: {:.2} ms/vCPU",
                (tb - ta) / (b - a) as f64
            );
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
