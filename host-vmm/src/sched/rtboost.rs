//! A bounded boost of a host thread under the Linux scheduler: the thread runs `SCHED_FIFO`
//! at a low real-time priority for at most its budget, then gets its own policy back.
//!
//! The restore does not depend on the boosted thread: a timer thread (itself `SCHED_FIFO`
//! one priority higher, so a boosted thread spinning on the same CPU cannot keep it from
//! running) restores every boost whose budget is over, so a vCPU that never leaves
//! `KVM_RUN` cannot keep its priority. `restore` ends a boost early (the vCPU exited, or
//! gave its turn back), and dropping the booster restores everything it raised.
//!
//! The table of boosts is behind a priority-inheriting lock. A boost is made with the lock
//! held (a thread is never raised without its entry), and the raised thread can preempt the
//! ordinary thread that raised it at once. With a plain lock, the timer would then wait for
//! a thread that the boosted ones keep off every CPU, and the boosts would last until the
//! kernel's real-time throttling (0.95 s here): measured before this lock, with two vCPU
//! threads raised on the two cores. With priority inheritance the holder runs at the timer's
//! priority until it lets go. The timer sleeps with `park_timeout`, which needs no lock.
//!
//! Without the privilege to raise a thread (no `CAP_SYS_NICE`), `boost` says so once with
//! [`Outcome::NotPermitted`] and the caller falls back to what needs no privilege (the
//! spinner's `sched_yield`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use priority_inheriting_lock::{PriorityInheritingLock, PriorityInheritingLockGuard};

/// Real-time priority of a boosted thread: the lowest, above every `SCHED_OTHER` thread.
pub const BOOST_PRIORITY: i32 = 1;
/// Real-time priority of the timer thread: above every boosted thread.
const TIMER_PRIORITY: i32 = BOOST_PRIORITY + 1;

/// What a boost request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The thread runs `SCHED_FIFO` until the budget ends (or `restore`).
    Boosted,
    /// It was boosted already; its budget is left as it was (a boost is never extended, so
    /// no chain of requests keeps a thread raised).
    AlreadyBoosted,
    /// This process may not raise threads (no `CAP_SYS_NICE`).
    NotPermitted,
    /// The kernel refused for another reason (the thread is gone): errno.
    Failed(i32),
}

/// A look at a thread's scheduling ([`RtBooster::audit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Audit {
    /// It runs `SCHED_FIFO` or `SCHED_RR`.
    pub real_time: bool,
    /// A boost of the booster is live for it.
    pub boosted: bool,
}

/// A thread's scheduling before its boost.
#[derive(Clone, Copy, Debug)]
struct Saved {
    policy: libc::c_int,
    priority: libc::c_int,
    until: Instant,
}

/// What the boosts of one thread did, each step read back from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounts {
    /// Boosts made (the thread read back `SCHED_FIFO` at [`BOOST_PRIORITY`]).
    pub raised: u64,
    /// Boosts the timer ended because the budget was over.
    pub expired: u64,
    /// Restores after which the thread read back its own policy and priority.
    pub restored: u64,
    /// Restores after which it did not (it must never happen).
    pub restore_failures: u64,
}

#[derive(Default)]
struct State {
    boosted: BTreeMap<libc::pid_t, Saved>,
    counts: BTreeMap<libc::pid_t, ThreadCounts>,
    /// A boost was refused for lack of privilege (then none is tried again).
    denied: bool,
    /// Boosts made, and boosts ended by the timer (the budget ran out).
    made: u64,
    expired: u64,
}

struct Shared {
    state: PriorityInheritingLock<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> PriorityInheritingLockGuard<'_, State> {
        self.state.lock()
    }
}

/// Sets thread `tid`'s policy and priority; the errno on failure.
fn set(tid: libc::pid_t, policy: libc::c_int, priority: libc::c_int) -> Result<(), i32> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sched_setscheduler reads `param`, which outlives the call; a tid that names no
    // thread of ours is refused with ESRCH, never acted on.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Thread `tid`'s policy and priority.
pub fn current(tid: libc::pid_t) -> Option<(libc::c_int, libc::c_int)> {
    // SAFETY: sched_getscheduler takes a tid and returns -1 for one that is not a thread.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getparam writes into `param`, which lives across the call.
    let ok = unsafe { libc::sched_getparam(tid, &mut param) } == 0;
    (policy >= 0 && ok).then_some((policy, param.sched_priority))
}

