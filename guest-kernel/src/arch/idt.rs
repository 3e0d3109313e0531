//! The IDT (one table, shared by every CPU) pointing at the assembly stubs of traps.S, and
//! the Rust side of trap handling.

use core::sync::atomic::{AtomicUsize, Ordering};
use spin::Once;
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::VirtAddr;

use super::gdt::DOUBLE_FAULT_IST_INDEX;

/// Bytes between consecutive stubs in traps.S (`.p2align 4`).
const STUB_STRIDE: u64 = 16;

extern "C" {
    static trap_stubs: u8;
}

/// Registers as traps.S saves them: general registers, then vector and error code, then
/// the frame the CPU pushed.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

static IDT: Once<InterruptDescriptorTable> = Once::new();

/// Handlers for vectors 32..=255 (function pointers as usize; 0 = none).
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Installs `handler` for interrupt `vector` (>= 32). The handler runs with interrupts off;
/// EOI is sent after it returns.
pub fn register(vector: u8, handler: fn(&mut TrapFrame)) {
    assert!(vector >= 32, "vector {vector} is an exception");
    HANDLERS[vector as usize].store(handler as usize, Ordering::Release);
}

fn stub(vector: u8) -> VirtAddr {
    // Only the symbol's address is taken; traps.S lays out 256 stubs from it.
    let base = core::ptr::addr_of!(trap_stubs) as u64;
    VirtAddr::new(base + vector as u64 * STUB_STRIDE)
}

fn build() -> InterruptDescriptorTable {
    let mut idt = InterruptDescriptorTable::new();
    // SAFETY: for every set_handler_addr below, the address is the traps.S stub for that
    // very vector, which saves all registers, calls trap_dispatch and returns with iretq.
    unsafe {
        macro_rules! exceptions {
            ($($field:ident = $vec:expr),* $(,)?) => {
                $( idt.$field.set_handler_addr(stub($vec)); )*
            };
        }
        exceptions!(
            divide_error = 0,
            debug = 1,
            non_maskable_interrupt = 2,
            breakpoint = 3,
            overflow = 4,
            bound_range_exceeded = 5,
            invalid_opcode = 6,
            device_not_available = 7,
            invalid_tss = 10,
            segment_not_present = 11,
            stack_segment_fault = 12,
            general_protection_fault = 13,
            page_fault = 14,
            x87_floating_point = 16,
            alignment_check = 17,
            machine_check = 18,
            simd_floating_point = 19,
            virtualization = 20,
            cp_protection_exception = 21,
            hv_injection_exception = 28,
            vmm_communication_exception = 29,
            security_exception = 30,
        );
        // User mode may execute int3 (the system-call trap, see user.rs).
        idt.breakpoint
            .set_handler_addr(stub(3))
            .set_privilege_level(x86_64::PrivilegeLevel::Ring3);
        idt.double_fault
            .set_handler_addr(stub(8))
            .set_stack_index(DOUBLE_FAULT_IST_INDEX);
        for (i, entry) in idt.slice_mut(32..).iter_mut().enumerate() {
            entry.set_handler_addr(stub(32 + i as u8));
        }
    }
    idt
}

/// Loads the shared IDT on the calling CPU (built on first use).
pub fn load() {
    IDT.call_once(build).load();
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating point",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating point",
        20 => "#VE virtualization",
        21 => "#CP control protection",
        _ => "reserved exception",
    }
}

/// Called by traps.S with interrupts off, on the interrupted stack (or the IST stack).
#[no_mangle]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    match frame.vector {
        0..=31 => exception(frame),
        v if v == super::apic::SPURIOUS_VECTOR as u64 => {}
        v => {
            let user = from_user(frame);
            if user {
                crate::user::kernel_entry();
            }
            let h = HANDLERS[v as usize & 0xff].load(Ordering::Acquire);
            if h == 0 {
                crate::println!(
                    "unexpected interrupt vector {v} on cpu {}",
                    crate::percpu::CpuLabel
                );
            } else {
                // SAFETY: only `register` stores into HANDLERS, always a fn(&mut TrapFrame).
                let f = unsafe { core::mem::transmute::<usize, fn(&mut TrapFrame)>(h) };
                f(frame);
            }
            super::apic::eoi();
            crate::sched::preempt_on_interrupt_return();
            if user {
                crate::user::kernel_exit();
            }
        }
    }
}

/// Whether the trap came from user mode (CPL 3 in the saved CS).
pub fn from_user(frame: &TrapFrame) -> bool {
    frame.cs & 3 == 3
}

fn exception(frame: &mut TrapFrame) {
    if from_user(frame) && frame.vector == 3 {
        crate::user::syscall_trap(frame);
        return;
    }
    // NMI, debug and machine check are not the user task's doing.
    if from_user(frame) && !matches!(frame.vector, 1 | 2 | 18) {
        crate::user::user_exception(frame);
        return;
    }
    fatal_exception(frame)
}

fn fatal_exception(frame: &TrapFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    crate::console::emergency_println(format_args!(
        "EXCEPTION {} (vector {}) on cpu {}: error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}",
        exception_name(frame.vector),
        frame.vector,
        crate::percpu::CpuLabel,
        frame.error_code,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        cr2,
    ));
    crate::exit::exit(shared_abi::ExitCode::Panic)
}
