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

/// Buffers console bytes and writes whole lines. vm-superio flushes after every byte; passing
/// that through would cost a write(2) per guest byte while the guest holds its console lock.
pub struct LineBuffered {
    inner: Box<dyn Write + Send>,
    buf: Vec<u8>,
}

/// Bytes buffered at most before a write even without a newline.
const LINE_MAX: usize = 4096;

impl LineBuffered {
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        LineBuffered {
            inner,
            buf: Vec::with_capacity(256),
        }
    }

    /// Writes out everything buffered, complete line or not.
    /// On a write error (stdout closed) the bytes are dropped: the guest must not notice and
    /// the buffer must not grow.
    pub fn flush_all(&mut self) -> std::io::Result<()> {
        let written = self.inner.write_all(&self.buf);
        self.buf.clear();
        written.and_then(|_| self.inner.flush())
    }
}

impl Write for LineBuffered {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    /// Writes out complete lines only (or a long partial line).
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.last() == Some(&b'\n') || self.buf.len() >= LINE_MAX {
            self.flush_all()
        } else {
            Ok(())
        }
    }
}

pub struct SerialConsole {
    uart: Serial<NoIrq, vm_superio::serial::NoEvents, LineBuffered>,
}

impl SerialConsole {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(NoIrq, LineBuffered::new(out)),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // Errors are from the output writer (a closed stdout); the guest must not notice.
        let _ = self.uart.write(offset, value);
    }

    /// Writes out any partial line (at VM exit).
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_buf::Buf as Sink;

    #[test]
    fn writes_whole_lines_and_the_tail_on_exit() {
        let sink = Sink::default();
        let mut console = SerialConsole::new(Box::new(sink.clone()));
        for b in b"hello\nwor" {
            console.write(0, *b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
        console.flush();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\nwor");
    }
}
