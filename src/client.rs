//! The blocking client: connect with a timeout, send messages, receive messages.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::framing::{Batch, Decoder, Framing};
use crate::send;
use crate::tls::ClientTls;
use crate::transport::{self, Transport};
use crate::{Error, addr};

/// The longest line a [`Receiver`] accepts before giving up on the connection.
pub(crate) const RECEIVE_MAX_LINE: usize = 1024 * 1024;

/// A connection to a server.
///
/// Sending and receiving can happen on different threads: [`receiver`](Client::receiver) shares
/// the same socket (no second file descriptor).
///
/// Clones share the connection (and its one file descriptor), so one thread can send while another
/// closes or receives.
#[derive(Debug, Clone)]
pub struct Client {
    stream: Arc<Transport>,
    peer: SocketAddr,
    framing: Framing,
    send_timeout: Option<Duration>,
}

impl Client {
    /// Connects to `host:port`, trying each address the host resolves to in turn.
    ///
    /// Each attempt waits at most `timeout`; `Duration::ZERO` leaves it to the operating system.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Client, Error> {
        Client::connect_with(host, port, timeout, None)
    }

    /// [`connect`](Client::connect), then a TLS handshake as `tls` says, within the same
    /// `timeout` (zero: 10 s). A server that is not trusted, or not a TLS server, is an
    /// [`Error::Handshake`].
    pub fn connect_tls(
        host: &str,
        port: u16,
        timeout: Duration,
        tls: &ClientTls,
    ) -> Result<Client, Error> {
        Client::connect_with(host, port, timeout, Some(tls))
    }

    fn connect_with(
        host: &str,
        port: u16,
        timeout: Duration,
        tls: Option<&ClientTls>,
    ) -> Result<Client, Error> {
        let (stream, peer) = Transport::connect(&addr::resolve(host, port)?, host, timeout, tls)?;
        let client = Client::new(stream, peer);
        // Each message is one write that should leave at once, not wait for an ACK. Best
        // effort: it fails only on a connection the server has already reset (a refusal), and
        // then the reason is what the client must get to read.
        let _ = client.stream.tcp().set_nodelay(true);
        Ok(client)
    }

    /// Wraps a connected stream.
    pub fn from_stream(stream: TcpStream) -> Client {
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        Client::new(Transport::plain(stream), peer)
    }

    pub(crate) fn from_transport(stream: Transport, peer: SocketAddr) -> Client {
        Client::new(stream, peer)
    }

    fn new(stream: Transport, peer: SocketAddr) -> Client {
        send::reset_unless_finished(stream.tcp());
        Client {
            stream: Arc::new(stream),
            peer,
            framing: Framing::Line,
            send_timeout: None,
        }
    }

    /// Gives up a send when the server takes nothing of it for `timeout` (`None`: waits for
    /// ever), with [`Error::SendTimeout`]. Clones made afterwards share the setting.
    pub fn set_send_timeout(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        self.send_timeout =
            send::set_send_timeout(self.stream.tcp(), timeout).map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// Writes all of `bytes`, within the send timeout if there is one.
    fn write_all(&self, bytes: &[u8]) -> Result<(), Error> {
        transport::send_to(&self.stream, self.peer, bytes, self.send_timeout)
    }

    /// Writes bytes exactly as they are, whatever the framing: no `\n` is added, and what they
    /// hold may be any number of messages, or part of one.
    pub fn write_unframed(&self, bytes: &[u8]) -> Result<(), Error> {
        self.write_all(bytes)
    }

    /// Uses `framing` for what is sent and received from now on (default: [`Framing::Line`]).
    pub fn with_framing(mut self, framing: Framing) -> Client {
        self.framing = framing;
        self
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// This end's address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.stream.tcp().local_addr().map_err(|e| self.failed(e))
    }

    /// Sends one message: in line framing followed by `\n`, in raw framing as it is.
    ///
    /// In line framing a message containing `\n` arrives as several messages.
    pub fn send(&self, message: &str) -> Result<(), Error> {
        self.send_bytes(message.as_bytes())
    }

    /// Sends bytes as one message: in line framing followed by `\n`, in raw framing as they are.
    pub fn send_bytes(&self, message: &[u8]) -> Result<(), Error> {
        match self.framing {
            Framing::Line => {
                let mut line = Vec::with_capacity(message.len() + 1);
                line.extend_from_slice(message);
                line.push(b'\n');
                self.write_all(&line)
            }
            Framing::Raw => self.write_all(message),
        }
    }

    /// The framing in use.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Whether the server has closed its side already, to be asked before
    /// [`finish`](Client::finish): a plugboard server closes only after it has read the client's
    /// own end, so a close before it means the server stopped sending early, and confirms
    /// nothing.
    ///
    /// Looks at the socket without reading; while what the server sent before its close is still
    /// unread (a [`Receiver`] on another thread is printing it), waits for that at most 100 ms.
    /// Off Unix it can't look, and says `false`.
    pub fn closed_early(&self) -> bool {
        closed_early(self.stream.tcp())
    }

    /// Half-closes the connection: tells the server nothing more will be sent (under TLS with
    /// `close_notify` first). Receiving goes on until the server closes its side.
    pub fn finish(&self) -> Result<(), Error> {
        transport::finish_sending(&self.stream, self.send_timeout).map_err(|e| self.failed(e))
    }

    /// Closes both directions at once; a [`Receiver`] blocked on another thread wakes and ends.
    pub fn close(&self) {
        let _ = self.stream.tcp().shutdown(Shutdown::Both);
    }

    /// An iterator over the messages the server sends, ending when the server closes.
    ///
    /// It shares this client's socket, so it can run on its own thread while this one sends. In
    /// line framing a line longer than 1 MiB ends it with an error.
    pub fn receiver(&self) -> Receiver {
        Receiver {
            stream: Arc::clone(&self.stream),
            peer: self.peer,
            // Shown on a terminal as they come: raw chunks keep their newlines. A line may be
            // longer than a server's own limit (a relayed line carries its sender's address).
            decoder: Decoder::new(self.framing)
                .max_line(RECEIVE_MAX_LINE)
                .keep_newlines(true),
            batch: Batch::new(),
            ready: VecDeque::new(),
            buf: vec![0; 16 * 1024],
            done: false,
            failure: None,
        }
    }

    fn failed(&self, source: io::Error) -> Error {
        Error::Connection {
            addr: self.peer,
            source,
        }
    }
}

