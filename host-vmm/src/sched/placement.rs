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

/// Host CPUs for the live vCPU threads of each VM under the Linux backend with `spread`
/// (`live[vm][vcpu]`, and the CPU each is pinned to now in `current`): siblings go to
/// different CPUs while the VM has no more live vCPUs than there are CPUs. A vCPU keeps its
/// CPU unless a sibling kept it first; any other goes to the least loaded CPU its VM does
/// not use yet (ties to the lowest index). Returns an index into the host CPU list per
/// vCPU, None for a vCPU that is not live. A thread moves only when it must: one that
/// leaves frees its CPU without reshuffling the rest.
pub fn spread_pins(
    live: &[Vec<bool>],
    current: &[Vec<Option<usize>>],
    cpus: usize,
) -> Vec<Vec<Option<usize>>> {
    let mut load = vec![0usize; cpus];
    let mut used = vec![vec![false; cpus]; live.len()];
    let mut out: Vec<Vec<Option<usize>>> = live.iter().map(|vm| vec![None; vm.len()]).collect();
    // Pass 1: vCPUs keep their CPU where no sibling kept it already.
    for (vm, alive) in live.iter().enumerate() {
        for (v, &a) in alive.iter().enumerate() {
            let keep = current
                .get(vm)
                .and_then(|c| c.get(v).copied().flatten())
                .filter(|&c| a && c < cpus && !used[vm][c]);
            if let Some(c) = keep {
                used[vm][c] = true;
                load[c] += 1;
                out[vm][v] = Some(c);
            }
        }
    }
    // Pass 2: the others, to the least loaded CPU their VM does not use yet.
    for (vm, alive) in live.iter().enumerate() {
        for (v, &a) in alive.iter().enumerate() {
            if !a || out[vm][v].is_some() {
                continue;
            }
            let free = used[vm].iter().any(|u| !u);
            let Some(c) = (0..cpus)
                .filter(|&c| !free || !used[vm][c])
                .min_by_key(|&c| (load[c], c))
            else {
                continue;
            };
            used[vm][c] = true;
            load[c] += 1;
            out[vm][v] = Some(c);
        }
    }
    out
}

#[cfg(test)]
mod spread_pins_tests {
    use super::spread_pins;

    /// From scratch: nobody pinned yet.
    fn fresh(live: &[Vec<bool>], cpus: usize) -> Vec<Vec<Option<usize>>> {
        let none: Vec<Vec<Option<usize>>> = live.iter().map(|v| vec![None; v.len()]).collect();
        spread_pins(live, &none, cpus)
    }

    #[test]
    fn siblings_get_different_cpus_while_there_are_enough() {
        // 2 VMs x 2 vCPUs on 2 CPUs: each CPU runs one vCPU of each VM.
        let p = fresh(&[vec![true; 2], vec![true; 2]], 2);
        assert_eq!(p, vec![vec![Some(0), Some(1)], vec![Some(0), Some(1)]]);
        // A VM with more vCPUs than CPUs shares, evenly.
        let p = fresh(&[vec![true; 5]], 2);
        assert_eq!(p[0], vec![Some(0), Some(1), Some(0), Some(1), Some(0)]);
        // Past 64 CPUs nothing changes: no CPU limit is built in.
        let p = fresh(&[vec![true; 100]], 100);
        assert!(p[0].iter().enumerate().all(|(i, c)| *c == Some(i)));
        assert_eq!(fresh(&[vec![true]], 0), vec![vec![None]]);
    }

    #[test]
    fn threads_keep_their_cpu_unless_a_sibling_holds_it() {
        let now = vec![vec![Some(0), Some(1)], vec![Some(0), Some(1)]];
        // VM 0's vCPU 0 leaves: nobody else moves.
        let p = spread_pins(&[vec![false, true], vec![true, true]], &now, 2);
        assert_eq!(p, vec![vec![None, Some(1)], vec![Some(0), Some(1)]]);
        // Two siblings pinned to one CPU (as a host could leave them): one moves to the CPU
        // its VM does not use.
        let stacked = vec![vec![Some(0), Some(0)]];
        let p = spread_pins(&[vec![true, true]], &stacked, 2);
        assert_eq!(p, vec![vec![Some(0), Some(1)]]);
        // A pin outside the CPU list (the host lost CPUs) is dropped, not kept.
        let p = spread_pins(&[vec![true]], &[vec![Some(7)]], 2);
        assert_eq!(p, vec![vec![Some(0)]]);
    }
}
