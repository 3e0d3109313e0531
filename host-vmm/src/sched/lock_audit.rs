//! The audit behind "a VM's shared region is never read under a lock other VMs need": a
//! backend's scheduler lock is taken through [`Audited`], which marks the thread as holding
//! it, and every read of a guest's region calls [`guest_read`], which counts the reads made
//! while the mark is set. The count is in the run's metrics (`audit`) and must stay 0: a
//! read of guest memory under the lock would let one VM's region (its size, a slow page)
//! hold up every VM's scheduling.
//!
//! ```
//! use host_vmm::sched::lock_audit::{guest_read, reads_under_lock, Audited};
//! let lock = std::sync::Mutex::new(0);
//! let before = reads_under_lock();
//! guest_read();
//! assert_eq!(reads_under_lock(), before, "no lock held: not counted");
//! {
//!     let mut g = Audited::new(lock.lock().unwrap());
//!     *g += 1;
//!     guest_read();
//! }
//! assert_eq!(reads_under_lock(), before + 1);
//! ```

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    /// Scheduler locks this thread holds.
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// Guest-region reads made while holding a scheduler lock, over the process.
static READS_UNDER_LOCK: AtomicU64 = AtomicU64::new(0);

/// A scheduler lock's guard, marking its thread as holding the lock while it lives.
pub struct Audited<G> {
    /// Always `Some` but in `into_inner`, which takes it.
    guard: Option<G>,
    /// Not `Send`: the mark is this thread's, and must be taken off on this thread.
    _this_thread: PhantomData<*const ()>,
}

impl<G> Audited<G> {
    pub fn new(guard: G) -> Self {
        HELD.with(|h| h.set(h.get() + 1));
        Audited {
            guard: Some(guard),
            _this_thread: PhantomData,
        }
    }

    /// The guard itself, the thread no longer marked (for a condition variable's wait,
    /// which releases the lock; wrap the guard it returns again).
    pub fn into_inner(mut self) -> G {
        self.guard.take().expect("an audited guard holds its guard")
    }
}

impl<G> Drop for Audited<G> {
    fn drop(&mut self) {
        HELD.with(|h| {
            debug_assert!(h.get() > 0, "an audited lock released twice");
            h.set(h.get().saturating_sub(1));
        });
    }
}

impl<G: Deref> Deref for Audited<G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        self.guard
            .as_ref()
            .expect("an audited guard holds its guard")
    }
}

impl<G: DerefMut> DerefMut for Audited<G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        self.guard
            .as_mut()
            .expect("an audited guard holds its guard")
    }
}

/// Called by every read of a guest's shared region: counted if this thread holds a
/// scheduler lock.
pub fn guest_read() {
    if HELD.with(Cell::get) > 0 {
        READS_UNDER_LOCK.fetch_add(1, Ordering::Relaxed);
    }
}

/// Guest-region reads made under a scheduler lock so far (must stay 0).
pub fn reads_under_lock() -> u64 {
    READS_UNDER_LOCK.load(Ordering::Relaxed)
}
