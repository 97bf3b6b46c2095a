//! The crate's one error type.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Everything that can go wrong while serving or connecting.
///
/// `Display` is a short lowercase phrase naming the address; the operating system's cause is the
/// [`source`](std::error::Error::source), so `{:#}` in `anyhow` prints both on one line.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A host name could not be turned into an address.
    Resolve {
        /// The name as given.
        host: String,
        /// Why the lookup failed.
        source: io::Error,
    },
    /// The server could not listen on an address (in use, not permitted, not local, ...).
    Bind {
        /// The address it tried.
        addr: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A connection could not be made.
    Connect {
        /// The address it tried.
        addr: SocketAddr,
        /// The operating system's reason (`ConnectionRefused`, ...).
        source: io::Error,
    },
    /// No answer from the address within the connect timeout.
    ConnectTimeout {
        /// The address it tried.
        addr: SocketAddr,
        /// How long it waited.
        timeout: Duration,
    },
    /// The server took nothing of what was being sent for the whole send timeout.
    SendTimeout {
        /// The server.
        addr: SocketAddr,
        /// How long nothing was taken.
        timeout: Duration,
    },
    /// An established connection failed while sending or receiving.
    Connection {
        /// The peer.
        addr: SocketAddr,
        /// The operating system's reason (`ConnectionReset`, `BrokenPipe`, ...).
        source: io::Error,
    },
    /// The server ended the connection and said why: its `error: ` line.
    Ended {
        /// The server.
        addr: SocketAddr,
        /// The server's line, `error: ` included.
        reason: String,
    },
    /// The server closed its side before the client had finished sending: a plugboard server
    /// never does, so nothing sent is confirmed.
    ClosedEarly {
        /// The server.
        addr: SocketAddr,
    },
    /// The server did not close the connection within the linger time after the client's end:
    /// delivery is not confirmed.
    Unconfirmed {
        /// The server.
        addr: SocketAddr,
        /// How long the client waited.
        waited: Duration,
    },
    /// Round trips: a message's echo did not come back.
    NoEcho {
        /// The server.
        addr: SocketAddr,
        /// The message's number.
        message: u64,
        /// How long the client waited; `None` if the server closed the connection instead.
        waited: Option<Duration>,
    },
    /// Load mode's chat: the server sent no greeting, so the client can't tell when it has joined
    /// the room.
    NoGreeting {
        /// The server.
        addr: SocketAddr,
        /// How long the client waited.
        waited: Duration,
    },
    /// Load mode's chat: not every message from the other connections arrived.
    Undelivered {
        /// The server.
        addr: SocketAddr,
        /// Messages from the others that arrived.
        received: u64,
        /// Messages the others sent.
        expected: u64,
        /// How long nothing more arrived before the client gave up; zero if the server closed
        /// the connection first.
        waited: Duration,
    },
    /// Load mode, chat: more lines arrived from the others than they sent. Someone else is
    /// talking in the room, and the count can't tell their lines from this run's.
    Overheard {
        /// The server.
        addr: SocketAddr,
        /// Lines from the others that arrived.
        received: u64,
        /// Messages the others sent.
        expected: u64,
    },
    /// TLS could not be set up: a certificate, key or CA file that can't be read or used, a pin
    /// that is not a fingerprint.
    Tls {
        /// What was being set up, naming the file.
        context: String,
        /// What is wrong.
        problem: String,
    },
    /// The TLS handshake with a server failed: its certificate was not trusted, it is not a TLS
    /// server, it refused this client's certificate, ...
    Handshake {
        /// The server.
        addr: SocketAddr,
        /// Why, as a phrase.
        problem: String,
    },
    /// Received messages could not be written out (for the server binary: stdout).
    Output(io::Error),
    /// The operating system refused to start a thread.
    Thread(io::Error),
    /// A thread of the library's own panicked (a bug): what it was doing is lost.
    Panicked(&'static str),
    /// The chat bus (Redis pub/sub, which joins chat servers' rooms) could not be reached when
    /// starting: Redis is down, unreachable, not answering, or refused the subscription.
    ChatBus {
        /// The Redis URL, as given.
        url: String,
        /// Why, as a phrase.
        problem: String,
    },
    /// An option that makes no sense (see [`ServerOptions::validate`](crate::ServerOptions::validate)).
    Options {
        /// The option's name, as its setter is called.
        option: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Resolve { host, .. } => write!(f, "cannot resolve {host}"),
            Error::Bind { addr, .. } => write!(f, "cannot listen on {addr}"),
            Error::Connect { addr, .. } => write!(f, "cannot connect to {addr}"),
            Error::ConnectTimeout { addr, timeout } => write!(
                f,
                "cannot connect to {addr}: no answer within {}",
                humantime::format_duration(*timeout)
            ),
            Error::SendTimeout { addr, timeout } => write!(
                f,
                "cannot send to {addr}: nothing taken for {}",
                humantime::format_duration(*timeout)
            ),
            Error::Connection { addr, .. } => write!(f, "connection to {addr} failed"),
            Error::Ended { addr, reason } => write!(f, "{addr} closed the connection: {reason}"),
            Error::ClosedEarly { addr } => write!(
                f,
                "{addr} closed its side before the client had finished: it confirmed nothing"
            ),
            Error::Unconfirmed { addr, waited } => write!(
                f,
                "{addr} did not confirm delivery: no close within {} of the last message",
                humantime::format_duration(*waited)
            ),
            Error::NoEcho {
                addr,
                message,
                waited: Some(waited),
            } => write!(
                f,
                "no echo of message {message} from {addr} within {} (is it an echo server?)",
                humantime::format_duration(*waited)
            ),
            Error::NoEcho {
                addr,
                message,
                waited: None,
            } => write!(f, "{addr} closed before echoing message {message}"),
            Error::NoGreeting { addr, waited } => write!(
                f,
                "no greeting from {addr} within {}: chat load needs one, to know it has joined the room",
                humantime::format_duration(*waited)
            ),
            Error::Undelivered {
                addr,
                received,
                expected,
                waited,
            } if waited.is_zero() => write!(
                f,
                "{addr} closed the connection when {received} of the {expected} messages from the other connections had arrived"
            ),
            Error::Undelivered {
                addr,
                received,
                expected,
                waited,
            } => write!(
                f,
                "{addr}: {received} of the {expected} messages from the other connections arrived, then none for {}",
                humantime::format_duration(*waited)
            ),
            Error::Overheard {
                addr,
                received,
                expected,
            } => write!(
                f,
                "{addr}: {received} lines arrived from the other connections, which sent {expected}: someone else is talking in the room, so deliveries can't be counted"
            ),
            Error::Tls { context, problem } => write!(f, "{context}: {problem}"),
            Error::Handshake { addr, problem } => {
                write!(f, "TLS handshake with {addr} failed: {problem}")
            }
            Error::Output(_) => f.write_str("cannot write output"),
            Error::Thread(_) => f.write_str("cannot start a thread"),
            Error::Panicked(what) => write!(f, "{what} panicked"),
            Error::ChatBus { url, problem } => {
                write!(f, "cannot reach the chat bus {url}: {problem}")
            }
            Error::Options { option, problem } => write!(f, "invalid {option}: {problem}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Resolve { source, .. }
            | Error::Bind { source, .. }
            | Error::Connect { source, .. }
            | Error::Connection { source, .. }
            | Error::Output(source)
            | Error::Thread(source) => Some(source),
            Error::ConnectTimeout { .. }
            | Error::SendTimeout { .. }
            | Error::Ended { .. }
            | Error::ClosedEarly { .. }
            | Error::Unconfirmed { .. }
            | Error::NoEcho { .. }
            | Error::NoGreeting { .. }
            | Error::Undelivered { .. }
            | Error::Overheard { .. }
            | Error::Tls { .. }
            | Error::Handshake { .. }
            | Error::Panicked(_)
            | Error::ChatBus { .. }
            | Error::Options { .. } => None,
        }
    }
}

/// `error` and each of its causes, joined by `: ` (what `anyhow`'s `{:#}` prints), for a report
/// that holds it as text.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}
