//! The guest command line: space-separated `key=value` words.
//!
//! - `test=NAME`: what to run (default `boot`); the kernel knows the names.
//! - `smp=N`: use CPUs 0..N instead of the ACPI MADT (1..=the kernel's CPU limit).
//! - `duration=MS`: how long a torture suite runs (default 2000, at most a day).
//! - `threads=N`: a torture suite's worker count (default: two per CPU).
//! - `work=N`: how much a workload does (blocks, records, transactions, rounds: each
//!   workload says; 1..=10^9), so that runs under different schedules do the same work.
//! - `seed=N`: a workload's random seed (default 1).
//! - `lock=ticket|kernel|mcs|mcs-nokick|broken`: locktorture's lock (`kernel`: the ticket
//!   lock taken test-and-set style, as the kernel's own locks are; `broken` and
//!   `mcs-nokick`, whose releasers never kick a halted waiter, are negative controls).
//! - Negative controls: `rcu=broken` (synchronize_rcu returns at once), `rcu=early` (grace
//!   periods end slightly early), `tlb=skip` (shootdowns leave one target out), `tlb=noack`
//!   (shootdowns do not wait for acknowledgements), `model=skip-delete` (postmark's model
//!   misses one delete, so its self-check must fail), `tlb=defer-noflag` (a shootdown skips
//!   a target KVM reports preempted without asking KVM to flush it).
//! - `kvm=LIST`: which of KVM's own paravirtual features the kernel uses where the host
//!   offers them: a comma-separated list of [`KvmUse::NAMES`], or `none`. Default
//!   `steal,pvtlb,pvlock`; the hypercall features (`yield`, `kick`, `sendipi`) only when
//!   named (a `vmcall` does not return on some nested hosts). `pvtlb` and `pvlock` read the
//!   steal-time area, so they need `steal`.
//! - `pvsync=off`: do not register the shared region (run as on a stock host).
//!
//! Every word must be understood: an unknown key, an unknown value, a number that does not
//! parse or is out of range is an error, never ignored.

use core::fmt;
use core::num::IntErrorKind;

/// Default `duration=` in milliseconds.
pub const DEFAULT_DURATION_MS: u64 = 2000;
/// Longest `duration=`: a day (longer is a typo, and would overflow cycle arithmetic).
pub const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;
/// Most `threads=` believed (each thread costs a kernel stack; the kernel checks the rest).
pub const MAX_THREADS: usize = 1 << 16;
/// Most `work=` believed.
pub const MAX_WORK: u64 = 1_000_000_000;
/// Default `seed=`.
pub const DEFAULT_SEED: u64 = 1;
/// locktorture's locks.
pub const LOCKS: [&str; 5] = ["ticket", "kernel", "mcs", "mcs-nokick", "broken"];

#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// locktorture's lock: `ticket` (default), `mcs`, or the negative controls `mcs-nokick`
    /// and `broken`.
    pub lock: &'a str,
    /// Worker threads of a torture suite (default: two per CPU).
    pub threads: Option<usize>,
    /// A workload's fixed amount of work (its default if None).
    pub work: Option<u64>,
    /// A workload's random seed.
    pub seed: u64,
    /// `model=skip-delete`: postmark's model misses one delete (negative control).
    pub model_skip_delete: bool,
    /// `tlb=defer-noflag`: skip a preempted target without the flush flag (negative
    /// control).
    pub tlb_defer_noflag: bool,
    /// `kvm=`: KVM features to use where offered.
    pub kvm: KvmUse,
    /// `pvsync=off`: leave the shared region unregistered.
    pub pvsync_off: bool,
}

/// KVM paravirtual features the kernel may use (`kvm=`), as bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmUse(u32);

