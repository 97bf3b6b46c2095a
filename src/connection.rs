//! One client's thread: greet, read, frame, deliver, apply the limits, and end the connection the
//! way the delivery contract says: a clean close only after the client's end of stream was read
//! and everything before it printed; otherwise the reason and a reset (see `stream`).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::context::Context;
use crate::framing::{Batch, Decoder, Framing, LineTooLong};
use crate::options::Mode;
use crate::proxy::{HeaderError, Origin};
use crate::room::Seat;
use crate::send::{self, SendError, is_timeout};
use crate::stream::{LINGER_AFTER_ERROR, STOPPING, Stream};
use crate::transport::HandshakeError;

/// The first read size; once a read fills it, reads are of [`MAX_READ`] (while the buffer budget
/// allows) until the client goes quiet, so an idle client costs little and a streaming one gets
/// large reads.
const FIRST_READ: usize = 1024;
const MAX_READ: usize = crate::framing::LARGE_BUFFER;

/// A connection whose buffers grew gives them back once its client has sent nothing for this
/// long.
const QUIET: Duration = Duration::from_secs(1);

/// Bytes of buffers a connection holds without drawing on the server's buffer budget: its five
/// buffers (read, line ends, unfinished line, copy, echo) at their small size (4 KiB each, see
/// `framing`), so 1 KiB reads and lines of up to 4 KiB never need the budget. Anything larger
/// is 64 KiB or more, and does.
const ALLOWANCE: usize = 20 * 1024;

/// A connection holding more than this gives its buffers back after [`QUIET`].
const QUIET_SIZE: usize = 4 * 1024;

/// How a connection ended.
enum End {
    /// The client closed its side, and everything it sent was handed to the sink.
    Closed,
    /// Cut by the server's stop.
    Stopped,
    /// Chat: cut off for not reading what the room sends it.
    Evicted,
    /// The connection failed (reset, ...).
    Failed(io::Error),
    /// No complete message for the idle timeout.
    Idle,
    /// A line over the limit.
    TooLong(LineTooLong),
    /// Echo: the client took nothing sent to it within the send timeout.
    NotReading,
    /// The sink could not take the messages.
    OutputFailed,
    /// An unfinished line the buffer budget could not hold.
    Busy,
}

/// What one connection counted, for its last log line (the server's totals are counted as they
/// come, so that a connection given up on at a stop is in them too).
#[derive(Default)]
struct Counts {
    /// Complete messages read.
    messages: u64,
    /// Of those, messages the sink refused.
    refused: u64,
    bytes: u64,
}

/// Serves one client until it leaves, breaks a limit, or the server stops.
pub(crate) fn serve(ctx: &Arc<Context>, id: u64, stream: &Arc<Stream>) {
    let options = &ctx.options;
    if let Err(e) = stream.prepare(options.send_timeout, options.mode != Mode::Log) {
        warn!("{}: cannot set up its socket: {e}; closing", stream.peer());
        stream.tell_now("server busy");
        return;
    }
    if options.trusted_proxies.is_some() && !proxy_header(ctx, stream) {
        return;
    }
    let peer = stream.peer();
    if stream.is_tls() && !handshake(ctx, stream) {
        return;
    }
    let greeting = options.greeting.as_ref().map(|greeting| {
        let mut text = greeting.replace("{peer}", &peer.to_string());
        if options.framing == Framing::Line {
            text.push('\n');
        }
        text
    });
    let mut counts = Counts::default();
    let (end, mut relay) = match Relay::start(ctx, id, stream, greeting) {
        Ok(mut relay) => {
            let mut reading = Reading::new(ctx, stream);
            let end = reading.run(&mut relay, &mut counts);
            reading.give_back();
            (end, Some(relay))
        }
        Err(end) => (end, None),
    };
    let end = match end {
        End::Closed => finish_cleanly(ctx, stream, relay.take()),
        end => end,
    };
    if let Some(relay) = relay {
        relay.finish(ctx, false);
    }
    log_end(stream, &end, &counts);
    match end {
        End::Closed => stream.close_cleanly(options.send_timeout),
        End::Stopped => stream.tell_before_reset(STOPPING),
        End::OutputFailed => stream.tell_before_reset("server output failed"),
        End::Idle => stream.refuse("idle timeout", LINGER_AFTER_ERROR),
        End::TooLong(e) => stream.refuse(&e.to_string(), LINGER_AFTER_ERROR),
        End::Busy => stream.refuse("server busy (buffers full)", LINGER_AFTER_ERROR),
        // Nothing to say that the client would read: the reset says it.
        End::Evicted | End::NotReading | End::Failed(_) => {}
    }
}