/// Gives back their own scheduling to the threads whose budget ended by `now` (all if
/// `all`); returns how many.
fn restore_due(s: &mut State, now: Instant, all: bool) -> u64 {
    let due: Vec<libc::pid_t> = s
        .boosted
        .iter()
        .filter(|(_, b)| all || b.until <= now)
        .map(|(&t, _)| t)
        .collect();
    for &t in &due {
        give_back(s, t);
        if !all {
            s.counts.entry(t).or_default().expired += 1;
        }
    }
    due.len() as u64
}

/// Ends thread `t`'s boost, if it has one, and checks it took: the thread reads back the
/// policy and priority it had before.
fn give_back(s: &mut State, t: libc::pid_t) {
    let Some(b) = s.boosted.remove(&t) else {
        return;
    };
    // A thread that is gone by now needs nothing back (and reads back nothing).
    if set(t, b.policy, b.priority) == Err(libc::ESRCH) {
        return;
    }
    let c = s.counts.entry(t).or_default();
    if current(t) == Some((b.policy, b.priority)) {
        c.restored += 1;
    } else {
        c.restore_failures += 1;
    }
}

/// Raises threads for bounded budgets; see the module documentation.
pub struct RtBooster {
    shared: Arc<Shared>,
    timer: Mutex<Option<JoinHandle<()>>>,
    /// The timer thread, to wake it (none if it could not be spawned: then nothing is
    /// raised).
    waker: Option<Thread>,
}

impl Default for RtBooster {
    fn default() -> Self {
        Self::new()
    }
}

