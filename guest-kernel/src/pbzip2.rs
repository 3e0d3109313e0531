//! `test=pbzip2`: parallel block compression in user mode, in the manner of pbzip2, with the
//! kernel as its reader and writer.
//!
//! One address space, one worker task per CPU (`threads=N` overrides), each running the Rust
//! program `pvsync_user::pbzip2::worker` at CPL 3, where it is linked (the user image,
//! docs/design.md "Rust user programs"). `work=N` blocks of `BLOCK_BYTES` in all (seeded by
//! `seed=`): a worker asks for a block with `SYS_PBZIP2_NEXT`, which reports its previous
//! block, unmaps that block's window (input and output pages) and shoots it down on every
//! other CPU of the address space, where the other workers are mostly computing in user
//! mode, then maps the worker's other window for the next block. The worker generates the
//! block, compresses it (LZSS), decompresses it into a buffer of its own and compares.
//!
//! Each shootdown is timed with the TSC around `tlb::shootdown`; the `RESULT` line gives
//! their p50, p99 and maximum. Guest kernel code is emulated on the nested hosts this runs
//! on (docs: kvm-paravirt-facts), so the kernel's share of a block (mapping, unmapping, the
//! shootdown's IPIs and acknowledgements) costs far more here than on hardware KVM, and the
//! user-mode share about the same.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use pvsync_user::pbzip2 as program;
use pvsync_user::sys::SYS_PBZIP2_NEXT;
use spin::Once;
use x86_64::structures::paging::PhysFrame;

use crate::arch::tsc;
use crate::locks::{KernelLock, SpinLock};
use crate::mm::aspace::AddressSpace;
use crate::mm::frame::StaticFrame;
use crate::torture::{self, StartGate};
use crate::user::{self, EINVAL, ENOMEM};
use crate::{println, sched, tlb};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 32 * 1024;
/// Blocks when `work=` is not given: about 1-3 s with 4 vCPUs at 1:1 on the nested hosts
/// this runs on.
pub const DEFAULT_WORK: u64 = 40;
/// Most workers: one per CPU the kernel can have (4 MiB of user space each, 4 GiB at 1024).
const MAX_WORKERS: usize = pvsync_guest::NR_CPUS;
const _: () = assert!(program::worker_base(MAX_WORKERS as u64) <= crate::mm::aspace::USER_END);

/// What the kernel keeps per worker.
struct Worker {
    /// The worker's task (0 until spawned): only it may make the worker's calls.
    task: AtomicU64,
    state: KernelLock<WorkerState>,
}

#[derive(Default)]
struct WorkerState {
    /// Blocks handed out so far (which window is next).
    seq: u64,
    /// The window mapped now, if any.
    mapped: Option<u64>,
    /// The frames behind a window (mapped there, or waiting for the next one).
    pool: Vec<PhysFrame>,
    /// TSC cycles of the shootdowns this worker's calls made (the first
    /// [`MAX_SAMPLES`]: bounded memory whatever `work=`), and how many there were.
    shootdowns: Vec<u64>,
    shootdown_count: u64,
    verified: u64,
    failed: u64,
    out_bytes: u64,
}

/// Shootdown latencies kept per worker.
const MAX_SAMPLES: usize = 1 << 16;

// The windows lie where only this workload's system call maps and unmaps.
const _: () = assert!(program::REGION >= crate::user::USER_WORKLOAD_VA);

struct Run {
    aspace: Arc<AddressSpace>,
    block_bytes: usize,
    work: u64,
    /// The next block to hand out.
    next: AtomicU64,
    workers: Vec<Worker>,
}

/// The run in progress (one per boot).
static RUN: Once<Run> = Once::new();

