//! `test=hostile-hypercalls`: the guest makes every kind of bad shared-region registration
//! before the good one and checks that the host refuses each with the right status, then
//! that a second registration is refused. Prints `HOSTILE <case> ...` lines.

use shared_abi::kvm_para::KVM_MSR_ENABLED;
use shared_abi::{HypercallStatus as S, PageHeader, ABI_VERSION, PAGE_SIZE};

use crate::mm::frame::StaticFrame;
use crate::{println, shared};

/// The page that straddles the end of low RAM (0x9fc00 under pvsync).
const LOW_RAM_LAST_PAGE: u64 = 0x9_f000;

/// A page inside the kernel image, which the host must refuse to share.
#[repr(C, align(4096))]
struct KernelPage([u8; PAGE_SIZE]);
static mut KERNEL_PAGE: KernelPage = KernelPage([0; PAGE_SIZE]);

fn check(case: &str, got: S, want: S) -> bool {
    let ok = got == want;
    println!(
        "HOSTILE {case} status={} expected={} {}",
        got.name(),
        want.name(),
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

/// A page of its own (never freed), zeroed, with `header` at the start.
fn page_with(header: PageHeader) -> u64 {
    let p = StaticFrame::alloc_or_panic("a hostile-test page");
    p.zero();
    p.write(0, header);
    p.addr()
}

/// Bad registrations, made before the real one. True if the host refused each correctly.
pub fn before_registration(nr_vcpus: u32) -> bool {
    // Without event rings. Each page below holds only a header, which the host refuses
    // before it reads further (or for where the region would lie).
    let good = PageHeader::new(nr_vcpus, 0);
    let mut ok = true;
    let zero = page_with(PageHeader::default());
    ok &= check("misaligned", shared::register(zero + 8), S::BadAddress);
    ok &= check("outside-ram", shared::register(0xbfff_f000), S::BadAddress);
    ok &= check("bad-magic", shared::register(zero), S::BadMagic);
    ok &= check(
        "version",
        shared::register(page_with(PageHeader {
            abi_version: ABI_VERSION + 1,
            ..good
        })),
        S::VersionMismatch,
    );
    ok &= check(
        "vcpu-count",
        shared::register(page_with(PageHeader {
            nr_vcpus: nr_vcpus + 1,
            ..good
        })),
        S::BadVcpuCount,
    );
    ok &= check(
        "geometry",
        shared::register(page_with(PageHeader {
            region_size: 1 << 30,
            ..good
        })),
        S::BadGeometry,
    );
    ok &= check(
        "ring-entries",
        shared::register(page_with(PageHeader {
            event_ring_entries: 100,
            ..good
        })),
        S::BadGeometry,
    );
    let kernel_page = core::ptr::addr_of_mut!(KERNEL_PAGE) as u64;
    // SAFETY: a static page of our own; nothing else reads or writes it.
    unsafe { core::ptr::write_volatile(kernel_page as *mut PageHeader, good) };
    ok &= check(
        "overlaps-kernel",
        shared::register(kernel_page),
        S::OverlapsKernel,
    );
    // Header in RAM, but the region runs into the legacy hole at 0x9fc00 (not RAM).
    let low = LOW_RAM_LAST_PAGE as *mut PageHeader;
    // SAFETY: the last page below the legacy hole is RAM the kernel never uses (the frame
    // allocator starts at 1 MiB; boot data lives lower).
    unsafe { core::ptr::write_volatile(low, good) };
    ok &= check(
        "crosses-ram-end",
        shared::register(LOW_RAM_LAST_PAGE),
        S::BadAddress,
    );
    ok &= check(
        "byte-write",
        shared::register_with_byte_write(0),
        S::BadWidth,
    );
    let byte = shared::status_byte();
    let byte_ok = byte == S::BadWidth as u8;
    println!(
        "HOSTILE byte-read value={byte} expected={} {}",
        S::BadWidth as u8,
        if byte_ok { "ok" } else { "FAIL" }
    );
    ok & byte_ok
}

/// After the real registration: a second one must be refused.
pub fn after_registration() -> bool {
    let (base, _, status) = shared::info().expect("region registered");
    check("registered", status, S::Ok)
        & check(
            "second-registration",
            shared::register(base),
            S::AlreadyRegistered,
        )
}

/// xorshift64: cheap noise for the flood.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// One CPU's share of `test=hostile-page`: until `end` (TSC), overwrite random words of the
/// shared region with noise and make random hypercalls (never Exit). Returns the hypercalls
/// made.
fn flood_one(seed: u64, end: u64) -> u64 {
    use shared_abi::{Hypercall, IpiDest, IpiRequest};
    use x86_64::instructions::port::Port;
    let Some((base, nr, _)) = shared::info() else {
        return 0;
    };
    let words = pvsync_guest::region::size(nr) / 8;
    let mut x = seed | 1;
    let mut calls = 0;
    while crate::arch::tsc::now() < end {
        for _ in 0..16 {
            let at = base + (next(&mut x) % words as u64) * 8;
            // SAFETY: inside the region this kernel allocated for the host; nothing in this
            // guest trusts what it reads back from it while the flood runs.
            unsafe { core::ptr::write_volatile(at as *mut u64, next(&mut x)) };
        }
        let r = next(&mut x);
        let (port, arg) = match r % 5 {
            0 => (Hypercall::YieldTo, (r >> 8) as u32),
            // A short idle: the flood itself must keep running.
            1 => (Hypercall::Idle, (r >> 8) as u32 % 200),
            // Half valid pings to a random vCPU, half malformed requests.
            2 if r & (1 << 8) != 0 => (
                Hypercall::SendIpi,
                IpiRequest {
                    vector: crate::arch::vectors::PING,
                    dest: IpiDest::Vcpu(((r >> 16) % nr as u64) as u16),
                }
                .encode(),
            ),
            2 => (Hypercall::SendIpi, (r >> 9) as u32 & 0xffff_ff1f),
            3 => (Hypercall::RegisterSharedRegion, (r >> 8) as u32),
            _ => (Hypercall::YieldTo, (r % (nr as u64 + 2)) as u32),
        };
        let mut p: Port<u32> = Port::new(port.port());
        // SAFETY: hypercalls only ask the host for things; a refused one has no effect.
        unsafe {
            p.write(arg);
            let _ = p.read();
        }
        calls += 1;
    }
    calls
}

/// `test=hostile-page`: every CPU scribbles over the shared region and floods the host with
/// random hypercalls for `duration_ms`. The host must survive it, count it, and keep other
/// VMs' share; the guest passes if it gets to the end.
pub fn flood(cpus: &[u32], duration_ms: u64) -> bool {
    let end = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(duration_ms * 1000);
    let tasks: alloc::vec::Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            let seed = crate::arch::tsc::now() ^ ((cpu as u64 + 1) << 32);
            crate::sched::spawn_returning(cpu, "hostile-flood", move || flood_one(seed, end))
        })
        .collect();
    let calls: u64 = tasks.iter().map(crate::sched::join).sum();
    println!("RESULT hostile-page hypercalls={calls}");
    calls > 0
}

