//! A bounded boost of a host thread under the Linux scheduler: the thread runs `SCHED_FIFO`
//! at a low real-time priority for at most its budget, then gets its own policy back.
//!
//! What bounds it, whatever the boosted thread (a vCPU in `KVM_RUN`, driven by a guest)
//! does:
//! - **A timer thread** (itself `SCHED_FIFO` one priority higher, so a boosted thread
//!   spinning on its CPU cannot keep it from running) restores every boost whose budget is
//!   over. If the timer cannot run real-time, no boost is made at all.
//! - **A cool-down:** a thread whose boost ended may not be raised again for as long as that
//!   boost lasted, so no stream of requests keeps a thread real-time more than half the time.
//! - **A cap** on boosts live at once (one CPU fewer than the host has, at least one), so
//!   boosted threads never hold every CPU, and an allowance of boost time shared by all
//!   threads that refills at half the rate of time per boost allowed: however a guest
//!   spreads its requests over threads, boosts hold at most half of those CPUs over time.
//! - **Retirement:** a thread that leaves is restored and never raised again, even by a
//!   request already on its way.
//!
//! The table is behind a priority-inheriting lock (a PI futex). A boost is made with the
//! lock held, so a thread is never raised without its entry, and the raised thread can
//! preempt the ordinary thread that raised it at once. With a plain lock the timer would then
//! wait for a thread the boosted ones keep off every CPU, and the boosts would last until the
//! kernel's real-time throttling (0.95 s here; measured before this lock, with two vCPU
//! threads raised on the two cores). With priority inheritance the holder runs at the
//! timer's priority until it lets go. The timer is woken before a thread is raised and
//! sleeps with `park_timeout`, which needs no lock; the table is allocated when threads
//! register, so neither the timer nor a boost allocates (an allocator's lock does not
//! inherit priority).
//!
//! Without the privilege to raise a thread (no `CAP_SYS_NICE`, or no real-time budget for
//! this process), `boost` says [`Outcome::NotPermitted`] and the caller falls back to what
//! needs no privilege.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use priority_inheriting_lock::{PriorityInheritingLock, PriorityInheritingLockGuard};

/// Real-time priority of a boosted thread: the lowest, above every `SCHED_OTHER` thread.
pub const BOOST_PRIORITY: i32 = 1;
/// Real-time priority of the timer thread: above every boosted thread.
const TIMER_PRIORITY: i32 = BOOST_PRIORITY + 1;
/// Boost time saved up at most, per boost allowed at once.
const CREDIT_CAP_PER_BOOST: Duration = Duration::from_millis(40);

/// What a boost request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The thread runs `SCHED_FIFO` until the budget ends (or `restore`).
    Boosted,
    /// It is boosted already; its budget is left as it was (a boost is never extended).
    AlreadyBoosted,
    /// Its last boost ended too recently (the cool-down).
    CoolingDown,
    /// As many boosts as allowed are live.
    Busy,
    /// It runs real-time on its own (the operator's choice): it is left alone.
    AlreadyRealTime,
    /// This process may not raise threads, or could not make its timer real-time.
    NotPermitted,
    /// The thread is not registered, has left, or the kernel refused: errno.
    Failed(i32),
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
    /// The most a boost ran past its budget before the timer ended it.
    pub max_overrun: Duration,
}

/// A look at a thread's scheduling ([`RtBooster::audit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Audit {
    /// It runs `SCHED_FIFO` or `SCHED_RR`.
    pub real_time: bool,
    /// A boost of the booster is live for it.
    pub boosted: bool,
}

/// A live boost: the thread's scheduling before it, and its budget.
#[derive(Clone, Copy, Debug)]
struct Live {
    policy: libc::c_int,
    priority: libc::c_int,
    since: Instant,
    until: Instant,
}

/// One registered thread.
#[derive(Clone, Debug)]
struct Slot {
    tid: libc::pid_t,
    live: Option<Live>,
    /// No new boost before this.
    cool_until: Option<Instant>,
    /// It left: never raised again.
    retired: bool,
    counts: ThreadCounts,
}