/// Behind a proxy: reads the PROXY protocol header, judges the client it names by
/// `--allow`/`--deny`, and (in the clear) logs it connected; false (logged, and the connection
/// refused) if the header was missing, malformed or late, the client is not allowed, or a stop
/// cut it short. Refusals say why in the clear; under TLS there is no session yet to say it in.
#[inline(never)]
fn proxy_header(ctx: &Context, stream: &Stream) -> bool {
    let proxy = stream.connection_peer();
    let refuse = |reason: &str| {
        if !stream.is_tls() {
            stream.refuse(reason, LINGER_AFTER_ERROR);
        }
    };
    match stream.read_proxy_header(ctx.options.proxy_header_timeout) {
        Ok(origin) => {
            let peer = stream.peer();
            if !ctx.options.access.permits(peer.ip()) {
                info!("{peer} refused: not allowed by --allow/--deny (via proxy {proxy})");
                refuse("not allowed");
                return false;
            }
            match origin {
                // A health check, most likely: logged at the debug level.
                Origin::Local => debug!("{peer} connected ({})", via(stream, origin)),
                Origin::Client(_) if !stream.is_tls() => {
                    info!("{peer} connected ({})", via(stream, origin));
                }
                Origin::Client(_) => {} // logged after the handshake
            }
            true
        }
        Err(_) if stream.was_cut() => {
            debug!("{proxy}: cut off by the server stop before its PROXY protocol header");
            false
        }
        Err(HeaderError::Closed(0)) => {
            // Connected and closed without a byte: a port probe, such as a plain TCP health
            // check. Nothing was refused.
            debug!("{proxy}: closed before sending anything");
            false
        }
        Err(e) => {
            ctx.add_proxy_header_failed();
            warn!("{proxy} refused: {e}");
            match e {
                HeaderError::NotProxy | HeaderError::Malformed(_) => {
                    refuse("PROXY protocol header expected");
                }
                HeaderError::Timeout(_) => refuse("no PROXY protocol header in time"),
                HeaderError::Closed(_) | HeaderError::Io(_) => {}
            }
            false
        }
    }
}

/// How a proxied connection came, for its `connected` line.
fn via(stream: &Stream, origin: Origin) -> String {
    match origin {
        Origin::Client(_) => format!("via proxy {}", stream.connection_peer()),
        Origin::Local => "the proxy's own connection".to_string(),
    }
}

/// Runs the client's TLS handshake and logs it connected; false (counted, logged, and the
/// connection reset) if the handshake failed, timed out, or a stop cut it short.
#[inline(never)]
fn handshake(ctx: &Context, stream: &Stream) -> bool {
    let peer = stream.peer();
    match stream.handshake(ctx.options.tls_handshake_timeout) {
        Ok(()) => {
            let tls = stream.tls_description().unwrap_or_default();
            match stream.proxy_origin() {
                Some(origin) => info!("{peer} connected ({tls}, {})", via(stream, origin)),
                None => info!("{peer} connected ({tls})"),
            }
            true
        }
        Err(_) if stream.was_cut() => {
            debug!("{peer}: cut off by the server stop during its TLS handshake");
            false
        }
        Err(e) if stream.proxy_origin() == Some(Origin::Local) => {
            // A load balancer's health check: it connects, sends its header, and goes.
            debug!(
                "{peer}: the proxy's own connection ended: {}",
                e.describe(true)
            );
            false
        }
        Err(e) => {
            ctx.add_handshake_failed();
            info!("{peer}: {}", e.describe(true));
            match e {
                // It speaks in the clear, so it can read why in the clear.
                HandshakeError::NotTls => stream.refuse_in_clear(
                    "this server speaks TLS only (client --tls)",
                    LINGER_AFTER_ERROR,
                ),
                // The alert that says why is sent: time to read it before the reset.
                HandshakeError::Tls(_) => stream.linger(LINGER_AFTER_ERROR),
                HandshakeError::Timeout(_) | HandshakeError::Closed | HandshakeError::Io(_) => {}
            }
            false
        }
    }
}

