//! Slot occupancy and boosts as a Chrome trace (JSON array format; chrome://tracing and
//! Perfetto open it): one row per slot, a span per vCPU turn, an instant event per boost.

use std::io::Write;

use super::Nanos;

/// Cap on recorded events, so a long run cannot exhaust memory.
pub const MAX_EVENTS: usize = 1 << 20;

#[derive(Clone, Debug)]
pub enum Event {
    /// `vcpu` of `vm` held `slot` from `start` for `dur`.
    Turn {
        slot: usize,
        vm: usize,
        vcpu: u32,
        start: Nanos,
        dur: Nanos,
        boosted: bool,
    },
    /// `vcpu` of `vm` was boosted onto `slot` at `at`.
    Boost {
        slot: usize,
        vm: usize,
        vcpu: u32,
        at: Nanos,
        reason: &'static str,
    },
}

#[derive(Debug, Default)]
pub struct Trace {
    events: Vec<Event>,
    pub dropped: u64,
}

impl Trace {
    pub fn push(&mut self, e: Event) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(e);
        } else {
            self.dropped += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Writes the trace; `vm_names` label the vCPUs.
    pub fn write(&self, out: &mut dyn Write, vm_names: &[String]) -> std::io::Result<()> {
        let name = |vm: usize, vcpu: u32| {
            let vm = vm_names.get(vm).map_or("vm", String::as_str);
            format!("{vm}/vcpu{vcpu}")
        };
        let us = |ns: Nanos| ns as f64 / 1000.0;
        writeln!(out, "[")?;
        let mut first = true;
        for e in &self.events {
            let v = match e {
                Event::Turn {
                    slot,
                    vm,
                    vcpu,
                    start,
                    dur,
                    boosted,
                } => serde_json::json!({
                    "name": name(*vm, *vcpu), "cat": if *boosted { "boosted" } else { "turn" },
                    "ph": "X", "pid": 0, "tid": slot, "ts": us(*start), "dur": us(*dur),
                }),
                Event::Boost {
                    slot,
                    vm,
                    vcpu,
                    at,
                    reason,
                } => serde_json::json!({
                    "name": format!("boost {} ({reason})", name(*vm, *vcpu)), "cat": "boost",
                    "ph": "i", "s": "t", "pid": 0, "tid": slot, "ts": us(*at),
                }),
            };
            if !first {
                writeln!(out, ",")?;
            }
            first = false;
            write!(out, "{v}")?;
        }
        writeln!(out, "\n]")
    }
}
