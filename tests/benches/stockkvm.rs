//! `./run.sh bench stockkvm` (= `cargo bench -p pvsync-tests --bench stockkvm`): what KVM's
//! own paravirtual features give the guest under overcommit (2 vCPUs per host core), each
//! on and off, under stock QEMU/KVM and under our VMM (the slot scheduler, which sets the
//! steal-time preempted flag KVM leaves out here), with and without the shared region;
//! beside the same work at 1:1. Side by side in one run, configurations interleaved;
//! BENCH_REPS (default 3) runs of each, medians shown.
//!
//! Workloads, with a fixed amount of work and fixed thread counts so that every
//! configuration does the same:
//! - pbzip2 (user-mode workers, a TLB shootdown per block): shootdown latency p50/p99 and
//!   blocks per second;
//! - locktorture, the kernel's test-and-set ticket lock and the MCS lock, 8 threads: lock
//!   acquisitions per second.
//!
//! Under each table, what took effect (medians from `RESULT kvm-stats`): flushes left to
//! KVM, test-and-set waiters that halted on a preempted holder, ticks that found another
//! vCPU's preempted flag set; and failed runs (left out of the medians).

use std::process::Command;

use pvsync_tests::{
    field, pvsync_guest_command, qemu_command, run_with_limit, QemuMachine, RUN_LIMIT,
};
use shared_abi::ExitCode;

/// `kvm=` settings compared (none: no KVM feature; each alone; both).
const FEATURES: [(&str, &str); 4] = [
    ("none", "kvm=none"),
    ("pvtlb", "kvm=steal,pvtlb"),
    ("pvlock", "kvm=steal,pvlock"),
    ("pvtlb+pvlock", "kvm=steal,pvtlb,pvlock"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Host {
    Qemu,
    /// Our VMM, the guest not registering the shared region (a stock host's view).
    PvsyncOff,
    /// Our VMM with the shared region (pvsync's own paths) and KVM's features beside it.
    Pvsync,
}

impl Host {
    fn name(self) -> &'static str {
        match self {
            Host::Qemu => "QEMU/KVM",
            Host::PvsyncOff => "pvsync, no region",
            Host::Pvsync => "pvsync + region",
        }
    }
}

struct Workload {
    name: &'static str,
    cmdline: &'static str,
    /// (label, RESULT line prefix, key, higher is better).
    metrics: &'static [(&'static str, &'static str, &'static str, bool)],
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "pbzip2",
        cmdline: "test=pbzip2 threads=4 work=120",
        metrics: &[
            ("shootdown p50 us", "RESULT pbzip2", "sd_p50_us", false),
            ("shootdown p99 us", "RESULT pbzip2", "sd_p99_us", false),
            ("blocks/s", "RESULT pbzip2", "blocks_per_s", true),
        ],
    },
    Workload {
        name: "locktorture kernel (test-and-set ticket)",
        cmdline: "test=locktorture lock=kernel threads=8 duration=2000",
        metrics: &[("locks/s", "RESULT locktorture", "per_s", true)],
    },
    Workload {
        name: "locktorture mcs",
        cmdline: "test=locktorture lock=mcs threads=8 duration=2000",
        metrics: &[("locks/s", "RESULT locktorture", "per_s", true)],
    },
];

/// What took effect in a run (`RESULT kvm-stats`).
const EFFECTS: [&str; 3] = ["flushes_deferred", "preempted_halts", "preempted_seen"];

