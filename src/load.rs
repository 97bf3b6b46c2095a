//! The client's load mode: many connections in parallel, throughput and round-trip latency.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::addr;
use crate::client::{Client, Receiver};
use crate::error::{self, Error};
use crate::fanout::{self, ChatRun, ChatTask, latency_histogram};
use crate::framing::Framing;
use crate::pace::Pace;
use crate::send;
use crate::tls::ClientTls;
use crate::transport::{self, Dialer, Transport};

/// What a load run does.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Connections in parallel, one thread each.
    pub connections: usize,
    /// Messages per connection (unless `duration` is set).
    pub count: u64,
    /// Instead of `count`: each connection sends for this long from its connect, then ends as
    /// it would after its last message. Not with `chat`, whose connections must know how many
    /// messages to expect from the others.
    pub duration: Option<Duration>,
    /// Pause between a connection's messages (zero: as fast as possible).
    pub interval: Duration,
    /// Instead of `interval`: messages per second per connection, sent on a fixed schedule from
    /// the connection's start (with `chat`, from when all have joined) whatever the server does
    /// (open loop). With `rtt` and `chat`, each latency is counted from when its message was
    /// due, not when it went: a stalled server shows in the percentiles as the time every
    /// message waited behind it (no coordinated omission).
    pub rate: Option<f64>,
    /// Connections opened per second (`None`: all at once); the report then gives the connect
    /// latencies (`LoadReport::connect`). Not with `chat`, whose connections join in turn.
    pub connect_rate: Option<f64>,
    /// Message text; `{i}` becomes the message number, `{conn}` the connection's (from 0).
    pub message: String,
    /// Pad each message with `.` to this many bytes on the wire, counting line framing's `\n`.
    pub size: usize,
    /// Framing (`--rtt` needs line framing).
    pub framing: Framing,
    /// Round trips: send one message, wait for its echo, repeat; latencies are recorded.
    pub rtt: bool,
    /// Chat fan-out, against a chat server: every connection joins the room (reads its
    /// greeting) before any sends, then each sends its messages and counts those of the others,
    /// recording the time from each send (with `rate`, from when it was due) to each receipt. A
    /// message is `chat CONN I T` (the connection, the message number, the send time) padded to
    /// `size`; `message` is not used.
    pub chat: bool,
    /// Connect timeout per connection (zero: the operating system's).
    pub connect_timeout: Duration,
    /// After the last message, how long to wait for the server to close (with `rtt`, also how
    /// long to wait for each echo). A connection the server doesn't close in time is an error:
    /// only a clean close confirms that everything sent was printed.
    pub linger: Duration,
    /// A connection whose server takes nothing of what is sent for this long is an error (zero:
    /// no limit).
    pub send_timeout: Duration,
    /// TLS on every connection (`None`: in the clear); each handshake must finish within the
    /// connect timeout.
    pub tls: Option<ClientTls>,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            connections: 1,
            count: 10,
            duration: None,
            interval: Duration::ZERO,
            rate: None,
            connect_rate: None,
            message: "hello world {i}".to_string(),
            size: 0,
            framing: Framing::Line,
            rtt: false,
            chat: false,
            connect_timeout: Duration::from_secs(5),
            linger: Duration::from_secs(2),
            send_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

impl LoadOptions {
    /// The most connections a run may open.
    pub const MAX_CONNECTIONS: usize = 100_000;

    /// The largest message [`size`](LoadOptions::size): a message is built in memory, once per
    /// connection.
    pub const MAX_SIZE: usize = 16 * 1024 * 1024;

    /// The slowest `rate` and `connect_rate`: one every 1,000 s.
    pub const MIN_RATE: f64 = 0.001;

    /// The fastest `rate` and `connect_rate`: one a nanosecond.
    pub const MAX_RATE: f64 = 1e9;

