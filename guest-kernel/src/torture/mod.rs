//! Torture suites, selected by `test=`: each prints its own summary, a `RESULT` line, and
//! returns whether it passed (the caller prints SUCCESS or FAILURE and exits accordingly).

pub mod lock;
pub mod rcu;
pub mod tlb;

use alloc::sync::Arc;
use alloc::vec::Vec;

use core::sync::atomic::{AtomicBool, Ordering};

use crate::mm::{frame, heap};
use crate::sched::task::{OutOfHeap, TASK_HEAP_BYTES};
use crate::sched::{self, Task, WaitQueue};

const KIB: u64 = 1024;

/// Online CPUs, in order.
pub fn cpus() -> Vec<u32> {
    crate::smp::online().iter().collect()
}

/// The CPU for the i-th worker: round-robin over the online CPUs.
pub fn cpu_for(i: usize) -> u32 {
    let c = cpus();
    c[i % c.len()]
}

/// Heap kept spare when judging whether a suite fits: the first-fit heap fragments, and the
/// kernel keeps allocating (callbacks, queues) while the suite runs.
fn spare_heap(free: u64) -> u64 {
    free / 8 + 256 * KIB
}

/// Frames kept spare likewise (page tables the suite's mappings add).
const SPARE_FRAMES: u64 = 64;

/// Whether `threads` tasks of `suite`, `extra_heap` more heap bytes and `frames` page frames
/// fit in what is free now. If not, prints a FAILURE line that says what is missing, so that
/// a VM too small for the suite fails with the reason, not with an allocation panic halfway.
pub fn fits(suite: &str, threads: usize, extra_heap: u64, frames: u64) -> bool {
    let need = threads as u64 * TASK_HEAP_BYTES + extra_heap;
    let (_, free) = heap::stats();
    let avail = free.saturating_sub(spare_heap(free));
    if need > avail {
        crate::println!(
            "FAILURE: {suite} with {threads} threads needs ~{} KiB of kernel heap, only {} KiB available; give the VM more memory (--mem)",
            need.div_ceil(KIB),
            avail / KIB
        );
        return false;
    }
    let (total, in_use) = frame::stats();
    let avail = total.saturating_sub(in_use).saturating_sub(SPARE_FRAMES);
    if frames > avail {
        crate::println!(
            "FAILURE: {suite} with {threads} threads needs ~{} KiB of free page frames, only {} KiB available; give the VM more memory (--mem)",
            frames * frame::FRAME_SIZE / KIB,
            avail * frame::FRAME_SIZE / KIB
        );
        return false;
    }
    true
}

/// Spawns `n` tasks with `spawn(i)`. Should the heap run out all the same (`fits` is an
/// estimate), calls `stop`, joins the tasks already started, says so, and returns None.
pub fn spawn_all(
    suite: &str,
    n: usize,
    mut spawn: impl FnMut(usize) -> Result<Arc<Task>, OutOfHeap>,
    stop: impl FnOnce(),
) -> Option<Vec<Arc<Task>>> {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        match spawn(i) {
            Ok(t) => tasks.push(t),
            Err(OutOfHeap) => {
                stop();
                for t in &tasks {
                    sched::join(t);
                }
                let (size, free) = heap::stats();
                crate::println!(
                    "FAILURE: {suite}: the kernel heap ran out after {i} of {n} threads ({} of {} KiB free); give the VM more memory (--mem)",
                    free / KIB,
                    size / KIB
                );
                return None;
            }
        }
    }
    Some(tasks)
}

/// Where a suite's workers wait, blocked (their CPUs idle), until every worker exists; the
/// controller then opens it and, as before, decides alone when the suite stops (its monitor,
/// the starvation grace, the rest epochs). Workers started one by one would hammer the lock,
/// run readers or spin in user mode while the controller still spawns the rest, leaving the
/// controller's vCPU little host time (at 64 vCPUs spawning took many seconds, or never
/// finished where a worker shared the controller's CPU).
pub struct StartGate {
    open: AtomicBool,
    /// The controller's CPU: its workers are woken last, so that none of them starts
    /// spinning there while the controller still wakes the others.
    home: u32,
    waiters: WaitQueue,
    waiters_at_home: WaitQueue,
}

impl StartGate {
    /// A gate opened by the calling task.
    pub fn new() -> Arc<StartGate> {
        Arc::new(StartGate {
            open: AtomicBool::new(false),
            home: crate::percpu::id(),
            waiters: WaitQueue::new(),
            waiters_at_home: WaitQueue::new(),
        })
    }

    /// Blocks until the gate opens.
    pub fn wait(&self) {
        let q = if crate::percpu::id() == self.home {
            &self.waiters_at_home
        } else {
            &self.waiters
        };
        q.wait_until(|| self.open.load(Ordering::Acquire));
    }

    /// Lets the workers go.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.waiters.wake_all();
        self.waiters_at_home.wake_all();
    }
}
