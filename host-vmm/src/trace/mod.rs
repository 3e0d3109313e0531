//! The trace of a run: what the slot scheduler did and what each guest said it was doing,
//! as one timeline ([`Timeline`]: processes holding tracks holding spans and marks), written
//! as Perfetto/Chrome trace-event JSON (`json`) or drawn as an SVG (`svg`).
//!
//! Processes: "slots" (one track per host CPU slot: who ran), then one per VM, with a track
//! for its RCU grace periods and, per vCPU, tracks for its host state (running, queued,
//! idle, boosts), its lock waits, the locks it held while others waited, its shootdown
//! waits, its RCU read sections preempted by the host, and its mode (user, kernel, idle).

mod guest;
pub mod json;
pub mod svg;

use std::time::Instant;

use crate::guest_events::EventLog;
use crate::sched::trace::{Event, Trace, Waited};
use crate::vm::RunReport;

/// Tracks per vCPU in a VM's process, in this order.
pub const VCPU_TRACKS: [&str; 6] = [
    "state",
    "lock wait",
    "lock held",
    "shootdown",
    "rcu",
    "mode",
];
const STATE: usize = 0;
pub(crate) const LOCK_WAIT: usize = 1;
pub(crate) const LOCK_HELD: usize = 2;
pub(crate) const SHOOTDOWN: usize = 3;
pub(crate) const RCU: usize = 4;
pub(crate) const MODE: usize = 5;

/// Every span and mark category, with its colour in the SVG.
pub const CATEGORIES: [(&str, &str); 17] = [
    ("running", "#4c9a2a"),
    ("boosted", "#e08a00"),
    ("queued", "#d0d0d0"),
    ("idle", "#a8c8e8"),
    ("lock-spin", "#d62728"),
    ("lock-held", "#9467bd"),
    ("ipi-wait", "#ff7f0e"),
    ("grace-period", "#1f77b4"),
    ("rcu-reader-preempted", "#8c564b"),
    ("mode-user", "#2ca02c"),
    ("mode-kernel", "#17becf"),
    ("mode-idle", "#e7e7e7"),
    ("boost", "#e08a00"),
    ("grace-period-wait", "#1f77b4"),
    ("lock-release", "#9467bd"),
    ("ipi-ack", "#ff7f0e"),
    ("mode-offline", "#ffffff"),
];

/// Process id of the slots; VM `i` is `VM_PID_BASE + i`.
pub const SLOTS_PID: u32 = 1;
pub const VM_PID_BASE: u32 = 10;

/// Something that lasted: `[start, start + dur)` in nanoseconds from the trace's epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub start: u64,
    pub dur: u64,
    pub name: String,
    /// Category: what kind of span (colours the SVG; Perfetto filters on it).
    pub cat: &'static str,
    pub args: serde_json::Map<String, serde_json::Value>,
}

/// Something that happened at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    pub at: u64,
    pub name: String,
    pub cat: &'static str,
    pub args: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Track {
    pub tid: u32,
    pub name: String,
    pub spans: Vec<Span>,
    pub marks: Vec<Mark>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Process {
    pub pid: u32,
    pub name: String,
    pub tracks: Vec<Track>,
}

/// What was lost on the way (the trace is complete when all are zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Losses {
    /// Scheduler events over its cap.
    pub sched_dropped: u64,
    /// Guest events the guests could not write (ring full).
    pub guest_dropped: u64,
    /// Guest events the host refused (failed the checks) or found in a corrupt ring.
    pub guest_invalid: u64,
    /// Guest events over the host's cap.
    pub guest_capped: u64,
}

impl std::fmt::Display for Losses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Losses::default() {
            return write!(f, "nothing lost");
        }
        write!(
            f,
            "lost: {} scheduler events over the cap; guest events: {} dropped by the guest, {} \
             refused, {} over the cap",
            self.sched_dropped, self.guest_dropped, self.guest_invalid, self.guest_capped
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    pub processes: Vec<Process>,
    pub losses: Losses,
}

/// One VM as the trace needs it.
pub struct VmEvents<'a> {
    pub name: &'a str,
    /// Its vCPUs' guest events (one log per vCPU; may be empty).
    pub logs: &'a [EventLog],
    pub nr_vcpus: usize,
}

