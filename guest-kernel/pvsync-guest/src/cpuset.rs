//! Sets of CPUs as bitmaps of [`NR_CPUS`] bits, laid out as the ABI's vCPU bitmaps (bit
//! `i % 64` of word `i / 64` for CPU `i`), so raising the limit changes no algorithm.
//!
//! Whole-set operations touch only the words of the CPU ids in use ([`set_nr_cpu_ids`]),
//! and the hot ones take one word (up to 64 CPUs, most machines) without a loop: a
//! shootdown or a grace period makes a dozen of them, and a loop's set-up costs several
//! times the word's own work. Hot paths pass sets by reference: a copy moves all
//! [`NR_CPUS`] bits. (Where guest kernel code is emulated, as on this project's nested
//! hosts, each instruction costs about 2,000 TSC cycles: docs/design.md, "Scale".)

use core::fmt;
use shared_abi::{bitmap_word_bit, bitmap_words};

use crate::sync::{AtomicU64, Ordering};
use crate::NR_CPUS;

/// Words of a CPU bitmap.
pub const CPU_SET_WORDS: usize = bitmap_words(NR_CPUS);

/// A set of CPU ids below the CPU ids in use ([`set_nr_cpu_ids`]), by value.
///
/// Room for [`NR_CPUS`], but every whole-set operation touches only the words of the CPU ids
/// in use (as Linux's cpumask operations stop at `nr_cpumask_bits`): the words past them
/// are always zero. Hot paths (a shootdown, a grace period) pay for the CPUs the machine
/// has, not for the kernel's limit; pass sets by reference there, a copy moves every word.
#[derive(Clone, Copy, Eq)]
pub struct CpuSet([u64; CPU_SET_WORDS]);

#[inline]
fn word_bit(cpu: u32) -> (usize, u64) {
    assert!(
        (cpu as usize) < NR_CPUS,
        "CPU {cpu} is beyond NR_CPUS ({NR_CPUS})"
    );
    bitmap_word_bit(cpu)
}

