//! The slot scheduler's state machine under a fake clock.

use super::*;
use crate::policy::{self, Boost, NoBoost};

const MS: Nanos = 1_000_000;

fn core(slots: usize, placement: Placement) -> Core {
    Core::new(CoreConfig {
        slots,
        placement,
        ..CoreConfig::default()
    })
}

fn no_snapshot(_: usize) -> Option<Result<Snapshot, ()>> {
    None
}

/// Starts every vCPU of the core at time 0.
fn start_all(c: &mut Core, n: usize) -> Effects {
    let mut fx = Effects::default();
    for v in 0..n {
        c.start(v, 0, &mut fx);
    }
    fx
}

fn running(c: &Core) -> Vec<Option<usize>> {
    c.layout().into_iter().map(|(r, _)| r).collect()
}

#[test]
fn slices_end_with_a_kick_and_the_slot_goes_round_robin() {
    let mut c = core(1, Placement::Spread);
    c.add_vm(Box::new(NoBoost), 3);
    let fx = start_all(&mut c, 3);
    assert_eq!(fx.run, vec![0], "one slot: only vCPU 0 runs");
    let mut fx = Effects::default();
    c.tick(MS, &mut no_snapshot, &mut fx);
    assert!(fx.kick.is_empty(), "slice not over");
    c.tick(4 * MS, &mut no_snapshot, &mut fx);
    assert_eq!(fx.kick, vec![0]);
    let mut fx2 = Effects::default();
    c.tick(5 * MS, &mut no_snapshot, &mut fx2);
    assert!(fx2.kick.is_empty(), "a pending kick is not repeated");
    let mut fx = Effects::default();
    c.preempt(0, Cpl::Kernel, 5 * MS, &mut fx);
    assert_eq!(fx.run, vec![1]);
    c.preempt(1, Cpl::Kernel, 9 * MS, &mut fx);
    c.preempt(2, Cpl::Kernel, 13 * MS, &mut fx);
    assert_eq!(fx.run, vec![1, 2, 0], "round robin");
    let (_, m) = c.vm_metrics(0, 13 * MS).unwrap();
    assert_eq!(m[0].run_ns, 5 * MS);
    assert_eq!(m[0].preemptions, 1);
    assert_eq!(m[2].wait_ns, 9 * MS, "queued from 0 to 9 ms");
}

#[test]
fn idle_gives_the_slot_away_and_an_ipi_wakes_onto_the_wakers_slot() {
    let mut c = core(2, Placement::WakeAffine);
    c.add_vm(Box::new(NoBoost), 3);
    start_all(&mut c, 3);
    assert_eq!(running(&c), vec![Some(0), Some(1)]);
    let mut fx = Effects::default();
    assert!(c.idle(1, 50 * MS, MS, &mut fx), "no IPI pending: it idles");
    assert_eq!(fx.run, vec![2], "the queued vCPU takes the slot");
    // vCPU 0 (slot 0) wakes vCPU 1: wake-affine queues it on slot 0.
    let mut fx = Effects::default();
    c.ipi(0, 1, 2 * MS, &mut fx);
    assert_eq!(c.state(1), Some(RunState::Queued { slot: 0 }));
    // An IPI to a running vCPU leaves a token: its next idle returns at once.
    c.ipi(0, 2, 2 * MS, &mut fx);
    assert!(!c.idle(2, 60 * MS, 3 * MS, &mut fx));
    assert!(c.is_running(2));
    // Without an IPI, the idle timeout wakes it.
    assert!(c.idle(2, 10 * MS, 3 * MS, &mut fx));
    let mut fx = Effects::default();
    c.tick(11 * MS, &mut no_snapshot, &mut fx);
    assert!(matches!(
        c.state(2),
        Some(RunState::Running { .. } | RunState::Queued { .. })
    ));
    let (_, m) = c.vm_metrics(0, 0).unwrap();
    assert_eq!((m[1].halts, m[2].halts), (1, 1));
    assert_eq!(m[2].ipis_received, 1);
}

