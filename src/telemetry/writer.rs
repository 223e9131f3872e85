//! The log writer: each formatted line goes into a bounded queue, and one background thread
//! (`finx-log-writer`) writes whatever has queued up every [`BATCH_INTERVAL`], in one flush.
//!
//! Why not `tracing-appender`'s non-blocking writer: its thread sleeps on the queue, so every
//! line a busy request thread logs wakes it (a futex call on the request thread and a context
//! switch). The load bench measured that wake-up at about a twentieth of the gateway's CPU per
//! request. Here nobody waits on the queue: the writer wakes on its own timer and drains it,
//! and a request thread only wakes it early when a burst has filled half the queue.
//!
//! Lossless while the process lives: when the queue is full the logging thread waits for room
//! rather than drop an audit line. A line reaches the output at most one interval after it was
//! logged (a crash can lose that last interval); a WARN or ERROR line wakes the writer at once,
//! and dropping the [`LogGuard`] writes out everything queued before it returns.
//!
//! A leaf of `telemetry`: it depends on nothing else in the crate.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How often the writer thread writes out what has queued.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(10);
/// Lines the queue holds before a logging thread has to wait.
const QUEUE_LINES: usize = 64 * 1024;
/// The output buffer: one batch is usually one write.
const OUTPUT_BUFFER_BYTES: usize = 64 * 1024;

/// The sending side, handed to the subscriber (`MakeWriter`): cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
    /// Queued lines at which a logging thread wakes the writer early (half the queue).
    wake_at_lines: usize,
    /// This line wakes the writer at once (WARN and ERROR).
    urgent: bool,
}

struct Shared {
    lines: SyncSender<Vec<u8>>,
    status: Arc<Status>,
    writer: Thread,
}

/// What the logging threads and the writer thread both read and change.
#[derive(Default)]
struct Status {
    /// Lines sent and not yet taken by the writer thread.
    queued: AtomicUsize,
    stopping: AtomicBool,
}

/// Keeps the writer thread running; dropping it writes out every queued line and stops it.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    /// The writer to stop; `None` when logging writes straight to its output.
    running: Option<(Arc<Shared>, JoinHandle<()>)>,
}

impl LogGuard {
    /// The guard of logging without a writer thread (its output is written directly).
    pub fn direct() -> Self {
        Self { running: None }
    }
}

/// Starts the writer thread for `output`.
pub fn spawn(output: impl Write + Send + 'static) -> std::io::Result<(LogWriter, LogGuard)> {
    spawn_with_queue(output, QUEUE_LINES)
}

/// [`spawn`] with a queue of `queue_lines` (tests use a short one).
fn spawn_with_queue(
    output: impl Write + Send + 'static,
    queue_lines: usize,
) -> std::io::Result<(LogWriter, LogGuard)> {
    let (sender, receiver) = mpsc::sync_channel(queue_lines);
    let status = Arc::new(Status::default());
    let thread = std::thread::Builder::new()
        .name("finx-log-writer".into())
        .spawn({
            let status = status.clone();
            move || write_batches(&status, &receiver, output)
        })?;
    let shared = Arc::new(Shared {
        lines: sender,
        status,
        writer: thread.thread().clone(),
    });
    Ok((
        LogWriter {
            shared: shared.clone(),
            wake_at_lines: (queue_lines / 2).max(1),
            urgent: false,
        },
        LogGuard {
            running: Some((shared, thread)),
        },
    ))
}

/// The writer thread: every interval (or when woken), everything queued, then one flush.
fn write_batches(status: &Status, lines: &Receiver<Vec<u8>>, output: impl Write) {
    let mut output = std::io::BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, output);
    loop {
        let stopping = status.stopping.load(Ordering::Acquire);
        let mut wrote = false;
        while let Ok(line) = lines.try_recv() {
            status.queued.fetch_sub(1, Ordering::Relaxed);
            // A failing output (a closed stderr) cannot be reported anywhere; the line is lost
            // rather than the gateway stopped.
            let _ = output.write_all(&line);
            wrote = true;
        }
        if wrote {
            let _ = output.flush();
        }
        if stopping {
            return;
        }
        std::thread::park_timeout(BATCH_INTERVAL);
    }
}