struct State {
    slots: Vec<Slot>,
    /// Boost time all threads together may still take, ns, refilled at half the rate of
    /// time per boost allowed at once: whichever threads a guest gets named, boosted threads
    /// hold at most half of `max_live` CPUs over time. A boost may start while it is
    /// positive and takes its whole budget (it may go below zero by one budget). Last
    /// refilled at `refilled`.
    credit: i64,
    credit_cap: i64,
    refilled: Instant,
    /// Boosts live now, and the most allowed at once.
    live: usize,
    max_live: usize,
    /// Why no boost can be made (EPERM: no privilege), if so.
    refused: Option<i32>,
}

struct Shared {
    state: PriorityInheritingLock<State>,
    stop: AtomicBool,
    /// The timer thread runs (a dead timer means no boost may be made).
    timer_alive: AtomicBool,
}

impl Shared {
    fn lock(&self) -> PriorityInheritingLockGuard<'_, State> {
        self.state.lock()
    }
}

/// Whether `tid` is a thread of this process (the kernel's scheduling calls take any tid
/// of the pid namespace; a boost must never touch another process's thread).
fn ours(tid: libc::pid_t) -> bool {
    // SAFETY: tgkill with signal 0 sends nothing; it checks that `tid` is a thread of the
    // thread group `getpid()`.
    tid > 0
        && unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid() as libc::c_long,
                tid as libc::c_long,
                0 as libc::c_long,
            )
        } == 0
}

/// Sets thread `tid`'s policy and priority; the errno on failure.
fn set(tid: libc::pid_t, policy: libc::c_int, priority: libc::c_int) -> Result<(), i32> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sched_setscheduler only reads `param`, which outlives the call. The callers
    // name a thread of this process (`ours`) or 0 (the caller itself).
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Thread `tid`'s policy and priority.
pub fn current(tid: libc::pid_t) -> Option<(libc::c_int, libc::c_int)> {
    // SAFETY: sched_getscheduler only reads the thread's policy; -1 for no such thread.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getparam writes into `param`, which lives across the call.
    let ok = unsafe { libc::sched_getparam(tid, &mut param) } == 0;
    (policy >= 0 && ok).then_some((policy, param.sched_priority))
}

/// `d` in ns, saturated.
fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// A real-time policy (`SCHED_FIFO`, `SCHED_RR`), whatever its reset-on-fork flag.
pub fn is_real_time(policy: libc::c_int) -> bool {
    let p = policy & !libc::SCHED_RESET_ON_FORK;
    p == libc::SCHED_FIFO || p == libc::SCHED_RR
}

/// A policy a boost may lift and put back: the ordinary ones. Real-time and deadline
/// threads are the operator's, and left alone.
fn boostable(policy: libc::c_int) -> bool {
    matches!(
        policy & !libc::SCHED_RESET_ON_FORK,
        libc::SCHED_OTHER | libc::SCHED_BATCH | libc::SCHED_IDLE
    )
}

/// Ends slot `i`'s boost, if live, and checks it took: the thread reads back the policy and
/// priority it had before. Starts its cool-down. Returns the budget left.
fn give_back(s: &mut State, i: usize, now: Instant) -> Option<Duration> {
    let slot = &mut s.slots[i];
    let live = slot.live.take()?;
    s.live -= 1;
    let used = now.saturating_duration_since(live.since);
    slot.cool_until = now.checked_add(used);
    // Unused boost time goes back to the common allowance.
    let left = live.until.saturating_duration_since(now);
    s.credit = (s.credit + nanos(left)).min(s.credit_cap);
    let slot = &mut s.slots[i];
    // A thread that is gone needs nothing back (and its tid may name another thread now).
    if !ours(slot.tid) {
        return Some(left);
    }
    let policy = live.policy & !libc::SCHED_RESET_ON_FORK;
    let back = set(slot.tid, live.policy, live.priority)
        .or_else(|_| set(slot.tid, libc::SCHED_OTHER, 0))
        .is_ok()
        && current(slot.tid).is_some_and(|(p, prio)| {
            (p & !libc::SCHED_RESET_ON_FORK, prio) == (policy, live.priority)
        });
    if back {
        slot.counts.restored += 1;
    } else {
        slot.counts.restore_failures += 1;
    }
    Some(left)
}