/// One slot, VM of 3 vCPUs: 0 spins, 1 is preempted in user mode with an IPI pending, 2 is
/// preempted in kernel mode.
fn spin_scenario(policy: &str) -> (Core, Effects) {
    let mut c = core(1, Placement::Spread);
    c.add_vm(policy::by_name(policy).unwrap(), 3);
    start_all(&mut c, 3);
    let mut fx = Effects::default();
    // 0 runs and sends an IPI to 1 (queued); 1 then runs and is preempted in user mode.
    c.preempt(0, Cpl::Kernel, MS, &mut fx);
    c.preempt(1, Cpl::User, 2 * MS, &mut fx);
    c.preempt(2, Cpl::Kernel, 3 * MS, &mut fx);
    assert!(c.is_running(0));
    c.ipi(0, 1, 3 * MS, &mut fx);
    (c, fx)
}

#[test]
fn kvm_skips_the_user_mode_receiver_and_kvm_ipi_boosts_it() {
    let (mut c, mut fx) = spin_scenario("kvm");
    c.spin_yield(0, Some(1), None, 4 * MS, &mut fx);
    let (_, m) = c.vm_metrics(0, 0).unwrap();
    assert_eq!(m[1].boosts_total(), 0, "kvm never boosts a user-mode vCPU");
    assert_eq!(
        m[2].boosts[0], 1,
        "it yields to the kernel-mode one (directed-yield)"
    );
    assert!(c.is_running(2));

    let (mut c, mut fx) = spin_scenario("kvm-ipi");
    c.spin_yield(0, Some(1), None, 4 * MS, &mut fx);
    let (_, m) = c.vm_metrics(0, 0).unwrap();
    assert_eq!(m[1].boosts[1], 1, "user-mode-with-interrupt");
    assert!(c.is_running(1));
    assert_eq!(m[0].yields, 1);
    assert_eq!(m[1].named_by_yields, 1);
}

/// A policy that asks for every queued vCPU at every turn (a hostile guest's claims), for
/// `tick_reason` on its periodic look.
struct Greedy(BoostReason);

const GREEDY: Greedy = Greedy(BoostReason::LockHolder);

impl BoostPolicy for Greedy {
    fn name(&self) -> &str {
        "greedy"
    }
    fn on_spin(&mut self, input: &Input, spinner: u32, _: Option<u32>) -> Option<Boost> {
        input
            .vcpus
            .iter()
            .find(|v| v.id != spinner && v.candidate())
            .map(|v| Boost {
                vcpu: v.id,
                reason: BoostReason::LockHolder,
            })
    }
    fn on_tick(&mut self, input: &Input) -> Vec<Boost> {
        input
            .vcpus
            .iter()
            .filter(|v| v.candidate())
            .map(|v| Boost {
                vcpu: v.id,
                reason: self.0,
            })
            .collect()
    }
}

/// One tick of `c` at `now`, its kicks honoured at once.
fn tick_and_kick(c: &mut Core, now: Nanos) {
    let mut fx = Effects::default();
    c.tick(now, &mut no_snapshot, &mut fx);
    for v in fx.kick {
        let mut fx = Effects::default();
        c.preempt(v, Cpl::Kernel, now, &mut fx);
    }
}

/// Runs `c` for `until` with ticks every ms and kicks honoured at once; returns run time
/// per VM.
fn simulate(c: &mut Core, until: Nanos, vms: usize) -> Vec<Nanos> {
    let mut now = 0;
    while now < until {
        now += MS;
        tick_and_kick(c, now);
    }
    (0..vms)
        .map(|vm| {
            c.vm_metrics(vm, now)
                .unwrap()
                .1
                .iter()
                .map(|m| m.run_ns)
                .sum()
        })
        .collect()
}