/// See [`Client::closed_early`].
pub(crate) fn closed_early(stream: &TcpStream) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_millis(100);
    loop {
        match server_closed(stream) {
            Some(closed) => return closed,
            // Unread data in front of any close: the reader is on it.
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            None => return false,
        }
    }
}

/// Whether the peer's FIN has arrived, without reading: `None` while data is unread in front of
/// where it would be.
#[cfg(unix)]
fn server_closed(stream: &TcpStream) -> Option<bool> {
    use rustix::net::{RecvFlags, recv};
    let mut byte = [0u8; 1];
    match recv(stream, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((0, _)) => Some(true),
        Ok(_) | Err(rustix::io::Errno::INTR) => None,
        Err(rustix::io::Errno::AGAIN) => Some(false),
        // Reset or worse: closed too, and whoever reads says how.
        Err(_) => Some(true),
    }
}

#[cfg(not(unix))]
fn server_closed(_: &TcpStream) -> Option<bool> {
    Some(false)
}

/// The messages a server sends, in order: lines (without `\n`) or raw chunks.
///
/// A last line without `\n` is yielded when the server closes. After an error, it ends.
#[derive(Debug)]
pub struct Receiver {
    stream: Arc<Transport>,
    peer: SocketAddr,
    decoder: Decoder,
    batch: Batch,
    ready: VecDeque<String>,
    buf: Vec<u8>,
    done: bool,
    failure: Option<Error>,
}

impl Receiver {
    fn fail(&mut self, source: io::Error) {
        self.done = true;
        self.failure = Some(Error::Connection {
            addr: self.peer,
            source,
        });
    }

    fn take_batch(&mut self) {
        self.ready.extend(self.batch.iter().map(str::to_string));
        self.batch.clear();
    }
}

impl Iterator for Receiver {
    type Item = Result<String, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(message) = self.ready.pop_front() {
                return Some(Ok(message));
            }
            if self.done {
                // Messages that arrived before a failure come first, then the failure, once.
                return self.failure.take().map(Err);
            }
            let decoded = match self.stream.read(&mut self.buf) {
                Ok(0) => {
                    self.done = true;
                    self.decoder.finish(&mut self.batch)
                }
                Ok(n) => self.decoder.feed(&self.buf[..n], &mut self.batch),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
                Err(source) => {
                    self.fail(source);
                    Ok(())
                }
            };
            if let Err(too_long) = decoded {
                self.fail(io::Error::new(io::ErrorKind::InvalidData, too_long));
            }
            self.take_batch();
        }
    }
}
