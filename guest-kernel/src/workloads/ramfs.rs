//! A RAM file system for `postmark`: a fixed-size hash table of buckets, each an
//! RCU-protected singly linked list of files (a u64 name and a payload of u64 words).
//!
//! Readers traverse a bucket inside an RCU read-side critical section with acquire loads.
//! Writers take the bucket's spinlock and publish with release stores: a new file goes in
//! at the head; a changed file is a new node (copy-update) that replaces the old one in its
//! predecessor's link; a deleted file is unlinked. A node taken out of a list is freed
//! through `call_rcu`, once no reader can still hold it. The file system counts the
//! callbacks it has pending and the bytes they hold, with their peaks.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering::*};

use crate::locks::{SpinLock, TicketLock};
use crate::rcu;

struct Node {
    id: u64,
    next: AtomicPtr<Node>,
    data: Box<[u64]>,
}

impl Node {
    fn bytes(&self) -> u64 {
        (core::mem::size_of::<Node>() + self.data.len() * 8) as u64
    }
}

struct Bucket {
    head: AtomicPtr<Node>,
    /// Serialises the bucket's writers (readers take no lock).
    lock: SpinLock<(), TicketLock>,
}

/// Callbacks and bytes waiting for a grace period, with their peaks.
#[derive(Default)]
struct Pending {
    cbs: AtomicU64,
    cbs_peak: AtomicU64,
    bytes: AtomicU64,
    bytes_peak: AtomicU64,
}

pub struct RamFs {
    buckets: Box<[Bucket]>,
    pending: Arc<Pending>,
}

/// A node out of every list, on its way to `call_rcu`.
struct Retired(*mut Node);

// SAFETY: a retired node is reachable from no list and owned by the callback alone (its
// payload and atomics are Send).
unsafe impl Send for Retired {}

/// The node behind `p`, if not null.
///
/// Module invariant: every pointer handed here was read from a bucket's list (or is one
/// just taken out of it, not yet given to `call_rcu`'s callback), and callers hold either an RCU read guard or the lock of the node's bucket: a node is freed
/// only by [`free`] after it left its list (under the lock) and a grace period passed (or
/// when the file system itself goes), so it outlives both.
fn node<'a>(p: *mut Node) -> Option<&'a Node> {
    // SAFETY: see above: `p` is null or a node allocated by `Box::into_raw` in `create` or
    // `update` that is not freed while the caller's guard or lock is held.
    unsafe { p.as_ref() }
}

/// Frees a node no list and no reader can reach any more.
fn free(p: *mut Node) {
    // SAFETY: `p` came from `Box::into_raw` and is out of every list, and either a grace
    // period has passed since (the `call_rcu` callback) or the file system is being dropped
    // (no reader left): nothing else refers to it.
    drop(unsafe { Box::from_raw(p) });
}

