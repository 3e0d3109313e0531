//! The platform the models run on: one loom thread per CPU.
//!
//! A halt waits for an interrupt sent to its CPU. When no CPU is left awake that could send
//! one, the halt ends anyway and counts a lost wake-up: in a kernel the waiter would sleep
//! until some unrelated interrupt (a tick) came, and the models assert that this never
//! happens, rather than relying on a tick.

use std::cell::{Cell, RefCell};
use std::prelude::rust_2021::*;
use std::rc::Rc;

use loom::sync::atomic::{AtomicU64, AtomicU8};
use shared_abi::kvm_para::{KVM_VCPU_FLUSH_TLB, KVM_VCPU_PREEMPTED};

use crate::cpu::CpuSync;
use crate::platform::{FlushRange, Ipi, Platform, Wake};
use crate::sync::Ordering::SeqCst;

/// One execution's machine.
pub(crate) struct World {
    cpus: Vec<&'static CpuSync>,
    /// A CPU's pending interrupt: sent by `send_ipi`, consumed by a halt. Not a memory
    /// location, so not a loom atomic: what the woken CPU may see of the sender's stores is
    /// up to the protocol's own fences, as on hardware.
    interrupts: Vec<Cell<bool>>,
    /// CPUs neither halted nor finished: those that could still send an interrupt.
    awake: Cell<usize>,
    halted: Vec<Cell<bool>>,
    /// Halts that ended with no CPU left awake to end them: only a timer tick would have
    /// woken these waiters (a lost wake-up).
    pub(crate) lost_wakeups: Cell<u32>,
    preempt_count: Vec<Cell<u32>>,
    irqs_on: Vec<Cell<bool>>,
    clock: Cell<u64>,
    /// What each CPU's TLB caches for the one page the TLB model remaps (0: nothing).
    pub(crate) tlb: Vec<AtomicU64>,
    /// Interrupts sent to each CPU (kicks), for the assertions.
    pub(crate) ipis: Vec<Cell<u32>>,
    /// Each CPU's KVM steal-time `preempted` byte: the host sets `KVM_VCPU_PREEMPTED` when
    /// it takes the CPU off, KVM exchanges it for 0 at the next entry (see
    /// [`host_deschedules`] and [`kvm_enters`]).
    pub(crate) steal_preempted: Vec<AtomicU8>,
}

std::thread_local! {
    /// The execution's machine (loom runs every thread of a model on the test's OS thread).
    static WORLD: RefCell<Option<Rc<World>>> = const { RefCell::new(None) };
}

loom::thread_local! {
    /// The CPU the calling loom thread plays.
    static ME: Cell<usize> = Cell::new(0);
}

impl World {
    /// No CPU runs, and no halted CPU has an interrupt pending that will wake it: every
    /// halted CPU waits for good.
    fn nobody_can_wake(&self) -> bool {
        self.awake.get() == 0
            && (0..self.cpus.len()).all(|c| !self.halted[c].get() || !self.interrupts[c].get())
    }
}

/// Builds the machine for one execution with `n` CPUs; the calling thread is CPU 0.
pub(crate) fn boot(n: usize) -> Rc<World> {
    // As a kernel does at boot: an atomic CPU set's whole-set operations then touch one
    // word, not every word of NR_CPUS (each is a step loom explores).
    crate::cpuset::set_nr_cpu_ids(n);
    let cpus = (0..n)
        .map(|i| {
            // Leaked: a CPU's block lives as long as the kernel. A few hundred bytes per
            // execution.
            let c: &'static CpuSync = Box::leak(Box::new(CpuSync::new()));
            c.init(i as u32);
            c
        })
        .collect();
    let w = Rc::new(World {
        cpus,
        interrupts: (0..n).map(|_| Cell::new(false)).collect(),
        awake: Cell::new(n),
        halted: (0..n).map(|_| Cell::new(false)).collect(),
        lost_wakeups: Cell::new(0),
        preempt_count: (0..n).map(|_| Cell::new(0)).collect(),
        irqs_on: (0..n).map(|_| Cell::new(true)).collect(),
        clock: Cell::new(0),
        tlb: (0..n).map(|_| AtomicU64::new(0)).collect(),
        ipis: (0..n).map(|_| Cell::new(0)).collect(),
        steal_preempted: (0..n).map(|_| AtomicU8::new(0)).collect(),
    });
    WORLD.with(|cell| *cell.borrow_mut() = Some(w.clone()));
    become_cpu(0);
    w
}

/// Runs `f` as CPU `cpu` on a new loom thread; the CPU counts as awake until `f` returns.
pub(crate) fn spawn_cpu<T: 'static>(
    cpu: usize,
    f: impl FnOnce() -> T + 'static,
) -> loom::thread::JoinHandle<T> {
    loom::thread::spawn(move || {
        become_cpu(cpu);
        let r = f();
        let w = world();
        w.awake.set(w.awake.get() - 1);
        r
    })
}

