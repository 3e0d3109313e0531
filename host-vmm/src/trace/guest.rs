//! A vCPU's guest events as spans: each begin event opens a span that the matching end (or
//! the next begin of the same kind) closes; what is still open at the vCPU's last event is
//! closed there. Lock holds are inferred across vCPUs once every vCPU's waits are known.

use std::collections::HashMap;
use std::time::Instant;

use shared_abi::{EventKind, VcpuMode, NO_VCPU};

use super::{
    args, since, vcpu_tid, Mark, Process, Span, LOCK_HELD, LOCK_WAIT, MODE, RCU, SHOOTDOWN,
};
use crate::guest_events::{EventLog, Traced};

/// The vCPUs named by the low bits of `mask`, as a list.
fn cpus(mask: u64) -> Vec<u32> {
    (0..64).filter(|i| mask & (1 << i) != 0).collect()
}

fn holder_name(h: u32) -> String {
    if h == NO_VCPU {
        "unknown".into()
    } else {
        format!("vcpu{h}")
    }
}

/// An open span: where it goes and what it will be.
struct Open {
    track: usize,
    start: u64,
    name: String,
    cat: &'static str,
    args: serde_json::Map<String, serde_json::Value>,
}

#[derive(Default)]
struct Builder {
    spans: Vec<(usize, Span)>,
    marks: Vec<(usize, Mark)>,
}

impl Builder {
    fn close(&mut self, open: &mut Option<Open>, at: u64) {
        if let Some(o) = open.take() {
            self.spans.push((
                o.track,
                Span {
                    start: o.start,
                    dur: at.saturating_sub(o.start),
                    name: o.name,
                    cat: o.cat,
                    args: o.args,
                },
            ));
        }
    }
}

/// Adds vCPU `v`'s events (`log`) to its VM's process `p`; times count from `epoch`.
pub(super) fn add_vcpu(p: &mut Process, v: usize, log: &EventLog, epoch: Instant) {
    // In time order: the vCPU thread sorted the log when it handed it over.
    let events = &log.events;
    let mut b = Builder::default();
    let (mut spin, mut ipi, mut mode, mut gp) = (None, None, None, None);
    let mut last = 0;
    for e in events {
        let at = since(epoch, e.at);
        last = at;
        let (kind, a, x) = match e.what {
            Traced::Guest { kind, a, b } => (kind, a, b),
            Traced::ReaderPreempted { nesting, dur } => {
                b.spans.push((
                    RCU,
                    Span {
                        start: at,
                        dur: dur.as_nanos() as u64,
                        name: format!("preempted in RCU read section (nesting {nesting})"),
                        cat: "rcu-reader-preempted",
                        args: args([("nesting", nesting.into())]),
                    },
                ));
                last = at.saturating_add(dur.as_nanos() as u64);
                continue;
            }
        };
        match kind {
            EventKind::LockSpin => {
                b.close(&mut spin, at);
                spin = Some(Open {
                    track: LOCK_WAIT,
                    start: at,
                    name: format!("spins on lock {x:#x} (holder {})", holder_name(a)),
                    cat: "lock-spin",
                    args: args([
                        ("lock", format!("{x:#x}").into()),
                        ("holder", holder_name(a).into()),
                    ]),
                });
            }
            EventKind::LockSpinEnd => b.close(&mut spin, at),
            EventKind::LockRelease => b.marks.push((
                LOCK_HELD,
                Mark {
                    at,
                    name: format!("releases lock {x:#x} to {}", holder_name(a)),
                    cat: "lock-release",
                    args: args([
                        ("lock", format!("{x:#x}").into()),
                        ("to", holder_name(a).into()),
                    ]),
                },
            )),
            EventKind::IpiWait => {
                b.close(&mut ipi, at);
                let who = cpus(x);
                // The event names the targets below 64 (the first word of the bitmap).
                let name = if a as usize > who.len() {
                    format!("waits for shootdown acks from {a} vcpus, below 64: {who:?}")
                } else {
                    format!("waits for shootdown acks from {who:?}")
                };
                ipi = Some(Open {
                    track: SHOOTDOWN,
                    start: at,
                    name,
                    cat: "ipi-wait",
                    args: args([("targets", a.into()), ("waiting_for", who.into())]),
                });
            }
            EventKind::IpiWaitEnd => b.close(&mut ipi, at),
            EventKind::IpiAck => b.marks.push((
                SHOOTDOWN,
                Mark {
                    at,
                    name: format!("acknowledges vcpu{a}'s shootdown"),
                    cat: "ipi-ack",
                    args: args([("sender", format!("vcpu{a}").into())]),
                },
            )),
            EventKind::GpStart => {
                b.close(&mut gp, at);
                gp = Some(Open {
                    track: usize::MAX,
                    start: at,
                    name: format!("grace period {a}"),
                    cat: "grace-period",
                    args: args([
                        ("seq", a.into()),
                        ("holdouts_at_start", cpus(x).into()),
                        ("started_on", format!("vcpu{v}").into()),
                    ]),
                });
            }
            EventKind::GpWait => b.marks.push((
                usize::MAX,
                Mark {
                    at,
                    name: format!("grace period {a} waits on {:?}", cpus(x)),
                    cat: "grace-period-wait",
                    args: args([("seq", a.into()), ("holdouts", cpus(x).into())]),
                },
            )),
            EventKind::GpEnd => b.close(&mut gp, at),
            EventKind::Mode => {
                b.close(&mut mode, at);
                let (name, cat) = match VcpuMode::from_raw(a as u8) {
                    Some(VcpuMode::User) => ("user", "mode-user"),
                    Some(VcpuMode::Kernel) => ("kernel", "mode-kernel"),
                    Some(VcpuMode::Idle) => ("idle", "mode-idle"),
                    _ => ("offline", "mode-offline"),
                };
                mode = Some(Open {
                    track: MODE,
                    start: at,
                    name: name.into(),
                    cat,
                    args: args([]),
                });
            }
        }
    }
    for open in [&mut spin, &mut ipi, &mut mode, &mut gp] {
        b.close(open, last);
    }
    for (track, span) in b.spans {
        // usize::MAX: the VM's grace-period track (tid 0).
        let tid = if track == usize::MAX {
            0
        } else {
            vcpu_tid(v, track)
        };
        if let Some(t) = super::track_mut(p, tid) {
            t.spans.push(span);
        }
    }
    for (track, mark) in b.marks {
        let tid = if track == usize::MAX {
            0
        } else {
            vcpu_tid(v, track)
        };
        if let Some(t) = super::track_mut(p, tid) {
            t.marks.push(mark);
        }
    }
}

