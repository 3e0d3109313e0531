//! What the host Linux scheduler does to each vCPU thread, from
//! `/proc/<pid>/task/<tid>/schedstat` (CPU time, run-queue wait, timeslices), sampled by a
//! monitor thread; and the writers of the host half of each shared record. Under the Linux
//! backend the monitor writes it: the total time the vCPU was runnable but waiting
//! (`host_preempted_ns`), and `host_preempted` = 1 when it spent most of the last interval
//! waiting (a sampled estimate: that backend cannot see the exact moment Linux switches a
//! thread out). Under the slot backend the scheduler writes it from its own state.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::mem::offset_of;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shared_abi::{record_offset, VcpuRecord};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::shared_region::Registration;

/// Sampling period of the monitor.
pub const INTERVAL: Duration = Duration::from_millis(10);

/// One schedstat reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStat {
    /// Time on a CPU, ns.
    pub run_ns: u64,
    /// Time runnable but waiting on a run queue, ns.
    pub wait_ns: u64,
    /// Timeslices run.
    pub slices: u64,
}

impl SchedStat {
    /// Parses "run wait slices"; None for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split_ascii_whitespace().map(|w| w.parse::<u64>());
        let (run_ns, wait_ns, slices) = (it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
        Some(SchedStat {
            run_ns,
            wait_ns,
            slices,
        })
    }
}

/// An open schedstat file of one thread.
pub struct ThreadStat {
    file: File,
    buf: String,
}

impl ThreadStat {
    pub fn open(tid: i32) -> std::io::Result<Self> {
        let path = format!("/proc/{}/task/{tid}/schedstat", std::process::id());
        Ok(ThreadStat {
            file: File::open(path)?,
            buf: String::with_capacity(64),
        })
    }

    pub fn read(&mut self) -> Option<SchedStat> {
        self.buf.clear();
        self.file.seek(SeekFrom::Start(0)).ok()?;
        self.file.read_to_string(&mut self.buf).ok()?;
        SchedStat::parse(&self.buf)
    }
}

/// Writes the host fields of record `vcpu`: preempted flag and total waiting time.
pub fn publish(
    mem: &GuestMemoryMmap,
    reg: &Registration,
    vcpu: u32,
    preempted: bool,
    waited_ns: u64,
) {
    let base = reg.gpa + record_offset(vcpu as usize) as u64;
    let flag = GuestAddress(base + offset_of!(VcpuRecord, host_preempted) as u64);
    let total = GuestAddress(base + offset_of!(VcpuRecord, host_preempted_ns) as u64);
    // The region was validated to lie in guest RAM; a failed store can only mean the VM is
    // being torn down, and the guest must not notice either way.
    let _ = mem.store(preempted as u32, flag, Ordering::Release);
    let _ = mem.store(waited_ns, total, Ordering::Release);
}

/// Writes the `host_lent_by` field of record `vcpu` (lender id + 1, or 0).
pub fn publish_lent_by(mem: &GuestMemoryMmap, reg: &Registration, vcpu: u32, value: u32) {
    let base = reg.gpa + record_offset(vcpu as usize) as u64;
    let at = GuestAddress(base + offset_of!(VcpuRecord, host_lent_by) as u64);
    // As in `publish`: the store lands in validated guest RAM or nowhere.
    let _ = mem.store(value, at, Ordering::Release);
}

/// Writes the `host_boosts` field of record `vcpu`.
pub fn publish_boosts(mem: &GuestMemoryMmap, reg: &Registration, vcpu: u32, boosts: u64) {
    let base = reg.gpa + record_offset(vcpu as usize) as u64;
    let at = GuestAddress(base + offset_of!(VcpuRecord, host_boosts) as u64);
    // As in `publish`: the store lands in validated guest RAM or nowhere.
    let _ = mem.store(boosts.min(u32::MAX as u64) as u32, at, Ordering::Release);
}

/// Whether a vCPU that waited `waited` of an `interval` counts as preempted for it.
pub fn mostly_waiting(waited: u64, interval: Duration) -> bool {
    waited.saturating_mul(2) > interval.as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schedstat_and_refuses_garbage() {
        assert_eq!(
            SchedStat::parse("969350980 236965405 2190\n"),
            Some(SchedStat {
                run_ns: 969350980,
                wait_ns: 236965405,
                slices: 2190
            })
        );
        assert_eq!(SchedStat::parse("1 2"), None);
        assert_eq!(SchedStat::parse("a b c"), None);
    }

    #[test]
    fn reads_this_thread() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut t = ThreadStat::open(tid).unwrap();
        let a = t.read().unwrap();
        // Busy until the kernel's accounting shows it (it may lag by a tick); black_box keeps
        // the optimizer from folding the loop away in release builds.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut b = a;
        while b.run_ns <= a.run_ns && std::time::Instant::now() < deadline {
            let mut x = 0u64;
            for i in 0..100_000u64 {
                x = x.wrapping_add(std::hint::black_box(i) * i);
            }
            std::hint::black_box(x);
            b = t.read().unwrap();
        }
        assert!(b.run_ns > a.run_ns, "CPU time advances: {a:?} -> {b:?}");
    }

    #[test]
    fn preempted_means_most_of_the_interval() {
        let i = Duration::from_millis(10);
        assert!(!mostly_waiting(4_000_000, i));
        assert!(mostly_waiting(6_000_000, i));
    }
}
