//! Where a vCPU that becomes runnable is queued: pure functions of the slots' contents.

use std::collections::VecDeque;

/// Placement policy for vCPUs that become runnable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Placement {
    /// Like CFS wake-affine: a woken vCPU queues on its waker's slot, a preempted one on the
    /// slot it ran on. Siblings pile up on one slot ("stacking").
    WakeAffine,
    /// Anti-stacking: never queue behind a sibling of the same VM when another slot has none.
    #[default]
    Spread,
}

impl Placement {
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "wake-affine" => Some(Placement::WakeAffine),
            "spread" => Some(Placement::Spread),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Placement::WakeAffine => "wake-affine",
            Placement::Spread => "spread",
        }
    }
}

/// What placement sees of one slot: the VM of its running vCPU and of each queued one.
pub struct SlotView<'a> {
    pub running: Option<usize>,
    pub queued: &'a VecDeque<usize>,
}

impl SlotView<'_> {
    fn load(&self) -> usize {
        self.running.is_some() as usize + self.queued.len()
    }

    /// vCPUs on this slot (running or queued) that belong to `vm`, `me` excluded.
    fn siblings(&self, vm_of: &dyn Fn(usize) -> usize, vm: usize, me: usize) -> usize {
        self.running
            .iter()
            .chain(self.queued.iter())
            .filter(|&&v| v != me && vm_of(v) == vm)
            .count()
    }
}

/// Why a vCPU is being placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// First run.
    Start,
    /// Woken (by an IPI from the vCPU on `waker_slot`, or by its timer when None).
    Wake { waker_slot: Option<usize> },
    /// Its slice ended or it yielded.
    Requeue,
}

/// The slot vCPU `me` (of VM `vm`, last on `last_slot`) goes to.
pub fn choose(
    placement: Placement,
    slots: &[SlotView],
    vm_of: &dyn Fn(usize) -> usize,
    me: usize,
    vm: usize,
    last_slot: usize,
    cause: Cause,
) -> usize {
    let least_loaded = || {
        (0..slots.len())
            .min_by_key(|&s| (slots[s].load(), s != last_slot))
            .unwrap_or(0)
    };
    match placement {
        Placement::WakeAffine => match cause {
            Cause::Start => least_loaded(),
            Cause::Wake { waker_slot } => waker_slot.unwrap_or(last_slot),
            Cause::Requeue => last_slot,
        }
        .min(slots.len().saturating_sub(1)),
        Placement::Spread => (0..slots.len())
            .min_by_key(|&s| {
                (
                    slots[s].siblings(vm_of, vm, me),
                    slots[s].load(),
                    s != last_slot,
                )
            })
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vCPUs 0..4 belong to VM 0, 4..8 to VM 1.
    fn vm_of(v: usize) -> usize {
        v / 4
    }

    #[test]
    fn wake_affine_follows_the_waker_and_spread_avoids_siblings() {
        let q0: VecDeque<usize> = [1].into();
        let q1: VecDeque<usize> = VecDeque::new();
        let slots = [
            SlotView {
                running: Some(0),
                queued: &q0,
            },
            SlotView {
                running: Some(4),
                queued: &q1,
            },
        ];
        let wake = Cause::Wake {
            waker_slot: Some(0),
        };
        assert_eq!(
            choose(Placement::WakeAffine, &slots, &vm_of, 2, 0, 1, wake),
            0
        );
        // Slot 0 has two siblings of vCPU 2, slot 1 none.
        assert_eq!(choose(Placement::Spread, &slots, &vm_of, 2, 0, 0, wake), 1);
        // vCPU 5 (VM 1) has a sibling on slot 1 and none on slot 0.
        assert_eq!(
            choose(Placement::Spread, &slots, &vm_of, 5, 1, 1, Cause::Requeue),
            0
        );
        // Its own presence does not count: vCPU 4 requeued stays where it is.
        assert_eq!(
            choose(Placement::Spread, &slots, &vm_of, 4, 1, 1, Cause::Requeue),
            1
        );
    }

    #[test]
    fn spread_falls_back_to_the_fewest_siblings() {
        let q: VecDeque<usize> = [1, 2].into();
        let q1: VecDeque<usize> = VecDeque::new();
        let slots = [
            SlotView {
                running: Some(0),
                queued: &q,
            },
            SlotView {
                running: Some(3),
                queued: &q1,
            },
        ];
        assert_eq!(
            choose(Placement::Spread, &slots, &vm_of, 7, 0, 0, Cause::Start),
            1
        );
    }
}