    /// Checks that the options make sense ([`run_load`] does, first): [`Error::Options`] names
    /// the first that doesn't.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |option, problem: String| Err(Error::Options { option, problem });
        if !(1..=Self::MAX_CONNECTIONS).contains(&self.connections) {
            return invalid(
                "connections",
                format!("must be 1 to {}", Self::MAX_CONNECTIONS),
            );
        }
        if self.size > Self::MAX_SIZE {
            return invalid("size", format!("must be at most {} bytes", Self::MAX_SIZE));
        }
        // Padding only lengthens: a size below the longest message would be ignored. (Chat's
        // messages are stamped; their length is the load's business. With `duration` the count
        // is unknown: `count`'s longest is checked, and longer ones later go as they are.)
        if self.size > 0 && !self.chat {
            let last = self
                .message
                .replace("{i}", &self.count.saturating_sub(1).to_string())
                .replace("{conn}", &self.connections.saturating_sub(1).to_string());
            let longest = last.len() + usize::from(self.framing == Framing::Line);
            if self.size < longest {
                return invalid(
                    "size",
                    format!(
                        "{} bytes is less than the message: {last:?} is {longest} bytes on the wire",
                        self.size
                    ),
                );
            }
        }
        if self.framing == Framing::Line && self.message.contains('\n') {
            return invalid(
                "message",
                "can't hold a newline in line framing: it would be two messages".to_string(),
            );
        }
        if self.rtt && self.framing != Framing::Line {
            return invalid("rtt", "needs line framing".to_string());
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return invalid("duration", "must be more than 0".to_string());
        }
        if let Some(rate) = self.rate {
            if !(Self::MIN_RATE..=Self::MAX_RATE).contains(&rate) {
                return invalid("rate", "must be from 0.001 to 1000000000".to_string());
            }
            if !self.interval.is_zero() {
                return invalid("rate", "can't be combined with interval".to_string());
            }
        }
        if let Some(rate) = self.connect_rate {
            if !(Self::MIN_RATE..=Self::MAX_RATE).contains(&rate) {
                return invalid(
                    "connect_rate",
                    "must be from 0.001 to 1000000000".to_string(),
                );
            }
            if self.chat {
                return invalid(
                    "connect_rate",
                    "can't be combined with chat, whose connections join in turn".to_string(),
                );
            }
        }
        if self.chat && self.duration.is_some() {
            return invalid(
                "duration",
                "can't be combined with chat: each connection must know how many messages the others send (use count)"
                    .to_string(),
            );
        }
        if self.chat && self.rtt {
            return invalid("chat", "can't be combined with rtt".to_string());
        }
        if self.chat && self.framing != Framing::Line {
            return invalid("chat", "needs line framing".to_string());
        }
        if (self.rtt || self.chat) && self.linger.is_zero() {
            return invalid(
                "linger",
                "must be more than 0 with rtt or chat: it is how long to wait for what comes back"
                    .to_string(),
            );
        }
        // Two threads a connection; past the kernel's limit on memory maps a thread can't start,
        // and the process would abort.
        if let Some(room) = crate::limits::thread_room(1024)
            && self.connections.saturating_mul(2) > room
        {
            return invalid(
                "connections",
                format!(
                    "{} needs two threads each; vm.max_map_count leaves room for about {} connections here",
                    self.connections,
                    room / 2
                ),
            );
        }
        Ok(())
    }
}

/// Round-trip latency percentiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Slowest.
    pub max: Duration,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        let at = |q: f64| Duration::from_nanos(histogram.value_at_quantile(q));
        Latency {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_nanos(histogram.max()),
        }
    }
}

/// What a load run measured.
#[derive(Debug)]
pub struct LoadReport {
    /// Connections attempted.
    pub connections: usize,
    /// Messages sent.
    pub messages: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// From the first connect to the last connection's close (with `chat`, from the moment all
    /// had joined).
    pub elapsed: Duration,
    /// Connections that failed (connect, send or receive).
    pub errors: usize,
    /// The first failure, if any.
    pub first_error: Option<Error>,
    /// With `rtt`: round-trip latencies; with `chat`: delivery latencies, from a send to its
    /// receipt at each other connection.
    pub latency: Option<Latency>,
    /// With `chat`: messages received from the other connections (all of them, when every
    /// connection joined: `connections × (connections − 1) × count`).
    pub delivered: Option<u64>,
    /// With `connect_rate`: how long connecting took (TCP, and the TLS handshake under TLS).
    pub connect: Option<Latency>,
}

