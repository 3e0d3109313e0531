//! The slot backend: [`Core`] behind a mutex, a condition variable per vCPU thread, kicks by
//! signal, and a ticker thread that ends slices, wakes idle vCPUs, runs the policies' periodic
//! look and publishes the host fields.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::SIGRTMIN;

use super::core::{Core, CoreConfig, Effects, POLICY_PERIOD};
use super::metrics::{VcpuMetrics, VmMetrics};
use super::trace::Trace;
use super::{Backend, GuestView, Nanos, VmHandle};
use crate::policy::{BoostPolicy, Cpl};
use crate::shared_region::Snapshot;
use crate::vcpu::KICK_SIGNAL_OFFSET;

/// Longest interval between two looks of the ticker; it wakes earlier when a slice or a
/// boost ends sooner.
pub const TICK: Duration = Duration::from_millis(1);
/// Shortest interval between two looks.
const MIN_TICK: Duration = Duration::from_micros(50);

/// A thread waiting in the backend re-checks at least this often (so a lost wake-up costs
/// at most this, never a hang).
const WAIT_RECHECK: Duration = Duration::from_millis(20);

/// A VM's guest view while a tick uses it: the view, its vCPU 0's key, its vCPU count.
type LiveView = (Arc<dyn GuestView>, usize, usize);

struct Inner {
    core: Core,
    /// Per VM: its guest view, the key of its vCPU 0, its vCPU count.
    views: Vec<(Weak<dyn GuestView>, usize, usize)>,
    /// When the host fields were last written.
    last_publish: Nanos,
}

/// Per vCPU thread: its wake-up, its kick flag, and its pthread for signals.
#[derive(Default)]
struct Thread {
    cv: Condvar,
    kicked: AtomicBool,
    /// The vCPU thread, from `start` until `exit`; signals are sent with this lock held, so
    /// none reaches a thread that has left (and may have been joined).
    pthread: Mutex<Option<libc::pthread_t>>,
}

pub struct SlotBackend {
    inner: Mutex<Inner>,
    threads: RwLock<Vec<Arc<Thread>>>,
    epoch: Instant,
    stop: AtomicBool,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

impl SlotBackend {
    /// Creates the backend and starts its ticker thread.
    pub fn new(cfg: CoreConfig) -> std::io::Result<Arc<Self>> {
        let b = Arc::new(SlotBackend {
            inner: Mutex::new(Inner {
                core: Core::new(cfg),
                views: Vec::new(),
                last_publish: 0,
            }),
            threads: RwLock::new(Vec::new()),
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            ticker: Mutex::new(None),
        });
        let weak = Arc::downgrade(&b);
        let t = std::thread::Builder::new()
            .name("slot-ticker".into())
            .spawn(move || ticker(weak))?;
        *b.ticker.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(b)
    }

    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn thread(&self, v: usize) -> Option<Arc<Thread>> {
        self.threads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(v)
            .cloned()
    }

    /// The part of the core's effects that must happen under the lock, in the same critical
    /// section as the decision: a vCPU handed a new turn starts with no kick, and a kick is
    /// flagged for the turn it was decided for (so a kick can never outlive its turn).
    fn mark(&self, fx: &Effects) {
        if fx.run.is_empty() && fx.kick.is_empty() {
            return;
        }
        let threads = self.threads.read().unwrap_or_else(|e| e.into_inner());
        for &v in &fx.run {
            if let Some(t) = threads.get(v) {
                t.kicked.store(false, Ordering::Release);
            }
        }
        for &v in &fx.kick {
            if let Some(t) = threads.get(v) {
                t.kicked.store(true, Ordering::Release);
            }
        }
    }

    /// The rest, after the lock is released: wake threads handed a turn, signal kicked ones
    /// (a signal that arrives late only makes one KVM_RUN return early).
    fn apply(&self, fx: Effects) {
        if fx.run.is_empty() && fx.kick.is_empty() {
            return;
        }
        let threads = self.threads.read().unwrap_or_else(|e| e.into_inner());
        for v in fx.run {
            if let Some(t) = threads.get(v) {
                t.cv.notify_all();
            }
        }
        for v in fx.kick {
            if let Some(t) = threads.get(v) {
                let p = t.pthread.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(p) = *p {
                    // SAFETY: `p` is a vCPU thread that has not passed `exit` (which clears
                    // it under this lock), so it has not been joined and the id is valid.
                    unsafe { libc::pthread_kill(p, SIGRTMIN() + KICK_SIGNAL_OFFSET) };
                }
            }
        }
    }

    fn with_core(&self, f: impl FnOnce(&mut Core, Nanos, &mut Effects)) {
        let mut fx = Effects::default();
        {
            let mut g = self.lock();
            let now = self.now();
            f(&mut g.core, now, &mut fx);
            self.mark(&fx);
        }
        self.apply(fx);
    }

