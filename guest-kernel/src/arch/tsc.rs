//! The time-stamp counter: a cycle clock for measurements and bounded waits.

/// Reads the TSC (not serialising; good enough for intervals of microseconds and up).
#[inline]
pub fn now() -> u64 {
    // SAFETY: RDTSC has no memory effects; CR4.TSD is clear, so it is allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Spins until `cycles` TSC cycles have passed.
pub fn spin_cycles(cycles: u64) {
    let start = now();
    while now().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}
