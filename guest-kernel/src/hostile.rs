//! `test=hostile-hypercalls`: the guest makes every kind of bad shared-region registration
//! before the good one and checks that the host refuses each with the right status, then
//! that a second registration is refused. Prints `HOSTILE <case> ...` lines.

use shared_abi::{HypercallStatus as S, PageHeader, ABI_VERSION, PAGE_SIZE};

use crate::mm::frame;
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

fn page_with(header: PageHeader) -> u64 {
    let p = frame::alloc_contiguous_or_panic(1, "a hostile-test page");
    // SAFETY: a fresh, identity-mapped frame only this test uses.
    unsafe {
        core::ptr::write_bytes(p as *mut u8, 0, PAGE_SIZE);
        core::ptr::write_volatile(p as *mut PageHeader, header);
    }
    p
}

/// Bad registrations, made before the real one. True if the host refused each correctly.
pub fn before_registration(nr_vcpus: u32) -> bool {
    let good = PageHeader::new(nr_vcpus);
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
