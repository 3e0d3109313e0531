//! Randomized tests: arbitrary and mutated input never panics, never reads without bound,
//! and whatever is accepted satisfies the documented limits. A fixed-seed xorshift keeps the
//! runs reproducible (the failing seed and case are in the assertion message).

use std::cell::Cell;
use std::string::String;
use std::vec::Vec;

use crate::acpi::{self, tests as t};
use crate::testmem::Mem;
use crate::{cmdline, pvh, OutOfRange, PhysRead};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Fewer than `max` random bytes.
    fn some_bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }
}

/// Counts the bytes a parser reads, to bound its work.
struct Counting<'a> {
    mem: &'a Mem,
    bytes: Cell<u64>,
}

impl PhysRead for Counting<'_> {
    fn read(&self, paddr: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.bytes.set(self.bytes.get() + buf.len() as u64);
        self.mem.read(paddr, buf)
    }
}

/// Reading a table's worth of bytes a few times over, plus the BIOS-area scan.
const READ_BOUND: u64 = 8 * acpi::MAX_TABLE_LEN as u64;

/// Whether the tables were accepted.
fn check_madt<const N: usize>(m: &Mem, hint: u64, case: &str) -> bool {
    let c = Counting {
        mem: m,
        bytes: Cell::new(0),
    };
    let r = acpi::madt_cpus::<N, _>(&c, hint);
    if let Ok(l) = &r {
        let ids = l.ids();
        assert!(!ids.is_empty() && ids.len() <= N, "{case}: {ids:?}");
        assert!(ids.iter().all(|&id| (id as usize) < N), "{case}: {ids:?}");
        for (i, a) in ids.iter().enumerate() {
            assert!(!ids[i + 1..].contains(a), "{case}: duplicate in {ids:?}");
        }
    }
    assert!(
        c.bytes.get() <= READ_BOUND,
        "{case}: read {} bytes",
        c.bytes.get()
    );
    r.is_ok()
}

fn random_entry(r: &mut Rng) -> Vec<u8> {
    match r.below(8) {
        0..=2 => t::lapic(r.below(72) as u8, r.below(2) == 0),
        3..=5 => t::x2apic(r.below(72) as u32, r.below(2) == 0),
        6 => {
            let len = r.below(12) as usize;
            let mut e = r.bytes(len);
            if len >= 2 {
                e[1] = len as u8;
            }
            e
        }
        _ => r.some_bytes(20),
    }
}

#[test]
fn mutated_acpi_tables_never_panic() {
    let mut r = Rng(0x5eed_acb1);
    let mut accepted = 0;
    for case in 0..4000 {
        let entries: Vec<_> = (0..r.below(12)).map(|_| random_entry(&mut r)).collect();
        let mut m = t::machine(t::madt(&entries));
        // Flip some bytes anywhere, then (usually) make the checksums right again so that
        // the damage reaches the code behind them.
        let flips = if r.below(2) == 0 { 0 } else { 1 + r.below(5) };
        for _ in 0..flips {
            let chunks = m.chunks_mut();
            let k = r.below(chunks.len() as u64) as usize;
            let c = &mut chunks[k].1;
            let i = r.below(c.len() as u64) as usize;
            c[i] = r.next() as u8;
        }
        if r.below(4) != 0 {
            for (base, c) in m.chunks_mut().iter_mut() {
                if *base == t::RSDP && c.len() >= 36 {
                    t::fix_checksum(&mut c[..20], 8);
                    t::fix_checksum(&mut c[..36], 32);
                } else if c.len() >= 36 {
                    t::fix_checksum(c, 9);
                }
            }
        }
        let hint = [0, t::RSDP, r.next()][r.below(3) as usize];
        let case = format!("case {case} hint {hint:#x}");
        check_madt::<1>(&m, hint, &case);
        check_madt::<4>(&m, hint, &case);
        accepted += check_madt::<64>(&m, hint, &case) as u32;
    }
    // The mutations must not all be caught at the door: the walk itself gets exercised.
    assert!(accepted > 400, "only {accepted} of 4000 cases got through");
}

