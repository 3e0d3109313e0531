//! Leaving the VM through the exit port (QEMU isa-debug-exit compatible).

use shared_abi::{ExitCode, Hypercall};
use x86_64::instructions::port::Port;

/// Writes `code` to the exit port. Under a VMM without an exit device the CPU halts instead.
pub fn exit(code: ExitCode) -> ! {
    let mut port: Port<u32> = Port::new(Hypercall::Exit.port());
    // SAFETY: the exit port has no effect on guest memory; the host stops the VM.
    unsafe { port.write(code as u32) };
    crate::arch::halt_forever()
}

/// Prints `FAILURE: <why>` and exits with [`ExitCode::Failure`]: for what the kernel cannot
/// run as asked (bad boot data, a command line it does not understand, a VM too small for a
/// suite), reported as a reason rather than a panic.
pub fn fail(why: core::fmt::Arguments) -> ! {
    crate::println!("FAILURE: {why}");
    exit(ExitCode::Failure)
}
