//! The slot backend: [`Core`] behind a mutex, each vCPU thread parked on its own futex
//! (`go` flag + park/unpark), kicks by signal, and a ticker thread that ends slices, wakes
//! idle vCPUs, runs the policies' periodic look and publishes the host fields.
//!
//! Where the time of a hand-off goes is a wake-up of another thread; onto another host core
//! it costs ~10x a wake on the same core. So each slot is bound to a host CPU: a vCPU
//! thread handed a slot is moved to that slot's CPU before it is woken, which is the CPU
//! the thread giving the slot up runs on (`--pin-slots`, on by default).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::core::{Core, CoreConfig, Effects, RunState};
use super::lock_audit::Audited;
use super::metrics::{VcpuMetrics, VmMetrics};
use super::trace::Trace;
use super::{Backend, GuestView, Kick, Nanos, SchedError, VmHandle};
use crate::policy::{BoostPolicy, Cpl};
use crate::shared_region::Snapshot;

/// Longest interval between two looks of the ticker; it wakes earlier when a slice or a
/// boost ends sooner.
pub const TICK: Duration = Duration::from_millis(1);
/// Shortest interval between two looks.
const MIN_TICK: Duration = Duration::from_micros(50);

/// A thread waiting in the backend re-checks at least this often (so a lost wake-up costs
/// at most this, never a hang).
const WAIT_RECHECK: Duration = Duration::from_millis(20);
/// The same safety net for an idle vCPU with no deadline (`Idle(0)`): an IPI, the VM's end
/// or a backend failure unparks it; a thousand of them looking every 20 ms would take the
/// scheduler's lock 50 000 times a second for nothing.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// A VM's guest view while a tick uses it: the view, its vCPU 0's key, its vCPU count.
type LiveView = (Arc<dyn GuestView>, usize, usize);

struct Inner {
    core: Core,
    /// Per VM: its guest view, the key of its vCPU 0, its vCPU count.
    views: Vec<(Weak<dyn GuestView>, usize, usize)>,
}

/// Per vCPU thread: whether it may run, its kick flag, and how to reach it.
struct Thread {
    /// Mirrors `Core::may_proceed` for this vCPU; written under the scheduler's lock, read
    /// by the thread without it (a hand-off wakes a thread that never touches the lock
    /// before KVM_RUN but to count the hand-off).
    go: AtomicBool,
    kicked: AtomicBool,
    /// Kicks the vCPU thread, from `start` until `exit`.
    kick: Mutex<Option<Box<dyn Kick>>>,
    /// For unpark (a futex wake of exactly this thread).
    handle: Mutex<Option<std::thread::Thread>>,
    /// Its kernel thread id (for affinity), and the host CPU it is bound to (-1: none).
    tid: AtomicI32,
    cpu: AtomicI32,
    /// The host CPU it should be on when next woken (-1: leave it).
    want_cpu: AtomicI32,
    /// What its record's `host_lent_by` must read this turn (set under the lock with `go`),
    /// and what this thread last wrote there: the thread itself is the field's only writer,
    /// before it enters KVM_RUN, so stores to it can never land out of order.
    lent: AtomicU32,
    lent_published: AtomicU32,
    /// Its VM's view and its index there.
    view: Mutex<Option<(Weak<dyn GuestView>, u32)>>,
}

impl Default for Thread {
    fn default() -> Self {
        Thread {
            go: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            kick: Mutex::new(None),
            handle: Mutex::new(None),
            tid: AtomicI32::new(0),
            cpu: AtomicI32::new(-1),
            want_cpu: AtomicI32::new(-1),
            lent: AtomicU32::new(0),
            lent_published: AtomicU32::new(0),
            view: Mutex::new(None),
        }
    }
}

/// Binds thread `tid` to host CPU `cpu`.
fn bind(tid: i32, cpu: usize) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; CPU_SET writes inside it (cpu is
    // checked against its capacity); sched_setaffinity only reads the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return false;
        }
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The host CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is valid; sched_getaffinity fills the set we own, and
    // CPU_ISSET only reads it within its capacity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..8 * std::mem::size_of::<libc::cpu_set_t>())
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

