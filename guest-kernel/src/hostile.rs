//! `test=hostile-hypercalls`: the guest makes every kind of bad shared-region registration
//! before the good one and checks that the host refuses each with the right status, then
//! that a second registration is refused. Prints `HOSTILE <case> ...` lines.

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
    // Without event rings: the region is one page (or two), like the pages below.
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
                    dest: IpiDest::Vcpu(((r >> 16) % nr as u64) as u8),
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