#[test]
fn a_vm_that_claims_every_boost_keeps_no_more_than_its_share() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(Box::new(GREEDY), 4);
    c.add_vm(Box::new(NoBoost), 4);
    start_all(&mut c, 8);
    let total = 10_000 * MS;
    let ran = simulate(&mut c, total, 2);
    let cap = c.config().max_debt;
    let capacity = 2 * total;
    assert!(
        ran[0] <= capacity / 2 + cap + 2 * c.config().slice,
        "greedy VM ran {} of {capacity} ns",
        ran[0]
    );
    assert!(
        ran[1] + cap + 2 * c.config().slice >= capacity / 2,
        "normal VM kept its share: {} of {capacity}",
        ran[1]
    );
    let (vm, m) = c.vm_metrics(0, 0).unwrap();
    assert!(
        m.iter().map(|m| m.boosts_total()).sum::<u64>() > 0,
        "it was boosted"
    );
    // A boosted turn ends at the first tick after its budget: at most a tick over per slot.
    assert!(
        vm.max_debt_ns <= cap + 2 * MS,
        "debt stays under the cap: {}",
        vm.max_debt_ns
    );
}

/// Alone, a VM's boosts pass only its own vCPUs: they are granted without debt.
#[test]
fn boosts_that_pass_only_siblings_are_free() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(Box::new(GREEDY), 4);
    start_all(&mut c, 4);
    simulate(&mut c, 1_000 * MS, 1);
    let (vm, m) = c.vm_metrics(0, 0).unwrap();
    assert!(m.iter().map(|m| m.boosts_total()).sum::<u64>() > 100);
    assert_eq!(m.iter().map(|m| m.boosts_refused).sum::<u64>(), 0);
    assert_eq!(vm.max_debt_ns, 0);
}

/// A greedy VM beside a VM that works in bursts (100 ms busy, 100 ms idle, for 10 s): over
/// any interval, not only within one burst, the bursty VM falls short of its fair share by
/// no more than the cap and a few slices.
#[test]
fn the_ledger_keeps_its_promise_over_time_beside_a_bursty_vm() {
    use crate::sched::fair_share::{shortfalls, Progress, ProgressSeries};
    let mut c = core(2, Placement::Spread);
    c.add_vm(Box::new(GREEDY), 4);
    c.add_vm(Box::new(NoBoost), 4);
    start_all(&mut c, 8);
    let mut series = [ProgressSeries::default(), ProgressSeries::default()];
    let mut now = 0;
    while now < 10_000 * MS {
        now += MS;
        tick_and_kick(&mut c, now);
        // In its idle half, every running vCPU of the bursty VM idles until the next burst.
        let phase = now % (200 * MS);
        if phase >= 100 * MS {
            for v in 4..8 {
                if c.is_running(v) {
                    let mut fx = Effects::default();
                    c.idle(v, now - phase + 200 * MS, now, &mut fx);
                }
            }
        }
        for (vm, s) in series.iter_mut().enumerate() {
            let (_, m) = c.vm_metrics(vm, now).unwrap();
            let run: Nanos = m.iter().map(|m| m.run_ns).sum();
            let wait: Nanos = m.iter().map(|m| m.wait_ns).sum();
            s.push(Progress {
                at_ns: now,
                run_ns: run,
                runnable_ns: run + wait,
            });
        }
    }
    let short = shortfalls(&[&series[0], &series[1]], MS);
    let cap = c.config().max_debt;
    let slice = c.config().slice;
    let (vm, m) = c.vm_metrics(0, now).unwrap();
    assert!(m.iter().map(|m| m.boosts_total()).sum::<u64>() > 0);
    assert!(vm.max_debt_ns >= cap / 2, "the greedy VM ran up a debt");
    assert!(
        short[1].max_ns <= cap + 4 * slice,
        "the bursty VM fell {} ns short over [{}, {}] (cap {cap})",
        short[1].max_ns,
        short[1].from_ns,
        short[1].to_ns
    );
}

/// Three busy vCPUs on two slots: no vCPU keeps a slot to itself; turns rotate over the
/// slots, under either placement.
#[test]
fn busy_vcpus_share_the_slots_evenly() {
    for placement in [Placement::Spread, Placement::WakeAffine] {
        let mut c = core(2, placement);
        c.add_vm(Box::new(NoBoost), 3);
        start_all(&mut c, 3);
        simulate(&mut c, 3_000 * MS, 1);
        let (_, m) = c.vm_metrics(0, 3_000 * MS).unwrap();
        let runs: Vec<Nanos> = m.iter().map(|m| m.run_ns).collect();
        let (lo, hi) = (*runs.iter().min().unwrap(), *runs.iter().max().unwrap());
        assert!(
            lo * 10 >= hi * 8,
            "{placement:?}: run times {runs:?} should be within 20%"
        );
    }
}

