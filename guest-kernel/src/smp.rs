//! Bringing up application processors with INIT-SIPI-SIPI and the real-mode trampoline.
//! The same path runs under QEMU/KVM and under the pvsync VMM.
//!
//! One hook: [`set_ap_check_hook`], what each AP runs during bring-up once it publishes
//! `mode=kernel` (installed by `main` with `selftest::per_cpu_checks`; default: nothing).

use alloc::boxed::Box;
use alloc::sync::Arc;
use pvsync_guest::CpuSet;
use shared_abi::VcpuMode;
use spin::Once;

use crate::arch::apic::Dest;
use crate::arch::gdt::CpuTables;
use crate::arch::hook::Hook;
use crate::arch::{self, ap, apic, tsc, AP_TRAMPOLINE_ADDR};
use crate::mm::{frame, paging};
use crate::percpu;
use crate::sched::Task;

const AP_STACK_FRAMES: u64 = 8; // 32 KiB
/// The 10 ms INIT-to-SIPI delay real hardware needs, in TSC cycles at up to 5 GHz (the TSC is
/// not calibrated yet). Skipped under a hypervisor, which needs none (Linux skips it too).
const INIT_DELAY_CYCLES: u64 = 50_000_000;
/// Give a CPU this long after the first SIPI before sending the second.
const FIRST_SIPI_WAIT_CYCLES: u64 = 200_000_000;
/// And this long without any CPU coming online before declaring the rest dead (generous:
/// nested virtualization is slow).
const ONLINE_TIMEOUT_CYCLES: u64 = 60_000_000_000;
/// Up to this many CPUs the boot CPU prints a `cpu N online` line for each AP (as before,
/// and what tests look for); beyond, only the summary line, which it prints always.
const PER_CPU_LINES_UP_TO: usize = 64;

/// Run by each AP during bring-up (see the module docs).
static AP_CHECK: Hook<fn(u32)> = Hook::new();

/// What an AP's bring-up would otherwise allocate: its GDT and TSS and its idle task.
struct ApBoot {
    tables: CpuTables,
    idle: Arc<Task>,
}

/// Each AP's `ApBoot`, by APIC ID, made by the boot CPU before it starts any. APs that
/// allocated these themselves all queued on the heap lock, each waiter yielding to the
/// holder: 255 APs came up in 8.9 s here (2 host CPUs), 1.2 s this way.
static AP_BOOT: Once<Box<[Option<ApBoot>]>> = Once::new();

/// Installs what each AP runs during bring-up with its APIC ID, after it has published
/// `mode=kernel` and before it starts its scheduler (before `start_aps`).
pub fn set_ap_check_hook(f: fn(u32)) {
    AP_CHECK.set(f);
}

/// Every CPU (BSP included) that has finished bring-up.
pub fn online() -> CpuSet {
    percpu::online()
}

pub fn mark_online(id: u32) {
    percpu::mark_online(id);
}

