//! Kernel panics: message and location on the console, then a non-zero exit.

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::console::emergency_println(format_args!(
        "PANIC on cpu {}: {}",
        crate::percpu::CpuLabel,
        info
    ));
    crate::exit::exit(shared_abi::ExitCode::Panic)
}