/// Two VMs that both boost all the time: neither gains on the other, so neither runs out of
/// boosts.
#[test]
fn vms_that_all_boost_keep_boosting() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(Box::new(Greedy(BoostReason::RcuReader)), 4);
    c.add_vm(Box::new(Greedy(BoostReason::RcuReader)), 4);
    start_all(&mut c, 8);
    simulate(&mut c, 10_000 * MS, 2);
    for vm in 0..2 {
        let (_, m) = c.vm_metrics(vm, 0).unwrap();
        let granted: u64 = m.iter().map(|m| m.boosts_total()).sum();
        let refused: u64 = m.iter().map(|m| m.boosts_refused).sum();
        assert!(
            granted > 10 * refused,
            "vm {vm}: {granted} granted, {refused} refused"
        );
    }
}

/// Boosts every preempted vCPU but 0, urgently, at every look.
struct AllButZero;

impl BoostPolicy for AllButZero {
    fn name(&self) -> &str {
        "all-but-zero"
    }
    fn on_spin(&mut self, _: &Input, _: u32, _: Option<u32>) -> Option<Boost> {
        None
    }
    fn on_tick(&mut self, input: &Input) -> Vec<Boost> {
        input
            .vcpus
            .iter()
            .filter(|v| v.id != 0 && v.candidate())
            .map(|v| Boost {
                vcpu: v.id,
                reason: BoostReason::RcuHoldout,
            })
            .collect()
    }
}

/// Boosts reorder turns but never starve a vCPU nobody names: once it has waited two slices,
/// boosts queue behind it.
#[test]
fn boosts_never_starve_an_unnamed_vcpu() {
    // A ledger that never says no: only the starvation rule stands in the way.
    let mut c = Core::new(CoreConfig {
        slots: 1,
        max_debt: 3_600_000 * MS,
        ..CoreConfig::default()
    });
    c.add_vm(Box::new(AllButZero), 3);
    start_all(&mut c, 3);
    let total = 3_000 * MS;
    simulate(&mut c, total, 1);
    let (_, m) = c.vm_metrics(0, total).unwrap();
    assert!(
        m[0].run_ns * 10 >= total,
        "vCPU 0 ran {} of {total} ns",
        m[0].run_ns
    );
}

#[test]
fn a_tick_boost_runs_next_when_the_turn_ends() {
    let mut c = core(1, Placement::Spread);
    c.add_vm(Box::new(GREEDY), 2);
    start_all(&mut c, 2);
    let mut fx = Effects::default();
    c.tick(MS, &mut no_snapshot, &mut fx);
    assert!(
        fx.kick.is_empty(),
        "a tick boost does not cut the current turn"
    );
    assert_eq!(c.layout()[0].1[0], 1, "the boosted vCPU heads the queue");
    c.tick(4 * MS, &mut no_snapshot, &mut fx);
    assert_eq!(fx.kick, vec![0]);
    let mut fx = Effects::default();
    c.preempt(0, Cpl::Kernel, 4 * MS, &mut fx);
    assert_eq!(fx.run, vec![1]);
    let (_, m) = c.vm_metrics(0, 0).unwrap();
    assert_eq!(m[1].boosts[3], 1, "lock-holder");
    // Its turn is the boost budget, not a whole slice.
    let budget = c.config().boost_budget;
    let mut fx = Effects::default();
    c.tick(4 * MS + budget, &mut no_snapshot, &mut fx);
    assert_eq!(fx.kick, vec![1]);
}

#[test]
fn an_overdue_grace_period_cuts_the_current_turn() {
    let mut c = core(1, Placement::Spread);
    c.add_vm(Box::new(Greedy(BoostReason::RcuHoldout)), 2);
    start_all(&mut c, 2);
    let mut fx = Effects::default();
    c.tick(MS, &mut no_snapshot, &mut fx);
    assert_eq!(fx.kick, vec![0], "kicked before its slice ends");
    c.preempt(0, Cpl::Kernel, MS, &mut fx);
    assert!(c.is_running(1));
}