pub struct SlotBackend {
    inner: Mutex<Inner>,
    threads: RwLock<Vec<Arc<Thread>>>,
    /// Host CPU of each slot (empty: slots are not bound).
    slot_cpus: Vec<usize>,
    epoch: Instant,
    stop: AtomicBool,
    /// The ticker failed (a bug): the core, which a panic may have left half-changed, is
    /// never consulted again, every wait ends, and every VM is told to stop.
    failed: AtomicBool,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

impl SlotBackend {
    /// Creates the backend and starts its ticker thread.
    pub fn new(cfg: CoreConfig) -> Result<Arc<Self>, SchedError> {
        let allowed = if cfg.pin_slots {
            allowed_cpus()
        } else {
            Vec::new()
        };
        let slot_cpus = if allowed.is_empty() {
            Vec::new()
        } else {
            (0..cfg.slots.max(1))
                .map(|s| allowed[s % allowed.len()])
                .collect()
        };
        let b = Arc::new(SlotBackend {
            inner: Mutex::new(Inner {
                core: Core::new(cfg),
                views: Vec::new(),
            }),
            threads: RwLock::new(Vec::new()),
            slot_cpus,
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            ticker: Mutex::new(None),
        });
        let weak = Arc::downgrade(&b);
        let t = std::thread::Builder::new()
            .name("slot-ticker".into())
            .spawn(move || ticker(weak))
            .map_err(SchedError::Start)?;
        *b.ticker.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(b)
    }

    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// The scheduler's state; None once the backend has failed.
    fn lock(&self) -> Option<Audited<MutexGuard<'_, Inner>>> {
        if self.has_failed() {
            return None;
        }
        Some(self.lock_even_failed())
    }

    /// The lock, also after a failure.
    fn lock_even_failed(&self) -> Audited<MutexGuard<'_, Inner>> {
        Audited::new(self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether `t` may enter KVM_RUN: its turn came, or the backend failed (and its VM is
    /// being stopped).
    fn may_go(&self, t: &Thread) -> bool {
        t.go.load(Ordering::Acquire) || self.has_failed()
    }

    fn thread(&self, v: usize) -> Option<Arc<Thread>> {
        self.threads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(v)
            .cloned()
    }

    /// The part of the core's effects that must happen under the lock, in the same critical
    /// section as the decision: a vCPU handed a new turn starts with no kick and may go, and
    /// a kick is flagged for the turn it was decided for (so a kick can never outlive its
    /// turn).
    fn mark(&self, core: &Core, fx: &Effects) {
        if fx.run.is_empty() && fx.kick.is_empty() {
            return;
        }
        let threads = self.threads.read().unwrap_or_else(|e| e.into_inner());
        for &v in &fx.run {
            if let Some(t) = threads.get(v) {
                t.kicked.store(false, Ordering::Release);
                if let Some(RunState::Running { slot }) = core.state(v) {
                    let cpu = self.slot_cpus.get(slot).map_or(-1, |&c| c as i32);
                    t.want_cpu.store(cpu, Ordering::Relaxed);
                }
                t.lent.store(core.lent_value(v), Ordering::Relaxed);
                t.go.store(core.may_proceed(v), Ordering::Release);
            }
        }
        for &v in &fx.kick {
            if let Some(t) = threads.get(v) {
                t.kicked.store(true, Ordering::Release);
            }
        }
    }

    /// The rest, after the lock is released: move threads handed a turn to their slot's CPU
    /// and wake them, signal kicked ones (a signal that arrives late only makes one KVM_RUN
    /// return early).
    fn apply(&self, fx: Effects) {
        if fx.run.is_empty() && fx.kick.is_empty() {
            return;
        }
        let threads = self.threads.read().unwrap_or_else(|e| e.into_inner());
        for v in fx.run {
            if let Some(t) = threads.get(v) {
                let want = t.want_cpu.swap(-1, Ordering::Relaxed);
                let tid = t.tid.load(Ordering::Relaxed);
                if want >= 0 && tid > 0 && t.cpu.load(Ordering::Relaxed) != want {
                    // Before the wake, so the thread wakes where it will run: next to the
                    // thread that gave the slot up, which is about to park.
                    if bind(tid, want as usize) {
                        t.cpu.store(want, Ordering::Relaxed);
                    }
                }
                if let Some(h) = t.handle.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    h.unpark();
                }
            }
        }
        for v in fx.kick {
            if let Some(t) = threads.get(v) {
                if let Some(k) = t.kick.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    k.kick();
                }
            }
        }
    }

