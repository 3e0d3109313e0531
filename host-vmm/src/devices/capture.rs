//! A tee on a console: everything written passes on unchanged, and is also copied to a log
//! file (if one is given) and searched for the guest's `RESULT ...` lines, which are kept
//! (a bounded number) for the metrics.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Most `RESULT` lines kept per console; later ones are counted, not kept.
pub const MAX_RESULT_LINES: usize = 1024;
/// Longest line searched for `RESULT`; the rest of a longer line is not kept.
const MAX_LINE: usize = 64 * 1024;

/// What a capture saw.
#[derive(Debug, Default)]
pub struct Captured {
    /// `RESULT ...` lines (without the newline), in order.
    pub results: Vec<String>,
    /// `RESULT` lines beyond [`MAX_RESULT_LINES`].
    pub results_dropped: u64,
    /// The first error writing the log file (the log stops there; the console goes on).
    pub log_error: Option<String>,
    line: Vec<u8>,
}

impl Captured {
    fn feed(&mut self, buf: &[u8]) {
        for chunk in buf.split_inclusive(|&b| b == b'\n') {
            let room = MAX_LINE.saturating_sub(self.line.len());
            let (body, ends) = match chunk.strip_suffix(b"\n") {
                Some(b) => (b, true),
                None => (chunk, false),
            };
            self.line.extend_from_slice(&body[..body.len().min(room)]);
            if ends {
                self.end_line();
            }
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        let line = line.trim_end_matches('\r');
        if line.starts_with("RESULT ") {
            if self.results.len() < MAX_RESULT_LINES {
                self.results.push(line.to_string());
            } else {
                self.results_dropped += 1;
            }
        }
        self.line.clear();
    }
}

/// The writer: passes to `inner`, copies to `log`, records into a shared [`Captured`].
pub struct Capture {
    inner: Box<dyn Write + Send>,
    log: Option<Box<dyn Write + Send>>,
    seen: Arc<Mutex<Captured>>,
}

impl Capture {
    /// A tee on `inner`; read what it saw through the returned handle.
    pub fn new(
        inner: Box<dyn Write + Send>,
        log: Option<Box<dyn Write + Send>>,
    ) -> (Self, Arc<Mutex<Captured>>) {
        let seen = Arc::new(Mutex::new(Captured::default()));
        let me = Capture {
            inner,
            log,
            seen: Arc::clone(&seen),
        };
        (me, seen)
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.feed(&buf[..n]);
        if let Some(log) = &mut self.log {
            if let Err(e) = log.write_all(&buf[..n]) {
                seen.log_error.get_or_insert(e.to_string());
                self.log = None;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(log) = &mut self.log {
            if let Err(e) = log.flush() {
                let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.log_error.get_or_insert(e.to_string());
                self.log = None;
            }
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_buf::Buf;

    #[test]
    fn passes_everything_on_and_keeps_result_lines_across_writes() {
        let (out, log) = (Buf::default(), Buf::default());
        let (mut c, seen) = Capture::new(Box::new(out.clone()), Some(Box::new(log.clone())));
        c.write_all(b"boot\nRESULT a x=1 ").unwrap();
        c.write_all(b"y=2\r\nnot RESULT\nRESULT b\n").unwrap();
        let text = b"boot\nRESULT a x=1 y=2\r\nnot RESULT\nRESULT b\n".to_vec();
        assert_eq!(*out.0.lock().unwrap(), text);
        assert_eq!(*log.0.lock().unwrap(), text);
        assert_eq!(
            seen.lock().unwrap().results,
            ["RESULT a x=1 y=2", "RESULT b"]
        );
    }

    #[test]
    fn keeps_a_bounded_number_of_lines() {
        let (mut c, seen) = Capture::new(Box::new(std::io::sink()), None);
        for _ in 0..MAX_RESULT_LINES + 5 {
            c.write_all(b"RESULT x\n").unwrap();
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.results.len(), MAX_RESULT_LINES);
        assert_eq!(seen.results_dropped, 5);
    }
}
