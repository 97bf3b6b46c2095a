//! The log's way to stderr: a bounded queue and a thread of its own, so that a reader of the log
//! that is slow, stuck or gone (`server 2>&1 | head`, a log shipper restarting, `2>/dev/full`)
//! never blocks, fails or kills the thread that logs. When the queue is full, lines are dropped
//! and counted; a lost log line is no reason to stop serving.
//!
//! Everything the programs write to stderr goes this way, the last `error:` line too: a direct
//! write to a stderr pipe that nobody reads would block for ever.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Log lines queued for stderr at most; beyond that they are dropped.
const QUEUE_LINES: usize = 16 * 1024;

/// The way to stderr: cheap to clone, for the tracing subscriber, the signal handler and the
/// exit.
#[derive(Clone)]
pub struct Log {
    queue: SyncSender<Vec<u8>>,
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
pub fn start() -> Log {
    let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
    let progress = Arc::new(Progress::default());
    let worker = Arc::clone(&progress);
    // If the thread can't start, its end of the queue is dropped with it, and each line then
    // goes straight to stderr (see `Log::send`).
    let _ = thread::Builder::new()
        .name("log".into())
        .stack_size(64 * 1024)
        .spawn(move || write_lines(&lines, &worker));
    Log { queue, progress }
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
        progress.done(count);
    }
}

impl Log {
    /// Queues `line` (with its `\n`), waiting at most `patience` for room in the queue; a line
    /// that finds no room is dropped and counted.
    fn send(&self, line: Vec<u8>, patience: Duration) {
        // Counted before it is sent, so the stderr thread never counts it written first.
        self.progress
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0 += 1;
        let deadline = Instant::now() + patience;
        let mut line = line;
        loop {
            match self.queue.try_send(line) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    line = back;
                    // Waiting for the stderr thread to take a line: at the exit only.
                    thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => {
                    self.progress.dropped.fetch_add(1, Ordering::Relaxed);
                    self.progress.done(1);
                    return;
                }
                Err(TrySendError::Disconnected(line)) => {
                    let _ = io::stderr().write_all(&line);
                    self.progress.done(1);
                    return;
                }
            }
        }
    }

    /// Writes one last line to stderr, `error: ...` as a rule, then waits at most `patience` for
    /// everything logged to reach stderr (see [`finish`](Log::finish)).
    pub fn last_line(&self, line: &str, patience: Duration) {
        self.send(format!("{line}\n").into_bytes(), patience);
        self.finish(patience);
    }

    /// Waits until every line logged so far is written, at most `patience`; then says how many
    /// lines were dropped, if any.
    pub fn finish(&self, patience: Duration) {
        if !self.progress.wait_written(patience) {
            return; // stderr is stuck: nothing more would get out anyway
        }
        let dropped = self.progress.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let line = format!("{dropped} log lines were dropped: stderr did not keep up\n");
            self.send(line.into_bytes(), patience);
            self.progress.wait_written(patience);
        }
    }
}

impl Progress {
    /// `count` lines counted as queued are written, or never will be.
    fn done(&self, count: u64) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.1 += count;
        self.written.notify_all();
    }

    /// Waits until every line queued so far is written, at most `patience`; false if it wasn't.
    fn wait_written(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let target = counts.0;
        while counts.1 < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            counts = self
                .written
                .wait_timeout(counts, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// One log line being formatted; queued when complete, never waiting for room.
pub struct LogLine<'a> {
    buf: Vec<u8>,
    log: &'a Log,
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
        if !self.buf.is_empty() {
            self.log.send(std::mem::take(&mut self.buf), Duration::ZERO);
        }
    }
}

impl<'a> MakeWriter<'a> for Log {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine {
            buf: Vec::new(),
            log: self,
        }
    }
}
