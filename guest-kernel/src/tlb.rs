//! TLB shootdown. Changing a user mapping flushes it locally and sends an IPI to exactly the
//! other CPUs in the address space's CPU set; each target flushes and clears its bit in the
//! sender's request; the sender waits for every bit.
//!
//! One request slot per sender (a sender waits for its request before making another). While
//! waiting, a sender publishes whom it waits for (`ipi_wait`, which each target's
//! acknowledgement shrinks), keeps serving requests aimed at itself (two CPUs shooting each
//! other down at once cannot deadlock), and past a spin threshold makes a yield hypercall
//! naming a CPU that still owes an acknowledgement.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use shared_abi::MAX_VCPUS;
use x86_64::instructions::tlb;
use x86_64::VirtAddr;

use crate::arch::idt::{self, TrapFrame};
use crate::arch::{apic, tsc, vectors};
use crate::mm::aspace::AddressSpace;
use crate::{percpu, shared};

/// Ranges longer than this are flushed whole (CR3 reload) rather than page by page.
pub const FULL_FLUSH_PAGES: u64 = 32;
/// Spin this long for acknowledgements before offering the CPU to a laggard.
const SPIN_THRESHOLD_US: u64 = 50;

struct Request {
    start: AtomicU64,
    /// 0 = flush everything.
    pages: AtomicU64,
    /// Targets that have not acknowledged yet.
    pending: AtomicU64,
}

static REQUESTS: [Request; MAX_VCPUS] = [const {
    Request {
        start: AtomicU64::new(0),
        pages: AtomicU64::new(0),
        pending: AtomicU64::new(0),
    }
}; MAX_VCPUS];
/// Bit `s` of `INBOX[t]`: sender `s` has published a request with target `t` (set after its
/// `pending`). A CPU finds its requests without scanning every slot: `serve_requests` runs
/// in every spinlock's slow path, and usually finds nothing.
static INBOX: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];

static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
/// CR3 reloads per CPU (each drops every non-global translation). With the set of CPUs a
/// shootdown reached, lets a test check the protocol even where the hypervisor hides stale
/// translations (shadow paging).
static CR3_RELOADS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static YIELDS: AtomicU64 = AtomicU64::new(0);
/// Negative control (`tlb=skip`): leave out one target of every shootdown.
static SKIP_ONE_TARGET: AtomicBool = AtomicBool::new(false);

pub fn set_skip_one_target(on: bool) {
    SKIP_ONE_TARGET.store(on, SeqCst);
}

/// (shootdowns sent, yield hypercalls made while waiting).
pub fn stats() -> (u64, u64) {
    (SHOOTDOWNS.load(SeqCst), YIELDS.load(SeqCst))
}

/// CR3 reloads on `cpu` so far.
pub fn cr3_reloads(cpu: u32) -> u64 {
    CR3_RELOADS[cpu as usize].load(SeqCst)
}

/// A CR3 load (which drops every non-global translation) on this CPU.
pub fn note_cr3_reload() {
    CR3_RELOADS[percpu::id() as usize].fetch_add(1, SeqCst);
}

fn flush_local(start: u64, pages: u64) {
    if pages == 0 || pages > FULL_FLUSH_PAGES {
        tlb::flush_all();
    } else {
        for i in 0..pages {
            tlb::flush(VirtAddr::new(start + i * 4096));
        }
    }
}

