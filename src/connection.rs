//! One client's thread: greet, read, frame, deliver, apply the limits, account for it at the end.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::framing::{Batch, Decoder, Framing, LineTooLong};
use crate::room::{self, Outbox};
use crate::server::{CONNECTION_STACK, Mode, Shared};
use crate::sink::format_batch;

/// The first read size; it doubles up to [`MAX_READ`] while reads fill it, so an idle client
/// costs little and a streaming one gets large reads.
const FIRST_READ: usize = 1024;
const MAX_READ: usize = 64 * 1024;

/// After telling a client why it is cut off, how long to read and drop what it still sends, so
/// that closing with unread data doesn't reset the connection before it reads the reason.
const LINGER_AFTER_ERROR: Duration = Duration::from_millis(500);

/// How a connection ended.
enum End {
    /// The client closed its side (or the server's stop shut ours).
    Closed,
    /// The server stopped and the drain time ran out.
    Stopped,
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
}

/// Serves one client until it leaves, breaks a limit, or the server stops.
pub(crate) fn serve(shared: &Shared, id: u64, shared_stream: &Arc<TcpStream>, peer: SocketAddr) {
    let stream: &TcpStream = shared_stream;
    // Here rather than in the accept loop, which must keep up with bursts of connects.
    if let Err(e) = crate::server::set_keepalive(stream) {
        debug!("{peer}: cannot set TCP keepalive: {e}");
    }
    let options = &shared.options;
    let greeting = options.greeting.as_ref().map(|greeting| {
        let mut text = greeting.replace("{peer}", &peer.to_string());
        if options.framing == Framing::Line {
            text.push('\n');
        }
        text
    });
    let mut relay = match Relay::start(shared, id, shared_stream, peer, greeting) {
        Ok(relay) => relay,
        Err(e) => {
            warn!("{peer}: cannot start its writer thread: {e}; closing");
            refuse(stream, "server busy");
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    let mut reader = Reader {
        stream,
        idle_timeout: options.idle_timeout,
        timeout_set: None,
        last_message: Instant::now(),
    };
    let mut decoder = Decoder::new(options.framing).max_line(options.max_line);
    let mut batch = if options.mode == Mode::Echo {
        Batch::new().keep_raw()
    } else {
        Batch::new()
    };
    let mut read_size = FIRST_READ;
    let mut messages = 0u64;
    let mut bytes = 0u64;
    let end = loop {
        if shared.drain_expired() {
            break End::Stopped;
        }
        let mid_message = decoder.pending_len() > 0;
        // Straight into the batch: plain lines are decoded where they are read.
        let room = decoder.read_room(&mut batch, read_size);
        let n = match reader.read(room, mid_message) {
            Ok(0) => {
                // After a stop, end of stream may be our own shutdown: an unfinished line is not
                // a message the client sent, so it is dropped rather than printed torn.
                let finished = if shared.is_stopping() {
                    Ok(())
                } else {
                    decoder.finish(&mut batch)
                };
                if let Err(end) = relay.handle(shared, &mut batch, &mut messages) {
                    break end;
                }
                break match finished {
                    Ok(()) => End::Closed,
                    Err(too_long) => End::TooLong(too_long),
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => break End::Idle,
            Err(e) => break End::Failed(e),
        };
        bytes += n as u64;
        let decoded = decoder.decode_read(n, &mut batch);
        if !batch.is_empty() {
            reader.last_message = Instant::now();
        }
        if let Err(end) = relay.handle(shared, &mut batch, &mut messages) {
            break end;
        }
        if let Err(too_long) = decoded {
            break End::TooLong(too_long);
        }
        if n == read_size && read_size < MAX_READ {
            read_size *= 2;
        }
    };

    let counts = format!("after {messages} messages, {bytes} bytes");
    let unfinished = decoder.pending_len();
    let dropped = if unfinished > 0 && options.framing == Framing::Line {
        format!(" ({unfinished} bytes of an unfinished line dropped)")
    } else {
        String::new()
    };
    match &end {
        End::Closed => info!("{peer} disconnected {counts}{dropped}"),
        // Debug: at a stop, thousands of these would only slow the exit; the summary counts them.
        End::Stopped => debug!("{peer} closed by the server stop {counts}{dropped}"),
        End::Failed(e) => warn!("{peer} disconnected: {e}; {counts}{dropped}"),
        End::Idle => info!("{peer} cut off: idle timeout; {counts}{dropped}"),
        End::TooLong(e) => warn!("{peer} cut off: {e}; {counts}"),
        End::NotReading => warn!(
            "{peer} disconnected: not reading (nothing could be sent within the send timeout); {counts}"
        ),
        End::OutputFailed => debug!("{peer} closed: output failed"),
    }
    relay.finish(shared);
    match end {
        End::Idle => refuse(stream, "idle timeout"),
        End::TooLong(e) => refuse(stream, &e.to_string()),
        _ => {}
    }
    let _ = stream.shutdown(Shutdown::Both);
    shared.add_totals(messages, bytes);
}

/// Reads from the client, applying the idle timeout: a client that completes no message within
/// it is cut off, whether it is silent or trickling a line byte by byte.
struct Reader<'a> {
    stream: &'a TcpStream,
    idle_timeout: Option<Duration>,
    /// The read timeout the socket has now, to avoid a system call per read.
    timeout_set: Option<Duration>,
    last_message: Instant,
}

impl Reader<'_> {
    fn read(&mut self, buf: &mut [u8], mid_message: bool) -> io::Result<usize> {
        if let Some(idle) = self.idle_timeout {
            let left = if mid_message {
                // The clock runs from the last complete message, not the last byte.
                idle.saturating_sub(self.last_message.elapsed())
            } else {
                idle
            };
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            if self.timeout_set != Some(left) {
                self.stream.set_read_timeout(Some(left))?;
                self.timeout_set = Some(left);
            }
        }
        (&*self.stream).read(buf)
    }
}

/// A read that gave up waiting: `WouldBlock` on Unix, `TimedOut` on Windows.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Tells the client in one line why it is cut off, then lets it read that line before closing.
///
/// Not inlined, so that its buffer is on the stack only while it runs: every page a connection
/// thread's stack touches is memory held per client.
#[inline(never)]
#[cold]
fn refuse(stream: &TcpStream, reason: &str) {
    let mut scratch = [0; 512];
    let _ = stream.set_write_timeout(Some(LINGER_AFTER_ERROR));
    if (&*stream)
        .write_all(format!("error: {reason}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    // Closing with unread data would send a reset, which can destroy our line in the client's
    // receive queue; so read and drop for a moment, until the client closes.
    let deadline = Instant::now() + LINGER_AFTER_ERROR;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match (&*stream).read(&mut scratch) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// What a connection does with each batch of messages: print it, and in echo and chat mode also
/// send it on.
enum Relay<'a> {
    Log {
        peer: SocketAddr,
    },
    Echo {
        peer: SocketAddr,
        stream: &'a TcpStream,
    },
    Chat {
        peer: SocketAddr,
        id: u64,
        stream: &'a TcpStream,
        outbox: Arc<Outbox>,
        writer: JoinHandle<()>,
        /// Reused buffer for formatting `PEER MESSAGE` lines.
        lines: Vec<u8>,
    },
}

impl<'a> Relay<'a> {
    /// Sends the greeting and sets up what the mode needs.
    fn start(
        shared: &Shared,
        id: u64,
        stream: &'a Arc<TcpStream>,
        peer: SocketAddr,
        greeting: Option<String>,
    ) -> io::Result<Relay<'a>> {
        let options = &shared.options;
        if options.mode != Mode::Log {
            // A client that takes nothing of what is sent to it for this long is cut off.
            stream.set_write_timeout(Some(options.send_timeout))?;
            // Replies go out at once, not after the previous one is acknowledged (Nagle).
            stream.set_nodelay(true)?;
        }
        if options.mode != Mode::Chat
            && let Some(greeting) = &greeting
            && let Err(e) = (&**stream).write_all(greeting.as_bytes())
        {
            debug!("{peer}: cannot send the greeting: {e}");
        }
        Ok(match options.mode {
            Mode::Log => Relay::Log { peer },
            Mode::Echo => Relay::Echo { peer, stream },
            Mode::Chat => {
                // The greeting goes through the outbox, so the writer thread can't interleave a
                // relayed line with it; and the client joins the room before it is greeted.
                let outbox = Arc::new(Outbox::new());
                if let Some(greeting) = greeting {
                    let _ = outbox.push(greeting.into_bytes().into(), Duration::ZERO);
                }
                let writer = {
                    let outbox = Arc::clone(&outbox);
                    let stream = Arc::clone(stream);
                    thread::Builder::new()
                        .stack_size(CONNECTION_STACK)
                        .spawn(move || room::write_loop(&outbox, &stream, peer))?
                };
                shared
                    .room
                    .join(id, peer, Arc::clone(stream), Arc::clone(&outbox));
                Relay::Chat {
                    peer,
                    id,
                    stream,
                    outbox,
                    writer,
                    lines: Vec::new(),
                }
            }
        })
    }

    /// Sends the batch on as the mode says, hands it to the sink, and empties it.
    fn handle(
        &mut self,
        shared: &Shared,
        batch: &mut Batch,
        messages: &mut u64,
    ) -> Result<(), End> {
        if batch.is_empty() {
            return Ok(());
        }
        *messages += batch.len() as u64;
        let peer = match self {
            Relay::Log { peer } => *peer,
            // Echo first: the sender is waiting for it; printing can follow.
            Relay::Echo { peer, stream } => {
                // After a stop the write side is shut: what is left is printed, not echoed.
                if !shared.is_stopping()
                    && let Err(e) = (&**stream).write_all(batch.raw())
                    && !shared.is_stopping()
                {
                    batch.clear();
                    return Err(match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => End::NotReading,
                        _ => End::Failed(e),
                    });
                }
                *peer
            }
            Relay::Chat {
                peer, id, lines, ..
            } => {
                lines.clear();
                format_batch(lines, *peer, batch);
                // After a stop nothing is relayed (and no sender waits on a full outbox).
                if !shared.is_stopping() {
                    let payload: Arc<[u8]> = Arc::from(&lines[..]);
                    shared
                        .room
                        .broadcast(*id, &payload, shared.options.send_timeout);
                }
                *peer
            }
        };
        let delivered = shared.sink.deliver(peer, batch);
        batch.clear();
        delivered.map_err(|e| {
            shared.output_failed(e);
            End::OutputFailed
        })
    }

    /// Leaves the chat room: what is queued for the client is still sent, unless the server is
    /// stopping, when it is dropped so that the stop is quick.
    fn finish(self, shared: &Shared) {
        if let Relay::Chat {
            peer,
            id,
            stream,
            outbox,
            writer,
            ..
        } = self
        {
            shared.room.leave(id);
            if shared.is_stopping() {
                outbox.abandon();
                let _ = stream.shutdown(Shutdown::Both);
            } else {
                outbox.close();
            }
            if writer.join().is_err() {
                warn!("{peer}: its writer thread panicked");
            }
        }
    }
}