#[test]
fn a_directed_yield_swaps_turns_and_a_running_target_is_not_yielded_to() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(policy::by_name("pv").unwrap(), 4);
    let mut fx = start_all(&mut c, 4);
    assert_eq!(running(&c), vec![Some(0), Some(1)]);
    // 0 waits for 1, which runs: 0 keeps spinning on its slot.
    c.spin_yield(0, Some(1), None, MS, &mut fx);
    assert!(c.is_running(0));
    // 0 waits for 3, queued behind 1 on slot 1: 3 runs now on slot 0, 0 right after it.
    let queued_on = |c: &Core, v| match c.state(v) {
        Some(RunState::Queued { slot }) => slot,
        other => panic!("{v} is {other:?}"),
    };
    assert_eq!(queued_on(&c, 3), 1);
    c.spin_yield(0, Some(3), None, 2 * MS, &mut fx);
    assert_eq!(running(&c), vec![Some(3), Some(1)]);
    assert_eq!(c.layout()[0].1[0], 0, "the spinner is next on its slot");
    let (_, m) = c.vm_metrics(0, 0).unwrap();
    assert_eq!(m[0].yields_target_running, 1);
    assert_eq!(m[3].boosts[2], 1, "named-by-spinner");
}

/// A spinner that names a running vCPU: under `pv` the host boosts a queued vCPU its record
/// says still owes it an IPI acknowledgement; KVM's policies (a `KVM_HC_SCHED_YIELD` to a
/// running vCPU) and `none` leave it spinning.
#[test]
fn naming_a_running_vcpu_boosts_a_queued_laggard_only_under_pv() {
    for (name, boosted) in [
        ("pv", true),
        ("kvm", false),
        ("kvm-ipi", false),
        ("none", false),
    ] {
        let mut c = core(2, Placement::Spread);
        c.add_vm(policy::by_name(name).unwrap(), 4);
        let mut fx = start_all(&mut c, 4);
        assert_eq!(running(&c), vec![Some(0), Some(1)]);
        // 0 waits for acknowledgements from 1 (running) and 3 (queued behind 1).
        let mut snap = rcu_snapshot(4, 0, &[]);
        snap.records[0] = snap.records[0].clone().waiting_on(4, &[1, 3]);
        c.spin_yield(0, Some(1), Some(&snap), MS, &mut fx);
        let (_, m) = c.vm_metrics(0, MS).unwrap();
        assert_eq!(m[0].yields_target_running, 1, "{name}");
        assert_eq!(c.is_running(3), boosted, "{name}: the queued laggard runs");
        assert_eq!(
            c.is_running(0),
            !boosted,
            "{name}: the spinner keeps its slot"
        );
        if boosted {
            assert_eq!(m[3].boosts.iter().sum::<u64>(), 1, "{name}: one boost");
        }
    }
}

#[test]
fn naming_itself_does_nothing() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(policy::by_name("pv").unwrap(), 4);
    let mut fx = start_all(&mut c, 4);
    let mut snap = rcu_snapshot(4, 0, &[]);
    snap.records[0] = snap.records[0].clone().waiting_on(4, &[3]);
    c.spin_yield(0, Some(0), Some(&snap), MS, &mut fx);
    assert_eq!(running(&c), vec![Some(0), Some(1)]);
}

/// 2 VMs x 4 vCPUs on 4 slots; each vCPU alternates short runs and short idles and wakes a
/// sibling with an IPI (a lock hand-off). Returns VM 0's stacking fraction.
fn stacking(placement: Placement) -> f64 {
    let mut c = core(4, placement);
    c.add_vm(Box::new(NoBoost), 4);
    c.add_vm(Box::new(NoBoost), 4);
    start_all(&mut c, 8);
    let mut now = 0;
    let mut step = 0u64;
    while now < 2_000 * MS {
        now += MS;
        step += 1;
        let mut fx = Effects::default();
        // Every running vCPU wakes its next sibling, then every other one idles briefly.
        for slot in running(&c).into_iter().flatten() {
            let (vm, idx) = (slot / 4, slot % 4);
            c.ipi(slot, ((idx + 1) % 4) as u32, now, &mut fx);
            if (step + slot as u64) % 2 == 0 {
                c.idle(vm * 4 + idx, now + 2 * MS, now, &mut fx);
            }
        }
        c.tick(now, &mut no_snapshot, &mut fx);
        for v in std::mem::take(&mut fx.kick) {
            c.preempt(v, Cpl::Kernel, now, &mut fx);
        }
    }
    c.vm_metrics(0, 0).unwrap().0.stacking_fraction()
}

