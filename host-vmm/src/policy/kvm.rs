//! KVM's directed yield (virt/kvm/kvm_main.c, kvm_vcpu_on_spin), as a policy: scan
//! round-robin from after the last boosted vCPU, skip the spinner, vCPUs that are not
//! preempted-and-runnable, vCPUs preempted in user mode (unless `boost_user_with_interrupt`
//! and an interrupt is pending: the 2021 upstream fix), and a candidate that is itself
//! spinning every other time it is considered (dy_eligible).

use super::{Boost, BoostPolicy, BoostReason, Cpl, Input, VcpuState};

#[derive(Debug)]
pub struct KvmPolicy {
    boost_user_with_interrupt: bool,
    last_boosted: Option<u32>,
    /// Per vCPU: eligible the next time it is considered while spinning.
    dy_eligible: Vec<bool>,
}

impl KvmPolicy {
    pub fn new(boost_user_with_interrupt: bool) -> Self {
        KvmPolicy {
            boost_user_with_interrupt,
            last_boosted: None,
            dy_eligible: Vec::new(),
        }
    }

    /// kvm_vcpu_eligible_for_directed_yield: a spinning candidate is eligible every other time.
    fn eligible(&mut self, id: usize, in_spin_loop: bool) -> bool {
        if self.dy_eligible.len() <= id {
            self.dy_eligible.resize(id + 1, true);
        }
        if !in_spin_loop {
            return true;
        }
        let e = self.dy_eligible[id];
        self.dy_eligible[id] = !e;
        e
    }
}

impl BoostPolicy for KvmPolicy {
    fn name(&self) -> &str {
        if self.boost_user_with_interrupt {
            "kvm-ipi"
        } else {
            "kvm"
        }
    }

    fn on_spin(&mut self, input: &Input, spinner: u32, named: Option<u32>) -> Option<Boost> {
        let n = input.vcpus.len();
        // KVM_HC_SCHED_YIELD to a vCPU that runs does nothing: what the spinner waits for is
        // about to happen.
        let named_runs = named.and_then(|v| input.vcpus.get(v as usize));
        if n == 0 || named_runs.is_some_and(VcpuState::runs) {
            return None;
        }
        let start = self.last_boosted.map_or(0, |l| (l as usize + 1) % n);
        for k in 0..n {
            let i = (start + k) % n;
            let v = &input.vcpus[i];
            if i as u32 == spinner || !v.candidate() {
                continue;
            }
            let reason = match v.cpl {
                Cpl::User if self.boost_user_with_interrupt && v.interrupt_pending => {
                    BoostReason::UserModeWithInterrupt
                }
                Cpl::User | Cpl::Unknown => continue,
                Cpl::Kernel => BoostReason::DirectedYield,
            };
            if !self.eligible(i, v.in_spin_loop) {
                continue;
            }
            self.last_boosted = Some(i as u32);
            return Some(Boost {
                vcpu: i as u32,
                reason,
            });
        }
        None
    }

    fn on_tick(&mut self, _: &Input) -> Vec<Boost> {
        Vec::new()
    }
}
