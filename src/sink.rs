//! Where received messages go: a writer such as stdout, or a collector for tests and embedding.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::framing::Batch;

/// Receives every message the server reads, one batch per read, in the order each peer sent them.
///
/// A sink is shared by every connection thread, so it must be `Send + Sync`. Returning an error
/// stops the server: the output is gone, so there is no point in reading more.
pub trait Sink: Send + Sync {
    /// Takes the messages one read from `peer` completed.
    fn deliver(&self, peer: SocketAddr, batch: &Batch) -> io::Result<()>;
}

/// Writes each message as one line `PEER MESSAGE` to a writer (stdout in the `server` binary).
///
/// Each batch is formatted into one buffer outside the lock, then written with one `write_all`
/// under it, so lines from concurrent peers never interleave mid-line and the lock is taken once
/// per batch.
#[derive(Debug)]
pub struct LineWriterSink<W> {
    out: Mutex<W>,
}

impl<W: Write + Send> LineWriterSink<W> {
    /// A sink writing to `out`.
    pub fn new(out: W) -> LineWriterSink<W> {
        LineWriterSink {
            out: Mutex::new(out),
        }
    }

    /// Gives back the writer.
    pub fn into_inner(self) -> W {
        self.out
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A sink that prints to the process's standard output.
pub fn stdout() -> LineWriterSink<io::Stdout> {
    LineWriterSink::new(io::stdout())
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
    buf.reserve(text.len() + ends.len() * BLOCK + BLOCK);
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
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            buf.clear();
            format_batch(&mut buf, peer, batch);
            let result = {
                let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
                out.write_all(&buf).and_then(|()| out.flush())
            };
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
            result
        })
    }
}

// Formatting scratch, one per connection thread, kept small between batches.
thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
const SCRATCH_KEEP: usize = 256 * 1024;

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
        let deadline = Instant::now() + timeout;
        let mut messages = self.lock();
        while messages.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
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
