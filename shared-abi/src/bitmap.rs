//! vCPU bitmaps (ABI v6): the region's CPU sets (`ipi_wait`, `rcu_gp_holdouts`) are arrays
//! of little-endian u64 words sized by the VM's vCPU count, bit `i % 64` of word `i / 64`
//! standing for vCPU `i`. Both sides size and decode them with these helpers.
//!
//! ```
//! use shared_abi::{bitmap_iter, bitmap_words, bitmap_within, bitmap_word_bit};
//! // 96 vCPUs need two words; vCPU 95 is bit 31 of word 1.
//! assert_eq!(bitmap_words(96), 2);
//! assert_eq!(bitmap_word_bit(95), (1, 1 << 31));
//! let words = [1u64, 1 << 31];
//! assert!(bitmap_within(&words, 96));
//! assert!(!bitmap_within(&words, 95), "vCPU 95 is past a 95-vCPU VM");
//! assert_eq!(bitmap_iter(&words).collect::<Vec<_>>(), [0, 95]);
//! ```

/// Words of a bitmap with one bit per vCPU of an `nr_vcpus`-vCPU VM.
pub const fn bitmap_words(nr_vcpus: usize) -> usize {
    nr_vcpus.div_ceil(64)
}

/// Bytes between two vCPUs' `ipi_wait` bitmaps: the words rounded up to a cache line, so
/// senders that wait at once never share a line.
pub const fn bitmap_stride(nr_vcpus: usize) -> usize {
    (bitmap_words(nr_vcpus) * 8).div_ceil(64) * 64
}

/// Word index and bit mask of vCPU `vcpu` in a bitmap.
pub const fn bitmap_word_bit(vcpu: u32) -> (usize, u64) {
    ((vcpu / 64) as usize, 1 << (vcpu % 64))
}

/// Whether vCPU `vcpu` is in `words` (a vCPU past the bitmap is not).
pub fn bitmap_contains(words: &[u64], vcpu: u32) -> bool {
    let (w, b) = bitmap_word_bit(vcpu);
    words.get(w).is_some_and(|x| x & b != 0)
}

/// Whether `words` names only vCPUs below `nr_vcpus` (and has no word past the bitmap of
/// such a VM). The host refuses to act on a bitmap that fails this.
pub fn bitmap_within(words: &[u64], nr_vcpus: usize) -> bool {
    words.iter().enumerate().all(|(i, &w)| {
        let valid_bits = nr_vcpus.saturating_sub(i * 64).min(64);
        valid_bits == 64 || w >> valid_bits == 0
    })
}

/// Number of vCPUs in `words`.
pub fn bitmap_count(words: &[u64]) -> usize {
    words.iter().map(|w| w.count_ones() as usize).sum()
}

/// The vCPUs in `words`, ascending: one bit scan per member, not a test per bit.
pub fn bitmap_iter(words: &[u64]) -> BitmapIter<'_> {
    BitmapIter {
        words,
        index: 0,
        current: words.first().copied().unwrap_or(0),
    }
}

/// Iterator of [`bitmap_iter`].
#[derive(Clone, Debug)]
pub struct BitmapIter<'a> {
    words: &'a [u64],
    index: usize,
    current: u64,
}

impl Iterator for BitmapIter<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        while self.current == 0 {
            self.index += 1;
            self.current = *self.words.get(self.index)?;
        }
        let bit = self.current.trailing_zeros();
        self.current &= self.current - 1;
        Some(self.index as u32 * 64 + bit)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn set(nr: usize, members: &[u32]) -> Vec<u64> {
        let mut w = std::vec![0u64; bitmap_words(nr)];
        for &m in members {
            let (i, b) = bitmap_word_bit(m);
            w[i] |= b;
        }
        w
    }

    #[test]
    fn sizes_round_up_to_words_and_lines() {
        for (nr, words, stride) in [
            (1, 1, 64),
            (64, 1, 64),
            (65, 2, 64),
            (96, 2, 64),
            (512, 8, 64),
            (513, 9, 128),
            (1000, 16, 128),
            (1024, 16, 128),
            (4096, 64, 512),
        ] {
            assert_eq!(bitmap_words(nr), words, "{nr}");
            assert_eq!(bitmap_stride(nr), stride, "{nr}");
        }
    }

    /// Sizes that are not multiples of 64: the last word's valid bits, and nothing past it.
    #[test]
    fn decodes_at_sizes_that_are_not_word_multiples() {
        for nr in [1usize, 63, 64, 65, 96, 127, 128, 1000, 1023, 1024] {
            let last = nr as u32 - 1;
            let members = [0, last / 2, last];
            let w = set(nr, &members);
            assert!(bitmap_within(&w, nr), "{nr}");
            let mut want = members.to_vec();
            want.dedup();
            assert_eq!(bitmap_iter(&w).collect::<Vec<_>>(), want, "{nr}");
            assert_eq!(bitmap_count(&w), want.len());
            assert!(bitmap_contains(&w, last) && !bitmap_contains(&w, last + 1));
            // One past the VM: refused, whether in the last word or in a word beyond it.
            let mut past = w.clone();
            past.push(0);
            let (i, b) = bitmap_word_bit(nr as u32);
            past[i] |= b;
            assert!(!bitmap_within(&past, nr), "{nr}: bit {nr} accepted");
            let mut extra = w.clone();
            extra.push(1 << 63);
            assert!(!bitmap_within(&extra, nr), "{nr}: extra word accepted");
        }
    }

    #[test]
    fn every_member_of_a_full_bitmap_is_found() {
        for nr in [65usize, 96, 1000] {
            let all: Vec<u32> = (0..nr as u32).collect();
            let w = set(nr, &all);
            assert_eq!(bitmap_iter(&w).collect::<Vec<_>>(), all);
            assert!(bitmap_within(&w, nr));
            assert!(!bitmap_within(&w, nr - 1));
        }
        assert_eq!(bitmap_iter(&[]).next(), None);
        assert_eq!(bitmap_iter(&[0, 0]).next(), None);
    }
}
