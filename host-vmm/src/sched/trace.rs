//! What the slot scheduler did, for the trace (`crate::trace` draws it): each vCPU's turns
//! (which slot, boosted or not), its waits (queued, idle) and each boost.

use std::time::Instant;

use super::Nanos;

/// Cap on recorded events, so a long run cannot exhaust memory.
pub const MAX_EVENTS: usize = 1 << 20;

/// How a vCPU that did not run spent a span of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// Runnable, queued on `slot`.
    Queued { slot: usize },
    /// In the Idle hypercall (halted until a timeout or an interrupt).
    Idle,
}

#[derive(Clone, Debug)]
pub enum Event {
    /// `vcpu` of `vm` held `slot` from `start` for `dur`; `boost` names why it was boosted.
    Turn {
        slot: usize,
        vm: usize,
        vcpu: u32,
        start: Nanos,
        dur: Nanos,
        boost: Option<&'static str>,
    },
    /// `vcpu` of `vm` waited from `start` for `dur`.
    Wait {
        vm: usize,
        vcpu: u32,
        how: Waited,
        start: Nanos,
        dur: Nanos,
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

#[derive(Debug)]
pub struct Trace {
    events: Vec<Event>,
    pub dropped: u64,
    /// The instant the scheduler's times count from.
    pub epoch: Instant,
}

impl Trace {
    /// An empty trace whose times count from `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Trace {
            events: Vec::new(),
            dropped: 0,
            epoch,
        }
    }

    pub fn push(&mut self, e: Event) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(e);
        } else {
            self.dropped += 1;
        }
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}
