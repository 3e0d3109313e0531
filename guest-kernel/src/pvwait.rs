//! `test=pvwait`: the guest names whom it waits for, and keeps the name current. Each test
//! makes CPUs hold and wait deterministically (flags, no sleeps), reads other CPUs' records
//! with `shared::snapshot`, bounds every wait generously, and prints `TEST <name> ok`,
//! `TEST <name> skipped: <why>` or `TEST <name> FAIL: <why>`, then
//! `RESULT pvwait passed=P failed=F skipped=S`.
//!
//! - `spin-holder-ticket`: a ticket waiter names the holder, and after the release the CPU
//!   that took the next ticket, before that CPU has taken the lock.
//! - `spin-holder-mcs`: an MCS waiter names the holder, and after a hand-off to the waiter
//!   ahead of it, the new holder.
//! - `ipi-wait-shrinks`: a shootdown sender's `ipi_wait` bitmap loses the bit of a target
//!   that acknowledged while another target is held off (KVM's PV TLB flush off for it, so
//!   that no target is left to KVM).
//! - `ipi-wait-ack`: `shared::ack_ipi_wait` clears exactly the acknowledger's bit, with the
//!   two targets as far apart as the CPUs allow (different bitmap words past 64 CPUs), and
//!   the count and the bitmap read as the ABI says around the wait.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use pvsync_boot_parse::cmdline::KvmUse;
use pvsync_guest::CpuSet;
use shared_abi::VcpuRecord;

use crate::arch::tsc;
use crate::locks::{McsLock, RawLock, SpinLock, TicketLock};
use crate::mm::aspace::AddressSpace;
use crate::sched::{self, Task};
use crate::{percpu, println, shared, smp};

/// Bound for events that must happen eventually (a vCPU of an overcommitted VM can be kept
/// off the CPU for long stretches): only a lost event exceeds it.
const EVENTUALLY_US: u64 = 10_000_000;

