//! `test=ebizzy`: worker threads allocate, search and free records under shared bucket
//! spinlocks. Each operation allocates a record (outside the lock), picks a bucket and a
//! key with its seeded generator, takes the bucket's ticket lock, searches the bucket for
//! the key and either unlinks the record found (freed after the unlock) or inserts the new
//! one (the unused record is freed instead). Every lock acquisition's wait (TSC before the
//! lock to acquired) goes into the worker's fixed-size histogram; the histograms are merged
//! at the end.
//!
//! Self-check: each operation toggles its key's presence, so whatever the interleaving the
//! final set holds exactly the keys operated on an odd number of times. Each worker XORs
//! its keys into its own bitmap; the XOR of the bitmaps must equal the final set, and the
//! records inserted minus those freed must equal the records left.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::hist::Hist;
use super::Rng;
use crate::arch::tsc;
use crate::locks::{KernelLock, SpinLock, TicketLock};
use crate::println;

/// Operations when `work=` is not given (about 2 s with 4 vCPUs on the emulating host).
pub const DEFAULT_WORK: u64 = 3000;
const BUCKETS: usize = 8;
const KEYS_PER_BUCKET: u64 = 32;
const KEYS: usize = BUCKETS * KEYS_PER_BUCKET as usize;

/// What ebizzy allocates: a key and a little payload.
struct Record {
    key: u64,
    _payload: [u64; 3],
}

type Bucket = SpinLock<Vec<Box<Record>>, TicketLock>;

struct Shared {
    buckets: Vec<Bucket>,
    /// XOR of every worker's toggle bitmap (one byte per key: 0 or 1).
    model: KernelLock<Vec<u8>>,
    waits: KernelLock<Hist>,
    inserted: AtomicU64,
    freed: AtomicU64,
}

fn worker(s: &Shared, seed: u64, i: usize, ops: u64) -> u64 {
    let mut rng = Rng::new(seed, i);
    let mut hist = Hist::new();
    let mut toggles = vec![0u8; KEYS];
    let (mut inserted, mut freed) = (0, 0);
    for n in 0..ops {
        let r = rng.next();
        let b = (r % BUCKETS as u64) as usize;
        let key = (r >> 16) % KEYS_PER_BUCKET;
        let new = Box::new(Record {
            key,
            _payload: [r, n, i as u64],
        });
        let t0 = tsc::now();
        let mut g = s.buckets[b].lock();
        hist.record(tsc::now().wrapping_sub(t0));
        let unused = match g.iter().position(|rec| rec.key == key) {
            Some(at) => {
                freed += 1;
                g.swap_remove(at)
            }
            None => {
                inserted += 1;
                g.push(new);
                drop(g);
                toggles[b * KEYS_PER_BUCKET as usize + key as usize] ^= 1;
                continue;
            }
        };
        drop(g);
        toggles[b * KEYS_PER_BUCKET as usize + key as usize] ^= 1;
        drop(unused);
        drop(new);
    }
    s.inserted.fetch_add(inserted, Relaxed);
    s.freed.fetch_add(freed, Relaxed);
    for (m, t) in s.model.lock().iter_mut().zip(&toggles) {
        *m ^= t;
    }
    s.waits.lock().merge(&hist);
    ops
}

pub fn run(threads: Option<usize>, work: Option<u64>, seed: u64) -> bool {
    let t = super::threads(threads);
    let work = work.unwrap_or(DEFAULT_WORK);
    // Every record of the final set at most, and the workers' histograms and bitmaps.
    if !crate::torture::fits("ebizzy", t, (KEYS * 64 + t * 4096) as u64, 0) {
        return false;
    }
    let s = Arc::new(Shared {
        buckets: (0..BUCKETS)
            .map(|_| SpinLock::new(TicketLock::new(), Vec::new()))
            .collect(),
        model: SpinLock::kernel(vec![0; KEYS]),
        waits: SpinLock::kernel(Hist::new()),
        inserted: AtomicU64::new(0),
        freed: AtomicU64::new(0),
    });
    let ws = s.clone();
    let Some((done, cycles)) = super::run_workers("ebizzy", t, move |i| {
        worker(&ws, seed, i, super::share(work, t, i))
    }) else {
        return false;
    };
    let records: u64 = done.iter().sum();
    // The final set against the model, and the count invariant.
    let model = s.model.lock().clone();
    let mut left = 0u64;
    let mut set_ok = true;
    for (b, bucket) in s.buckets.iter().enumerate() {
        let g = bucket.lock();
        left += g.len() as u64;
        let mut present = [0u8; KEYS_PER_BUCKET as usize];
        for rec in g.iter() {
            present[rec.key as usize] += 1;
        }
        let base = b * KEYS_PER_BUCKET as usize;
        set_ok &= present[..] == model[base..base + KEYS_PER_BUCKET as usize];
    }
    let (inserted, freed) = (s.inserted.load(Relaxed), s.freed.load(Relaxed));
    let ok = set_ok
        && inserted.checked_sub(freed) == Some(left)
        && inserted + freed == records
        && records == work;
    let w = s.waits.lock();
    let us = |c| tsc::cycles_to_ns(c) / 1000;
    println!(
        "RESULT ebizzy threads={t} records={records} elapsed_us={} records_per_s={} lock_waits={} lock_wait_p50_us={} lock_wait_p99_us={} lock_wait_max_us={} checksum_ok={}",
        super::us(cycles),
        super::per_second(records, cycles),
        w.count(),
        us(w.quantile(500)),
        us(w.quantile(990)),
        us(w.max()),
        u8::from(ok)
    );
    if !ok {
        println!(
            "FAILURE: ebizzy: the records left do not match the model (set_ok={set_ok} inserted={inserted} freed={freed} left={left} records={records} work={work})"
        );
    }
    ok
}