    /// Runs `f` on the core (for vCPU `own`'s thread, which may lose or regain its slot),
    /// then carries out the effects.
    fn with_core(&self, own: Option<usize>, f: impl FnOnce(&mut Core, Nanos, &mut Effects)) {
        let mut fx = Effects::default();
        {
            let Some(mut g) = self.lock() else {
                return;
            };
            let now = self.now();
            f(&mut g.core, now, &mut fx);
            self.mark(&g.core, &fx);
            if let Some(v) = own {
                self.sync_go(&g.core, v);
            }
        }
        self.apply(fx);
    }

    /// Sets `v`'s `go` flag (and what its turn's `host_lent_by` is) from the core, under the
    /// lock.
    fn sync_go(&self, core: &Core, v: usize) {
        if let Some(t) = self.thread(v) {
            t.lent.store(core.lent_value(v), Ordering::Relaxed);
            t.go.store(core.may_proceed(v), Ordering::Release);
        }
    }

    /// On `v`'s own thread, before KVM_RUN: its record's `host_lent_by` says who lent this
    /// turn (one store when it changed).
    fn publish_lent(&self, t: &Thread) {
        let want = t.lent.load(Ordering::Relaxed);
        if t.lent_published.swap(want, Ordering::Relaxed) == want {
            return;
        }
        let view = t.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((view, index)) = view {
            if let Some(view) = view.upgrade() {
                view.publish_lent_by(index, want);
            }
        }
    }

    /// Blocks until `v` may run: parked on its own futex until a hand-off sets `go` and
    /// unparks it. An idle vCPU whose timeout (`idle_until`) passes wakes itself, more
    /// precisely than the ticker would.
    fn wait_turn_until(&self, v: usize, mut idle_until: Option<Nanos>) {
        let Some(t) = self.thread(v) else {
            return;
        };
        if self.may_go(&t) {
            self.publish_lent(&t);
            return;
        }
        let recheck = if idle_until == Some(Nanos::MAX) {
            IDLE_RECHECK
        } else {
            WAIT_RECHECK
        };
        loop {
            let now = self.now();
            let mut wait = recheck;
            if let Some(until) = idle_until.filter(|&u| u != Nanos::MAX) {
                if now >= until {
                    idle_until = None;
                    self.with_core(Some(v), |c, now, fx| c.idle_expired(v, now, fx));
                }
                wait = wait.min(Duration::from_nanos(until.saturating_sub(now)));
            }
            if self.may_go(&t) {
                break;
            }
            std::thread::park_timeout(wait);
            if self.may_go(&t) {
                break;
            }
            if idle_until.is_none_or(|u| u == Nanos::MAX) {
                // A long wait: look at the core itself (a safety net; `go` is kept in step
                // with it under the lock).
                if let Some(g) = self.lock() {
                    self.sync_go(&g.core, v);
                }
            }
        }
        let now = self.now();
        if let Some(mut g) = self.lock() {
            g.core.entered(v, now);
        }
        self.publish_lent(&t);
    }

