//! Load mode's chat workload (`--chat`): every connection joins the room, then sends its messages
//! while it counts what arrives from the others and how long each took, from its send to its
//! receipt. None of ncat, socat or tcpkali measures fan-out this way.
//!
//! A message is `chat CONN I T` padded with `.` to the size asked for, where `T` is when it was
//! due (when it was made; with `--rate`, its slot in the schedule, so that a server that holds up
//! the senders shows in the latencies), in nanoseconds since the run began: all connections are
//! in this one process, so one clock times both ends. The server relays it to the others as
//! `PEER chat CONN I T...`.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use memchr::memmem;

use crate::error::Error;
use crate::pace::Pace;
use crate::send;
use crate::transport::{self, Dialer, Transport};

/// What the connections of one chat run share.
pub(crate) struct ChatRun {
    /// The clock of the timestamps in messages.
    epoch: Instant,
    /// Whose turn it is to join: one after another, as a room fills in life (and as `ncat
    /// --chat` needs: a burst of connects makes it quit).
    turns: Mutex<Turns>,
    turn_over: Condvar,
    /// Connections still to arrive at the start line: nobody sends before everyone who could
    /// join has.
    to_arrive: Mutex<usize>,
    all_arrived: Condvar,
    /// When the last one arrived: the run's throughput counts from then.
    started: OnceLock<Instant>,
    /// How many joined the room (read their greeting).
    joined: AtomicUsize,
    /// Where and how long the first connection waited for a greeting that didn't come: the
    /// server sends none, so the others don't wait.
    no_greeting: OnceLock<(SocketAddr, Duration)>,
}

/// Whose turn it is to join.
struct Turns {
    next: usize,
    /// Connections whose thread never started: their turn is skipped.
    absent: Vec<bool>,
}

impl Turns {
    fn skip_absent(&mut self) {
        while self.absent.get(self.next) == Some(&true) {
            self.next += 1;
        }
    }
}

impl ChatRun {
    pub(crate) fn new(connections: usize) -> ChatRun {
        ChatRun {
            epoch: Instant::now(),
            turns: Mutex::new(Turns {
                next: 0,
                absent: vec![false; connections],
            }),
            turn_over: Condvar::new(),
            to_arrive: Mutex::new(connections),
            all_arrived: Condvar::new(),
            started: OnceLock::new(),
            joined: AtomicUsize::new(0),
            no_greeting: OnceLock::new(),
        }
    }

    /// Waits for connection `conn`'s turn to join.
    fn my_turn(&self, conn: usize) {
        let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
        while turns.next < conn {
            turns = self
                .turn_over
                .wait(turns)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Connection `conn` has joined, or failed to: the next one's turn.
    fn turn_done(&self, conn: usize) {
        {
            let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
            turns.next = turns.next.max(conn + 1);
            turns.skip_absent();
        }
        self.turn_over.notify_all();
    }

    /// One more connection at the start line (or never coming).
    fn one_arrived(&self) -> MutexGuard<'_, usize> {
        let mut left = self
            .to_arrive
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *left = left.saturating_sub(1);
        if *left == 0 {
            let _ = self.started.set(Instant::now());
        }
        self.all_arrived.notify_all();
        left
    }

    /// Arrives at the start line (joined or failed) and waits for all the others.
    fn arrive(&self) {
        let mut left = self.one_arrived();
        while *left > 0 {
            left = self
                .all_arrived
                .wait(left)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Connection `conn` will never arrive (its thread could not start).
    pub(crate) fn absent(&self, conn: usize) {
        {
            let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(absent) = turns.absent.get_mut(conn) {
                *absent = true;
            }
            turns.skip_absent();
        }
        self.turn_over.notify_all();
        drop(self.one_arrived());
    }

    /// When every connection had arrived at the start line, if they all have.
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started.get().copied()
    }

    /// `at`, in nanoseconds since the run began: the timestamps in messages.
    fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What a chat connection is asked to do.
pub(crate) struct ChatTask<'a> {
    pub(crate) conn: usize,
    pub(crate) count: u64,
    pub(crate) interval: Duration,
    /// Messages a second, on a fixed schedule (open loop): each is stamped with when it was
    /// due, so its latency counts from then.
    pub(crate) rate: Option<f64>,
    pub(crate) size: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) linger: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) run: &'a ChatRun,
}