/// The timeline of a finished run: the scheduler's trace (if any) and every VM's events;
/// times count from the scheduler's epoch, else from `run_start`.
pub fn of_run(run_start: Instant, sched: Option<&Trace>, reports: &[RunReport]) -> Timeline {
    let epoch = sched.map_or(run_start, |t| t.epoch);
    let vms: Vec<VmEvents> = reports
        .iter()
        .map(|r| VmEvents {
            name: &r.name,
            logs: &r.guest_events,
            nr_vcpus: r.yields_to.len(),
        })
        .collect();
    Timeline::build(epoch, sched, &vms)
}

/// Nanoseconds from `epoch` to `t` (0 if before).
pub(crate) fn since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_nanos() as u64
}

pub(crate) fn args<const N: usize>(
    kv: [(&str, serde_json::Value); N],
) -> serde_json::Map<String, serde_json::Value> {
    kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Track id of vCPU `vcpu`'s track `kind` in its VM's process (0 is the grace periods).
pub fn vcpu_tid(vcpu: usize, kind: usize) -> u32 {
    (1 + vcpu * VCPU_TRACKS.len() + kind) as u32
}

impl Timeline {
    /// Builds the timeline of a run from the scheduler's trace (if the backend kept one) and
    /// the guests' events; times count from `epoch`.
    pub fn build(epoch: Instant, sched: Option<&Trace>, vms: &[VmEvents]) -> Timeline {
        let mut t = Timeline::default();
        let mut vm_procs: Vec<Process> = vms
            .iter()
            .enumerate()
            .map(|(i, vm)| vm_process(i, vm))
            .collect();
        if let Some(trace) = sched {
            t.losses.sched_dropped = trace.dropped;
            // The scheduler counts from its own epoch.
            let shift = since(epoch, trace.epoch);
            let slots = sched_tracks(trace, shift, vms, &mut vm_procs);
            t.processes.push(Process {
                pid: SLOTS_PID,
                name: "slots (host CPUs)".into(),
                tracks: slots,
            });
        }
        for (i, vm) in vms.iter().enumerate() {
            for (v, log) in vm.logs.iter().enumerate() {
                // Saturating: `guest_dropped` is the guest's own word.
                let l = &mut t.losses;
                l.guest_dropped = l.guest_dropped.saturating_add(log.guest_dropped);
                l.guest_invalid = l
                    .guest_invalid
                    .saturating_add(log.invalid.saturating_add(log.corrupt_rings));
                l.guest_capped = l.guest_capped.saturating_add(log.capped);
                guest::add_vcpu(&mut vm_procs[i], v, log, epoch);
            }
            guest::add_lock_holds(&mut vm_procs[i], vm.nr_vcpus);
        }
        t.processes.extend(vm_procs);
        for p in &mut t.processes {
            for tr in &mut p.tracks {
                tr.spans.sort_by_key(|s| s.start);
                tr.marks.sort_by_key(|m| m.at);
            }
        }
        t
    }

    /// Every span of every track, with its process and track.
    pub fn spans(&self) -> impl Iterator<Item = (&Process, &Track, &Span)> {
        self.processes.iter().flat_map(|p| {
            p.tracks
                .iter()
                .flat_map(move |t| t.spans.iter().map(move |s| (p, t, s)))
        })
    }

    /// The end of the last span or mark.
    pub fn end(&self) -> u64 {
        let spans = self.spans().map(|(_, _, s)| s.start.saturating_add(s.dur));
        let marks = self
            .processes
            .iter()
            .flat_map(|p| p.tracks.iter().flat_map(|t| t.marks.iter().map(|m| m.at)));
        spans.chain(marks).max().unwrap_or(0)
    }
}

fn vm_process(i: usize, vm: &VmEvents) -> Process {
    let mut tracks = vec![Track {
        tid: 0,
        name: "rcu grace periods".into(),
        ..Track::default()
    }];
    for v in 0..vm.nr_vcpus {
        for (k, kind) in VCPU_TRACKS.iter().enumerate() {
            tracks.push(Track {
                tid: vcpu_tid(v, k),
                name: format!("vcpu{v} {kind}"),
                ..Track::default()
            });
        }
    }
    Process {
        pid: VM_PID_BASE + i as u32,
        name: format!("VM {}", vm.name),
        tracks,
    }
}

/// The slot tracks, and each vCPU's host state track.
fn sched_tracks(
    trace: &Trace,
    shift: u64,
    vms: &[VmEvents],
    vm_procs: &mut [Process],
) -> Vec<Track> {
    let mut slots: Vec<Track> = Vec::new();
    let mut slot = |s: usize| -> usize {
        while slots.len() <= s {
            slots.push(Track {
                tid: slots.len() as u32,
                name: format!("slot {}", slots.len()),
                ..Track::default()
            });
        }
        s
    };
    let name = |vm: usize, vcpu: u32| {
        let vm = vms.get(vm).map_or("vm", |v| v.name);
        format!("{vm}/vcpu{vcpu}")
    };
    let mut slot_tracks: Vec<(usize, Span)> = Vec::new();
    let mut slot_marks: Vec<(usize, Mark)> = Vec::new();
    for e in trace.events() {
        match *e {
            Event::Turn {
                slot: s,
                vm,
                vcpu,
                start,
                dur,
                boost,
            } => {
                let cat = if boost.is_some() {
                    "boosted"
                } else {
                    "running"
                };
                let mut a = args([("slot", s.into())]);
                if let Some(b) = boost {
                    a.insert("boost".into(), b.into());
                }
                slot_tracks.push((
                    slot(s),
                    Span {
                        start: start + shift,
                        dur,
                        name: name(vm, vcpu),
                        cat,
                        args: a.clone(),
                    },
                ));
                let state = match boost {
                    Some(b) => format!("running on slot {s} (boosted: {b})"),
                    None => format!("running on slot {s}"),
                };
                push_state(vm_procs, vm, vcpu, start + shift, dur, state, cat, a);
            }
            Event::Wait {
                vm,
                vcpu,
                how,
                start,
                dur,
            } => {
                let (state, cat, a) = match how {
                    Waited::Queued { slot } => (
                        format!("queued on slot {slot}"),
                        "queued",
                        args([("slot", slot.into())]),
                    ),
                    Waited::Idle => ("idle".to_string(), "idle", args([])),
                };
                push_state(vm_procs, vm, vcpu, start + shift, dur, state, cat, a);
            }
            Event::Boost {
                slot: s,
                vm,
                vcpu,
                at,
                reason,
            } => {
                let m = Mark {
                    at: at + shift,
                    name: format!("boost {} ({reason})", name(vm, vcpu)),
                    cat: "boost",
                    args: args([("reason", reason.into()), ("slot", s.into())]),
                };
                slot_marks.push((slot(s), m.clone()));
                if let Some(t) = vcpu_track(vm_procs, vm, vcpu, STATE) {
                    t.marks.push(Mark {
                        name: format!("boosted ({reason})"),
                        ..m
                    });
                }
            }
        }
    }
    for (s, span) in slot_tracks {
        slots[s].spans.push(span);
    }
    for (s, mark) in slot_marks {
        slots[s].marks.push(mark);
    }
    slots
}

pub(crate) fn vcpu_track(
    procs: &mut [Process],
    vm: usize,
    vcpu: u32,
    kind: usize,
) -> Option<&mut Track> {
    track_mut(procs.get_mut(vm)?, vcpu_tid(vcpu as usize, kind))
}

/// Track `tid` of a VM's process: its tracks are made in tid order (`vm_process`), so the
/// tid is the index.
pub(crate) fn track_mut(p: &mut Process, tid: u32) -> Option<&mut Track> {
    p.tracks.get_mut(tid as usize).filter(|t| t.tid == tid)
}

#[allow(clippy::too_many_arguments)]
fn push_state(
    procs: &mut [Process],
    vm: usize,
    vcpu: u32,
    start: u64,
    dur: u64,
    name: String,
    cat: &'static str,
    args: serde_json::Map<String, serde_json::Value>,
) {
    if let Some(t) = vcpu_track(procs, vm, vcpu, STATE) {
        t.spans.push(Span {
            start,
            dur,
            name,
            cat,
            args,
        });
    }
}