/// Gives back their own scheduling to the threads whose budget ended by `now` (all if
/// `all`); returns the earliest budget still running.
fn restore_due(s: &mut State, now: Instant, all: bool) -> Option<Instant> {
    let mut next: Option<Instant> = None;
    for i in 0..s.slots.len() {
        let Some(live) = s.slots[i].live else {
            continue;
        };
        if all || live.until <= now {
            give_back(s, i, now);
            if !all {
                let c = &mut s.slots[i].counts;
                c.expired += 1;
                c.max_overrun = c.max_overrun.max(now.saturating_duration_since(live.until));
            }
        } else {
            next = Some(next.map_or(live.until, |n| n.min(live.until)));
        }
    }
    next
}

/// Raises threads for bounded budgets; see the module documentation.
pub struct RtBooster {
    shared: Arc<Shared>,
    timer: Mutex<Option<JoinHandle<()>>>,
    /// The timer thread, to wake it.
    waker: Option<Thread>,
}

impl RtBooster {
    /// A booster that lets at most `max_live` boosts run at once (0: none at all).
    pub fn new(max_live: usize) -> Self {
        let shared = Arc::new(Shared {
            state: PriorityInheritingLock::new(State {
                slots: Vec::new(),
                credit: nanos(CREDIT_CAP_PER_BOOST) * max_live as i64,
                credit_cap: nanos(CREDIT_CAP_PER_BOOST) * max_live as i64,
                refilled: Instant::now(),
                live: 0,
                max_live,
                refused: None,
            }),
            stop: AtomicBool::new(false),
            timer_alive: AtomicBool::new(true),
        });
        let (told, hear) = mpsc::channel();
        let s = Arc::clone(&shared);
        let timer = std::thread::Builder::new()
            .name("rt-boost-timer".into())
            .spawn(move || timer(&s, told))
            .ok();
        // The timer reports whether it runs real-time before any boost can be made.
        let refused = match (&timer, hear.recv()) {
            (Some(_), Ok(Ok(()))) => None,
            (Some(_), Ok(Err(e))) => Some(e),
            _ => Some(libc::EAGAIN),
        };
        shared.lock().refused = refused;
        let waker = timer.as_ref().map(|t| t.thread().clone());
        RtBooster {
            shared,
            timer: Mutex::new(timer),
            waker,
        }
    }

    /// Makes thread `tid` (of this process) known, so that it can be boosted. Allocates;
    /// the boosts themselves do not.
    pub fn register(&self, tid: libc::pid_t) {
        if tid <= 0 {
            return;
        }
        // Built before the lock is taken: nothing allocates under it.
        let slot = Slot {
            tid,
            live: None,
            cool_until: None,
            retired: false,
            counts: ThreadCounts::default(),
        };
        // A larger table, allocated with the lock released when the table is full; the old
        // one is freed after the lock is released (it is dropped last).
        let mut spare: Vec<Slot> = Vec::new();
        loop {
            let mut s = self.shared.lock();
            if s.slots.iter().any(|t| t.tid == tid && !t.retired) {
                return;
            }
            // A tid the kernel gave again: the old slot's counts are reported no more.
            if let Some(i) = s.slots.iter().position(|t| t.tid == tid) {
                s.slots[i] = slot;
                return;
            }
            if s.slots.len() == s.slots.capacity() {
                if spare.capacity() <= s.slots.len() {
                    let want = 2 * s.slots.len() + 8;
                    drop(s);
                    spare = Vec::with_capacity(want);
                    continue;
                }
                spare.append(&mut s.slots);
                std::mem::swap(&mut spare, &mut s.slots);
            }
            s.slots.push(slot);
            return;
        }
    }

