//! Policy decisions with a fake clock and synthetic shared regions, garbage included.

use super::*;
use crate::shared_region::{Problems, RecordView, Registration, Snapshot};
use shared_abi::{PageHeader, VcpuMode, VcpuRecord, NO_VCPU};

const MS: Nanos = 1_000_000;
/// A boost costs 100 us here; slices are 3 ms.
const COSTS: Costs = Costs {
    boost_ns: 100_000,
    slice_ns: 3 * MS,
};

fn record(mode: VcpuMode) -> VcpuRecord {
    VcpuRecord {
        seq: 2,
        mode: mode as u8,
        spin_holder: NO_VCPU,
        ..Default::default()
    }
}

fn snapshot(records: Vec<VcpuRecord>, gp_seq: u64, pending: u64) -> Snapshot {
    let n = records.len() as u32;
    let mut header = PageHeader::new(n, 0);
    header.rcu_gp_seq = gp_seq;
    header.rcu_callbacks_pending = pending;
    Snapshot {
        registration: Registration {
            gpa: 0x10_0000,
            nr_vcpus: n,
            size: 4096,
            event_ring_entries: 0,
        },
        header,
        holdouts: Vec::new(),
        records: records
            .into_iter()
            .enumerate()
            .map(|(i, r)| RecordView::new(i as u32, r, n))
            .collect(),
    }
}

fn running(id: u32) -> VcpuState {
    VcpuState {
        id,
        ..VcpuState::running()
    }
}

fn preempted(id: u32, cpl: Cpl) -> VcpuState {
    VcpuState {
        id,
        cpl,
        ..VcpuState::preempted()
    }
}

#[test]
fn kvm_never_boosts_a_user_mode_ipi_receiver_and_the_fix_does() {
    let vcpus = [
        running(0),
        VcpuState {
            interrupt_pending: true,
            ..preempted(1, Cpl::User)
        },
        running(2),
    ];
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: None,
        costs: COSTS,
    };
    assert_eq!(by_name("kvm").unwrap().on_spin(&input, 0, None), None);
    assert_eq!(
        by_name("kvm-ipi").unwrap().on_spin(&input, 0, None),
        Some(Boost {
            vcpu: 1,
            reason: BoostReason::UserModeWithInterrupt
        })
    );
    // Without a pending interrupt the fix does not apply either.
    let vcpus = [running(0), preempted(1, Cpl::User)];
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: None,
        costs: COSTS,
    };
    assert_eq!(by_name("kvm-ipi").unwrap().on_spin(&input, 0, None), None);
}

#[test]
fn kvm_scans_round_robin_from_the_last_boosted_and_skips_spinner_and_blocked() {
    let vcpus = [
        preempted(0, Cpl::Kernel),
        preempted(1, Cpl::Kernel),
        VcpuState {
            blocked: true,
            ..preempted(2, Cpl::Kernel)
        },
        preempted(3, Cpl::Kernel),
    ];
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: None,
        costs: COSTS,
    };
    let mut p = KvmPolicy::new(false);
    let picks: Vec<u32> = (0..4)
        .filter_map(|_| p.on_spin(&input, 0, None).map(|b| b.vcpu))
        .collect();
    assert_eq!(
        picks,
        vec![1, 3, 1, 3],
        "never the spinner (0) nor the blocked vCPU (2)"
    );
}

#[test]
fn kvm_spinning_candidate_is_eligible_every_other_time() {
    let vcpus = [
        running(0),
        VcpuState {
            in_spin_loop: true,
            ..preempted(1, Cpl::Kernel)
        },
    ];
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: None,
        costs: COSTS,
    };
    let mut p = KvmPolicy::new(false);
    let picks: Vec<bool> = (0..4)
        .map(|_| p.on_spin(&input, 0, None).is_some())
        .collect();
    assert_eq!(picks, vec![true, false, true, false]);
}

