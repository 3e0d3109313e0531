//! The guest's tests (`test=NAME` on its command line) with one line each: the one list the
//! guest's dispatcher accepts and the VMM's `pvsync run --help` prints.

/// `(name, what it does)`, in the order `--help` lists them.
pub const GUEST_TESTS: &[(&str, &str)] = &[
    (
        "boot",
        "bring up every CPU and the shared region (the default)",
    ),
    (
        "selftest",
        "allocators, paging, per-CPU data, shared records, timer, IPIs, preemption, RCU, user mode",
    ),
    (
        "hostile-hypercalls",
        "every kind of bad registration; checks the host refuses each",
    ),
    (
        "hostile-page",
        "scribble over the shared region and flood random hypercalls for duration=MS",
    ),
    (
        "hostile-hold",
        "odd CPUs spin with interrupts off, never exiting, for duration=MS while even CPUs name them in YieldTo",
    ),
    (
        "hostile-claims",
        "records that pass validation but lie (every vCPU a reader and a holder in a ring, a frozen grace period, full IPI-wait masks, one record mid-update) and YieldTo just before each turn ends, for duration=MS",
    ),
    (
        "hostile-steal-area",
        "every CPU's KVM steal-time area pointed past the end of RAM while it runs cpu-bound work=N (the host must refuse to mark it)",
    ),
    (
        "console-flood",
        "prints lines as fast as the serial port takes them for duration=MS",
    ),
    (
        "locktorture",
        "spinlock torture (lock=ticket|kernel|mcs; controls lock=broken|mcs-nokick must fail)",
    ),
    (
        "rcutorture",
        "RCU torture (controls rcu=broken|early must fail)",
    ),
    ("rcuflood", "every CPU floods call_rcu, then rcu_barrier"),
    (
        "calibrate",
        "the same loop in kernel and in user mode: what kernel mode costs on this host",
    ),
    ("rcu-model", "x86-TSO model of the RCU grace-period request"),
    (
        "tlbtorture",
        "TLB shootdown torture (controls tlb=skip|noack must fail)",
    ),
    (
        "kvm-hypercall",
        "one KVM_HC_SCHED_YIELD naming this vCPU: whether KVM's hypercalls return on this host (on some nested hosts `vmcall` never does)",
    ),
    (
        "pvwait",
        "waiters name the CPU in their way; ipi_wait shrinks as acknowledgements arrive",
    ),
    (
        "bench",
        "IPI, shootdown, lock and synchronize_rcu latencies in TSC cycles",
    ),
    (
        "ebizzy",
        "workload: threads allocate, search and free records under bucket spinlocks (work=N operations, seed=N)",
    ),
    (
        "postmark",
        "workload: transactions on an RCU-protected RAM file system (work=N transactions, seed=N; control model=skip-delete must fail)",
    ),
    (
        "cpu-bound",
        "workload: one user task per CPU spinning work=N rounds in user mode",
    ),
    (
        "pbzip2",
        "user-mode workers compress work=N blocks (LZSS, round-trip checked) while the kernel maps and unmaps their buffers; shootdown latency",
    ),
    ("panic", "failure probe: panics (exit code 2)"),
    ("fault", "failure probe: a page fault (exit code 2)"),
    (
        "hang",
        "failure probe: halts forever (the host's timeout stops it)",
    ),
];

/// The one-line description of test `name`, if the guest has such a test.
pub fn guest_test(name: &str) -> Option<&'static str> {
    GUEST_TESTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, what)| *what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, (n, what)) in GUEST_TESTS.iter().enumerate() {
            assert_eq!(guest_test(n), Some(*what));
            assert!(GUEST_TESTS[..i].iter().all(|(m, _)| m != n), "{n} twice");
        }
        assert_eq!(guest_test("nope"), None);
    }
}