/// The client closed its side: sends what the room queued for it, waits until everything it
/// sent is written out, and says whether the connection may now close cleanly.
fn finish_cleanly(ctx: &Context, stream: &Stream, relay: Option<Relay>) -> End {
    if let Some(relay) = relay {
        relay.finish(ctx, true);
    }
    if stream.was_broken() {
        // Reset while the room sent to it: nothing to confirm to.
        return End::Failed(io::ErrorKind::ConnectionReset.into());
    }
    if stream.was_cut() && !ctx.is_stopping() {
        // Chat: the room gave up on sending to it meanwhile. (A stop's cut, after the client's
        // end was read, changes nothing: what it sent is still to be confirmed.)
        return End::Evicted;
    }
    match ctx.sink.flush() {
        Ok(()) => End::Closed,
        Err(e) => output_end(ctx, &e),
    }
}

/// How a failure of the sink ends a connection: a stop that gave up waiting for the output, or
/// an output that failed.
fn output_end(ctx: &Context, error: &io::Error) -> End {
    ctx.output_failed(error);
    if error.kind() == io::ErrorKind::TimedOut && ctx.is_stopping() {
        End::Stopped
    } else {
        End::OutputFailed
    }
}

/// Logs how the connection ended. Not inlined: formatting takes stack, and every page a
/// connection thread's stack touches is memory held per client.
#[inline(never)]
fn log_end(stream: &Stream, end: &End, counts: &Counts) {
    let peer = stream.peer();
    if stream.proxy_origin() == Some(Origin::Local) && counts.messages == 0 {
        // A load balancer's health check, every few seconds: not worth a line each time.
        debug!("{peer}: the proxy's own connection ended, nothing sent");
        return;
    }
    let Counts {
        messages,
        refused,
        bytes,
    } = counts;
    use crate::unstable::plural;
    let mut counted = format!(
        "after {}, {}",
        plural(*messages, "message"),
        plural(*bytes, "byte")
    );
    if *refused > 0 {
        counted.push_str(&format!(" ({refused} messages not printed)"));
    }
    match end {
        End::Closed => info!("{peer} disconnected {counted}"),
        // Debug: at a stop, thousands of these would only slow the exit; the summary counts them.
        End::Stopped => debug!("{peer} cut off by the server stop {counted}"),
        // The room or its drainer has logged why.
        End::Evicted => debug!("{peer} disconnected: not reading; {counted}"),
        End::Failed(e) => warn!("{peer} disconnected: {e}; {counted}"),
        End::Idle => info!("{peer} cut off: idle timeout; {counted}"),
        End::TooLong(e) => warn!("{peer} cut off: {e}; {counted}"),
        End::NotReading => warn!(
            "{peer} disconnected: not reading (nothing could be sent within the send timeout); {counted}"
        ),
        End::OutputFailed => debug!("{peer} closed: output failed; {counted}"),
        End::Busy => warn!(
            "{peer} cut off: its unfinished line does not fit in the buffer budget; {counted}"
        ),
    }
}

/// The reading side of a connection: its buffers, their share of the budget, and the loop.
struct Reading<'a> {
    ctx: &'a Context,
    stream: &'a Stream,
    reader: Reader<'a>,
    decoder: Decoder,
    batch: Batch,
    read_size: usize,
    /// Bytes taken from the buffer budget.
    reserved: usize,
    /// Whether the buffers were given back since the last read that brought data: a connection
    /// holding a long unfinished line is not woken again and again to give them back.
    shrunk: bool,
}