/// How many words of a [`CpuSet`] or an [`AtomicCpuSet`] whole-set operations touch (see
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
/// of a [`CpuSet`] or an [`AtomicCpuSet`] (load, store, iteration, counting, union...) then
/// touch only the words such CPUs need, one up to 64 CPUs, instead of every word of
/// [`NR_CPUS`]. Call it at boot, before any CPU set holds a CPU; a CPU at or above `n`
/// (rounded up to a word) can no longer join a set.
pub fn set_nr_cpu_ids(n: usize) {
    assert!(
        (1..=NR_CPUS).contains(&n),
        "{n} CPU ids: must be 1..={NR_CPUS}"
    );
    #[cfg(not(test))]
    {
        // Once: a smaller count later would hide the CPUs sets already hold past it.
        static SET: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
        assert!(
            !SET.swap(true, core::sync::atomic::Ordering::Relaxed),
            "set_nr_cpu_ids({n}): the CPU ids in use were set already"
        );
        WORDS_IN_USE.store(bitmap_words(n), core::sync::atomic::Ordering::Relaxed);
    }
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

/// Word and bit of `cpu`, which must be among the words in use (a CPU beyond them would be
/// invisible to whole-set operations).
#[inline]
fn word_bit_in_use(cpu: u32) -> (usize, u64) {
    let (w, b) = word_bit(cpu);
    assert!(
        w < words_in_use(),
        "CPU {cpu} is beyond the CPU ids in use (set_nr_cpu_ids)"
    );
    (w, b)
}

impl Default for CpuSet {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialEq for CpuSet {
    /// Compares the words in use (the others are zero in both).
    fn eq(&self, other: &Self) -> bool {
        self.in_use() == other.in_use()
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

impl CpuSet {
    /// The empty set.
    pub const fn new() -> Self {
        CpuSet([0; CPU_SET_WORDS])
    }

    /// CPUs `0..n` (at most [`NR_CPUS`]; each must be among the CPU ids in use).
    pub fn first(n: usize) -> Self {
        let mut s = Self::new();
        (0..n.min(NR_CPUS) as u32).for_each(|c| s.insert(c));
        s
    }

    /// The set a bitmap of the ABI's layout names (`words` past the CPU ids in use are
    /// ignored).
    pub fn from_words(words: &[u64]) -> Self {
        let mut s = Self::new();
        let n = words_in_use().min(words.len());
        s.0[..n].copy_from_slice(&words[..n]);
        s
    }

    /// The set as a bitmap of the ABI's layout: the words of the CPU ids in use (the rest
    /// are zero).
    #[inline]
    pub fn words(&self) -> &[u64] {
        self.in_use()
    }

    #[inline]
    fn in_use(&self) -> &[u64] {
        &self.0[..words_in_use()]
    }

    #[inline]
    fn in_use_mut(&mut self) -> &mut [u64] {
        &mut self.0[..words_in_use()]
    }

    /// Adds `cpu` (which must be below the CPU ids in use, rounded up to a word).
    #[inline]
    pub fn insert(&mut self, cpu: u32) {
        let (w, b) = word_bit_in_use(cpu);
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
        match self.in_use() {
            [w] => *w == 0,
            words => words.iter().all(|&w| w == 0),
        }
    }

    /// Number of CPUs in the set.
    #[inline]
    pub fn len(&self) -> usize {
        self.in_use().iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set holds more than one CPU (cheaper than counting them).
    #[inline]
    pub fn has_several(&self) -> bool {
        let words = self.in_use();
        if let [w] = words {
            return w & w.wrapping_sub(1) != 0;
        }
        let mut seen = false;
        for &w in words.iter().filter(|&&w| w != 0) {
            if seen || w & (w - 1) != 0 {
                return true;
            }
            seen = true;
        }
        false
    }

    /// The lowest CPU in the set (one bit scan per word up to the first non-empty one).
    #[inline]
    pub fn first_cpu(&self) -> Option<u32> {
        let words = self.in_use();
        if let [w] = words {
            return (*w != 0).then(|| w.trailing_zeros());
        }
        let (i, w) = words.iter().enumerate().find(|(_, &w)| w != 0)?;
        Some((i * 64) as u32 + w.trailing_zeros())
    }

    /// The highest CPU in the set.
    pub fn last_cpu(&self) -> Option<u32> {
        let (i, w) = self
            .in_use()
            .iter()
            .enumerate()
            .rev()
            .find(|(_, &w)| w != 0)?;
        Some((i * 64) as u32 + 63 - w.leading_zeros())
    }

    /// Keeps only the CPUs for which `keep` is true (in ascending order, in place).
    #[inline]
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        for (i, w) in self.in_use_mut().iter_mut().enumerate() {
            let mut left = *w;
            let mut bits = *w;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                if !keep((i * 64) as u32 + bit) {
                    left &= !(1 << bit);
                }
            }
            *w = left;
        }
    }

    /// `self` without the CPUs of `other`.
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        let mut s = *self;
        s.combine(other, |a, b| a & !b);
        s
    }

    /// CPUs in both.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        let mut s = *self;
        s.combine(other, |a, b| a & b);
        s
    }

    /// CPUs in either.
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        let mut s = *self;
        s.combine(other, |a, b| a | b);
        s
    }

    /// Each word in use becomes `op(its value, other's)`.
    #[inline]
    fn combine(&mut self, other: &CpuSet, op: impl Fn(u64, u64) -> u64) {
        // One read of the count: both slices have its length, so the loop has no bounds
        // checks (every instruction shows on the hot paths).
        let n = words_in_use();
        match (&mut self.0[..n], &other.0[..n]) {
            ([a], [b]) => *a = op(*a, *b),
            (a, b) => {
                for i in 0..n {
                    a[i] = op(a[i], b[i]);
                }
            }
        }
    }

    /// The CPUs in ascending order. One bit scan per CPU in the set, not a test per bit:
    /// shootdowns and grace periods walk these sets on their hot paths.
    #[inline]
    pub fn iter(&self) -> CpuSetIter<'_> {
        let words = self.in_use();
        CpuSetIter {
            cur: words.first().copied().unwrap_or(0),
            words,
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
pub struct CpuSetIter<'a> {
    /// The set's words in use.
    words: &'a [u64],
    /// The index of the word being visited, and what is left of it.
    word: usize,
    cur: u64,
}

impl Iterator for CpuSetIter<'_> {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        while self.cur == 0 {
            self.word += 1;
            self.cur = *self.words.get(self.word)?;
        }
        let bit = self.cur.trailing_zeros();
        self.cur &= self.cur - 1;
        Some((self.word * 64) as u32 + bit)
    }
}

/// The CPUs of a set taken by value, in ascending order (for an iterator that outlives the
/// set it came from; [`CpuSet::iter`] copies nothing).
pub struct CpuSetIntoIter {
    set: CpuSet,
    word: usize,
}