impl RtBooster {
    pub fn new() -> Self {
        let shared = Arc::new(Shared {
            state: PriorityInheritingLock::new(State::default()),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let timer = std::thread::Builder::new()
            .name("rt-boost-timer".into())
            .spawn(move || timer(&s))
            .ok();
        let waker = timer.as_ref().map(|t| t.thread().clone());
        RtBooster {
            shared,
            timer: Mutex::new(timer),
            waker,
        }
    }

    /// Runs thread `tid` `SCHED_FIFO` for at most `budget`.
    pub fn boost(&self, tid: libc::pid_t, budget: Duration) -> Outcome {
        let Some(waker) = &self.waker else {
            // No timer, no bounded boost: none is made.
            return Outcome::Failed(libc::EAGAIN);
        };
        let until = Instant::now() + budget;
        let mut s = self.shared.lock();
        if s.denied {
            return Outcome::NotPermitted;
        }
        if s.boosted.contains_key(&tid) {
            return Outcome::AlreadyBoosted;
        }
        let Some((policy, priority)) = current(tid) else {
            return Outcome::Failed(libc::ESRCH);
        };
        // The entry exists before the thread is raised, and the lock is held across both:
        // the timer sees every raised thread. The timer is woken first: the raised thread may
        // preempt this one right after the raise, and the timer must not wait for this one
        // to run again. It waits for the lock instead, lending this thread its priority.
        s.boosted.insert(
            tid,
            Saved {
                policy,
                priority,
                until,
            },
        );
        waker.unpark();
        match set(tid, libc::SCHED_FIFO, BOOST_PRIORITY) {
            Ok(()) => {
                s.made += 1;
                if current(tid) == Some((libc::SCHED_FIFO, BOOST_PRIORITY)) {
                    s.counts.entry(tid).or_default().raised += 1;
                }
                Outcome::Boosted
            }
            Err(e) => {
                s.boosted.remove(&tid);
                if e == libc::EPERM {
                    s.denied = true;
                    Outcome::NotPermitted
                } else {
                    Outcome::Failed(e)
                }
            }
        }
    }

    /// Ends `tid`'s boost now, if it has one.
    pub fn restore(&self, tid: libc::pid_t) {
        give_back(&mut self.shared.lock(), tid);
    }

    /// What the boosts of `tid` did so far.
    pub fn thread_counts(&self, tid: libc::pid_t) -> ThreadCounts {
        self.shared
            .lock()
            .counts
            .get(&tid)
            .copied()
            .unwrap_or_default()
    }

    /// Looks at `tid` as the host runs it now: whether it is real-time, and whether a boost
    /// of this booster accounts for that. Under the booster's lock, so no boost starts or
    /// ends in between. None if the thread is gone.
    pub fn audit(&self, tid: libc::pid_t) -> Option<Audit> {
        let s = self.shared.lock();
        let (policy, _) = current(tid)?;
        Some(Audit {
            real_time: policy == libc::SCHED_FIFO || policy == libc::SCHED_RR,
            boosted: s.boosted.contains_key(&tid),
        })
    }

    /// Whether `tid` is boosted now.
    pub fn is_boosted(&self, tid: libc::pid_t) -> bool {
        self.shared.lock().boosted.contains_key(&tid)
    }

    /// Boosts made so far, and those the timer ended (their budget ran out).
    pub fn counts(&self) -> (u64, u64) {
        let s = self.shared.lock();
        (s.made, s.expired)
    }

    /// Whether boosting was refused for lack of privilege.
    pub fn denied(&self) -> bool {
        self.shared.lock().denied
    }
}

impl Drop for RtBooster {
    fn drop(&mut self) {
        restore_due(&mut self.shared.lock(), Instant::now(), true);
        self.shared.stop.store(true, Ordering::Release);
        if let Some(w) = &self.waker {
            w.unpark();
        }
        if let Some(t) = self.timer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// The timer thread: sleeps until the earliest budget ends, restores what is due.
fn timer(shared: &Shared) {
    // Above every boosted thread, so that one spinning on this CPU cannot starve the restore.
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let _ = set(me, libc::SCHED_FIFO, TIMER_PRIORITY);
    while !shared.stop.load(Ordering::Acquire) {
        let next = {
            let mut s = shared.lock();
            let expired = restore_due(&mut s, Instant::now(), false);
            s.expired += expired;
            s.boosted.values().map(|b| b.until).min()
        };
        // A boost made after the look above unparks this thread, so the park returns at
        // once (the token is kept) and the next look sees it.
        match next {
            Some(t) => std::thread::park_timeout(t.saturating_duration_since(Instant::now())),
            None => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI32;

    /// A thread that spins (or, if `!spin`, sleeps in short naps) until told to stop; its
    /// tid.
    fn spinner(spin: bool) -> (Arc<AtomicBool>, Arc<AtomicI32>, JoinHandle<()>) {
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let (s, t) = (Arc::clone(&stop), Arc::clone(&tid));
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            t.store(unsafe { libc::gettid() }, Ordering::Release);
            while !s.load(Ordering::Relaxed) {
                if spin {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        while tid.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        (stop, tid, h)
    }

    #[test]
    fn a_boost_ends_with_its_budget_even_if_the_thread_never_yields() {
        let b = RtBooster::new();
        let (stop, tid, h) = spinner(true);
        let tid = tid.load(Ordering::Acquire);
        let before = current(tid).unwrap();
        // A spinning real-time thread may keep this one off its CPU past a short budget, so
        // what is checked is the end state, not the moment in between.
        match b.boost(tid, Duration::from_millis(30)) {
            Outcome::NotPermitted => {
                // No CAP_SYS_NICE here: nothing was changed, and the booster says so.
                assert_eq!(current(tid).unwrap(), before);
                assert!(b.denied());
            }
            o => {
                assert_eq!(o, Outcome::Boosted);
                let deadline = Instant::now() + Duration::from_secs(5);
                while b.is_boosted(tid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert_eq!(current(tid).unwrap(), before, "the timer gave it back");
                assert_eq!(b.counts(), (1, 1));
            }
        }
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }

    #[test]
    fn restore_and_drop_give_the_thread_its_own_scheduling_back() {
        let b = RtBooster::new();
        let (stop, tid, h) = spinner(false);
        let tid = tid.load(Ordering::Acquire);
        let before = current(tid).unwrap();
        if b.boost(tid, Duration::from_secs(60)) == Outcome::Boosted {
            assert_eq!(current(tid).unwrap(), (libc::SCHED_FIFO, BOOST_PRIORITY));
            assert_eq!(
                b.boost(tid, Duration::from_millis(1)),
                Outcome::AlreadyBoosted
            );
            b.restore(tid);
            assert_eq!(current(tid).unwrap(), before, "restore");
            assert_eq!(b.boost(tid, Duration::from_secs(60)), Outcome::Boosted);
            drop(b);
            assert_eq!(current(tid).unwrap(), before, "drop");
        }
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }

    #[test]
    fn a_thread_that_does_not_exist_is_refused() {
        let b = RtBooster::new();
        assert!(matches!(
            b.boost(i32::MAX, Duration::from_millis(1)),
            Outcome::Failed(_) | Outcome::NotPermitted
        ));
    }
}