    /// Why a boost of `tid` would be refused now, if it would (cheap, and changes nothing):
    /// lets a caller skip the work around a boost that cannot happen.
    pub fn would_refuse(&self, tid: libc::pid_t) -> Option<Outcome> {
        let s = self.shared.lock();
        if let Some(e) = s.refused {
            return Some(if e == libc::EPERM {
                Outcome::NotPermitted
            } else {
                Outcome::Failed(e)
            });
        }
        let i = Self::slot_of(&s, tid)?;
        let slot = &s.slots[i];
        if slot.live.is_some() {
            Some(Outcome::AlreadyBoosted)
        } else if slot.cool_until.is_some_and(|c| Instant::now() < c) {
            Some(Outcome::CoolingDown)
        } else if s.live >= s.max_live || s.credit <= 0 {
            // (The allowance as last refilled: a boost may still find it refilled enough.)
            Some(Outcome::Busy)
        } else {
            None
        }
    }

    fn slot_of(s: &State, tid: libc::pid_t) -> Option<usize> {
        s.slots.iter().rposition(|t| t.tid == tid)
    }

    /// Runs thread `tid` `SCHED_FIFO` for at most `budget`, where it is (a boost does not
    /// move a thread: measured here, moving vCPU threads costs more than the boost wins).
    pub fn boost(&self, tid: libc::pid_t, budget: Duration) -> Outcome {
        let (Some(waker), true) = (&self.waker, self.shared.timer_alive.load(Ordering::Acquire))
        else {
            return Outcome::NotPermitted;
        };
        let mut s = self.shared.lock();
        // Read under the lock: the wait for it is not refilled twice.
        let now = Instant::now();
        let Some(until) = now.checked_add(budget) else {
            return Outcome::Failed(libc::EINVAL);
        };
        if let Some(e) = s.refused {
            return if e == libc::EPERM {
                Outcome::NotPermitted
            } else {
                Outcome::Failed(e)
            };
        }
        let Some(i) = Self::slot_of(&s, tid).filter(|_| tid > 0) else {
            return Outcome::Failed(libc::ENOENT);
        };
        let slot = &s.slots[i];
        if slot.retired || !ours(tid) {
            return Outcome::Failed(libc::ESRCH);
        }
        if slot.live.is_some() {
            return Outcome::AlreadyBoosted;
        }
        if slot.cool_until.is_some_and(|c| now < c) {
            return Outcome::CoolingDown;
        }
        if s.live >= s.max_live {
            return Outcome::Busy;
        }
        let elapsed = now.saturating_duration_since(s.refilled);
        s.refilled = now;
        let refill = nanos(elapsed).saturating_mul(s.max_live as i64) / 2;
        s.credit = s.credit.saturating_add(refill).min(s.credit_cap);
        if s.credit <= 0 {
            return Outcome::Busy;
        }
        let Some((policy, priority)) = current(tid) else {
            return Outcome::Failed(libc::ESRCH);
        };
        if !boostable(policy) {
            return Outcome::AlreadyRealTime;
        }
        s.credit = s.credit.saturating_sub(nanos(budget));
        // The entry exists before the thread is raised, and the lock is held across both:
        // the timer sees every raised thread. The timer is woken first: the raised thread may
        // preempt this one right after the raise, and the timer must not wait for this one
        // to run again. It waits for the lock instead, lending this thread its priority.
        s.slots[i].live = Some(Live {
            policy,
            priority,
            since: now,
            until,
        });
        s.live += 1;
        waker.unpark();
        // Reset on fork: nothing the boosted thread creates inherits the boost.
        match set(
            tid,
            libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
            BOOST_PRIORITY,
        ) {
            Ok(()) => {
                let seen = current(tid).map(|(p, prio)| (p & !libc::SCHED_RESET_ON_FORK, prio));
                if seen == Some((libc::SCHED_FIFO, BOOST_PRIORITY)) {
                    s.slots[i].counts.raised += 1;
                }
                Outcome::Boosted
            }
            Err(e) => {
                s.slots[i].live = None;
                s.live -= 1;
                s.credit = s.credit.saturating_add(nanos(budget));
                if e == libc::EPERM {
                    // This thread (its cgroup's real-time budget, a limit): the next may be
                    // allowed. Only the timer's own refusal turns boosting off.
                    Outcome::NotPermitted
                } else {
                    Outcome::Failed(e)
                }
            }
        }
    }

    /// Ends `tid`'s boost now, if it has one; the budget it had left.
    pub fn restore(&self, tid: libc::pid_t) -> Option<Duration> {
        let mut s = self.shared.lock();
        let i = Self::slot_of(&s, tid)?;
        give_back(&mut s, i, Instant::now())
    }

