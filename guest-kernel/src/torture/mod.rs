//! Torture suites, selected by `test=`: each prints its own summary, a `RESULT` line, and
//! returns whether it passed (the caller prints SUCCESS or FAILURE and exits accordingly).

pub mod lock;
pub mod rcu;
pub mod tlb;

use alloc::vec::Vec;

/// Online CPUs, in order.
pub fn cpus() -> Vec<u32> {
    let online = crate::smp::online_mask();
    (0..64u32).filter(|c| online & (1 << c) != 0).collect()
}

/// The CPU for the i-th worker: round-robin over the online CPUs.
pub fn cpu_for(i: usize) -> u32 {
    let c = cpus();
    c[i % c.len()]
}
