//! Sets of CPUs as bitmaps sized from the ABI's vCPU limit (`shared_abi::MAX_VCPUS`), so
//! raising the limit changes no algorithm.

use shared_abi::MAX_VCPUS;

use crate::sync::{AtomicU64, Ordering};

/// Words of a CPU bitmap.
pub const CPU_SET_WORDS: usize = MAX_VCPUS.div_ceil(64);

/// A set of CPU ids below [`MAX_VCPUS`], by value.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct CpuSet([u64; CPU_SET_WORDS]);

fn word_bit(cpu: u32) -> (usize, u64) {
    let cpu = cpu as usize;
    assert!(cpu < MAX_VCPUS, "CPU {cpu} is beyond the ABI's {MAX_VCPUS}");
    (cpu / 64, 1 << (cpu % 64))
}

impl CpuSet {
    /// The empty set.
    pub const fn new() -> Self {
        CpuSet([0; CPU_SET_WORDS])
    }

    /// CPUs `0..n`.
    pub fn first(n: usize) -> Self {
        let mut s = Self::new();
        (0..n.min(MAX_VCPUS) as u32).for_each(|c| s.insert(c));
        s
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
        (cpu as usize) < MAX_VCPUS && {
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

    /// The first 64 CPUs as a mask: what ABI v4's 64-bit words (`ipi_wait`,
    /// `rcu_gp_holdouts`) can name.
    #[inline]
    pub fn low_word(&self) -> u64 {
        self.0[0]
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
/// CPU is one atomic read-modify-write).
pub struct AtomicCpuSet([AtomicU64; CPU_SET_WORDS]);

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
        let (w, b) = word_bit(cpu);
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
        self.0
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
        self.0.iter().all(|w| w.load(Ordering::SeqCst) == 0)
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
            .zip(&self.0)
            .for_each(|(d, w)| *d = w.load(order));
        s
    }

    /// Replaces the set (word by word).
    #[inline]
    pub fn store(&self, set: &CpuSet) {
        self.0
            .iter()
            .zip(set.0)
            .for_each(|(w, v)| w.store(v, Ordering::SeqCst));
    }

    /// Empties the set and returns what it held (word by word).
    #[inline]
    pub fn take(&self) -> CpuSet {
        let mut s = CpuSet::new();
        s.0.iter_mut()
            .zip(&self.0)
            .for_each(|(d, w)| *d = w.swap(0, Ordering::SeqCst));
        s
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
            let cpus: Vec<u32> = (0..MAX_VCPUS as u32)
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
        let edge: CpuSet = [0, MAX_VCPUS as u32 - 1].into_iter().collect();
        assert_eq!(edge.iter().collect::<Vec<_>>(), [0, MAX_VCPUS as u32 - 1]);
    }
}
