//! Sets of CPUs as bitmaps of [`NR_CPUS`] bits, laid out as the ABI's vCPU bitmaps (bit
//! `i % 64` of word `i / 64` for CPU `i`), so raising the limit changes no algorithm.

use core::fmt;
use shared_abi::{bitmap_word_bit, bitmap_words};

use crate::sync::{AtomicU64, Ordering};
use crate::NR_CPUS;

/// Words of a CPU bitmap.
pub const CPU_SET_WORDS: usize = bitmap_words(NR_CPUS);

/// A set of CPU ids below [`NR_CPUS`], by value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CpuSet([u64; CPU_SET_WORDS]);

fn word_bit(cpu: u32) -> (usize, u64) {
    assert!(
        (cpu as usize) < NR_CPUS,
        "CPU {cpu} is beyond NR_CPUS ({NR_CPUS})"
    );
    bitmap_word_bit(cpu)
}

/// How many words of an [`AtomicCpuSet`] its whole-set operations touch (see
/// [`set_nr_cpu_ids`]). Per thread in the crate's tests: parallel tests each set their own
/// (loom runs a model's threads on the test's thread).
#[cfg(not(test))]
static WORDS_IN_USE: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(CPU_SET_WORDS);
#[cfg(test)]
std::thread_local! {
    static WORDS_IN_USE: core::cell::Cell<usize> = const { core::cell::Cell::new(CPU_SET_WORDS) };
}

/// Tells the crate that CPU ids stay below `n` (Linux's `nr_cpu_ids`): whole-set operations
/// of an [`AtomicCpuSet`] (load, store, take, retain) then touch only the words such CPUs
/// need, one up to 64 CPUs, instead of every word of [`NR_CPUS`]. Call it at boot, before
/// any CPU set holds a CPU; a CPU at or above `n` can no longer join an [`AtomicCpuSet`].
pub fn set_nr_cpu_ids(n: usize) {
    assert!(
        (1..=NR_CPUS).contains(&n),
        "{n} CPU ids: must be 1..={NR_CPUS}"
    );
    #[cfg(not(test))]
    WORDS_IN_USE.store(bitmap_words(n), core::sync::atomic::Ordering::Relaxed);
    #[cfg(test)]
    WORDS_IN_USE.with(|w| w.set(bitmap_words(n)));
}

#[inline]
fn words_in_use() -> usize {
    #[cfg(not(test))]
    return WORDS_IN_USE.load(core::sync::atomic::Ordering::Relaxed);
    #[cfg(test)]
    WORDS_IN_USE.with(|w| w.get())
}

impl Default for CpuSet {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuSet {
    /// The empty set.
    pub const fn new() -> Self {
        CpuSet([0; CPU_SET_WORDS])
    }

    /// CPUs `0..n` (at most [`NR_CPUS`]).
    pub fn first(n: usize) -> Self {
        let mut s = Self::new();
        (0..n.min(NR_CPUS) as u32).for_each(|c| s.insert(c));
        s
    }

    /// The set a bitmap of the ABI's layout names (`words` past the set's own are
    /// ignored).
    pub fn from_words(words: &[u64]) -> Self {
        let mut s = Self::new();
        s.0.iter_mut().zip(words).for_each(|(d, &w)| *d = w);
        s
    }

    /// The set as a bitmap of the ABI's layout ([`CPU_SET_WORDS`] words).
    #[inline]
    pub fn words(&self) -> &[u64; CPU_SET_WORDS] {
        &self.0
    }

    /// Adds `cpu`.
    #[inline]
    pub fn insert(&mut self, cpu: u32) {
        let (w, b) = word_bit(cpu);
        self.0[w] |= b;
    }

    /// Removes `cpu`.
    #[inline]
    pub fn remove(&mut self, cpu: u32) {
        let (w, b) = word_bit(cpu);
        self.0[w] &= !b;
    }

    /// Whether `cpu` is in the set.
    #[inline]
    pub fn contains(&self, cpu: u32) -> bool {
        (cpu as usize) < NR_CPUS && {
            let (w, b) = word_bit(cpu);
            self.0[w] & b != 0
        }
    }

    /// Whether the set is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Number of CPUs in the set.
    #[inline]
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The lowest CPU in the set (one bit scan per word up to the first non-empty one).
    #[inline]
    pub fn first_cpu(&self) -> Option<u32> {
        let (i, w) = self.0.iter().enumerate().find(|(_, &w)| w != 0)?;
        Some((i * 64) as u32 + w.trailing_zeros())
    }

    /// The highest CPU in the set.
    pub fn last_cpu(&self) -> Option<u32> {
        let (i, w) = self.0.iter().enumerate().rev().find(|(_, &w)| w != 0)?;
        Some((i * 64) as u32 + 63 - w.leading_zeros())
    }

    /// `self` without the CPUs of `other`.
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        let mut s = *self;
        s.0.iter_mut().zip(other.0).for_each(|(a, b)| *a &= !b);
        s
    }

