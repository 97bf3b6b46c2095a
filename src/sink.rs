//! Where received messages go: a writer such as stdout, or a collector for tests and embedding.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::framing::Batch;

/// Receives every message the server reads, one batch per read, in the order each peer sent them.
///
/// A sink is shared by every connection thread, so it must be `Send + Sync`. Returning an error
/// stops the server: the output is gone, so there is no point in reading more.
///
/// A sink may hand messages on before they are written out (to a thread writing them, say); then
/// it also implements [`flush`](Sink::flush), which the server calls before it closes a
/// connection cleanly, since a clean close tells the client that everything it sent was printed.
pub trait Sink: Send + Sync {
    /// Takes the messages one read from `peer` completed.
    fn deliver(&self, peer: SocketAddr, batch: &Batch) -> io::Result<()>;

    /// Returns once every message delivered before the call is written out. The default, for
    /// sinks whose `deliver` finishes the job, returns at once.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// The server is stopping: from `deadline` on, `deliver` and `flush` must not wait for the
    /// output any more, but fail with [`io::ErrorKind::TimedOut`]. The default does nothing.
    fn stop(&self, deadline: Instant) {
        let _ = deadline;
    }

    /// Messages `deliver` took that were not written out (the output failed, or was still
    /// blocked at the stop's deadline). The default: none.
    fn unwritten(&self) -> u64 {
        0
    }
}

/// Writes each message as one line `PEER MESSAGE` to a writer (stdout in the `server` binary).
///
/// Each batch is formatted into its own buffer, then written with one `write_all`, so lines from
/// concurrent peers never interleave mid-line. No thread waits for another's write: the thread
/// that finds the writer idle writes its batch and then whatever others queued meanwhile, while
/// they go back to reading. The queue is bounded (1 MiB); when it is full, `deliver`
/// waits for room, and after a stop only until the stop's deadline, so a writer that blocks for
/// good (a pipe nobody reads) holds up nobody but itself.
#[derive(Debug)]
pub struct LineWriterSink<W> {
    /// Held only by the thread that is writing.
    out: Mutex<W>,
    state: Mutex<Output>,
    /// Signalled when batches are written or the writer fails.
    written: Condvar,
    /// Formatting buffers for reuse, so that a batch costs no allocation.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Most bytes of formatted batches queued behind the thread that is writing.
const QUEUE_BYTES: usize = 1024 * 1024;
/// Spare buffers kept, and the largest kept.
const SPARE_BUFFERS: usize = 32;
const SPARE_KEEP: usize = 512 * 1024;

#[derive(Debug, Default)]
struct Output {
    /// Batches waiting for the thread that is writing, with how many messages each holds.
    queue: VecDeque<(Vec<u8>, u64)>,
    queued_bytes: usize,
    /// Whether a thread is writing; it writes the queue before it lets go. The queue holds
    /// batches only while a thread is writing, so batches are written in the order they came.
    writing: bool,
    /// Batches taken so far, and of those, written so far (in order).
    taken: u64,
    written: u64,
    /// Messages taken and not (yet) written.
    unwritten: u64,
    /// Why the writer failed; after that nothing more is taken.
    failed: Option<(io::ErrorKind, String)>,
    /// Set by [`Sink::stop`]: no wait goes past it.
    deadline: Option<Instant>,
    /// Threads waiting on `written`.
    waiting: usize,
}

impl<W: Write + Send> LineWriterSink<W> {
    /// A sink writing to `out`.
    pub fn new(out: W) -> LineWriterSink<W> {
        LineWriterSink {
            out: Mutex::new(out),
            state: Mutex::new(Output::default()),
            written: Condvar::new(),
            spare: Mutex::new(Vec::new()),
        }
    }

    /// Gives back the writer.
    pub fn into_inner(self) -> W {
        self.out
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> MutexGuard<'_, Output> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spare(&self) -> Vec<u8> {
        self.spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() <= SPARE_KEEP {
            buf.clear();
            let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
            if spare.len() < SPARE_BUFFERS {
                spare.push(buf);
            }
        }
    }

