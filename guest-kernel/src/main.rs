//! pvsync guest kernel: boots by PVH, brings up every CPU, publishes per-vCPU state in the
//! region shared with the host, and runs what the command line asks for.
//!
//! The modules form layers (`guest-kernel/layers.toml`, docs/design.md, checked by
//! `tests/tests/layers.rs`): a module imports only its own layer and those below. Where a
//! lower layer calls a higher one, it calls a hook the higher one installs; `main`, at the
//! top, installs the hooks whose owner cannot (see `install_hooks`).
#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod bench;
mod bootinfo;
mod cmdline;
mod console;
mod hostile;
mod irq;
mod kvm;
mod locks;
mod mm;
mod panic;
mod pbzip2;
mod percpu;
mod platform;
mod preempt;
mod pvwait;
mod rcu;
mod rcu_model;
mod sched;
mod selftest;
mod shared;
mod smp;
mod tlb;
mod torture;
mod user;
mod workloads;

use arch::bootmem::BootMemory;
use pvsync_boot_parse::cmdline::KvmUse;
use pvsync_guest::NR_CPUS;
use shared_abi::{ExitCode, HypercallStatus, VcpuMode, ABI_VERSION};

/// Installs the hooks through which the lower layers reach the higher ones (fn-pointer
/// stores only; before the IDT is loaded and before any other CPU runs). The shared
/// region's IPI and idle paths come later, once a host has accepted the region.
fn install_hooks() {
    panic::install();
    user::install_trap_handlers();
    sched::install_hooks();
    // RCU runs on the scheduler, so sits above it: the scheduler and the reschedule IPI
    // report quiescent states through hooks.
    sched::set_quiescent_hooks(sched::QuiescentHooks {
        context_switch: rcu::note_context_switch,
        after_switch: rcu::after_switch,
        enter_idle: rcu::enter_idle,
        exit_idle: rcu::exit_idle,
        tick: rcu::tick,
    });
    irq::set_reschedule_hook(rcu::interrupt_qs);
    irq::install_handlers();
    mm::aspace::set_cr3_reload_hook(tlb::note_cr3_reload);
    smp::set_ap_check_hook(selftest::per_cpu_checks);
}