/// `test=hostile-hold`: odd CPUs spin with interrupts off for `duration_ms` and never leave
/// the guest (no exit reaches the VMM), while even CPUs name them in YieldTo hypercalls as
/// fast as they can. A host that boosts the holders for being named must take each boost
/// back on its own: the holders never give it a chance. Passes if both sides ran.
pub fn hold(cpus: &[u32], duration_ms: u64) -> bool {
    let end = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(duration_ms * 1000);
    let holders: alloc::vec::Vec<u32> = cpus.iter().copied().filter(|c| c % 2 == 1).collect();
    let tasks: alloc::vec::Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            let holders = holders.clone();
            crate::sched::spawn_returning(cpu, "hostile-hold", move || {
                if cpu % 2 == 1 {
                    x86_64::instructions::interrupts::without_interrupts(|| {
                        while crate::arch::tsc::now() < end {
                            core::hint::spin_loop();
                        }
                    });
                    return 0;
                }
                let mut calls = 0;
                while crate::arch::tsc::now() < end {
                    for &h in &holders {
                        crate::shared::yield_to(h);
                        calls += 1;
                    }
                }
                calls
            })
        })
        .collect();
    let calls: u64 = tasks.iter().map(crate::sched::join).sum();
    println!(
        "RESULT hostile-hold yields={calls} holders={}",
        holders.len()
    );
    calls > 0 && !holders.is_empty()
}