impl LoadReport {
    /// Messages per second.
    pub fn messages_per_sec(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Megabytes (10^6 bytes) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line of JSON, for scripts.
    pub fn to_json(&self) -> String {
        let mut json = format!(
            "{{\"connections\":{},\"messages\":{},\"bytes\":{},\"elapsed_s\":{:.6},\"messages_per_s\":{:.1},\"mb_per_s\":{:.3},\"errors\":{}",
            self.connections,
            self.messages,
            self.bytes,
            self.elapsed.as_secs_f64(),
            self.messages_per_sec(),
            self.mb_per_sec(),
            self.errors
        );
        if let Some(delivered) = self.delivered {
            json.push_str(&format!(",\"delivered\":{delivered}"));
        }
        if let Some(error) = &self.first_error {
            json.push_str(",\"first_error\":");
            json_string(&mut json, &error::chain(error));
        }
        if let Some(l) = self.latency {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            json.push_str(&format!(
                ",\"latency_us\":{{\"p50\":{:.1},\"p90\":{:.1},\"p99\":{:.1},\"p999\":{:.1},\"max\":{:.1}}}",
                us(l.p50),
                us(l.p90),
                us(l.p99),
                us(l.p999),
                us(l.max)
            ));
        }
        if let Some(c) = self.connect {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            json.push_str(&format!(
                ",\"connect_us\":{{\"p50\":{:.1},\"p90\":{:.1},\"p99\":{:.1},\"p999\":{:.1},\"max\":{:.1}}}",
                us(c.p50),
                us(c.p90),
                us(c.p99),
                us(c.p999),
                us(c.max)
            ));
        }
        json.push('}');
        json
    }
}

/// Appends `text` as a JSON string.
fn json_string(json: &mut String, text: &str) {
    json.push('"');
    for c in text.chars() {
        match c {
            '"' => json.push_str("\\\""),
            '\\' => json.push_str("\\\\"),
            c if c < ' ' => json.push_str(&format!("\\u{:04x}", c as u32)),
            c => json.push(c),
        }
    }
    json.push('"');
}

impl std::fmt::Display for LoadReport {
    /// The summary line: counts, rates, errors, and round-trip percentiles if measured.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::unstable::plural;
        write!(
            f,
            "{}, {}, {} in {:.3} s: {:.0} messages/s, {:.1} MB/s, {}",
            plural(self.connections as u64, "connection"),
            plural(self.messages, "message"),
            plural(self.bytes, "byte"),
            self.elapsed.as_secs_f64(),
            self.messages_per_sec(),
            self.mb_per_sec(),
            plural(self.errors as u64, "error")
        )?;
        if let Some(error) = &self.first_error {
            write!(f, " (first: {})", error::chain(error))?;
        }
        if let Some(delivered) = self.delivered {
            write!(
                f,
                "; {delivered} delivered to the others, {:.0}/s",
                delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
            )?;
        }
        if let Some(l) = self.latency {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            let what = if self.delivered.is_some() {
                "delivery"
            } else {
                "round trip"
            };
            write!(
                f,
                "; {what} p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
                us(l.p50),
                us(l.p90),
                us(l.p99),
                us(l.p999),
                us(l.max)
            )?;
        }
        if let Some(c) = self.connect {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            write!(
                f,
                "; connect p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us",
                us(c.p50),
                us(c.p90),
                us(c.p99),
                us(c.max)
            )?;
        }
        Ok(())
    }
}

/// Messages sent so far by a running load, for a progress line.
#[derive(Debug, Default)]
pub struct Progress {
    messages: AtomicU64,
}