/// First Rust code on the bootstrap processor, called by boot.S in long mode.
#[no_mangle]
extern "C" fn kernel_main_bsp(start_info: u64) -> ! {
    let boot_tsc = arch::tsc::now();
    // Per-CPU data first: every lock (console, heap, frames) counts itself in it.
    percpu::init_this_cpu(arch::apic::initial_apic_id());
    console::init();
    install_hooks();
    let boot_memory = BootMemory::take().expect("the boot-memory token is taken once");
    let boot = bootinfo::parse(&boot_memory, start_info);
    println!(
        "pvsync-guest: abi={} mem={}MiB cmdline=\"{}\"",
        ABI_VERSION,
        boot.ram_bytes() >> 20,
        boot.cmdline()
    );
    let cmd = cmdline::parse(boot.cmdline());

    // ACPI is read while the boot tables still map all of the first 4 GiB.
    // `whole`: these are every CPU the machine has, so INIT and SIPI may be broadcast.
    let (cpus, whole) = acpi::cpus(&boot_memory, cmd.smp, boot.rsdp);
    let nr_vcpus = cpus.ids().iter().max().map_or(1, |&m| m + 1);
    assert!(
        nr_vcpus as usize <= NR_CPUS,
        "APIC ID {} is beyond this kernel's NR_CPUS ({NR_CPUS})",
        nr_vcpus - 1
    );
    // CPU ids stay below nr_vcpus: CPU sets touch only the words those need.
    pvsync_guest::set_nr_cpu_ids(nr_vcpus as usize);

    mm::init(boot, boot_memory, cpus.ids().len());
    tlb::init(
        nr_vcpus as usize,
        tlb::Faults {
            skip_one_target: cmd.tlb_skip,
            skip_ack_wait: cmd.tlb_noack,
            defer_without_flag: cmd.tlb_defer_noflag,
        },
    );
    rcu::init(nr_vcpus as usize, cmd.rcu_broken, cmd.rcu_early);
    percpu::set_tss(arch::gdt::init_this_cpu().tss_ptr);
    arch::idt::load();
    arch::apic::enable_x2apic();
    let me = arch::apic::id();
    assert_eq!(
        me,
        percpu::id(),
        "x2APIC ID disagrees with CPUID's initial APIC ID"
    );
    arch::pic::remap_and_mask();
    let (tsc_khz, tsc_source) = arch::tsc::calibrate();
    sched::init_this_cpu("main", false);
    let timer_mode = irq::start_tick();
    println!(
        "clock: tsc {tsc_khz} kHz from {tsc_source}; tick every {} us ({timer_mode:?})",
        irq::TICK_US
    );

    let hostile_ok = cmd.test != "hostile-hypercalls" || hostile::before_registration(nr_vcpus);
    let status = shared::init(nr_vcpus, !cmd.pvsync_off);
    if shared::pv_host() {
        // IPIs and idle go through the host's hypercalls (docs/scheduling.md); otherwise
        // the ICR and `sti; hlt`.
        arch::apic::set_ipi_sender(shared::send_ipi);
        arch::apic::set_idle_hook(shared::idle);
    }
    match status {
        HypercallStatus::Ok => {
            let (base, nr, _) = shared::info().expect("region just set up");
            println!("shared: registered at {base:#x} for {nr} vcpus");
        }
        HypercallStatus::NoHost => println!("shared: no pvsync host answered; running without it"),
        other => println!("shared: host refused the region ({})", other.name()),
    }
    if cmd.pvsync_off {
        println!("shared: pvsync=off: the region is not registered");
    }
    kvm::init(cmd.kvm, nr_vcpus, me, shared::pv_host());
    if cmd.tlb_defer_noflag && !kvm::uses_all(KvmUse::PVTLB | KvmUse::PVLOCK) {
        panic::fail(format_args!(
            "tlb=defer-noflag needs KVM's pvtlb and pvlock in use, and this host does not offer them"
        ));
    }
    shared::set_mode(VcpuMode::Kernel);
    selftest::per_cpu_checks(me);
    smp::mark_online(me);

    let missing = smp::start_aps(cpus.ids(), whole);
    assert!(missing.is_empty(), "CPUs {missing} did not come online");
    let online_cycles = arch::tsc::now() - boot_tsc;
    // Memory in use once every CPU is up: frames handed out, less the heap's free part (the
    // heap is one run of frames).
    let (_, frames_in_use) = mm::frame::stats();
    let (_, heap_free) = mm::heap::stats();
    let mem_used_kib = (frames_in_use * mm::frame::FRAME_SIZE).saturating_sub(heap_free) / 1024;
    println!(
        "RESULT boot cpus={} online={} shared={} online_cycles={online_cycles} mem_used_kib={mem_used_kib}",
        cpus.ids().len(),
        smp::online().len(),
        status.name(),
    );
    x86_64::instructions::interrupts::enable();
    rcu::start(cpus.ids());

    let threads = cmd.threads.unwrap_or(2 * cpus.ids().len());
    // shared_abi::GUEST_TESTS is the list the host's `--help` prints: a name not on it is
    // refused with the list, and the match below has one arm per name on it.
    let known = shared_abi::guest_test(cmd.test).is_some();
    let ok = match cmd.test {
        other if !known => {
            println!("unknown test '{other}' (known: {})", TestNames);
            false
        }
        "boot" => true,
        "selftest" => selftest::run_all(),
        "hostile-hypercalls" => hostile_ok & hostile::after_registration(),
        "hostile-page" => hostile::flood(cpus.ids(), cmd.duration_ms),
        "hostile-hold" => hostile::hold(cpus.ids(), cmd.duration_ms),
        "hostile-claims" => hostile::claims(cpus.ids(), cmd.duration_ms),
        "hostile-steal-area" => hostile::steal_area(cpus.ids(), cmd.work),
        "console-flood" => hostile::console_flood(cmd.duration_ms),
        "locktorture" => torture::lock::run(cmd.lock, threads, cmd.duration_ms),
        "rcutorture" => torture::rcu::run(threads, cmd.duration_ms),
        "rcuflood" => torture::rcu::flood(1000),
        "rcu-model" => selftest::rcu_model(),
        "pvwait" => pvwait::run(),
        "kvm-hypercall" => kvm::probe_hypercall(me),
        "bench" => bench::run(),
        "tlbtorture" => torture::tlb::run(threads.div_ceil(2), 2, cmd.duration_ms),
        "ebizzy" => workloads::ebizzy::run(cmd.threads, cmd.work, cmd.seed),
        "postmark" => {
            workloads::postmark::run(cmd.threads, cmd.work, cmd.seed, cmd.model_skip_delete)
        }
        "cpu-bound" => workloads::cpu_bound::run(cmd.threads, cmd.work),
        "calibrate" => workloads::calibrate::run(),
        "pbzip2" => pbzip2::run(
            cmd.threads.unwrap_or(cpus.ids().len()),
            cmd.work.unwrap_or(pbzip2::DEFAULT_WORK),
            pbzip2::BLOCK_BYTES,
            cmd.seed,
        ),
        "hang" => {
            println!("hanging on purpose (test=hang)");
            arch::halt_forever()
        }
        "panic" => panic!("deliberate panic requested by test=panic"),
        "fault" => {
            // Page 0 is unmapped: the write must fault and the exception be reported.
            arch::deliberate_fault();
            false
        }
        other => {
            println!("test '{other}' is in shared_abi::GUEST_TESTS but has no arm here");
            false
        }
    };
    kvm::report(cpus.ids());
    println!("{}", if ok { "SUCCESS" } else { "FAILURE" });
    arch::exit(if ok {
        ExitCode::Success
    } else {
        ExitCode::Failure
    })
}

/// The names of `shared_abi::GUEST_TESTS`, comma-separated.
struct TestNames;

impl core::fmt::Display for TestNames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, (name, _)) in shared_abi::GUEST_TESTS.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}
