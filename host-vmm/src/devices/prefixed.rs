//! Several VMs' consoles on one output: each line gets its VM's prefix, and lines from
//! different VMs never interleave mid-line (the serial device writes whole lines).

use std::io::Write;
use std::sync::{Arc, Mutex};

/// One VM's view of a shared output.
pub struct PrefixedConsole {
    sink: Arc<Mutex<Box<dyn Write + Send>>>,
    prefix: String,
    at_line_start: bool,
}

impl PrefixedConsole {
    pub fn new(sink: Arc<Mutex<Box<dyn Write + Send>>>, prefix: String) -> Self {
        PrefixedConsole {
            sink,
            prefix,
            at_line_start: true,
        }
    }
}

impl Write for PrefixedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len() + self.prefix.len());
        for line in buf.split_inclusive(|&b| b == b'\n') {
            if self.at_line_start {
                out.extend_from_slice(self.prefix.as_bytes());
            }
            out.extend_from_slice(line);
            self.at_line_start = line.ends_with(b"\n");
        }
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        sink.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_buf::Buf;

    #[test]
    fn every_line_gets_its_prefix_even_across_writes() {
        let buf = Buf::default();
        let sink: Arc<Mutex<Box<dyn Write + Send>>> = Arc::new(Mutex::new(Box::new(buf.clone())));
        let mut a = PrefixedConsole::new(Arc::clone(&sink), "[a] ".into());
        let mut b = PrefixedConsole::new(sink, "[b] ".into());
        a.write_all(b"one\ntw").unwrap();
        a.write_all(b"o\n").unwrap();
        b.write_all(b"x\n").unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "[a] one\n[a] two\n[b] x\n");
    }
}
