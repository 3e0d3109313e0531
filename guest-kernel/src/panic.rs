//! What the kernel reports when something goes wrong: panics and fatal exceptions (message
//! on the console's emergency path, then exit code 2), interrupts nobody handles, and what
//! the kernel cannot run as asked ([`fail`]: `FAILURE: <why>`, exit code 1).
//!
//! `arch::idt` reaches the last two through the hooks [`install`] sets.

use core::panic::PanicInfo;
use shared_abi::ExitCode;

use crate::arch::idt::{self, TrapFrame};
use crate::console::emergency_println;
use crate::percpu::CpuLabel;

/// Registers the fatal-exception reporter and the stray-interrupt reporter with `arch::idt`
/// (first thing at boot: before the IDT is loaded).
pub fn install() {
    idt::set_fatal_exception_handler(fatal_exception);
    idt::set_unhandled_interrupt_hook(unexpected_interrupt);
}

/// Prints `FAILURE: <why>` and exits with [`ExitCode::Failure`]: for what the kernel cannot
/// run as asked (bad boot data, a command line it does not understand, a VM too small for a
/// suite), reported as a reason rather than a panic.
pub fn fail(why: core::fmt::Arguments) -> ! {
    crate::println!("FAILURE: {why}");
    crate::arch::exit(ExitCode::Failure)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    emergency_println(format_args!("PANIC on cpu {}: {}", CpuLabel, info));
    crate::arch::exit(ExitCode::Panic)
}

/// An exception the kernel cannot survive: vector, error code, the saved frame and CR2.
fn fatal_exception(frame: &TrapFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    emergency_println(format_args!(
        "EXCEPTION {} (vector {}) on cpu {}: error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}",
        idt::exception_name(frame.vector),
        frame.vector,
        CpuLabel,
        frame.error_code,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        cr2,
    ));
    crate::arch::exit(ExitCode::Panic)
}

/// An interrupt on a vector no handler was registered for.
fn unexpected_interrupt(vector: u8) {
    crate::println!("unexpected interrupt vector {vector} on cpu {}", CpuLabel);
}
