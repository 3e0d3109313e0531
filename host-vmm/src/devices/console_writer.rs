//! The terminal end of the guests' consoles: a writer thread drains a bounded buffer into
//! the real output (stdout). A vCPU writing its serial port only appends to the buffer, so a
//! terminal or pipe that stops reading, or a guest that prints without end, never blocks a
//! vCPU (in its slot, or behind the console lock every VM's console shares). What does not
//! fit is dropped and counted, and the count is said once at the end.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Guest output held for a slow reader at most.
pub const CAPACITY: usize = 4 << 20;
/// How long the end of a run waits for the reader to take what is held.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Bytes handed to the output per write.
const CHUNK: usize = 64 << 10;

#[derive(Default)]
struct Buffer {
    data: VecDeque<u8>,
    /// Bytes that did not fit.
    dropped: u64,
    /// The writer thread is inside a write to the output.
    writing: bool,
    closed: bool,
}

struct Shared {
    buf: Mutex<Buffer>,
    /// Data arrived or the end came (for the thread); the buffer drained (for the end).
    changed: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `Write` that never blocks on the output behind it; see the module documentation.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleWriter {
    /// Writes to `out` from a thread of its own, holding at most `capacity` bytes; an error
    /// if the thread cannot be started (without it nothing would reach `out`).
    pub fn new(out: Box<dyn Write + Send>, capacity: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            buf: Mutex::default(),
            changed: Condvar::new(),
            capacity,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("console-writer".into())
            .spawn(move || drain(&s, out))?;
        Ok(ConsoleWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Bytes dropped so far because the output did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut b = self.shared.lock();
        let room = self.shared.capacity.saturating_sub(b.data.len());
        let (kept, lost) = buf.split_at(buf.len().min(room));
        b.data.extend(kept);
        b.dropped += lost.len() as u64;
        drop(b);
        self.shared.changed.notify_all();
        // Taken, as a console that drops is still a console: the guest goes on.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_WAIT;
        let mut b = self.shared.lock();
        b.closed = true;
        self.shared.changed.notify_all();
        // What is held goes out if the reader takes it soon; a reader that never does
        // cannot hold up the end of the run.
        while (!b.data.is_empty() || b.writing) && Instant::now() < deadline {
            b = self
                .shared
                .changed
                .wait_timeout(b, deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let (held, dropped) = (b.data.len() as u64, b.dropped);
        let stuck = !b.data.is_empty() || b.writing;
        drop(b);
        if dropped + held > 0 {
            eprintln!(
                "pvsync: console: {} bytes of guest output dropped (the output did not keep up)",
                dropped + held
            );
        }
        if let Some(t) = self.thread.take() {
            // A writer stuck in a write to a reader that never reads is left behind.
            if !stuck {
                let _ = t.join();
            }
        }
    }
}

/// The writer thread: hands what is held to `out`, a chunk at a time, until the end.
fn drain(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        let mut b = shared.lock();
        while b.data.is_empty() && !b.closed {
            b = shared.changed.wait(b).unwrap_or_else(|e| e.into_inner());
        }
        if b.data.is_empty() {
            return;
        }
        let n = b.data.len().min(CHUNK);
        chunk.clear();
        chunk.extend(b.data.drain(..n));
        b.writing = true;
        drop(b);
        let ok = out.write_all(&chunk).and_then(|()| out.flush()).is_ok();
        let mut b = shared.lock();
        b.writing = false;
        if !ok {
            // The output is gone (a closed pipe): what is held and what comes is dropped.
            b.dropped += chunk.len() as u64 + b.data.len() as u64;
            b.data.clear();
        }
        drop(b);
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that blocks until told to go on, then records.
    struct Gate(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_never_blocks_the_writer_and_drops_what_does_not_fit() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut w =
            ConsoleWriter::new(Box::new(Gate(Arc::clone(&gate), Arc::clone(&got))), 100).unwrap();
        // The output blocks, yet every write returns at once.
        for _ in 0..50 {
            assert_eq!(w.write(b"0123456789").unwrap(), 10);
        }
        // At most the capacity, plus what the writer took before it blocked (no more than a
        // capacity's worth), is kept.
        assert!(w.dropped() >= 300, "{}", w.dropped());
        let dropped = w.dropped();
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(w);
        // What was kept came out in order, and with what was dropped makes up the whole.
        let got = got.lock().unwrap();
        assert_eq!(got.len() as u64 + dropped, 500);
        assert!(got.chunks(10).all(|c| c == b"0123456789"));
    }
}