#[test]
fn spread_stacks_siblings_less_than_wake_affine() {
    let wa = stacking(Placement::WakeAffine);
    let sp = stacking(Placement::Spread);
    assert!(sp < wa, "spread {sp:.3} vs wake-affine {wa:.3}");
}

#[test]
fn bad_keys_and_gone_vcpus_are_ignored() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(Box::new(NoBoost), 2);
    let mut fx = start_all(&mut c, 2);
    for v in [2, 99, usize::MAX] {
        c.preempt(v, Cpl::User, MS, &mut fx);
        c.spin_yield(v, Some(u32::MAX), None, MS, &mut fx);
        assert!(!c.idle(v, MS, MS, &mut fx));
        c.ipi(v, 0, MS, &mut fx);
        c.exit(v, MS, &mut fx);
    }
    c.ipi(0, 7, MS, &mut fx);
    c.spin_yield(0, Some(9), None, MS, &mut fx);
    let mut fx = Effects::default();
    c.end_vm(0, 2 * MS, &mut fx);
    assert!(c.may_proceed(0) && c.may_proceed(1));
    assert_eq!(running(&c), vec![None, None]);
    c.ipi(0, 1, 3 * MS, &mut fx);
    c.tick(4 * MS, &mut no_snapshot, &mut fx);
    assert_eq!(running(&c), vec![None, None], "a gone VM never runs again");
}

#[test]
fn a_lent_turn_is_published_and_given_back() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(policy::by_name("pv").unwrap(), 4);
    let mut fx = start_all(&mut c, 4);
    // 0 waits for 3 (queued): 3 runs on 0's turn, and its record will say who lent it.
    c.spin_yield(0, Some(3), None, MS, &mut fx);
    assert!(c.is_running(3));
    assert_eq!(c.lent_value(3), 1, "lent by vCPU 0");
    assert_eq!(c.lent_value(0), 0);
    // 3 yields naming its lender: the turn goes back to 0 at once, 3 queues.
    let mut fx = Effects::default();
    c.spin_yield(3, Some(0), None, MS + 100_000, &mut fx);
    assert_eq!(fx.run, vec![0]);
    assert!(c.is_running(0) && !c.is_running(3));
    assert_eq!(c.lent_value(3), 0, "no longer lent");
    let (_, m) = c.vm_metrics(0, 0).unwrap();
    assert_eq!(m[3].turns_given_back, 1);
    // Naming a vCPU that lent it nothing is an ordinary yield (0 runs: keep spinning).
    let mut fx = Effects::default();
    c.spin_yield(1, Some(0), None, 2 * MS, &mut fx);
    assert!(c.is_running(1));
}

#[test]
fn a_lender_keeps_its_place_and_gets_its_turn_back_first() {
    // 2 VMs x 2 vCPUs on 2 slots: a0 (key 0) lends its turn to a1 (key 1). Spread must not
    // move a0 away from the slot it lent, and the give-back runs a0 even though its VM owes
    // boosted time and b-vCPUs wait.
    let mut c = core(2, Placement::Spread);
    c.add_vm(policy::by_name("pv").unwrap(), 2);
    c.add_vm(Box::new(NoBoost), 2);
    let mut fx = start_all(&mut c, 4);
    let slot_of = |c: &Core, v| match c.state(v) {
        Some(RunState::Running { slot } | RunState::Queued { slot }) => slot,
        other => panic!("{v} is {other:?}"),
    };
    // Slot 0: a0 runs, b0 queued; slot 1: a1 runs, b1 queued. a1's slice ends: b1 runs.
    assert_eq!(running(&c), vec![Some(0), Some(1)]);
    c.preempt(1, Cpl::Kernel, 3 * MS, &mut fx);
    assert!(c.is_running(0) && matches!(c.state(1), Some(RunState::Queued { .. })));
    let lent_slot = slot_of(&c, 0);
    c.spin_yield(0, Some(1), None, 4 * MS, &mut fx);
    assert!(c.is_running(1));
    assert_eq!(slot_of(&c, 1), lent_slot, "a1 runs on a0's turn");
    let mut fx = Effects::default();
    c.tick(4 * MS + 10_000, &mut no_snapshot, &mut fx);
    assert_eq!(
        slot_of(&c, 0),
        lent_slot,
        "the lender stays behind its turn"
    );
    c.spin_yield(1, Some(0), None, 4 * MS + 50_000, &mut fx);
    assert!(c.is_running(0), "given back: the lender runs at once");
    assert_eq!(slot_of(&c, 0), lent_slot);
}