fn hash(id: u64) -> u64 {
    (id ^ (id >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 32
}

/// A payload's checksum (a sequential fold, so that appending continues it).
pub fn checksum(from: u64, words: &[u64]) -> u64 {
    words
        .iter()
        .fold(from, |c, &w| (c ^ w).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The checksum of an empty file.
pub const EMPTY_SUM: u64 = 0xcbf2_9ce4_8422_2325;

impl RamFs {
    pub fn new(buckets: usize) -> RamFs {
        RamFs {
            buckets: (0..buckets)
                .map(|_| Bucket {
                    head: AtomicPtr::new(null_mut()),
                    lock: SpinLock::new(TicketLock::new(), ()),
                })
                .collect(),
            pending: Arc::new(Pending::default()),
        }
    }

    fn bucket(&self, id: u64) -> &Bucket {
        &self.buckets[(hash(id) % self.buckets.len() as u64) as usize]
    }

    /// The link pointing at file `id` in bucket `b` and the file, if present. The caller
    /// holds an RCU read guard or the bucket's lock.
    fn find(b: &Bucket, id: u64) -> Option<(&AtomicPtr<Node>, &Node)> {
        let mut link = &b.head;
        while let Some(n) = node(link.load(Acquire)) {
            if n.id == id {
                return Some((link, n));
            }
            link = &n.next;
        }
        None
    }

    /// Looks file `id` up under an RCU read guard and applies `f` to its payload.
    pub fn read<R>(&self, id: u64, f: impl FnOnce(&[u64]) -> R) -> Option<R> {
        let _g = rcu::read();
        Self::find(self.bucket(id), id).map(|(_, n)| f(&n.data))
    }

    /// Creates file `id` with `data`; false if it exists.
    pub fn create(&self, id: u64, data: Box<[u64]>) -> bool {
        let b = self.bucket(id);
        let new = Box::new(Node {
            id,
            next: AtomicPtr::new(null_mut()),
            data,
        });
        let _g = b.lock.lock();
        if Self::find(b, id).is_some() {
            return false;
        }
        new.next.store(b.head.load(Relaxed), Relaxed);
        // Release: a reader that finds the node sees it initialised.
        b.head.store(Box::into_raw(new), Release);
        true
    }

    /// Replaces file `id`'s payload with `f(old payload)` (copy-update, under the bucket's
    /// lock); false if there is no such file.
    pub fn update(&self, id: u64, f: impl FnOnce(&[u64]) -> Box<[u64]>) -> bool {
        let b = self.bucket(id);
        let g = b.lock.lock();
        let Some((link, old)) = Self::find(b, id) else {
            return false;
        };
        let new = Box::new(Node {
            id,
            next: AtomicPtr::new(old.next.load(Relaxed)),
            data: f(&old.data),
        });
        link.store(Box::into_raw(new), Release);
        let p = old as *const Node as *mut Node;
        drop(g);
        self.retire(p);
        true
    }

    /// Deletes file `id`; false if there is no such file.
    pub fn delete(&self, id: u64) -> bool {
        let b = self.bucket(id);
        let g = b.lock.lock();
        let Some((link, n)) = Self::find(b, id) else {
            return false;
        };
        // Readers already on the node may go on to its successors.
        link.store(n.next.load(Relaxed), Release);
        let p = n as *const Node as *mut Node;
        drop(g);
        self.retire(p);
        true
    }

    /// Frees `p`, which just left its list, after a grace period.
    fn retire(&self, p: *mut Node) {
        let bytes = node(p).map_or(0, Node::bytes);
        let pending = self.pending.clone();
        pending
            .cbs_peak
            .fetch_max(pending.cbs.fetch_add(1, SeqCst) + 1, Relaxed);
        pending
            .bytes_peak
            .fetch_max(pending.bytes.fetch_add(bytes, SeqCst) + bytes, Relaxed);
        let r = Retired(p);
        rcu::call(move || {
            let r = r;
            free(r.0);
            pending.cbs.fetch_sub(1, SeqCst);
            pending.bytes.fetch_sub(bytes, SeqCst);
        });
    }

    /// Every file's name, payload length in words and checksum (quiescent: no writer runs).
    pub fn files(&self) -> Vec<(u64, usize, u64)> {
        let mut out = Vec::new();
        for b in self.buckets.iter() {
            let _g = b.lock.lock();
            let mut p = b.head.load(Acquire);
            while let Some(n) = node(p) {
                out.push((n.id, n.data.len(), checksum(EMPTY_SUM, &n.data)));
                p = n.next.load(Acquire);
            }
        }
        out
    }

    /// Callbacks pending now and at most, bytes they hold now and at most.
    pub fn pending(&self) -> (u64, u64, u64, u64) {
        let p = &self.pending;
        (
            p.cbs.load(SeqCst),
            p.cbs_peak.load(Relaxed),
            p.bytes.load(SeqCst),
            p.bytes_peak.load(Relaxed),
        )
    }
}

impl Drop for RamFs {
    fn drop(&mut self) {
        for b in self.buckets.iter() {
            let mut p = b.head.swap(null_mut(), Acquire);
            while let Some(n) = node(p) {
                let next = n.next.load(Acquire);
                free(p);
                p = next;
            }
        }
    }
}
