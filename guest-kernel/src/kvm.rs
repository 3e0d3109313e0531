//! What the kernel takes from KVM's own paravirtual features (docs/design.md, "Stock KVM's
//! paravirtual features"): which ones the host offers and the command line (`kvm=`) allows,
//! each CPU's steal-time area, the boot report and the statistics line.
//!
//! The platform (`platform.rs`) turns them into the synchronization crate's hooks:
//! `vcpu_is_preempted` (pvlock), `flush_tlb_on_resume` (pvtlb), `yield_to_preempted`
//! (yield), the kick (kick) and multi-target IPIs (sendipi).

use alloc::boxed::Box;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};

use pvsync_boot_parse::cmdline::KvmUse;
use shared_abi::kvm_para::{KvmFeatures, KvmStealTime};
use shared_abi::PAGE_SIZE;
use spin::Once;

use crate::arch::kvm;
use crate::println;

/// Each CPU's steal time when it enabled its area: KVM's first value may already be large
/// (it counts from the vCPU's creation), so statistics report what came after.
static STEAL_AT_START: Once<Box<[AtomicU64]>> = Once::new();

/// What KVM offers that each `kvm=` feature needs.
fn needs(feature: u32) -> u32 {
    match feature {
        KvmUse::STEAL | KvmUse::PVLOCK => KvmFeatures::STEAL_TIME,
        KvmUse::PVTLB => KvmFeatures::STEAL_TIME | KvmFeatures::PV_TLB_FLUSH,
        KvmUse::YIELD => KvmFeatures::PV_SCHED_YIELD,
        KvmUse::KICK => KvmFeatures::PV_UNHALT,
        KvmUse::SENDIPI => KvmFeatures::PV_SEND_IPI,
        _ => u32::MAX,
    }
}

/// Finds KVM, decides what to use (`asked`, where offered; the kick and multi-target IPIs
/// not beside a pvsync host, whose hypercalls carry every IPI), sets up and enables the
/// calling CPU's steal-time area, and prints the report. Before any other CPU starts.
pub fn init(asked: KvmUse, nr_cpus: u32, me: u32, pv_host: bool) {
    let Some(offered) = kvm::detect() else {
        println!("kvm: no KVM signature in CPUID; KVM's paravirtual features unused");
        println!("RESULT kvm found=none offered=0x0 used=none");
        return;
    };
    let mut used = 0;
    let mut refused = String::new();
    for (name, bit) in KvmUse::NAMES {
        if !asked.has(bit) {
            continue;
        }
        if !offered.has(needs(bit)) {
            refused.push_str(&alloc::format!(" {name}(not offered)"));
        } else if pv_host && matches!(bit, KvmUse::KICK | KvmUse::SENDIPI) {
            refused.push_str(&alloc::format!(" {name}(pvsync host's IPIs)"));
        } else {
            used |= bit;
        }
    }
    if used & KvmUse::STEAL != 0 {
        set_up_areas(nr_cpus);
    }
    kvm::set_used(used);
    enable_this_cpu(me);
    let found: String = KvmFeatures::NAMED
        .iter()
        .filter(|(bit, _)| offered.has(*bit))
        .map(|(_, name)| alloc::format!(" {name}"))
        .collect();
    let used_names = names(used);
    println!(
        "kvm: KVMKVMKVM features={:#x}:{found}; used: {used_names}{}",
        offered.bits(),
        if refused.is_empty() {
            String::new()
        } else {
            alloc::format!("; left out:{refused}")
        }
    );
    println!(
        "RESULT kvm found=KVMKVMKVM offered={:#x} used={used_names}",
        offered.bits()
    );
}

/// The `kvm=` names of `bits`, comma-separated, or `none`.
fn names(bits: u32) -> String {
    let list: alloc::vec::Vec<&str> = KvmUse::NAMES
        .iter()
        .filter(|(_, b)| bits & b != 0)
        .map(|(n, _)| *n)
        .collect();
    if list.is_empty() {
        String::from("none")
    } else {
        list.join(",")
    }
}