/// A snapshot of a VM of `n` vCPUs, all in the kernel outside readers, with a grace period
/// `seq` waiting on `holdouts`.
fn rcu_snapshot(n: u32, seq: u64, holdouts: &[u32]) -> Snapshot {
    use crate::shared_region::{RecordView, Registration};
    use shared_abi::{PageHeader, VcpuMode, VcpuRecord, NO_VCPU};
    let mut header = PageHeader::new(n, 0);
    header.rcu_gp_seq = seq;
    let records = (0..n)
        .map(|vcpu| {
            let record = VcpuRecord {
                mode: VcpuMode::Kernel as u8,
                spin_holder: NO_VCPU,
                ..Default::default()
            };
            RecordView::new(vcpu, record, n)
        })
        .collect();
    let mut snap = Snapshot {
        registration: Registration {
            gpa: 0x10_0000,
            nr_vcpus: n,
            size: 4096,
            event_ring_entries: 0,
        },
        header,
        holdouts: Vec::new(),
        records,
    };
    snap.set_holdouts(holdouts);
    snap
}

#[test]
fn rcu_wait_boosts_the_preempted_holdouts_at_once() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(policy::by_name("pv").unwrap(), 4);
    let mut fx = start_all(&mut c, 4);
    assert_eq!(running(&c), vec![Some(0), Some(1)]);
    // Slot 0: 0 runs, 2 queued; slot 1: 1 runs, 3 queued. vCPU 3 is queued behind 1.
    assert_eq!(c.layout()[1].1, vec![3]);
    // A stale hint (not the grace period in progress) boosts nobody.
    let snap = rcu_snapshot(4, 7, &[0, 3]);
    c.rcu_wait(0, 5, Some(&snap), MS, &mut fx);
    assert!(fx.kick.is_empty());
    // The kthread on vCPU 0 names holdouts {0, 3}: 3 is boosted and the sibling's turn on
    // its slot ends now, without waiting for the grace period to look overdue.
    let mut fx = Effects::default();
    c.rcu_wait(0, 7, Some(&snap), MS, &mut fx);
    assert_eq!(fx.kick, vec![1], "vCPU 1's turn is cut for the holdout");
    let (_, m) = c.vm_metrics(0, 0).unwrap();
    assert_eq!(m[3].boosts[6], 1, "rcu-holdout");
    assert_eq!(m[0].rcu_waits, 2);
    c.preempt(1, Cpl::Kernel, MS + 50_000, &mut fx);
    assert!(c.is_running(3));
    // Its turn was given on the grace period's word: its record says so, and it lasts
    // longer than an ordinary boost unless the vCPU gives it back after reporting.
    assert_eq!(c.lent_value(3), shared_abi::NO_VCPU);
    let mut fx = Effects::default();
    c.tick(
        MS + 50_000 + c.config().boost_budget + 1,
        &mut no_snapshot,
        &mut fx,
    );
    assert!(fx.kick.is_empty(), "an RCU boost outlasts one budget");
    c.spin_yield(3, Some(3), None, 2 * MS, &mut fx);
    assert!(!c.is_running(3), "given back with YieldTo(itself)");
    assert_eq!(c.vm_metrics(0, 0).unwrap().1[3].turns_given_back, 1);
}