/// What a chat connection did.
pub(crate) struct ChatOutcome {
    pub(crate) sent: u64,
    pub(crate) bytes: u64,
    pub(crate) delivered: u64,
    pub(crate) latencies: Option<Histogram<u64>>,
    pub(crate) error: Option<Error>,
}

/// Joins the room, sends, counts deliveries; arrives at the start line whatever happens, so
/// that one connection's failure can't hold up the others.
pub(crate) fn chat_connection(
    dialer: &Dialer,
    task: &ChatTask<'_>,
    sent: &AtomicU64,
) -> ChatOutcome {
    let mut outcome = ChatOutcome {
        sent: 0,
        bytes: 0,
        delivered: 0,
        latencies: None,
        error: None,
    };
    task.run.my_turn(task.conn);
    let joined = match task.run.no_greeting.get() {
        // Found out already: no one waits for a greeting that won't come.
        Some(&(addr, waited)) => Err(Error::NoGreeting { addr, waited }),
        None => dialer
            .connect(task.connect_timeout)
            .and_then(|(stream, peer)| join(stream, peer, task.linger).map(|s| (s, peer))),
    };
    if let Err(Error::NoGreeting { addr, waited }) = &joined {
        let _ = task.run.no_greeting.set((*addr, *waited));
    }
    task.run.turn_done(task.conn);
    let (stream, peer) = match joined {
        Ok(joined) => {
            task.run.joined.fetch_add(1, Ordering::AcqRel);
            task.run.arrive();
            joined
        }
        Err(error) => {
            task.run.arrive();
            outcome.error = Some(error);
            return outcome;
        }
    };
    let others = task.run.joined.load(Ordering::Acquire).saturating_sub(1) as u64;
    if let Err(error) = exchange(stream, peer, task, others, sent, &mut outcome) {
        outcome.error = Some(error);
    }
    outcome
}

/// Reads the greeting: once it has arrived the connection is in the room, and every line
/// relayed after that reaches it.
fn join(stream: Transport, peer: SocketAddr, linger: Duration) -> Result<Transport, Error> {
    let broken = |source| Error::Connection { addr: peer, source };
    stream
        .tcp()
        .set_read_timeout(Some(linger))
        .map_err(broken)?;
    let mut byte = [0u8; 1];
    let mut line = Vec::new();
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(broken(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if send::is_timeout(&e) => {
                return Err(Error::NoGreeting {
                    addr: peer,
                    waited: linger,
                });
            }
            Err(e) => return Err(broken(e)),
        }
    }
    if line.starts_with(b"error: ") {
        return Err(Error::Ended {
            addr: peer,
            reason: crate::framing::peer_text(&line),
        });
    }
    stream.tcp().set_read_timeout(None).map_err(broken)?;
    Ok(stream)
}

/// What the reading thread reports.
enum Heard {
    /// Every line expected from the others has arrived.
    AllIn,
    /// The server's side ended: `Ok` for a clean close.
    End {
        result: io::Result<()>,
        reason: Option<String>,
        latencies: Option<Histogram<u64>>,
    },
}