/// `test=console-flood`: prints lines as fast as the serial port takes them for
/// `duration_ms`. The host must neither block on its own output nor let this VM's printing
/// hold up another VM.
pub fn console_flood(duration_ms: u64) -> bool {
    let end = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(duration_ms * 1000);
    let mut lines = 0u64;
    while crate::arch::tsc::now() < end {
        println!("console-flood {lines:>12} the quick brown fox jumps over the lazy dog");
        lines += 1;
    }
    println!("RESULT console-flood lines={lines}");
    lines > 0
}

/// The grace-period sequence `hostile-claims` publishes: odd (one in progress) and far
/// ahead of any the kernel reaches, so the kernel's own updates (an atomic max) never move
/// it: a grace period frozen for the whole run.
const FROZEN_GP_SEQ: u64 = (1 << 40) | 1;

/// A callback backlog no guest could have.
const HUGE_BACKLOG: u64 = 1 << 40;

/// Stores the low `width` bytes (1, 4 or 8) of `value` at guest-physical `at`, inside this
/// kernel's shared region, atomically (other CPUs may clear bitmap bits concurrently).
fn lie(at: u64, width: usize, value: u64) {
    use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
    // SAFETY: every caller passes an address inside the region this kernel allocated for
    // the host (identity-mapped, live for good), aligned for `width` (record and header
    // fields and bitmap words at their ABI offsets). The store is atomic, and every other
    // writer of these fields stores them atomically too (the bitmaps, the RCU header,
    // `seq`, `ipi_wait_count`) or is this CPU itself (its own record), so there is no data
    // race; nothing in this guest trusts these fields while `hostile-claims` runs.
    unsafe {
        match width {
            1 => AtomicU8::from_ptr(at as *mut u8).store(value as u8, Relaxed),
            4 => AtomicU32::from_ptr(at as *mut u32).store(value as u32, Relaxed),
            _ => AtomicU64::from_ptr(at as *mut u64).store(value, Relaxed),
        }
    }
}

/// Stores `words` into the vCPU bitmap at region offset `offset` of a region at `base` for
/// `nr` vCPUs, word by word.
fn lie_bitmap(base: u64, nr: u32, offset: usize, words: &[u64]) {
    let at = base + offset as u64;
    (0..shared_abi::bitmap_words(nr as usize))
        .zip(words)
        .for_each(|(i, &w)| lie(at + 8 * i as u64, 8, w));
}

/// CPU `cpu`'s record (of `nr`) at `base`, rewritten to claim everything while staying
/// valid: in the kernel, an RCU reader holding a lock, spinning on a lock its neighbour
/// holds (so the holders point at each other in a ring), and waiting for an IPI
/// acknowledgement from every vCPU (its `ipi_wait` bitmap naming each vCPU of the VM and
/// no other, then `ipi_wait_count`: bits past the VM would fail validation). The frame
/// moves the `seq` in memory (the kernel's own updates on this CPU move it too); with
/// `torn` it is left open: the record stays mid-update for good (until the kernel
/// publishes on this CPU and closes it, after which the next rewrite opens it again).
fn claim_everything(base: u64, nr: u32, cpu: u32, torn: bool) {
    use core::mem::offset_of;
    use shared_abi::{record_offset, VcpuMode, VcpuRecord};
    let rec = base + record_offset(cpu as usize) as u64;
    let field = |off: usize| rec + off as u64;
    let seq_at = field(offset_of!(VcpuRecord, seq));
    let seq = seq_now(seq_at);
    let open = if seq % 2 == 1 {
        seq
    } else {
        seq.wrapping_add(1)
    };
    lie(seq_at, 4, open as u64);
    lie(
        field(offset_of!(VcpuRecord, mode)),
        1,
        VcpuMode::Kernel as u64,
    );
    lie(field(offset_of!(VcpuRecord, rcu_nesting)), 4, 1);
    lie(field(offset_of!(VcpuRecord, preempt_count)), 4, 1);
    lie(field(offset_of!(VcpuRecord, locks_held)), 4, 1);
    lie(
        field(offset_of!(VcpuRecord, spin_holder)),
        4,
        ((cpu + 1) % nr) as u64,
    );
    lie(
        field(offset_of!(VcpuRecord, spin_lock)),
        8,
        base + 8 * (cpu as u64 + 1),
    );
    let every_vcpu = pvsync_guest::CpuSet::first(nr as usize);
    let ipi_wait = shared_abi::ipi_wait_offset(nr as usize, cpu as usize);
    lie_bitmap(base, nr, ipi_wait, every_vcpu.words());
    lie(field(offset_of!(VcpuRecord, ipi_wait_count)), 4, nr as u64);
    if !torn {
        lie(seq_at, 4, open.wrapping_add(1) as u64);
    }
}

