//! How a server treats its clients: [`ServerOptions`], the [`Mode`], their defaults, and the one
//! check that they make sense ([`ServerOptions::validate`], which [`Server::bind`] runs and the
//! `server` binary reports as a usage error).
//!
//! [`Server::bind`]: crate::Server::bind

use std::time::Duration;

use crate::error::Error;
use crate::framing::{DEFAULT_MAX_LINE, Framing};
use crate::limits::{Access, Range};
use crate::tls::ServerTls;

/// The greeting sent when none is configured; `{peer}` becomes the client's address.
pub const DEFAULT_GREETING: &str = "welcome to plugboard, {peer}";

/// Stack size of each connection thread. The reader needs little (its buffers live on the heap),
/// and only the pages it touches count against memory: about 8 KiB in practice.
pub(crate) const CONNECTION_STACK: usize = 64 * 1024;

/// Stack size of a TLS connection's thread: the handshake's cryptography goes deeper.
pub(crate) const TLS_CONNECTION_STACK: usize = 256 * 1024;

/// The default for [`ServerOptions::tls_handshake_timeout`].
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this system has `SO_REUSEPORT` (what socket2 offers it on).
pub(crate) const CAN_REUSE_PORT: bool = cfg!(all(
    unix,
    not(any(
        target_os = "solaris",
        target_os = "illumos",
        target_os = "cygwin",
        target_os = "nuttx",
        target_os = "wasi"
    ))
));

/// The room [`ChatBus`] joins when none is named.
pub const DEFAULT_CHAT_ROOM: &str = "plugboard";

/// How long a chat server waits for Redis at start before it gives up (exit 1).
pub(crate) const CHAT_BUS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A chat room shared by servers through Redis pub/sub: a Redis URL and the room's name, which
/// is the channel's.
///
/// Every line a server's clients send goes to its own clients as always, and is published once;
/// every line another server publishes on the channel goes to this server's clients. Redis
/// pub/sub delivers at most once: lines lost while a server was cut off from Redis are counted
/// ([`Summary::chat_bus_lost`](crate::Summary::chat_bus_lost)), not repaired.
///
/// ```
/// use plugboard::{ChatBus, Mode, ServerOptions};
///
/// let options = ServerOptions::default()
///     .mode(Mode::Chat)
///     .chat_bus(Some(ChatBus::new("redis://127.0.0.1:6379").room("lobby")));
/// assert!(options.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatBus {
    pub(crate) url: String,
    pub(crate) room: String,
}

impl ChatBus {
    /// The bus at `url`, `redis://HOST:PORT[/DB]`, in room [`DEFAULT_CHAT_ROOM`].
    pub fn new(url: impl Into<String>) -> ChatBus {
        ChatBus {
            url: url.into(),
            room: DEFAULT_CHAT_ROOM.to_string(),
        }
    }

    /// The room: the Redis channel's name; 1 to 256 bytes, no control characters.
    pub fn room(mut self, room: impl Into<String>) -> ChatBus {
        self.room = room.into();
        self
    }

    /// Why the URL (`chat_bus`) or the room (`chat_room`) can't be used, if either can't.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let shown = crate::bus::redacted(&self.url);
        if !self.url.starts_with("redis://") {
            return Err((
                "chat_bus",
                format!("{shown:?} is not a Redis URL (redis://HOST:PORT[/DB])"),
            ));
        }
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(self.url.as_str()) {
            return Err(("chat_bus", format!("{shown:?}: {e}")));
        }
        if self.room.is_empty() || self.room.len() > 256 || self.room.chars().any(char::is_control)
        {
            return Err((
                "chat_room",
                format!("{:?}: 1 to 256 bytes with no control characters", self.room),
            ));
        }
        Ok(())
    }
}

/// How long a PROXY protocol header may take to arrive, by default: the specification asks
/// receivers to wait at least 3 seconds; a proxy sends it at once.
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The default for [`ServerOptions::buffer_budget`].
pub const DEFAULT_BUFFER_BUDGET: usize = 256 * 1024 * 1024;

/// What the server does with each message, besides handing it to the [`Sink`](crate::Sink).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Only print (deliver to the sink).
    #[default]
    Log,
    /// Also send every message back to its sender, byte for byte.
    Echo,
    /// Also send every message to every other client as `PEER MESSAGE`.
    Chat,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Log => "log",
            Mode::Echo => "echo",
            Mode::Chat => "chat",
        })
    }
}

