//! The IDT (one table, shared by every CPU) pointing at the assembly stubs of traps.S, and
//! the Rust side of trap handling: dispatch to what the layers above registered.
//!
//! This module knows nothing of tasks, user mode or the console. The layers above register
//! (each a [`Hook`], installed once at boot, before interrupts are enabled):
//!
//! | registration | called | installed by | default (nothing installed) |
//! |---|---|---|---|
//! | [`register`] (per vector >= 32) | the interrupt | `irq`, `tlb` | [`set_unhandled_interrupt_hook`] |
//! | [`set_unhandled_interrupt_hook`] | a vector nobody registered | `panic` (reports it) | ignored (EOI sent) |
//! | [`set_user_mode_hooks`] | entry: an interrupt from user mode, before its handler; exit: after it, last thing before `iretq` | `user` (publishes the mode, RCU's extended quiescent state) | nothing |
//! | [`set_interrupt_return_hook`] | after every interrupt's handler and EOI, before the exit hook | `sched` (preempts when a reschedule is due) | no preemption |
//! | [`set_syscall_handler`] | `int3` from user mode (the system-call trap) | `user` | handled as a user exception |
//! | [`set_user_exception_handler`] | any other exception from user mode but NMI, #DB, #MC | `user` (kills the task) | fatal |
//! | [`set_fatal_exception_handler`] | every other exception | `panic` (reports, exits with code 2) | exit with code 2, silently |

use spin::Once;
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::VirtAddr;

use super::gdt::DOUBLE_FAULT_IST_INDEX;
use super::hook::Hook;

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

/// Handlers for vectors 32..=255.
static HANDLERS: [Hook<fn(&mut TrapFrame)>; 256] = [const { Hook::new() }; 256];
static UNHANDLED: Hook<fn(u8)> = Hook::new();
static USER_ENTRY: Hook<fn()> = Hook::new();
static USER_EXIT: Hook<fn()> = Hook::new();
static INTERRUPT_RETURN: Hook<fn()> = Hook::new();
static SYSCALL: Hook<fn(&mut TrapFrame)> = Hook::new();
static USER_EXCEPTION: Hook<fn(&mut TrapFrame)> = Hook::new();
static FATAL: Hook<fn(&TrapFrame) -> !> = Hook::new();

/// Installs `handler` for interrupt `vector` (>= 32). The handler runs with interrupts off;
/// EOI is sent after it returns.
pub fn register(vector: u8, handler: fn(&mut TrapFrame)) {
    assert!(vector >= 32, "vector {vector} is an exception");
    HANDLERS[vector as usize].set(handler);
}

/// What runs for an interrupt vector nobody registered (interrupts off; EOI follows).
pub fn set_unhandled_interrupt_hook(f: fn(u8)) {
    UNHANDLED.set(f);
}

/// What runs on every crossing between user mode and an interrupt: `entry` before the
/// interrupt's handler, `exit` right before returning to user mode (interrupts off in both).
pub fn set_user_mode_hooks(entry: fn(), exit: fn()) {
    USER_ENTRY.set(entry);
    USER_EXIT.set(exit);
}

/// What runs on the way out of every interrupt (after the handler and EOI, interrupts off),
/// whatever it interrupted: the scheduler switches tasks here.
pub fn set_interrupt_return_hook(f: fn()) {
    INTERRUPT_RETURN.set(f);
}

/// The system-call trap: `int3` from user mode (interrupts off on entry). The handler may
/// switch tasks; it returns to user mode with interrupts off.
pub fn set_syscall_handler(f: fn(&mut TrapFrame)) {
    SYSCALL.set(f);
}

/// Any other exception from user mode, except NMI, #DB and #MC (interrupts off on entry).
pub fn set_user_exception_handler(f: fn(&mut TrapFrame)) {
    USER_EXCEPTION.set(f);
}

/// An exception the kernel cannot survive (from kernel mode, or one nobody else handles):
/// report it and stop.
pub fn set_fatal_exception_handler(f: fn(&TrapFrame) -> !) {
    FATAL.set(f);
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

/// A readable name for exception `vector`.
pub fn exception_name(vector: u64) -> &'static str {
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
                if let Some(entry) = USER_ENTRY.get() {
                    entry();
                }
            }
            match HANDLERS[v as usize & 0xff].get() {
                Some(handler) => handler(frame),
                None => {
                    if let Some(report) = UNHANDLED.get() {
                        report(v as u8);
                    }
                }
            }
            super::apic::eoi();
            if let Some(ret) = INTERRUPT_RETURN.get() {
                ret();
            }
            if user {
                if let Some(exit) = USER_EXIT.get() {
                    exit();
                }
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
        if let Some(syscall) = SYSCALL.get() {
            syscall(frame);
            return;
        }
    }
    // NMI, debug and machine check are not the user task's doing.
    if from_user(frame) && !matches!(frame.vector, 1 | 2 | 18) {
        if let Some(user_exception) = USER_EXCEPTION.get() {
            user_exception(frame);
            return;
        }
    }
    match FATAL.get() {
        Some(fatal) => fatal(frame),
        None => super::exit(shared_abi::ExitCode::Panic),
    }
}
