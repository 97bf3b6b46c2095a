//! What a connection may see of its server: the options, the sink, the chat room, the buffer
//! budget, the stop signal and the totals. The server (above) owns listening, the registry of
//! connections and the lifecycle; a connection (below it) gets only this.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tracing::{error, info};

use crate::bus::{Bus, BusCounts};
use crate::limits::ThreadRoom;
use crate::options::ServerOptions;
use crate::room::Room;
use crate::sink::{self, Sink};

/// How long after a stop a busy connection may go on reading, so that a client in the middle of
/// sending can finish and have everything printed.
pub(crate) const DRAIN_TIME: Duration = Duration::from_millis(500);

/// The server as its connections see it.
pub(crate) struct Context {
    pub(crate) options: ServerOptions,
    pub(crate) sink: Arc<dyn Sink>,
    /// The chat room (empty unless the mode is chat).
    pub(crate) room: Room,
    /// The chat bus that joins the room to other servers' (`--chat-bus`), once connected.
    pub(crate) bus: OnceLock<Bus>,
    /// Memory the connections' buffers may take beyond their allowance.
    pub(crate) budget: Budget,
    /// The start of the server's clock for [`Stream::touch`](crate::stream::Stream::touch).
    epoch: Instant,
    stopping: AtomicBool,
    /// Set by `Server::wait`: after a stop, connection threads park instead of exiting.
    exit_follows: AtomicBool,
    stopped_at: OnceLock<Instant>,
    messages: AtomicU64,
    /// Messages handed to the sink (printed, queued, or refused): read but not yet handed (a
    /// connection given up on at the stop's bound, still relaying or waiting for the sink's
    /// queue) is not printed either.
    handed: AtomicU64,
    /// Messages read that the sink refused (it had failed, or the stop gave up waiting for it).
    refused_messages: AtomicU64,
    bytes: AtomicU64,
    /// TLS handshakes that failed or timed out.
    handshakes_failed: AtomicU64,
    /// Connections refused for their PROXY protocol header (missing, malformed, late).
    proxy_headers_failed: AtomicU64,
    output_error: Mutex<Option<io::Error>>,
    /// Asks the server to stop (what a failed output does).
    request_stop: Box<dyn Fn() + Send + Sync>,
}

/// The totals a [`Context`] counts.
pub(crate) struct Totals {
    pub(crate) messages: u64,
    pub(crate) unprinted: u64,
    pub(crate) bytes: u64,
    pub(crate) handshakes_failed: u64,
    pub(crate) proxy_headers_failed: u64,
}

impl Context {
    /// A context whose [`output_failed`](Context::output_failed) calls `request_stop`.
    pub(crate) fn new(
        options: ServerOptions,
        sink: Arc<dyn Sink>,
        threads: Arc<ThreadRoom>,
        request_stop: Box<dyn Fn() + Send + Sync>,
    ) -> Context {
        Context {
            budget: Budget::new(options.buffer_budget),
            options,
            sink,
            room: Room::new(threads),
            bus: OnceLock::new(),
            epoch: Instant::now(),
            stopping: AtomicBool::new(false),
            exit_follows: AtomicBool::new(false),
            stopped_at: OnceLock::new(),
            messages: AtomicU64::new(0),
            handed: AtomicU64::new(0),
            refused_messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            proxy_headers_failed: AtomicU64::new(0),
            output_error: Mutex::new(None),
            request_stop,
        }
    }