/// For each release of a lock that others waited for: a span on the releaser's "lock held"
/// track, from when the first of the vCPUs still waiting at the release began to wait (but
/// not before the releaser's own wait for it ended, nor before the lock's previous
/// release) to the release.
pub(super) fn add_lock_holds(p: &mut Process, nr_vcpus: usize) {
    // Per lock: its waits (vcpu, start, end) by start, and its releases (vcpu, at) by time.
    type Waits = Vec<(usize, u64, u64)>;
    let mut locks: HashMap<String, (Waits, Vec<(usize, u64)>)> = HashMap::new();
    for v in 0..nr_vcpus {
        let find = |kind| p.tracks.get(vcpu_tid(v, kind) as usize);
        if let Some(t) = find(LOCK_WAIT) {
            for s in &t.spans {
                if let Some(l) = s.args.get("lock").and_then(|l| l.as_str()) {
                    let e = locks.entry(l.to_string()).or_default();
                    e.0.push((v, s.start, s.start.saturating_add(s.dur)));
                }
            }
        }
        if let Some(t) = find(LOCK_HELD) {
            for m in &t.marks {
                if let Some(l) = m.args.get("lock").and_then(|l| l.as_str()) {
                    locks.entry(l.to_string()).or_default().1.push((v, m.at));
                }
            }
        }
    }
    // At a release at most one wait per vCPU is open, and waits that began after the
    // earliest open one have mostly ended: looking this far back finds the open ones.
    let lookback = 4 * nr_vcpus + 64;
    let mut holds: Vec<(usize, Span)> = Vec::new();
    for (lock, (mut waits, mut releases)) in locks {
        waits.sort_by_key(|w| w.1);
        releases.sort_by_key(|r| r.1);
        let mut previous_release = 0;
        for &(h, at) in &releases {
            let upto = waits.partition_point(|w| w.1 <= at);
            let recent = &waits[upto.saturating_sub(lookback)..upto];
            let waiters: Vec<usize> = recent
                .iter()
                .filter(|w| w.0 != h && at <= w.2)
                .map(|w| w.0)
                .collect();
            let first = recent
                .iter()
                .filter(|w| w.0 != h && at <= w.2)
                .map(|w| w.1)
                .min();
            let own_wait_end = recent
                .iter()
                .filter(|w| w.0 == h && w.2 <= at)
                .map(|w| w.2)
                .max()
                .unwrap_or(0);
            let prev = std::mem::replace(&mut previous_release, at);
            let Some(first) = first else {
                continue;
            };
            let start = first.max(own_wait_end).max(prev);
            let who: Vec<String> = waiters.iter().map(|w| format!("vcpu{w}")).collect();
            holds.push((
                h,
                Span {
                    start,
                    dur: at - start,
                    name: format!("holds lock {lock} ({} waiting)", who.len()),
                    cat: "lock-held",
                    args: args([("lock", lock.clone().into()), ("waiters", who.into())]),
                },
            ));
        }
    }
    // Spans on one track must nest or follow each other (the trace-event format): a hold
    // that would start inside an earlier one and end after it starts where that one ends.
    holds.sort_by_key(|(h, s)| (*h, s.start + s.dur));
    for i in 1..holds.len() {
        let (prev_h, prev_start) = (holds[i - 1].0, holds[i - 1].1.start);
        let prev_end = prev_start + holds[i - 1].1.dur;
        let (h, s) = &mut holds[i];
        if *h == prev_h && prev_start < s.start && s.start < prev_end {
            let end = s.start + s.dur;
            s.start = prev_end;
            s.dur = end - prev_end;
        }
    }
    for (h, span) in holds {
        if let Some(t) = super::track_mut(p, vcpu_tid(h, LOCK_HELD)) {
            t.spans.push(span);
        }
    }
}