    /// Waits for `written` to be signalled, but never past the stop's deadline.
    fn wait<'a>(&self, mut state: MutexGuard<'a, Output>) -> io::Result<MutexGuard<'a, Output>> {
        state.waiting += 1;
        let state = match state.deadline {
            None => self
                .written
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    state.waiting -= 1;
                    return Err(blocked());
                }
                self.written
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        let mut state = state;
        state.waiting -= 1;
        Ok(state)
    }

    /// Writes `batch` (the caller's, already counted as taken), then every batch queued
    /// meanwhile, then lets go of the writer. The result is that of the caller's own batch.
    fn write_all_queued(&self, batch: Vec<u8>, messages: u64) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batches = vec![(batch, messages)];
        let mut own = Ok(());
        for round in 0.. {
            let mut result = Ok(());
            let (mut done, mut done_messages) = (0, 0);
            for (buf, messages) in &batches {
                result = out.write_all(buf);
                if result.is_err() {
                    break;
                }
                done += 1;
                done_messages += messages;
            }
            let result = result.and_then(|()| out.flush());
            let mut state = self.state();
            state.written += done;
            state.unwritten -= done_messages;
            if let Err(e) = &result {
                // Nothing more gets out: what is queued stays counted as unwritten.
                state.failed = Some((e.kind(), e.to_string()));
                state.queue.clear();
                state.queued_bytes = 0;
            }
            let next: Vec<_> = state.queue.drain(..).collect();
            state.queued_bytes = 0;
            state.writing = !next.is_empty();
            if state.waiting > 0 {
                self.written.notify_all();
            }
            drop(state);
            if round == 0 {
                own = result;
            }
            for (buf, _) in batches.drain(..) {
                self.recycle(buf);
            }
            if next.is_empty() {
                break;
            }
            batches = next;
        }
        own
    }
}

/// The error for waits cut short by a stop.
fn blocked() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "output blocked: not written by the stop's deadline",
    )
}

/// A sink that prints to the process's standard output.
pub fn stdout() -> LineWriterSink<io::Stdout> {
    LineWriterSink::new(io::stdout())
}

/// Whether a write to stdout failed because its reader closed it (`server | head`): a broken
/// pipe, and on Windows also `ERROR_PIPE_NOT_CONNECTED` (233), which Wine reports there.
pub fn reader_gone(error: &io::Error) -> bool {
    const ERROR_PIPE_NOT_CONNECTED: i32 = 233;
    error.kind() == io::ErrorKind::BrokenPipe
        || (cfg!(windows) && error.raw_os_error() == Some(ERROR_PIPE_NOT_CONNECTED))
}

/// Appends `PEER MESSAGE\n` for every message of `batch` to `buf`, formatting the peer once.
pub fn format_batch(buf: &mut Vec<u8>, peer: SocketAddr, batch: &Batch) {
    // The longest address ("[v6%scope]:port ") fits in 64 bytes, so the prefix is copied as a
    // fixed-size block, which compiles to a few vector moves rather than a call per line. So is
    // a short line when the batch has 64 bytes from its start: the copy runs into the next
    // line, and the truncate takes that back.
    let mut prefix = [0u8; BLOCK];
    let mut text = String::with_capacity(BLOCK);
    let _ = write!(text, "{peer} ");
    let len = text.len().min(BLOCK);
    prefix[..len].copy_from_slice(&text.as_bytes()[..len]);
    let (text, ends) = batch.text_and_ends();
    crate::framing::reserve(buf, text.len() + ends.len() * BLOCK + BLOCK);
    let mut start = 0;
    for &end in ends {
        let at = buf.len();
        buf.extend_from_slice(&prefix);
        let line = end + 1 - start;
        let block = text.get(start..start + BLOCK);
        match block.and_then(|block| <&[u8; BLOCK]>::try_from(block).ok()) {
            Some(block) if line <= BLOCK => {
                buf.truncate(at + len);
                buf.extend_from_slice(block);
                buf.truncate(at + len + line);
            }
            _ => {
                buf.truncate(at + len);
                buf.extend_from_slice(&text[start..=end]);
            }
        }
        start = end + 1;
    }
}

const BLOCK: usize = 64;

