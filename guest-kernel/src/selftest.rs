//! Self-tests selected with `test=selftest`: each checks one foundation piece and prints
//! `TEST <name> ok` or `TEST <name> FAIL: <why>`.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use pvsync_guest::AtomicCpuSet;
use shared_abi::{HypercallStatus, VcpuMode};

use crate::mm::frame::{self, OwnedFrame};
use crate::mm::paging;
use crate::user::Program;
use crate::{percpu, println, shared, smp};

/// CPUs whose per-CPU checks passed during bring-up.
static PERCPU_OK: AtomicCpuSet = AtomicCpuSet::new();

/// Run by every CPU as it comes up (APs through `smp`'s bring-up hook): GS-based per-CPU data (set up from CPUID's initial APIC
/// ID) names the CPU its x2APIC says we are (`apic_id`, independent of how the block was set
/// up) and the CPU's record shows the mode it just published.
pub fn per_cpu_checks(apic_id: u32) {
    let id = percpu::id();
    let gs_ok = id == apic_id && percpu::gs_points_at_this();
    let rec_ok = shared::info().is_none()
        || shared::snapshot(id).is_some_and(|r| r.mode() == Some(VcpuMode::Kernel));
    if gs_ok && rec_ok {
        PERCPU_OK.insert(id);
    }
}

type TestResult = Result<(), &'static str>;
type SelfTest = (&'static str, fn() -> TestResult);

fn frame_alloc() -> TestResult {
    let (_, before) = frame::stats();
    let a = OwnedFrame::alloc().ok_or("no frame")?;
    let b = OwnedFrame::alloc().ok_or("no second frame")?;
    if a.addr() == b.addr() {
        return Err("same frame handed out twice");
    }
    if a.addr() < 0x10_0000 {
        return Err("frame below 1 MiB");
    }
    let a_addr = a.addr();
    drop(a);
    let c = OwnedFrame::alloc().ok_or("no frame after free")?;
    if c.addr() != a_addr {
        return Err("freed frame not reused");
    }
    drop(b);
    drop(c);
    (frame::stats().1 == before)
        .then_some(())
        .ok_or("frames leaked")
}

fn heap() -> TestResult {
    let v: Vec<u64> = (0..10_000).collect();
    let sum: u64 = v.iter().sum();
    (sum == 10_000 * 9_999 / 2)
        .then_some(())
        .ok_or("heap vector corrupted")
}

fn paging_map_unmap() -> TestResult {
    const VA: u64 = 0x4000_0000_0000; // PML4 slot 128: unused by the identity map
    paging::check_map_unmap(VA)
}

fn percpu_data() -> TestResult {
    let failed = smp::online().difference(&PERCPU_OK.load());
    failed
        .is_empty()
        .then_some(())
        .ok_or("a CPU's GS-based data named the wrong CPU")
}

fn shared_records() -> TestResult {
    let Some((_, nr, status)) = shared::info() else {
        return Err("no shared region");
    };
    let online = smp::online();
    for cpu in 0..nr {
        let rec = shared::snapshot(cpu).ok_or("record out of range or never consistent")?;
        let expected = if cpu == percpu::id() {
            VcpuMode::Kernel
        } else {
            VcpuMode::Idle
        };
        if online.contains(cpu) && rec.mode() != Some(expected) {
            return Err("a record does not show its CPU's mode");
        }
    }
    if status == HypercallStatus::Ok && !shared::host_accepted() {
        return Err("host said ok but did not set ACCEPTED");
    }
    Ok(())
}

fn other_cpus() -> impl Iterator<Item = u32> {
    let mut others = smp::online();
    others.remove(percpu::id());
    others.into_iter()
}

/// Bound for events that must happen eventually: generous, because a vCPU of an
/// overcommitted VM can be kept off the CPU for long stretches. Only a lost event exceeds it.
const EVENTUALLY_US: u64 = 10_000_000;

/// Every CPU ticks while it runs a task (idle CPUs other than the boot CPU stop their tick):
/// a task on each other CPU waits for its CPU's tick to advance, this one for its own.
fn timer_ticks() -> TestResult {
    let until_tick = |cpu: u32| {
        let before = crate::irq::ticks(cpu);
        let deadline = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(EVENTUALLY_US);
        while crate::irq::ticks(cpu) == before {
            if crate::arch::tsc::now() > deadline {
                return 1;
            }
            core::hint::spin_loop();
        }
        0
    };
    // A task per CPU: a VM given little more memory than its CPUs need to boot may not
    // hold them all, which fails the test, not the kernel.
    let probes: Vec<_> = other_cpus()
        .map(|c| crate::sched::try_spawn_returning(c, "tick_probe", move || until_tick(c)))
        .collect();
    let mine = until_tick(percpu::id());
    let failed = mine + probes.iter().flatten().map(crate::sched::join).sum::<u64>();
    if probes.iter().any(Result::is_err) {
        return Err("the kernel heap cannot hold a task per CPU; give the VM more memory (--mem)");
    }
    if failed != 0 {
        return Err("a CPU's tick never advanced while it ran a task");
    }
    Ok(())
}

fn ipi_ping() -> TestResult {
    // All-but-self first: every other CPU must count one more ping.
    let before: Vec<(u32, u64)> = other_cpus().map(|c| (c, crate::irq::pings(c))).collect();
    crate::arch::apic::send_ipi_all_but_self(crate::arch::vectors::PING);
    let deadline = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(EVENTUALLY_US);
    while before.iter().any(|&(c, n)| crate::irq::pings(c) == n) {
        if crate::arch::tsc::now() > deadline {
            return Err("a broadcast ping was never handled");
        }
        core::hint::spin_loop();
    }
    for cpu in other_cpus() {
        let before = crate::irq::pings(cpu);
        crate::arch::apic::send_ipi(cpu, crate::arch::vectors::PING);
        let deadline = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(EVENTUALLY_US);
        while crate::irq::pings(cpu) == before {
            if crate::arch::tsc::now() > deadline {
                return Err("a ping IPI was never handled");
            }
            core::hint::spin_loop();
        }
    }
    Ok(())
}

fn preemption() -> TestResult {
    use alloc::sync::Arc;
    use core::sync::atomic::AtomicBool;
    // Two threads that never yield, on one CPU: both progress only if the tick preempts.
    let cpu = other_cpus().next().unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let switches = crate::sched::switches(cpu);
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let (stop, counts) = (stop.clone(), counts.clone());
            crate::sched::spawn(cpu, "spinner", move || {
                while !stop.load(Ordering::Acquire) {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                    core::hint::spin_loop();
                }
            })
        })
        .collect();
    // Wait until both have run and the CPU has switched between them (or give up).
    let deadline = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(EVENTUALLY_US);
    let progressed = || {
        counts.iter().all(|c| c.load(Ordering::Relaxed) > 0)
            && crate::sched::switches(cpu) > switches + 2
    };
    while !progressed() && crate::arch::tsc::now() < deadline {
        crate::sched::yield_now();
    }
    let ok = progressed();
    stop.store(true, Ordering::Release);
    for t in &threads {
        crate::sched::join(t);
    }
    ok.then_some(())
        .ok_or("two busy threads on one CPU did not both run: no preemption")
}

