//! The pvsync hypercalls a running guest makes (port I/O, one VM exit each: slow paths
//! only). Each is made only when a pvsync host accepted the region; otherwise the caller
//! falls back (keeps spinning, halts, writes the APIC) and no port is touched.
//! KVM's own `vmcall`/`vmmcall` hypercalls are not used: on the nested (PVM) hosts this runs
//! on, the instruction does not return.

use shared_abi::{Hypercall, IpiDest, IpiRequest};
use x86_64::instructions::port::Port;

use super::pv_host;

/// One 32-bit `out` to `call`'s port.
fn out(call: Hypercall, arg: u32) {
    let mut port: Port<u32> = Port::new(call.port());
    // SAFETY: pvsync hypercall ports only ask the host to schedule, idle or interrupt vCPUs
    // (SendIpi: the port write orders all earlier stores before it, so the target sees what
    // the IPI announces); none writes guest memory.
    unsafe { port.write(arg) };
}

/// Offers this vCPU's time to vCPU `target`, which the caller waits for (YieldTo); nothing
/// without a pvsync host (the caller keeps spinning).
pub fn yield_to(target: u32) {
    if pv_host() {
        out(Hypercall::YieldTo, target);
    }
}

/// Tells the host that the grace period whose `rcu_gp_seq` has low 32 bits `gp_seq_low`
/// now waits on the vCPUs in the header's `rcu_gp_holdouts`, so it can give the preempted
/// ones CPU at once (RcuWait, ABI v4); nothing without a pvsync host.
pub fn rcu_wait(gp_seq_low: u32) {
    if pv_host() {
        out(Hypercall::RcuWait, gp_seq_low);
    }
}

/// Idles through the host (the `Idle` hypercall) for at most `timeout_us`; false, without
/// waiting, when no pvsync host accepted the region (the caller halts instead). Call it with
/// interrupts enabled, right after checking for work: a wake-up IPI sent after that check
/// makes the hypercall return at once.
pub fn idle(timeout_us: u32) -> bool {
    if !pv_host() {
        return false;
    }
    out(Hypercall::Idle, timeout_us);
    true
}

/// Sends fixed interrupt `vector` to vCPU `dest` (or to all but the caller) through the host
/// (the `SendIpi` hypercall); false when no pvsync host accepted the region (the caller
/// writes the APIC's ICR instead).
pub fn send_ipi(dest: IpiDest, vector: u8) -> bool {
    if !pv_host() {
        return false;
    }
    out(Hypercall::SendIpi, IpiRequest { vector, dest }.encode());
    true
}