/// Sends this connection's messages while a second thread reads what the others send; once
/// all of theirs are in, half-closes and waits for the server's clean close.
fn exchange(
    stream: Transport,
    peer: SocketAddr,
    task: &ChatTask<'_>,
    others: u64,
    sent: &AtomicU64,
    outcome: &mut ChatOutcome,
) -> Result<(), Error> {
    let broken = |source| Error::Connection { addr: peer, source };
    let send_timeout =
        send::set_send_timeout(stream.tcp(), Some(task.send_timeout)).map_err(broken)?;
    let stream = Arc::new(stream);
    let expected = others * task.count;
    let conn = task.conn;
    let delivered = Arc::new(AtomicU64::new(0));
    let (heard_tx, heard) = mpsc::channel();
    {
        let stream = Arc::clone(&stream);
        let delivered = Arc::clone(&delivered);
        let epoch = task.run.epoch;
        thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || listen(&stream, epoch, conn, expected, &delivered, &heard_tx))
            .map_err(Error::Thread)?;
    }
    let send = |bytes: &[u8]| transport::send_to(&stream, peer, bytes, send_timeout);
    // A send that failed because the server cut the connection waits (at most the linger) for
    // the reason it may have sent first: that says most.
    let send_failed = |error: Error| -> Error {
        if matches!(error, Error::SendTimeout { .. }) {
            return error;
        }
        let deadline = Instant::now() + task.linger;
        loop {
            match heard.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Heard::AllIn) => {}
                Ok(Heard::End {
                    reason: Some(reason),
                    ..
                }) => return Error::Ended { addr: peer, reason },
                Ok(Heard::End { reason: None, .. }) | Err(_) => return error,
            }
        }
    };
    let mut buf = Vec::with_capacity(128 * 1024);
    let mut pending = 0;
    let pace = Pace::new(task.interval, task.rate);
    for i in 0..task.count {
        // No `--duration` with chat: every message is sent.
        let due = pace.wait(i, None).unwrap_or_else(Instant::now);
        message(&mut buf, task, i, due);
        pending += 1;
        if buf.len() >= 64 * 1024 || pace.is_paced() || i + 1 == task.count {
            send(&buf).map_err(send_failed)?;
            outcome.sent += pending;
            outcome.bytes += buf.len() as u64;
            sent.fetch_add(pending, Ordering::Relaxed);
            buf.clear();
            pending = 0;
        }
    }
    // Every line from the others, each wait at most the linger since the last one came.
    let mut counted = delivered.load(Ordering::Acquire);
    let end = loop {
        match heard.recv_timeout(task.linger) {
            Ok(Heard::AllIn) => break None,
            Ok(end @ Heard::End { .. }) => break Some(end),
            Err(RecvTimeoutError::Timeout) => {
                let now = delivered.load(Ordering::Acquire);
                if now == counted {
                    outcome.delivered = now;
                    let _ = stream.tcp().shutdown(Shutdown::Both);
                    return Err(Error::Undelivered {
                        addr: peer,
                        received: now,
                        expected,
                        waited: task.linger,
                    });
                }
                counted = now;
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(broken(io::Error::other("its reader thread ended")));
            }
        }
    };
    let end = match end {
        Some(end) => end,
        None => {
            transport::finish_sending(&stream, send_timeout).map_err(broken)?;
            match heard.recv_timeout(task.linger) {
                Ok(end) => end,
                Err(_) => {
                    let _ = stream.tcp().shutdown(Shutdown::Both);
                    outcome.delivered = delivered.load(Ordering::Acquire);
                    return Err(Error::Unconfirmed {
                        addr: peer,
                        waited: task.linger,
                    });
                }
            }
        }
    };
    outcome.delivered = delivered.load(Ordering::Acquire);
    let Heard::End {
        result,
        reason,
        latencies,
    } = end
    else {
        return Err(broken(io::Error::other("its reader thread ended")));
    };
    outcome.latencies = latencies;
    match (result, reason) {
        (Ok(()), _) if outcome.delivered < expected => Err(Error::Undelivered {
            addr: peer,
            received: outcome.delivered,
            expected,
            waited: Duration::ZERO,
        }),
        (Ok(()), _) if outcome.delivered > expected => Err(Error::Overheard {
            addr: peer,
            received: outcome.delivered,
            expected,
        }),
        (Ok(()), _) => Ok(()),
        (Err(_), Some(reason)) => Err(Error::Ended { addr: peer, reason }),
        (Err(source), None) => Err(broken(source)),
    }
}

/// Appends message `i` of this connection, stamped with when it was due (at once, but with
/// `--rate`), padded to the size asked for.
fn message(buf: &mut Vec<u8>, task: &ChatTask<'_>, i: u64, due: Instant) {
    let start = buf.len();
    let _ = write!(buf, "chat {} {i} {}", task.conn, task.run.ns_at(due));
    let len = buf.len() - start + 1;
    if len < task.size {
        buf.resize(buf.len() + task.size - len, b'.');
    }
    buf.push(b'\n');
}

