//! The guest command line: space-separated `key=value` words.
//!
//! - `test=NAME`: what to run: `boot` (the default), `selftest`, `hostile-hypercalls`, the
//!   torture suites, and the failure probes `panic`, `fault` (page fault) and `hang`.
//! - `smp=N`: use CPUs 0..N instead of the ACPI MADT.
//! - `duration=MS`: how long a torture suite runs (default 2000).
//! - Negative controls: `rcu=broken` (synchronize_rcu returns at once), `tlb=skip`
//!   (shootdowns leave one target out), `lock=broken` is a lock type of locktorture.

pub struct Cmdline<'a> {
    pub test: &'a str,
    pub smp: Option<usize>,
    pub duration_ms: u64,
    pub rcu_broken: bool,
    pub tlb_skip: bool,
    /// The first word that is not understood, reported instead of silently ignored.
    pub unknown: Option<&'a str>,
}

pub fn parse(s: &str) -> Cmdline<'_> {
    let mut c = Cmdline {
        test: "boot",
        smp: None,
        duration_ms: 2000,
        rcu_broken: false,
        tlb_skip: false,
        unknown: None,
    };
    for word in s.split_ascii_whitespace() {
        let ok = match word.split_once('=') {
            Some(("test", v)) => {
                c.test = v;
                true
            }
            Some(("smp", v)) => v.parse().map(|n| c.smp = Some(n)).is_ok(),
            Some(("duration", v)) => v.parse().map(|n| c.duration_ms = n).is_ok(),
            Some(("rcu", "broken")) => {
                c.rcu_broken = true;
                true
            }
            Some(("tlb", "skip")) => {
                c.tlb_skip = true;
                true
            }
            _ => false,
        };
        if !ok {
            c.unknown = c.unknown.or(Some(word));
        }
    }
    c
}