/// How a [`Server`](crate::Server) treats its clients, built from the defaults with its setters:
///
/// ```
/// use std::time::Duration;
/// use plugboard::{Mode, ServerOptions};
///
/// let options = ServerOptions::default()
///     .mode(Mode::Echo)
///     .max_clients(100)
///     .idle_timeout(Some(Duration::from_secs(30)));
/// assert!(options.validate().is_ok());
/// assert!(ServerOptions::default().max_clients(0).validate().is_err());
/// ```
///
/// The setters take any value; [`validate`](ServerOptions::validate) (run by
/// [`Server::bind`](crate::Server::bind)) refuses the ones that make no sense.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub(crate) greeting: Option<String>,
    pub(crate) framing: Framing,
    pub(crate) backlog: i32,
    pub(crate) max_clients: usize,
    pub(crate) max_line: usize,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) access: Access,
    pub(crate) mode: Mode,
    pub(crate) send_timeout: Duration,
    pub(crate) buffer_budget: usize,
    pub(crate) tls: Option<ServerTls>,
    pub(crate) tls_handshake_timeout: Duration,
    /// With the PROXY protocol: who may send the header.
    pub(crate) trusted_proxies: Option<Vec<Range>>,
    pub(crate) proxy_header_timeout: Duration,
    pub(crate) reuse_port: bool,
    pub(crate) chat_bus: Option<ChatBus>,
    /// For tests: connection threads after which every start fails, as if the system had no
    /// more (see [`ServerOptions::fail_threads_after`]).
    pub(crate) thread_limit: Option<usize>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            greeting: Some(DEFAULT_GREETING.to_string()),
            framing: Framing::Line,
            backlog: 4096,
            max_clients: 10_000,
            max_line: DEFAULT_MAX_LINE,
            idle_timeout: None,
            access: Access::new(),
            mode: Mode::Log,
            send_timeout: Duration::from_secs(5),
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            tls: None,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            trusted_proxies: None,
            proxy_header_timeout: DEFAULT_PROXY_HEADER_TIMEOUT,
            reuse_port: false,
            chat_bus: None,
            thread_limit: None,
        }
    }
}

impl ServerOptions {
    /// Sent to each client on connect (a `\n` is added in line framing); `{peer}` becomes the
    /// client's address. `None` or an empty string sends nothing. Default: [`DEFAULT_GREETING`].
    pub fn greeting(mut self, greeting: Option<impl Into<String>>) -> ServerOptions {
        self.greeting = greeting.map(Into::into).filter(|g: &String| !g.is_empty());
        self
    }

    /// How the byte stream is cut into messages. Default: lines.
    pub fn framing(mut self, framing: Framing) -> ServerOptions {
        self.framing = framing;
        self
    }

    /// The listen backlog: connections the kernel queues before `accept`; at least 1. Default
    /// 4096.
    pub fn backlog(mut self, backlog: i32) -> ServerOptions {
        self.backlog = backlog;
        self
    }

    /// Most clients connected at once, at least 1; one more is told `error: server full (N
    /// clients)`. Default 10,000.
    pub fn max_clients(mut self, max_clients: usize) -> ServerOptions {
        self.max_clients = max_clients;
        self
    }

    /// Longest line in bytes (line framing), at least 1; a longer one cuts the client off.
    /// Default [`DEFAULT_MAX_LINE`](crate::DEFAULT_MAX_LINE).
    pub fn max_line(mut self, max_line: usize) -> ServerOptions {
        self.max_line = max_line;
        self
    }

    /// Cut off a client that completes no message for this long; `None` (the default): never.
    /// `Some` of zero is refused by [`validate`](ServerOptions::validate).
    pub fn idle_timeout(mut self, idle_timeout: Option<Duration>) -> ServerOptions {
        self.idle_timeout = idle_timeout;
        self
    }

    /// What happens to each message besides printing. Default: [`Mode::Log`].
    pub fn mode(mut self, mode: Mode) -> ServerOptions {
        self.mode = mode;
        self
    }

    /// How long a send to a client may make no progress (echo, chat), and how long a chat sender
    /// waits for a recipient's full queue, before that client is disconnected; more than zero.
    /// Default 5 s.
    pub fn send_timeout(mut self, send_timeout: Duration) -> ServerOptions {
        self.send_timeout = send_timeout;
        self
    }

    /// Which client addresses are admitted. Default: all.
    pub fn access(mut self, access: Access) -> ServerOptions {
        self.access = access;
        self
    }

    /// Bytes all connections' buffers may hold together beyond each one's small allowance (a
    /// 1 KiB read and lines of a few KiB): larger reads and long unfinished lines come out of it.
    /// A client whose unfinished line finds it spent is cut off with `error: server busy`.
    /// Default [`DEFAULT_BUFFER_BUDGET`].
    pub fn buffer_budget(mut self, bytes: usize) -> ServerOptions {
        self.buffer_budget = bytes;
        self
    }

    /// Serves every client under TLS with this certificate (and, if it says so, requires
    /// theirs). `None` (the default): in the clear.
    pub fn tls(mut self, tls: Option<ServerTls>) -> ServerOptions {
        self.tls = tls;
        self
    }

    /// How long a client's TLS handshake may take in all; one that sends nothing, or stalls
    /// halfway, is disconnected then (and counted in [`Summary::handshakes_failed`]); more
    /// than zero. Default [`DEFAULT_TLS_HANDSHAKE_TIMEOUT`].
    ///
    /// [`Summary::handshakes_failed`]: crate::Summary::handshakes_failed
    pub fn tls_handshake_timeout(mut self, timeout: Duration) -> ServerOptions {
        self.tls_handshake_timeout = timeout;
        self
    }

