//! COM1: vm-superio's 16550 emulation, output to the VMM's console writer. The guest polls,
//! so the interrupt line is not wired.

use std::io::Write;

use vm_superio::{Serial, Trigger};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;

/// An interrupt line connected to nothing.
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

pub struct SerialConsole {
    uart: Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        SerialConsole { uart: Serial::new(NoIrq, out) }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // Errors are from the output writer (a closed stdout); the guest must not notice.
        let _ = self.uart.write(offset, value);
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}