    /// Stops the ticker; returns the trace if one was recorded, or the failure.
    pub fn shutdown(&self) -> Result<Option<Trace>, SchedError> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        match self.lock() {
            Some(mut g) => Ok(g.core.take_trace().map(|mut t| {
                t.epoch = self.epoch;
                t
            })),
            None => Err(SchedError::TickerFailed),
        }
    }

    /// After the ticker failed: tells every VM to stop, then wakes every vCPU thread (its
    /// wait ends, see `may_go`, and it finds its VM stopping). The ticker repeats it, for VMs
    /// added since.
    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        // The views only (never half-changed: `add_vm` pushes them whole). Used and dropped
        // outside the lock: stopping a VM calls back into the backend, and its last
        // reference may go.
        let views: Vec<Arc<dyn GuestView>> = {
            let g = self.lock_even_failed();
            g.views.iter().filter_map(|(w, ..)| w.upgrade()).collect()
        };
        for view in views {
            view.backend_failed("the slot scheduler's ticker failed");
        }
        let threads = self.threads.read().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter() {
            if let Some(h) = t.handle.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                h.unpark();
            }
        }
    }

    /// One look; returns how long to sleep until the next. Guest memory is read (policy
    /// snapshots) and written (host fields) outside the scheduler's lock: a VM whose records
    /// are torn and retried makes no other VM wait.
    fn tick(&self) -> Duration {
        let mut fx = Effects::default();
        let next;
        // Upgraded here and dropped after the lock is released: if a VM ends meanwhile, the
        // last reference (and the VM's teardown) must not fall under the scheduler's lock.
        // One time for the whole look: whether the policies look is decided once (with the
        // snapshots taken for it), not again a moment later.
        let look = self.now();
        let (views, policy_due): (Vec<Option<LiveView>>, bool) = {
            let Some(g) = self.lock() else {
                return TICK;
            };
            let views = g
                .views
                .iter()
                .map(|(w, first, len)| w.upgrade().map(|v| (v, *first, *len)))
                .collect();
            (views, g.core.policy_due(look))
        };
        let mut snaps: Vec<Option<Result<Snapshot, ()>>> = if policy_due {
            views
                .iter()
                .map(|v| v.as_ref().and_then(|(view, ..)| view.snapshot()))
                .collect()
        } else {
            Vec::new()
        };
        let mut host_fields = Vec::new();
        {
            let Some(mut g) = self.lock() else {
                return TICK;
            };
            // Later than `look` (other operations ran while the snapshots were taken): the
            // core's clock never goes back.
            let now = self.now().max(look);
            let core = &mut g.core;
            let mut snapshot = |vm: usize| snaps.get_mut(vm).and_then(Option::take);
            core.tick(now, &mut snapshot, &mut fx);
            // At every look (50 us to 1 ms): waiters decide whether to halt from
            // `host_preempted`.
            for (vm, (_, first, len)) in views
                .iter()
                .enumerate()
                .filter_map(|(i, v)| Some((i, v.as_ref()?)))
            {
                for i in 0..*len {
                    if let Some(f) = core.host_fields(first + i, now) {
                        host_fields.push((vm, i as u32, f));
                    }
                }
            }
            let min = MIN_TICK.as_nanos() as Nanos;
            next = core.next_tick(now, min, TICK.as_nanos() as Nanos) - now;
            self.mark(core, &fx);
        }
        for (vm, i, (p, ns, boosts)) in host_fields {
            if let Some((view, ..)) = views.get(vm).and_then(Option::as_ref) {
                view.publish_host(i, p, ns, boosts);
            }
        }
        drop(views);
        self.apply(fx);
        Duration::from_nanos(next)
    }
}

fn ticker(b: Weak<SlotBackend>) {
    // Slices end on time: the default 50 us timer slack would stretch every sleep.
    // SAFETY: PR_SET_TIMERSLACK takes a value and changes only this thread's slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut sleep = TICK;
    loop {
        std::thread::sleep(sleep);
        let Some(b) = b.upgrade() else {
            return;
        };
        if b.stop.load(Ordering::Acquire) {
            return;
        }
        // Without the ticker no slice would ever end and queued vCPUs would wait forever:
        // a bug here stops every VM, and `shutdown` reports it, rather than hanging them.
        if b.has_failed() {
            b.fail();
            sleep = TICK;
            continue;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.tick())) {
            Ok(next) => sleep = next,
            Err(_) => {
                b.fail();
                sleep = TICK;
            }
        }
    }
}