    /// `tid` leaves: its boost ends now and it is never raised again; the budget it had
    /// left, if it was boosted.
    pub fn retire(&self, tid: libc::pid_t) -> Option<Duration> {
        let mut s = self.shared.lock();
        let i = Self::slot_of(&s, tid)?;
        let left = give_back(&mut s, i, Instant::now());
        s.slots[i].retired = true;
        left
    }

    /// Whether `tid` is boosted now.
    pub fn is_boosted(&self, tid: libc::pid_t) -> bool {
        let s = self.shared.lock();
        Self::slot_of(&s, tid).is_some_and(|i| s.slots[i].live.is_some())
    }

    /// What the boosts of `tid` did so far.
    pub fn thread_counts(&self, tid: libc::pid_t) -> ThreadCounts {
        let s = self.shared.lock();
        Self::slot_of(&s, tid).map_or_else(ThreadCounts::default, |i| s.slots[i].counts)
    }

    /// Looks at `tid` as the host runs it now: whether it is real-time, and whether a boost
    /// of this booster accounts for that. Under the booster's lock, so no boost starts or
    /// ends in between. None if the thread is gone.
    pub fn audit(&self, tid: libc::pid_t) -> Option<Audit> {
        let s = self.shared.lock();
        if !ours(tid) {
            return None;
        }
        let (policy, _) = current(tid)?;
        Some(Audit {
            real_time: is_real_time(policy),
            boosted: Self::slot_of(&s, tid).is_some_and(|i| s.slots[i].live.is_some()),
        })
    }