/// `SYS_PBZIP2_NEXT(w | status << 32, compressed_len)`: see `pvsync_user::pbzip2`.
fn syscall(nr: u64, a0: u64, a1: u64) -> u64 {
    if nr != SYS_PBZIP2_NEXT {
        return EINVAL;
    }
    let Some(run) = RUN.get() else {
        return EINVAL;
    };
    let Some(worker) = run.workers.get((a0 & 0xffff) as usize) else {
        return EINVAL;
    };
    if worker.task.load(Relaxed) != sched::current().id {
        return EINVAL;
    }
    let w = a0 & 0xffff;
    let status = a0 >> 32;
    let pages = program::window_pages(run.block_bytes);
    // The state is taken out, so that no lock is held across the shootdown's wait.
    let (mapped, mut pool, seq) = {
        let mut st = worker.state.lock();
        (st.mapped.take(), core::mem::take(&mut st.pool), st.seq)
    };
    let mut cycles = None;
    if let Some(va) = mapped {
        pool.clear();
        let unmapped = run.aspace.unmap_range(va, pages, &mut pool);
        // Shot down whatever happened: a page unmapped above must leave every TLB before
        // its frame goes back to the pool.
        let t0 = tsc::now();
        tlb::shootdown(&run.aspace, va, pages);
        cycles = Some(tsc::now() - t0);
        if unmapped.is_err() {
            // The window was not whole (the generic calls cannot reach it: `user::page_arg`),
            // so the worker's state is not to be trusted: it fails.
            let mut st = worker.state.lock();
            st.pool = pool;
            st.failed += 1;
            return EINVAL;
        }
    }
    let index = run.next.fetch_add(1, Relaxed);
    let next = (index < run.work).then(|| program::window_va(w, seq));
    let mut mapped_ok = true;
    if let Some(va) = next {
        if run.aspace.map_range(va, &pool, true).is_err() {
            // Undone before the frames go back: nothing may stay mapped from a pool frame.
            let mut back = Vec::with_capacity(pool.len());
            let _ = run.aspace.unmap_range(va, pages, &mut back);
            tlb::shootdown(&run.aspace, va, pages);
            mapped_ok = false;
        }
    }
    let mut st = worker.state.lock();
    st.pool = pool;
    if let Some(c) = cycles {
        st.shootdown_count += 1;
        if st.shootdowns.len() < MAX_SAMPLES {
            st.shootdowns.push(c);
        }
    }
    // A status reports on the block that was mapped: none, none to count.
    let limit = program::max_compressed(run.block_bytes) as u64;
    match status {
        program::STATUS_OK if mapped.is_some() && a1 <= limit => {
            st.verified += 1;
            st.out_bytes = st.out_bytes.saturating_add(a1);
        }
        _ if mapped.is_some() && status != program::STATUS_NONE => st.failed += 1,
        _ => {}
    }
    if !mapped_ok {
        st.failed += 1;
        return ENOMEM;
    }
    match next {
        Some(va) => {
            st.mapped = Some(va);
            st.seq = seq + 1;
            index
        }
        None => program::DONE,
    }
}

/// The `q`-th percentile (0..=100) of sorted `v` (nearest rank below).
fn percentile(v: &[u64], q: usize) -> u64 {
    v.get((v.len().saturating_sub(1)) * q / 100)
        .copied()
        .unwrap_or(0)
}

fn us(cycles: u64) -> f64 {
    tsc::cycles_to_ns(cycles) as f64 / 1000.0
}