impl Write for LogWriter {
    /// Queues one formatted line (the subscriber writes each event in one call).
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = &self.shared;
        let queued = shared.status.queued.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = match shared.lines.try_send(line.to_vec()) {
            Ok(()) => true,
            Err(TrySendError::Full(line)) => {
                // Lossless: wait for room, with the writer woken to make it.
                shared.writer.unpark();
                shared.lines.send(line).is_ok()
            }
            // The writer has stopped (the guard was dropped): nothing is written any more.
            Err(TrySendError::Disconnected(_)) => false,
        };
        if !sent {
            shared.status.queued.fetch_sub(1, Ordering::Relaxed);
        } else if self.urgent || queued == self.wake_at_lines {
            shared.writer.unpark();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LogWriter {
            urgent: *meta.level() <= tracing::Level::WARN,
            ..self.clone()
        }
    }
}

impl Drop for LogGuard {
    /// Writes out every line queued so far, then stops the writer thread.
    fn drop(&mut self) {
        if let Some((shared, thread)) = self.running.take() {
            shared.status.stopping.store(true, Ordering::Release);
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An output that records what reached it, and how many writes it took.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorded {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut recorded = self.0.lock().unwrap_or_else(|e| e.into_inner());
            recorded.0.extend_from_slice(bytes);
            recorded.1 += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_and_in_few_writes() {
        let output = Recorded::default();
        let (writer, guard) = spawn(output.clone()).expect("writer thread");
        let mut expected = Vec::new();
        for i in 0..10_000 {
            let line = format!("line {i}\n");
            writer
                .make_writer()
                .write_all(line.as_bytes())
                .expect("queued");
            expected.extend_from_slice(line.as_bytes());
        }
        drop(guard);
        let (written, writes) = output.0.lock().expect("not poisoned").clone();
        assert_eq!(written, expected);
        // Batched: 10,000 lines never take 10,000 writes to the output.
        assert!(writes < 1_000, "{writes} writes");
    }

    /// An output whose writes wait until the test opens it, saying when one started.
    struct Gated {
        recorded: Recorded,
        entered: mpsc::Sender<()>,
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Write for Gated {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let (open, opened) = &*self.open;
            let mut is_open = open.lock().unwrap_or_else(|e| e.into_inner());
            while !*is_open {
                is_open = opened.wait(is_open).unwrap_or_else(|e| e.into_inner());
            }
            self.recorded.write(bytes)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_makes_the_logger_wait_rather_than_lose_lines() {
        let recorded = Recorded::default();
        let (entered, writing) = mpsc::channel();
        let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let output = Gated {
            recorded: recorded.clone(),
            entered,
            open: open.clone(),
        };
        let (writer, guard) = spawn_with_queue(output, 4).expect("writer thread");
        writer.make_writer().write_all(b"0\n").expect("queued");
        // The writer holds line 0 and is stuck writing it: the queue fills up behind it.
        writing
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer starts writing");
        for line in 1..=4 {
            writer
                .make_writer()
                .write_all(format!("{line}\n").as_bytes())
                .expect("queued");
        }
        let (done, finished) = mpsc::channel();
        let late = writer.clone();
        let blocked = std::thread::spawn(move || {
            late.make_writer().write_all(b"5\n").expect("queued");
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "a line was accepted while the queue was full"
        );
        *open.0.lock().expect("not poisoned") = true;
        open.1.notify_all();
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiting line goes in once there is room");
        blocked.join().expect("logging thread");
        drop(guard);
        let written = recorded.0.lock().expect("not poisoned").0.clone();
        assert_eq!(written, b"0\n1\n2\n3\n4\n5\n");
    }

    #[test]
    fn a_line_is_written_within_a_few_intervals_without_a_wake_up() {
        let output = Recorded::default();
        let (writer, _guard) = spawn(output.clone()).expect("writer thread");
        writer.make_writer().write_all(b"quiet\n").expect("queued");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while output.0.lock().expect("not poisoned").0 != b"quiet\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "the line was not written on the writer's own timer"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_line_logged_after_the_guard_is_dropped_is_refused_quietly() {
        let output = Recorded::default();
        let (writer, guard) = spawn(output.clone()).expect("writer thread");
        drop(guard);
        writer.make_writer().write_all(b"late\n").expect("no error");
        assert!(output.0.lock().expect("not poisoned").0.is_empty());
    }
}
