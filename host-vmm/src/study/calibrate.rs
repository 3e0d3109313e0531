//! What this host does to the study's numbers, measured at the start of each run: the same
//! loop in guest kernel mode and in guest user mode (guest kernel code is emulated by the
//! nested KVM on our machines, user code is not: their ratio is the emulation's cost), a few
//! kernel operations and a hypercall's round trip, and what a thread wake-up costs on the
//! host.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::experiments::{Config, VmPlan};
use super::runner::Runner;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Figures in microseconds, nanoseconds (`_ns`) or a ratio, by name; a figure that could not be measured
    /// is absent.
    pub figures: BTreeMap<String, f64>,
    /// What went wrong, if anything.
    pub notes: Vec<String>,
}

/// A 1-vCPU run of `cmdline` on one slot, for calibration.
fn probe(id: &str, cmdline: &str) -> Config {
    Config {
        id: format!("calibration/{id}"),
        experiment: "calibration",
        label: id.to_string(),
        backend: "slots",
        cpus: 1,
        slice_us: 3000,
        placement: "spread",
        policy: "none",
        overcommit: 1,
        vms: vec![VmPlan {
            name: "vm".into(),
            vcpus: 1,
            cmdline: cmdline.to_string(),
        }],
        ideal: None,
    }
}

/// Measures everything; what fails is noted, not fatal.
pub fn measure(r: &Runner) -> Calibration {
    let mut c = Calibration::default();
    match r.run(&probe("bench", "test=bench"), "bench", 0, 1) {
        Ok(s) if s.status == 0 => {
            let khz = s.values.get("tsc_khz").copied().unwrap_or(0.0);
            if khz > 0.0 {
                let us = |cycles: f64| cycles * 1000.0 / khz;
                for (name, field) in [
                    ("guest_kernel_preempt_pair_us", "preempt_pair"),
                    ("guest_kernel_lock_unlock_us", "lock_uncontended"),
                    ("guest_hypercall_round_trip_us", "hc_yield_rtt"),
                    ("guest_clock_read_us", "clock_overhead"),
                ] {
                    if let Some(v) = s.values.get(field) {
                        c.figures.insert(name.into(), us(*v));
                    }
                }
            }
        }
        Ok(s) => c
            .notes
            .push(format!("test=bench ended with status {}", s.status)),
        Err(e) => c.notes.push(format!("test=bench: {e}")),
    }
    // The same two-instruction loop in kernel and in user mode (test=calibrate).
    match r.run(&probe("calibrate", "test=calibrate"), "calibrate", 0, 1) {
        Ok(s) if s.status == 0 => {
            for (name, field) in [
                ("guest_kernel_loop_iteration_ns", "kernel_loop_ns"),
                ("guest_user_loop_iteration_ns", "user_loop_ns"),
                ("guest_kernel_over_user", "kernel_over_user"),
            ] {
                if let Some(v) = s.values.get(field) {
                    c.figures.insert(name.into(), *v);
                }
            }
        }
        Ok(s) => c
            .notes
            .push(format!("test=calibrate ended with status {}", s.status)),
        Err(e) => c.notes.push(format!("test=calibrate: {e}")),
    }
    let (same, other) = (wake_us(true), wake_us(false));
    c.figures.insert("host_wake_same_cpu_us".into(), same);
    c.figures.insert("host_wake_other_cpu_us".into(), other);
    c
}

/// Pins the calling thread to host CPU `cpu` (best effort).
fn pin(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes inside it for cpu <
    // CPU_SETSIZE (checked), and sched_setaffinity only reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// Median time for a thread to run after another unparks it, in microseconds: both on one
/// host CPU, or on two. Only the two threads it makes are pinned: the caller's affinity, which
/// every later run inherits, is left alone.
fn wake_us(same_cpu: bool) -> f64 {
    const ROUNDS: usize = 200;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let target_cpu = if same_cpu || cores < 2 { 0 } else { 1 };
    let woke = Arc::new(AtomicBool::new(false));
    let w = Arc::clone(&woke);
    let stamp = Arc::new(std::sync::Mutex::new(Vec::with_capacity(ROUNDS)));
    let st = Arc::clone(&stamp);
    let sleeper = std::thread::spawn(move || {
        pin(target_cpu);
        for _ in 0..ROUNDS {
            while !w.swap(false, Ordering::AcqRel) {
                std::thread::park();
            }
            st.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Instant::now());
        }
    });
    let sleeper_thread = sleeper.thread().clone();
    let waker = std::thread::spawn(move || {
        pin(0);
        let mut samples = Vec::with_capacity(ROUNDS);
        for i in 0..ROUNDS {
            std::thread::sleep(Duration::from_micros(200));
            let t0 = Instant::now();
            woke.store(true, Ordering::Release);
            sleeper_thread.unpark();
            let t1 = loop {
                if let Some(t) = stamp.lock().unwrap_or_else(|e| e.into_inner()).get(i) {
                    break *t;
                }
                std::thread::yield_now();
            };
            samples.push(t1.saturating_duration_since(t0).as_secs_f64() * 1e6);
        }
        samples
    });
    let mut samples = waker.join().unwrap_or_default();
    let _ = sleeper.join();
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}