enum Verdict {
    Pass,
    Skip(&'static str),
    Fail(&'static str),
}

type PvTest = (&'static str, fn() -> Verdict);

static TICKET: SpinLock<(), TicketLock> = SpinLock::new(TicketLock::new(), ());
static MCS: SpinLock<(), McsLock> = SpinLock::new(McsLock::new(), ());

/// Spins (never yields: the caller may hold a lock) until `cond` holds; false on timeout.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tsc::now() + tsc::us_to_cycles(EVENTUALLY_US);
    while !cond() {
        if tsc::now() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn record(cpu: u32) -> Option<VcpuRecord> {
    shared::snapshot(cpu)
}

/// A consistent copy of `cpu`'s record, retried: a vCPU of an overcommitted VM (64 on two
/// host cores) can be kept off the CPU in the middle of an update for longer than one
/// snapshot's attempts.
fn settled_record(cpu: u32) -> Option<VcpuRecord> {
    let mut rec = None;
    eventually(|| {
        rec = record(cpu);
        rec.is_some()
    });
    rec
}

/// Whether `cpu` publishes "spinning on `lock`, held by `holder`".
fn names(cpu: u32, lock: u64, holder: u32) -> bool {
    record(cpu).is_some_and(|r| r.spin_lock == lock && r.spin_holder == holder)
}

/// The calling CPU and two others, if there are: the lowest and the highest of the others
/// (in different bitmap words past 64 CPUs).
fn three_cpus() -> Option<(u32, u32, u32)> {
    let me = percpu::id();
    let mut others = smp::online();
    others.remove(me);
    let (first, last) = (others.first_cpu()?, others.last_cpu()?);
    (first != last).then_some((me, first, last))
}

/// The CPUs `cpu` publishes it waits on (its `ipi_wait` bitmap) and its `ipi_wait_count`.
fn ipi_wait(cpu: u32) -> Option<(u32, CpuSet)> {
    shared::ipi_wait(cpu)
}

/// Flags the test threads and the main thread hand each other.
#[derive(Default)]
struct Flags {
    a: AtomicBool,
    b: AtomicBool,
    go: AtomicBool,
    done: AtomicBool,
}

fn ticket_holder_follows() -> Verdict {
    let Some((me, y, z)) = three_cpus() else {
        return Verdict::Skip("needs 3 CPUs");
    };
    let raw = TICKET.raw();
    let lock = raw as *const TicketLock as u64;
    let f = Arc::new(Flags::default());
    raw.lock();
    // Y takes the next ticket and sits on it: served but not yet taking the lock, as a vCPU
    // preempted between the release and its acquisition.
    let fy = f.clone();
    let ty = sched::spawn(y, "pvwait_y", move || {
        let t = TICKET.raw().take_ticket();
        fy.a.store(true, SeqCst);
        eventually(|| fy.go.load(SeqCst));
        TICKET.raw().wait_turn(t);
        fy.b.store(true, SeqCst);
        eventually(|| fy.done.load(SeqCst));
        TICKET.raw().unlock();
    });
    let mut verdict = Verdict::Pass;
    if !eventually(|| f.a.load(SeqCst)) {
        verdict = Verdict::Fail("the second CPU never took its ticket");
    }
    let tz = sched::spawn(z, "pvwait_z", || {
        TICKET.raw().lock();
        TICKET.raw().unlock();
    });
    if matches!(verdict, Verdict::Pass) && !eventually(|| names(z, lock, me)) {
        verdict = Verdict::Fail("a waiter did not name the holder");
    }
    raw.unlock();
    if matches!(verdict, Verdict::Pass) && !eventually(|| names(z, lock, y)) {
        verdict = Verdict::Fail("after the release a waiter did not name the next ticket's CPU");
    }
    f.go.store(true, SeqCst);
    if !eventually(|| f.b.load(SeqCst)) {
        verdict = Verdict::Fail("the next ticket's CPU never got the lock");
    }
    if matches!(verdict, Verdict::Pass)
        && !settled_record(z).is_some_and(|r| r.spin_lock == lock && r.spin_holder == y)
    {
        verdict = Verdict::Fail("a waiter stopped naming the holder");
    }
    f.done.store(true, SeqCst);
    sched::join(&ty);
    sched::join(&tz);
    // On this lock: what Z's CPU runs after the task (waking its joiner, going idle) may wait
    // on a kernel lock for a moment, and publish that.
    // (No consistent record counts as still waiting.)
    let still_waits = settled_record(z).is_none_or(|r| r.spin_lock == lock);
    if matches!(verdict, Verdict::Pass) && still_waits {
        verdict = Verdict::Fail("a CPU that got the lock still publishes a wait");
    }
    verdict
}

fn mcs_holder_follows() -> Verdict {
    let Some((me, y, z)) = three_cpus() else {
        return Verdict::Skip("needs 3 CPUs");
    };
    let raw = MCS.raw();
    let lock = raw as *const McsLock as u64;
    let f = Arc::new(Flags::default());
    raw.lock();
    let fy = f.clone();
    let ty = sched::spawn(y, "pvwait_y", move || {
        MCS.raw().lock();
        fy.b.store(true, SeqCst);
        eventually(|| fy.done.load(SeqCst));
        MCS.raw().unlock();
    });
    let mut verdict = Verdict::Pass;
    // Y is queued once it publishes its wait: Z then queues behind it.
    if !eventually(|| names(y, lock, me)) {
        verdict = Verdict::Fail("the first waiter did not name the holder");
    }
    let tz = sched::spawn(z, "pvwait_z", || {
        MCS.raw().lock();
        MCS.raw().unlock();
    });
    if matches!(verdict, Verdict::Pass) && !eventually(|| names(z, lock, me)) {
        verdict = Verdict::Fail("the second waiter did not name the holder");
    }
    // Hand-off to Y: Z, still queued, must name Y now.
    raw.unlock();
    if !eventually(|| f.b.load(SeqCst)) {
        verdict = Verdict::Fail("the first waiter never got the lock");
    }
    if matches!(verdict, Verdict::Pass) && !eventually(|| names(z, lock, y)) {
        verdict = Verdict::Fail("after the hand-off the waiter did not name the new holder");
    }
    f.done.store(true, SeqCst);
    sched::join(&ty);
    sched::join(&tz);
    verdict
}

/// A kernel thread on `cpu` with `aspace` loaded (so shootdowns of it target `cpu`).
fn spawn_in(cpu: u32, aspace: &Arc<AddressSpace>, f: impl FnOnce() + Send + 'static) -> Arc<Task> {
    let t = Task::new("pvwait_as", cpu, Box::new(f), Some(aspace.clone()), false);
    sched::enqueue(t.clone());
    t
}

fn ipi_wait_shrinks() -> Verdict {
    let Some((me, a, b)) = three_cpus() else {
        return Verdict::Skip("needs 3 CPUs");
    };
    let aspace = Arc::new(AddressSpace::new());
    let f = Arc::new(Flags::default());
    // What B saw of the sender's ipi_wait: 0 nothing yet, 1 only B's bit, 2 timed out.
    let seen = Arc::new(AtomicU8::new(0));
    let fa = f.clone();
    let ta = spawn_in(a, &aspace, move || {
        // Interrupts on: the TLB IPI is acknowledged at once by its handler.
        fa.a.store(true, SeqCst);
        eventually(|| fa.done.load(SeqCst));
    });
    let (fb, sb) = (f.clone(), seen.clone());
    let tb = spawn_in(b, &aspace, move || {
        // Interrupts off: B cannot take the IPI, so its acknowledgement waits until it
        // has watched the sender's ipi_wait lose A's bit.
        x86_64::instructions::interrupts::disable();
        fb.b.store(true, SeqCst);
        let only_b = eventually(|| ipi_wait(me).is_some_and(|(n, s)| n == 2 && s.iter().eq([b])));
        sb.store(if only_b { 1 } else { 2 }, SeqCst);
        x86_64::instructions::interrupts::enable();
        eventually(|| fb.done.load(SeqCst));
    });
    let both = |s: pvsync_guest::CpuSet| s.contains(a) && s.contains(b);
    let mut verdict = Verdict::Pass;
    if !eventually(|| f.a.load(SeqCst) && f.b.load(SeqCst) && both(aspace.cpus())) {
        verdict = Verdict::Fail("the targets never had the address space loaded");
    } else {
        // Every target must get its IPI: a preempted one left to KVM (PV TLB flush) would
        // never appear in ipi_wait.
        let reached = crate::kvm::without(KvmUse::PVTLB, || {
            crate::tlb::shootdown_reaching(&aspace, crate::user::USER_DATA_VA, 1)
        });
        if !both(reached) {
            verdict = Verdict::Fail("the shootdown did not target both CPUs");
        } else if seen.load(SeqCst) != 1 {
            verdict = Verdict::Fail("ipi_wait kept the bit of a CPU that acknowledged");
        } else if ipi_wait(me) != Some((0, CpuSet::new())) {
            verdict = Verdict::Fail("ipi_wait not empty after the shootdown");
        }
    }
    f.done.store(true, SeqCst);
    sched::join(&ta);
    sched::join(&tb);
    verdict
}

fn ipi_wait_ack() -> Verdict {
    let Some((me, x, y)) = three_cpus() else {
        return Verdict::Skip("needs 3 CPUs");
    };
    let targets: CpuSet = [x, y].into_iter().collect();
    let only_y: CpuSet = [y].into_iter().collect();
    shared::set_ipi_wait(&targets);
    let before = ipi_wait(me);
    shared::ack_ipi_wait(me, x);
    let after_x = ipi_wait(me);
    shared::ack_ipi_wait(me, y);
    let after_y = ipi_wait(me);
    shared::end_ipi_wait(&targets);
    let ended = ipi_wait(me);
    if before != Some((2, targets)) {
        Verdict::Fail("set_ipi_wait not published")
    } else if after_x != Some((2, only_y)) {
        Verdict::Fail("an acknowledgement cleared the wrong bits")
    } else if after_y != Some((2, CpuSet::new())) {
        Verdict::Fail("the last acknowledgement left bits set")
    } else if ended != Some((0, CpuSet::new())) {
        Verdict::Fail("the end of the wait left its count or bits")
    } else {
        Verdict::Pass
    }
}

/// Runs every pvwait test; true if none failed.
pub fn run() -> bool {
    let tests: [PvTest; 4] = [
        ("spin-holder-ticket", ticket_holder_follows),
        ("spin-holder-mcs", mcs_holder_follows),
        ("ipi-wait-shrinks", ipi_wait_shrinks),
        ("ipi-wait-ack", ipi_wait_ack),
    ];
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, test) in tests {
        match test() {
            Verdict::Pass => {
                passed += 1;
                println!("TEST {name} ok");
            }
            Verdict::Skip(why) => {
                skipped += 1;
                println!("TEST {name} skipped: {why}");
            }
            Verdict::Fail(why) => {
                failed += 1;
                println!("TEST {name} FAIL: {why}");
            }
        }
    }
    println!("RESULT pvwait passed={passed} failed={failed} skipped={skipped}");
    failed == 0
}