    /// Blocks until `v` may run. An idle vCPU whose timeout (`idle_until`) passes wakes
    /// itself, more precisely than the ticker would.
    fn wait_turn_until(&self, v: usize, mut idle_until: Option<Nanos>) {
        let Some(t) = self.thread(v) else {
            return;
        };
        let mut g = self.lock();
        let mut waited = false;
        while !g.core.may_proceed(v) {
            waited = true;
            let now = self.now();
            let mut wait = WAIT_RECHECK;
            if let Some(until) = idle_until {
                if now >= until {
                    idle_until = None;
                    let mut fx = Effects::default();
                    g.core.idle_expired(v, now, &mut fx);
                    self.mark(&fx);
                    drop(g);
                    self.apply(fx);
                    g = self.lock();
                    continue;
                }
                wait = wait.min(Duration::from_nanos(until - now));
            }
            g =
                t.cv.wait_timeout(g, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
        if waited {
            let now = self.now();
            g.core.entered(v, now);
        }
    }

    /// Stops the ticker; returns the trace if one was recorded.
    pub fn shutdown(&self) -> Option<Trace> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        self.lock().core.take_trace()
    }

    /// One look; returns how long to sleep until the next.
    fn tick(&self) -> Duration {
        let mut fx = Effects::default();
        let next;
        // Upgraded here and dropped after the lock is released: if a VM ends meanwhile, the
        // last reference (and the VM's teardown) must not fall under the scheduler's lock.
        let views: Vec<Option<LiveView>>;
        {
            let mut g = self.lock();
            let now = self.now();
            views = g
                .views
                .iter()
                .map(|(w, first, len)| w.upgrade().map(|v| (v, *first, *len)))
                .collect();
            let Inner {
                core, last_publish, ..
            } = &mut *g;
            let mut snapshot = |vm: usize| views.get(vm)?.as_ref()?.0.snapshot();
            core.tick(now, &mut snapshot, &mut fx);
            // Host fields at the policies' pace, not at every slice end.
            if now.saturating_sub(*last_publish) >= POLICY_PERIOD {
                *last_publish = now;
                for (view, first, len) in views.iter().flatten() {
                    for i in 0..*len {
                        if let Some((p, ns, boosts)) = core.host_fields(first + i, now) {
                            view.publish_host(i as u32, p, ns, boosts);
                        }
                    }
                }
            }
            let min = MIN_TICK.as_nanos() as Nanos;
            next = core.next_tick(now, min, TICK.as_nanos() as Nanos) - now;
            self.mark(&fx);
        }
        drop(views);
        self.apply(fx);
        Duration::from_nanos(next)
    }
}

fn ticker(b: Weak<SlotBackend>) {
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
        // a bug here ends the process with a clear message rather than hanging every VM.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.tick())) {
            Ok(next) => sleep = next,
            Err(_) => {
                eprintln!("pvsync: error: the slot scheduler's ticker failed; stopping");
                std::process::exit(crate::cli::EXIT_HOST_ERROR);
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
        let mut g = self.lock();
        let (vm, first) = g.core.add_vm(policy, vcpus);
        g.views.push((view, first, vcpus));
        let mut threads = self.threads.write().unwrap_or_else(|e| e.into_inner());
        threads.resize_with(first + vcpus, Default::default);
        VmHandle { vm, first }
    }

    fn start(&self, v: usize) {
        if let Some(t) = self.thread(v) {
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() };
            *t.pthread.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
        }
        self.with_core(|c, now, fx| c.start(v, now, fx));
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
        self.with_core(|c, now, fx| c.preempt(v, cpl, now, fx));
        self.wait_turn(v);
    }

    fn spin_yield(&self, v: usize, named: Option<u32>, shared: Option<&Snapshot>) {
        self.with_core(|c, now, fx| c.spin_yield(v, named, shared, now, fx));
        self.wait_turn(v);
    }

    fn idle(&self, v: usize, timeout: Duration) {
        let mut until = 0;
        self.with_core(|c, now, fx| {
            until = now + timeout.as_nanos() as Nanos;
            c.idle(v, until, now, fx);
        });
        self.wait_turn_until(v, Some(until));
    }

    fn ipi(&self, v: usize, to: u32) {
        self.with_core(|c, now, fx| c.ipi(v, to, now, fx));
    }

    fn bad_hypercall(&self, v: usize) {
        self.lock().core.bad_hypercall(v);
    }

    fn exit(&self, v: usize) {
        if let Some(t) = self.thread(v) {
            *t.pthread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        self.with_core(|c, now, fx| c.exit(v, now, fx));
    }

    fn end_vm(&self, vm: usize) {
        self.with_core(|c, now, fx| c.end_vm(vm, now, fx));
    }

    fn report(&self, vm: usize) -> Option<(VmMetrics, Vec<VcpuMetrics>)> {
        let g = self.lock();
        g.core
            .vm_metrics(vm, self.now())
            .map(|(m, v)| (m.clone(), v))
    }

    fn publishes_host_fields(&self) -> bool {
        true
    }
}