#[test]
fn boosts_wait_for_a_measured_cost() {
    // Hand-offs and kicks of 5 ms each: no queued vCPU here waits long enough for a boost to
    // pay (3 ms slices), so pv yields to nobody.
    let mut c = core(2, Placement::Spread);
    c.add_vm(policy::by_name("pv").unwrap(), 4);
    let mut fx = start_all(&mut c, 4);
    for _ in 0..10 {
        c.record_handoff(0, 5 * MS);
    }
    c.tick(MS, &mut no_snapshot, &mut fx);
    assert!(c.costs().boost_ns >= 4 * MS, "{:?}", c.costs());
    c.spin_yield(0, Some(3), None, MS, &mut fx);
    assert!(
        c.is_running(0),
        "a boost would cost more than the wait it saves"
    );
    let (_, m) = c.vm_metrics(0, 0).unwrap();
    assert_eq!(m[3].boosts_total(), 0);
}

/// 2 VMs x 2 vCPUs on 2 slots, each vCPU idling now and then and waking a sibling (a lock
/// hand-off): returns both VMs' stacking fractions.
fn stacking_2x2(placement: Placement) -> (f64, f64) {
    let mut c = core(2, placement);
    c.add_vm(Box::new(NoBoost), 2);
    c.add_vm(Box::new(NoBoost), 2);
    start_all(&mut c, 4);
    let mut now = 0;
    let mut step = 0u64;
    while now < 2_000 * MS {
        now += MS;
        step += 1;
        let mut fx = Effects::default();
        for v in running(&c).into_iter().flatten() {
            let (vm, idx) = (v / 2, v % 2);
            if (step + v as u64) % 5 == 0 {
                c.idle(vm * 2 + idx, now + 2 * MS, now, &mut fx);
            } else if matches!(c.state(vm * 2 + 1 - idx), Some(RunState::Idle { .. })) {
                // A hand-off to a halted waiter.
                c.ipi(v, (1 - idx) as u32, now, &mut fx);
            }
        }
        c.tick(now, &mut no_snapshot, &mut fx);
        for v in std::mem::take(&mut fx.kick) {
            c.preempt(v, Cpl::Kernel, now, &mut fx);
        }
    }
    let f = |vm| c.vm_metrics(vm, 0).unwrap().0.stacking_fraction();
    (f(0), f(1))
}

#[test]
fn spread_never_stacks_when_it_can_avoid_it() {
    assert_eq!(stacking_2x2(Placement::Spread), (0.0, 0.0));
    let (a, b) = stacking_2x2(Placement::WakeAffine);
    assert!(a > 0.0 && b > 0.0, "wake-affine stacks: {a} {b}");
}

#[test]
fn rcu_words_are_rate_limited() {
    let mut c = core(2, Placement::Spread);
    c.add_vm(policy::by_name("pv").unwrap(), 4);
    let mut fx = start_all(&mut c, 4);
    // A guest that forges a new grace period for every word, naming every vCPU.
    for i in 0..200u64 {
        let seq = 2 * i + 1;
        let snap = rcu_snapshot(4, seq, &[0, 1, 2, 3]);
        c.rcu_wait(0, seq as u32, Some(&snap), MS + i, &mut fx);
    }
    let (vm, m) = c.vm_metrics(0, MS + 200).unwrap();
    assert_eq!(m[0].rcu_waits, 200, "every word is counted");
    assert_eq!(
        vm.rcu_words_ignored,
        200 - 8,
        "8 acted on in one policy period"
    );
    // A period later: a word for an earlier grace period is ignored, a later one is not,
    // and a fourth word for the same grace period is ignored.
    let now = 3 * MS;
    let old = rcu_snapshot(4, 1, &[0, 1, 2, 3]);
    c.rcu_wait(0, 1, Some(&old), now, &mut fx);
    let snap = rcu_snapshot(4, 1001, &[0, 1, 2, 3]);
    for _ in 0..4 {
        c.rcu_wait(0, 1001, Some(&snap), now, &mut fx);
    }
    assert_eq!(
        c.vm_metrics(0, now).unwrap().0.rcu_words_ignored,
        192 + 1 + 1
    );
}