impl Backend for SlotBackend {
    fn name(&self) -> &'static str {
        "slots"
    }

    fn add_vm(
        &self,
        policy: Box<dyn BoostPolicy>,
        vcpus: usize,
        view: Weak<dyn GuestView>,
    ) -> VmHandle {
        // Also after a failure (the ticker then stops the VM): registering only appends.
        let mut g = self.lock_even_failed();
        let (vm, first) = g.core.add_vm(policy, vcpus);
        g.views.push((view.clone(), first, vcpus));
        let mut threads = self.threads.write().unwrap_or_else(|e| e.into_inner());
        threads.resize_with(first + vcpus, Default::default);
        for (i, t) in threads[first..].iter().enumerate() {
            *t.view.lock().unwrap_or_else(|e| e.into_inner()) = Some((view.clone(), i as u32));
        }
        VmHandle { vm, first }
    }

    fn start(&self, v: usize, kick: Box<dyn Kick>) {
        if let Some(t) = self.thread(v) {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            *t.kick.lock().unwrap_or_else(|e| e.into_inner()) = Some(kick);
            *t.handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
            t.tid.store(tid, Ordering::Relaxed);
        }
        self.with_core(Some(v), |c, now, fx| c.start(v, now, fx));
    }

    fn wait_turn(&self, v: usize) {
        self.wait_turn_until(v, None);
    }

    /// On every KVM_RUN exit: a shared read lock and one atomic, no allocation or clone.
    fn take_kick(&self, v: usize) -> bool {
        self.threads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(v)
            .is_some_and(|t| t.kicked.swap(false, Ordering::AcqRel))
    }

    fn preempted(&self, v: usize, cpl: Cpl) {
        self.with_core(Some(v), |c, now, fx| c.preempt(v, cpl, now, fx));
        self.wait_turn(v);
    }

    fn spin_yield(&self, v: usize, named: Option<u32>, shared: Option<&Snapshot>) {
        self.with_core(Some(v), |c, now, fx| {
            c.spin_yield(v, named, shared, now, fx)
        });
        self.wait_turn(v);
    }

    fn idle(&self, v: usize, timeout: Option<Duration>) {
        let mut until = Nanos::MAX;
        self.with_core(Some(v), |c, now, fx| {
            if let Some(t) = timeout {
                until = now.saturating_add(t.as_nanos() as Nanos);
            }
            c.idle(v, until, now, fx);
        });
        // No deadline (`Nanos::MAX`): only an IPI (or the VM's end) makes it runnable.
        self.wait_turn_until(v, Some(until));
    }

    fn ipi(&self, v: usize, to: u32) {
        self.with_core(Some(v), |c, now, fx| c.ipi(v, to, now, fx));
    }

    fn rcu_wait(&self, v: usize, seq: u32, shared: Option<&Snapshot>) {
        self.with_core(Some(v), |c, now, fx| c.rcu_wait(v, seq, shared, now, fx));
    }

    fn bad_hypercall(&self, v: usize) {
        if let Some(mut g) = self.lock() {
            g.core.bad_hypercall(v);
        }
    }

    fn exit(&self, v: usize) {
        if let Some(t) = self.thread(v) {
            *t.kick.lock().unwrap_or_else(|e| e.into_inner()) = None;
            // No affinity change may reach a thread id the kernel has since reused.
            t.tid.store(0, Ordering::Relaxed);
        }
        self.with_core(Some(v), |c, now, fx| c.exit(v, now, fx));
    }

    fn end_vm(&self, vm: usize) {
        self.with_core(None, |c, now, fx| c.end_vm(vm, now, fx));
    }

    fn report(&self, vm: usize) -> Option<(VmMetrics, Vec<VcpuMetrics>)> {
        let g = self.lock()?;
        g.core
            .vm_metrics(vm, self.now())
            .map(|(m, v)| (m.clone(), v))
    }

    fn progress(&self, vm: usize) -> Option<(u64, u64)> {
        let g = self.lock()?;
        let (_, vcpus) = g.core.vm_metrics(vm, self.now())?;
        let run: u64 = vcpus.iter().map(|c| c.run_ns).sum();
        let wait: u64 = vcpus.iter().map(|c| c.wait_ns).sum();
        Some((run, run + wait))
    }

    fn publishes_host_fields(&self) -> bool {
        true
    }

    fn takes_vcpus_off(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[path = "slots_tests.rs"]
mod tests;