impl KvmUse {
    /// Register a steal-time area per CPU and report steal time.
    pub const STEAL: u32 = 1 << 0;
    /// Shootdowns skip a preempted target and have KVM flush it at its next entry.
    pub const PVTLB: u32 = 1 << 1;
    /// Lock slow paths stop spinning on a holder KVM reports preempted.
    pub const PVLOCK: u32 = 1 << 2;
    /// `KVM_HC_SCHED_YIELD` to a preempted vCPU a waiter depends on.
    pub const YIELD: u32 = 1 << 3;
    /// `KVM_HC_KICK_CPU` wakes a halted lock waiter.
    pub const KICK: u32 = 1 << 4;
    /// `KVM_HC_SEND_IPI` sends a shootdown's IPIs in one hypercall.
    pub const SENDIPI: u32 = 1 << 5;
    /// What `kvm=` is without the word.
    pub const DEFAULT: KvmUse = KvmUse(Self::STEAL | Self::PVTLB | Self::PVLOCK);
    /// Nothing.
    pub const NONE: KvmUse = KvmUse(0);
    /// The names `kvm=` takes, with their bits.
    pub const NAMES: [(&'static str, u32); 6] = [
        ("steal", Self::STEAL),
        ("pvtlb", Self::PVTLB),
        ("pvlock", Self::PVLOCK),
        ("yield", Self::YIELD),
        ("kick", Self::KICK),
        ("sendipi", Self::SENDIPI),
    ];

    /// Whether every bit of `feature` is asked for.
    pub const fn has(self, feature: u32) -> bool {
        self.0 & feature == feature
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Only the features in `keep`.
    pub const fn intersect(self, keep: u32) -> KvmUse {
        KvmUse(self.0 & keep)
    }

    /// The features of `kvm=v`, or what was expected instead.
    fn parse(v: &str) -> Result<KvmUse, &'static str> {
        if v == "none" {
            return Ok(KvmUse::NONE);
        }
        let mut bits = 0;
        for name in v.split(',') {
            match Self::NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, b)) => bits |= b,
                None => {
                    return Err(
                        "kvm=none or a comma-separated list of steal, pvtlb, pvlock, yield, kick, sendipi",
                    )
                }
            }
        }
        if bits & (Self::PVTLB | Self::PVLOCK) != 0 && bits & Self::STEAL == 0 {
            return Err("pvtlb and pvlock with steal (they read the steal-time area)");
        }
        Ok(KvmUse(bits))
    }
}

impl Default for Cmdline<'_> {
    fn default() -> Self {
        Cmdline {
            test: "boot",
            smp: None,
            duration_ms: DEFAULT_DURATION_MS,
            rcu_broken: false,
            rcu_early: false,
            tlb_skip: false,
            tlb_noack: false,
            lock: "ticket",
            threads: None,
            work: None,
            seed: DEFAULT_SEED,
            model_skip_delete: false,
            tlb_defer_noflag: false,
            kvm: KvmUse::DEFAULT,
            pvsync_off: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// A word with a key this parser does not know (or no `=` at all).
    UnknownWord(&'a str),
    /// `key=` with nothing after it.
    EmptyValue(&'a str),
    /// A known key with a value it does not take.
    UnknownValue {
        word: &'a str,
        expected: &'static str,
    },
    /// Not a decimal number.
    BadNumber(&'a str),
    /// A number outside `min..=max` (overflowing ones included).
    OutOfRange { word: &'a str, min: u64, max: u64 },
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CmdlineError::UnknownWord(w) => write!(f, "unknown command-line word '{w}'"),
            CmdlineError::EmptyValue(w) => write!(f, "command-line word '{w}' has no value"),
            CmdlineError::UnknownValue { word, expected } => {
                write!(f, "command-line word '{word}': expected {expected}")
            }
            CmdlineError::BadNumber(w) => {
                write!(f, "command-line word '{w}': not a decimal number")
            }
            CmdlineError::OutOfRange { word, min, max } => {
                write!(f, "command-line word '{word}': outside {min}..={max}")
            }
        }
    }
}

fn number<'a>(word: &'a str, v: &str, min: u64, max: u64) -> Result<u64, CmdlineError<'a>> {
    // Plain decimal digits only: no sign, no spaces (u64's FromStr would take a '+').
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CmdlineError::BadNumber(word));
    }
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => Err(CmdlineError::OutOfRange { word, min, max }),
        Err(e) if *e.kind() == IntErrorKind::PosOverflow => {
            Err(CmdlineError::OutOfRange { word, min, max })
        }
        Err(_) => Err(CmdlineError::BadNumber(word)),
    }
}

