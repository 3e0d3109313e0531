//! Guest events (ABI v5, docs/abi.md): draining a vCPU's event ring from guest memory,
//! checking each event, and placing it on the host's clock.
//!
//! The ring is hostile input like the rest of the region: it is copied out with volatile
//! and atomic accesses only, the host keeps its own count of what it consumed (the ring's
//! `tail` is only told to the guest), a drain copies at most one ring's worth, and a vCPU's
//! log stops growing at a cap. A vCPU thread drains its own ring whenever it leaves
//! KVM_RUN, so no lock is shared with other vCPUs or VMs.

use std::mem::offset_of;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shared_abi::{
    event_ring_offset, record_offset, EventKind, EventRingHeader, GuestEvent, VcpuMode, VcpuRecord,
    EVENT_RING_HEADER_SIZE, EVENT_SIZE, NO_VCPU,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::shared_region::Registration;

/// Events kept per VM at most (split between its vCPUs), so a long run or a guest that
/// emits without pause cannot exhaust host memory.
pub const MAX_EVENTS_PER_VM: usize = 1 << 20;

/// Events kept by the whole process at most, whatever the number of VMs (each event also
/// becomes a span or mark when the trace is written).
pub const MAX_EVENTS_PER_PROCESS: usize = 1 << 21;

/// What is left of [`MAX_EVENTS_PER_PROCESS`].
static PROCESS_BUDGET: AtomicUsize = AtomicUsize::new(MAX_EVENTS_PER_PROCESS);

/// Takes one event from the process's budget; false once it is spent.
fn take_from_budget() -> bool {
    PROCESS_BUDGET
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// The guest's time stamp counter and the host's clock at one moment (read by the vCPU
/// thread while the vCPU is out of KVM_RUN), with the counter's rate.
#[derive(Clone, Copy, Debug)]
pub struct TscSync {
    pub guest_tsc: u64,
    pub host: Instant,
    pub tsc_khz: u32,
}

impl TscSync {
    /// When the guest's counter read `tsc`, on the host clock: before `self.host` by the
    /// counter's distance; never later than `self.host` nor earlier than `floor`.
    pub fn to_host(&self, tsc: u64, floor: Instant) -> Instant {
        let behind = self.guest_tsc.saturating_sub(tsc) as u128;
        let ns = behind * 1_000_000 / self.tsc_khz.max(1) as u128;
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        self.host
            .checked_sub(Duration::from_nanos(ns))
            .unwrap_or(floor)
            .max(floor)
            .min(self.host)
    }
}

/// What a traced event says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traced {
    /// An event the guest wrote (checked: a known kind, arguments in range).
    Guest { kind: EventKind, a: u32, b: u64 },
    /// The host took the vCPU off its CPU while its record showed an RCU read-side section
    /// `nesting` deep; it ran again `dur` later. Seen by the host, not written by the guest.
    ReaderPreempted { nesting: u32, dur: Duration },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracedEvent {
    pub at: Instant,
    pub what: Traced,
}

/// One vCPU's events, and what was lost.
#[derive(Clone, Debug, Default)]
pub struct EventLog {
    pub events: Vec<TracedEvent>,
    /// Events the guest could not write (its ring was full), as its ring last said.
    pub guest_dropped: u64,
    /// Events that failed the checks (unknown kind, arguments out of range).
    pub invalid: u64,
    /// Drains that found a ring whose head was more than a ring ahead (or behind): skipped.
    pub corrupt_rings: u64,
    /// Events not kept because the log (or the process) was at its cap.
    pub capped: u64,
    /// Drains whose clock pair could not be read: their events are placed at the drain.
    pub clock_failures: u64,
    /// Events consumed from the ring so far (the host's own count, not the guest's word).
    consumed: u64,
    /// Time of the previous drain: no event of this drain happened before it.
    last_drain: Option<Instant>,
    cap: usize,
}

impl EventLog {
    /// A log that keeps at most `cap` events.
    pub fn with_cap(cap: usize) -> Self {
        EventLog {
            cap,
            ..EventLog::default()
        }
    }

    /// Appends an event (one the host saw itself, or a checked guest event).
    pub fn push(&mut self, e: TracedEvent) {
        if self.full() || !take_from_budget() {
            self.capped += 1;
        } else {
            self.events.push(e);
        }
    }

    /// Whether the log keeps no more events.
    fn full(&self) -> bool {
        self.events.len() >= self.cap
    }

    /// The events in time order (the vCPU thread sorts them when it hands the log over:
    /// events the host saw itself are added when their span ends).
    pub fn sort(&mut self) {
        self.events.sort_by_key(|e| e.at);
    }
}

/// Why a guest event is refused, for a VM of `nr_vcpus` vCPUs.
fn check(e: &GuestEvent, nr_vcpus: u32) -> Option<EventKind> {
    let kind = EventKind::from_raw(e.kind)?;
    let vcpu_ok = |v: u32| v == NO_VCPU || v < nr_vcpus;
    let mask_ok = |m: u64| nr_vcpus >= 64 || m >> nr_vcpus == 0;
    let ok = e.reserved == 0
        && match kind {
            EventKind::LockSpin | EventKind::LockRelease => vcpu_ok(e.a) && e.b != 0,
            EventKind::IpiWait => e.a <= nr_vcpus && mask_ok(e.b),
            EventKind::IpiAck => e.a < nr_vcpus && e.b == 0,
            EventKind::GpStart | EventKind::GpWait => mask_ok(e.b),
            EventKind::Mode => VcpuMode::from_raw(e.a.try_into().unwrap_or(u8::MAX)).is_some(),
            EventKind::LockSpinEnd | EventKind::IpiWaitEnd | EventKind::GpEnd => true,
        };
    ok.then_some(kind)
}

/// Copies the events vCPU `vcpu` wrote since the last drain into `log` and tells the guest
/// they are consumed. `sync` is called (once, and only if there is something to read) for
/// the clock pair that places them on the host's timeline; without one, they are placed at
/// the drain. A guest cannot make this loop longer than its ring, nor stall it.
pub fn drain(
    mem: &GuestMemoryMmap,
    reg: &Registration,
    vcpu: u32,
    log: &mut EventLog,
    sync: &mut dyn FnMut() -> Option<TscSync>,
) -> Result<(), vm_memory::GuestMemoryError> {
    crate::sched::lock_audit::guest_read();
    let entries = reg.event_ring_entries;
    if entries == 0 || vcpu >= reg.nr_vcpus {
        return Ok(());
    }
    let ring = reg.gpa + event_ring_offset(reg.nr_vcpus as usize, entries, vcpu as usize) as u64;
    let head: u64 = mem.load(
        GuestAddress(ring + offset_of!(EventRingHeader, head) as u64),
        Ordering::Acquire,
    )?;
    let tail_at = GuestAddress(ring + offset_of!(EventRingHeader, tail) as u64);
    let fresh = head.wrapping_sub(log.consumed);
    if fresh == 0 {
        // Nothing new; a `tail` the guest scribbled (a ring that looks full forever) is put
        // back to what the host consumed.
        let tail: u64 = mem.load(tail_at, Ordering::Relaxed)?;
        if tail != log.consumed {
            mem.store(log.consumed, tail_at, Ordering::Release)?;
        }
        return Ok(());
    }
    if fresh > entries as u64 {
        // The guest scribbled its head: start again from where it says it is.
        log.corrupt_rings += 1;
        log.consumed = head;
        return mem.store(head, tail_at, Ordering::Release);
    }
    if log.full() {
        // Nothing more is kept: consume without copying.
        log.capped += fresh;
        log.consumed = head;
        return mem.store(head, tail_at, Ordering::Release);
    }
    let clock = sync().unwrap_or_else(|| {
        log.clock_failures += 1;
        // Placed at the drain: a guest TSC of 0 is never behind an event.
        TscSync {
            guest_tsc: 0,
            host: Instant::now(),
            tsc_khz: 1,
        }
    });
    let floor = log.last_drain.unwrap_or_else(|| {
        let a_second_before = clock.host.checked_sub(Duration::from_secs(1));
        a_second_before.unwrap_or(clock.host)
    });
    let entries_at = ring + EVENT_RING_HEADER_SIZE as u64;
    let mut buf = [0u8; EVENT_SIZE];
    // `fresh` steps from the host's own count, so a head that wrapped past 2^64 still
    // yields its (at most `entries`) events.
    let from = log.consumed;
    for i in (0..fresh).map(|k| from.wrapping_add(k)) {
        let at = entries_at + (i % entries as u64) * EVENT_SIZE as u64;
        mem.read_slice(&mut buf, GuestAddress(at))?;
        let e = GuestEvent::from_bytes(&buf);
        match check(&e, reg.nr_vcpus) {
            Some(kind) => log.push(TracedEvent {
                at: clock.to_host(e.tsc, floor),
                what: Traced::Guest {
                    kind,
                    a: e.a,
                    b: e.b,
                },
            }),
            None => log.invalid += 1,
        }
    }
    log.consumed = head;
    log.last_drain = Some(clock.host);
    log.guest_dropped = mem.load(
        GuestAddress(ring + offset_of!(EventRingHeader, dropped) as u64),
        Ordering::Relaxed,
    )?;
    // Release: our copies are done before the guest may reuse the entries.
    mem.store(head, tail_at, Ordering::Release)
}

/// vCPU `vcpu`'s RCU read-side nesting as its record says (one aligned field, written with
/// one store: no frame needed); 0 if it cannot be read.
pub fn rcu_nesting(mem: &GuestMemoryMmap, reg: &Registration, vcpu: u32) -> u32 {
    crate::sched::lock_audit::guest_read();
    if vcpu >= reg.nr_vcpus {
        return 0;
    }
    let at =
        reg.gpa + record_offset(vcpu as usize) as u64 + offset_of!(VcpuRecord, rcu_nesting) as u64;
    mem.load(GuestAddress(at), Ordering::Relaxed).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_abi::region_size;

    const GPA: u64 = 0x10_0000;

    fn setup(n: u32, entries: u32) -> (GuestMemoryMmap, Registration) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let reg = Registration {
            gpa: GPA,
            nr_vcpus: n,
            size: region_size(n as usize, entries) as u64,
            event_ring_entries: entries,
        };
        (mem, reg)
    }

    /// Writes events as the guest would: entries, then head.
    fn emit(m: &GuestMemoryMmap, reg: &Registration, vcpu: u32, from: u64, events: &[GuestEvent]) {
        let ring = GPA
            + event_ring_offset(reg.nr_vcpus as usize, reg.event_ring_entries, vcpu as usize)
                as u64;
        for (i, e) in events.iter().enumerate() {
            let slot = from.wrapping_add(i as u64) % reg.event_ring_entries as u64;
            let at = ring + 64 + slot * EVENT_SIZE as u64;
            m.write_obj(e.tsc, GuestAddress(at)).unwrap();
            m.write_obj(e.kind, GuestAddress(at + 8)).unwrap();
            m.write_obj(e.reserved, GuestAddress(at + 10)).unwrap();
            m.write_obj(e.a, GuestAddress(at + 12)).unwrap();
            m.write_obj(e.b, GuestAddress(at + 16)).unwrap();
        }
        m.write_obj(from.wrapping_add(events.len() as u64), GuestAddress(ring))
            .unwrap();
    }

    fn ev(tsc: u64, kind: EventKind, a: u32, b: u64) -> GuestEvent {
        GuestEvent {
            tsc,
            kind: kind as u16,
            reserved: 0,
            a,
            b,
        }
    }

    #[test]
    fn drains_checks_and_places_events_on_the_host_clock() {
        let (m, reg) = setup(4, 8);
        let host = Instant::now() + Duration::from_secs(10);
        // 1 MHz counter: one tick per microsecond.
        let mut sync = || {
            Some(TscSync {
                guest_tsc: 5_000,
                host,
                tsc_khz: 1_000,
            })
        };
        emit(
            &m,
            &reg,
            2,
            0,
            &[
                ev(4_000, EventKind::LockSpin, 1, 0xdead),
                ev(4_500, EventKind::LockSpin, 9, 0xdead), // holder 9 of 4 vCPUs
                GuestEvent {
                    kind: 77,
                    ..ev(4_600, EventKind::Mode, 0, 0)
                },
                ev(4_900, EventKind::IpiWait, 2, 0b1010),
            ],
        );
        let mut log = EventLog::with_cap(100);
        drain(&m, &reg, 2, &mut log, &mut sync).unwrap();
        assert_eq!(log.invalid, 2);
        assert_eq!(log.events.len(), 2);
        assert_eq!(log.events[0].at, host - Duration::from_micros(1_000));
        assert_eq!(log.events[1].at, host - Duration::from_micros(100));
        assert_eq!(
            log.events[1].what,
            Traced::Guest {
                kind: EventKind::IpiWait,
                a: 2,
                b: 0b1010
            }
        );
        // The guest is told, through tail, that all four are consumed.
        let ring = GPA + event_ring_offset(4, 8, 2) as u64;
        assert_eq!(m.read_obj::<u64>(GuestAddress(ring + 16)).unwrap(), 4);
        // Nothing new: no clock needed, nothing added.
        let mut no_clock = || -> Option<TscSync> { panic!("clock read for an empty ring") };
        drain(&m, &reg, 2, &mut log, &mut no_clock).unwrap();
        assert_eq!(log.events.len(), 2);
        // A tail the guest scribbled (the ring would look full forever) is put back.
        m.write_obj(0u64, GuestAddress(ring + 16)).unwrap();
        drain(&m, &reg, 2, &mut log, &mut no_clock).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(ring + 16)).unwrap(), 4);
        // Without a clock, events are kept and placed at the drain.
        emit(&m, &reg, 2, 4, &[ev(1, EventKind::GpEnd, 0, 0)]);
        let mut failing = || None;
        drain(&m, &reg, 2, &mut log, &mut failing).unwrap();
        assert_eq!((log.events.len(), log.clock_failures), (3, 1));
    }

    #[test]
    fn a_scribbled_head_is_skipped_and_the_cap_holds() {
        let (m, reg) = setup(2, 8);
        let mut sync = || {
            Some(TscSync {
                guest_tsc: u64::MAX,
                host: Instant::now(),
                tsc_khz: 0,
            })
        };
        let mut log = EventLog::with_cap(3);
        let ring = GPA + event_ring_offset(2, 8, 1) as u64;
        m.write_obj(1_000_000u64, GuestAddress(ring)).unwrap();
        drain(&m, &reg, 1, &mut log, &mut sync).unwrap();
        assert_eq!((log.corrupt_rings, log.events.len()), (1, 0));
        // From the new head on, events flow again; the cap keeps three of five.
        let five = [ev(0, EventKind::GpEnd, 3, 0); 5];
        emit(&m, &reg, 1, 1_000_000, &five);
        drain(&m, &reg, 1, &mut log, &mut sync).unwrap();
        assert_eq!((log.events.len(), log.capped), (3, 2));
        // A head that wrapped past 2^64 still yields its events.
        let mut log = EventLog::with_cap(100);
        let ring = GPA + event_ring_offset(2, 8, 0) as u64;
        m.write_obj(u64::MAX - 1, GuestAddress(ring)).unwrap();
        drain(&m, &reg, 0, &mut log, &mut sync).unwrap();
        assert_eq!(
            log.corrupt_rings, 1,
            "first sight of a far head: resynchronised"
        );
        emit(
            &m,
            &reg,
            0,
            u64::MAX - 1,
            &[ev(0, EventKind::GpEnd, 1, 0); 3],
        );
        drain(&m, &reg, 0, &mut log, &mut sync).unwrap();
        assert_eq!(log.events.len(), 3);
        // Out-of-range vCPUs and rings that do not exist read as nothing.
        drain(&m, &reg, 7, &mut log, &mut sync).unwrap();
        assert_eq!(rcu_nesting(&m, &reg, 7), 0);
    }
}
