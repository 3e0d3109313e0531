//! The guest's command-line parser, built for the host: any text never panics, and what it
//! accepts stays within the documented limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The guest kernel's CPU limit (`pvsync_guest::NR_CPUS`).
    const MAX_CPUS: usize = 1024;
    if let Ok(c) = pvsync_boot_parse::cmdline::parse(text, MAX_CPUS) {
        assert!(c.smp.is_none_or(|n| (1..=MAX_CPUS).contains(&n)));
        assert!(c.duration_ms >= 1);
    }
});
