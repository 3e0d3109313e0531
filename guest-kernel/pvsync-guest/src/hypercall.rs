//! The pvsync hypercalls a running guest makes: one 32-bit port write each (one VM exit:
//! slow paths only), through [`Platform::hypercall_out`]. Each is made only when a pvsync
//! host accepted the region; otherwise the caller falls back (keeps spinning, halts, writes
//! the APIC) and no port is touched.

use shared_abi::{Hypercall, IpiDest, IpiRequest};

use crate::platform::Platform;
use crate::region::pv_host;

/// Offers this vCPU's time to vCPU `target`, which the caller waits for (YieldTo); nothing
/// without a pvsync host (the caller keeps spinning).
pub fn yield_to<P: Platform>(target: u32) {
    if pv_host() {
        P::hypercall_out(Hypercall::YieldTo.port(), target);
    }
}

/// Tells the host that the grace period whose `rcu_gp_seq` has low 32 bits `gp_seq_low`
/// now waits on the vCPUs in the region's holdout bitmap (RcuWait, ABI v6); nothing
/// without a pvsync host.
pub fn rcu_wait<P: Platform>(gp_seq_low: u32) {
    if pv_host() {
        P::hypercall_out(Hypercall::RcuWait.port(), gp_seq_low);
    }
}

/// Idles through the host (the `Idle` hypercall) for at most `timeout_us`; false, without
/// waiting, when no pvsync host accepted the region (the caller halts instead). Call it with
/// interrupts enabled, right after checking for work: a wake-up IPI sent after that check
/// makes the hypercall return at once.
pub fn idle<P: Platform>(timeout_us: u32) -> bool {
    if !pv_host() {
        return false;
    }
    P::hypercall_out(Hypercall::Idle.port(), timeout_us);
    true
}

/// Sends fixed interrupt `vector` to vCPU `dest` (or to all but the caller) through the host
/// (the `SendIpi` hypercall; the port write orders all earlier stores before it, so the
/// target sees what the IPI announces); false when no pvsync host accepted the region (the
/// caller writes the APIC's ICR instead).
pub fn send_ipi<P: Platform>(dest: IpiDest, vector: u8) -> bool {
    if !pv_host() {
        return false;
    }
    P::hypercall_out(
        Hypercall::SendIpi.port(),
        IpiRequest { vector, dest }.encode(),
    );
    true
}