#[test]
fn pv_prefers_the_named_vcpu_then_the_lock_holder_then_an_ipi_debtor() {
    let vcpus = [
        running(0),
        preempted(1, Cpl::Kernel),
        preempted(2, Cpl::Kernel),
        preempted(3, Cpl::User),
    ];
    let mut spinner = record(VcpuMode::Kernel);
    spinner.spin_lock = 0xffff_8000;
    spinner.spin_holder = 2;
    let mut snap = snapshot(
        vec![
            spinner,
            record(VcpuMode::Kernel),
            record(VcpuMode::Kernel),
            record(VcpuMode::User),
        ],
        0,
        0,
    );
    snap.records[0] = snap.records[0].clone().waiting_on(4, &[3]);
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: Some(&snap),
        costs: COSTS,
    };
    let mut p = PvPolicy::new(PvThresholds::default());
    assert_eq!(
        p.on_spin(&input, 0, Some(1)),
        Some(Boost {
            vcpu: 1,
            reason: BoostReason::NamedBySpinner
        })
    );
    assert_eq!(
        p.on_spin(&input, 0, None),
        Some(Boost {
            vcpu: 2,
            reason: BoostReason::LockHolder
        })
    );
    // Named vCPU running: not a candidate, the record decides.
    let vcpus_named_running = [
        running(0),
        running(1),
        preempted(2, Cpl::Kernel),
        preempted(3, Cpl::User),
    ];
    let input = Input {
        now: 0,
        vcpus: &vcpus_named_running,
        shared: Some(&snap),
        costs: COSTS,
    };
    assert_eq!(p.on_spin(&input, 0, Some(1)).map(|b| b.vcpu), Some(2));
}

#[test]
fn pv_boosts_a_user_mode_ipi_debtor_without_any_pending_interrupt() {
    // The paravirt answer to the user-mode IPI receiver: the sender's record names it.
    let vcpus = [running(0), preempted(1, Cpl::User)];
    let sender = record(VcpuMode::Kernel);
    let mut snap = snapshot(vec![sender, record(VcpuMode::User)], 0, 0);
    snap.records[0] = snap.records[0].clone().waiting_on(2, &[1]);
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: Some(&snap),
        costs: COSTS,
    };
    assert_eq!(by_name("kvm-ipi").unwrap().on_spin(&input, 0, None), None);
    assert_eq!(
        by_name("pv").unwrap().on_spin(&input, 0, None),
        Some(Boost {
            vcpu: 1,
            reason: BoostReason::IpiAckOwed
        })
    );
    // The sender spins: it yields and names the debtor itself, so the tick leaves it alone,
    // also while the sender is preempted...
    assert_eq!(by_name("pv").unwrap().on_tick(&input), vec![]);
    let vcpus = [preempted(0, Cpl::Kernel), preempted(1, Cpl::User)];
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: Some(&snap),
        costs: COSTS,
    };
    assert_eq!(by_name("pv").unwrap().on_tick(&input), vec![]);
    // ...but not once it halted waiting.
    let halted = VcpuState {
        blocked: true,
        preempted: false,
        ..running(0)
    };
    let vcpus = [halted, preempted(1, Cpl::User)];
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: Some(&snap),
        costs: COSTS,
    };
    assert_eq!(
        by_name("pv").unwrap().on_tick(&input),
        vec![Boost {
            vcpu: 1,
            reason: BoostReason::IpiAckOwed
        }]
    );
}

#[test]
fn pv_boosts_preempted_readers_only_once_a_grace_period_is_overdue() {
    let vcpus = [
        running(0),
        preempted(1, Cpl::Kernel),
        preempted(2, Cpl::Kernel),
        running(3),
    ];
    let mut reader = record(VcpuMode::Kernel);
    reader.rcu_nesting = 1;
    let running_reader = VcpuRecord {
        rcu_nesting: 2,
        ..record(VcpuMode::Kernel)
    };
    let records = vec![
        record(VcpuMode::Kernel),
        reader,
        record(VcpuMode::Kernel),
        running_reader,
    ];
    let mut p = PvPolicy::new(PvThresholds { backlog: 1000 });
    // A host where a boost costs 20 ms: a grace period is overdue once it lasted that long.
    let tick = |p: &mut PvPolicy, now: Nanos, gp_seq: u64| {
        let snap = snapshot(records.clone(), gp_seq, 0);
        p.on_tick(&Input {
            now,
            vcpus: &vcpus,
            shared: Some(&snap),
            costs: Costs {
                boost_ns: 20 * MS,
                ..COSTS
            },
        })
    };
    let rcu = vec![Boost {
        vcpu: 1,
        reason: BoostReason::RcuReader,
    }];
    assert!(
        tick(&mut p, 0, 7).is_empty(),
        "grace period 3 just seen in progress"
    );
    assert!(tick(&mut p, 10 * MS, 7).is_empty(), "not overdue yet");
    assert_eq!(
        tick(&mut p, 25 * MS, 7),
        rcu,
        "overdue: the preempted reader, not the running one"
    );
    assert!(tick(&mut p, 26 * MS, 8).is_empty(), "grace period ended");
    assert!(
        tick(&mut p, 30 * MS, 9).is_empty(),
        "a new one starts its own clock"
    );
    assert!(tick(&mut p, 45 * MS, 9).is_empty());
    assert_eq!(tick(&mut p, 51 * MS, 9), rcu);
}

