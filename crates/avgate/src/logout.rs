//! Where log lines go: standard output, gathered and written in batches.
//!
//! A scan logs two `info` lines. Written with one `write` each, they cost
//! two system calls per request on the path that answers the client
//! (about 9 % of avgate's CPU for a small scan, measured). Like nginx's
//! `access_log ... buffer= flush=`, `info` and below are kept for at most
//! `flush_interval` and written together; a warning, an error or an audit
//! line (target `audit`) writes everything gathered so far and itself at
//! once, so lines keep their order and problems show up without delay.
//! The buffer is also written when it passes [`MAX_BUFFERED`] and when the
//! process ends ([`LogOutput::flush_on_drop`]). An interval of zero writes
//! every line at once.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Past this many bytes gathered, they are written without waiting.
pub const MAX_BUFFERED: usize = 64 * 1024;

/// The log output: cheap to clone, shared by the subscriber and `main`.
#[derive(Clone)]
pub struct LogOutput {
    shared: Arc<Shared>,
}

struct Shared {
    lines: Mutex<Vec<u8>>,
    /// Told when the first line lands in an empty buffer.
    pending: Condvar,
    interval: Duration,
    out: Sink,
}

/// Where gathered bytes go: standard output, or a test's capture.
type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

impl LogOutput {
    /// Lines to standard output; `interval` is how long an `info` line may
    /// wait (zero: not at all).
    pub fn stdout(interval: Duration) -> LogOutput {
        LogOutput::new(interval, |bytes| {
            // Nothing sensible to do when standard output is gone.
            let _ = io::stdout().lock().write_all(bytes);
        })
    }

    fn new(interval: Duration, out: impl Fn(&[u8]) + Send + Sync + 'static) -> LogOutput {
        let mut shared = Arc::new(Shared {
            lines: Mutex::new(Vec::new()),
            pending: Condvar::new(),
            interval,
            out: Box::new(out),
        });
        if !interval.is_zero() {
            let flusher = shared.clone();
            // A plain thread, not a task: it must also run while the async
            // runtime starts and stops, and it sleeps unless lines wait. It
            // lives as long as the process, like the log itself.
            let spawned = std::thread::Builder::new()
                .name("avgate-log".into())
                .spawn(move || loop {
                    let lines = flusher.lock();
                    let lines = flusher
                        .pending
                        .wait_while(lines, |l| l.is_empty())
                        .unwrap_or_else(|e| e.into_inner());
                    drop(lines);
                    std::thread::sleep(flusher.interval);
                    flusher.write_out(&mut flusher.lock());
                });
            if spawned.is_err() {
                // Without the thread nothing would write the buffer: write
                // each line at once instead. (The failed closure and its
                // clone are gone, so the Arc is ours alone.)
                if let Some(shared) = Arc::get_mut(&mut shared) {
                    shared.interval = Duration::ZERO;
                }
            }
        }
        LogOutput { shared }
    }

    /// Writes what is gathered.
    pub fn flush(&self) {
        self.shared.write_out(&mut self.shared.lock());
    }

    /// A guard that writes what is gathered when it is dropped, also when
    /// `main` unwinds from a panic: keep it for the life of the process.
    pub fn flush_on_drop(&self) -> FlushOnDrop {
        FlushOnDrop(self.clone())
    }
}

/// See [`LogOutput::flush_on_drop`].
pub struct FlushOnDrop(LogOutput);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.0.flush();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock leaves bytes, not broken state.
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_out(&self, lines: &mut Vec<u8>) {
        if !lines.is_empty() {
            (self.out)(lines);
            lines.clear();
            if lines.capacity() > 4 * MAX_BUFFERED {
                lines.shrink_to(MAX_BUFFERED);
            }
        }
    }
}