/// The reading thread: counts the others' lines and records each one's delivery time, until the
/// server's side ends.
fn listen(
    stream: &Transport,
    epoch: Instant,
    conn: usize,
    expected: u64,
    delivered: &AtomicU64,
    heard: &mpsc::Sender<Heard>,
) {
    let mut tally = Tally::new(conn, expected);
    if expected == 0 {
        let _ = heard.send(Heard::AllIn); // nothing to wait for
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut kept = 0; // an unfinished line at the start of `buf`
    let result = loop {
        if kept == buf.len() {
            buf.resize(buf.len() * 2, 0); // a line longer than the buffer
        }
        let n = match stream.read(&mut buf[kept..]) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        };
        let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let filled = kept + n;
        // Only the new bytes can end a line: what was kept has no newline.
        let Some(last) = memchr::memrchr(b'\n', &buf[kept..filled]) else {
            kept = filled;
            continue;
        };
        let complete = kept + last + 1;
        let before = tally.count;
        tally.lines(&buf[..complete], now);
        buf.copy_within(complete..filled, 0);
        kept = filled - complete;
        if tally.count != before {
            delivered.store(tally.count, Ordering::Release);
            if before < expected && tally.count >= expected {
                let _ = heard.send(Heard::AllIn);
            }
        }
    };
    let _ = heard.send(Heard::End {
        result,
        reason: tally.reason,
        latencies: tally.latencies,
    });
}

/// What one connection has heard from the others.
struct Tally {
    /// Lines from the others.
    count: u64,
    /// From a send to its receipt, for one line in `sample`.
    latencies: Option<Histogram<u64>>,
    /// 1, or [`LATENCY_SAMPLE`] for a connection expecting more than
    /// [`TIME_EVERY_LINE_UP_TO`] lines.
    sample: usize,
    /// The server's `error: REASON` line, if it sent one.
    reason: Option<String>,
    /// Marks this connection's own lines, should the server send them back (not deliveries):
    /// `chat CONN `.
    own: memmem::Finder<'static>,
    error: memmem::Finder<'static>,
}

impl Tally {
    /// For connection `conn`, which expects `expected` lines from the others.
    fn new(conn: usize, expected: u64) -> Tally {
        Tally {
            count: 0,
            latencies: latency_histogram(),
            sample: if expected <= TIME_EVERY_LINE_UP_TO {
                1
            } else {
                LATENCY_SAMPLE
            },
            reason: None,
            own: memmem::Finder::new(format!("chat {conn} ").as_bytes()).into_owned(),
            error: memmem::Finder::new(b"error: ").into_owned(),
        }
    }

    /// Counts the complete lines in `text`, received at `now`.
    ///
    /// This is the client's cost per line, and it must stay well below the server's, or a run
    /// measures the client. Going line by line costs more than the server's relaying does
    /// (about 30 ns a line), so `text` is first checked whole, at a few bytes a nanosecond: if
    /// it holds none of this connection's own lines and no `error: `, and as many `h` as lines
    /// (each message has one, in `chat`; a peer as servers write it, an address or `<user5>`,
    /// has none), every line is taken for another connection's message, and they are counted
    /// at once, one in `sample` found by its place to be timed. Anything else (a
    /// notice from the server, two messages run together, a peer with an `h`) is read line by
    /// line. Only a notice and two messages run together in one read would balance and pass:
    /// the load client counts, it does not audit the server's framing.
    fn lines(&mut self, text: &[u8], now: u64) {
        let lines = memchr::memchr_iter(b'\n', text).count();
        let messages_only = memchr::memchr_iter(b'h', text).count() == lines
            && self.own.find(text).is_none()
            && self.error.find(text).is_none();
        if !messages_only {
            self.one_by_one(text, now);
            return;
        }
        // The lines numbered (counting across reads) a multiple of `sample`, as
        // `one_by_one` takes them, each found about where it is: messages are about the same
        // length. Not so many a read: a stall's backlog arrives in a few long reads, and timing
        // a share of each read would leave it to a few samples among the one-line reads after.
        let per_line = text.len() / lines.max(1);
        let first = (self.sample - (self.count % self.sample as u64) as usize) % self.sample;
        for line in (first..lines).step_by(self.sample) {
            let at = (line * per_line + per_line / 2).min(text.len().saturating_sub(1));
            let start = memchr::memrchr(b'\n', &text[..at]).map_or(0, |nl| nl + 1);
            let end = memchr::memchr(b'\n', &text[at..]).map_or(text.len(), |nl| at + nl);
            self.time(&text[start..end], now);
        }
        self.count += lines as u64;
    }