/// Runs the workload: `workers` user tasks, `work` blocks of `block_bytes`, input seeded by
/// `seed`. Prints the RESULT line; true if every block round-tripped.
pub fn run(workers: usize, work: u64, block_bytes: usize, seed: u64) -> bool {
    if workers == 0 || workers > MAX_WORKERS || block_bytes > program::MAX_BLOCK_BYTES {
        println!(
            "FAILURE: pbzip2 runs 1..={MAX_WORKERS} workers and blocks of at most {} bytes",
            program::MAX_BLOCK_BYTES
        );
        return false;
    }
    let (start, end) = crate::arch::user::image();
    let entry = program::worker as *const () as u64;
    if !(start..end).contains(&entry) {
        println!("FAILURE: pbzip2: the worker ({entry:#x}) is not in the user image {start:#x}..{end:#x}");
        return false;
    }
    let pages = program::window_pages(block_bytes);
    let stack_pages = program::STACK_BYTES / program::PAGE;
    let scratch_pages = program::in_pages(block_bytes);
    // Per worker: its window's frames, stack, decompression buffer and page tables.
    let frames = workers as u64 * (pages + stack_pages + scratch_pages + 4);
    if !torture::fits("pbzip2", workers, 0, frames) {
        return false;
    }
    let aspace = Arc::new(AddressSpace::new());
    let mut ws = Vec::with_capacity(workers);
    for w in 0..workers as u64 {
        let base = program::worker_base(w);
        let stack = (0..stack_pages).map(|i| base + program::STACK_OFFSET + i * program::PAGE);
        let scratch = (0..scratch_pages).map(|i| program::scratch_va(w) + i * program::PAGE);
        for va in stack.chain(scratch) {
            if user::map_zeroed(&aspace, va, true).is_err() {
                println!("FAILURE: pbzip2: no frame for worker {w}'s stack or buffer; give the VM more memory (--mem)");
                return false;
            }
        }
        let mut pool = Vec::with_capacity(pages as usize);
        for _ in 0..pages {
            match StaticFrame::alloc() {
                Some(f) => {
                    let frame = f.frame();
                    // User mode reads these: not what the frame held before.
                    f.zero();
                    pool.push(frame);
                }
                None => {
                    println!("FAILURE: pbzip2: no frame for worker {w}'s window; give the VM more memory (--mem)");
                    return false;
                }
            }
        }
        ws.push(Worker {
            task: AtomicU64::new(0),
            state: SpinLock::kernel(WorkerState {
                pool,
                ..WorkerState::default()
            }),
        });
    }
    let mut fresh = false;
    let run = RUN.call_once(|| {
        fresh = true;
        Run {
            aspace: aspace.clone(),
            block_bytes,
            work,
            next: AtomicU64::new(0),
            workers: ws,
        }
    });
    if !fresh {
        println!("FAILURE: pbzip2 runs once per boot");
        return false;
    }
    user::set_workload_syscall(syscall);

    // The workers wait in the kernel until all exist (see torture::StartGate).
    let gate = StartGate::new();
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let g = gate.clone();
        let arg0 = w as u64 | (block_bytes as u64) << 32;
        match user::try_spawn_at(
            torture::cpu_for(w),
            "pbzip2",
            aspace.clone(),
            entry,
            // As after a call: the entry point expects rsp = 8 (mod 16).
            program::stack_top(w as u64) - 8,
            (arg0, seed),
            move || g.wait(),
        ) {
            Ok(t) => {
                run.workers[w].task.store(t.id, Relaxed);
                tasks.push(t);
            }
            Err(why) => {
                // Those started find no blocks left.
                run.next.store(work, Relaxed);
                gate.open();
                tasks.iter().for_each(|t| {
                    sched::join(t);
                });
                println!("FAILURE: pbzip2: worker {w} of {workers} could not start: {why}; give the VM more memory (--mem)");
                return false;
            }
        }
    }
    let t0 = tsc::now();
    gate.open();
    let codes: Vec<u64> = tasks.iter().map(sched::join).collect();
    let elapsed_us = tsc::cycles_to_ns(tsc::now() - t0) / 1000;

    let (mut verified, mut failed, mut out_bytes, mut shootdowns) = (0, 0, 0u64, 0);
    let mut sd = Vec::new();
    for w in &run.workers {
        let st = w.state.lock();
        verified += st.verified;
        failed += st.failed;
        out_bytes = out_bytes.saturating_add(st.out_bytes);
        shootdowns += st.shootdown_count;
        sd.extend_from_slice(&st.shootdowns);
    }
    sd.sort_unstable();
    let bad_exits = codes.iter().filter(|&&c| c != 0).count();
    let in_bytes = (verified + failed) * block_bytes as u64;
    let per_s = work as f64 * 1e6 / elapsed_us.max(1) as f64;
    println!(
        "RESULT pbzip2 workers={workers} blocks={work} block_bytes={block_bytes} elapsed_us={elapsed_us} blocks_per_s={per_s:.1} in_bytes={in_bytes} out_bytes={out_bytes} shootdowns={} sd_p50_us={:.1} sd_p99_us={:.1} sd_max_us={:.1} verified={verified}",
        shootdowns,
        us(percentile(&sd, 50)),
        us(percentile(&sd, 99)),
        us(sd.last().copied().unwrap_or(0)),
    );
    if verified != work || bad_exits != 0 {
        println!(
            "FAILURE: pbzip2: {verified} of {work} blocks round-tripped ({failed} did not); {bad_exits} workers exited abnormally (codes {codes:?})"
        );
        return false;
    }
    true
}
