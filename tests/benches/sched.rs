//! `./run.sh bench sched` (= `cargo bench -p pvsync-tests --bench sched`): the scheduler and
//! the boost policies side by side, in one run, on this machine.
//!
//! 0. Mechanism floors of this host (`floors`): a null exit, a kick, a futex wake.
//! 1. Costs per policy (and under the Linux backend): hypercall round trips seen by the
//!    guest (YieldTo with nobody to boost, a 1 us Idle, an IPI to an idle vCPU and back),
//!    slot hand-off (the core hands a slot to a vCPU until its thread enters KVM_RUN) and
//!    kick latency (a slice ends until the vCPU has left its slot), from `test=bench`,
//!    median and 99th percentile, and as multiples of the floors; with slots bound to host
//!    CPUs (the default) and not.
//! 2. The three problems, each reproduced and fixed: shootdowns to user-mode receivers
//!    (tlbtorture remaps), sibling stacking (wake-affine vs spread), and RCU grace periods
//!    with preempted readers (rcutorture); each under the slot backend and under the Linux
//!    backend (the host scheduler runs the vCPU threads; boosts are bounded `SCHED_FIFO`).
//! 3. Boost decision latency by VM size (64, 256 and 1024 vCPUs): each policy's `on_spin`
//!    and `on_tick`, and the snapshots they read, copied from guest memory, in process.
//!
//! The guests run with `kvm=none`: this benchmark measures pvsync's own mechanisms and
//! policies; what KVM's own paravirtual features add is `./run.sh bench stockkvm`'s.
//!
//! BENCH_REPS (default 3) runs each configuration; tables show medians. BENCH_PARTS (a comma
//! list of floors, decisions, costs, problems, stacking) runs only some parts. Configurations are
//! interleaved so that drift on a shared machine hits all alike.

mod floors;

use std::hint::black_box;
use std::time::Instant;

