//! An exhaustive model of the handshake between an RCU updater, a reader CPU and the
//! grace-period kthread under x86-TSO, which shows why `rcu::request_gp` needs a full
//! barrier between the caller's earlier stores and its read of the grace-period counter.
//!
//! The pattern is store buffering: the updater stores (unpublishes the old element), then
//! loads `GP_STARTED` to pick the grace period it waits for. x86 may let that load pass the
//! store, which still sits in the updater's store buffer. The updater can then read the
//! counter before a new grace period starts, pick that grace period, while a reader on
//! another CPU, which reported its quiescent state for it, starts a read-side section and
//! still reads the old pointer from memory. The grace period ends without waiting for that
//! reader and the updater frees the element under it. With `mfence` between the store and
//! the load, the store is in memory before the load reads the counter, so every reader the
//! chosen grace period does not wait for sees the new pointer.
//!
//! Each thread runs a short program mirroring the ordering-relevant steps of `rcu.rs`
//! (below, `*_PROGRAM`); `explore` tries every interleaving of the threads' steps and of
//! their store-buffer flushes (each CPU's buffer drains in order; a load reads its own
//! newest buffered store first, else memory; `mfence` and locked instructions wait for an
//! empty buffer), memoizing states. It uses only `core` and `alloc`, so a host test can
//! include it with `#[path = ".../guest-kernel/src/rcu_model.rs"] mod rcu_model;`:
//!
//! ```ignore
//! assert!(rcu_model::explore(true).counterexample.is_none());
//! let bad = rcu_model::explore(false).counterexample.expect("the fence is needed");
//! for step in &bad { println!("{step}"); }
//! ```
//!
//! The guest runs the same check with `test=rcu-model`.

extern crate alloc;

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::fmt;

/// Shared memory locations of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// The RCU-protected pointer: [`OLD`] or [`NEW`].
    Ptr,
    /// `GP_STARTED`.
    GpStarted,
    /// `GP_COMPLETED`.
    GpCompleted,
    /// The reader CPU's `QS_GP` (last grace period it reported a quiescent state for).
    ReaderQs,
    /// 1 once the updater freed the old element.
    Freed,
}

const LOCS: usize = 5;
/// Values of [`Loc::Ptr`].
pub const OLD: u8 = 0;
pub const NEW: u8 = 1;

/// An operand: a constant, a register, or a register plus one.
#[derive(Clone, Copy, Debug)]
pub enum Val {
    Const(u8),
    Reg(usize),
    RegPlus1(usize),
}

/// One step of a thread's program.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// A plain store (into the thread's store buffer).
    Store(Loc, Val),
    /// A load into a register.
    Load(Loc, usize),
    /// `mfence`, or a locked instruction: waits until the store buffer is empty.
    Fence,
    /// A wait loop: enabled once a load of the location reads at least the value.
    AwaitAtLeast(Loc, Val),
    /// The reader dereferences the pointer in the register: it must not be freed.
    Use(usize),
}

/// The updater: `synchronize_rcu` after unpublishing the old element.
pub const UPDATER_PROGRAM: [Op; 5] = [
    // rcu_assign_pointer(gp, new): a plain (release) store.
    Op::Store(Loc::Ptr, Val::Const(NEW)),
    // request_gp: fence(SeqCst) (left out by explore(false)).
    Op::Fence,
    // request_gp: target = GP_STARTED + 1.
    Op::Load(Loc::GpStarted, 0),
    // GP_DONE_WQ.wait_until(GP_COMPLETED >= target).
    Op::AwaitAtLeast(Loc::GpCompleted, Val::RegPlus1(0)),
    // The caller frees the old element.
    Op::Store(Loc::Freed, Val::Const(1)),
];

/// The grace-period kthread running grace period 1.
pub const KTHREAD_PROGRAM: [Op; 5] = [
    // GP_STARTED.store(n, SeqCst): an xchg, a full barrier.
    Op::Store(Loc::GpStarted, Val::Const(1)),
    Op::Fence,
    // holdouts(): waits until the reader CPU reported a quiescent state for n.
    Op::AwaitAtLeast(Loc::ReaderQs, Val::Const(1)),
    // GP_COMPLETED.store(n, SeqCst).
    Op::Store(Loc::GpCompleted, Val::Const(1)),
    Op::Fence,
];

/// The reader CPU: a quiescent state (tick, context switch), then a read-side section.
pub const READER_PROGRAM: [Op; 10] = [
    // report_qs: started = GP_STARTED; QS_GP[c].store(started, SeqCst).
    Op::Load(Loc::GpStarted, 0),
    Op::Store(Loc::ReaderQs, Val::Reg(0)),
    Op::Fence,
    // read_lock: NESTING.fetch_add(SeqCst), a locked instruction.
    Op::Fence,
    // p = rcu_dereference(gp); use *p.
    Op::Load(Loc::Ptr, 1),
    Op::Use(1),
    // read_unlock: NESTING.fetch_sub(SeqCst); report_qs again.
    Op::Fence,
    Op::Load(Loc::GpStarted, 0),
    Op::Store(Loc::ReaderQs, Val::Reg(0)),
    Op::Fence,
];

const THREADS: usize = 3;
const NAMES: [&str; THREADS] = ["updater", "gp-kthread", "reader"];
/// Longest store buffer a program can fill (stores between two fences).
const BUF: usize = 4;

