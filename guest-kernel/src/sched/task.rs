//! Tasks: a kernel stack, a saved stack pointer, a state, and what to run.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use crate::arch::context;
use crate::locks::{KernelLock, SpinLock};

/// Bytes of kernel stack per task.
pub const KSTACK_SIZE: usize = 32 * 1024;
/// Heap a task takes (defined by the heap, which is sized by it): the kernel stack plus the
/// task itself, its entry closure and its run-queue slot.
pub use crate::mm::heap::TASK_HEAP_BYTES;
const _: () = assert!(KSTACK_SIZE as u64 + 1024 <= TASK_HEAP_BYTES);

/// The heap had no room for a task's kernel stack.
#[derive(Clone, Copy, Debug)]
pub struct OutOfHeap;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Ready = 0,
    Running = 1,
    Blocked = 2,
    Dead = 3,
}

impl State {
    fn from_raw(v: u8) -> State {
        match v {
            0 => State::Ready,
            1 => State::Running,
            2 => State::Blocked,
            _ => State::Dead,
        }
    }
}

pub type Entry = Box<dyn FnOnce() + Send>;

pub struct Task {
    pub id: u64,
    pub name: &'static str,
    /// The CPU this task runs on (tasks do not migrate).
    pub cpu: u32,
    pub is_idle: bool,
    state: AtomicU8,
    /// Stack pointer while switched out; touched only by `cpu`'s scheduler, interrupts off
    /// (an atomic for `Sync`: relaxed accesses are plain moves).
    saved_rsp: AtomicU64,
    /// None for a task adopted from a boot stack.
    kstack: Option<Box<[MaybeUninit<u64>]>>,
    entry: KernelLock<Option<Entry>>,
    /// The user address space, for user tasks.
    pub aspace: Option<Arc<crate::mm::aspace::AddressSpace>>,
    done: AtomicBool,
    exit_code: AtomicU64,
    pub joiners: crate::sched::WaitQueue,
    /// Ticks this task has run in its current slice.
    pub slice_ticks: AtomicU64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Task {
    /// A task that will start by calling `entry` on `cpu`. Panics if the heap has no room
    /// for its stack; see [`Task::try_new`].
    pub fn new(
        name: &'static str,
        cpu: u32,
        entry: Entry,
        aspace: Option<Arc<crate::mm::aspace::AddressSpace>>,
        is_idle: bool,
    ) -> Arc<Task> {
        Self::try_new(name, cpu, entry, aspace, is_idle).unwrap_or_else(|OutOfHeap| {
            let (size, free) = crate::mm::heap::stats();
            panic!("no heap for the kernel stack of task '{name}' ({free} of {size} bytes free)")
        })
    }

    /// Like [`Task::new`], but an exhausted heap is an error, not a panic: the stack, the
    /// one big allocation, is reserved fallibly first.
    pub fn try_new(
        name: &'static str,
        cpu: u32,
        entry: Entry,
        aspace: Option<Arc<crate::mm::aspace::AddressSpace>>,
        is_idle: bool,
    ) -> Result<Arc<Task>, OutOfHeap> {
        // Not zeroed: only the initial frame is written, so a new task touches just the
        // stack pages it uses (the first touch of a page is costly under shadow paging).
        let mut stack = Vec::new();
        stack
            .try_reserve_exact(KSTACK_SIZE / 8)
            .map_err(|_| OutOfHeap)?;
        stack.resize(KSTACK_SIZE / 8, MaybeUninit::<u64>::uninit());
        let mut stack = stack.into_boxed_slice();
        // The heap guarantees 8-byte alignment only: round the top down to 16.
        let mut top = stack.len();
        if !(stack.as_ptr() as usize + top * 8).is_multiple_of(16) {
            top -= 1;
        }
        // The frame the first switch to this stack pops. The stack top is 16-byte aligned,
        // so task_entry starts aligned; the new task finds itself as its CPU's current task.
        let frame = context::initial_frame(super::task_entry);
        for (slot, v) in stack[top - frame.len()..top].iter_mut().zip(frame) {
            slot.write(v);
        }
        let rsp = stack.as_ptr() as u64 + ((top - frame.len()) * 8) as u64;
        Ok(Arc::new(Task {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            cpu,
            is_idle,
            state: AtomicU8::new(State::Ready as u8),
            saved_rsp: AtomicU64::new(rsp),
            kstack: Some(stack),
            entry: SpinLock::kernel(Some(entry)),
            aspace,
            done: AtomicBool::new(false),
            exit_code: AtomicU64::new(0),
            joiners: crate::sched::WaitQueue::new(),
            slice_ticks: AtomicU64::new(0),
        }))
    }

    /// The context the CPU is already running (its boot stack), as a task.
    pub fn adopt_current(name: &'static str, cpu: u32, is_idle: bool) -> Arc<Task> {
        Arc::new(Task {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            cpu,
            is_idle,
            state: AtomicU8::new(State::Running as u8),
            saved_rsp: AtomicU64::new(0),
            kstack: None,
            entry: SpinLock::kernel(None),
            aspace: None,
            done: AtomicBool::new(false),
            exit_code: AtomicU64::new(0),
            joiners: crate::sched::WaitQueue::new(),
            slice_ticks: AtomicU64::new(0),
        })
    }

    pub fn state(&self) -> State {
        State::from_raw(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Atomically moves `from` -> `to`; false if the state was not `from`.
    pub fn transition(&self, from: State, to: State) -> bool {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Where a switch away from this task saves its stack pointer.
    pub fn saved_rsp_ptr(&self) -> *mut u64 {
        self.saved_rsp.as_ptr()
    }

    /// The stack pointer this task was switched out with.
    pub fn saved_rsp(&self) -> u64 {
        self.saved_rsp.load(Ordering::Relaxed)
    }

    /// Top of the kernel stack (what TSS.RSP0 must hold while the task runs user code).
    pub fn kstack_top(&self) -> Option<u64> {
        self.kstack
            .as_ref()
            .map(|s| s.as_ptr() as u64 + (s.len() * 8) as u64)
    }

    pub fn take_entry(&self) -> Option<Entry> {
        self.entry.lock().take()
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub fn exit_code(&self) -> u64 {
        self.exit_code.load(Ordering::Acquire)
    }

    pub(super) fn set_exit_code(&self, code: u64) {
        self.exit_code.store(code, Ordering::Release);
    }

    pub(super) fn mark_done(&self, code: u64) {
        self.exit_code.store(code, Ordering::Release);
        self.done.store(true, Ordering::Release);
    }
}