    /// CPUs in both.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        let mut s = *self;
        s.0.iter_mut().zip(other.0).for_each(|(a, b)| *a &= b);
        s
    }

    /// CPUs in either.
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        let mut s = *self;
        s.0.iter_mut().zip(other.0).for_each(|(a, b)| *a |= b);
        s
    }

    /// The CPUs in ascending order. One bit scan per CPU in the set, not a test per bit:
    /// shootdowns and grace periods walk these sets on their hot paths.
    pub fn iter(&self) -> CpuSetIter {
        CpuSetIter {
            words: self.0,
            word: 0,
        }
    }

    /// The CPUs below 64 as a mask (the first word of the bitmap): what an event's 64-bit
    /// payload carries of a set.
    #[inline]
    pub fn first_word(&self) -> u64 {
        self.0[0]
    }
}

/// Linux's CPU-list format: ranges in ascending order, e.g. `0-3,8,10-11`; empty for the
/// empty set.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cpus = self.iter().peekable();
        let mut first = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.next_if_eq(&(end + 1)).is_some() {
                end += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// The CPUs of a [`CpuSet`] in ascending order (see [`CpuSet::iter`]).
pub struct CpuSetIter {
    /// What is left to visit.
    words: [u64; CPU_SET_WORDS],
    word: usize,
}

impl Iterator for CpuSetIter {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        while let Some(w) = self.words.get_mut(self.word) {
            if *w != 0 {
                let bit = w.trailing_zeros();
                *w &= *w - 1;
                return Some((self.word * 64) as u32 + bit);
            }
            self.word += 1;
        }
        None
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(it: I) -> Self {
        let mut s = CpuSet::new();
        it.into_iter().for_each(|c| s.insert(c));
        s
    }
}

/// A CPU set that CPUs update concurrently (one atomic word per 64 CPUs; an update of one
/// CPU is one atomic read-modify-write). Whole-set operations touch the words of the CPU
/// ids in use only ([`set_nr_cpu_ids`]).
pub struct AtomicCpuSet([AtomicU64; CPU_SET_WORDS]);

/// Word and bit of `cpu` in an [`AtomicCpuSet`], which must be among the words in use (a
/// CPU beyond them would be invisible to whole-set reads).
fn atomic_word_bit(cpu: u32) -> (usize, u64) {
    let (w, b) = word_bit(cpu);
    assert!(
        w < words_in_use(),
        "CPU {cpu} is beyond the CPU ids in use (set_nr_cpu_ids)"
    );
    (w, b)
}

impl AtomicCpuSet {
    crate::sync::const_fn! {
        /// The empty set.
        pub fn new() -> Self {
            AtomicCpuSet(crate::sync::array_of!(CPU_SET_WORDS, AtomicU64::new(0)))
        }
    }

    /// Adds `cpu` (sequentially consistent: a CPU joining an address space orders its join
    /// before its first page-table walk).
    #[inline]
    pub fn insert(&self, cpu: u32) {
        let (w, b) = atomic_word_bit(cpu);
        self.0[w].fetch_or(b, Ordering::SeqCst);
    }

    /// Removes `cpu`; returns whether it was there.
    #[inline]
    pub fn remove(&self, cpu: u32) -> bool {
        let (w, b) = word_bit(cpu);
        self.0[w].fetch_and(!b, Ordering::SeqCst) & b != 0
    }

    /// Removes `cpu`, then reads the whole set: at least one of several CPUs that remove
    /// the last members at once sees the set without all of them (sequentially consistent).
    #[inline]
    pub fn remove_then_load(&self, cpu: u32) -> CpuSet {
        let (w, b) = word_bit(cpu);
        let left = self.0[w].fetch_and(!b, Ordering::SeqCst) & !b;
        let mut s = self.load();
        s.0[w] = left;
        s
    }

    /// Keeps only the CPUs also in `keep` (one atomic AND per word).
    pub fn retain(&self, keep: &CpuSet) {
        self.in_use()
            .iter()
            .zip(keep.0)
            .for_each(|(w, k)| _ = w.fetch_and(k, Ordering::SeqCst));
    }

    /// Whether `cpu` is in the set now.
    #[inline]
    pub fn contains(&self, cpu: u32) -> bool {
        let (w, b) = word_bit(cpu);
        self.0[w].load(Ordering::SeqCst) & b != 0
    }

    /// Whether the set is empty now (one load per word; the usual test of a mailbox).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.in_use().iter().all(|w| w.load(Ordering::SeqCst) == 0)
    }

    /// A copy of the set (word by word).
    #[inline]
    pub fn load(&self) -> CpuSet {
        self.load_ordered(Ordering::SeqCst)
    }

    /// A copy of the set, each word loaded with `order` (a caller that has just made a full
    /// fence needs no more than acquire).
    #[inline]
    pub fn load_ordered(&self, order: Ordering) -> CpuSet {
        let mut s = CpuSet::new();
        s.0.iter_mut()
            .zip(self.in_use())
            .for_each(|(d, w)| *d = w.load(order));
        s
    }

    /// Replaces the set (word by word).
    #[inline]
    pub fn store(&self, set: &CpuSet) {
        assert!(
            set.0[words_in_use()..].iter().all(|&w| w == 0),
            "a CPU beyond the CPU ids in use (set_nr_cpu_ids)"
        );
        self.in_use()
            .iter()
            .zip(set.0)
            .for_each(|(w, v)| w.store(v, Ordering::SeqCst));
    }

    /// Empties the set and returns what it held (word by word).
    #[inline]
    pub fn take(&self) -> CpuSet {
        let mut s = CpuSet::new();
        s.0.iter_mut()
            .zip(self.in_use())
            .for_each(|(d, w)| *d = w.swap(0, Ordering::SeqCst));
        s
    }

    /// The words of the CPU ids in use: the others are always zero.
    #[inline]
    fn in_use(&self) -> &[AtomicU64] {
        &self.0[..words_in_use()]
    }
}

