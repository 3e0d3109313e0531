//! The kernel's locks: the synchronization crate's (`pvsync_guest::locks`) on the kernel's
//! platform.
//!
//! The kernel's own data structures use [`KernelLock`] (a ticket lock taken test-and-set
//! style, with the one taker slot such a lock needs): a tick cannot preempt a holder, and
//! the host sees holders and waiters.

pub use pvsync_guest::locks::RawLock;

use crate::platform::Kernel;

/// A ticket lock (FIFO, or test-and-set for kernel locks).
pub type TicketLock = pvsync_guest::locks::TicketLock<Kernel>;
/// An MCS queued lock whose waiters halt and are kicked.
pub type McsLock = pvsync_guest::locks::McsLock<Kernel>;
/// Data behind a lock of algorithm `L`.
pub type SpinLock<T, L> = pvsync_guest::locks::SpinLock<T, L>;
/// The lock kernel data structures use (run queues, wait queues, allocators, console).
pub type KernelLock<T> = SpinLock<T, pvsync_guest::locks::KernelTicketLock<Kernel>>;