    /// Counts the lines in `text` one by one: the others' messages, and the server's reason.
    fn one_by_one(&mut self, text: &[u8], now: u64) {
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', text) {
            let line = &text[start..end];
            start = end + 1;
            if line.starts_with(b"error: ") {
                self.reason = Some(crate::framing::peer_text(line));
                continue;
            }
            if chat_body(line).is_none() || self.own.find(line).is_some() {
                continue;
            }
            if self.count.is_multiple_of(self.sample as u64) {
                self.time(line, now);
            }
            self.count += 1;
        }
    }

    /// Records how long `line` took from its send to `now`, if it says when it was sent.
    fn time(&mut self, line: &[u8], now: u64) {
        if let Some(sent) = chat_body(line).and_then(stamp)
            && let Some(latencies) = &mut self.latencies
        {
            let _ = latencies.record(now.saturating_sub(sent).max(1));
        }
    }
}

/// Of each connection's lines from the others, one in this many is timed (in a run larger
/// than [`TIME_EVERY_LINE_UP_TO`]).
const LATENCY_SAMPLE: usize = 64;

/// A connection expecting at most this many lines from the others times every one: a small run
/// has few lines to sample from (two connections sending 20 messages at 2 a second would have
/// had one sample each, blind to a stall). No more: timing a line costs some 30 times counting
/// it, and with every line timed 400 connections x 10 messages took 0.46 s instead of 0.38.
const TIME_EVERY_LINE_UP_TO: u64 = 1_024;

/// What follows `chat ` in a relayed line `PEER chat CONN I T...`: `CONN I T...`. (`ncat --chat`
/// puts its `<userN>` only before the first line of each chunk it relays, so the peer is
/// optional.)
fn chat_body(line: &[u8]) -> Option<&[u8]> {
    match line.strip_prefix(b"chat ") {
        Some(body) => Some(body),
        None => {
            // A peer is a few bytes: a plain loop finds its end sooner than `memchr`, whose
            // set-up is worth it only on longer slices (this is the client's cost per line).
            let space = line.iter().position(|&b| b == b' ')?;
            line[space + 1..].strip_prefix(b"chat ")
        }
    }
}

/// The send time `T` in a line's `CONN I T...`.
fn stamp(body: &[u8]) -> Option<u64> {
    let mut fields = body.splitn(3, |&b| b == b' ');
    let (_conn, _i, stamp) = (fields.next()?, fields.next()?, fields.next()?);
    let digits = stamp.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&stamp[..digits]).ok()?.parse().ok()
}

/// The send time in a relayed line.
#[cfg(test)]
fn sent_at(line: &[u8]) -> Option<u64> {
    stamp(chat_body(line)?)
}