/// Serves every request aimed at this CPU. Safe anywhere (any lock's slow path, interrupts
/// on or off): flushing and acknowledging never wait for anything, and take no lock.
pub fn serve_requests() {
    let me = percpu::id();
    let inbox = &INBOX[me as usize];
    // Nothing announced: the usual case, one load. An announcement racing with this load
    // comes with an IPI, served in the handler.
    if inbox.load(SeqCst) == 0 {
        return;
    }
    // Interrupts off: a TLB IPI nesting in here could serve and acknowledge the request this
    // loop is reading, and this loop would then acknowledge the sender's next one unflushed.
    let give_back = x86_64::instructions::interrupts::without_interrupts(|| {
        let mut give_back = None;
        let bit = 1u64 << me;
        // A sender announces after publishing `pending`, so a bit taken here finds its
        // request; one announced after the swap is found next time (or by its IPI).
        let senders = inbox.swap(0, SeqCst);
        for sender in (0..MAX_VCPUS).filter(|s| senders & (1 << s) != 0) {
            let r = &REQUESTS[sender];
            if r.pending.load(SeqCst) & bit != 0 {
                flush_local(r.start.load(SeqCst), r.pages.load(SeqCst));
                // The sender's published bit first, `pending` last: once `pending` is 0 the
                // sender may publish its next shootdown's set, which a late clear of this
                // one must never touch.
                shared::ack_ipi_wait(sender as u32, me);
                r.pending.fetch_and(!bit, SeqCst);
                if shared::lent_by(percpu::this()) == Some(sender as u32) {
                    give_back = Some(sender as u32);
                }
            }
        }
        give_back
    });
    // A turn the sender lent us (it yielded to us while waiting for this acknowledgement)
    // goes back to it once every request found here is served, with interrupts as they
    // were (ABI v4).
    // Not while the interrupted code holds a lock: queued, this vCPU would hold up whoever
    // waits for that lock.
    if let Some(lender) = give_back.filter(|_| percpu::this().locks_held() == 0) {
        shared::yield_to(lender);
    }
}

fn ipi(_: &mut TrapFrame) {
    serve_requests();
}

pub fn install_handler() {
    idt::register(vectors::TLB_SHOOTDOWN, ipi);
}

/// Flushes `pages` pages from `start` (0 pages: everything) of `aspace` on every CPU that
/// may cache them, and returns once all have done so. Returns the CPUs that flushed.
pub fn shootdown(aspace: &AddressSpace, start: u64, pages: u64) -> u64 {
    percpu::preempt_disable();
    let me = percpu::id();
    // The PTE change (a plain store) must be visible before the CPU set is read: a CPU that
    // joins later then walks the new PTE. x86 lets a load pass an earlier store; mfence.
    core::sync::atomic::fence(SeqCst);
    let cpus = aspace.cpus();
    if cpus & (1 << me) != 0 {
        flush_local(start, pages);
    }
    let mut targets = cpus & !(1 << me);
    if SKIP_ONE_TARGET.load(SeqCst) && targets != 0 {
        targets &= !(1 << (63 - targets.leading_zeros()));
    }
    if targets != 0 {
        send_and_wait(me, targets, start, pages);
    }
    percpu::preempt_enable();
    (cpus & (1 << me)) | targets
}

fn send_and_wait(me: u32, targets: u64, start: u64, pages: u64) {
    let r = &REQUESTS[me as usize];
    // Published before any target can see the request, so each acknowledgement shrinks it.
    shared::set_ipi_wait(targets);
    r.start.store(start, SeqCst);
    r.pages.store(pages, SeqCst);
    r.pending.store(targets, SeqCst);
    SHOOTDOWNS.fetch_add(1, SeqCst);
    for cpu in (0..MAX_VCPUS as u32).filter(|c| targets & (1 << c) != 0) {
        INBOX[cpu as usize].fetch_or(1 << me, SeqCst);
        apic::send_ipi(cpu, vectors::TLB_SHOOTDOWN);
    }
    let threshold = tsc::us_to_cycles(SPIN_THRESHOLD_US);
    let mut since = tsc::now();
    loop {
        let pending = r.pending.load(SeqCst);
        if pending == 0 {
            break;
        }
        serve_requests();
        if tsc::now() - since > threshold {
            YIELDS.fetch_add(1, SeqCst);
            shared::yield_to(pending.trailing_zeros());
            since = tsc::now();
        }
        core::hint::spin_loop();
    }
    // Every target cleared its bit already; this only drops what a hostile scribble left.
    shared::set_ipi_wait(0);
}

/// Round trip of one ping IPI to `target`, in TSC cycles (for benchmarks and tests).
pub fn ping_round_trip(target: u32) -> u64 {
    let before = crate::irq::pings(target);
    let t0 = tsc::now();
    apic::send_ipi(target, vectors::PING);
    while crate::irq::pings(target) == before {
        core::hint::spin_loop();
    }
    tsc::now() - t0
}