impl Progress {
    /// Messages sent so far.
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// What one connection did.
struct Outcome {
    messages: u64,
    bytes: u64,
    /// Chat: messages from the others received.
    delivered: u64,
    error: Option<Error>,
    latencies: Option<Histogram<u64>>,
    /// How long its connect took, if it connected.
    connect: Option<Duration>,
}

/// Runs the load against `host:port` and reports it. Connection failures are counted, not fatal;
/// only an unresolvable host is an error.
pub fn run_load(
    host: &str,
    port: u16,
    options: &LoadOptions,
    progress: &Arc<Progress>,
) -> Result<LoadReport, Error> {
    run_load_across(&[(host, port)], options, progress)
}

/// [`run_load`] with its connections spread over several servers, in turn: connection `i` goes
/// to `servers[i % servers.len()]`. In chat mode (`LoadOptions::chat`) every connection still
/// expects every other's messages: servers that share a room (`--chat-bus`) deliver them.
pub fn run_load_across(
    servers: &[(&str, u16)],
    options: &LoadOptions,
    progress: &Arc<Progress>,
) -> Result<LoadReport, Error> {
    options.validate()?;
    if servers.is_empty() {
        return Err(Error::Options {
            option: "servers",
            problem: "needs at least one server".to_string(),
        });
    }
    let dialers = servers
        .iter()
        .map(|&(host, port)| {
            Ok(Dialer::new(
                addr::resolve(host, port)?,
                host,
                options.tls.clone(),
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let started = Instant::now();
    let chat = options
        .chat
        .then(|| Arc::new(ChatRun::new(options.connections)));
    let threads: Vec<_> = (0..options.connections)
        .map(|conn| {
            let mut options = options.clone();
            // `{conn}` is the connection's number, fixed for it: replaced once, here.
            options.message = options.message.replace("{conn}", &conn.to_string());
            let dialer = dialers[conn % dialers.len()].clone();
            let progress = Arc::clone(progress);
            let chat = chat.clone();
            // With a connect rate, connection `conn` opens at its time on the schedule.
            let opens = options
                .connect_rate
                .map(|rate| started + Duration::from_secs_f64(conn as f64 / rate));
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    if let Some(opens) = opens {
                        thread::sleep(opens.saturating_duration_since(Instant::now()));
                    }
                    match chat {
                        Some(run) => chat_connection(&dialer, conn, &options, &run, &progress),
                        None => one_connection(&dialer, &options, &progress),
                    }
                })
        })
        .collect();
    if let Some(run) = &chat {
        // Joins take turns, and the start line waits for every connection: not for those whose
        // thread didn't start.
        for (conn, _) in threads.iter().enumerate().filter(|(_, t)| t.is_err()) {
            run.absent(conn);
        }
    }
    let mut report = LoadReport {
        connections: options.connections,
        messages: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
        latency: None,
        delivered: chat.as_ref().map(|_| 0),
        connect: None,
    };
    let mut latencies: Option<Histogram<u64>> = None;
    let mut connects = fanout::latency_histogram();
    for thread in threads {
        let outcome = match thread
            .map_err(Error::Thread)
            .and_then(|t| t.join().map_err(|_| Error::Panicked("a load thread")))
        {
            Ok(outcome) => outcome,
            Err(error) => Outcome {
                messages: 0,
                bytes: 0,
                delivered: 0,
                error: Some(error),
                latencies: None,
                connect: None,
            },
        };
        if let (Some(all), Some(took)) = (&mut connects, outcome.connect) {
            let _ = all.record(took.as_nanos().max(1) as u64);
        }
        report.messages += outcome.messages;
        if let Some(delivered) = &mut report.delivered {
            *delivered += outcome.delivered;
        }
        report.bytes += outcome.bytes;
        if let Some(error) = outcome.error {
            report.errors += 1;
            report.first_error.get_or_insert(error);
        }
        if let Some(h) = outcome.latencies {
            match &mut latencies {
                Some(all) => {
                    let _ = all.add(&h);
                }
                None => latencies = Some(h),
            }
        }
    }
    // A chat run counts from its start line: the joins, one after another, are not the load.
    let started = chat.and_then(|run| run.started()).unwrap_or(started);
    report.elapsed = started.elapsed();
    report.latency = latencies.filter(|h| !h.is_empty()).map(|h| Latency::of(&h));
    if options.connect_rate.is_some() {
        report.connect = connects.filter(|h| !h.is_empty()).map(|h| Latency::of(&h));
    }
    Ok(report)
}

/// Whether a connection has more to send: `count` messages, or until `duration` has passed
/// since it began.
struct More {
    count: u64,
    until: Option<Instant>,
}

impl More {
    fn new(options: &LoadOptions) -> More {
        More {
            count: options.count,
            until: options.duration.map(|d| Instant::now() + d),
        }
    }

    /// Whether to send another after `sent` messages.
    fn after(&self, sent: u64) -> bool {
        match self.until {
            Some(until) => Instant::now() < until,
            None => sent < self.count,
        }
    }
}

/// The message template, split once at each `{i}`, so that writing message `i` is a few copies:
/// the load generator shares the machine with the server it measures.
struct Template {
    /// The text between the `{i}`s (one more part than there are `{i}`s).
    parts: Vec<Vec<u8>>,
    size: usize,
    newline: bool,
}

impl Template {
    fn new(options: &LoadOptions) -> Template {
        Template {
            parts: options
                .message
                .split("{i}")
                .map(|part| part.as_bytes().to_vec())
                .collect(),
            size: options.size,
            newline: options.framing == Framing::Line,
        }
    }

    /// Appends message `i`: the template with `{i}` filled in, padded with `.` to `size` bytes on
    /// the wire (never cut). Allocates nothing once `out` has grown.
    fn write(&self, i: u64, out: &mut Vec<u8>) {
        let start = out.len();
        let mut digits = [0u8; 20]; // u64::MAX has 20
        let number = decimal(i, &mut digits);
        for (n, part) in self.parts.iter().enumerate() {
            if n > 0 {
                out.extend_from_slice(number);
            }
            out.extend_from_slice(part);
        }
        let newline = usize::from(self.newline);
        let len = out.len() - start + newline;
        if len < self.size {
            out.resize(out.len() + self.size - len, b'.');
        }
        if self.newline {
            out.push(b'\n');
        }
    }
}

/// Messages 0, 1, 2, ... of a template. Each is made from the one before by counting up its digits
/// where they are, so a message costs one copy; the line is rebuilt only when the number grows a
/// digit.
struct Messages<'t> {
    template: &'t Template,
    /// The number of the message in `line`.
    number: u64,
    line: Vec<u8>,
    /// Where each copy of the number starts in `line`.
    starts: Vec<usize>,
    digits: usize,
}

impl<'t> Messages<'t> {
    fn new(template: &'t Template) -> Messages<'t> {
        let mut messages = Messages {
            template,
            number: 0,
            line: Vec::new(),
            starts: Vec::new(),
            digits: 0,
        };
        messages.build();
        messages
    }

    fn build(&mut self) {
        self.line.clear();
        self.template.write(self.number, &mut self.line);
        self.digits = decimal(self.number, &mut [0; 20]).len();
        self.starts.clear();
        let mut at = 0;
        for part in &self.template.parts[..self.template.parts.len() - 1] {
            at += part.len();
            self.starts.push(at);
            at += self.digits;
        }
    }

    /// Message `number`, with its newline in line framing: quickest when it is one more than the
    /// last.
    fn get(&mut self, number: u64) -> &[u8] {
        if number != self.number {
            let counted = self.number.checked_add(1) == Some(number) && self.count_up();
            self.number = number;
            if !counted {
                self.build();
            }
        }
        &self.line
    }

    /// Adds one to the number in `line`, unless that needs one more digit (`false`).
    fn count_up(&mut self) -> bool {
        let Some(&first) = self.starts.first() else {
            return true; // no number in the message
        };
        let number = first..first + self.digits;
        let Some(last) = self.line[number.clone()].iter().rposition(|&d| d != b'9') else {
            return false; // all nines
        };
        self.line[first + last] += 1;
        self.line[first + last + 1..number.end].fill(b'0');
        for &start in &self.starts[1..] {
            self.line.copy_within(number.clone(), start);
        }
        true
    }
}

/// `n` in decimal, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// One connection of a chat run (see [`fanout`]).
fn chat_connection(
    dialer: &Dialer,
    conn: usize,
    options: &LoadOptions,
    run: &ChatRun,
    progress: &Progress,
) -> Outcome {
    let task = ChatTask {
        conn,
        count: options.count,
        interval: options.interval,
        rate: options.rate,
        size: options.size,
        connect_timeout: options.connect_timeout,
        linger: options.linger,
        send_timeout: options.send_timeout,
        run,
    };
    let chat = fanout::chat_connection(dialer, &task, &progress.messages);
    Outcome {
        messages: chat.sent,
        bytes: chat.bytes,
        delivered: chat.delivered,
        error: chat.error,
        latencies: chat.latencies,
        connect: None,
    }
}

fn one_connection(dialer: &Dialer, options: &LoadOptions, progress: &Progress) -> Outcome {
    let mut outcome = Outcome {
        messages: 0,
        bytes: 0,
        delivered: 0,
        error: None,
        latencies: None,
        connect: None,
    };
    let dialing = Instant::now();
    let (stream, peer) = match dialer.connect(options.connect_timeout) {
        Ok(connected) => {
            outcome.connect = Some(dialing.elapsed());
            connected
        }
        Err(e) => {
            outcome.error = Some(e);
            return outcome;
        }
    };
    let result = if options.rtt {
        round_trips(stream, peer, options, progress, &mut outcome)
    } else {
        stream_messages(stream, peer, options, progress, &mut outcome)
    };
    if let Err(e) = result {
        outcome.error = Some(e);
    }
    outcome
}

/// How the server's side of a connection ended, as the thread reading it saw it.
struct Drained {
    /// `Ok` for a clean close; the failure (a reset) otherwise.
    result: io::Result<()>,
    /// The server's `error: ` line, if the last line it sent was one. Kept after what looked
    /// like a clean close too: when a send on the other thread took the reset's error first,
    /// the read sees only the end.
    reason: Option<String>,
}

impl Drained {
    /// The server's reason, as the connection's error, if it gave one.
    fn reason(self, addr: SocketAddr) -> Option<Error> {
        self.reason.map(|reason| Error::Ended { addr, reason })
    }

    /// The end as the connection's result: a clean close is success, a reset its failure (said
    /// with the server's reason, if it gave one).
    fn result(self, addr: SocketAddr) -> Result<(), Error> {
        match self.result {
            Ok(()) => Ok(()),
            Err(source) => Err(self
                .reason
                .map(|reason| Error::Ended { addr, reason })
                .unwrap_or(Error::Connection { addr, source })),
        }
    }
}

/// Reads and drops what the server sends until it closes or fails; keeps the last line if it is
/// an `error: ` line, as the server's reason.
fn drain(stream: &Transport) -> Drained {
    let mut buf = vec![0; 64 * 1024];
    let mut last = 0;
    let result = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => last = n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    // The reason is one short line, the last thing sent: in the last read, as a rule.
    let reason = error_line(&buf[..last]);
    Drained { result, reason }
}

/// The last complete line of `bytes`, if it is a server's `error: ` line.
fn error_line(bytes: &[u8]) -> Option<String> {
    let text = bytes.strip_suffix(b"\n")?;
    let start = memchr::memrchr(b'\n', text).map_or(0, |at| at + 1);
    let line = &text[start..];
    line.starts_with(b"error: ")
        .then(|| crate::framing::peer_text(line))
}

/// The failure of a connection that broke (`error`), said with the server's reason if the last
/// line it sent was one.
fn broke(addr: SocketAddr, reason: Option<String>, error: Error) -> Error {
    match reason {
        Some(reason) => Error::Ended { addr, reason },
        None => error,
    }
}

/// Sends every message (batched into large writes when there is no interval) while a second
/// thread drains what the server sends; then half-closes and waits for the server to close, so
/// the time counts until the server has read everything, and a clean close confirms that it
/// printed everything.
fn stream_messages(
    stream: Transport,
    peer: SocketAddr,
    options: &LoadOptions,
    progress: &Progress,
    outcome: &mut Outcome,
) -> Result<(), Error> {
    let broken = |source| Error::Connection { addr: peer, source };
    let send_timeout =
        send::set_send_timeout(stream.tcp(), Some(options.send_timeout)).map_err(broken)?;
    let send =
        |stream: &Transport, bytes: &[u8]| transport::send_to(stream, peer, bytes, send_timeout);
    let stream = Arc::new(stream);
    let (closed_tx, closed) = mpsc::channel();
    let drain_stream = Arc::clone(&stream);
    thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || {
            let _ = closed_tx.send(drain(&drain_stream));
        })
        .map_err(Error::Thread)?;
    // Whatever ends the connection first, the server's reason says most: a send that failed
    // because the server reset the connection waits for the reason it may have sent first.
    let send_failed = |error: Error| -> Error {
        if matches!(error, Error::SendTimeout { .. }) {
            return error;
        }
        closed
            .recv_timeout(options.linger)
            .ok()
            .and_then(|drained| drained.reason(peer))
            .unwrap_or(error)
    };

    let template = Template::new(options);
    let mut messages = Messages::new(&template);
    let mut buf = Vec::with_capacity(128 * 1024);
    let mut pending = 0u64;
    let more = More::new(options);
    let pace = Pace::new(options.interval, options.rate);
    let mut i = 0;
    while more.after(i) {
        // Paced, each message went when it was made: nothing is left in `buf` at a break.
        if pace.wait(i, more.until).is_none() {
            break;
        }
        buf.extend_from_slice(messages.get(i));
        pending += 1;
        i += 1;
        if buf.len() >= 64 * 1024 || pace.is_paced() || !more.after(i) {
            send(&stream, &buf).map_err(send_failed)?;
            outcome.messages += pending;
            outcome.bytes += buf.len() as u64;
            progress.messages.fetch_add(pending, Ordering::Relaxed);
            buf.clear();
            pending = 0;
        }
    }
    // Asked before our own close: after it, the server's close is the confirmation. The drain
    // thread may have seen the server's end already: on Windows, where the socket can't be
    // looked at without reading, that is the only way to tell.
    let drained_early = match closed.try_recv() {
        Ok(drained) if drained.result.is_err() => return drained.result(peer),
        Ok(drained) => Some(drained),
        Err(_) => None,
    };
    let early = drained_early.is_some() || crate::client::closed_early(stream.tcp());
    transport::finish_sending(&stream, send_timeout)
        .map_err(|source| send_failed(broken(source)))?;
    match drained_early.map_or_else(|| closed.recv_timeout(options.linger), Ok) {
        Ok(Drained { result: Ok(()), .. }) if early => Err(Error::ClosedEarly { addr: peer }),
        Ok(drained) => drained.result(peer),
        Err(RecvTimeoutError::Disconnected) => {
            Err(broken(io::Error::other("its reader thread ended")))
        }
        Err(RecvTimeoutError::Timeout) => {
            let _ = stream.tcp().shutdown(Shutdown::Both);
            Err(Error::Unconfirmed {
                addr: peer,
                waited: options.linger,
            })
        }
    }
}

/// Sends one message, waits for the same line to come back, records the time, repeats; at the
/// end half-closes and waits for the server's clean close.
fn round_trips(
    stream: Transport,
    peer: SocketAddr,
    options: &LoadOptions,
    progress: &Progress,
    outcome: &mut Outcome,
) -> Result<(), Error> {
    let broken = |source| Error::Connection { addr: peer, source };
    // An echo that never comes (not an echo server) ends the run instead of hanging it.
    stream
        .tcp()
        .set_read_timeout(Some(options.linger))
        .map_err(broken)?;
    stream.tcp().set_nodelay(true).map_err(broken)?;
    let mut client = Client::from_transport(stream, peer).with_framing(Framing::Line);
    let send_timeout = (!options.send_timeout.is_zero()).then_some(options.send_timeout);
    client.set_send_timeout(send_timeout)?;
    let mut replies = client.receiver();
    let mut histogram = latency_histogram();
    let template = Template::new(options);
    let mut messages = Messages::new(&template);
    let mut line = Vec::new();
    // The last `error: ` line the server sent: its reason, if it then ends the connection.
    let mut reason: Option<String> = None;
    let timed_out = |source: &io::Error| {
        matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };
    let more = More::new(options);
    let pace = Pace::new(options.interval, options.rate);
    let mut i = 0;
    while more.after(i) {
        let Some(due) = pace.wait(i, more.until) else {
            break;
        };
        line.clear();
        line.extend_from_slice(messages.get(i));
        let expected = std::str::from_utf8(&line[..line.len() - 1]).unwrap_or_default();
        let sent = Instant::now();
        if let Err(e) = client.write_unframed(&line) {
            return Err(broke(peer, until_end(&mut replies, reason), e));
        }
        // Anything before our echo (a greeting) is skipped.
        loop {
            match replies.next() {
                Some(Ok(reply)) if reply == expected => break,
                Some(Ok(reply)) => {
                    reason = reply.starts_with("error: ").then_some(reply);
                }
                Some(Err(Error::Connection { source, .. })) if timed_out(&source) => {
                    return Err(Error::NoEcho {
                        addr: peer,
                        message: i,
                        waited: Some(options.linger),
                    });
                }
                Some(Err(e)) => return Err(broke(peer, reason, e)),
                None => {
                    return Err(Error::NoEcho {
                        addr: peer,
                        message: i,
                        waited: None,
                    });
                }
            }
        }
        if let Some(histogram) = &mut histogram {
            // From when it was due: a message held up behind a slow one waited too.
            let waited = sent.min(due).elapsed();
            let _ = histogram.record(waited.as_nanos().max(1) as u64);
        }
        outcome.messages += 1;
        outcome.bytes += line.len() as u64;
        progress.messages.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    outcome.latencies = histogram;
    if client.closed_early() {
        return Err(Error::ClosedEarly { addr: peer });
    }
    if let Err(e) = client.finish() {
        return Err(broke(peer, until_end(&mut replies, reason), e));
    }
    // The clean close confirms that everything was printed.
    loop {
        match replies.next() {
            None => return Ok(()),
            Some(Ok(reply)) => reason = reply.starts_with("error: ").then_some(reply),
            Some(Err(Error::Connection { source, .. })) if timed_out(&source) => {
                return Err(Error::Unconfirmed {
                    addr: peer,
                    waited: options.linger,
                });
            }
            Some(Err(e)) => return Err(broke(peer, reason, e)),
        }
    }
}

/// After a failed send: reads what the server still sent, for its reason (the last `error: `
/// line).
fn until_end(replies: &mut Receiver, mut reason: Option<String>) -> Option<String> {
    for reply in replies.by_ref() {
        match reply {
            Ok(reply) => reason = reply.starts_with("error: ").then_some(reply),
            Err(_) => break,
        }
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rates outside what a schedule can hold are refused, not a panic later (one message
    /// every 1e20 s is more than a `Duration` holds).
    #[test]
    fn rates_are_checked() {
        for rate in [0.0, 1e-20, 1e-300, 1e10, f64::NAN, f64::INFINITY, -1.0] {
            for chat in [false, true] {
                let options = LoadOptions {
                    rate: Some(rate),
                    chat,
                    ..LoadOptions::default()
                };
                assert!(options.validate().is_err(), "rate {rate}");
            }
            let options = LoadOptions {
                connect_rate: Some(rate),
                ..LoadOptions::default()
            };
            assert!(options.validate().is_err(), "connect rate {rate}");
        }
        for rate in [LoadOptions::MIN_RATE, 1.0, LoadOptions::MAX_RATE] {
            let options = LoadOptions {
                rate: Some(rate),
                connect_rate: Some(rate),
                ..LoadOptions::default()
            };
            assert!(options.validate().is_ok(), "rate {rate}");
        }
    }

    #[test]
    fn messages_are_padded_to_size_on_the_wire() {
        let options = LoadOptions {
            size: 20,
            ..LoadOptions::default()
        };
        let mut out = Vec::new();
        Template::new(&options).write(7, &mut out);
        assert_eq!(out, b"hello world 7......\n");
        assert_eq!(out.len(), 20);
        let mut longer = Vec::new();
        Template::new(&LoadOptions { size: 3, ..options }).write(7, &mut longer);
        assert_eq!(longer, b"hello world 7\n", "never cut");
        let mut twice = Vec::new();
        let options = LoadOptions {
            message: "{i}-{i} 我".to_string(),
            ..LoadOptions::default()
        };
        Template::new(&options).write(42, &mut twice);
        assert_eq!(twice, "42-42 我\n".as_bytes());
        for n in [0, 9, 10, 1_000_000, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn counting_up_in_place_gives_each_message() {
        for (message, size) in [
            ("hello world {i}", 20),
            ("{i}:{i} 我", 0),
            ("no number", 12),
        ] {
            let template = Template::new(&LoadOptions {
                message: message.to_string(),
                size,
                ..LoadOptions::default()
            });
            let mut messages = Messages::new(&template);
            // In order across digit changes, then out of order.
            for i in (0..1_100).chain([5, 99_999, 100_000, 7, 7, u64::MAX - 1, u64::MAX]) {
                let mut expected = Vec::new();
                template.write(i, &mut expected);
                assert_eq!(messages.get(i), &expected[..], "message {i} of {message:?}");
            }
        }
    }

    #[test]
    fn json_has_every_field() {
        let report = LoadReport {
            connections: 2,
            messages: 10,
            bytes: 640,
            elapsed: Duration::from_millis(500),
            errors: 0,
            first_error: None,
            latency: Some(Latency {
                p50: Duration::from_micros(50),
                p90: Duration::from_micros(60),
                p99: Duration::from_micros(70),
                p999: Duration::from_micros(80),
                max: Duration::from_micros(90),
            }),
            delivered: Some(10),
            connect: Some(Latency {
                p50: Duration::from_micros(5),
                p90: Duration::from_micros(6),
                p99: Duration::from_micros(7),
                p999: Duration::from_micros(8),
                max: Duration::from_micros(9),
            }),
        };
        assert_eq!(
            report.to_json(),
            "{\"connections\":2,\"messages\":10,\"bytes\":640,\"elapsed_s\":0.500000,\"messages_per_s\":20.0,\"mb_per_s\":0.001,\"errors\":0,\"delivered\":10,\"latency_us\":{\"p50\":50.0,\"p90\":60.0,\"p99\":70.0,\"p999\":80.0,\"max\":90.0},\"connect_us\":{\"p50\":5.0,\"p90\":6.0,\"p99\":7.0,\"p999\":8.0,\"max\":9.0}}"
        );
    }
}