impl Default for AtomicCpuSet {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn iter_and_first_cpu_agree_with_a_test_of_every_bit() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Sparse and dense sets alike: mask some rounds down to a few bits.
            let cpus: Vec<u32> = (0..NR_CPUS as u32)
                .filter(|&c| {
                    (x.rotate_left(c) & 0b11) == 0 || x.is_multiple_of(7) && c.is_multiple_of(3)
                })
                .collect();
            let set: CpuSet = cpus.iter().copied().collect();
            assert_eq!(set.iter().collect::<Vec<_>>(), cpus);
            assert_eq!(set.first_cpu(), cpus.first().copied());
            assert_eq!(set.last_cpu(), cpus.last().copied());
            assert_eq!(set.len(), cpus.len());
        }
        assert_eq!(CpuSet::new().iter().next(), None);
        assert_eq!(CpuSet::new().first_cpu(), None);
        let edge: CpuSet = [0, NR_CPUS as u32 - 1].into_iter().collect();
        assert_eq!(edge.iter().collect::<Vec<_>>(), [0, NR_CPUS as u32 - 1]);
    }

    #[test]
    fn sets_read_and_write_the_abi_bitmap_layout() {
        for nr in [1usize, 64, 65, 96, 1000, NR_CPUS] {
            let all = CpuSet::first(nr);
            assert_eq!(all.len(), nr);
            let w = all.words();
            assert!(
                shared_abi::bitmap_within(&w[..bitmap_words(nr)], nr),
                "{nr}"
            );
            assert!(w[bitmap_words(nr)..].iter().all(|&x| x == 0), "{nr}");
            assert_eq!(CpuSet::from_words(&w[..bitmap_words(nr)]), all);
            let last = nr as u32 - 1;
            assert_eq!(all.last_cpu(), Some(last));
            let ends: CpuSet = [0, last].into_iter().collect();
            assert_eq!(
                shared_abi::bitmap_iter(ends.words()).collect::<Vec<_>>(),
                ends.iter().collect::<Vec<_>>()
            );
            assert_eq!(ends.first_word(), 1 | if last < 64 { 1 << last } else { 0 });
        }
    }

    #[test]
    fn sets_print_as_cpu_lists() {
        let s = |cpus: &[u32]| std::format!("{}", cpus.iter().copied().collect::<CpuSet>());
        assert_eq!(s(&[]), "");
        assert_eq!(s(&[5]), "5");
        assert_eq!(s(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(std::format!("{}", CpuSet::first(1000)), "0-999");
        assert_eq!(s(&[63, 64, 1023]), "63-64,1023");
    }

    /// At CPU counts that are not multiples of 64, an atomic set touches the words of the
    /// CPU ids in use and no more, and holds every CPU among them.
    #[test]
    fn atomic_sets_cover_the_cpu_ids_in_use() {
        for nr in [3usize, 64, 65, 96, 1000, NR_CPUS] {
            loom::model(move || {
                set_nr_cpu_ids(nr);
                assert_eq!(words_in_use(), bitmap_words(nr));
                let s = AtomicCpuSet::new();
                let all = CpuSet::first(nr);
                s.store(&all);
                assert_eq!(s.load(), all, "{nr}");
                let last = nr as u32 - 1;
                let left = s.remove_then_load(last);
                assert!(!left.contains(last) && left.len() == nr - 1 && !s.contains(last));
                s.retain(&[0, last / 2].into_iter().collect());
                assert_eq!(s.load().iter().collect::<Vec<_>>(), [0, last / 2]);
                assert_eq!(s.take().len(), 2);
                assert!(s.is_empty());
                let edges: CpuSet = [0, 63, 64, last]
                    .into_iter()
                    .filter(|&c| c <= last)
                    .collect();
                edges.iter().for_each(|c| s.insert(c));
                assert_eq!(s.load(), edges);
                assert!(edges.iter().all(|c| s.contains(c) && s.remove(c)));
                assert!(s.is_empty());
            });
        }
    }

    #[test]
    #[should_panic(expected = "beyond the CPU ids in use")]
    fn a_cpu_beyond_the_ids_in_use_cannot_join_an_atomic_set() {
        loom::model(|| {
            set_nr_cpu_ids(96);
            let s = AtomicCpuSet::new();
            s.insert(127); // the last word in use
            s.insert(128);
        });
    }
}