impl<'a> Reading<'a> {
    fn new(ctx: &'a Context, stream: &'a Stream) -> Reading<'a> {
        let options = &ctx.options;
        Reading {
            ctx,
            stream,
            reader: Reader {
                stream,
                idle_timeout: options.idle_timeout,
                timeout_set: None,
                last_message: Instant::now(),
                resumed: false,
            },
            decoder: Decoder::new(options.framing).max_line(options.max_line),
            batch: if options.mode == Mode::Echo {
                Batch::new().keep_raw()
            } else {
                Batch::new()
            },
            read_size: FIRST_READ,
            reserved: 0,
            shrunk: false,
        }
    }

    /// Reads until the client closes, a limit is broken, or the server stops.
    fn run(&mut self, relay: &mut Relay, counts: &mut Counts) -> End {
        let ctx = self.ctx;
        loop {
            if ctx.drain_expired() {
                return End::Stopped;
            }
            let mid_message = self.decoder.pending_len() > 0;
            let large = self.read_size > FIRST_READ || self.held() > QUIET_SIZE;
            let quiet = (large && !self.shrunk).then_some(QUIET);
            // On Windows, a wait that the cut can't end: it looks for the cut now and then.
            let quiet = if cfg!(windows) {
                Some(quiet.map_or(send::LOOK_FOR_CUT, send::read_slice))
            } else {
                quiet
            };
            // Straight into the batch: plain lines are decoded where they are read.
            let room = self.decoder.read_room(&mut self.batch, self.read_size);
            let n = match self.reader.read(room, mid_message, quiet) {
                Ok(0) => {
                    if self.stream.was_cut() {
                        return self.cut_end();
                    }
                    if self.stream.was_broken() {
                        // The reset was reported to a send: this end is no clean end.
                        return End::Failed(io::ErrorKind::ConnectionReset.into());
                    }
                    // The client closed its side: a last line without `\n` is a message too.
                    let finished = self.decoder.finish(&mut self.batch);
                    if let Err(end) = self.handle(relay, counts) {
                        return end;
                    }
                    return match finished {
                        Ok(()) => End::Closed,
                        Err(too_long) => End::TooLong(too_long),
                    };
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) if self.stream.was_cut() => return self.cut_end(),
                Err(e) if is_timeout(&e) => {
                    if self.reader.idle_expired(mid_message) {
                        return End::Idle;
                    }
                    if self.quiet_for(ctx, QUIET) {
                        self.shrink();
                    }
                    continue;
                }
                Err(e) => return End::Failed(e),
            };
            self.stream.touch(ctx.now_ms());
            self.shrunk = false;
            counts.bytes += n as u64;
            ctx.add_totals(0, 0, n as u64);
            let filled = n == self.read_size;
            let mut decoded = self.decoder.decode_read(n, &mut self.batch);
            let mut failed = None;
            if filled && decoded.is_ok() && self.grow() {
                (decoded, failed) = self.gather(n, counts);
            }
            if !self.batch.is_empty() {
                self.reader.last_message = Instant::now();
            }
            if let Err(end) = self.handle(relay, counts) {
                return end;
            }
            if let Err(too_long) = decoded {
                return End::TooLong(too_long);
            }
            if let Some(e) = failed {
                return End::Failed(e);
            }
            if let Err(end) = self.settle() {
                return end;
            }
        }
    }

    /// After a read that filled its room: large reads from now on, if the budget can take what
    /// they may hold.
    fn grow(&mut self) -> bool {
        if self.read_size < MAX_READ && self.ctx.budget.left() >= MAX_READ * 8 {
            self.read_size = MAX_READ;
        }
        self.read_size == MAX_READ
    }

    /// Adds to the batch what else has already arrived, up to [`MAX_READ`] bytes in all, without
    /// waiting: so a burst that came faster than the first read's size is handled in one go
    /// (one write to each chat recipient, not one per read). `read` bytes are in the batch
    /// already. A read failing here ends the connection once the batch is handled.
    fn gather(
        &mut self,
        mut read: usize,
        counts: &mut Counts,
    ) -> (Result<(), LineTooLong>, Option<io::Error>) {
        while read < MAX_READ {
            let room = self.decoder.read_room(&mut self.batch, MAX_READ - read);
            let size = room.len();
            let n = match self.stream.try_read(room) {
                // The end of stream stays for the next read to find.
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    break;
                }
                Err(e) => return (Ok(()), Some(e)),
            };
            read += n;
            counts.bytes += n as u64;
            self.ctx.add_totals(0, 0, n as u64);
            if let Err(too_long) = self.decoder.decode_read(n, &mut self.batch) {
                return (Err(too_long), None);
            }
            if n < size {
                break;
            }
        }
        (Ok(()), None)
    }

    /// The server cut the connection: a stop, or (chat) an eviction.
    fn cut_end(&self) -> End {
        if self.ctx.is_stopping() {
            End::Stopped
        } else {
            End::Evicted
        }
    }

    /// Sends the batch on as the mode says, hands it to the sink, and empties it. Whatever is
    /// counted is handed to the sink, even when sending it on failed.
    fn handle(&mut self, relay: &mut Relay, counts: &mut Counts) -> Result<(), End> {
        let ctx = self.ctx;
        let batch = &mut self.batch;
        if batch.is_empty() {
            return Ok(());
        }
        counts.messages += batch.len() as u64;
        ctx.add_totals(batch.len() as u64, 0, 0);
        let peer = self.stream.peer();
        let relayed = match relay {
            Relay::Log => Ok(()),
            // Echo first: the sender is waiting for it; printing can follow. After a stop no
            // replies are owed: what is left is printed, not echoed.
            Relay::Echo if ctx.is_stopping() => Ok(()),
            Relay::Echo => self
                .stream
                .send(batch.raw(), ctx.options.send_timeout, || ctx.is_stopping())
                .map_err(|e| match e {
                    SendError::NotReading => End::NotReading,
                    SendError::GaveUp => End::Stopped,
                    SendError::Failed(e) => End::Failed(e),
                }),
            Relay::Chat(seat) => {
                // After a stop the room is closed: nothing is relayed, here or elsewhere.
                let lines = seat.relay(&ctx.room, peer, batch, ctx.options.send_timeout);
                if !ctx.is_stopping() {
                    ctx.publish(&lines);
                }
                Ok(())
            }
        };
        let delivered = ctx.sink.deliver(peer, batch);
        let len = batch.len() as u64;
        ctx.add_handed(len);
        batch.clear();
        if let Err(e) = delivered {
            counts.refused += len;
            ctx.add_totals(0, len, 0);
            return Err(output_end(ctx, &e));
        }
        relayed
    }

    /// Bytes the buffers hold.
    fn held(&self) -> usize {
        self.batch.capacity_bytes() + self.decoder.capacity_bytes()
    }

    /// Whether the client has sent nothing for `quiet`.
    fn quiet_for(&self, ctx: &Context, quiet: Duration) -> bool {
        let quiet_ms = u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX);
        ctx.now_ms().saturating_sub(self.stream.last_read()) >= quiet_ms
    }

    /// Gives the buffers back to their small size (what an unfinished line holds stays).
    fn shrink(&mut self) {
        self.batch.shrink();
        self.decoder.shrink();
        self.read_size = FIRST_READ;
        self.shrunk = true;
        let _ = self.settle();
    }

    /// Squares what the buffers hold beyond the allowance with what was taken from the budget;
    /// a connection that needs more than the budget has left gives back all it can first, and
    /// is cut off if its unfinished line still does not fit.
    fn settle(&mut self) -> Result<(), End> {
        let budget = &self.ctx.budget;
        let mut over = self.held().saturating_sub(ALLOWANCE);
        if over > self.reserved && !budget.take(over - self.reserved) {
            self.batch.shrink();
            self.decoder.shrink();
            self.read_size = FIRST_READ;
            over = self.held().saturating_sub(ALLOWANCE);
            if over > self.reserved && !budget.take(over - self.reserved) {
                return Err(End::Busy);
            }
        }
        if over < self.reserved {
            budget.give_back(self.reserved - over);
        }
        self.reserved = over;
        Ok(())
    }

    /// Returns what was taken from the budget, at the end.
    fn give_back(&mut self) {
        self.ctx
            .budget
            .give_back(std::mem::take(&mut self.reserved));
    }
}