impl<W: Write + Send> Sink for LineWriterSink<W> {
    fn deliver(&self, peer: SocketAddr, batch: &Batch) -> io::Result<()> {
        let mut buf = self.spare();
        format_batch(&mut buf, peer, batch);
        let messages = batch.len() as u64;
        let mut state = self.state();
        loop {
            if let Some((kind, text)) = &state.failed {
                let error = io::Error::new(*kind, text.clone());
                drop(state);
                self.recycle(buf);
                return Err(error);
            }
            if !state.writing {
                break;
            }
            if state.queued_bytes < QUEUE_BYTES {
                state.taken += 1;
                state.unwritten += messages;
                state.queued_bytes += buf.len();
                state.queue.push_back((buf, messages));
                return Ok(());
            }
            state = match self.wait(state) {
                Ok(state) => state,
                Err(e) => {
                    self.recycle(buf);
                    return Err(e);
                }
            };
        }
        state.writing = true;
        state.taken += 1;
        state.unwritten += messages;
        drop(state);
        self.write_all_queued(buf, messages)
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.state();
        let target = state.taken;
        while state.written < target {
            if let Some((kind, text)) = &state.failed {
                return Err(io::Error::new(*kind, text.clone()));
            }
            state = self.wait(state)?;
        }
        Ok(())
    }

    fn stop(&self, deadline: Instant) {
        let mut state = self.state();
        state.deadline = Some(deadline);
        if state.waiting > 0 {
            self.written.notify_all();
        }
    }

    fn unwritten(&self) -> u64 {
        self.state().unwritten
    }
}

/// Keeps every message in memory: for tests and programs that embed the server.
#[derive(Debug, Default)]
pub struct Collector {
    messages: Mutex<Vec<(SocketAddr, String)>>,
    arrived: Condvar,
}

impl Collector {
    /// An empty collector.
    pub fn new() -> Collector {
        Collector::default()
    }

    /// A copy of every message so far, in arrival order.
    pub fn messages(&self) -> Vec<(SocketAddr, String)> {
        self.lock().clone()
    }

    /// Waits until at least `count` messages have arrived or `timeout` passes; returns a copy.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<(SocketAddr, String)> {
        let deadline = Instant::now().checked_add(timeout);
        let mut messages = self.lock();
        while messages.len() < count {
            let left = deadline.map_or(timeout, |deadline| {
                deadline.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                break;
            }
            messages = self
                .arrived
                .wait_timeout(messages, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        messages.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(SocketAddr, String)>> {
        self.messages.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Sink for Collector {
    fn deliver(&self, peer: SocketAddr, batch: &Batch) -> io::Result<()> {
        self.lock()
            .extend(batch.iter().map(|message| (peer, message.to_string())));
        self.arrived.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn formatted_lines_are_peer_space_message(
            messages in proptest::collection::vec("[ -~]{0,150}", 0..40),
            v6 in any::<bool>(),
        ) {
            let peer: SocketAddr = if v6 {
                "[fe80::1234:5678:9abc:def0%4294967295]:65535".parse().expect("addr")
            } else {
                "127.0.0.1:8887".parse().expect("addr")
            };
            let mut batch = Batch::new();
            for message in &messages {
                batch.push(message);
            }
            let mut buf = b"before\n".to_vec();
            format_batch(&mut buf, peer, &batch);
            let expected: String = messages.iter().map(|m| format!("{peer} {m}\n")).collect();
            prop_assert_eq!(String::from_utf8(buf).expect("utf-8"), format!("before\n{expected}"));
        }
    }

    #[test]
    fn formats_one_line_per_message_with_the_peer() {
        let sink = LineWriterSink::new(Vec::new());
        let mut batch = Batch::new();
        batch.push("hello world 0");
        batch.push("");
        batch.push("我");
        sink.deliver("[::1]:53422".parse().expect("addr"), &batch)
            .expect("deliver");
        let out = String::from_utf8(sink.into_inner()).expect("utf-8");
        assert_eq!(
            out,
            "[::1]:53422 hello world 0\n[::1]:53422 \n[::1]:53422 我\n"
        );
    }
}