/// CPU 0 stops sending interrupts (it is about to wait for the other CPUs' threads).
pub(crate) fn retire_boot_cpu() {
    let w = world();
    w.awake.set(w.awake.get() - 1);
}

/// The host takes the calling CPU off its physical CPU (it runs no guest code until
/// [`kvm_enters`]): our VMM or-s `KVM_VCPU_PREEMPTED` into its steal-time byte.
pub(crate) fn host_deschedules() {
    world().steal_preempted[me()].fetch_or(KVM_VCPU_PREEMPTED, SeqCst);
}

/// KVM enters the calling CPU again: exchanges its steal-time byte for 0 and flushes its
/// TLB first if a sender asked.
pub(crate) fn kvm_enters() {
    let w = world();
    if w.steal_preempted[me()].swap(0, SeqCst) & KVM_VCPU_FLUSH_TLB != 0 {
        w.tlb[me()].store(0, SeqCst);
    }
}

/// Makes the calling loom thread play CPU `i`.
pub(crate) fn become_cpu(i: usize) {
    ME.with(|m| m.set(i));
}

pub(crate) fn world() -> Rc<World> {
    WORLD.with(|cell| {
        cell.borrow()
            .clone()
            .expect("model platform used before boot")
    })
}

fn me() -> usize {
    ME.with(|m| m.get())
}

/// The models' platform.
pub(crate) struct Model;

// SAFETY: each loom thread plays one CPU (`become_cpu`) and gets that CPU's block; the
// model has no preemption (a thread stays its CPU).
unsafe impl Platform for Model {
    fn cpu() -> &'static CpuSync {
        world().cpus[me()]
    }

    fn preempt_disable() {
        let w = world();
        let c = &w.preempt_count[me()];
        c.set(c.get() + 1);
    }

    fn preempt_enable() {
        let w = world();
        let c = &w.preempt_count[me()];
        c.set(
            c.get()
                .checked_sub(1)
                .expect("preempt_enable without disable"),
        );
    }

    fn preemptible() -> bool {
        world().preempt_count[me()].get() == 0
    }

    fn irqs_enabled() -> bool {
        world().irqs_on[me()].get()
    }

    fn irqs_save() -> bool {
        world().irqs_on[me()].replace(false)
    }

    fn irqs_restore(were_enabled: bool) {
        if were_enabled {
            world().irqs_on[me()].set(true);
        }
    }

    fn halt_while(still_waiting: &dyn Fn() -> bool) {
        if !still_waiting() {
            return;
        }
        let w = world();
        let me = me();
        w.awake.set(w.awake.get() - 1);
        w.halted[me].set(true);
        // An interrupt sent since the check is still pending: the wait ends at once.
        while !w.interrupts[me].replace(false) {
            if w.nobody_can_wake() {
                // Nobody is left who could wake this CPU: a kernel's tick would, some time
                // later; the model counts it.
                w.lost_wakeups.set(w.lost_wakeups.get() + 1);
                break;
            }
            loom::thread::yield_now();
        }
        w.halted[me].set(false);
        w.awake.set(w.awake.get() + 1);
    }

    fn send_ipi(cpu: u32, ipi: Ipi) {
        let w = world();
        w.ipis[cpu as usize].set(w.ipis[cpu as usize].get() + 1);
        match ipi {
            Ipi::Reschedule | Ipi::Kick => w.interrupts[cpu as usize].set(true),
            // The TLB model's CPUs poll their requests (an interrupt handler would serve
            // them at some point; polling gives loom every such point).
            Ipi::TlbShootdown => {}
        }
    }

    fn now() -> u64 {
        let w = world();
        w.clock.set(w.clock.get() + 1);
        w.clock.get()
    }

    fn tsc() -> u64 {
        Self::now()
    }

    fn us_to_ticks(_us: u64) -> u64 {
        0
    }

    fn flush_tlb(_range: FlushRange) {
        world().tlb[me()].store(0, SeqCst);
    }

    fn hypercall_out(_port: u16, _value: u32) {
        unreachable!("no pvsync host in a model: no hypercall is made");
    }

    fn hypercall_in(_port: u16) -> u32 {
        u32::MAX
    }

    fn wake(_who: Wake) {}

    fn vcpu_is_preempted(cpu: u32) -> bool {
        world().steal_preempted[cpu as usize].load(SeqCst) & KVM_VCPU_PREEMPTED != 0
    }

    /// The kernel's `arch::kvm::request_flush`: a compare-and-exchange from a value with
    /// `KVM_VCPU_PREEMPTED`.
    fn flush_tlb_on_resume(cpu: u32) -> bool {
        let b = &world().steal_preempted[cpu as usize];
        let state = b.load(SeqCst);
        state & KVM_VCPU_PREEMPTED != 0
            && b.compare_exchange(state, state | KVM_VCPU_FLUSH_TLB, SeqCst, SeqCst)
                .is_ok()
    }
}
