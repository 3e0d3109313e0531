//! COM1 (a 16550 UART): handed once to the console, plus a raw byte writer for the
//! emergency path (panics, fatal exceptions), which bypasses the driver and its lock.

use core::sync::atomic::{AtomicBool, Ordering};
use uart_16550::backend::PioBackend;
use uart_16550::Uart16550;
use x86_64::instructions::port::{Port, PortReadOnly};

const COM1: u16 = 0x3f8;
/// Line status register and its "transmit holding register empty" bit.
const COM1_LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// COM1's driver (not initialised yet), the first time; None afterwards, or if the driver
/// refuses the port.
pub fn take_com1() -> Option<Uart16550<PioBackend>> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: COM1's eight ports belong to the one driver handed out here for the kernel's
    // whole lifetime (only `raw_put` also writes them, on the emergency path).
    unsafe { Uart16550::new_port(COM1) }.ok()
}

/// Writes byte `b` to COM1's data register directly, after waiting (bounded: a stuck UART
/// drops the byte) for the transmitter to be empty. For a CPU that cannot take the console
/// lock; it may garble a line another CPU is writing.
pub fn raw_put(b: u8) {
    let mut lsr: PortReadOnly<u8> = PortReadOnly::new(COM1_LSR);
    let mut data: Port<u8> = Port::new(COM1);
    // SAFETY: polling COM1's line status and writing its data register only transmits a
    // byte; neither touches memory.
    unsafe {
        for _ in 0..100_000 {
            if lsr.read() & LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        data.write(b);
    }
}