/// Reads from the client, applying the idle timeout: a client that completes no message within
/// it is cut off, whether it is silent or trickling a line byte by byte.
struct Reader<'a> {
    stream: &'a Stream,
    idle_timeout: Option<Duration>,
    /// The read timeout the socket has now, to avoid a system call per read.
    timeout_set: Option<Duration>,
    last_message: Instant,
    /// Set when a wait ended for [`QUIET`], not the idle timeout: the idle clock goes on.
    resumed: bool,
}

impl Reader<'_> {
    /// Reads, waiting at most until the idle timeout, or `quiet` if that comes first.
    fn read(
        &mut self,
        buf: &mut [u8],
        mid_message: bool,
        quiet: Option<Duration>,
    ) -> io::Result<usize> {
        let idle_left = self.idle_left(mid_message);
        if idle_left == Some(Duration::ZERO) {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let timeout = match (idle_left, quiet) {
            (Some(idle), Some(quiet)) => Some(idle.min(quiet)),
            (idle, quiet) => idle.or(quiet),
        };
        if self.timeout_set != timeout {
            self.stream.set_read_timeout(timeout)?;
            self.timeout_set = timeout;
        }
        let read = self.stream.read(buf);
        self.resumed = matches!(&read, Err(e) if is_timeout(e));
        read
    }

    /// How long the client may still take to complete a message (`None`: no idle timeout).
    fn idle_left(&self, mid_message: bool) -> Option<Duration> {
        self.idle_timeout.map(|idle| {
            if mid_message || self.resumed {
                // The clock runs from the last complete message, not the last byte.
                idle.saturating_sub(self.last_message.elapsed())
            } else {
                idle
            }
        })
    }

    /// After a read timed out: whether it was the idle timeout (not the quiet one).
    fn idle_expired(&self, mid_message: bool) -> bool {
        self.idle_left(mid_message)
            .is_some_and(|left| left <= Duration::from_millis(1))
    }
}

