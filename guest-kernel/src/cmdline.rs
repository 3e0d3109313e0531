//! The guest command line: space-separated `key=value` words.
//!
//! - `test=NAME`: what to run: `boot` (the default), `selftest`, `hostile-hypercalls`, the
//!   torture suites, `pvwait` (waiters name whom they wait for), `rcu-model` (the x86-TSO
//!   model of RCU's grace-period handshake), and the failure probes `panic`, `fault` (page
//!   fault) and `hang`.
//! - `smp=N`: use CPUs 0..N instead of the ACPI MADT.
//! - `duration=MS`: how long a torture suite runs (default 2000).
//! - Negative controls: `rcu=broken` (synchronize_rcu returns at once), `tlb=skip`
//!   (shootdowns leave one target out), `lock=broken` (locktorture's lock excludes nothing).
//! - `lock=ticket|mcs|broken`, `threads=N`: locktorture's lock and worker count.

pub struct Cmdline<'a> {
    pub test: &'a str,
    pub smp: Option<usize>,
    pub duration_ms: u64,
    pub rcu_broken: bool,
    /// `rcu=early`: grace periods end slightly early (negative control).
    pub rcu_early: bool,
    pub tlb_skip: bool,
    /// `tlb=noack`: shootdowns do not wait for acknowledgements (negative control).
    pub tlb_noack: bool,
    /// locktorture's lock: `ticket` (default), `mcs`, or the negative control `broken`.
    pub lock: &'a str,
    /// Worker threads of a torture suite (default: two per CPU).
    pub threads: Option<usize>,
    /// The first word that is not understood, reported instead of silently ignored.
    pub unknown: Option<&'a str>,
}

pub fn parse(s: &str) -> Cmdline<'_> {
    let mut c = Cmdline {
        test: "boot",
        smp: None,
        duration_ms: 2000,
        rcu_broken: false,
        rcu_early: false,
        tlb_skip: false,
        tlb_noack: false,
        lock: "ticket",
        threads: None,
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
            Some(("threads", v)) => v.parse().map(|n| c.threads = Some(n)).is_ok(),
            Some(("lock", v)) => {
                c.lock = v;
                true
            }
            Some(("rcu", "broken")) => {
                c.rcu_broken = true;
                true
            }
            Some(("tlb", "skip")) => {
                c.tlb_skip = true;
                true
            }
            Some(("rcu", "early")) => {
                c.rcu_early = true;
                true
            }
            Some(("tlb", "noack")) => {
                c.tlb_noack = true;
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
