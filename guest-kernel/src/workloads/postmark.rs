//! `test=postmark`: transactions on the RCU-protected RAM file system ([`super::ramfs`]).
//! Each worker owns the file names `i << 32 | k` for `k < FILES_PER_WORKER` (its files share
//! the hash buckets, their locks and their lists with everyone's) and keeps a model of its
//! own files: length and checksum of each. A transaction picks one of its files with the
//! seeded generator; an absent file is created or looked up (it must be missing), a present
//! one is read (looked up and checksummed under the RCU read lock: must match the model),
//! appended to, overwritten or deleted.
//!
//! Reported: grace periods during the run (count, shortest, mean and longest, and the
//! grace-period thread's CPU time per grace period), the most callbacks the file system had
//! pending at once and the most bytes of nodes they held. Self-check: every read matched
//! the model, and after the run (and an `rcu_barrier`) the files present are exactly the
//! models' files with their lengths and checksums, and no callback or byte is left pending.
//! Negative control: `model=skip-delete` leaves worker 0's first delete out of its model;
//! the self-check must then fail (`model_ok=0`).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::ramfs::{checksum, RamFs, EMPTY_SUM};
use super::Rng;
use crate::locks::{KernelLock, SpinLock};
use crate::{println, rcu};

/// Transactions when `work=` is not given (about 2 s with 4 vCPUs on the emulating host).
pub const DEFAULT_WORK: u64 = 1000;
const BUCKETS: usize = 64;
const FILES_PER_WORKER: u64 = 32;
/// Payloads are 64 to 512 bytes.
const MIN_WORDS: u64 = 8;
const MAX_WORDS: u64 = 64;
/// An append adds up to this many words (never past MAX_WORDS).
const APPEND_WORDS: u64 = 4;

/// A worker's model of its files: (length in words, checksum) of each present one.
type Model = Vec<Option<(usize, u64)>>;

struct Shared {
    fs: RamFs,
    models: KernelLock<Vec<Option<Model>>>,
    /// Reads (and lookups of absent files) that disagreed with the model, and creates,
    /// updates or deletes whose result did.
    mismatches: AtomicU64,
}

fn payload(rng: &mut Rng, words: u64) -> Box<[u64]> {
    (0..words).map(|_| rng.next()).collect()
}

/// A payload of seeded size (64 to 512 bytes) and contents.
fn new_file(rng: &mut Rng) -> Box<[u64]> {
    let words = MIN_WORDS + rng.below(MAX_WORDS - MIN_WORDS + 1);
    payload(rng, words)
}

fn worker(s: &Shared, seed: u64, i: usize, transactions: u64, skip_delete: bool) -> u64 {
    let mut rng = Rng::new(seed, i);
    // The negative control: worker 0's first delete is left out of its model.
    let mut skip_delete = skip_delete && i == 0;
    let mut model: Model = vec![None; FILES_PER_WORKER as usize];
    let mut bad = 0u64;
    for _ in 0..transactions {
        let r = rng.next();
        let k = (r >> 8) % FILES_PER_WORKER;
        let id = (i as u64) << 32 | k;
        let dice = (r >> 40) % 100;
        let slot = &mut model[k as usize];
        match *slot {
            None if dice < 60 => {
                let data = new_file(&mut rng);
                let m = (data.len(), checksum(EMPTY_SUM, &data));
                bad += u64::from(!s.fs.create(id, data));
                *slot = Some(m);
            }
            None => bad += u64::from(s.fs.read(id, |_| ()).is_some()),
            Some(m) if dice < 40 => {
                let got = s.fs.read(id, |d| (d.len(), checksum(EMPTY_SUM, d)));
                bad += u64::from(got != Some(m));
            }
            Some((len, sum)) if dice < 70 => {
                let extra = 1 + rng.below(APPEND_WORDS);
                if dice < 55 && len as u64 + extra <= MAX_WORDS {
                    let more = payload(&mut rng, extra);
                    let ok =
                        s.fs.update(id, |old| old.iter().chain(&more[..]).copied().collect());
                    bad += u64::from(!ok);
                    *slot = Some((len + more.len(), checksum(sum, &more)));
                } else {
                    let data = new_file(&mut rng);
                    let m = (data.len(), checksum(EMPTY_SUM, &data));
                    bad += u64::from(!s.fs.update(id, |_| data));
                    *slot = Some(m);
                }
            }
            Some(_) => {
                bad += u64::from(!s.fs.delete(id));
                if core::mem::take(&mut skip_delete) {
                    continue;
                }
                *slot = None;
            }
        }
    }
    s.mismatches.fetch_add(bad, Relaxed);
    s.models.lock()[i] = Some(model);
    transactions
}

