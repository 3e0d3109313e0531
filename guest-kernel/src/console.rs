//! The serial console (COM1, 16550) shared by all CPUs.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};
use x86_64::instructions::interrupts::without_interrupts;

const COM1: u16 = 0x3f8;

struct Console {
    uart: Option<Uart16550<PioBackend>>,
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(uart) = self.uart.as_mut() {
            for b in s.bytes() {
                if b == b'\n' {
                    uart.send_bytes_exact(b"\r");
                }
                uart.send_bytes_exact(&[b]);
            }
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: None });

/// Probes and initialises COM1. Without a UART the console discards output.
pub fn init() {
    // SAFETY: COM1's eight ports belong to the console for the kernel's whole lifetime.
    let mut uart = match unsafe { Uart16550::new_port(COM1) } {
        Ok(u) => u,
        Err(_) => return,
    };
    if uart.init(Config::default()).is_ok() {
        CONSOLE.lock().uart = Some(uart);
    }
}

/// Prints one line atomically with respect to other CPUs.
pub fn print_line(args: fmt::Arguments) {
    without_interrupts(|| {
        let mut c = CONSOLE.lock();
        let _ = c.write_fmt(args);
        let _ = c.write_str("\n");
    });
}

/// Prints from a context that may have interrupted a holder of the console lock (panic,
/// fatal exception): takes the lock if it can, otherwise breaks it.
pub fn emergency_println(args: fmt::Arguments) {
    x86_64::instructions::interrupts::disable();
    let spins = 10_000_000u64;
    for _ in 0..spins {
        if let Some(mut c) = CONSOLE.try_lock() {
            let _ = c.write_fmt(args);
            let _ = c.write_str("\n");
            return;
        }
        core::hint::spin_loop();
    }
    // SAFETY: the holder is stuck (it is us, interrupted, or a CPU that will never release
    // it); we are about to stop the VM, so a garbled line is the worst outcome.
    unsafe { CONSOLE.force_unlock() };
    let mut c = CONSOLE.lock();
    let _ = c.write_fmt(args);
    let _ = c.write_str("\n");
}

/// `println!` for the kernel: one call, one whole line on the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}