/// A histogram for latencies: nanoseconds from 1 ns to 100 s, three significant figures. (`None`
/// only if those bounds were refused, which they are not.)
pub(crate) fn latency_histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{ChatRun, ChatTask, Tally, message, sent_at};

    /// Counts `text` as one read, and line by line: both must agree.
    fn counted(conn: usize, text: &str) -> (u64, u64, Option<String>) {
        let mut at_once = Tally::new(conn, u64::MAX);
        at_once.lines(text.as_bytes(), 1_000);
        let mut by_line = Tally::new(conn, u64::MAX);
        by_line.one_by_one(text.as_bytes(), 1_000);
        assert_eq!(at_once.reason, by_line.reason);
        (at_once.count, by_line.count, at_once.reason)
    }

    #[test]
    fn only_the_others_messages_are_deliveries_however_they_are_counted() {
        let others = "127.0.0.1:5000 chat 1 0 10....\n127.0.0.1:5001 chat 2 0 20....\n";
        assert_eq!(counted(3, others), (2, 2, None));
        // ncat's form: its `<userN>` only before a chunk's first line.
        assert_eq!(
            counted(3, "<user5> chat 1 0 10\nchat 1 1 11\nchat 2 0 12\n"),
            (3, 3, None)
        );
        // Its own lines sent back, notices, and a peer with an `h` are read line by line.
        let own = "127.0.0.1:5000 chat 1 0 10\n127.0.0.1:5003 chat 3 0 10\n";
        assert_eq!(counted(3, own), (1, 1, None));
        let notice = "<announce> <user4> is disconnected.\nchat 1 0 10\n";
        assert_eq!(counted(3, notice), (1, 1, None));
        let host = "host:5000 chat 1 0 10\nhost:5000 chat 1 1 10\n";
        assert_eq!(counted(3, host), (2, 2, None));
        // Two messages run together are one line. (With a notice in the same read, the counts
        // of `h` and lines would balance: that is left to the tests of the server itself.)
        let merged = "127.0.0.1:5000 chat 1 0 10127.0.0.1:5000 chat 1 1 10\nchat 2 0 1\n";
        assert_eq!(counted(3, merged), (2, 2, None));
        let error = "127.0.0.1:5000 chat 1 0 10\nerror: server stopping\n";
        assert_eq!(
            counted(3, error),
            (1, 1, Some("error: server stopping".to_owned()))
        );
    }

    #[test]
    fn lines_counted_at_once_are_timed_too() {
        let mut tally = Tally::new(0, u64::MAX);
        let text: String = (0..200)
            .map(|i| format!("127.0.0.1:5000 chat 1 {i} 400........\n"))
            .collect();
        tally.lines(text.as_bytes(), 1_000);
        assert_eq!(tally.count, 200);
        let latencies = tally.latencies.expect("a histogram");
        // One in 64 of 200 lines: 4 timed, each sent at 400 ns and received at 1,000.
        assert_eq!(latencies.len(), 4);
        assert_eq!(latencies.max(), 600);
    }

    /// With `--rate`, a message made late (the sender held up) still says when it was due, so
    /// its latency counts the wait too.
    #[test]
    fn a_message_is_stamped_with_when_it_was_due() {
        let run = ChatRun::new(1);
        let task = ChatTask {
            conn: 0,
            count: 8,
            interval: Duration::ZERO,
            rate: Some(10.0),
            size: 64,
            connect_timeout: Duration::ZERO,
            linger: Duration::ZERO,
            send_timeout: Duration::ZERO,
            run: &run,
        };
        let due = run.epoch + Duration::from_millis(5);
        let mut buf = Vec::new();
        message(&mut buf, &task, 7, due);
        assert_eq!(buf.len(), 64);
        assert!(buf.starts_with(b"chat 0 7 5000000."), "{buf:?}");
        assert_eq!(sent_at(&buf), Some(5_000_000));
    }

    /// One line in 64 is timed however the lines arrive: a stall's backlog in one long read
    /// weighs as much as the same lines one a read would (it once got one sample a read, so
    /// the one-line reads after a stall outweighed it).
    #[test]
    fn a_backlog_read_at_once_weighs_as_its_lines() {
        let mut tally = Tally::new(0, u64::MAX);
        for i in 0..640 {
            tally.lines(format!("127.0.0.1:5000 chat 1 {i} 900\n").as_bytes(), 1_000);
        }
        let backlog: String = (0..640)
            .map(|i| format!("127.0.0.1:5000 chat 1 {i} 0\n"))
            .collect();
        tally.lines(backlog.as_bytes(), 1_000_000);
        let latencies = tally.latencies.expect("a histogram");
        assert_eq!(tally.count, 1280);
        assert_eq!(latencies.len(), 20);
        // Half the lines waited the stall, and half the samples say so.
        assert_eq!(latencies.count_between(999_000, 1_001_000), 10);
    }

    /// A small run times every line, read at once or line by line.
    #[test]
    fn a_small_run_times_every_line() {
        let mut tally = Tally::new(0, 300);
        let text: String = (0..200)
            .map(|i| format!("127.0.0.1:5000 chat 1 {i} 400........\n"))
            .collect();
        tally.lines(text.as_bytes(), 1_000);
        tally.one_by_one(b"<announce> hi\n127.0.0.1:5000 chat 1 200 400\n", 1_000);
        assert_eq!(tally.count, 201);
        assert_eq!(tally.latencies.expect("a histogram").len(), 201);
    }

    #[test]
    fn the_send_time_is_read_with_or_without_a_peer() {
        assert_eq!(
            sent_at(b"127.0.0.1:5000 chat 3 17 123456....."),
            Some(123_456)
        );
        assert_eq!(sent_at(b"<user5> chat 3 17 99"), Some(99));
        assert_eq!(sent_at(b"chat 3 17 42.."), Some(42));
        assert_eq!(sent_at(b"welcome to plugboard, 127.0.0.1:5000"), None);
        assert_eq!(
            sent_at(b"<announce> 127.0.0.1 is connected as <user5>."),
            None
        );
        assert_eq!(sent_at(b"127.0.0.1:5000 chat 3 17 ..."), None);
    }
}