/// One transition of the model, for counterexamples.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub thread: usize,
    /// The op executed, or None for a store-buffer flush.
    pub op: Option<Op>,
    /// For a flush: the store that reached memory.
    pub flushed: Option<(Loc, u8)>,
    /// For a load: the value read.
    pub read: Option<u8>,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = NAMES[self.thread];
        match (self.op, self.flushed, self.read) {
            (None, Some((loc, v)), _) => write!(f, "{who}: store {loc:?}={v} reaches memory"),
            (Some(op), _, Some(v)) => write!(f, "{who}: {op:?} reads {v}"),
            (Some(op), _, None) => write!(f, "{who}: {op:?}"),
            _ => write!(f, "{who}: ?"),
        }
    }
}

/// What `explore` found.
pub struct Outcome {
    /// Distinct states visited.
    pub states: usize,
    /// An interleaving in which the reader used the old element after it was freed.
    pub counterexample: Option<Vec<Step>>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Thread {
    pc: u8,
    regs: [u8; 2],
    len: u8,
    buf: [(u8, u8); BUF],
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct State {
    mem: [u8; LOCS],
    threads: [Thread; THREADS],
}

fn program(t: usize, fence: bool) -> &'static [Op] {
    match t {
        0 if fence => &UPDATER_PROGRAM,
        0 => &UPDATER_NO_FENCE,
        1 => &KTHREAD_PROGRAM,
        _ => &READER_PROGRAM,
    }
}

/// The updater without request_gp's fence.
const UPDATER_NO_FENCE: [Op; 4] = [
    UPDATER_PROGRAM[0],
    UPDATER_PROGRAM[2],
    UPDATER_PROGRAM[3],
    UPDATER_PROGRAM[4],
];

impl Thread {
    /// A load as this thread sees it: its newest buffered store to `loc`, else memory.
    fn read(&self, mem: &[u8; LOCS], loc: Loc) -> u8 {
        self.buf[..self.len as usize]
            .iter()
            .rev()
            .find(|(l, _)| *l == loc as u8)
            .map_or(mem[loc as usize], |&(_, v)| v)
    }

    fn value(&self, v: Val) -> u8 {
        match v {
            Val::Const(c) => c,
            Val::Reg(r) => self.regs[r],
            Val::RegPlus1(r) => self.regs[r] + 1,
        }
    }
}

/// The loaded value and whether the reader used a freed element.
struct Effect {
    read: Option<u8>,
    violation: bool,
}

/// Executes `op` for thread `t` in `s` if it is enabled.
fn execute(s: &mut State, t: usize, op: Op) -> Option<Effect> {
    let mem = s.mem;
    let th = &mut s.threads[t];
    let mut effect = Effect {
        read: None,
        violation: false,
    };
    match op {
        Op::Store(loc, v) => {
            let v = th.value(v);
            let n = th.len as usize;
            assert!(n < BUF, "model store buffer too small");
            th.buf[n] = (loc as u8, v);
            th.len += 1;
        }
        Op::Load(loc, r) => {
            let v = th.read(&mem, loc);
            th.regs[r] = v;
            effect.read = Some(v);
        }
        Op::Fence => {
            if th.len != 0 {
                return None;
            }
        }
        Op::AwaitAtLeast(loc, v) => {
            let got = th.read(&mem, loc);
            if got < th.value(v) {
                return None;
            }
            effect.read = Some(got);
        }
        Op::Use(r) => {
            let freed = th.read(&mem, Loc::Freed);
            effect.read = Some(freed);
            effect.violation = th.regs[r] == OLD && freed == 1;
        }
    }
    th.pc += 1;
    Some(effect)
}

/// Drains the oldest entry of thread `t`'s store buffer into memory.
fn flush(s: &mut State, t: usize) -> Option<(Loc, u8)> {
    let th = &mut s.threads[t];
    if th.len == 0 {
        return None;
    }
    let (loc, v) = th.buf[0];
    th.buf.copy_within(1.., 0);
    th.len -= 1;
    s.mem[loc as usize] = v;
    const ALL: [Loc; LOCS] = [
        Loc::Ptr,
        Loc::GpStarted,
        Loc::GpCompleted,
        Loc::ReaderQs,
        Loc::Freed,
    ];
    Some((ALL[loc as usize], v))
}

/// Explores every interleaving (with the updater's fence when `updater_fence`); stops at
/// the first use of a freed element.
pub fn explore(updater_fence: bool) -> Outcome {
    let start = State {
        mem: [OLD, 0, 0, 0, 0],
        threads: [Thread {
            pc: 0,
            regs: [0; 2],
            len: 0,
            buf: [(0, 0); BUF],
        }; THREADS],
    };
    let mut seen = BTreeSet::new();
    let mut path = Vec::new();
    let found = dfs(start, updater_fence, &mut seen, &mut path);
    Outcome {
        states: seen.len(),
        counterexample: found.then_some(path),
    }
}

fn dfs(s: State, fence: bool, seen: &mut BTreeSet<State>, path: &mut Vec<Step>) -> bool {
    if !seen.insert(s) {
        return false;
    }
    for t in 0..THREADS {
        let prog = program(t, fence);
        if let Some(&op) = prog.get(s.threads[t].pc as usize) {
            let mut next = s;
            if let Some(effect) = execute(&mut next, t, op) {
                path.push(Step {
                    thread: t,
                    op: Some(op),
                    flushed: None,
                    read: effect.read,
                });
                if effect.violation || dfs(next, fence, seen, path) {
                    return true;
                }
                path.pop();
            }
        }
        let mut next = s;
        if let Some(store) = flush(&mut next, t) {
            path.push(Step {
                thread: t,
                op: None,
                flushed: Some(store),
                read: None,
            });
            if dfs(next, fence, seen, path) {
                return true;
            }
            path.pop();
        }
    }
    false
}