use host_vmm::policy::{by_name, Costs, Cpl, Input, VcpuState, POLICY_NAMES};
use host_vmm::shared_region::{validate, Registration, Snapshot};
use pvsync_tests::{field, guest_kernel, pvsync, Output};
use serde_json::Value;
use shared_abi::{
    bitmap_word_bit, holdouts_offset, ipi_wait_offset, record_offset, PageHeader, VcpuMode,
    VcpuRecord, NO_VCPU, RECORD_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn reps() -> usize {
    std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs pvsync with `args` and `--metrics`; returns the output and the metrics JSON.
fn run(args: &[&str]) -> (Output, Value) {
    let path = std::env::temp_dir().join(format!("pvsync-bench-sched-{}.json", std::process::id()));
    let k = guest_kernel().to_str().unwrap().to_owned();
    let mut all = vec![
        "run",
        "--kernel",
        &k,
        "--timeout",
        "180",
        "--metrics",
        path.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    if !args.contains(&"--mem") {
        all.extend(["--mem", "256"]);
    }
    let out = pvsync(&all);
    if out.status != Some(0) {
        panic!("pvsync {args:?} failed:\n{}", out.all());
    }
    let m = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (out, m)
}

fn num(out: &Output, result: &str, key: &str) -> f64 {
    out.line(result)
        .and_then(|l| field(l, key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {result}:\n{}", out.all()))
}

/// A row of columns, one per configuration.
fn row(label: &str, cells: &[f64], unit: &str) {
    print!("{label:<38}");
    for c in cells {
        print!(" | {:>11}", format!("{c:.1}{unit}"));
    }
    println!();
}

fn header(first: &str, names: &[String]) {
    print!("{first:<38}");
    for n in names {
        print!(" | {n:>11}");
    }
    println!();
    println!("{}", "-".repeat(38 + 14 * names.len()));
}

/// Part 1: costs per policy and backend, against the floors.
fn costs(reps: usize, fl: &floors::Floors) {
    let configs: Vec<(String, Vec<&str>)> = POLICY_NAMES
        .iter()
        .map(|p| (p.to_string(), vec!["--policy", *p]))
        .chain([
            (
                "pv unbound".to_string(),
                vec!["--policy", "pv", "--pin-slots", "off"],
            ),
            ("linux".to_string(), vec!["--backend", "linux"]),
        ])
        .collect();
    const GUEST: [(&str, &str); 6] = [
        ("hc_yield_rtt", "YieldTo round trip (nobody to boost)"),
        ("hc_idle_rtt", "Idle round trip (1 us timeout)"),
        ("ipi_rtt", "IPI to an idle vCPU and back"),
        ("shootdown_n", "shootdown, all other vCPUs"),
        ("lock_contended", "ticket lock, 1 thread per vCPU"),
        ("sync_rcu_max", "synchronize_rcu (max)"),
    ];
    const HOST: [(&str, &str); 4] = [
        ("handoff_latency_p50_ns", "slot hand-off, median"),
        ("handoff_latency_p99_ns", "slot hand-off, p99"),
        ("kick_latency_p50_ns", "kick, median"),
        ("kick_latency_p99_ns", "kick, p99"),
    ];
    let mut cells = vec![vec![Vec::new(); GUEST.len() + HOST.len()]; configs.len()];
    for _ in 0..reps {
        for (c, (_, args)) in configs.iter().enumerate() {
            let mut a = vec!["--vcpus", "4", "--cmdline", "test=bench kvm=none"];
            a.extend_from_slice(args);
            let (out, m) = run(&a);
            let khz = num(&out, "RESULT bench", "tsc_khz");
            for (i, (k, _)) in GUEST.iter().enumerate() {
                cells[c][i].push(num(&out, "RESULT bench", k) / khz * 1000.0);
            }
            for (i, (k, _)) in HOST.iter().enumerate() {
                let ns = m["vms"][0][k].as_f64().unwrap_or(0.0);
                cells[c][GUEST.len() + i].push(ns / 1000.0);
            }
        }
    }
    let names: Vec<String> = configs.iter().map(|(n, _)| n.clone()).collect();
    println!("\n1. Costs: 4 vCPUs on 2 slots (2 host cores), us, median of {reps} runs");
    header("", &names);
    for (i, (_, label)) in GUEST.iter().enumerate() {
        let v: Vec<f64> = cells.iter().map(|c| median(c[i].clone())).collect();
        row(label, &v, "");
    }
    let host: Vec<Vec<f64>> = (0..HOST.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| median(c[GUEST.len() + i].clone()))
                .collect()
        })
        .collect();
    for (i, (_, label)) in HOST.iter().enumerate() {
        row(label, &host[i], "");
    }
    // A bound slot hands off to a thread woken on its own CPU; a kick is a signal that ends
    // KVM_RUN.
    let x = |v: &[f64], floor: f64| v.iter().map(|c| c / floor).collect::<Vec<_>>();
    row(
        "hand-off median / futex wake floor",
        &x(&host[0], fl.futex_same_cpu.0),
        "x",
    );
    row("kick median / kick floor", &x(&host[2], fl.kick.0), "x");
    println!("(linux: host threads under the Linux scheduler; no slots, so no hand-off or kicks)");
}

/// Part 0: floors.
fn print_floors(fl: &floors::Floors) {
    println!("\n0. Mechanism floors on this host (raw KVM ioctls, bare threads), us: median / p99");
    for (label, (m, p)) in [
        ("null port-I/O exit round trip", fl.null_exit),
        ("kick: signal -> KVM_RUN returns", fl.kick),
        ("futex wake, same host CPU", fl.futex_same_cpu),
        ("futex wake, other host CPU", fl.futex_other_cpu),
    ] {
        println!("{label:<38} | {m:>8.1} / {p:>8.1}");
    }
}

/// Host set-ups for the problems: vCPUs of one VM on the 2 default slots (the first without
/// overcommit, the baseline), and the slice.
/// 3 ms is the VMM's default; 20 ms is what a busy CFS host gives a vCPU thread
/// (sched_latency 24 ms), where a preempted vCPU stays off the CPU for tens of ms.
/// 96 vCPUs is the published user-mode-IPI setting (48:1 on these 2 slots, 3 ms slices: a
/// vCPU waits ~140 ms for its turn).
const SETUPS: [(&str, &str, &str); 5] = [
    ("2 vCPUs (1:1), 3 ms slices", "2", "3000"),
    ("4 vCPUs, 3 ms slices", "4", "3000"),
    ("4 vCPUs, 20 ms slices", "4", "20000"),
    ("8 vCPUs, 20 ms slices", "8", "20000"),
    ("96 vCPUs, 3 ms slices", "96", "3000"),
];

/// The same vCPU counts under the Linux backend (no slots, no slice: the host's own
/// scheduler time-slices the threads; boosts raise a thread to `SCHED_FIFO`).
const LINUX_SETUPS: [(&str, &str); 4] = [
    ("2 vCPUs (1:1)", "2"),
    ("4 vCPUs", "4"),
    ("8 vCPUs", "8"),
    ("96 vCPUs", "96"),
];

/// Guest RAM for a set-up: what the small ones always had, more for 96 vCPUs' threads.
fn mem_for(vcpus: &str) -> &'static str {
    match vcpus.parse::<u32>() {
        Ok(n) if n > 64 => "512",
        _ => "256",
    }
}

/// Per set-up, per policy, the samples of one measure.
type Table = Vec<Vec<Vec<f64>>>;

/// The measures of part 2 for one backend's set-ups.
struct Problems {
    remaps: Table,
    yields: Table,
    gp_avg: Table,
    gp_max: Table,
}

impl Problems {
    fn new(setups: usize, policies: usize) -> Self {
        let t = || vec![vec![Vec::new(); policies]; setups];
        Problems {
            remaps: t(),
            yields: t(),
            gp_avg: t(),
            gp_max: t(),
        }
    }

    /// One run of each problem with `base` arguments, into set-up `s`, policy `i`.
    fn measure(&mut self, s: usize, i: usize, base: &[&str]) {
        let mut a = base.to_vec();
        a.extend(["--cmdline", "test=tlbtorture duration=2000 kvm=none"]);
        let (out, _) = run(&a);
        let r = "RESULT tlbtorture";
        self.remaps[s][i].push(num(&out, r, "remaps") / 2.0);
        self.yields[s][i].push(num(&out, r, "yields") / num(&out, r, "shootdowns").max(1.0));
        let mut a = base.to_vec();
        a.extend(["--cmdline", "test=rcutorture duration=2000 kvm=none"]);
        let (out, _) = run(&a);
        self.gp_avg[s][i].push(num(&out, "RESULT rcutorture", "gp_avg_us") / 1000.0);
        self.gp_max[s][i].push(num(&out, "RESULT rcutorture", "gp_max_us") / 1000.0);
    }
}

fn medians(v: &[Vec<f64>]) -> Vec<f64> {
    v.iter().map(|x| median(x.clone())).collect()
}

/// Rows of `table` for set-ups `labels`, then each set-up against the same policy's 1:1 run
/// (set-up 0).
fn table_with_ratios(table: &Table, labels: &[&str], policies: &[String], title: &str, unit: &str) {
    header(title, policies);
    for (s, label) in labels.iter().enumerate() {
        row(label, &medians(&table[s]), unit);
    }
    header(&format!("{title} / the 1:1 run"), policies);
    let base = medians(&table[0]);
    for (s, label) in labels.iter().enumerate().skip(1) {
        let v: Vec<f64> = medians(&table[s])
            .iter()
            .zip(&base)
            .map(|(c, b)| if *b == 0.0 { 0.0 } else { c / b })
            .collect();
        row(label, &v, "x");
    }
}

/// Part 2: the three problems, per policy, under the slot backend and the Linux backend,
/// interleaved.
fn problems(reps: usize) {
    let policies: Vec<String> = POLICY_NAMES.iter().map(|s| s.to_string()).collect();
    let np = policies.len();
    let mut slots = Problems::new(SETUPS.len(), np);
    let mut linux = Problems::new(LINUX_SETUPS.len(), np);
    for _ in 0..reps {
        for (s, (_, vcpus, slice)) in SETUPS.iter().enumerate() {
            for (i, p) in policies.iter().enumerate() {
                slots.measure(
                    s,
                    i,
                    &[
                        "--vcpus",
                        vcpus,
                        "--mem",
                        mem_for(vcpus),
                        "--slice-us",
                        slice,
                        "--policy",
                        p,
                    ],
                );
            }
        }
        for (s, (_, vcpus)) in LINUX_SETUPS.iter().enumerate() {
            for (i, p) in policies.iter().enumerate() {
                linux.measure(
                    s,
                    i,
                    &[
                        "--vcpus",
                        vcpus,
                        "--mem",
                        mem_for(vcpus),
                        "--backend",
                        "linux",
                        "--policy",
                        p,
                    ],
                );
            }
        }
    }
    let slot_labels: Vec<&str> = SETUPS.iter().map(|s| s.0).collect();
    let linux_labels: Vec<&str> = LINUX_SETUPS.iter().map(|s| s.0).collect();
    for (backend, t, labels) in [
        ("slot backend, 2 slots", &slots, &slot_labels),
        ("Linux backend, 2 host cores", &linux, &linux_labels),
    ] {
        println!(
            "\n2a. Shootdown IPIs to user-mode receivers: tlbtorture, {backend}, median of {reps}"
        );
        table_with_ratios(
            &t.remaps,
            labels,
            &policies,
            "remaps per second (higher is better)",
            "",
        );
        header("YieldTo hypercalls per shootdown", &policies);
        for (s, label) in labels.iter().enumerate() {
            row(label, &medians(&t.yields[s]), "");
        }
        println!(
            "\n2c. RCU grace periods with preempted readers: rcutorture, {backend}, median of {reps}"
        );
        table_with_ratios(&t.gp_avg, labels, &policies, "grace period average, ms", "");
        table_with_ratios(&t.gp_max, labels, &policies, "grace period max, ms", "");
    }
}

/// Part 2b: sibling stacking and lock throughput, wake-affine against spread: 2 VMs x 4
/// vCPUs on 4 slots (more slots than host cores), 2 VMs x 2 vCPUs on the 2 real cores, and
/// the same under the Linux backend (stacking sampled from the CPUs the host ran each
/// thread on).
fn stacking(reps: usize) {
    let placements = ["wake-affine", "spread"];
    let setups = [
        (
            "2 VMs x 4 vCPUs, 4 slots",
            "4",
            "vcpus=4,cmdline=test=locktorture lock=mcs duration=2000 kvm=none",
        ),
        (
            "2 VMs x 2 vCPUs, 2 slots",
            "2",
            "vcpus=2,cmdline=test=locktorture lock=mcs duration=2000 kvm=none",
        ),
        (
            "2 VMs x 2 vCPUs, Linux backend",
            "linux",
            "vcpus=2,cmdline=test=locktorture lock=mcs duration=2000 kvm=none",
        ),
    ];
    let mut stack = vec![vec![Vec::new(); 2]; setups.len()];
    let mut ops = vec![vec![Vec::new(); 2]; setups.len()];
    let mut handoff = vec![vec![Vec::new(); 2]; setups.len()];
    for _ in 0..reps {
        for (s, (_, slots, vm)) in setups.iter().enumerate() {
            for (i, p) in placements.iter().enumerate() {
                let host = if *slots == "linux" {
                    ["--backend", "linux"]
                } else {
                    ["--slots", slots]
                };
                let (out, m) = run(&[host[0], host[1], "--placement", p, "--vm", vm, "--vm", vm]);
                let f = |v: usize| m["vms"][v]["stacking_fraction"].as_f64().unwrap();
                stack[s][i].push(100.0 * (f(0) + f(1)) / 2.0);
                let h = |v: usize| {
                    m["vms"][v]["handoff_latency_p50_ns"]
                        .as_f64()
                        .unwrap_or(0.0)
                };
                handoff[s][i].push((h(0) + h(1)) / 2000.0);
                let totals: f64 = out
                    .stdout
                    .lines()
                    .filter(|l| l.contains("RESULT locktorture"))
                    .filter_map(|l| field(l, "total").and_then(|v| v.parse::<f64>().ok()))
                    .sum();
                ops[s][i].push(totals / 2.0);
            }
        }
    }
    let med = |v: &[Vec<f64>]| v.iter().map(|x| median(x.clone())).collect::<Vec<_>>();
    println!("\n2b. Stacking: locktorture (mcs) in 2 VMs, median of {reps}");
    header("", &placements.map(String::from));
    for (s, (label, ..)) in setups.iter().enumerate() {
        row(&format!("{label}: stacked %"), &med(&stack[s]), "%");
        let o = med(&ops[s]);
        row(&format!("{label}: locks/s"), &o, "");
        let base = o[0].max(f64::MIN_POSITIVE);
        row(
            &format!("{label}: locks/s / wake-affine"),
            &[1.0, o[1] / base],
            "x",
        );
        row(
            &format!("{label}: hand-off median, us"),
            &med(&handoff[s]),
            "",
        );
    }
}

/// What the backend knows about a VM of `n` vCPUs under overcommit: vCPU 0 runs, the rest
/// are preempted, in user and kernel mode alike, a third with an interrupt pending.
fn synthetic_states(n: u32) -> Vec<VcpuState> {
    (0..n)
        .map(|id| VcpuState {
            id,
            cpl: if id % 2 == 0 { Cpl::User } else { Cpl::Kernel },
            interrupt_pending: id % 3 == 0,
            ..if id == 0 {
                VcpuState::running()
            } else {
                VcpuState::preempted()
            }
        })
        .collect()
}

/// A registered region of `n` vCPUs in guest memory, as a guest would publish it: every
/// vCPU in the kernel, every fifth one in an RCU reader, vCPU 0 waiting for acknowledgements
/// from the last vCPU, and a grace period waiting on every seventh vCPU.
fn synthetic_region(n: u32) -> (GuestMemoryMmap, Registration) {
    const GPA: u64 = 0x10_0000;
    let size = shared_abi::region_size(n as usize, 0);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GPA as usize + size)])
        .expect("guest memory");
    let mut header = PageHeader::new(n, 0);
    header.rcu_gp_seq = 7;
    header.rcu_callbacks_pending = 5000;
    mem.write_slice(&header.to_bytes(), GuestAddress(GPA))
        .unwrap();
    for i in 0..n {
        let r = VcpuRecord {
            seq: 2,
            mode: VcpuMode::Kernel as u8,
            spin_holder: NO_VCPU,
            rcu_nesting: (i % 5 == 0) as u32,
            ipi_wait_count: (i == 0) as u32,
            ..Default::default()
        };
        // SAFETY: VcpuRecord is plain integers, RECORD_SIZE bytes.
        let b: &[u8; RECORD_SIZE] = unsafe { &*(&r as *const VcpuRecord).cast() };
        mem.write_slice(b, GuestAddress(GPA + record_offset(i as usize) as u64))
            .unwrap();
    }
    let set = |at: usize, v: u32| {
        let (w, b) = bitmap_word_bit(v);
        let a = GuestAddress(GPA + (at + 8 * w) as u64);
        let old: u64 = mem.read_obj(a).unwrap();
        mem.write_obj(old | b, a).unwrap();
    };
    set(ipi_wait_offset(n as usize, 0), n - 1);
    (0..n)
        .step_by(7)
        .for_each(|v| set(holdouts_offset(n as usize), v));
    let ram = 0..GPA + size as u64;
    let reg =
        validate(&mem, GPA, n, &(0..0x1000), std::slice::from_ref(&ram)).expect("a valid region");
    (mem, reg)
}

