//! A fixed-size latency histogram (bounded memory whatever the number of samples): values
//! below 16 exactly, larger ones in 8 sub-buckets per power of two (within 12.5%), plus the
//! exact maximum.

use alloc::vec;
use alloc::vec::Vec;

const EXACT: usize = 16;
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Buckets: the exact ones, then 8 per power of two from 2^4 to 2^63.
const BUCKETS: usize = EXACT + (64 - 4) * SUB;

pub struct Hist {
    counts: Vec<u32>,
    n: u64,
    max: u64,
}

fn index(v: u64) -> usize {
    if v < EXACT as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let sub = (v >> (e - SUB_BITS)) as usize & (SUB - 1);
    EXACT + (e as usize - 4) * SUB + sub
}

/// The largest value that falls in bucket `i`.
fn upper(i: usize) -> u64 {
    if i < EXACT {
        return i as u64;
    }
    let e = (i - EXACT) / SUB + 4;
    let sub = ((i - EXACT) % SUB) as u64;
    let step = 1u64 << (e as u32 - SUB_BITS);
    ((SUB as u64 + sub) * step).wrapping_add(step - 1)
}

impl Hist {
    pub fn new() -> Hist {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        let c = &mut self.counts[index(v)];
        *c = c.saturating_add(1);
        self.n += 1;
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.n += other.n;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `per_mille`/1000 (the upper end of its bucket, never above the
    /// maximum); 0 without samples.
    pub fn quantile(&self, per_mille: u64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = (self.n * per_mille).div_ceil(1000).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }
}
