//! A client's socket as the server holds it, and the two ways a connection can end on the wire.
//!
//! A clean close (FIN) means success: the server read the client's end of stream and everything
//! before it was printed. Every other end is a reset (RST), with an `error: REASON` line before it
//! where the client can still read one. To make that hold even when the process dies, every
//! connection is set to reset when its socket is closed (`SO_LINGER` 0) from the start, and only
//! [`Stream::close_cleanly`] turns that off.
//!
//! No failure path ever shuts the write side: a client that received FIN and then RST reads a
//! clean end of stream on Linux, which would look like success.
//!
//! # The transport seam
//!
//! [`Stream`] is the only way the server reads or writes a client's bytes once it serves it: the
//! reader ([`read`](Stream::read)), greetings, echo replies and chat deliveries
//! ([`send`](Stream::send), [`send_vectored`](Stream::send_vectored), and the chat senders'
//! non-blocking [`try_send`](Stream::try_send)), the last words ([`tell_now`](Stream::tell_now),
//! [`refuse`](Stream::refuse)), the end ([`close_cleanly`](Stream::close_cleanly)) and the
//! stop's wake-up ([`cut`](Stream::cut)). Underneath is a [`Transport`]: the socket, in the
//! clear or under a TLS session (see `transport` for how two threads share one). Framing, the
//! sink, the room and the connection's logic see only these.
//!
//! - The TLS handshake runs in [`handshake`](Stream::handshake), on the connection's thread,
//!   before the greeting, within its own timeout; a stop's cut ends it too.
//! - A stop wakes a blocked reader: [`cut`](Stream::cut) shuts the socket's read side, below
//!   any session, so the blocked `read` returns.
//! - A clean close sends TLS's `close_notify` before the FIN; every failure path stays a reset.
//! - Refusals at accept (not allowed, full, stopping) happen before a `Stream` exists
//!   ([`turn_away_now`], `turnaway`): under TLS there is no session yet to say why in, so they
//!   are a bare reset, and the server's log says why.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use socket2::SockRef;

use rustls::ServerConfig;

use crate::proxy::{self, HeaderError, Origin};
use crate::send::{SendError, send_slice};
use crate::transport::{HandshakeError, Transport};

/// TCP keepalive on every connection, so a client that vanished (power cut, cable pulled) without
/// closing is noticed after about two minutes even with no idle timeout.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a client cut off with a reason (`error: ...`) has to read it before the reset, at
/// accept (`turnaway`) and later ([`Stream::refuse`]).
pub(crate) const LINGER_AFTER_ERROR: Duration = Duration::from_millis(500);

/// What a client cut off by a stop is told.
pub(crate) const STOPPING: &str = "server stopping";

/// How long a client cut off by a stop has to read why before the reset
/// ([`Stream::tell_before_reset`]). Short: it lengthens every stop that cuts a client.
const READ_BEFORE_RESET: Duration = Duration::from_millis(100);

/// One client's socket, shared by its connection thread, chat senders and its drainer, the
/// registry and the chat room.
#[derive(Debug)]
pub(crate) struct Stream {
    wire: Transport,
    /// The connection's own peer.
    peer: SocketAddr,
    /// Behind a proxy, what its PROXY protocol header said: whom the connection is for.
    origin: OnceLock<Origin>,
    /// When a read last returned data, in milliseconds on the server's clock: a stop cuts quiet
    /// connections at once and gives busy ones the drain time.
    last_read: AtomicU64,
    /// Set just before the server shuts the read side to wake the reader (stop, eviction): an end
    /// of stream after that is the server's doing, not the client's.
    cut: AtomicBool,
    /// Set when a send found the connection reset: the reader still reads what arrived before,
    /// but an end of stream after that is no clean end.
    broken: AtomicBool,
}

impl Stream {
    /// The client on `tcp`; under TLS if `tls` is given (its handshake comes with
    /// [`handshake`](Stream::handshake)).
    pub(crate) fn new(
        tcp: TcpStream,
        peer: SocketAddr,
        now_ms: u64,
        tls: Option<&Arc<ServerConfig>>,
    ) -> io::Result<Stream> {
        let wire = match tls {
            Some(config) => Transport::tls_server(tcp, config)?,
            None => Transport::plain(tcp),
        };
        Ok(Stream {
            wire,
            peer,
            origin: OnceLock::new(),
            last_read: AtomicU64::new(now_ms),
            cut: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        })
    }

    fn tcp(&self) -> &TcpStream {
        self.wire.tcp()
    }

    /// The socket, for a connection that was never served after all (its thread could not
    /// start): refused as at accept.
    pub(crate) fn into_tcp(self) -> TcpStream {
        self.wire.into_tcp()
    }

