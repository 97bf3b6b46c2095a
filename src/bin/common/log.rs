//! The log's way to stderr: a bounded queue and a thread of its own, so that a reader of the log
//! that is slow, stuck or gone (`server 2>&1 | head`, a log shipper restarting, `2>/dev/full`)
//! never blocks, fails or kills the thread that logs. When the queue is full, lines are dropped
//! and counted; a lost log line is no reason to stop serving.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Log lines queued for stderr at most; beyond that they are dropped.
const QUEUE_LINES: usize = 16 * 1024;

/// Hands each formatted log line to the stderr thread.
pub struct LogWriter {
    queue: SyncSender<Vec<u8>>,
    progress: Arc<Progress>,
}

/// Lets the program wait, a bounded time, for the log to reach stderr before it exits.
pub struct LogGuard {
    progress: Arc<Progress>,
}

#[derive(Default)]
struct Progress {
    /// Lines queued and lines written (or given up on) by the stderr thread.
    counts: Mutex<(u64, u64)>,
    written: Condvar,
    dropped: AtomicU64,
}

/// Starts the stderr thread. If it cannot start, lines go straight to stderr, errors ignored.
pub fn start() -> (LogWriter, LogGuard) {
    let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
    let progress = Arc::new(Progress::default());
    let worker = Arc::clone(&progress);
    // If the thread can't start, its end of the queue is dropped with it, and each line then
    // goes straight to stderr (see `LogLine::drop`).
    let _ = thread::Builder::new()
        .name("log".into())
        .stack_size(64 * 1024)
        .spawn(move || write_lines(&lines, &worker));
    let writer = LogWriter {
        queue,
        progress: Arc::clone(&progress),
    };
    (writer, LogGuard { progress })
}

fn write_lines(lines: &Receiver<Vec<u8>>, progress: &Progress) {
    let mut stderr = io::stderr();
    let mut batch = Vec::new();
    while let Ok(line) = lines.recv() {
        batch.extend_from_slice(&line);
        let mut count = 1;
        while let Ok(line) = lines.try_recv() {
            batch.extend_from_slice(&line);
            count += 1;
            if batch.len() >= 64 * 1024 {
                break;
            }
        }
        // A failed write loses these lines and nothing else.
        let _ = stderr.write_all(&batch);
        batch.clear();
        let mut counts = progress
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.1 += count;
        progress.written.notify_all();
    }
}

impl LogGuard {
    /// Waits until every line logged so far is written, at most `timeout`; then says how many
    /// lines were dropped, if any.
    pub fn finish(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut counts = self
            .progress
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let target = counts.0;
        while counts.1 < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return; // stderr is stuck: nothing more would get out anyway
            }
            counts = self
                .progress
                .written
                .wait_timeout(counts, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(counts);
        let dropped = self.progress.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                io::stderr(),
                "{dropped} log lines were dropped: stderr did not keep up"
            );
        }
    }
}

/// One log line being formatted; sent to the stderr thread when complete.
pub struct LogLine<'a> {
    buf: Vec<u8>,
    writer: &'a LogWriter,
}

impl Write for LogLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        let progress = &self.writer.progress;
        // Counted before it is sent, so the stderr thread never counts it written first.
        progress
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0 += 1;
        match self.writer.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                progress.dropped.fetch_add(1, Ordering::Relaxed);
                progress.forget_one();
            }
            Err(TrySendError::Disconnected(line)) => {
                let _ = io::stderr().write_all(&line);
                progress.forget_one();
            }
        }
    }
}

impl Progress {
    /// A line counted as queued that never will be written by the stderr thread.
    fn forget_one(&self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.1 += 1;
        self.written.notify_all();
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine {
            buf: Vec::new(),
            writer: self,
        }
    }
}