/// Parses `s`; `max_cpus` bounds `smp=`. The first word not understood is the error.
pub fn parse(s: &str, max_cpus: usize) -> Result<Cmdline<'_>, CmdlineError<'_>> {
    let mut c = Cmdline::default();
    for word in s.split_ascii_whitespace() {
        let Some((key, v)) = word.split_once('=') else {
            return Err(CmdlineError::UnknownWord(word));
        };
        let known = matches!(
            key,
            "test"
                | "smp"
                | "duration"
                | "threads"
                | "lock"
                | "rcu"
                | "tlb"
                | "work"
                | "seed"
                | "model"
                | "kvm"
                | "pvsync"
        );
        if !known {
            return Err(CmdlineError::UnknownWord(word));
        }
        if v.is_empty() {
            return Err(CmdlineError::EmptyValue(word));
        }
        match key {
            "test" => c.test = v,
            "smp" => c.smp = Some(number(word, v, 1, max_cpus as u64)? as usize),
            "duration" => c.duration_ms = number(word, v, 1, MAX_DURATION_MS)?,
            "threads" => c.threads = Some(number(word, v, 1, MAX_THREADS as u64)? as usize),
            "work" => c.work = Some(number(word, v, 1, MAX_WORK)?),
            "seed" => c.seed = number(word, v, 0, u64::MAX)?,
            "lock" if LOCKS.contains(&v) => c.lock = v,
            "lock" => {
                return Err(CmdlineError::UnknownValue {
                    word,
                    expected: "ticket, kernel, mcs, mcs-nokick or broken",
                })
            }
            "rcu" if v == "broken" => c.rcu_broken = true,
            "rcu" if v == "early" => c.rcu_early = true,
            "tlb" if v == "skip" => c.tlb_skip = true,
            "tlb" if v == "noack" => c.tlb_noack = true,
            "tlb" if v == "defer-noflag" => c.tlb_defer_noflag = true,
            "model" if v == "skip-delete" => c.model_skip_delete = true,
            "kvm" => {
                c.kvm = KvmUse::parse(v)
                    .map_err(|expected| CmdlineError::UnknownValue { word, expected })?
            }
            "pvsync" if v == "off" => c.pvsync_off = true,
            _ => {
                return Err(CmdlineError::UnknownValue {
                    word,
                    expected: match key {
                        "rcu" => "rcu=broken or rcu=early",
                        "tlb" => "tlb=skip, tlb=noack or tlb=defer-noflag",
                        "pvsync" => "pvsync=off",
                        _ => "model=skip-delete",
                    },
                })
            }
        }
    }
    // The negative control reads KVM's flag through pvlock's hook and must skip a target
    // only where pvtlb would have asked KVM to flush it.
    if c.tlb_defer_noflag && !c.kvm.has(KvmUse::PVTLB | KvmUse::PVLOCK) {
        return Err(CmdlineError::UnknownValue {
            word: "tlb=defer-noflag",
            expected: "tlb=defer-noflag with kvm= including pvtlb and pvlock",
        });
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_line_gives_the_defaults() {
        assert_eq!(parse("", 64), Ok(Cmdline::default()));
        assert_eq!(parse("  \t\n ", 64), Ok(Cmdline::default()));
    }

    #[test]
    fn every_key_is_understood() {
        let c = parse(
            "test=locktorture smp=8 duration=300 threads=16 lock=mcs rcu=broken tlb=skip",
            64,
        )
        .unwrap();
        assert_eq!(
            c,
            Cmdline {
                test: "locktorture",
                smp: Some(8),
                duration_ms: 300,
                rcu_broken: true,
                rcu_early: false,
                tlb_skip: true,
                tlb_noack: false,
                lock: "mcs",
                threads: Some(16),
                work: None,
                seed: DEFAULT_SEED,
                model_skip_delete: false,
                tlb_defer_noflag: false,
                kvm: KvmUse::DEFAULT,
                pvsync_off: false,
            }
        );
    }

    #[test]
    fn kvm_features_are_a_checked_list() {
        let c = parse("kvm=steal,pvtlb,yield pvsync=off", 64).unwrap();
        assert!(c.kvm.has(KvmUse::STEAL | KvmUse::PVTLB | KvmUse::YIELD));
        assert!(!c.kvm.has(KvmUse::PVLOCK) && !c.kvm.has(KvmUse::KICK));
        assert!(c.pvsync_off && !c.tlb_defer_noflag);
        let c = parse("tlb=defer-noflag", 64).unwrap();
        assert!(c.tlb_defer_noflag, "with the default kvm=");
        assert_eq!(parse("kvm=none", 64).unwrap().kvm, KvmUse::NONE);
        assert_eq!(parse("", 64).unwrap().kvm, KvmUse::DEFAULT);
        assert!(
            !KvmUse::DEFAULT.has(KvmUse::YIELD),
            "hypercalls only when named"
        );
        for bad in [
            "kvm=steal,,pvtlb",
            "kvm=turbo",
            "kvm=pvtlb",
            "kvm=pvlock,yield",
            "pvsync=on",
        ] {
            assert!(
                matches!(parse(bad, 64), Err(CmdlineError::UnknownValue { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn work_and_seed_are_checked_numbers() {
        let c = parse("test=postmark work=5000 seed=42", 64).unwrap();
        assert_eq!((c.work, c.seed), (Some(5000), 42));
        assert!(matches!(
            parse("work=0", 64),
            Err(CmdlineError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse("work=1000000001", 64),
            Err(CmdlineError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse("seed=-1", 64),
            Err(CmdlineError::BadNumber(_))
        ));
    }

    #[test]
    fn the_other_negative_controls_are_understood() {
        let c = parse("lock=mcs-nokick rcu=early tlb=noack", 64).unwrap();
        assert_eq!(
            (c.lock, c.rcu_early, c.tlb_noack, c.rcu_broken, c.tlb_skip),
            ("mcs-nokick", true, true, false, false)
        );
        assert!(parse("model=skip-delete", 64).unwrap().model_skip_delete);
        assert_eq!(
            parse("model=skip-create", 64),
            Err(CmdlineError::UnknownValue {
                word: "model=skip-create",
                expected: "model=skip-delete"
            })
        );
    }

    #[test]
    fn a_later_word_overrides_an_earlier_one() {
        let c = parse("test=a test=b duration=5 duration=7", 64).unwrap();
        assert_eq!((c.test, c.duration_ms), ("b", 7));
    }

    #[test]
    fn unknown_words_are_errors() {
        assert_eq!(
            parse("test=boot frobnicate", 64),
            Err(CmdlineError::UnknownWord("frobnicate"))
        );
        assert_eq!(
            parse("duration_ms=300", 64),
            Err(CmdlineError::UnknownWord("duration_ms=300"))
        );
        assert_eq!(parse("=5", 64), Err(CmdlineError::UnknownWord("=5")));
        assert_eq!(
            parse("test=boot frobnicate", 64).unwrap_err().to_string(),
            "unknown command-line word 'frobnicate'"
        );
    }

    #[test]
    fn unknown_values_are_errors() {
        assert!(matches!(
            parse("lock=spin", 64),
            Err(CmdlineError::UnknownValue {
                word: "lock=spin",
                ..
            })
        ));
        assert!(matches!(
            parse("rcu=fast", 64),
            Err(CmdlineError::UnknownValue {
                word: "rcu=fast",
                ..
            })
        ));
        assert!(matches!(
            parse("tlb=all", 64),
            Err(CmdlineError::UnknownValue {
                word: "tlb=all",
                ..
            })
        ));
        assert_eq!(parse("test=", 64), Err(CmdlineError::EmptyValue("test=")));
    }

    #[test]
    fn bad_and_overflowing_numbers_are_errors() {
        for w in [
            "smp=x",
            "smp=-1",
            "smp=+4",
            "duration=1e3",
            "threads=0x10",
            "smp= ",
        ] {
            assert!(parse(w, 64).is_err(), "{w}");
        }
        assert_eq!(parse("smp=4x", 64), Err(CmdlineError::BadNumber("smp=4x")));
        let huge = "duration=99999999999999999999999";
        assert_eq!(
            parse(huge, 64),
            Err(CmdlineError::OutOfRange {
                word: huge,
                min: 1,
                max: MAX_DURATION_MS
            })
        );
        assert!(matches!(
            parse("duration=86400001", 64),
            Err(CmdlineError::OutOfRange { .. })
        ));
        assert!(parse("duration=86400000", 64).is_ok());
        assert!(matches!(
            parse("threads=0", 64),
            Err(CmdlineError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse("threads=65537", 64),
            Err(CmdlineError::OutOfRange { .. })
        ));
    }

    #[test]
    fn smp_is_bounded_by_the_callers_limit() {
        assert_eq!(parse("smp=64", 64).unwrap().smp, Some(64));
        assert_eq!(
            parse("smp=65", 64),
            Err(CmdlineError::OutOfRange {
                word: "smp=65",
                min: 1,
                max: 64
            })
        );
        assert_eq!(parse("smp=128", 128).unwrap().smp, Some(128));
        assert!(parse("smp=0", 64).is_err());
        assert!(parse("smp=1", 0).is_err(), "no CPU allowed at all");
    }
}