/// Mean ns per call of `f` over `iters` calls.
fn ns_per_call(iters: u32, mut f: impl FnMut(u32)) -> f64 {
    let t = Instant::now();
    for i in 0..iters {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

/// Part 3: decision latency per policy, and what the snapshots they read cost, by VM size.
fn decisions() {
    const COSTS: Costs = Costs {
        boost_ns: 50_000,
        slice_ns: 3_000_000,
    };
    let names: Vec<String> = POLICY_NAMES.iter().map(|s| s.to_string()).collect();
    println!("\n3. Boost decisions by VM size, in process (guest memory as a VM's), ns per call");
    println!(
        "   a YieldTo copies the spinner's record (before: the whole region); a periodic look\n   copies every record; an RcuWait the holdouts' records. Goal: a decision < 10 000 ns at 1024."
    );
    header("vCPUs", &["64", "256", "1024"].map(String::from));
    let sizes = [64u32, 256, 1024];
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut push = |label: String, ns: f64| match rows.iter_mut().find(|(l, _)| *l == label) {
        Some((_, v)) => v.push(ns.round()),
        None => rows.push((label, vec![ns.round()])),
    };
    for &n in &sizes {
        let (mem, reg) = synthetic_region(n);
        let vcpus = synthetic_states(n);
        let iters = (2_000_000 / n).max(200);
        let full = ns_per_call(iters / 4, |_| {
            black_box(Snapshot::take(&mem, &reg).unwrap());
        });
        let some = ns_per_call(iters, |_| {
            black_box(Snapshot::take_some(&mem, &reg, &[0]).unwrap());
        });
        let rcu = ns_per_call(iters / 4, |_| {
            black_box(Snapshot::take_holdouts(&mem, &reg).unwrap());
        });
        push("snapshot: whole region".into(), full);
        push("snapshot: spinner's record (YieldTo)".into(), some);
        push("snapshot: holdouts' records (RcuWait)".into(), rcu);
        let full_snap = Snapshot::take(&mem, &reg).unwrap();
        let spin_snap = Snapshot::take_some(&mem, &reg, &[0]).unwrap();
        for name in &names {
            let mut p = by_name(name).unwrap();
            let spin = ns_per_call(iters, |k| {
                let input = Input {
                    now: k as u64 * 1000,
                    vcpus: &vcpus,
                    shared: Some(&spin_snap),
                    costs: COSTS,
                };
                black_box(p.on_spin(&input, 0, Some(n - 1)));
            });
            let tick = ns_per_call(iters / 4, |k| {
                let input = Input {
                    now: k as u64 * 1_000_000,
                    vcpus: &vcpus,
                    shared: Some(&full_snap),
                    costs: COSTS,
                };
                black_box(p.on_tick(&input));
            });
            push(format!("{name}: on_spin"), spin);
            push(format!("{name}: on_tick"), tick);
        }
        let mut pv = by_name("pv").unwrap();
        let yield_to = ns_per_call(iters, |k| {
            let snap = Snapshot::take_some(&mem, &reg, &[0]).unwrap();
            let input = Input {
                now: k as u64 * 1000,
                vcpus: &vcpus,
                shared: Some(&snap),
                costs: COSTS,
            };
            black_box(pv.on_spin(&input, 0, None));
        });
        let before = ns_per_call(iters / 4, |k| {
            let snap = Snapshot::take(&mem, &reg).unwrap();
            let input = Input {
                now: k as u64 * 1000,
                vcpus: &vcpus,
                shared: Some(&snap),
                costs: COSTS,
            };
            black_box(pv.on_spin(&input, 0, None));
        });
        push("pv YieldTo decision: snapshot + on_spin".into(), yield_to);
        push("  same with the whole region (before)".into(), before);
    }
    for (label, v) in &rows {
        row(label, v, "");
    }
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** scheduler benchmark needs /dev/kvm; not run ***");
        std::process::exit(1);
    }
    let reps = reps();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("scheduler benchmark: host has {cores} cores; default slots = {cores}");
    // BENCH_PARTS=floors,costs,problems,stacking,decisions (default: all).
    let parts = std::env::var("BENCH_PARTS").unwrap_or_default();
    let want = |p: &str| parts.is_empty() || parts.split(',').any(|x| x.trim() == p);
    let fl = floors::measure(2000);
    print_floors(&fl);
    if want("decisions") {
        decisions();
    }
    if want("costs") {
        costs(reps, &fl);
    }
    if want("problems") {
        problems(reps);
    }
    if want("stacking") {
        stacking(reps);
    }
}