impl Iterator for CpuSetIntoIter {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let words = self.set.in_use_mut();
        while let Some(w) = words.get_mut(self.word) {
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

impl IntoIterator for CpuSet {
    type Item = u32;
    type IntoIter = CpuSetIntoIter;

    fn into_iter(self) -> CpuSetIntoIter {
        CpuSetIntoIter { set: self, word: 0 }
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
        let (w, b) = word_bit_in_use(cpu);
        self.0[w].fetch_or(b, Ordering::SeqCst);
    }

    /// Removes `cpu`; returns whether it was there.
    #[inline]
    pub fn remove(&self, cpu: u32) -> bool {
        let (w, b) = word_bit(cpu);
        self.0[w].fetch_and(!b, Ordering::SeqCst) & b != 0
    }

    /// Removes `cpu`, then reads the whole set: whether exactly `{only}` is left (without a
    /// copy of the set). Sequentially consistent: of several CPUs that remove the last
    /// members but `only` at once, at least one sees them all gone.
    #[inline]
    pub fn remove_leaving_only(&self, cpu: u32, only: u32) -> bool {
        let (w, b) = word_bit(cpu);
        let left = self.0[w].fetch_and(!b, Ordering::SeqCst) & !b;
        let (ow, ob) = word_bit(only);
        self.in_use().iter().enumerate().all(|(i, x)| {
            let x = if i == w {
                left
            } else {
                x.load(Ordering::SeqCst)
            };
            x == if i == ow { ob } else { 0 }
        })
    }

    /// Whether the set is now exactly `set` with `cpu` added (word by word, no copy;
    /// false for a `cpu` past the CPU ids in use, which no set holds).
    #[inline]
    pub fn equals_with(&self, set: &CpuSet, cpu: u32) -> bool {
        let (cw, cb) = word_bit(cpu);
        let n = words_in_use();
        if cw >= n {
            return false;
        }
        self.0[..n]
            .iter()
            .zip(&set.0[..n])
            .enumerate()
            .all(|(i, (a, &s))| a.load(Ordering::SeqCst) == if i == cw { s | cb } else { s })
    }

    /// Empties the set (word by word).
    #[inline]
    pub fn clear(&self) {
        self.in_use()
            .iter()
            .for_each(|w| w.store(0, Ordering::SeqCst));
    }

    /// Keeps only the CPUs also in `keep` (one atomic AND per word).
    pub fn retain(&self, keep: &CpuSet) {
        self.with_words(keep, |a, k| _ = a.fetch_and(k, Ordering::SeqCst));
    }

    /// Calls `f` on each word in use with the same word of `set` (one word without a
    /// loop).
    #[inline]
    fn with_words(&self, set: &CpuSet, f: impl Fn(&AtomicU64, u64)) {
        let n = words_in_use();
        match (&self.0[..n], &set.0[..n]) {
            ([a], [v]) => f(a, *v),
            (a, v) => {
                for i in 0..n {
                    f(&a[i], v[i]);
                }
            }
        }
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
        match self.in_use() {
            [w] => w.load(Ordering::SeqCst) == 0,
            words => words.iter().all(|w| w.load(Ordering::SeqCst) == 0),
        }
    }

    /// The lowest CPU in the set now (loads up to the first non-empty word; no copy of the
    /// set: a waiter polls this).
    #[inline]
    pub fn first_cpu(&self) -> Option<u32> {
        let words = self.in_use();
        if let [w] = words {
            let w = w.load(Ordering::SeqCst);
            return (w != 0).then(|| w.trailing_zeros());
        }
        words.iter().enumerate().find_map(|(i, w)| {
            let w = w.load(Ordering::SeqCst);
            (w != 0).then(|| (i * 64) as u32 + w.trailing_zeros())
        })
    }

    /// A copy of the set (word by word).
    #[inline]
    pub fn load(&self) -> CpuSet {
        let mut s = CpuSet::new();
        self.load_into(&mut s, Ordering::SeqCst);
        s
    }

    /// Copies the set into `into` (which it replaces), each word loaded with `order`: no
    /// set moves on the caller's stack.
    #[inline]
    pub fn load_into(&self, into: &mut CpuSet, order: Ordering) {
        let n = words_in_use();
        match (&mut into.0[..n], &self.0[..n]) {
            ([d], [a]) => *d = a.load(order),
            (d, a) => {
                for i in 0..n {
                    d[i] = a[i].load(order);
                }
            }
        }
    }

    /// Replaces the set (word by word).
    #[inline]
    pub fn store(&self, set: &CpuSet) {
        self.with_words(set, |a, v| a.store(v, Ordering::SeqCst));
    }

    /// Empties the set, calling `f` on each CPU it held in ascending order (one atomic swap
    /// per word in use, no copy of the set: a mailbox's reader).
    #[inline]
    pub fn take_each(&self, mut f: impl FnMut(u32)) {
        for (i, w) in self.in_use().iter().enumerate() {
            let mut bits = w.swap(0, Ordering::SeqCst);
            while bits != 0 {
                f((i * 64) as u32 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
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
                assert_eq!(s.first_cpu(), Some(0));
                // CPUs besides 0 are left (`{0}` alone is tested below and with two CPUs).
                assert!(!s.remove_leaving_only(last, 0));
                assert!(!s.contains(last) && s.load().len() == nr - 1);
                s.retain(&[0, last / 2].into_iter().collect());
                assert_eq!(s.load().iter().collect::<Vec<_>>(), [0, last / 2]);
                let mut taken = Vec::new();
                s.take_each(|c| taken.push(c));
                assert_eq!(taken, [0, last / 2]);
                assert!(s.is_empty() && s.first_cpu().is_none());
                // The last word alone: found past the empty words before it.
                s.insert(last);
                assert_eq!(s.first_cpu(), Some(last));
                assert!(s.remove_leaving_only(0, last), "{nr}");
                assert!(!s.remove_leaving_only(last, 0) && s.is_empty());
                s.store(&all);
                s.clear();
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

    /// Every whole-set operation gives what it should at CPU counts of one word (its
    /// one-word path) and of several (its loop), and leaves the words past those in use
    /// zero.
    #[test]
    fn whole_set_operations_at_one_word_and_at_several() {
        for nr in [1usize, 2, 63, 64, 65, 96, 1000, NR_CPUS] {
            // A model: the atomic sets are loom's.
            loom::model(move || {
                set_nr_cpu_ids(nr);
                let last = nr as u32 - 1;
                let mid = last / 2;
                let empty = CpuSet::new();
                let one: CpuSet = [last].into_iter().collect();
                let two: CpuSet = [0, last].into_iter().collect();
                assert!(empty.is_empty() && !one.is_empty(), "{nr}");
                assert!(!empty.has_several() && !one.has_several(), "{nr}");
                assert_eq!(two.has_several(), nr > 1, "{nr}");
                assert_eq!(empty.first_cpu(), None);
                assert_eq!(one.first_cpu(), Some(last));
                assert_eq!(two.first_cpu(), Some(0));
                assert_eq!(one.len() + two.len(), if nr > 1 { 3 } else { 2 });
                let all = CpuSet::first(nr);
                assert_eq!(all.difference(&two).len(), nr - two.len(), "{nr}");
                assert_eq!(all.intersection(&one), one);
                assert_eq!(one.union(&two), two);
                let mut odd = all;
                odd.retain(|c| c % 2 == 1);
                assert_eq!(odd.len(), nr / 2, "{nr}");
                assert!(odd.iter().all(|c| c % 2 == 1));
                assert_eq!(CpuSet::from_words(all.words()), all);
                let a = AtomicCpuSet::new();
                a.store(&two);
                let mut into = CpuSet::new();
                into.insert(mid);
                a.load_into(&mut into, Ordering::SeqCst);
                assert_eq!(into, two, "{nr}");
                // `two` is `one` with 0 added, and `{0}` with `last` added (at one CPU, both
                // are `{0}` with 0 added again); `{0}` is the empty set with 0 added; then
                // differences in the added CPU's word and in another.
                let zero: CpuSet = [0].into_iter().collect();
                assert!(a.equals_with(&one, 0) && a.equals_with(&zero, last));
                assert_eq!(a.equals_with(&CpuSet::new(), 0), nr == 1, "{nr}");
                a.store(&[0].into_iter().collect());
                assert!(a.equals_with(&CpuSet::new(), 0));
                assert!(a.equals_with(&zero, 0));
                assert_eq!(a.equals_with(&one, 0), nr == 1, "{nr}");
                assert_eq!(a.equals_with(&CpuSet::new(), last), nr == 1, "{nr}");
                let past_ids_in_use = bitmap_words(nr) * 64;
                if past_ids_in_use < NR_CPUS {
                    assert!(!a.equals_with(&CpuSet::new(), past_ids_in_use as u32));
                }
                a.store(&two);
                a.retain(&one);
                assert_eq!(a.load(), one);
                a.store(&two);
                assert_eq!(a.remove_leaving_only(last, 0), nr > 1, "{nr}");
            });
        }
    }

    #[test]
    #[should_panic(expected = "beyond the CPU ids in use")]
    fn a_cpu_beyond_the_ids_in_use_cannot_join_a_set() {
        set_nr_cpu_ids(64);
        let mut s = CpuSet::new();
        s.insert(63);
        s.insert(64);
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