fn set_up_areas(nr_cpus: u32) {
    let bytes = nr_cpus as usize * core::mem::size_of::<KvmStealTime>();
    let pages = bytes.div_ceil(PAGE_SIZE);
    let base = crate::mm::frame::alloc_contiguous_or_panic(pages as u64, "steal-time areas");
    // SAFETY: freshly allocated, identity-mapped frames that nothing else uses, for good,
    // zeroed before KVM learns of any area (each CPU tells it of its own later).
    unsafe {
        core::ptr::write_bytes(base as *mut u8, 0, pages * PAGE_SIZE);
        kvm::set_steal_areas(base as *mut KvmStealTime, nr_cpus);
    }
    STEAL_AT_START.call_once(|| (0..nr_cpus).map(|_| AtomicU64::new(0)).collect());
}

/// Enables the calling CPU `id`'s steal-time area, if steal time is used, and notes its
/// starting value (KVM fills the area before the vCPU runs again after the MSR write).
pub fn enable_this_cpu(id: u32) {
    if !kvm::uses(KvmUse::STEAL) || !kvm::enable_steal_time(id) {
        return;
    }
    if let (Some(start), Some(now)) = (STEAL_AT_START.get(), kvm::steal_ns(id)) {
        if let Some(s) = start.get(id as usize) {
            s.store(now, Ordering::Relaxed);
        }
    }
}

/// Whether the kernel uses every feature of `features` (`KvmUse` bits).
pub fn uses_all(features: u32) -> bool {
    kvm::uses(features)
}

/// Runs `f` with the features `off` (`KvmUse` bits) not used, then uses them again: for
/// tests of paths a feature would bypass (a shootdown's IPIs, without PV TLB flush).
pub fn without<T>(off: u32, f: impl FnOnce() -> T) -> T {
    let before = kvm::used();
    kvm::set_used(before & !off);
    let r = f();
    kvm::set_used(before);
    r
}

/// Whether the kernel uses steal time (KVM offers it and `kvm=` asks for it).
pub fn steal_time_enabled() -> bool {
    kvm::uses(KvmUse::STEAL)
}

/// Steal time CPU `cpu` accumulated since it enabled its area, ns.
pub fn steal_since_start(cpu: u32) -> Option<u64> {
    let start = STEAL_AT_START
        .get()?
        .get(cpu as usize)?
        .load(Ordering::Relaxed);
    kvm::steal_ns(cpu).map(|now| now.saturating_sub(start))
}

/// `test=kvm-hypercall`: one `KVM_HC_SCHED_YIELD` naming CPU `me` (a no-op for KVM: a
/// vCPU never yields to itself). Returns at all only where KVM's hypercalls work; prints
/// what KVM answered. False without KVM.
pub fn probe_hypercall(me: u32) -> bool {
    if kvm::detect().is_none() {
        println!("RESULT kvm-hypercall returned=no-kvm");
        return false;
    }
    println!("kvm-hypercall: vmcall/vmmcall KVM_HC_SCHED_YIELD({me}) ...");
    let ret = kvm::hypercall(
        shared_abi::kvm_para::KvmHypercall::SchedYield,
        me as u64,
        0,
        0,
        0,
    );
    println!("RESULT kvm-hypercall returned=yes ret={ret}");
    true
}

/// Prints `RESULT kvm-stats`: steal time since boot (sum and largest CPU), what the
/// preempted flag showed, and what each used feature did.
pub fn report(cpus: &[u32]) {
    let steal: alloc::vec::Vec<u64> = cpus.iter().filter_map(|&c| steal_since_start(c)).collect();
    let o = kvm::observations();
    let locks = pvsync_guest::locks::pv_stats();
    println!(
        "RESULT kvm-stats used={} steal_ns={} steal_max_ns={} steal_cpus={} preempted_samples={} preempted_seen={} flag_while_running={} flushes_deferred={} stock_yields={} preempted_halts={} kicks_hc={} send_ipi_hc={} send_ipi_fallbacks={}",
        names(kvm::used()),
        steal.iter().sum::<u64>(),
        steal.iter().max().copied().unwrap_or(0),
        steal.len(),
        o.samples,
        o.seen_preempted,
        o.flag_while_running,
        crate::tlb::deferred_total(),
        locks.stock_yields,
        locks.preempted_halts,
        o.kicks,
        o.send_ipi_calls,
        o.send_ipi_fallbacks,
    );
}