/// One run: each metric of `w`, then each of [`EFFECTS`] (all NaN where the run failed).
fn run(host: Host, vcpus: u32, w: &Workload, kvm: &str) -> Vec<f64> {
    let region = if host == Host::PvsyncOff {
        " pvsync=off"
    } else {
        ""
    };
    let cmdline = format!("{} {kvm}{region}", w.cmdline);
    let (cmd, ok): (Command, i32) = match host {
        Host::Qemu => (
            qemu_command(QemuMachine::Microvm, vcpus, 256, &cmdline),
            ExitCode::Success.qemu_status(),
        ),
        _ => (pvsync_guest_command(vcpus, 256, &cmdline), 0),
    };
    let out = run_with_limit(cmd, RUN_LIMIT);
    if out.status != Some(ok) {
        eprintln!(
            "run failed ({} {vcpus} vCPUs, {cmdline}): status {:?}",
            host.name(),
            out.status
        );
        return vec![f64::NAN; w.metrics.len() + EFFECTS.len()];
    }
    let effects = out.line("RESULT kvm-stats").map(str::to_owned);
    let effect = |k: &str| {
        effects
            .as_deref()
            .and_then(|l| field(l, k))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    w.metrics
        .iter()
        .map(|&(_, prefix, key, _)| {
            let Some(line) = out.line(prefix) else {
                return f64::NAN;
            };
            let get = |k: &str| field(line, k).and_then(|v| v.parse::<f64>().ok());
            match key {
                "per_s" => match (get("total"), get("ran_ms")) {
                    (Some(t), Some(ms)) if ms > 0.0 => t * 1000.0 / ms,
                    _ => f64::NAN,
                },
                k => get(k).unwrap_or(f64::NAN),
            }
        })
        .chain(EFFECTS.iter().map(|k| effect(k)))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** stockkvm benchmark needs /dev/kvm; not run ***");
        std::process::exit(1);
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let hosts = [Host::Qemu, Host::PvsyncOff, Host::Pvsync];
    // Configurations: (host, vCPUs, feature index); the 1:1 reference runs both features.
    let mut configs = Vec::new();
    for &h in &hosts {
        configs.push((h, cores, FEATURES.len() - 1));
        for f in 0..FEATURES.len() {
            configs.push((h, 2 * cores, f));
        }
    }
    // results[workload][config][rep][metric]
    let mut results = vec![vec![Vec::new(); configs.len()]; WORKLOADS.len()];
    for rep in 0..reps {
        eprintln!("stockkvm: round {} of {reps}", rep + 1);
        for (wi, w) in WORKLOADS.iter().enumerate() {
            for (ci, &(h, v, f)) in configs.iter().enumerate() {
                results[wi][ci].push(run(h, v, w, FEATURES[f].1));
            }
        }
    }
    println!(
        "stockkvm: KVM's paravirtual features, median of {reps} runs; host has {cores} cores; overcommitted = {} vCPUs, 1:1 = {cores}",
        2 * cores
    );
    println!("(vs none: the same host and overcommit without KVM features; vs 1:1: the same work on {cores} vCPUs with both features; for latencies a ratio below 1 is better, for rates above 1)");
    for (wi, w) in WORKLOADS.iter().enumerate() {
        for (mi, &(label, _, _, _)) in w.metrics.iter().enumerate() {
            println!();
            println!("{} — {label}", w.name);
            println!(
                "{:<20} {:<14} {:>12} {:>9} {:>9}",
                "host", "kvm=", "median", "vs none", "vs 1:1"
            );
            for &h in &hosts {
                let med = |ci: usize| median(results[wi][ci].iter().map(|r| r[mi]).collect());
                let find = |vcpus: u32, f: usize| {
                    configs
                        .iter()
                        .position(|&(ch, cv, cf)| ch == h && cv == vcpus && cf == f)
                        .map(med)
                        .unwrap_or(f64::NAN)
                };
                let none = find(2 * cores, 0);
                let one_to_one = find(cores, FEATURES.len() - 1);
                for (f, (fname, _)) in FEATURES.iter().enumerate() {
                    let m = find(2 * cores, f);
                    println!(
                        "{:<20} {:<14} {:>12.1} {:>8.2}x {:>8.2}x",
                        h.name(),
                        fname,
                        m,
                        m / none,
                        m / one_to_one
                    );
                }
                println!(
                    "{:<20} {:<14} {:>12.1} {:>9} {:>9}",
                    h.name(),
                    "1:1 (both)",
                    one_to_one,
                    "",
                    ""
                );
            }
        }
        println!();
        println!("{} — what took effect (medians per run)", w.name);
        println!(
            "{:<20} {:<14} {:>10} {:>10} {:>10} {:>8}",
            "host", "kvm=", "deferred", "halts", "seen", "failed"
        );
        for (ci, &(h, v, f)) in configs.iter().enumerate() {
            let runs = &results[wi][ci];
            let e = |k: usize| median(runs.iter().map(|r| r[w.metrics.len() + k]).collect());
            let failed = runs.iter().filter(|r| r.iter().all(|x| x.is_nan())).count();
            let label = if v == cores {
                "1:1 (both)".to_string()
            } else {
                FEATURES[f].0.to_string()
            };
            println!(
                "{:<20} {:<14} {:>10.0} {:>10.0} {:>10.0} {:>8}",
                h.name(),
                label,
                e(0),
                e(1),
                e(2),
                failed
            );
        }
    }
}