    /// Expects a PROXY protocol header (HAProxy's, version 1 or 2) at the start of every
    /// connection, from these ranges only, and serves each connection as the client the header
    /// names: its output lines, log lines, `--allow`/`--deny`, greeting and chat lines all use
    /// that address. A connection from anywhere else is refused, and so is one whose header is
    /// missing, malformed, or late (see [`proxy_header_timeout`](ServerOptions::proxy_header_timeout)).
    /// A version 2 `LOCAL` header (a health check) keeps the connection's own address. `None`
    /// (the default): no header is expected; `Some` of no range is refused by
    /// [`validate`](ServerOptions::validate).
    pub fn proxy_protocol(mut self, trusted: Option<Vec<Range>>) -> ServerOptions {
        self.trusted_proxies = trusted;
        self
    }

    /// How long a connection's PROXY protocol header may take to arrive in all; more than zero.
    /// Default [`DEFAULT_PROXY_HEADER_TIMEOUT`].
    pub fn proxy_header_timeout(mut self, timeout: Duration) -> ServerOptions {
        self.proxy_header_timeout = timeout;
        self
    }

    /// Lets other sockets listen on the same address and port (`SO_REUSEPORT`), so that several
    /// servers share it and the kernel spreads connections among them. Linux and the BSDs only:
    /// elsewhere [`Server::bind`](crate::Server::bind) fails with [`Error::Options`]. Default off.
    pub fn reuse_port(mut self, reuse: bool) -> ServerOptions {
        self.reuse_port = reuse;
        self
    }

    /// In [`Mode::Chat`]: joins the room to the rooms of other servers on the same Redis
    /// channel (see [`ChatBus`]). `None` (the default): the room is this server's alone.
    pub fn chat_bus(mut self, bus: Option<ChatBus>) -> ServerOptions {
        self.chat_bus = bus;
        self
    }

    /// Fault injection for tests: after `threads` connection threads have started, starting
    /// one fails as if the system had no more threads (or memory for their stacks) to give, so
    /// that a test can see what the server does then without exhausting the machine.
    #[doc(hidden)]
    pub fn fail_threads_after(mut self, threads: usize) -> ServerOptions {
        self.thread_limit = Some(threads);
        self
    }

    /// Checks that the options make sense: [`Error::Options`] names the first that doesn't.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |option, problem: &str| {
            Err(Error::Options {
                option,
                problem: problem.to_string(),
            })
        };
        if self.backlog < 1 {
            return invalid("backlog", "must be at least 1");
        }
        if self.max_clients < 1 {
            return invalid("max_clients", "must be at least 1");
        }
        if self.max_line < 1 {
            return invalid("max_line", "must be at least 1");
        }
        if self.send_timeout.is_zero() {
            return invalid("send_timeout", "must be more than 0");
        }
        if self.tls_handshake_timeout.is_zero() {
            return invalid("tls_handshake_timeout", "must be more than 0");
        }
        if self.proxy_header_timeout.is_zero() {
            return invalid("proxy_header_timeout", "must be more than 0");
        }
        if self.trusted_proxies.as_ref().is_some_and(Vec::is_empty) {
            return invalid(
                "proxy_protocol",
                "needs at least one trusted proxy range (--trusted-proxy)",
            );
        }
        if self.reuse_port && !CAN_REUSE_PORT {
            return invalid(
                "reuse_port",
                "SO_REUSEPORT is not available on this system (Linux and the BSDs have it)",
            );
        }
        if let Some(bus) = &self.chat_bus {
            if self.mode != Mode::Chat {
                return invalid("chat_bus", "is for chat mode: add --mode chat");
            }
            if let Err((option, problem)) = bus.check() {
                return invalid(option, &problem);
            }
        }
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            return invalid(
                "idle_timeout",
                "must be more than 0 (None: no idle timeout)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::ServerOptions;
    use crate::{Collector, Error, Server};

    /// Each option that once made a server misbehave (`send_timeout` zero: every echo client
    /// told `server busy`; an idle timeout of zero: everyone cut off at once) is refused by
    /// `bind`, named.
    #[test]
    fn bind_refuses_options_that_make_no_sense() {
        let cases = [
            (
                ServerOptions::default().send_timeout(Duration::ZERO),
                "send_timeout",
            ),
            (
                ServerOptions::default().idle_timeout(Some(Duration::ZERO)),
                "idle_timeout",
            ),
            (ServerOptions::default().max_clients(0), "max_clients"),
            (ServerOptions::default().max_line(0), "max_line"),
            (ServerOptions::default().backlog(0), "backlog"),
        ];
        for (options, name) in cases {
            match Server::bind("127.0.0.1", 0, options, Arc::new(Collector::new())) {
                Err(Error::Options { option, .. }) => assert_eq!(option, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        let fine = ServerOptions::default().idle_timeout(Some(Duration::from_millis(1)));
        assert!(fine.validate().is_ok());
    }
}
