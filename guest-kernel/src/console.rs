//! The serial console (COM1, 16550; the port itself is `arch::serial`'s) shared by all
//! CPUs: whole lines under a kernel lock, and an emergency path past the lock.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

use crate::arch::serial;
use crate::locks::{KernelLock, SpinLock};

/// How long a panicking CPU waits for the console lock before writing past it, in TSC
/// cycles (about 0.1 s; raw cycles, the TSC may not be calibrated yet).
const EMERGENCY_WAIT_CYCLES: u64 = 300_000_000;

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

/// Taken with interrupts off everywhere: interrupt handlers print.
static CONSOLE: KernelLock<Console> = SpinLock::kernel(Console { uart: None });
/// COM1 was found and initialised (the emergency path writes to it directly).
static PRESENT: AtomicBool = AtomicBool::new(false);

/// Probes and initialises COM1. Without a UART the console discards output.
pub fn init() {
    let Some(mut uart) = serial::take_com1() else {
        return;
    };
    if uart.init(Config::default()).is_ok() {
        CONSOLE.lock_irqsave().uart = Some(uart);
        PRESENT.store(true, Ordering::Release);
    }
}

/// Prints one line atomically with respect to other CPUs.
pub fn print_line(args: fmt::Arguments) {
    let mut c = CONSOLE.lock_irqsave();
    let _ = c.write_fmt(args);
    let _ = c.write_str("\n");
}

/// COM1 written directly, bypassing the lock and the driver's state.
struct RawSerial;

impl Write for RawSerial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                serial::raw_put(b'\r');
            }
            serial::raw_put(b);
        }
        Ok(())
    }
}

/// Prints from a context that may have interrupted a holder of the console lock (panic,
/// fatal exception), or that may come before this CPU's per-CPU data (which the lock
/// needs): takes the lock if it can within a bound, otherwise writes past it.
pub fn emergency_println(args: fmt::Arguments) {
    x86_64::instructions::interrupts::disable();
    if crate::percpu::ready() {
        let deadline = crate::arch::tsc::now() + EMERGENCY_WAIT_CYCLES;
        while crate::arch::tsc::now() < deadline {
            if let Some(mut c) = CONSOLE.try_lock() {
                let _ = c.write_fmt(args);
                let _ = c.write_str("\n");
                return;
            }
            core::hint::spin_loop();
        }
    }
    // The holder is stuck (it is us, interrupted, or a CPU that will never release it): we
    // are about to stop the VM, so a garbled line is the worst outcome.
    if PRESENT.load(Ordering::Acquire) {
        let _ = RawSerial.write_fmt(args);
        let _ = RawSerial.write_str("\n");
    }
}

/// `println!` for the kernel: one call, one whole line on the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}
