//! `./run.sh bench guest` (= `cargo bench -p pvsync-tests --bench guest`): the guest's own
//! latencies (`test=bench`, TSC cycles, medians) with one vCPU per host core and with 2x
//! overcommit, side by side, with ratios. BENCH_REPS (default 3) runs each; the table shows
//! the median of the runs.

use pvsync_tests::{field, pvsync_guest_command, run_with_limit, RUN_LIMIT};

const METRICS: [(&str, &str); 8] = [
    ("clock_overhead", "rdtsc pair (floor of every figure)"),
    ("ipi_rtt", "IPI round trip"),
    ("shootdown_1", "TLB shootdown, 1 target"),
    ("shootdown_n", "TLB shootdown, all other CPUs"),
    ("lock_uncontended", "ticket lock, uncontended"),
    ("lock_contended", "ticket lock, 1 thread per CPU"),
    ("sync_rcu", "synchronize_rcu (median)"),
    ("sync_rcu_max", "synchronize_rcu (max)"),
];

fn run(vcpus: u32) -> Vec<u64> {
    let out = run_with_limit(pvsync_guest_command(vcpus, 256, "test=bench"), RUN_LIMIT);
    let line = out
        .line("RESULT bench")
        .unwrap_or_else(|| panic!("no RESULT bench line:\n{}", out.all()))
        .to_owned();
    METRICS
        .iter()
        .map(|(k, _)| {
            field(&line, k)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** guest benchmark needs /dev/kvm; not run ***");
        std::process::exit(1);
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let configs = [cores, 2 * cores];
    // Interleave configurations so that drift on a shared machine hits both alike.
    let mut runs: Vec<Vec<Vec<u64>>> = vec![Vec::new(); configs.len()];
    for _ in 0..reps {
        for (i, &v) in configs.iter().enumerate() {
            runs[i].push(run(v));
        }
    }
    println!(
        "guest benchmark under pvsync: TSC cycles, median of {reps} runs; host has {cores} cores"
    );
    println!(
        "{:<34} | {:>16} | {:>16} | {:>7}",
        "metric",
        format!("{} vCPUs (1:1)", configs[0]),
        format!("{} vCPUs (2x)", configs[1]),
        "ratio"
    );
    println!("{}", "-".repeat(82));
    for (m, (_, label)) in METRICS.iter().enumerate() {
        let a = median(runs[0].iter().map(|r| r[m]).collect());
        let b = median(runs[1].iter().map(|r| r[m]).collect());
        let ratio = if a == 0 { 0.0 } else { b as f64 / a as f64 };
        println!("{label:<34} | {a:>16} | {b:>16} | {ratio:>6.2}x");
    }
}
