//! Data behind a lock: the guard API kernels use.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};

use super::RawLock;
use crate::platform::Platform;

/// Data behind a lock of algorithm `L`.
pub struct SpinLock<T, L: RawLock> {
    raw: L,
    data: UnsafeCell<T>,
}

// SAFETY: the raw lock serialises access to `data` (for every L but BrokenLock, which exists
// to show what happens when it does not).
unsafe impl<T: Send, L: RawLock> Sync for SpinLock<T, L> {}

impl<T, L: RawLock> SpinLock<T, L> {
    /// `data` behind `raw`.
    pub const fn new(raw: L, data: T) -> Self {
        SpinLock {
            raw,
            data: UnsafeCell::new(data),
        }
    }

    /// Waits for the lock (preemption disabled while held).
    pub fn lock(&self) -> Guard<'_, T, L> {
        self.raw.lock();
        Guard {
            lock: self,
            irqs_were_enabled: None,
        }
    }

    /// Disables interrupts too, restoring them on unlock (for data interrupt handlers use).
    pub fn lock_irqsave(&self) -> Guard<'_, T, L> {
        let were = L::Platform::irqs_save();
        self.raw.lock();
        Guard {
            lock: self,
            irqs_were_enabled: Some(were),
        }
    }

    /// The lock algorithm itself.
    pub fn raw(&self) -> &L {
        &self.raw
    }

    /// The guard of a lock the caller has just taken some other way (`try_lock`).
    pub(super) fn held(&self) -> Guard<'_, T, L> {
        Guard {
            lock: self,
            irqs_were_enabled: None,
        }
    }
}

/// Access to the data while the lock is held; releases it when dropped.
pub struct Guard<'a, T, L: RawLock> {
    lock: &'a SpinLock<T, L>,
    irqs_were_enabled: Option<bool>,
}

impl<T, L: RawLock> Deref for Guard<'_, T, L> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T, L: RawLock> DerefMut for Guard<'_, T, L> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock exclusively.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T, L: RawLock> Drop for Guard<'_, T, L> {
    fn drop(&mut self) {
        self.lock.raw.release();
        // Interrupts back on before preemption: preempt_enable switches to a task woken
        // meanwhile only when it sees interrupts enabled.
        if let Some(were) = self.irqs_were_enabled {
            L::Platform::irqs_restore(were);
        }
        L::Platform::preempt_enable();
    }
}