/// One line on its way: the subscriber formats a whole line, then writes
/// it with one `write_all`.
pub struct LineWriter<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let shared = self.shared;
        let mut lines = shared.lock();
        let was_empty = lines.is_empty();
        lines.extend_from_slice(line);
        if self.urgent || shared.interval.is_zero() || lines.len() >= MAX_BUFFERED {
            // Under the lock, so that lines leave in the order they came.
            shared.write_out(&mut lines);
        } else if was_empty {
            shared.pending.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogOutput {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            shared: &self.shared,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            shared: &self.shared,
            // tracing orders levels by verbosity: ERROR < WARN < INFO.
            // The audit trail is rare and worth not losing to a SIGKILL.
            urgent: *meta.level() <= Level::WARN || meta.target() == "audit",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn capture(interval: Duration) -> (LogOutput, Arc<Mutex<Vec<Vec<u8>>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let seen = writes.clone();
        let out = LogOutput::new(interval, move |b| seen.lock().unwrap().push(b.to_vec()));
        (out, writes)
    }

    /// Writes `text` as the subscriber would, for a line that may wait
    /// (`urgent: false`, an info line) or may not (a warning).
    fn line(out: &LogOutput, urgent: bool, text: &str) {
        let mut w = LineWriter {
            shared: &out.shared,
            urgent,
        };
        w.write_all(text.as_bytes()).unwrap();
    }

    fn info_line(out: &LogOutput, text: &str) {
        line(out, false, text);
    }

    fn wait_for(writes: &Mutex<Vec<Vec<u8>>>, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let w = writes.lock().unwrap().clone();
            if w.len() >= n || Instant::now() > deadline {
                return w;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn info_lines_are_written_together_after_the_interval() {
        let (out, writes) = capture(Duration::from_millis(50));
        info_line(&out, "a\n");
        info_line(&out, "b\n");
        assert!(
            writes.lock().unwrap().is_empty(),
            "written before the interval"
        );
        let w = wait_for(&writes, 1);
        assert_eq!(w, vec![b"a\nb\n".to_vec()], "one write with both lines");
    }

    #[test]
    fn a_warning_writes_what_waits_and_itself_in_order() {
        let (out, writes) = capture(Duration::from_secs(3600));
        info_line(&out, "request\n");
        line(&out, true, "trouble\n");
        assert_eq!(
            *writes.lock().unwrap(),
            vec![b"request\ntrouble\n".to_vec()]
        );
    }

    #[test]
    fn flush_and_a_full_buffer_write_without_waiting() {
        let (out, writes) = capture(Duration::from_secs(3600));
        info_line(&out, "last words\n");
        drop(out.flush_on_drop());
        assert_eq!(*writes.lock().unwrap(), vec![b"last words\n".to_vec()]);
        let long = "x".repeat(MAX_BUFFERED);
        info_line(&out, &long);
        assert_eq!(writes.lock().unwrap().len(), 2, "a full buffer is written");
    }

    #[test]
    fn an_interval_of_zero_writes_each_line_at_once() {
        let (out, writes) = capture(Duration::ZERO);
        info_line(&out, "a\n");
        info_line(&out, "b\n");
        assert_eq!(
            *writes.lock().unwrap(),
            vec![b"a\n".to_vec(), b"b\n".to_vec()]
        );
    }

    #[test]
    fn warnings_and_audit_lines_are_urgent_and_info_lines_wait() {
        let (out, writes) = capture(Duration::from_secs(3600));
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("scanned");
            assert!(writes.lock().unwrap().is_empty(), "an info line waits");
            tracing::warn!("backend down");
            tracing::info!("scanned");
            assert_eq!(writes.lock().unwrap().len(), 1, "an info line waits");
            tracing::info!(target: "audit", "token_created");
        });
        let w = writes.lock().unwrap();
        assert_eq!(w.len(), 2, "the warning and the audit line wrote");
        let text = String::from_utf8_lossy(&w.concat()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let line_has = |i: usize, a: &str, b: &str| {
            assert!(
                lines[i].contains(a) && lines[i].contains(b),
                "line {i}: {text}"
            )
        };
        line_has(0, "INFO", "scanned");
        line_has(1, "WARN", "backend down");
        line_has(2, "INFO", "scanned");
        line_has(3, "audit", "token_created");
    }
}
