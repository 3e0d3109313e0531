//! Boost accounting: a boost that passes another VM's waiting vCPU lends run time from the
//! VM's own future share. Each VM has a debt (ns of boosted run time not yet repaid); a VM
//! whose debt reaches `max_debt` gets no more such boosts, and while it owes, the scheduler
//! gives its turns to VMs that owe nothing (each skipped turn repays it). So a guest that
//! claims every vCPU is a lock holder or a reader gets its vCPUs reordered, never less CPU
//! for another VM than its fair share minus `max_debt`, over any interval (the backends
//! decide what is charged and when time repays: docs/scheduling.md, "What the ledger
//! promises"; `fair_share` measures it).

use super::Nanos;

/// A ledger's limits, as a backend sets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerLimits {
    /// Run time one boost lends.
    pub budget: Nanos,
    /// Most boosted time a VM may owe.
    pub max_debt: Nanos,
}

/// The slot backend's: a boost is a fraction of a 3 ms slice.
pub const SLOT_LEDGER: LedgerLimits = LedgerLimits {
    budget: 500_000,
    max_debt: 30_000_000,
};

/// The Linux backend's: a boost is about a host scheduler tick.
pub const LINUX_LEDGER: LedgerLimits = LedgerLimits {
    budget: 4_000_000,
    max_debt: 40_000_000,
};

#[derive(Clone, Debug)]
pub struct BoostLedger {
    /// Run time one boost may take before the vCPU goes back to normal order.
    pub budget: Nanos,
    /// Most a VM may owe.
    pub max_debt: Nanos,
    debt: Vec<Nanos>,
}

impl BoostLedger {
    pub fn new(vms: usize, budget: Nanos, max_debt: Nanos) -> Self {
        BoostLedger {
            budget,
            max_debt,
            debt: vec![0; vms],
        }
    }

    /// Adds a VM that owes nothing.
    pub fn add_vm(&mut self) {
        self.debt.push(0);
    }

    /// How long `vm`'s boosted vCPU may run, or None if `vm` has borrowed enough.
    pub fn grant(&self, vm: usize) -> Option<Nanos> {
        self.grant_up_to(vm, self.budget)
    }

    /// Like `grant`, for a boost that wants `want` of run time (never past the cap).
    pub fn grant_up_to(&self, vm: usize, want: Nanos) -> Option<Nanos> {
        let owed = *self.debt.get(vm)?;
        (owed < self.max_debt).then(|| want.min(self.max_debt - owed))
    }

    /// The budget of one ordinary boost.
    pub fn budget(&self) -> Nanos {
        self.budget
    }

    /// `vm` ran `ns` on a boost: that time is owed.
    pub fn borrowed(&mut self, vm: usize, ns: Nanos) {
        if let Some(d) = self.debt.get_mut(vm) {
            *d = d.saturating_add(ns);
        }
    }

    /// `vm` gave up `ns` of its turn to another VM: that much is repaid.
    pub fn repaid(&mut self, vm: usize, ns: Nanos) {
        if let Some(d) = self.debt.get_mut(vm) {
            *d = d.saturating_sub(ns);
        }
    }

    /// Debt is relative: what every VM in `vms` owes, none gained over the others. Forgives
    /// that common part, so VMs that all boost keep being able to (their boosts then only
    /// reorder their own vCPUs).
    pub fn forgive_common(&mut self, vms: impl Iterator<Item = usize> + Clone) {
        let common = vms
            .clone()
            .filter_map(|vm| self.debt.get(vm).copied())
            .min()
            .unwrap_or(0);
        if common > 0 {
            for vm in vms {
                self.repaid(vm, common);
            }
        }
    }

    /// Whether `vm` should yield its turn to a VM that owes nothing.
    pub fn owes(&self, vm: usize) -> bool {
        self.debt.get(vm).is_some_and(|&d| d > 0)
    }

    pub fn debt(&self, vm: usize) -> Nanos {
        self.debt.get(vm).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    #[test]
    fn a_longer_boost_is_granted_only_up_to_the_limit() {
        let mut l = BoostLedger::new(1, 2 * MS, 5 * MS);
        assert_eq!(l.grant_up_to(0, 8 * MS), Some(5 * MS));
        l.borrowed(0, 4 * MS);
        assert_eq!(l.grant_up_to(0, 8 * MS), Some(MS), "never past the limit");
        l.borrowed(0, MS);
        assert_eq!(l.grant_up_to(0, 8 * MS), None);
    }

    #[test]
    fn grants_stop_at_the_debt_limit_and_resume_once_repaid() {
        let mut l = BoostLedger::new(2, 2 * MS, 5 * MS);
        assert_eq!(l.grant(0), Some(2 * MS));
        l.borrowed(0, 4 * MS);
        assert_eq!(l.grant(0), Some(MS), "only what is left under the limit");
        l.borrowed(0, MS);
        assert_eq!(l.grant(0), None);
        assert!(l.owes(0) && !l.owes(1));
        l.repaid(0, 3 * MS);
        assert_eq!(l.grant(0), Some(2 * MS));
        assert_eq!(l.grant(7), None, "no such VM");
    }

    #[test]
    fn only_debt_beyond_what_every_vm_owes_counts() {
        let mut l = BoostLedger::new(3, MS, 10 * MS);
        l.borrowed(0, 7 * MS);
        l.borrowed(1, 4 * MS);
        l.forgive_common([0, 1].into_iter());
        assert_eq!((l.debt(0), l.debt(1)), (3 * MS, 0));
        // A VM that owes nothing keeps the others' debts as they are.
        l.forgive_common([0, 1, 2].into_iter());
        assert_eq!(l.debt(0), 3 * MS);
    }

    /// Two VMs share one CPU in 1 ms turns. VM 0 asks for a boost at every turn (a hostile
    /// guest claiming everything); VM 1 never does. Over 10 s, VM 0 gets no more than half the
    /// CPU plus the debt limit.
    #[test]
    fn a_vm_that_claims_everything_gains_at_most_its_debt_limit() {
        let turn = MS;
        let mut l = BoostLedger::new(2, 2 * MS, 20 * MS);
        let mut ran = [0 as Nanos; 2];
        let mut next = 0usize;
        let mut t = 0;
        while t < 10_000 * MS {
            // The hostile VM takes a boost whenever the ledger allows, before VM 1's turn.
            if let Some(b) = l.grant(0) {
                ran[0] += b;
                l.borrowed(0, b);
                t += b;
            }
            // Normal turn order, but a VM that owes gives its turn to one that does not.
            let vm = if l.owes(next) && !l.owes(1 - next) {
                1 - next
            } else {
                next
            };
            if vm != next {
                l.repaid(next, turn);
            }
            ran[vm] += turn;
            t += turn;
            next = 1 - next;
        }
        let total = ran[0] + ran[1];
        assert!(
            ran[0] <= total / 2 + l.max_debt,
            "hostile VM ran {} of {total} ns",
            ran[0]
        );
        assert!(
            ran[1] + l.max_debt >= total / 2,
            "normal VM kept its share: {} of {total}",
            ran[1]
        );
    }
}
