//! plugboard: a thread-per-connection TCP message server and a blocking client.
//!
//! A [`Server`] listens on an address, greets each client, cuts what each client sends into
//! messages ([`Framing`]) and hands them to a [`Sink`]: the `server` binary prints them to stdout,
//! a test collects them. A [`Client`] connects, sends messages and receives what the server says.
//!
//! In [`Mode::Echo`] each message also goes back to its sender, in [`Mode::Chat`] to every other
//! client. [`run_load`] drives many connections at once and measures throughput and round trips.
//!
//! Plain blocking `std::net` and threads: one accept thread, one thread per client. Stopping is
//! explicit and complete: [`Server::stop`] (or a [`Stopper`] from another thread) stops accepting,
//! lets each connection read what had already arrived, closes it, and [`Server::join`] waits for
//! every thread ([`Server::wait`], for a program that exits next, waits for every connection but
//! lets the process exit end their threads).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use plugboard::{Client, Collector, Server, ServerOptions};
//!
//! # fn main() -> Result<(), plugboard::Error> {
//! // Port 0: the OS picks a free port; local_addr() says which.
//! let collector = Arc::new(Collector::new());
//! let server = Server::bind("127.0.0.1", 0, ServerOptions::default(), collector.clone())?;
//! let port = server.local_addr().port();
//!
//! let client = Client::connect("127.0.0.1", port, Duration::from_secs(5))?;
//! let mut received = client.receiver();
//! let greeting = received.next().expect("a greeting")?;
//! assert!(greeting.starts_with("welcome to plugboard"));
//!
//! client.send("hello world 0")?;
//! client.finish()?; // half-close: the server reads the rest, then closes
//! assert!(received.next().is_none());
//!
//! server.stop();
//! let summary = server.join()?;
//! assert_eq!(summary.messages, 1);
//! let messages = collector.messages();
//! assert_eq!(messages[0].1, "hello world 0");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod addr;
mod bus;
mod client;
mod connection;
mod context;
mod error;
mod fanout;
mod framing;
mod limits;
mod load;
mod options;
mod pace;
mod proxy;
mod room;
mod scan;
mod send;
mod server;
mod sink;
mod stream;
mod tls;
mod transport;
mod turnaway;

pub use client::{Client, Receiver};
pub use error::Error;
pub use framing::{Batch, DEFAULT_MAX_LINE, Framing, UnknownFraming};
pub use limits::{Access, BadRange, Range, raise_fd_limit};
pub use load::{Latency, LoadOptions, LoadReport, Progress, run_load, run_load_across};
pub use options::{
    ChatBus, DEFAULT_BUFFER_BUDGET, DEFAULT_CHAT_ROOM, DEFAULT_GREETING,
    DEFAULT_PROXY_HEADER_TIMEOUT, DEFAULT_TLS_HANDSHAKE_TIMEOUT, Mode, ServerOptions,
};
pub use server::{Server, Stopper, Summary};
pub use sink::{Collector, LineWriterSink, Sink, stdout};
pub use tls::{ClientTls, ServerTls};

/// Internals that the benchmarks, examples and tests reach for: the decoder, the formatting and
/// escaping of output lines, the descriptor reservation. Not part of the stable API: they change
/// when the implementation does.
#[doc(hidden)]
pub mod unstable {
    pub use crate::framing::{Decoder, LineTooLong, escape_into, needs_escape};
    pub use crate::limits::reserve_descriptors;
    pub use crate::sink::{format_batch, reader_gone};

    /// `n` and `word`, plural unless `n` is one: `1 connection`, `2 connections`.
    pub fn plural(n: u64, word: &str) -> String {
        if n == 1 {
            format!("1 {word}")
        } else {
            format!("{n} {word}s")
        }
    }
}