/// Starts every CPU in `ids` other than the caller and waits until all are online. `whole`:
/// `ids` are every CPU the machine has (the MADT's, none disabled), so INIT and SIPI go out
/// as one "all excluding self" IPI each instead of one per CPU. Returns the CPUs that
/// never came up (none: all did).
///
/// Parallel: every AP's stack, tables and idle task are made first, then every AP is
/// started, then the wait; an AP allocates nothing and prints nothing (this CPU prints the
/// summary), so bring-up time grows about linearly with the CPUs, not with their square.
pub fn start_aps(ids: &[u32], whole: bool) -> CpuSet {
    let me = apic::id();
    let want: CpuSet = ids.iter().copied().collect();
    let start = tsc::now();

    ap::install_trampoline();
    ap::set_boot_cr3(u32::try_from(paging::kernel_pml4()).expect("PML4 above 4 GiB"));
    ap::set_entry(ap_main);

    let ids_end = ids.iter().max().map_or(0, |&m| m as usize + 1);
    AP_BOOT.call_once(|| {
        (0..ids_end as u32)
            .map(|id| {
                (id != me && want.contains(id)).then(|| ApBoot {
                    tables: CpuTables::build(),
                    idle: Task::adopt_current("idle", id, true),
                })
            })
            .collect()
    });
    for &id in ids.iter().filter(|&&id| id != me) {
        let stack = frame::alloc_contiguous_or_panic(AP_STACK_FRAMES, "an AP stack");
        ap::set_stack_top(id, stack + AP_STACK_FRAMES * frame::FRAME_SIZE);
    }
    let page = (AP_TRAMPOLINE_ADDR >> 12) as u8;
    let aps = || ids.iter().copied().filter(move |&id| id != me);
    if whole {
        apic::send_init(Dest::AllButSelf);
    } else {
        aps().for_each(|id| apic::send_init(Dest::Cpu(id)));
    }
    if !arch::under_hypervisor() {
        tsc::spin_cycles(INIT_DELAY_CYCLES);
    }
    if whole {
        apic::send_startup(Dest::AllButSelf, page);
    } else {
        aps().for_each(|id| apic::send_startup(Dest::Cpu(id), page));
    }

    let sipi_at = tsc::now();
    let mut second_sipi_sent = false;
    let missing = || want.difference(&online());
    // The timeout counts from the last CPU to come online: a large VM on a slow host keeps
    // making progress long after a fixed deadline would have given up on it.
    let (mut last_count, mut progress_at) = (0, sipi_at);
    while !missing().is_empty() {
        let now = tsc::now();
        let count = online().len();
        if count != last_count {
            (last_count, progress_at) = (count, now);
        }
        let waited = now - sipi_at;
        if !second_sipi_sent && waited > FIRST_SIPI_WAIT_CYCLES {
            // A CPU still in wait-for-SIPI missed the first one; running CPUs ignore this.
            missing()
                .iter()
                .for_each(|id| apic::send_startup(Dest::Cpu(id), page));
            second_sipi_sent = true;
        }
        if now - progress_at > ONLINE_TIMEOUT_CYCLES {
            return missing();
        }
        core::hint::spin_loop();
    }
    let aps_online = want.difference(&[me].into_iter().collect());
    if want.len() <= PER_CPU_LINES_UP_TO {
        aps_online
            .iter()
            .for_each(|id| crate::println!("cpu {id} online"));
    }
    crate::println!(
        "smp: {} APs online in {} ms: {aps_online}",
        aps_online.len(),
        tsc::cycles_to_ns(tsc::now() - start) / 1_000_000
    );
    CpuSet::new()
}

/// An AP's bring-up, entered from `arch::ap` on the stack from `ap_stack_tops`.
fn ap_main(cpuid_apic_id: u32) -> ! {
    // Per-CPU data first (every lock uses it), publishing into the region at once.
    crate::percpu::init_this_cpu(cpuid_apic_id);
    crate::shared::attach_this_cpu();
    crate::kvm::enable_this_cpu(cpuid_apic_id);
    let boot = AP_BOOT
        .get()
        .and_then(|b| b.get(cpuid_apic_id as usize)?.as_ref())
        .expect("an AP started without its tables");
    crate::percpu::set_tss(boot.tables.load().tss_ptr);
    arch::idt::load();
    apic::enable_x2apic();
    let id = apic::id();
    assert_eq!(
        id, cpuid_apic_id,
        "x2APIC ID disagrees with CPUID's initial APIC ID"
    );
    crate::shared::set_mode(VcpuMode::Kernel);
    if let Some(check) = AP_CHECK.get() {
        check(id);
    }
    crate::sched::init_this_cpu_idle(boot.idle.clone());
    crate::irq::start_tick();
    // Publish before counting as online: once every CPU is online the BSP may check the
    // records or end the VM.
    crate::shared::set_mode(VcpuMode::Idle);
    mark_online(id);
    crate::sched::idle_loop()
}
