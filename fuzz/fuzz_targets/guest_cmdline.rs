//! The guest's command-line parser, built for the host: any text never panics, and what it
//! accepts stays within the documented limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = pvsync_boot_parse::cmdline::parse(text, 64) {
        assert!(c.smp.is_none_or(|n| (1..=64).contains(&n)));
        assert!(c.duration_ms >= 1);
    }
});
