//! Port-I/O devices: the serial console, and a count of accesses nobody claims.

pub mod capture;
pub mod console_writer;
pub mod prefixed;
pub mod serial;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serial::{SerialConsole, COM1_BASE, COM1_LEN};

/// Devices on the port-I/O bus (the in-kernel irqchip and PIT claim their own ports).
pub struct PioBus {
    serial: Mutex<SerialConsole>,
    unclaimed: AtomicU64,
}

impl PioBus {
    pub fn new(console: Box<dyn Write + Send>) -> Self {
        PioBus {
            serial: Mutex::new(SerialConsole::new(console)),
            unclaimed: AtomicU64::new(0),
        }
    }

    fn serial_offset(port: u16) -> Option<u8> {
        (COM1_BASE..COM1_BASE + COM1_LEN)
            .contains(&port)
            .then(|| (port - COM1_BASE) as u8)
    }

    /// An `in`; unclaimed ports read as all ones, like a floating bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match Self::serial_offset(port) {
            Some(off) if data.len() == 1 => {
                data[0] = self
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(off)
            }
            _ => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    /// An `out`; unclaimed ports drop the write.
    pub fn write(&self, port: u16, data: &[u8]) {
        match Self::serial_offset(port) {
            Some(off) if data.len() == 1 => self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(off, data[0]),
            _ => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Accesses to ports no device claims (or with a width the device does not take).
    pub fn unclaimed_accesses(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }

    /// Flushes console output.
    pub fn flush(&self) {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }
}

/// A writer tests read back (a console's sink).
#[cfg(test)]
pub(crate) mod test_buf {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub(crate) struct Buf(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
