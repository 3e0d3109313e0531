//! The per-CPU state the crate keeps: where the CPU publishes its record, how deep its
//! framed updates nest, how many locks it holds, and its queued-lock nodes.

use core::cell::{Cell, UnsafeCell};
use core::mem::MaybeUninit;
use shared_abi::VcpuRecord;

use crate::locks::mcs::McsNodes;
use crate::region::SharedBitmap;

/// One CPU's state. A kernel embeds one per CPU (in its per-CPU block) and hands the
/// calling CPU's out through [`Platform::cpu`](crate::Platform::cpu). Only its own CPU
/// touches the cells; other CPUs reach its queued-lock nodes, which are atomic.
pub struct CpuSync {
    id: Cell<u32>,
    /// Where this CPU publishes: its record in the shared region once that exists, `sink`
    /// before (publishing then never checks whether there is a region).
    record: Cell<*mut VcpuRecord>,
    sink: UnsafeCell<MaybeUninit<VcpuRecord>>,
    /// The CPU's `ipi_wait` bitmap in the region (none before the region exists), found
    /// once: every shootdown publishes into it.
    ipi_wait: Cell<SharedBitmap>,
    /// Nesting of framed record updates (an interrupt handler's inside the code's).
    publish_depth: Cell<u32>,
    locks_held: Cell<u32>,
    pub(crate) mcs: McsNodes,
}

// SAFETY: the cells are only used by the CPU that owns the block: the crate reaches a block
// only through `Platform::cpu`, whose (unsafe trait's) contract is that it returns the
// running CPU's own block, and the public writers that take a block are `unsafe fn`s with
// the same contract. An interrupt handler that changes the cells restores them before it
// returns; the queued-lock nodes other CPUs reach are atomics.
unsafe impl Sync for CpuSync {}

impl CpuSync {
    crate::sync::const_fn! {
        /// A block for a CPU not set up yet.
        pub fn new() -> Self {
            CpuSync {
                id: Cell::new(0),
                record: Cell::new(core::ptr::null_mut()),
                // All-zero is a valid record (plain integers).
                sink: UnsafeCell::new(MaybeUninit::zeroed()),
                ipi_wait: Cell::new(SharedBitmap::NONE),
                publish_depth: Cell::new(0),
                locks_held: Cell::new(0),
                mcs: McsNodes::new(),
            }
        }
    }

    /// Sets the block up for CPU `id` (its index in the shared region). Call it on that
    /// CPU, before it takes a lock; the block must not move afterwards (it is `'static`).
    pub fn init(&'static self, id: u32) {
        self.id.set(id);
        self.record.set(self.sink.get().cast());
    }

    /// The CPU's id.
    #[inline]
    pub fn id(&self) -> u32 {
        self.id.get()
    }

    /// Where the CPU publishes (its region record, or its private sink).
    #[inline]
    pub(crate) fn record(&self) -> *mut VcpuRecord {
        // Set by `init`, which `Platform`'s contract requires before the block is used (a
        // check here, on every lock and preemption-count change, costs measurably: bench
        // `lock_uncontended` +35% on this host).
        let r = self.record.get();
        debug_assert!(!r.is_null(), "CpuSync used before init");
        r
    }

    pub(crate) fn set_record(&self, rec: *mut VcpuRecord) {
        self.record.set(rec);
    }

    /// The CPU's `ipi_wait` bitmap (an empty one without a region).
    #[inline]
    pub(crate) fn ipi_wait(&self) -> SharedBitmap {
        self.ipi_wait.get()
    }

    pub(crate) fn set_ipi_wait(&self, bitmap: SharedBitmap) {
        self.ipi_wait.set(bitmap);
    }

    /// Whether the CPU is in the middle of a framed record update (its `seq` is odd): it
    /// must not switch tasks there, or another task's update would interleave with it.
    #[inline]
    pub fn publishing(&self) -> bool {
        self.publish_depth.get() != 0
    }

    pub(crate) fn publish_depth(&self) -> &Cell<u32> {
        &self.publish_depth
    }

    /// Spinlocks the CPU holds.
    #[inline]
    pub fn locks_held(&self) -> u32 {
        self.locks_held.get()
    }

    /// Publishes the CPU's preempt-disable depth (one store into its record).
    ///
    /// # Safety
    /// `self` must be the calling CPU's own block (what [`Platform::cpu`] returns on it), and
    /// the caller must not move to another CPU meanwhile: only its owner writes a record.
    ///
    /// [`Platform::cpu`]: crate::Platform::cpu
    #[inline]
    pub unsafe fn publish_preempt_count(&self, v: u32) {
        crate::record::set_preempt_count(self, v);
    }

    /// Counts a spinlock taken (+1) or released (-1) and publishes the count.
    #[inline]
    pub(crate) fn add_locks_held(&self, delta: i32) {
        let v = self.locks_held.get().wrapping_add_signed(delta);
        self.locks_held.set(v);
        crate::record::set_locks_held(self, v);
    }
}

impl Default for CpuSync {
    fn default() -> Self {
        Self::new()
    }
}