/// The `seq` word at `at` (this CPU's own record) as memory holds it now.
fn seq_now(at: u64) -> u32 {
    // SAFETY: `at` is this CPU's record's `seq`, 4-byte aligned inside the live region;
    // every writer of it (this CPU, and the host never) stores it whole; an atomic load.
    unsafe {
        core::sync::atomic::AtomicU32::from_ptr(at as *mut u32)
            .load(core::sync::atomic::Ordering::Relaxed)
    }
}

/// The header's grace-period fields, frozen with a huge backlog and every vCPU a holdout:
/// every bit of the holdout bitmap set, those past the VM's vCPUs in its last word too
/// (which name nobody: a host must not act on them).
fn freeze_grace_period(base: u64, nr: u32) {
    use core::mem::offset_of;
    use shared_abi::PageHeader;
    let at = |off: usize| base + off as u64;
    lie(at(offset_of!(PageHeader, rcu_gp_seq)), 8, FROZEN_GP_SEQ);
    lie(
        at(offset_of!(PageHeader, rcu_callbacks_pending)),
        8,
        HUGE_BACKLOG,
    );
    let all_bits = [u64::MAX; pvsync_guest::cpuset::CPU_SET_WORDS];
    lie_bitmap(
        base,
        nr,
        shared_abi::holdouts_offset(nr as usize),
        &all_bits,
    );
}

/// What one CPU of `hostile-claims` did.
#[derive(Default)]
struct Claimed {
    yields: u64,
    rcu_waits: u64,
    turns: u64,
}

/// One CPU's share of `hostile-claims` until `end` (TSC). It spins, keeps its record
/// claiming everything, and sends `YieldTo` (naming its neighbour, the "holder") just before
/// each of its turns on a host CPU would end, learning turn lengths from the last ones. CPU
/// 0 keeps the grace period frozen and names every vCPU in `RcuWait` once a millisecond. The
/// last CPU leaves its record mid-update.
///
/// A turn ended where the TSC jumped by more than `gap` across a round in which the vCPU
/// re-entered KVM (its steal-time `version` moved, which KVM does at each entry after the
/// thread was away) other than after its own hypercalls: a jump alone also comes from a
/// round of its own kernel code, which these hosts emulate slowly enough to pass `gap`.
/// Without steal time, the jump alone (as then nothing better tells).
fn claim_one(cpu: u32, end: u64) -> Claimed {
    let Some((base, nr, _)) = shared::info() else {
        return Claimed::default();
    };
    let tsc = crate::arch::tsc::us_to_cycles;
    let now = crate::arch::tsc::now;
    let entries = || crate::arch::kvm::steal_version(cpu);
    let (gap, margin, refresh, rcu_period) = (tsc(200), tsc(150), tsc(50), tsc(1000));
    let torn = nr > 1 && cpu == nr - 1;
    let mut done = Claimed::default();
    let mut last = now();
    let mut turn = Turn {
        start: last,
        len: tsc(3000),
        yielded: false,
        gap,
    };
    // The `version` after this CPU's own exits: a move past it is someone else's doing.
    let mut own = entries();
    let (mut refreshed, mut waited) = (0, 0);
    while last < end {
        let t = now();
        let seen = entries();
        if t - last > gap && (own.is_none() || seen != own) {
            turn.ended(t, last);
            done.turns += 1;
        }
        own = seen;
        last = t;
        if t - refreshed > refresh {
            refreshed = t;
            claim_everything(base, nr, cpu, torn);
            if cpu == 0 {
                freeze_grace_period(base, nr);
            }
        }
        if !turn.yielded && t - turn.start + margin >= turn.len {
            turn.yielded = true;
            shared::yield_to((cpu + 1) % nr);
            done.yields += 1;
            // The hypercall's own exit moved `version`; a yield that took long gave the
            // turn away (the next one starts now).
            own = entries();
            let after = now();
            if after - t > gap {
                turn.ended(after, t);
                done.turns += 1;
            }
            last = after;
        }
        if cpu == 0 && t - waited > rcu_period {
            waited = t;
            pvsync_guest::hypercall::rcu_wait::<crate::platform::Kernel>(FROZEN_GP_SEQ as u32);
            done.rcu_waits += 1;
            own = entries();
        }
        core::hint::spin_loop();
    }
    done
}

