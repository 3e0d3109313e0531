//! The guest command line: space-separated `key=value` words.
//!
//! - `test=NAME`: what to run: `boot` (the default), `selftest`, `hostile-hypercalls`, and
//!   the failure probes `panic`, `fault` (page fault) and `hang` (never exits).
//! - `smp=N`: use CPUs 0..N instead of the ACPI MADT.

pub struct Cmdline<'a> {
    pub test: &'a str,
    pub smp: Option<usize>,
    /// The first word that is not understood, reported instead of silently ignored.
    pub unknown: Option<&'a str>,
}

pub fn parse(s: &str) -> Cmdline<'_> {
    let mut c = Cmdline {
        test: "boot",
        smp: None,
        unknown: None,
    };
    for word in s.split_ascii_whitespace() {
        match word.split_once('=') {
            Some(("test", v)) => c.test = v,
            Some(("smp", v)) => match v.parse() {
                Ok(n) => c.smp = Some(n),
                Err(_) => c.unknown = c.unknown.or(Some(word)),
            },
            _ => c.unknown = c.unknown.or(Some(word)),
        }
    }
    c
}