/// Whether the files present are exactly the models' files; returns it and how many.
fn check_files(fs: &RamFs, models: &[Option<Model>]) -> (bool, u64) {
    let files = fs.files();
    let mut ok = true;
    for &(id, len, sum) in &files {
        let (t, k) = ((id >> 32) as usize, (id & 0xffff_ffff) as usize);
        let want = models
            .get(t)
            .and_then(|m| m.as_ref()?.get(k).copied().flatten());
        ok &= want == Some((len, sum));
    }
    let expected: usize = models
        .iter()
        .map(|m| m.as_ref().map_or(0, |m| m.iter().flatten().count()))
        .sum();
    (ok && expected == files.len(), files.len() as u64)
}

pub fn run(threads: Option<usize>, work: Option<u64>, seed: u64, skip_delete: bool) -> bool {
    let t = super::threads(threads);
    let work = work.unwrap_or(DEFAULT_WORK);
    // Every file at its largest, and as many nodes again waiting for grace periods.
    let files_bytes = t as u64 * FILES_PER_WORKER * (MAX_WORDS * 8 + 64);
    if !crate::torture::fits("postmark", t, 2 * files_bytes + 64 * 1024, 0) {
        return false;
    }
    let s = Arc::new(Shared {
        fs: RamFs::new(BUCKETS),
        models: SpinLock::kernel(vec![None; t]),
        mismatches: AtomicU64::new(0),
    });
    let ws = s.clone();
    let before = rcu::reset_gp_extremes();
    let Some((done, cycles)) = super::run_workers("postmark", t, move |i| {
        worker(&ws, seed, i, super::share(work, t, i), skip_delete)
    }) else {
        return false;
    };
    let after = rcu::gp_account();
    let transactions: u64 = done.iter().sum();
    // Every node retired during the run freed.
    rcu::barrier();
    let (cbs_left, _, bytes_left, _) = s.fs.pending();
    let (_, cbs_peak, _, bytes_peak) = s.fs.pending();
    let models = s.models.lock().clone();
    let (files_ok, files) = check_files(&s.fs, &models);
    let mismatches = s.mismatches.load(Relaxed);
    let ok = files_ok
        && mismatches == 0
        && cbs_left == 0
        && bytes_left == 0
        && transactions == work
        && models.iter().all(Option::is_some);
    let gps = after.gps - before.gps;
    let per_gp = |c: u64| super::us(c.checked_div(gps).unwrap_or(0));
    println!(
        "RESULT postmark threads={t} transactions={transactions} files_final={files} elapsed_us={} tps={} gps={gps} gp_min_us={} gp_avg_us={} gp_max_us={} gp_cpu_us={} cbs_peak={cbs_peak} cb_mem_peak_bytes={bytes_peak} model_ok={}",
        super::us(cycles),
        super::per_second(transactions, cycles),
        super::us(after.min_cycles),
        per_gp(after.total_cycles - before.total_cycles),
        super::us(after.max_cycles),
        per_gp(after.busy_cycles - before.busy_cycles),
        u8::from(ok)
    );
    if !ok {
        println!(
            "FAILURE: postmark: the file system disagrees with the model (files_match={files_ok} mismatched_ops={mismatches} callbacks_left={cbs_left} bytes_left={bytes_left} transactions={transactions} work={work})"
        );
    }
    ok
}