#[test]
fn pv_boosts_readers_when_callbacks_pile_up() {
    let vcpus = [running(0), preempted(1, Cpl::Kernel)];
    let reader = VcpuRecord {
        rcu_nesting: 1,
        ..record(VcpuMode::Kernel)
    };
    let snap = snapshot(vec![record(VcpuMode::Kernel), reader], 4, 5000);
    let mut p = PvPolicy::new(PvThresholds { backlog: 1000 });
    assert_eq!(
        p.on_tick(&Input {
            now: 0,
            vcpus: &vcpus,
            shared: Some(&snap),
            costs: COSTS,
        }),
        vec![Boost {
            vcpu: 1,
            reason: BoostReason::RcuReader
        }]
    );
}

#[test]
fn pv_never_acts_on_a_record_that_failed_validation() {
    let vcpus = [
        running(0),
        preempted(1, Cpl::Kernel),
        preempted(2, Cpl::Kernel),
    ];
    let mut liar = record(VcpuMode::Kernel);
    liar.spin_lock = 1;
    liar.spin_holder = 2;
    liar.reserved0 = [1, 0, 0]; // fails validation
    let snap = snapshot(
        vec![liar, record(VcpuMode::Kernel), record(VcpuMode::Kernel)],
        0,
        0,
    );
    assert!(!snap.records[0].problems.is_empty());
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: Some(&snap),
        costs: COSTS,
    };
    let mut p = PvPolicy::new(PvThresholds::default());
    // The lie is ignored: KVM's rule (round robin from vCPU 0) picks vCPU 1.
    assert_eq!(
        p.on_spin(&input, 0, None),
        Some(Boost {
            vcpu: 1,
            reason: BoostReason::DirectedYield
        })
    );
    assert!(p.on_tick(&input).is_empty());
    // A torn record is not trusted either.
    let mut snap = snap;
    snap.records[0].problems = Problems::TORN;
    snap.records[0].record.reserved0 = [0; 3];
    assert!(PvPolicy::new(PvThresholds::default())
        .on_tick(&Input {
            now: 0,
            vcpus: &vcpus,
            shared: Some(&snap),
            costs: COSTS,
        })
        .is_empty());
}