#[test]
fn random_bytes_as_acpi_tables_never_panic() {
    let mut r = Rng(0xacb1_0001);
    for case in 0..2000 {
        let mut m = Mem::default();
        // Random RSDP-shaped bytes (with the signature, to get past the scan), random tables.
        let mut rsdp = r.bytes(36);
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[24..32].copy_from_slice(&t::XSDT.to_le_bytes());
        m.put(t::RSDP, rsdp);
        for base in [t::XSDT, t::FACP, t::MADT] {
            let mut b = r.some_bytes(300);
            if b.len() >= 8 && r.below(2) == 0 {
                let len = (r.below(b.len() as u64 + 8)) as u32;
                b[4..8].copy_from_slice(&len.to_le_bytes());
            }
            m.put(base, b);
        }
        let hint = [0, t::RSDP][r.below(2) as usize];
        check_madt::<64>(&m, hint, &format!("case {case}"));
    }
}

#[test]
fn random_start_info_never_panics() {
    let mut r = Rng(0x9f4_0002);
    const SI: u64 = 0x6000;
    const MAP: u64 = 0x8000;
    for case in 0..4000 {
        let mut m = Mem::default();
        let mut si = r.bytes(56);
        if r.below(4) != 0 {
            si[..4].copy_from_slice(&pvh::XEN_HVM_START_MAGIC.to_le_bytes());
        }
        if r.below(2) == 0 {
            si[24..32].copy_from_slice(&0x7000u64.to_le_bytes());
            si[40..48].copy_from_slice(&MAP.to_le_bytes());
            let n = [r.below(8), r.below(2000), r.next()][r.below(3) as usize] as u32;
            si[48..52].copy_from_slice(&n.to_le_bytes());
        }
        let si_len = r.below(57) as usize;
        m.put(SI, si[..si_len].to_vec());
        m.put(0x7000, r.some_bytes(64));
        m.put(MAP, r.some_bytes(400));
        let c = Counting {
            mem: &m,
            bytes: Cell::new(0),
        };
        if let Ok(info) = pvh::start_info(&c, SI) {
            assert!(info.memmap_entries >= 1 && info.memmap_entries <= pvh::MAX_MEMMAP_ENTRIES);
            let mut regions = [pvh::MemRegion::default(); 64];
            if let Ok(n) = pvh::memory_map(&c, &info, &mut regions) {
                assert!(n <= 64 && n <= info.memmap_entries as usize, "case {case}");
                assert!(regions[..n]
                    .iter()
                    .all(|r| r.start.checked_add(r.size).is_some()));
            }
            let mut buf = [0u8; 32];
            if let Ok(s) = pvh::cmdline(&c, info.cmdline_paddr, &mut buf) {
                assert!(s.len() < 32, "case {case}");
            }
        }
        assert!(
            c.bytes.get() <= 64 * 1024,
            "case {case}: read {}",
            c.bytes.get()
        );
    }
}

#[test]
fn random_command_lines_never_panic() {
    let mut r = Rng(0xc0d_0003);
    let pieces = [
        "test=",
        "smp=",
        "duration=",
        "threads=",
        "lock=",
        "rcu=",
        "tlb=",
        "=",
        " ",
        "\t",
        "locktorture",
        "mcs",
        "broken",
        "skip",
        "early",
        "noack",
        "mcs-nokick",
        "kernel",
        "kvm=",
        "pvsync=",
        "off",
        "none",
        "steal,pvtlb",
        ",pvlock",
        ",yield",
        "defer-noflag",
        "0",
        "1",
        "64",
        "65",
        "-",
        "+",
        "99999999999999999999",
        "é",
        "\u{0}",
        "x",
    ];
    for case in 0..20000 {
        let mut s = String::new();
        for _ in 0..r.below(12) {
            if r.below(8) == 0 {
                s.push(char::from_u32(r.below(0x3000) as u32).unwrap_or('?'));
            } else {
                s.push_str(pieces[r.below(pieces.len() as u64) as usize]);
            }
        }
        let max = r.below(130) as usize;
        match cmdline::parse(&s, max) {
            Ok(c) => {
                assert!(
                    c.smp.is_none_or(|n| (1..=max).contains(&n)),
                    "case {case}: {s:?}"
                );
                assert!(
                    (1..=cmdline::MAX_DURATION_MS).contains(&c.duration_ms),
                    "case {case}: {s:?}"
                );
                assert!(c
                    .threads
                    .is_none_or(|n| (1..=cmdline::MAX_THREADS).contains(&n)));
                assert!(cmdline::LOCKS.contains(&c.lock));
            }
            Err(e) => {
                // Every error names a word of the line.
                let msg = e.to_string();
                assert!(!msg.is_empty(), "case {case}");
            }
        }
    }
}