    /// Why no boost can be made, if so: EPERM when this process may not raise threads.
    pub fn refused(&self) -> Option<i32> {
        self.shared.lock().refused
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

/// Marks the timer dead when its thread ends, however it ends.
struct Alive<'a>(&'a AtomicBool);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The timer thread: makes itself real-time (and says whether it could), then sleeps until
/// the earliest budget ends and restores what is due.
fn timer(shared: &Shared, told: mpsc::Sender<Result<(), i32>>) {
    let _alive = Alive(&shared.timer_alive);
    // Above every boosted thread, so that one spinning on this CPU cannot starve the restore.
    let raised = set(0, libc::SCHED_FIFO, TIMER_PRIORITY);
    let _ = told.send(raised);
    if raised.is_err() {
        return;
    }
    while !shared.stop.load(Ordering::Acquire) {
        let next = restore_due(&mut shared.lock(), Instant::now(), false);
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
    fn spinner(spin: bool) -> (Arc<AtomicBool>, libc::pid_t, JoinHandle<()>) {
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
        (stop, tid.load(Ordering::Acquire), h)
    }

    /// A booster, or None (said loudly) where this process may not raise threads.
    fn booster(max_live: usize) -> Option<RtBooster> {
        let b = RtBooster::new(max_live);
        if b.refused().is_some() {
            eprintln!("*** rtboost: this process may not run threads real-time: not tested ***");
            return None;
        }
        Some(b)
    }

    fn wait_until_restored(b: &RtBooster, tid: libc::pid_t) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.is_boosted(tid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_boost_ends_with_its_budget_even_if_the_thread_never_yields() {
        let Some(b) = booster(1) else { return };
        let (stop, tid, h) = spinner(true);
        let before = current(tid).unwrap();
        assert_eq!(
            b.boost(tid, Duration::from_millis(30)),
            Outcome::Failed(libc::ENOENT)
        );
        b.register(tid);
        // A spinning real-time thread may keep this one off its CPU past a short budget, so
        // what is checked is the end state, not the moment in between.
        assert_eq!(b.boost(tid, Duration::from_millis(30)), Outcome::Boosted);
        wait_until_restored(&b, tid);
        assert_eq!(current(tid).unwrap(), before, "the timer gave it back");
        let c = b.thread_counts(tid);
        assert_eq!(
            (c.raised, c.expired, c.restored, c.restore_failures),
            (1, 1, 1, 0)
        );
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }

    #[test]
    fn no_stream_of_requests_keeps_a_thread_up() {
        let Some(b) = booster(1) else { return };
        let (stop, tid, h) = spinner(false);
        let (stop2, other, h2) = spinner(false);
        b.register(tid);
        b.register(other);
        let boost = |t, ms| b.boost(t, Duration::from_millis(ms));
        assert_eq!(boost(tid, 40), Outcome::Boosted);
        // Not extended, and no second boost at once: the cap is one.
        assert_eq!(boost(tid, 1000), Outcome::AlreadyBoosted);
        assert_eq!(boost(other, 1), Outcome::Busy);
        b.restore(tid);
        // It ran its budget: it sits out as long before the next boost. (A booster of its
        // own: its allowance is whole.)
        let c = booster(1).unwrap();
        c.register(tid);
        assert_eq!(c.boost(tid, Duration::from_millis(300)), Outcome::Boosted);
        wait_until_restored(&c, tid);
        assert_eq!(c.would_refuse(tid), Some(Outcome::CoolingDown));
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
        // A boost given back early cools down only as long as it ran, and its unused budget
        // returns to the allowance.
        assert_eq!(boost(other, 60_000), Outcome::Boosted);
        assert!(b.restore(other).unwrap() > Duration::from_secs(50));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(boost(other, 20), Outcome::Boosted);
        b.restore(other);
        std::thread::sleep(Duration::from_millis(20));
        // A boost that runs a long budget out spends the allowance all threads share:
        // another thread, never boosted, must wait for it to refill.
        assert_eq!(boost(other, 300), Outcome::Boosted);
        wait_until_restored(&b, other);
        let (stop3, third, h3) = spinner(false);
        b.register(third);
        assert_eq!(boost(third, 1), Outcome::Busy);
        drop(b);
        for (s, h) in [(stop, h), (stop2, h2), (stop3, h3)] {
            s.store(true, Ordering::Relaxed);
            h.join().unwrap();
        }
    }

    #[test]
    fn restore_retire_and_drop_give_the_thread_its_own_scheduling_back() {
        let Some(b) = booster(1) else { return };
        let (stop, tid, h) = spinner(false);
        let before = current(tid).unwrap();
        b.register(tid);
        assert_eq!(b.boost(tid, Duration::from_secs(60)), Outcome::Boosted);
        assert_eq!(
            current(tid).unwrap(),
            (libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, BOOST_PRIORITY),
            "raised, and its children would not be"
        );
        assert!(b.restore(tid).is_some());
        assert_eq!(current(tid).unwrap(), before, "restore");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(b.boost(tid, Duration::from_secs(60)), Outcome::Boosted);
        drop(b);
        assert_eq!(current(tid).unwrap(), before, "drop");
        // Retired: restored, and a request still on its way is refused.
        let b = booster(1).unwrap();
        b.register(tid);
        assert_eq!(b.boost(tid, Duration::from_secs(60)), Outcome::Boosted);
        b.retire(tid);
        assert_eq!(current(tid).unwrap(), before, "retire");
        assert_eq!(
            b.boost(tid, Duration::from_secs(60)),
            Outcome::Failed(libc::ESRCH)
        );
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }

    #[test]
    fn only_threads_of_this_process_and_not_real_time_ones() {
        let Some(b) = booster(2) else { return };
        // 0 and negative tids would mean the caller or nothing; pid 1 is another process.
        for tid in [0, -1, 1] {
            b.register(tid);
            assert!(matches!(
                b.boost(tid, Duration::from_millis(1)),
                Outcome::Failed(_)
            ));
        }
        assert_eq!(
            current(0).map(|p| p.0),
            Some(libc::SCHED_OTHER),
            "the caller untouched"
        );
        // A thread the operator runs real-time is left as it is.
        let (stop, tid, h) = spinner(false);
        set(tid, libc::SCHED_FIFO, 2).unwrap();
        b.register(tid);
        assert_eq!(
            b.boost(tid, Duration::from_secs(1)),
            Outcome::AlreadyRealTime
        );
        assert_eq!(current(tid).unwrap(), (libc::SCHED_FIFO, 2));
        set(tid, libc::SCHED_OTHER, 0).unwrap();
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }
}