/// What a connection does with each batch of messages besides printing it: nothing, send it
/// back, or relay it to the chat room.
enum Relay {
    Log,
    Echo,
    Chat(Seat),
}

impl Relay {
    /// Sends the greeting and sets up what the mode needs.
    fn start(
        ctx: &Arc<Context>,
        id: u64,
        stream: &Arc<Stream>,
        greeting: Option<String>,
    ) -> Result<Relay, End> {
        let options = &ctx.options;
        if options.mode != Mode::Chat {
            if let Some(greeting) = &greeting {
                stream
                    .send(greeting.as_bytes(), options.send_timeout, || {
                        ctx.is_stopping()
                    })
                    .map_err(|e| match e {
                        SendError::NotReading => End::NotReading,
                        SendError::GaveUp => End::Stopped,
                        SendError::Failed(e) => End::Failed(e),
                    })?;
            }
            return Ok(if options.mode == Mode::Echo {
                Relay::Echo
            } else {
                Relay::Log
            });
        }
        let seat = Seat::take(&ctx.room, id, stream, greeting, options.send_timeout);
        Ok(Relay::Chat(seat))
    }

    /// Leaves the chat room. If `drain`, what is queued for the client is sent first (it closed
    /// its side cleanly); otherwise it is dropped.
    fn finish(self, ctx: &Context, drain: bool) {
        if let Relay::Chat(seat) = self {
            seat.leave(&ctx.room, drain);
        }
    }
}