#[test]
fn garbage_pages_and_states_never_panic_and_decisions_stay_sane() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..2000 {
        let n = (next() % 300 + 1) as usize;
        let vcpus: Vec<VcpuState> = (0..n as u32)
            .map(|id| {
                let r = next();
                VcpuState {
                    id,
                    preempted: r & 1 != 0,
                    blocked: r & 2 != 0,
                    cpl: [Cpl::Kernel, Cpl::User, Cpl::Unknown][(r >> 2) as usize % 3],
                    interrupt_pending: r & 32 != 0,
                    in_spin_loop: r & 64 != 0,
                    expected_wait: r >> 40,
                }
            })
            .collect();
        let records: Vec<VcpuRecord> = (0..n)
            .map(|_| {
                let mut b = [0u8; 64];
                for chunk in b.chunks_mut(8) {
                    chunk.copy_from_slice(&next().to_le_bytes());
                }
                if round % 2 == 0 {
                    // Half the time plausible values, so that trusted paths run too.
                    b[4] %= 4;
                    b[5..8].fill(0);
                    b[20..24].copy_from_slice(&((next() % (n as u64 + 1)) as u32).to_le_bytes());
                    b[32..36].fill(0);
                    b[36..44].fill(0);
                }
                VcpuRecord::from_bytes(&b)
            })
            .collect();
        let mut snap = snapshot(records, next(), next() % 3000);
        if round % 2 == 0 {
            // Waiters and holdouts anywhere in the VM, past 64 too.
            let some = |next: &mut dyn FnMut() -> u64| -> Vec<u32> {
                (0..next() % 8)
                    .map(|_| (next() % n as u64) as u32)
                    .collect()
            };
            for i in 0..n {
                let targets = some(&mut next);
                snap.records[i] = snap.records[i].clone().waiting_on(n as u32, &targets);
            }
            let holdouts = some(&mut next);
            snap.set_holdouts(&holdouts);
        }
        let input = Input {
            now: next() % (100 * MS),
            vcpus: &vcpus,
            shared: Some(&snap),
            costs: COSTS,
        };
        for name in ["none", "kvm", "kvm-ipi", "pv"] {
            let mut p = by_name(name).unwrap();
            let spinner = (next() % n as u64) as u32;
            if let Some(b) = p.on_spin(&input, spinner, Some(next() as u32)) {
                assert!((b.vcpu as usize) < n && b.vcpu != spinner, "{name}: {b:?}");
                assert!(
                    vcpus[b.vcpu as usize].candidate(),
                    "{name} boosted a vCPU that is not preempted: {b:?}"
                );
            }
            let boosts = p.on_tick(&input);
            let mut seen = vec![false; n];
            for b in boosts {
                assert!(vcpus[b.vcpu as usize].candidate(), "{name}: {b:?}");
                assert!(
                    !std::mem::replace(&mut seen[b.vcpu as usize], true),
                    "{name}: vCPU {} twice",
                    b.vcpu
                );
            }
        }
    }
}

#[test]
fn unknown_policy_names_are_refused() {
    assert!(by_name("aggressive").is_err());
    for name in ["none", "kvm", "kvm-ipi", "pv"] {
        assert_eq!(by_name(name).unwrap().name(), name);
    }
}

#[test]
fn a_policy_spec_is_parsed_once_and_shown_canonically() {
    let chain: PolicySpec = " pv , kvm-ipi".parse().unwrap();
    assert_eq!(chain.to_string(), "pv,kvm-ipi");
    assert_eq!(chain.build().name(), "pv,kvm-ipi");
    assert_eq!(PolicySpec::default().to_string(), "pv");
    for bad in ["", "pv,", "pv,nope", "PV"] {
        let e = bad.parse::<PolicySpec>().unwrap_err().to_string();
        assert!(e.contains("unknown boost policy"), "{bad:?}: {e}");
    }
}

#[test]
fn pv_boosts_only_when_the_wait_exceeds_the_cost() {
    let soon = VcpuState {
        expected_wait: 50_000,
        ..preempted(1, Cpl::Kernel)
    };
    let late = VcpuState {
        expected_wait: 2 * MS,
        ..preempted(2, Cpl::Kernel)
    };
    let vcpus = [running(0), soon, late];
    let mut reader = record(VcpuMode::Kernel);
    reader.rcu_nesting = 1;
    let mut snap = snapshot(vec![record(VcpuMode::Kernel), reader, reader], 9, 0);
    snap.set_holdouts(&[1, 2]);
    let input = Input {
        now: 0,
        vcpus: &vcpus,
        shared: Some(&snap),
        costs: COSTS,
    };
    let mut p = PvPolicy::new(PvThresholds::default());
    assert_eq!(
        p.on_spin(&input, 0, Some(1)),
        None,
        "1 runs in 50 us anyway"
    );
    assert_eq!(
        p.on_spin(&input, 0, Some(2)).map(|b| b.vcpu),
        Some(2),
        "2 would wait 2 ms: worth a 100 us boost"
    );
    assert_eq!(
        p.on_rcu_wait(&input),
        vec![Boost {
            vcpu: 2,
            reason: BoostReason::RcuReader
        }],
        "the guest's word boosts at once, what pays"
    );
    let stale = snapshot(vec![record(VcpuMode::Kernel), reader, reader], 10, 0);
    assert!(
        p.on_rcu_wait(&Input {
            shared: Some(&stale),
            ..input
        })
        .is_empty(),
        "no grace period in progress"
    );
}