fn rcu_basics() -> TestResult {
    let before = crate::rcu::stats();
    crate::rcu::synchronize();
    if crate::rcu::stats().gps <= before.gps {
        return Err("synchronize_rcu returned without a grace period");
    }
    let hits = alloc::sync::Arc::new(AtomicU64::new(0));
    for _ in 0..100 {
        let h = hits.clone();
        crate::rcu::call(move || {
            h.fetch_add(1, Ordering::Relaxed);
        });
    }
    crate::rcu::barrier();
    if hits.load(Ordering::Relaxed) != 100 {
        return Err("rcu_barrier returned before every callback ran");
    }
    let after = crate::rcu::stats();
    if after.pending != 0 {
        return Err("callbacks still pending after rcu_barrier");
    }
    match shared::rcu_header() {
        Some((seq, _)) if seq < 2 * after.gps => Err("header rcu_gp_seq lags the grace periods"),
        _ => Ok(()),
    }
}

fn user_mode() -> TestResult {
    use crate::mm::aspace::AddressSpace;
    let cpu = other_cpus().next().unwrap_or(0);
    let aspace = alloc::sync::Arc::new(AddressSpace::new());
    crate::user::map_programs(&aspace);
    let t = crate::user::spawn(
        cpu,
        "user_selftest",
        aspace.clone(),
        Program::SelfTest,
        crate::user::USER_DATA_VA,
        0,
        0,
    );
    match crate::sched::join(&t) {
        0 => {}
        _ => return Err("the user program reported a failing syscall"),
    }
    // A user page fault (reading an unmapped page) kills the task, not the kernel.
    let t = crate::user::spawn(
        cpu,
        "user_fault",
        aspace,
        Program::TlbReader,
        crate::user::USER_DATA_VA,
        0,
        1,
    );
    (crate::sched::join(&t) == 128 + 14)
        .then_some(())
        .ok_or("a faulting user task was not killed with #PF")
}

/// Runs every self-test; true if all passed.
pub fn run_all() -> bool {
    let tests: [SelfTest; 10] = [
        ("frame-alloc", frame_alloc),
        ("heap", heap),
        ("paging", paging_map_unmap),
        ("percpu", percpu_data),
        ("shared-records", shared_records),
        ("timer", timer_ticks),
        ("ipi", ipi_ping),
        ("preemption", preemption),
        ("rcu", rcu_basics),
        ("user-mode", user_mode),
    ];
    let mut passed = 0;
    for (name, test) in tests {
        match test() {
            Ok(()) => {
                passed += 1;
                println!("TEST {name} ok");
            }
            Err(why) => println!("TEST {name} FAIL: {why}"),
        }
    }
    println!(
        "RESULT selftest passed={passed} failed={}",
        tests.len() - passed
    );
    passed == tests.len()
}

/// `test=rcu-model`: the x86-TSO model of RCU's grace-period handshake (rcu_model.rs) finds
/// no use of a freed element with request_gp's fence, and finds one without it.
pub fn rcu_model() -> bool {
    let with = crate::rcu_model::explore(true);
    let with_ok = with.counterexample.is_none();
    println!(
        "TEST rcu-order-fence {} ({} states)",
        if with_ok {
            "ok"
        } else {
            "FAIL: a reader used a freed element"
        },
        with.states
    );
    let without = crate::rcu_model::explore(false);
    let caught = without.counterexample.is_some();
    for step in without.counterexample.iter().flatten() {
        println!("rcu-model without the fence: {step}");
    }
    println!(
        "TEST rcu-order-no-fence-caught {} ({} states)",
        if caught {
            "ok"
        } else {
            "FAIL: the model misses the store-buffering bug"
        },
        without.states
    );
    println!(
        "RESULT rcu-model states_fence={} states_no_fence={}",
        with.states, without.states
    );
    with_ok && caught
}