    /// Whether the client is served under TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.wire.is_tls()
    }

    /// Runs the TLS handshake, if any, within `timeout`; a cut ends it.
    pub(crate) fn handshake(&self, timeout: Duration) -> Result<(), HandshakeError> {
        self.wire.handshake(timeout, &|| self.was_cut())
    }

    /// Under TLS, the protocol and the client certificate's name, for the log.
    pub(crate) fn tls_description(&self) -> Option<String> {
        self.wire.tls_description()
    }

    /// The client's address: the one its PROXY protocol header named, if any, else the
    /// connection's own peer.
    pub(crate) fn peer(&self) -> SocketAddr {
        match self.origin.get() {
            Some(Origin::Client(client)) => *client,
            Some(Origin::Local) | None => self.peer,
        }
    }

    /// Behind a proxy, what its header said (once read).
    pub(crate) fn proxy_origin(&self) -> Option<Origin> {
        self.origin.get().copied()
    }

    /// The connection's own peer: behind a proxy, the proxy.
    pub(crate) fn connection_peer(&self) -> SocketAddr {
        self.peer
    }

    /// Reads the PROXY protocol header the connection starts with (before any TLS), within
    /// `timeout`; from then on [`peer`](Stream::peer) is the client it names.
    pub(crate) fn read_proxy_header(&self, timeout: Duration) -> Result<Origin, HeaderError> {
        let origin = match proxy::read_header(self.tcp(), timeout, &|| self.was_cut())? {
            // The proxy naming itself, as HAProxy's version 1 health checks do.
            Origin::Client(client) if client == self.peer => Origin::Local,
            origin => origin,
        };
        let _ = self.origin.set(origin);
        Ok(origin)
    }

    /// Sets the socket up for serving: reset unless closed cleanly, keepalive, sends that wake
    /// to check for a stop, and `nodelay` (echo and chat replies go out at once).
    pub(crate) fn prepare(&self, send_timeout: Duration, nodelay: bool) -> io::Result<()> {
        let socket = SockRef::from(self.tcp());
        socket.set_linger(Some(Duration::ZERO))?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL);
        // Best effort: a missing keepalive only delays noticing a vanished client.
        let _ = socket.set_tcp_keepalive(&keepalive);
        self.tcp()
            .set_write_timeout(Some(send_slice(send_timeout)))?;
        // A handshake's flights go out at once too.
        if nodelay || self.is_tls() {
            self.tcp().set_nodelay(true)?;
        }
        Ok(())
    }

    /// Sets how long a read may wait (`None`: for ever).
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(timeout)
    }

    /// Reads what the client sent: `Ok(0)` at its end of stream, or once [`cut`](Stream::cut).
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.wire.read(buf)
    }

    /// Records that a read returned data at `now_ms`.
    pub(crate) fn touch(&self, now_ms: u64) {
        self.last_read.store(now_ms, Ordering::Relaxed);
    }

    /// When a read last returned data (or the connection started).
    pub(crate) fn last_read(&self) -> u64 {
        self.last_read.load(Ordering::Relaxed)
    }

    /// Wakes the reader, which then sees [`was_cut`](Stream::was_cut) and ends the connection
    /// with a reset. Shutting the read side sends nothing to the client.
    ///
    /// Not on Windows: there shutting the read side resets the connection at once if the
    /// client's data is queued, before it could be told why; shutting the write side sends a
    /// FIN, which a client that has sent everything takes for the confirmation; and neither
    /// wakes a blocked receive under Wine. The reader looks for the cut every 0.25 s instead.
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        #[cfg(not(windows))]
        let _ = self.tcp().shutdown(Shutdown::Read);
    }

    /// Whether the server cut this connection: an end of stream read now may be its own doing.
    pub(crate) fn was_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// A send failed with `error`. If the connection is gone (reset, broken pipe), the reader is
    /// left to read what the client sent before, and to find the end itself, which is then a
    /// failure whatever it looks like (after a reset the system reports the error once, then an
    /// end of stream); otherwise the reader is woken as by [`cut`](Stream::cut).
    pub(crate) fn send_failed(&self, error: &io::Error) {
        let gone = matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        );
        if gone {
            self.broken.store(true, Ordering::Release);
        } else {
            self.cut();
        }
    }

    /// Whether a send found the connection gone: its end of stream is no clean end.
    pub(crate) fn was_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Sends all of `buf`. Gives up when the client takes nothing for `timeout`, or when
    /// `give_up` says so (asked whenever the send has waited a moment).
    pub(crate) fn send(
        &self,
        buf: &[u8],
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        self.wire.send_all(buf, timeout, give_up)
    }

    /// [`send`](Stream::send) for several buffers back to back, without copying them into one.
    pub(crate) fn send_vectored(
        &self,
        bufs: &[&[u8]],
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        self.wire.send_all_vectored(bufs, timeout, give_up)
    }

    /// Reads what has already arrived into `buf`, never waiting (`WouldBlock` for nothing yet).
    /// Where that can't be done without making the socket non-blocking (Windows), it reads
    /// nothing: `WouldBlock`.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.wire.try_read(buf)
    }

    /// Sends what the socket takes of `buf` at once, never waiting: how many bytes
    /// (`WouldBlock` for none). Where that can't be done without also making the reader's
    /// receives non-blocking (Windows), it takes none: the caller queues.
    pub(crate) fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        self.wire.try_send(buf)
    }

    /// Whether a [`try_send`](Stream::try_send) left part of a TLS record unsent: a
    /// [`flush`](Stream::flush) (or the next send) must send it.
    pub(crate) fn has_unsent(&self) -> bool {
        self.wire.has_unsent()
    }

    /// Sends what a [`try_send`](Stream::try_send) left unsent, as [`send`](Stream::send) would.
    pub(crate) fn flush(
        &self,
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        self.wire.flush(timeout, give_up)
    }

    /// Sends `error: REASON` if the socket takes it at once, never waiting: for ends where the
    /// client must not hold anything up (a stop, an eviction). The reset follows when the socket
    /// is closed.
    pub(crate) fn tell_now(&self, reason: &str) {
        let _ = SockRef::from(self.tcp()).set_linger(Some(Duration::ZERO));
        if self.tcp().set_nonblocking(true).is_ok() {
            // Out at once: the reset that follows would discard it still queued.
            let _ = self.tcp().set_nodelay(true);
            self.wire.write_now(format!("error: {reason}\n").as_bytes());
        }
    }

    /// [`tell_now`](Stream::tell_now), then a pause before the reset that follows: a client on
    /// Windows drops what it has not read yet when a reset arrives, so without the pause the
    /// line would be lost there. For a stop, where the client must not hold anything up (a
    /// pause, unlike [`refuse`](Stream::refuse), does not wait on it) and, its read side shut,
    /// the client's hanging up can't be seen.
    pub(crate) fn tell_before_reset(&self, reason: &str) {
        self.tell_now(reason);
        std::thread::sleep(READ_BEFORE_RESET);
    }

    /// Tells the client in one line why it is cut off, then lets it read that line: reads and
    /// drops what it still sends until it closes its side or `linger` passes. The reset follows
    /// when the socket is closed.
    ///
    /// Not inlined, so that its buffer is on the stack only while it runs: every page a
    /// connection thread's stack touches is memory held per client.
    #[inline(never)]
    #[cold]
    pub(crate) fn refuse(&self, reason: &str, linger: Duration) {
        self.refuse_as(reason, linger, false);
    }

    /// [`refuse`](Stream::refuse) in the clear, under TLS too: for a client that turned out not
    /// to speak TLS, which can read only that.
    #[inline(never)]
    #[cold]
    pub(crate) fn refuse_in_clear(&self, reason: &str, linger: Duration) {
        self.refuse_as(reason, linger, true);
    }

    fn refuse_as(&self, reason: &str, linger: Duration, clear: bool) {
        let line = format!("error: {reason}\n");
        let said = if clear {
            crate::send::send_all(self.tcp(), line.as_bytes(), linger, || false)
        } else {
            self.send(line.as_bytes(), linger, || false)
        };
        if said.is_ok() {
            self.read_and_drop(linger, clear);
        }
    }

    /// Lets the client read what was last sent (a TLS alert) before the reset: reads and drops
    /// what it still sends, raw, until it closes its side or `linger` passes.
    #[inline(never)]
    #[cold]
    pub(crate) fn linger(&self, linger: Duration) {
        self.read_and_drop(linger, true);
    }

    /// Reads and drops what the client sends (`raw`: the bytes on the wire, not through the
    /// session) until it closes its side or `linger` passes.
    fn read_and_drop(&self, linger: Duration, raw: bool) {
        let mut scratch = [0; 512];
        let deadline = Instant::now() + linger;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.tcp().set_read_timeout(Some(left)).is_err() {
                break;
            }
            let read = if raw {
                self.tcp().read(&mut scratch)
            } else {
                self.read(&mut scratch)
            };
            match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Ends the connection with a clean close (under TLS `close_notify`, then FIN): only after
    /// the client's end of stream was read and everything before it printed. A `close_notify`
    /// the client takes nothing of within `timeout` makes it a reset after all.
    pub(crate) fn close_cleanly(&self, timeout: Duration) {
        if self.wire.close_notify(timeout).is_err() {
            return;
        }
        let _ = SockRef::from(self.tcp()).set_linger(None);
        let _ = self.tcp().shutdown(Shutdown::Write);
    }
}

/// Refuses a connection that never became a client (queued when the server stopped, a thread
/// that could not start): `error: REASON` if the socket takes it at once, then a reset. Under TLS
/// (`plain` false) just the reset: there is no session to say it in.
pub(crate) fn turn_away_now(tcp: &TcpStream, reason: &str, plain: bool) {
    let _ = SockRef::from(tcp).set_linger(Some(Duration::ZERO));
    // Non-blocking either way: the turnaway thread reads what it sends without waiting.
    if tcp.set_nonblocking(true).is_ok() && plain {
        let _ = (&*tcp).write(format!("error: {reason}\n").as_bytes());
    }
}