/// One CPU's current turn on a host CPU, as `claim_one` tells it (TSC cycles).
struct Turn {
    start: u64,
    /// Turn length learned so far.
    len: u64,
    /// This CPU sent its YieldTo in this turn.
    yielded: bool,
    gap: u64,
}

impl Turn {
    /// The turn ended after `last` (the last moment this CPU saw itself running); the next
    /// starts at `at`. Only a turn the host ended (not one this CPU gave up with its
    /// YieldTo) teaches how long turns are.
    fn ended(&mut self, at: u64, last: u64) {
        let len = last.saturating_sub(self.start);
        if len > self.gap && !self.yielded {
            self.len = (3 * self.len + len) / 4;
        }
        self.start = at;
        self.yielded = false;
    }
}

/// `test=hostile-claims`: for `duration_ms`, every CPU publishes records that pass the
/// host's validation but lie (see `claim_everything`, `freeze_grace_period`) and asks for
/// boosts at the worst moments. A VM beside it must keep its fair share but for the
/// ledger's limit; this guest passes if it ran and asked.
pub fn claims(cpus: &[u32], duration_ms: u64) -> bool {
    let end = crate::arch::tsc::now() + crate::arch::tsc::us_to_cycles(duration_ms * 1000);
    let tasks: alloc::vec::Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            crate::sched::spawn_returning(cpu, "hostile-claims", move || {
                let c = claim_one(cpu, end);
                // Three counts in one word for `join` (each far below 2^21 in any run).
                c.yields.min(0x1f_ffff)
                    | c.rcu_waits.min(0x1f_ffff) << 21
                    | c.turns.min(0x1f_ffff) << 42
            })
        })
        .collect();
    let (mut yields, mut rcu_waits, mut turns) = (0, 0, 0);
    for t in &tasks {
        let w = crate::sched::join(t);
        yields += w & 0x1f_ffff;
        rcu_waits += (w >> 21) & 0x1f_ffff;
        turns += w >> 42;
    }
    println!("RESULT hostile-claims yields={yields} rcu_waits={rcu_waits} turns={turns}");
    yields > 0 && rcu_waits > 0
}

/// Guest-physical address past any RAM a test VM has (1 TiB): a steal-time area there.
const AREA_OUTSIDE_RAM: u64 = 1 << 40;

/// `test=hostile-steal-area`: every CPU points its steal-time area past the end of RAM
/// (`MSR_KVM_STEAL_TIME`, which KVM accepts) and keeps busy in user mode (`cpu-bound`
/// with `work`), so that a host that marks descheduled vCPUs preempted in their areas meets
/// an address it must refuse; then each CPU's real area is restored. Where KVM offers no
/// steal time there is nothing to test: false.
pub fn steal_area(cpus: &[u32], work: Option<u64>) -> bool {
    if !crate::kvm::steal_time_enabled() {
        println!("hostile-steal-area: no steal time in use here");
        return false;
    }
    on_each_cpu(cpus, |_| {
        crate::arch::kvm::set_steal_time_msr(AREA_OUTSIDE_RAM | KVM_MSR_ENABLED)
    });
    println!("hostile-steal-area: every steal-time area at {AREA_OUTSIDE_RAM:#x}");
    let ok = crate::workloads::cpu_bound::run(None, work);
    on_each_cpu(cpus, crate::kvm::enable_this_cpu);
    println!("RESULT hostile-steal-area area={AREA_OUTSIDE_RAM:#x} workload_ok={ok}");
    ok
}

/// Runs `f(cpu)` on each CPU of `cpus` (a task on each, joined).
fn on_each_cpu(cpus: &[u32], f: fn(u32)) {
    let tasks: alloc::vec::Vec<_> = cpus
        .iter()
        .map(|&cpu| crate::sched::spawn(cpu, "hostile-steal", move || f(cpu)))
        .collect();
    tasks.iter().for_each(|t| {
        crate::sched::join(t);
    });
}