    /// Milliseconds since the server started: the clock of
    /// [`Stream::touch`](crate::stream::Stream::touch).
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Marks the server stopping; returns when, the first time only. For the server's stop alone
    /// (`Shared::stop`, which also cuts the connections): a connection that wants the server
    /// stopped calls [`output_failed`](Context::output_failed), which asks the server.
    pub(crate) fn begin_stop(&self) -> Option<Instant> {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return None;
        }
        let now = Instant::now();
        let _ = self.stopped_at.set(now);
        Some(now)
    }

    /// When the server was stopped, if it was.
    pub(crate) fn stopped_at(&self) -> Option<Instant> {
        self.stopped_at.get().copied()
    }

    /// From now on, threads that end after a stop park (see `Server::wait`). For the server.
    pub(crate) fn set_exit_follows(&self) {
        self.exit_follows.store(true, Ordering::Release);
    }

    /// Whether a thread that ends now should park rather than exit (see `Server::wait`).
    pub(crate) fn parks_after_stop(&self) -> bool {
        self.is_stopping() && self.exit_follows.load(Ordering::Acquire)
    }

    /// Whether a stop happened long enough ago that connections must stop reading.
    pub(crate) fn drain_expired(&self) -> bool {
        self.is_stopping()
            && self
                .stopped_at
                .get()
                .is_some_and(|at| at.elapsed() >= DRAIN_TIME)
    }

    /// Adds to the totals: messages read, of those refused by the sink, bytes read.
    pub(crate) fn add_totals(&self, messages: u64, refused: u64, bytes: u64) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.refused_messages.fetch_add(refused, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A client's TLS handshake failed.
    pub(crate) fn add_handshake_failed(&self) {
        self.handshakes_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection's PROXY protocol header was missing, malformed or late.
    pub(crate) fn add_proxy_header_failed(&self) {
        self.proxy_headers_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Relays a chat room's lines to the other servers, if there is a chat bus; never waits.
    pub(crate) fn publish(&self, lines: &Arc<[u8]>) {
        if let Some(bus) = self.bus.get() {
            bus.publish(lines);
        }
    }

    /// What the chat bus counted, if there is one.
    pub(crate) fn bus_counts(&self) -> Option<BusCounts> {
        self.bus.get().map(Bus::counts)
    }

    /// `messages` more were handed to the sink, whatever it made of them.
    pub(crate) fn add_handed(&self, messages: u64) {
        self.handed.fetch_add(messages, Ordering::Relaxed);
    }

    pub(crate) fn totals(&self) -> Totals {
        let messages = self.messages.load(Ordering::Relaxed);
        let not_handed = messages.saturating_sub(self.handed.load(Ordering::Relaxed));
        // An upper bound ("up to"): a thread given up on while writing for the sink has its
        // batch both not handed and unwritten.
        let unprinted =
            not_handed + self.refused_messages.load(Ordering::Relaxed) + self.sink.unwritten();
        Totals {
            messages,
            unprinted: unprinted.min(messages),
            bytes: self.bytes.load(Ordering::Relaxed),
            handshakes_failed: self.handshakes_failed.load(Ordering::Relaxed),
            proxy_headers_failed: self.proxy_headers_failed.load(Ordering::Relaxed),
        }
    }

    /// Records that the sink failed and stops the server: with nowhere to put messages, reading
    /// more would only lose them.
    pub(crate) fn output_failed(&self, error: &io::Error) {
        if error.kind() == io::ErrorKind::TimedOut && self.is_stopping() {
            return; // the stop gave up waiting for it: counted, not an output failure
        }
        {
            let mut slot = self
                .output_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                // A copy (io::Error is not Clone), a broken pipe whatever the system called it.
                let kind = if sink::reader_gone(error) {
                    info!("output closed by its reader; stopping");
                    io::ErrorKind::BrokenPipe
                } else {
                    error!("cannot write output: {error}; stopping");
                    error.kind()
                };
                *slot = Some(io::Error::new(kind, error.to_string()));
            }
        }
        (self.request_stop)();
    }

    /// The output's failure, if it failed (taken: the second call returns `None`). For the
    /// server's result.
    pub(crate) fn take_output_error(&self) -> Option<io::Error> {
        self.output_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Bytes all connections' buffers hold beyond their allowance (see
/// [`ServerOptions::buffer_budget`]).
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes` from the budget if that many are left.
    pub(crate) fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Bytes left, at this moment.
    pub(crate) fn left(&self) -> usize {
        self.limit.saturating_sub(self.used.load(Ordering::Acquire))
    }

    /// Gives back `bytes` taken before.
    pub(crate) fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}
