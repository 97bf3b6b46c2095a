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
//! stop's wake-up ([`cut`](Stream::cut)). Framing, the sink, the room and the connection's logic
//! see only these, so a TLS session goes under every connection here, without touching them. Its
//! configuration would come with the options, to where the server makes each `Stream`
//! (`Stream::new`), and its handshake would run in [`prepare`](Stream::prepare), whose failure
//! already ends the connection before the greeting. (The client's sockets are another matter:
//! the client and load mode use [`send`](crate::send) directly.) What this type is built to
//! allow:
//!
//! - Two threads use one `Stream` at once: the connection's reader, and a sender (its own
//!   thread's echo replies, or chat lines from other clients' threads and its drainer). A TLS
//!   session has one state machine for both directions, so it would sit behind a lock, held only to decrypt what was read or to encrypt
//!   what is to be sent, never across a blocking socket call: the reader reads ciphertext from the
//!   socket unlocked, then locks to feed it to the session. Sends would hold a second lock from
//!   encrypting to the last byte sent, so records leave in the order they were made; a
//!   `try_send` that the socket takes only part of would keep the rest of the record for the
//!   next send (the room already queues what is left and sends it before anything newer).
//! - A stop must wake a blocked reader: [`cut`](Stream::cut) shuts the socket's read side,
//!   below any session, so the blocked `read` returns whatever sits above it.
//! - A clean close would send TLS's `close_notify` before the FIN; every failure path stays a
//!   reset.
//! - Refusals at accept (not allowed, full) happen before a `Stream` exists
//!   ([`turn_away_now`], `turnaway`): with TLS there is no session yet to say why in, so those
//!   would be a bare reset or a handshake first; that choice belongs to the TLS work.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::send::{SendError, send_all, send_all_vectored, send_slice};

/// TCP keepalive on every connection, so a client that vanished (power cut, cable pulled) without
/// closing is noticed after about two minutes even with no idle timeout.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a client cut off with a reason (`error: ...`) has to read it before the reset, at
/// accept (`turnaway`) and later ([`Stream::refuse`]).
pub(crate) const LINGER_AFTER_ERROR: Duration = Duration::from_millis(500);

/// One client's socket, shared by its connection thread, chat senders and its drainer, the
/// registry and the chat room.
#[derive(Debug)]
pub(crate) struct Stream {
    tcp: TcpStream,
    peer: SocketAddr,
    /// When a read last returned data, in milliseconds on the server's clock: a stop cuts quiet
    /// connections at once and gives busy ones the drain time.
    last_read: AtomicU64,
    /// Set just before the server shuts the read side to wake the reader (stop, eviction): an end
    /// of stream after that is the server's doing, not the client's.
    cut: AtomicBool,
}

impl Stream {
    pub(crate) fn new(tcp: TcpStream, peer: SocketAddr, now_ms: u64) -> Stream {
        Stream {
            tcp,
            peer,
            last_read: AtomicU64::new(now_ms),
            cut: AtomicBool::new(false),
        }
    }

    /// The socket, for a connection that was never served after all (its thread could not
    /// start): refused as at accept.
    pub(crate) fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// The client's address.
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sets the socket up for serving: reset unless closed cleanly, keepalive, sends that wake
    /// to check for a stop, and `nodelay` (echo and chat replies go out at once).
    pub(crate) fn prepare(&self, send_timeout: Duration, nodelay: bool) -> io::Result<()> {
        let socket = SockRef::from(&self.tcp);
        socket.set_linger(Some(Duration::ZERO))?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL);
        // Best effort: a missing keepalive only delays noticing a vanished client.
        let _ = socket.set_tcp_keepalive(&keepalive);
        self.tcp.set_write_timeout(Some(send_slice(send_timeout)))?;
        if nodelay {
            self.tcp.set_nodelay(true)?;
        }
        Ok(())
    }

    /// Sets how long a read may wait (`None`: for ever).
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(timeout)
    }

    /// Reads what the client sent: `Ok(0)` at its end of stream, or once [`cut`](Stream::cut).
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.tcp).read(buf)
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
    /// with a reset. Shutting the read side sends nothing to the client (Windows needs both sides
    /// shut to wake a blocked receive).
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        let how = if cfg!(windows) {
            Shutdown::Both
        } else {
            Shutdown::Read
        };
        let _ = self.tcp.shutdown(how);
    }

    /// Whether the server cut this connection: an end of stream read now may be its own doing.
    pub(crate) fn was_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Sends all of `buf`. Gives up when the client takes nothing for `timeout`, or when
    /// `give_up` says so (asked whenever the send has waited a moment).
    pub(crate) fn send(
        &self,
        buf: &[u8],
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        send_all(&self.tcp, buf, timeout, give_up)
    }

    /// [`send`](Stream::send) for several buffers back to back, without copying them into one.
    pub(crate) fn send_vectored(
        &self,
        bufs: &[&[u8]],
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        send_all_vectored(&self.tcp, bufs, timeout, give_up)
    }

    /// Reads what has already arrived into `buf`, never waiting (`WouldBlock` for nothing yet).
    /// Where that can't be done without making the socket non-blocking (Windows), it reads
    /// nothing: `WouldBlock`.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(unix)]
        {
            use rustix::net::{RecvFlags, recv};
            recv(&self.tcp, buf, RecvFlags::DONTWAIT)
                .map(|(n, _)| n)
                .map_err(Into::into)
        }
        #[cfg(not(unix))]
        {
            let _ = buf;
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// Sends what the socket takes of `buf` at once, never waiting: how many bytes
    /// (`WouldBlock` for none). Where that can't be done without also making the reader's
    /// receives non-blocking (Windows), it takes none: the caller queues.
    pub(crate) fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        #[cfg(unix)]
        {
            use rustix::net::{SendFlags, send};
            send(&self.tcp, buf, SendFlags::DONTWAIT | SendFlags::NOSIGNAL).map_err(Into::into)
        }
        #[cfg(not(unix))]
        {
            let _ = buf;
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// Sends `error: REASON` if the socket takes it at once, never waiting: for ends where the
    /// client must not hold anything up (a stop, an eviction). The reset follows when the socket
    /// is closed.
    pub(crate) fn tell_now(&self, reason: &str) {
        let _ = SockRef::from(&self.tcp).set_linger(Some(Duration::ZERO));
        if self.tcp.set_nonblocking(true).is_ok() {
            // Out at once: the reset that follows would discard it still queued.
            let _ = self.tcp.set_nodelay(true);
            let _ = (&self.tcp).write(format!("error: {reason}\n").as_bytes());
        }
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
        let mut scratch = [0; 512];
        let line = format!("error: {reason}\n");
        if self.send(line.as_bytes(), linger, || false).is_err() {
            return;
        }
        let deadline = Instant::now() + linger;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.tcp.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match self.read(&mut scratch) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Ends the connection with a clean close (FIN): only after the client's end of stream was
    /// read and everything before it printed.
    pub(crate) fn close_cleanly(&self) {
        let _ = SockRef::from(&self.tcp).set_linger(None);
        let _ = self.tcp.shutdown(Shutdown::Write);
    }
}

/// Refuses a connection that never became a client (queued when the server stopped, a thread
/// that could not start): `error: REASON` if the socket takes it at once, then a reset.
pub(crate) fn turn_away_now(tcp: &TcpStream, reason: &str) {
    let _ = SockRef::from(tcp).set_linger(Some(Duration::ZERO));
    if tcp.set_nonblocking(true).is_ok() {
        let _ = (&*tcp).write(format!("error: {reason}\n").as_bytes());
    }
}
