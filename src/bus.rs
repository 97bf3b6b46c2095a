//! The chat bus: chat servers that share a Redis join their rooms into one over Redis pub/sub.
//!
//! Each server publishes every batch of lines its clients say on one channel, and hears on that
//! channel what the others publish. A [`Bus`] holds two connections to Redis: a publisher thread
//! owns one and sends, in order, what [`Bus::publish`] queued (the caller never waits: a full
//! queue or a lost connection drops the batch and counts it), a subscriber thread owns the other
//! and passes each batch from another server to a relay thread, which hands the `deliver`
//! callback everything that arrived since its last call, as one.
//!
//! Every message is wrapped in an envelope (see [`Envelope`]): the sending server's random origin
//! id and a sequence number per origin. A server ignores its own messages (Redis sends them back
//! to it like anyone else's) and, per origin, notices jumps in the sequence. Redis pub/sub
//! delivers at most once: a subscriber that is disconnected misses messages (one too slow for
//! Redis's output buffer limit for pub/sub clients is disconnected by Redis, and reconnects), and
//! everyone misses a batch its publisher dropped. A gap is counted and logged, never repaired.
//!
//! While Redis is unreachable both threads reconnect with backoff (100 ms doubling to 5 s) and
//! [`Bus::publish`] drops what it is given. What was queued when the connection was lost is
//! dropped too, so that nothing stale is replayed after an outage.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use redis::{Connection, ConnectionInfo, ProtocolVersion, RedisError, Value};
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::send::deadline_in;

/// The start of every envelope: the format's name and version.
const MAGIC: &[u8] = b"plugboard1 ";

/// An origin id is this many lowercase hex digits.
const ORIGIN_LEN: usize = 16;

/// Most bytes of batches waiting for the publisher; beyond that, batches are dropped.
const QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// Most batches waiting for the publisher (many tiny ones cost more than their bytes).
const QUEUE_BATCHES: usize = 64 * 1024;

/// The publisher sends at most this many bytes of batches as one pipeline...
const PIPELINE_BYTES: usize = 1024 * 1024;

/// ... and at most this many batches.
const PIPELINE_BATCHES: usize = 1024;

/// Most bytes the subscriber has received and the relay thread not yet taken; beyond, the
/// subscriber waits (and Redis holds what comes, up to its pub/sub output buffer limit).
const INBOX_BYTES: usize = 1024 * 1024;

/// The subscriber's read timeout: how often it looks at the stop flag while nothing arrives.
const POLL: Duration = Duration::from_millis(200);

/// Longest wait for Redis to take a command or answer one (the publisher's, and the
/// subscriber's writes): a stuck Redis costs a thread at most this, then the connection is given
/// up and made again.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// After this long without a message, the subscriber pings Redis: a connection whose path died
/// silently (no reset, no close) would otherwise look like a quiet channel for ever.
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// The first wait before reconnecting; it doubles after each failed attempt...
const BACKOFF_FIRST: Duration = Duration::from_millis(100);

/// ... up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long [`Bus::stop`] waits for its threads before leaving them to end by themselves.
const STOP_BOUND: Duration = Duration::from_secs(1);

/// Most origins whose sequence the subscriber remembers: anyone who can publish on the channel
/// can invent origins, and must not grow the map without bound.
const MAX_ORIGINS: usize = 4096;

/// When the map is full, origins not heard from for this long are forgotten first.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// What the subscriber hands each batch from another server to.
pub(crate) type Deliver = Box<dyn Fn(&[u8]) + Send + Sync>;

/// A server's id on the bus: [`ORIGIN_LEN`] lowercase hex digits, random per process.
type Origin = [u8; ORIGIN_LEN];

/// The publisher's bit in [`Link::down`].
const PUBLISHER: u8 = 1;

/// The subscriber's bit in [`Link::down`].
const SUBSCRIBER: u8 = 2;

/// This server's link to the other chat servers through a Redis channel. `Send + Sync`: the
/// connections publish through a shared reference.
///
/// Dropping it stops it (see [`Bus::stop`]).
pub(crate) struct Bus {
    shared: Arc<Shared>,
    /// The publisher, subscriber and relay threads, until the stop.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What a [`Bus`] counted since it started, in lines (a batch, what one
/// [`publish`](Bus::publish) call is given, holds one or more, each ending with `\n`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BusCounts {
    /// Ours that Redis confirmed it published.
    pub(crate) published: u64,
    /// From other servers, handed to `deliver`.
    pub(crate) received: u64,
    /// From other servers, never seen: the gaps in their sequence numbers. A line another server
    /// dropped (its `unpublished`) is lost for everyone.
    pub(crate) lost: u64,
    /// Ours dropped without Redis confirming them: the queue was full, Redis unreachable or
    /// refusing, the bus stopped, or the connection was lost while they were queued or on their
    /// way (some of those may have been published after all).
    pub(crate) unpublished: u64,
    /// Messages on the channel that are not plugboard envelopes, ignored.
    pub(crate) malformed: u64,
}

impl Bus {
    /// Connects a publishing connection and a subscribing one to `url` (`redis://HOST:PORT[/DB]`),
    /// subscribes to `channel` and starts the publisher, subscriber and relay threads.
    ///
    /// All within `timeout`: if Redis is down, unreachable or not answering, the start fails with
    /// [`Error::ChatBus`] naming the URL and the cause (a host name is resolved first, and the
    /// system's resolver has no timeout of ours). The bus always speaks RESP2, whatever the URL
    /// asks for: the blocking client's pub/sub reads RESP2 only.
    ///
    /// `deliver` is called on a relay thread of the bus's with the payloads other servers
    /// published on the channel (never this one's), each server's in the order it published
    /// them: everything that arrived since the last call, joined, so a `deliver` that takes
    /// its time gets larger payloads, not a backlog of small ones. While it runs, the subscriber
    /// goes on reading Redis into an inbox of [`INBOX_BYTES`], then waits.
    pub(crate) fn connect(
        url: &str,
        channel: &str,
        timeout: Duration,
        deliver: Deliver,
    ) -> Result<Bus, Error> {
        let unreachable = |problem: String| Error::ChatBus {
            url: redacted(url),
            problem,
        };
        let client = open_client(url).map_err(|e| unreachable(describe(&e, timeout)))?;
        let shared = Arc::new(Shared::new(url, channel, client, timeout, deliver));
        let no_answer = || unreachable(format!("no answer within {}", format_ms(timeout)));
        // On a thread of its own, waited for `timeout` in all: the client's timeouts are per
        // read, and a Redis that answers a byte at a time would otherwise hold the start for
        // as long as it likes. Left behind, the thread ends at its own timeouts.
        let (opened, opening) = mpsc::channel();
        let opener = Arc::clone(&shared);
        thread::Builder::new()
            .name("plugboard-bus-start".to_owned())
            .spawn(move || {
                let deadline = deadline_in(timeout);
                let left = || {
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1))
                };
                let both = opener
                    .open_publisher(left())
                    .and_then(|publisher| Ok((publisher, opener.open_subscriber(left())?)));
                let _ = opened.send(both);
            })
            .map_err(Error::Thread)?;
        let (publisher, subscriber) = match opening.recv_timeout(timeout) {
            Ok(both) => both.map_err(|e| unreachable(describe(&e, timeout)))?,
            Err(_) => return Err(no_answer()),
        };

        let bus = Bus {
            shared: Arc::clone(&shared),
            threads: Mutex::new(Vec::with_capacity(3)),
        };
        for (name, side) in [
            ("plugboard-bus-pub", Side::Publisher(publisher)),
            ("plugboard-bus-sub", Side::Subscriber(subscriber)),
            ("plugboard-bus-relay", Side::Relay),
        ] {
            let shared = Arc::clone(&shared);
            let thread = thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    let _ended = Ended(&shared);
                    match side {
                        Side::Publisher(connection) => run_publisher(&shared, connection),
                        Side::Subscriber(connection) => run_subscriber(&shared, connection),
                        Side::Relay => run_relay(&shared),
                    }
                })
                .map_err(Error::Thread)?; // dropping `bus` stops the thread already started
            bus.lock_threads().push(thread);
        }
        debug!(
            "chat bus {}: on channel {channel} as server {}",
            shared.url,
            bus.origin()
        );
        Ok(bus)
    }

    /// Publishes `payload` (bytes ready to print, `127.0.0.1:5000 hi\n`) once, without ever
    /// blocking: it goes into a bounded queue that the publisher thread empties. If the queue is
    /// full, or Redis is unreachable, or the bus stopped, it is dropped and counted
    /// (`unpublished`). Either way its lines take the next sequence numbers, so that the other servers
    /// see the gap.
    pub(crate) fn publish(&self, payload: &Arc<[u8]>) {
        let shared = &*self.shared;
        let lines = lines_in(payload);
        let mut queue = shared.lock_queue();
        let seq = queue.last_seq + 1;
        queue.last_seq += lines;
        let fits = queue.batches.len() < QUEUE_BATCHES
            && queue.bytes.saturating_add(payload.len()) <= QUEUE_BYTES;
        if !fits || !queue.connected || shared.is_stopping() {
            let overflow_begins = queue.connected && !fits && !queue.overflowing;
            queue.overflowing |= overflow_begins;
            drop(queue);
            shared.unpublished.fetch_add(lines, Ordering::Relaxed);
            if overflow_begins {
                warn!(
                    "chat bus {}: Redis is not keeping up; dropping lines until it does",
                    shared.url
                );
            }
            return;
        }
        let was_empty = queue.batches.is_empty();
        queue.bytes += payload.len();
        queue.batches.push_back(Queued {
            seq,
            lines,
            payload: Arc::clone(payload),
        });
        drop(queue);
        // The publisher looks at the queue before it waits: only an empty one can have it asleep.
        if was_empty {
            shared.wake.notify_one();
        }
    }

    /// Stops its threads; returns within about a second whatever Redis does. The publisher first
    /// sends what was queued before the stop, if Redis takes it in time. A thread still waiting
    /// for a stuck Redis at the bound is left to end by itself (within [`IO_TIMEOUT`], or the
    /// start timeout if it was connecting again); `deliver` is not called once the subscriber
    /// has seen the stop (a call under way finishes). Calling it again does nothing.
    pub(crate) fn stop(&self) {
        let threads = std::mem::take(&mut *self.lock_threads());
        if threads.is_empty() {
            return;
        }
        let shared = &*self.shared;
        shared.stopping.store(true, Ordering::Release);
        // Taking each lock once orders the flag before any waiter's next look at it.
        drop(shared.lock_queue());
        shared.wake.notify_all();
        drop(shared.lock_inbox());
        shared.inbox_changed.notify_all();
        // Stopped from one of its own threads (the relay's `deliver` dropping the last handle
        // on the server): that thread can't be waited for; the others end by themselves.
        let me = thread::current().id();
        if threads.iter().any(|thread| thread.thread().id() == me) {
            return;
        }
        let mut ended = shared.lock_ended();
        shared.ending.notify_all();
        let deadline = deadline_in(STOP_BOUND);
        while *ended < threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            ended = shared
                .ending
                .wait_timeout(ended, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let all_ended = *ended >= threads.len();
        drop(ended);
        if !all_ended {
            warn!(
                "chat bus {}: Redis did not answer within {}; not waiting for it",
                shared.url,
                format_ms(STOP_BOUND)
            );
            return; // dropping the handles leaves the threads to end by themselves
        }
        for thread in threads {
            let name = thread
                .thread()
                .name()
                .unwrap_or("a chat bus thread")
                .to_owned();
            if thread.join().is_err() {
                warn!("chat bus {}: {name} panicked", shared.url);
            }
        }
    }

    /// What the bus counted so far. Once stopped, every line handed to
    /// [`publish`](Bus::publish) is either published or not: what a stuck Redis still had
    /// queued or on its way at the stop counts as not published.
    pub(crate) fn counts(&self) -> BusCounts {
        let shared = &*self.shared;
        let published = shared.published.load(Ordering::Relaxed);
        let unpublished = if shared.is_stopping() {
            let handed = shared.lock_queue().last_seq;
            handed.saturating_sub(published)
        } else {
            shared.unpublished.load(Ordering::Relaxed)
        };
        BusCounts {
            published,
            received: shared.received.load(Ordering::Relaxed),
            lost: shared.lost.load(Ordering::Relaxed),
            unpublished,
            malformed: shared.malformed.load(Ordering::Relaxed),
        }
    }

    /// This server's id on the bus (16 hex digits), for the log.
    pub(crate) fn origin(&self) -> &str {
        // Made of hex digits only (see `new_origin`).
        std::str::from_utf8(&self.shared.origin).unwrap_or("?")
    }

    /// Whether both connections are up, as far as the bus knows: a connection is found lost when
    /// it is used, or by the subscriber's ping after [`IDLE_CHECK`] of silence.
    #[cfg(test)]
    pub(crate) fn is_connected(&self) -> bool {
        self.shared.lock_link().down == 0
    }

    fn lock_threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Batches waiting for the publisher.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.shared.lock_queue().batches.len()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a thread is started with.
enum Side {
    Publisher(Connection),
    Subscriber(Connection),
    Relay,
}

/// What the threads share with the [`Bus`].
struct Shared {
    /// The Redis URL as given, for the log.
    url: String,
    channel: String,
    client: redis::Client,
    /// For each connection attempt.
    connect_timeout: Duration,
    origin: Origin,
    deliver: Deliver,
    /// What the subscriber received and the relay thread has yet to hand to `deliver`.
    inbox: Mutex<Vec<u8>>,
    /// Signalled when the inbox gets lines (for the relay thread) and when the relay thread
    /// empties it (for a subscriber waiting for room), and at the stop.
    inbox_changed: Condvar,
    queue: Mutex<Queue>,
    /// Wakes the publisher: something was queued, a link to check, the stop.
    wake: Condvar,
    stopping: AtomicBool,
    /// Threads that have ended.
    ended: Mutex<usize>,
    /// Signalled when the stop begins (waking a thread waiting to reconnect) and when a thread
    /// ends.
    ending: Condvar,
    link: Mutex<Link>,
    published: AtomicU64,
    received: AtomicU64,
    lost: AtomicU64,
    unpublished: AtomicU64,
    malformed: AtomicU64,
}

/// A batch waiting for the publisher, with its lines counted once.
struct Queued {
    /// The sequence number of its first line.
    seq: u64,
    lines: u64,
    payload: Arc<[u8]>,
}

/// What waits for the publisher.
#[derive(Default)]
struct Queue {
    /// Each with its sequence number: its first line's.
    batches: VecDeque<Queued>,
    bytes: usize,
    /// The sequence number of the last line handed to `publish`, queued or dropped: every line
    /// has one, so that a receiver counts lost lines, not batches.
    last_seq: u64,
    /// The publisher has a connection: batches are queued; without one they are dropped.
    connected: bool,
    /// The subscriber lost its connection: the publisher should see whether its own still works.
    check: bool,
    /// Batches are being dropped for want of room (said once, until the queue empties).
    overflowing: bool,
}

/// Which connections are down, to log one warning per outage and one line when it ends.
#[derive(Default)]
struct Link {
    /// [`PUBLISHER`] and [`SUBSCRIBER`] bits.
    down: u8,
    /// When the outage began.
    since: Option<Instant>,
}

/// What the publisher is to do next.
enum Work {
    /// Publish the batches taken from the queue.
    Publish,
    /// Ping Redis: the subscriber lost its connection, this one may be lost too.
    Check,
    Stop,
}

/// Counts a thread's end (a panic included) for [`Bus::stop`].
struct Ended<'a>(&'a Shared);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        *self.0.lock_ended() += 1;
        self.0.ending.notify_all();
    }
}

impl Shared {
    fn new(
        url: &str,
        channel: &str,
        client: redis::Client,
        connect_timeout: Duration,
        deliver: Deliver,
    ) -> Shared {
        Shared {
            url: redacted(url),
            channel: channel.to_owned(),
            client,
            connect_timeout,
            origin: new_origin(),
            deliver,
            inbox: Mutex::new(Vec::new()),
            inbox_changed: Condvar::new(),
            queue: Mutex::new(Queue {
                connected: true,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            stopping: AtomicBool::new(false),
            ended: Mutex::new(0),
            ending: Condvar::new(),
            link: Mutex::new(Link::default()),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            unpublished: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_inbox(&self) -> MutexGuard<'_, Vec<u8>> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `lines` in the inbox for the relay thread, waiting while it holds [`INBOX_BYTES`]
    /// (meanwhile Redis keeps what comes for us, up to its output buffer limit); false if the
    /// bus stopped.
    fn hand_on(&self, lines: &[u8]) -> bool {
        let mut inbox = self.lock_inbox();
        while inbox.len() >= INBOX_BYTES {
            if self.is_stopping() {
                return false;
            }
            inbox = self
                .inbox_changed
                .wait_timeout(inbox, POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let was_empty = inbox.is_empty();
        inbox.extend_from_slice(lines);
        drop(inbox);
        if was_empty {
            self.inbox_changed.notify_all();
        }
        true
    }

    fn lock_ended(&self) -> MutexGuard<'_, usize> {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits `time`, or less if the bus stops; false if it did.
    fn pause(&self, time: Duration) -> bool {
        let deadline = deadline_in(time);
        let mut ended = self.lock_ended();
        loop {
            if self.is_stopping() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            ended = self
                .ending
                .wait_timeout(ended, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A connection for publishing, made within `timeout`.
    fn open_publisher(&self, timeout: Duration) -> Result<Connection, RedisError> {
        let started = Instant::now();
        let mut connection = self.client.get_connection_with_timeout(timeout)?;
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        connection.set_write_timeout(Some(left))?;
        connection.set_read_timeout(Some(left))?;
        // A connect alone proves nothing: a stopped Redis's kernel still completes it. Until
        // Redis answers, the bus is not back, and lines are not queued to a Redis that may
        // deliver them minutes late.
        redis::cmd("PING").exec(&mut connection)?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        connection.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(connection)
    }

    /// A connection subscribed to the channel, made within `timeout`, whose reads time out after
    /// [`POLL`].
    fn open_subscriber(&self, timeout: Duration) -> Result<Connection, RedisError> {
        let started = Instant::now();
        let mut connection = self.client.get_connection_with_timeout(timeout)?;
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        connection.set_write_timeout(Some(left))?;
        connection.set_read_timeout(Some(left))?;
        // A plain command: its answer (`subscribe`, the channel, 1) is one reply, read like any.
        // `PubSub::subscribe` would do the same, but the `PubSub` it needs borrows the connection,
        // which has to move to the subscriber thread first.
        redis::cmd("SUBSCRIBE")
            .arg(&self.channel)
            .exec(&mut connection)?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        connection.set_read_timeout(Some(POLL))?;
        Ok(connection)
    }

    /// For the publisher: waits for something to do; takes into `taken` the batches of the next
    /// pipeline.
    fn next_work(&self, taken: &mut Vec<Queued>) -> Work {
        let mut queue = self.lock_queue();
        loop {
            if !queue.batches.is_empty() {
                let mut bytes = 0;
                while let Some(front) = queue.batches.front() {
                    let len = front.payload.len();
                    let full = taken.len() >= PIPELINE_BATCHES || bytes + len > PIPELINE_BYTES;
                    if full && !taken.is_empty() {
                        break;
                    }
                    bytes += len;
                    taken.extend(queue.batches.pop_front());
                }
                queue.bytes -= bytes;
                if queue.batches.is_empty() {
                    queue.overflowing = false;
                }
                return Work::Publish;
            }
            if self.is_stopping() {
                return Work::Stop;
            }
            if std::mem::take(&mut queue.check) {
                return Work::Check;
            }
            queue = self
                .wake
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Sends `taken` as one pipeline of `PUBLISH`es and counts what Redis confirmed. `packed` is
    /// the publisher's buffer, reused. An error means the connection is lost: the rest of the
    /// batches are counted unpublished.
    fn publish_batches(
        &self,
        connection: &mut Connection,
        taken: &[Queued],
        packed: &mut Vec<u8>,
        refused: &mut bool,
    ) -> Result<(), RedisError> {
        packed.clear();
        for Queued { seq, payload, .. } in taken {
            pack_publish(packed, self.channel.as_bytes(), &self.origin, *seq, payload);
        }
        let sent = connection.send_packed_command(packed);
        if packed.capacity() > 2 * PIPELINE_BYTES {
            *packed = Vec::new(); // one huge batch need not keep its buffer
        }
        if let Err(e) = sent {
            self.unpublished
                .fetch_add(lines_of(taken), Ordering::Relaxed);
            return Err(e);
        }
        // Replies one by one (not `req_packed_commands`, which reads on after an error: each
        // timeout would cost a whole IO_TIMEOUT more).
        for (answered, &Queued { lines, .. }) in taken.iter().enumerate() {
            match connection.recv_response() {
                Ok(Value::ServerError(e)) => {
                    self.unpublished.fetch_add(lines, Ordering::Relaxed);
                    if !std::mem::replace(refused, true) {
                        warn!(
                            "chat bus {}: Redis refuses to publish: {e}; dropping lines",
                            self.url
                        );
                    }
                }
                Ok(_) => {
                    self.published.fetch_add(lines, Ordering::Relaxed);
                    *refused = false;
                }
                Err(e) => {
                    let unanswered = lines_of(&taken[answered..]);
                    self.unpublished.fetch_add(unanswered, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The publisher lost its connection: from now on `publish` drops, and what was queued is
    /// dropped too.
    fn publisher_lost(&self, cause: &RedisError) {
        let dropped = {
            let mut queue = self.lock_queue();
            queue.connected = false;
            queue.check = false;
            queue.overflowing = false;
            queue.bytes = 0;
            let dropped = lines_of(queue.batches.make_contiguous());
            queue.batches.clear();
            dropped
        };
        self.unpublished.fetch_add(dropped, Ordering::Relaxed);
        self.link_lost(PUBLISHER, cause);
    }

    fn publisher_connected(&self) {
        self.lock_queue().connected = true;
        self.link_restored(PUBLISHER);
    }

    /// For the subscriber: its connection is lost, so the publisher's may be too; have it look
    /// now rather than when it next publishes (and loses what it publishes).
    fn check_publisher(&self) {
        self.lock_queue().check = true;
        self.wake.notify_one();
    }

    /// One side's connection is lost: said once per outage, whichever side finds it first.
    fn link_lost(&self, side: u8, cause: &RedisError) {
        let first = {
            let mut link = self.lock_link();
            let first = link.down == 0;
            link.down |= side;
            if first {
                link.since = Some(Instant::now());
            }
            first
        };
        let cause = describe(cause, IO_TIMEOUT);
        // Redis closes a subscriber that falls behind by its pub/sub output buffer limit
        // (`client-output-buffer-limit pubsub`, 32 MiB by default): say so, since the lines it
        // missed show as lost only once their senders send again.
        let hint = if side == SUBSCRIBER && !self.is_stopping() {
            " (if Redis is up, it may have closed this subscriber for falling behind its client-output-buffer-limit for pubsub: lines were lost)"
        } else {
            ""
        };
        if first {
            warn!(
                "chat bus {}: connection lost: {cause}{hint}; reconnecting",
                self.url
            );
        } else {
            debug!("chat bus {}: connection lost: {cause}", self.url);
        }
    }

    /// One side's connection is back: said when both are.
    fn link_restored(&self, side: u8) {
        let outage = {
            let mut link = self.lock_link();
            if link.down & side == 0 {
                return;
            }
            link.down &= !side;
            if link.down == 0 {
                link.since.take()
            } else {
                None
            }
        };
        if let Some(since) = outage {
            info!(
                "chat bus {}: connected again after {}",
                self.url,
                format_ms(since.elapsed())
            );
        }
    }

    /// For the subscriber: reads messages and hands them on until the stop (`Ok`) or until the
    /// connection fails.
    ///
    /// The read timeout ([`POLL`]) is safe here, verified in redis 1.8.1's source and by
    /// `a_read_timeout_in_the_middle_of_a_message_loses_nothing`: `PubSub::get_message` parses
    /// with a `combine` decoder that keeps the bytes read so far and its partial state when a
    /// read fails, so a timeout in the middle of a message resumes where it stopped, and it reads
    /// as a push (`read(false)`), which (since redis-rs #1379) does not mark a reply to skip. A
    /// timeout in a *reply* read (`recv_response`, the ping below) does mark one, so a ping that
    /// times out is a lost connection, made again.
    fn listen(&self, connection: &mut Connection, origins: &mut Origins) -> Result<(), RedisError> {
        let mut pubsub = connection.as_pubsub();
        let mut heard = Instant::now();
        loop {
            if self.is_stopping() {
                return Ok(());
            }
            match pubsub.get_message() {
                Ok(message) => {
                    heard = Instant::now();
                    self.receive(message.get_payload_bytes(), origins, heard);
                }
                Err(e) if e.is_timeout() => {
                    if heard.elapsed() >= IDLE_CHECK {
                        check_alive(&mut pubsub)?;
                        heard = Instant::now();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One message from the channel: delivered if it is another server's next.
    fn receive(&self, message: &[u8], origins: &mut Origins, now: Instant) {
        let Some(envelope) = Envelope::parse(message) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            debug!(
                "chat bus {}: ignored a message of {} bytes that is not plugboard's",
                self.url,
                message.len()
            );
            return;
        };
        if envelope.origin == self.origin {
            return; // our own, sent back by Redis
        }
        let lines = lines_in(envelope.payload);
        match origins.heard(envelope.origin, envelope.seq, lines, now) {
            Heard::First | Heard::Next => {}
            Heard::Gap(missed) => {
                // Saturating: a forged sequence number can claim any gap.
                let _ = self
                    .lost
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |lost| {
                        Some(lost.saturating_add(missed))
                    });
                warn!(
                    "chat bus: {missed} lines from server {}.. lost (Redis pub/sub delivers at most once)",
                    short(&envelope.origin)
                );
            }
            Heard::Behind(last) => {
                // Redis never repeats a message, and a server's numbers only grow: this, or
                // what came before it, was forged by someone else who can publish. Delivered,
                // and followed from here, so that a forged jump ahead can't silence a server.
                debug!(
                    "chat bus: line {} from server {}.. after line {last}: counting again from it",
                    envelope.seq,
                    short(&envelope.origin)
                );
            }
        }
        if self.is_stopping() {
            return;
        }
        // Counted first: once in the inbox, it may be delivered before this thread goes on.
        self.received.fetch_add(lines, Ordering::Relaxed);
        self.hand_on(envelope.payload);
    }
}

/// The relay thread: hands `deliver` everything the subscriber received since its last call, as
/// one payload. So while `deliver` relays one batch to the room, what arrives meanwhile joins the
/// next: a room that is slow to take lines gets them in fewer, larger writes, not one write per
/// line from each server, and the subscriber goes on reading Redis meanwhile.
fn run_relay(shared: &Shared) {
    let mut taken = Vec::new();
    loop {
        {
            let mut inbox = shared.lock_inbox();
            while inbox.is_empty() {
                if shared.is_stopping() {
                    return;
                }
                inbox = shared
                    .inbox_changed
                    .wait_timeout(inbox, POLL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut *inbox, &mut taken);
        }
        shared.inbox_changed.notify_all();
        if shared.is_stopping() {
            return;
        }
        (shared.deliver)(&taken);
        taken.clear();
        if taken.capacity() > INBOX_BYTES {
            taken = Vec::new(); // a burst's buffer is not kept
        }
    }
}

/// Pings Redis on a subscribed connection, waiting up to [`IO_TIMEOUT`] for the answer (the
/// messages that arrive first are kept for `get_message`). Then reads time out after [`POLL`]
/// again.
fn check_alive(pubsub: &mut redis::PubSub<'_>) -> Result<(), RedisError> {
    pubsub.set_read_timeout(Some(IO_TIMEOUT))?;
    pubsub.ping::<Value>()?;
    pubsub.set_read_timeout(Some(POLL))
}

/// The publisher thread: sends what is queued, in order; reconnects when the connection is lost.
fn run_publisher(shared: &Shared, connection: Connection) {
    let mut connection = Some(connection);
    let mut backoff = Backoff::new();
    let mut taken = Vec::new();
    let mut packed = Vec::new();
    // Redis refused the last batch (said once, until it takes one).
    let mut refused = false;
    loop {
        let Some(open) = connection.as_mut() else {
            let Some(opened) = reconnect(shared, &mut backoff, "publish", Shared::open_publisher)
            else {
                return;
            };
            if opened.is_some() {
                shared.publisher_connected();
            }
            connection = opened;
            continue;
        };
        let done = match shared.next_work(&mut taken) {
            Work::Stop => return,
            Work::Check => redis::cmd("PING").query::<Value>(open).map(drop),
            Work::Publish => shared.publish_batches(open, &taken, &mut packed, &mut refused),
        };
        taken.clear();
        if let Err(cause) = done {
            connection = None;
            shared.publisher_lost(&cause);
        }
    }
}

/// One try at making a lost connection again, after the backoff's wait: `None` if the bus
/// stopped meanwhile, `Some(None)` if the try failed (logged at debug: the loss was warned of).
fn reconnect(
    shared: &Shared,
    backoff: &mut Backoff,
    to: &str,
    open: impl Fn(&Shared, Duration) -> Result<Connection, RedisError>,
) -> Option<Option<Connection>> {
    if !shared.pause(backoff.next()) {
        return None;
    }
    match open(shared, shared.connect_timeout) {
        Ok(connection) => {
            backoff.reset();
            Some(Some(connection))
        }
        Err(e) => {
            debug!("chat bus {}: cannot {to} yet: {e}", shared.url);
            Some(None)
        }
    }
}

/// The subscriber thread: hands what arrives to the relay thread; reconnects and subscribes
/// again when the connection is lost.
fn run_subscriber(shared: &Shared, connection: Connection) {
    let mut connection = Some(connection);
    let mut origins = Origins::default();
    let mut backoff = Backoff::new();
    loop {
        let Some(open) = connection.as_mut() else {
            let Some(opened) =
                reconnect(shared, &mut backoff, "subscribe", Shared::open_subscriber)
            else {
                return;
            };
            if opened.is_some() {
                shared.link_restored(SUBSCRIBER);
            }
            connection = opened;
            continue;
        };
        match shared.listen(open, &mut origins) {
            Ok(()) => return,
            Err(cause) => {
                connection = None;
                shared.link_lost(SUBSCRIBER, &cause);
                shared.check_publisher();
            }
        }
    }
}

/// How long to wait before the next connection attempt.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(BACKOFF_MAX);
        wait
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// A message on the bus: `plugboard1 <origin> <seq>\n<payload>`.
///
/// `plugboard1` names the format and its version; `<origin>` is the sending server's id, 16
/// lowercase hex digits; `<seq>` its sequence number, the number of the payload's first line among
/// all the lines that origin published, decimal, from 1; then the payload, any
/// bytes. Anyone who can publish on the channel can send anything: what does not parse is
/// ignored.
#[derive(Debug, PartialEq, Eq)]
struct Envelope<'a> {
    origin: Origin,
    seq: u64,
    payload: &'a [u8],
}

impl Envelope<'_> {
    /// The envelope in `message`, if it is one.
    fn parse(message: &[u8]) -> Option<Envelope<'_>> {
        /// The digits of `u64::MAX`.
        const MAX_DIGITS: usize = 20;
        let rest = message.strip_prefix(MAGIC)?;
        let (origin, rest) = rest.split_at_checked(ORIGIN_LEN)?;
        if !origin
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        let rest = rest.strip_prefix(b" ")?;
        let end = memchr::memchr(b'\n', &rest[..rest.len().min(MAX_DIGITS + 1)])?;
        let (digits, payload) = (&rest[..end], &rest[end + 1..]);
        if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        let mut seq: u64 = 0;
        for &digit in digits {
            if !digit.is_ascii_digit() {
                return None;
            }
            seq = seq.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        }
        if seq == 0 {
            return None;
        }
        Some(Envelope {
            origin: origin.try_into().ok()?,
            seq,
            payload,
        })
    }
}

/// Appends to `packed` the command `PUBLISH channel <envelope>`, in RESP, without copying the
/// payload anywhere else first.
fn pack_publish(packed: &mut Vec<u8>, channel: &[u8], origin: &Origin, seq: u64, payload: &[u8]) {
    let mut digits = [0u8; 20];
    let seq = decimal(seq, &mut digits);
    packed.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n$");
    packed.extend_from_slice(decimal(channel.len() as u64, &mut [0u8; 20]));
    packed.extend_from_slice(b"\r\n");
    packed.extend_from_slice(channel);
    packed.extend_from_slice(b"\r\n$");
    let length = MAGIC.len() + ORIGIN_LEN + 1 + seq.len() + 1 + payload.len();
    packed.extend_from_slice(decimal(length as u64, &mut [0u8; 20]));
    packed.extend_from_slice(b"\r\n");
    packed.extend_from_slice(MAGIC);
    packed.extend_from_slice(origin);
    packed.push(b' ');
    packed.extend_from_slice(seq);
    packed.push(b'\n');
    packed.extend_from_slice(payload);
    packed.extend_from_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

/// What a message's sequence number says, given what came before from its origin.
#[derive(Debug, PartialEq, Eq)]
enum Heard {
    /// The first from this origin (or the first since it was forgotten): nothing to compare.
    First,
    /// The one after the last.
    Next,
    /// This many were missed before it.
    Gap(u64),
    /// Not after the last (which it gives): never a server's own doing (Redis doesn't repeat
    /// messages, a server's numbers only grow), so someone forged this or the last. Counted
    /// from again.
    Behind(u64),
}

/// The last sequence number heard from each origin, bounded (see [`MAX_ORIGINS`]).
#[derive(Default)]
struct Origins {
    last: HashMap<Origin, (u64, Instant)>,
}

impl Origins {
    /// Records a batch of `lines` lines from `origin` whose first is line `seq`, heard at `now`.
    fn heard(&mut self, origin: Origin, seq: u64, lines: u64, now: Instant) -> Heard {
        let last = seq.saturating_add(lines.saturating_sub(1));
        if let Some((heard, at)) = self.last.get_mut(&origin) {
            if seq <= *heard {
                let before = *heard;
                (*heard, *at) = (last, now);
                return Heard::Behind(before);
            }
            let missed = seq - *heard - 1;
            (*heard, *at) = (last, now);
            return if missed == 0 {
                Heard::Next
            } else {
                Heard::Gap(missed)
            };
        }
        if self.last.len() >= MAX_ORIGINS {
            self.last
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < FORGET_AFTER);
        }
        if self.last.len() >= MAX_ORIGINS {
            let oldest = self.last.iter().min_by_key(|(_, (_, at))| *at);
            if let Some(oldest) = oldest.map(|(origin, _)| *origin) {
                self.last.remove(&oldest);
            }
        }
        self.last.insert(origin, (last, now));
        Heard::First
    }
}

/// The lines in a batch: each ends with a `\n` (escaping leaves none inside one); at least one.
fn lines_in(payload: &[u8]) -> u64 {
    (memchr::memchr_iter(b'\n', payload).count() as u64).max(1)
}

/// The lines in `batches`.
fn lines_of(batches: &[Queued]) -> u64 {
    batches.iter().map(|queued| queued.lines).sum()
}

/// A client for `url` that speaks RESP2 (see [`Bus::connect`]).
fn open_client(url: &str) -> Result<redis::Client, RedisError> {
    let info: ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(url)?;
    // No `CLIENT SETINFO` at connect: two more round trips, each of which a stuck Redis would
    // make wait the whole timeout (the start took 10 s instead of 5).
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP2)
        .set_skip_set_lib_name();
    redis::Client::open(info.set_redis_settings(settings))
}

/// `url` as it may be shown in a log or an error: its password, if it has one, as `***`.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let Some((user, _password)) = userinfo.split_once(':') else {
        return url.to_owned();
    };
    format!("{scheme}://{user}:***@{host}{}", &rest[authority.len()..])
}

/// A fresh random origin id.
fn new_origin() -> Origin {
    // An id, not a secret: it must only differ between servers, which std's hasher gives, keyed
    // from the system's randomness; the process and the time mixed in on top.
    let id = RandomState::new().hash_one((std::process::id(), SystemTime::now()));
    let mut origin = [0u8; ORIGIN_LEN];
    origin.copy_from_slice(format!("{id:016x}").as_bytes());
    origin
}

/// The first 8 digits of an origin, for the log (followed by `..`).
fn short(origin: &Origin) -> &str {
    std::str::from_utf8(&origin[..8]).unwrap_or("?")
}

/// Redis's error as a phrase; a timeout (`WouldBlock` on Unix) says how long it waited.
fn describe(e: &RedisError, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("no answer within {}", format_ms(timeout))
    } else {
        // On one line: a parse error of something that is not Redis spans several.
        let text = e.to_string();
        let parts: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        parts.join("; ")
    }
}

/// A duration to the millisecond, for people.
fn format_ms(duration: Duration) -> humantime::FormattedDuration {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;

    use proptest::prelude::*;

    use super::*;

    /// How long a test waits for anything that should happen (a delivery, a reconnect).
    const PATIENCE: Duration = Duration::from_secs(20);

    /// The start timeout the tests give [`Bus::connect`].
    const START: Duration = Duration::from_secs(5);

    /// A real `redis-server` on a free loopback port, killed when dropped.
    struct Redis {
        child: Child,
        port: u16,
        log: PathBuf,
        /// Stopped with SIGSTOP (continued before it is killed).
        paused: bool,
    }

    impl Redis {
        /// Starts one on a free port. A port found free can be taken before Redis binds it:
        /// then another is tried.
        fn start() -> Redis {
            let mut failures = Vec::new();
            for _ in 0..3 {
                match Redis::spawn(free_port()) {
                    Ok(redis) => return redis,
                    Err(failure) => failures.push(failure),
                }
            }
            panic!("redis-server would not start:\n{}", failures.join("\n"));
        }

        /// Starts one on `port` and waits (bounded) until it answers PING.
        fn spawn(port: u16) -> Result<Redis, String> {
            let log = std::env::temp_dir().join(format!(
                "plugboard-bus-redis-{}-{port}.log",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&log);
            let port_text = port.to_string();
            let command = |args: &[&str]| {
                let quoted = args.iter().map(|a| if a.is_empty() { "''" } else { a });
                format!("redis-server {}", quoted.collect::<Vec<_>>().join(" "))
            };
            let log_path = log
                .to_str()
                .expect("a UTF-8 temporary directory")
                .to_owned();
            let args = [
                "--port",
                &port_text,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                log_path.as_str(),
            ];
            let child = Command::new("redis-server")
                .args(args)
                .current_dir(std::env::temp_dir())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {}: {e}. The chat bus tests need a real Redis on PATH \
                         (Debian/Ubuntu: apt-get install redis-server)",
                        command(&args)
                    )
                });
            let mut redis = Redis {
                child,
                port,
                log,
                paused: false,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = redis.child.try_wait() {
                    return Err(format!(
                        "{} exited with {status}; its log:\n{}",
                        command(&args),
                        std::fs::read_to_string(&redis.log).unwrap_or_default()
                    ));
                }
                if answers_ping(port) {
                    return Ok(redis);
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{} did not answer PING within 10s; its log:\n{}",
                        command(&args),
                        std::fs::read_to_string(&redis.log).unwrap_or_default()
                    ));
                }
                thread::sleep(Duration::from_millis(10));
            }
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        /// Kills it (SIGKILL): its clients' connections are reset or closed.
        fn kill(&mut self) {
            self.resume();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        /// Starts it again on the same port, after [`kill`](Redis::kill).
        fn restart(&mut self) {
            let port = self.port;
            match Redis::spawn(port) {
                Ok(again) => {
                    let old = std::mem::replace(self, again);
                    drop(old); // already killed: killing again does nothing
                }
                Err(failure) => panic!("{failure}"),
            }
        }

        /// Stops the process (SIGSTOP): connections stay open, nothing is answered.
        #[cfg(unix)]
        fn pause(&mut self) {
            self.signal("-STOP");
            self.paused = true;
        }

        fn resume(&mut self) {
            if std::mem::take(&mut self.paused) {
                self.signal("-CONT");
            }
        }

        fn signal(&self, signal: &str) {
            let pid = self.child.id().to_string();
            let status = Command::new("kill").args([signal, &pid]).status();
            assert!(
                status.as_ref().is_ok_and(|s| s.success()),
                "kill {signal} {pid}: {status:?}"
            );
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            self.kill();
            let _ = std::fs::remove_file(&self.log);
        }
    }

    /// The bus's log, shown with a failing test's output.
    fn show_log() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("plugboard=debug")
            .try_init();
    }

    /// A loopback port nothing listens on (at the moment of asking).
    fn free_port() -> u16 {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port()
    }

    /// Whether a Redis on `port` answers PING now.
    fn answers_ping(port: u16) -> bool {
        let ask = || -> std::io::Result<bool> {
            let addr = (Ipv4Addr::LOCALHOST, port).into();
            let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
            tcp.set_read_timeout(Some(Duration::from_millis(500)))?;
            tcp.write_all(b"PING\r\n")?;
            let mut answer = [0u8; 7];
            tcp.read_exact(&mut answer)?;
            Ok(&answer == b"+PONG\r\n")
        };
        ask().unwrap_or(false)
    }

    /// A `deliver` that collects, and where to find what it collected.
    fn collector() -> (Deliver, mpsc::Receiver<Vec<u8>>) {
        let (sender, receiver) = mpsc::channel();
        let deliver = move |payload: &[u8]| {
            let _ = sender.send(payload.to_vec());
        };
        (Box::new(deliver), receiver)
    }

    /// Waits ([`PATIENCE`] at most) until the deliveries add up to as many bytes as `expected`
    /// and checks they are `expected`, in order: the relay thread joins what arrives between
    /// two deliveries, so only the bytes and their order are the same from run to run.
    fn expect_delivered<T: AsRef<[u8]>>(receiver: &mpsc::Receiver<Vec<u8>>, expected: &[T]) {
        let expected: Vec<u8> = expected.iter().flat_map(|e| e.as_ref().to_vec()).collect();
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::with_capacity(expected.len());
        while got.len() < expected.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(payload) => got.extend_from_slice(&payload),
                Err(e) => panic!(
                    "{} of {} bytes delivered within {PATIENCE:?} ({e}); got {:?}",
                    got.len(),
                    expected.len(),
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        assert!(
            got == expected,
            "delivered {:?}, expected {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected)
        );
    }

    /// Waits (bounded by [`PATIENCE`]) until `done` says so.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done() {
            assert!(Instant::now() < deadline, "not {what} within {PATIENCE:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn batch(text: &[u8]) -> Arc<[u8]> {
        Arc::from(text)
    }

    /// An envelope as another server would publish it.
    fn envelope(origin: &[u8], seq: &str, payload: &[u8]) -> Vec<u8> {
        [MAGIC, origin, b" ", seq.as_bytes(), b"\n", payload].concat()
    }

    /// Publishes `message` as is, as anyone with access to Redis could.
    fn publish_raw(redis: &Redis, channel: &str, message: &[u8]) {
        let client = redis::Client::open(redis.url()).expect("a client");
        let mut connection = client
            .get_connection_with_timeout(START)
            .expect("a raw connection");
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query(&mut connection)
            .expect("PUBLISH");
    }

    #[test]
    fn a_bus_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Bus>();
    }

    #[test]
    fn an_envelope_reads_back_and_what_is_not_one_is_refused() {
        let origin = *b"0123456789abcdef";
        let message = envelope(&origin, "42", b"127.0.0.1:5000 hi\n\0\xff");
        assert_eq!(
            Envelope::parse(&message),
            Some(Envelope {
                origin,
                seq: 42,
                payload: b"127.0.0.1:5000 hi\n\0\xff",
            })
        );
        assert_eq!(
            Envelope::parse(&envelope(&origin, "18446744073709551615", b"")).map(|e| e.seq),
            Some(u64::MAX)
        );
        for bad in [
            &b""[..],
            b"hello",
            b"plugboard1 ",
            b"plugboard1 0123456789abcdef",
            b"plugboard1 0123456789abcdef 1",
            b"plugboard1 0123456789ABCDEF 1\nx",
            b"plugboard1 0123456789abcde 1\nx",
            b"plugboard1 0123456789abcdef0 1\nx",
            b"plugboard1 0123456789abcdef  1\nx",
            b"plugboard1 0123456789abcdef 0\nx",
            b"plugboard1 0123456789abcdef 01\nx",
            b"plugboard1 0123456789abcdef -1\nx",
            b"plugboard1 0123456789abcdef 1x\nx",
            b"plugboard1 0123456789abcdef 18446744073709551616\nx",
            b"plugboard1 0123456789abcdef 000000000000000000000001\nx",
            b"plugboard2 0123456789abcdef 1\nx",
        ] {
            assert_eq!(Envelope::parse(bad), None, "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn publish_is_packed_as_one_resp_command() {
        let mut packed = b"before".to_vec();
        pack_publish(&mut packed, b"room", b"0123456789abcdef", 7, b"hi\n");
        let message = envelope(b"0123456789abcdef", "7", b"hi\n");
        let expected = [
            &b"before*3\r\n$7\r\nPUBLISH\r\n$4\r\nroom\r\n$"[..],
            message.len().to_string().as_bytes(),
            b"\r\n",
            &message,
            b"\r\n",
        ]
        .concat();
        assert_eq!(
            packed.escape_ascii().to_string(),
            expected.escape_ascii().to_string()
        );
    }

    #[test]
    fn origins_are_random_hex() {
        let (one, other) = (new_origin(), new_origin());
        assert_ne!(one, other);
        assert!(
            one.iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn sequence_numbers_tell_gaps_and_replays() {
        let mut origins = Origins::default();
        let now = Instant::now();
        let (one, other) = (*b"000000000000000a", *b"000000000000000b");
        assert_eq!(origins.heard(one, 5, 1, now), Heard::First);
        assert_eq!(origins.heard(one, 6, 1, now), Heard::Next);
        // A repeat or a step back: counted from again.
        assert_eq!(origins.heard(one, 6, 1, now), Heard::Behind(6));
        assert_eq!(origins.heard(one, 2, 1, now), Heard::Behind(6));
        assert_eq!(origins.heard(one, 3, 1, now), Heard::Next);
        assert_eq!(origins.heard(one, 7, 1, now), Heard::Gap(3));
        assert_eq!(origins.heard(other, 1, 1, now), Heard::First);
        assert_eq!(origins.heard(one, 8, 1, now), Heard::Next);
        // Batches of several lines: the next starts after the last's last line.
        assert_eq!(origins.heard(one, 9, 3, now), Heard::Next);
        assert_eq!(origins.heard(one, 12, 2, now), Heard::Next);
        assert_eq!(origins.heard(one, 17, 1, now), Heard::Gap(3));
        // A forged jump ahead: the server's own next line still counts.
        assert_eq!(
            origins.heard(one, u64::MAX, 1, now),
            Heard::Gap(u64::MAX - 18)
        );
        assert_eq!(origins.heard(one, 18, 1, now), Heard::Behind(u64::MAX));
        assert_eq!(origins.heard(one, 19, 1, now), Heard::Next);
    }

    #[test]
    fn remembered_origins_stay_bounded() {
        let mut origins = Origins::default();
        let start = Instant::now();
        let origin = |i: usize| -> Origin {
            format!("{i:016x}")
                .into_bytes()
                .try_into()
                .expect("16 digits")
        };
        for i in 0..MAX_ORIGINS * 2 {
            let now = start + Duration::from_millis(i as u64);
            assert_eq!(origins.heard(origin(i), 1, 1, now), Heard::First);
            assert!(origins.last.len() <= MAX_ORIGINS);
        }
        // The most recent are kept; the oldest went first.
        let now = start + Duration::from_secs(3600);
        assert_eq!(
            origins.heard(origin(MAX_ORIGINS * 2 - 1), 2, 1, now),
            Heard::Next
        );
        assert_eq!(origins.heard(origin(0), 2, 1, now), Heard::First);
    }

    proptest! {
        #[test]
        fn anything_parses_or_is_refused_without_panic(message in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Envelope::parse(&message);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&message);
            let _ = Envelope::parse(&with_magic);
        }

        #[test]
        fn every_envelope_reads_back(seq in 1u64.., payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let origin = new_origin();
            let message = envelope(&origin, &seq.to_string(), &payload);
            prop_assert_eq!(Envelope::parse(&message), Some(Envelope { origin, seq, payload: &payload }));
        }
    }

    /// What the subscriber's read timeout relies on (see `Shared::listen`): with redis 1.8.1, a
    /// `get_message` that times out in the middle of a message resumes it on the next call,
    /// wherever the message was cut. A peer of our own sends the bytes: Redis itself never
    /// pauses in the middle of one.
    #[test]
    fn a_read_timeout_in_the_middle_of_a_message_loses_nothing() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let info =
            redis::IntoConnectionInfo::into_connection_info(format!("redis://127.0.0.1:{port}"))
                .expect("a URL");
        // No CLIENT SETINFO on connecting: this peer answers nothing.
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        let client = redis::Client::open(info.set_redis_settings(settings)).expect("a client");
        let mut connection = client.get_connection_with_timeout(START).expect("connect");
        let (mut peer, _) = listener.accept().expect("accept");
        connection
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let mut pubsub = connection.as_pubsub();

        let payloads: [&[u8]; 2] = [b"plugboard1 x 1\nhello\r\nworld\n", b"\0\xff\r\n$3\r\n"];
        let wire: Vec<u8> = payloads
            .iter()
            .flat_map(|payload| {
                let head = format!(
                    "*3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n${}\r\n",
                    payload.len()
                );
                [head.as_bytes(), payload, b"\r\n"].concat()
            })
            .collect();
        for cut in 1..wire.len() {
            peer.write_all(&wire[..cut]).expect("write");
            let mut got = Vec::new();
            // Until the read times out: what was complete arrives, the rest waits.
            loop {
                match pubsub.get_message() {
                    Ok(message) => got.push(message.get_payload_bytes().to_vec()),
                    Err(e) if e.is_timeout() => break,
                    Err(e) => panic!("cut at {cut}: {e}"),
                }
            }
            peer.write_all(&wire[cut..]).expect("write");
            let deadline = Instant::now() + PATIENCE;
            while got.len() < payloads.len() {
                match pubsub.get_message() {
                    Ok(message) => got.push(message.get_payload_bytes().to_vec()),
                    Err(e) if e.is_timeout() => {
                        assert!(Instant::now() < deadline, "cut at {cut}: nothing")
                    }
                    Err(e) => panic!("cut at {cut}: {e}"),
                }
            }
            assert_eq!(got, payloads, "cut at {cut}");
        }
    }

    #[test]
    fn the_idle_check_answers_and_keeps_what_arrived() {
        show_log();
        let redis = Redis::start();
        let (deliver, _) = collector();
        let bus = Bus::connect(&redis.url(), "room", START, deliver).expect("starts");
        let mut connection = bus.shared.open_subscriber(START).expect("subscribes");
        let mut pubsub = connection.as_pubsub();
        bus.publish(&batch(b"first\n"));
        wait_until("published", || bus.counts().published == 1);
        check_alive(&mut pubsub).expect("Redis answers a ping while subscribed");
        bus.publish(&batch(b"second\n"));
        let mut got = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        while got.len() < 2 {
            match pubsub.get_message() {
                Ok(message) => got.push(message.get_payload_bytes().to_vec()),
                Err(e) if e.is_timeout() => assert!(Instant::now() < deadline, "got {got:?}"),
                Err(e) => panic!("{e}"),
            }
        }
        let origin = bus.origin().as_bytes();
        assert_eq!(
            got,
            [
                envelope(origin, "1", b"first\n"),
                envelope(origin, "2", b"second\n")
            ]
        );
    }

    #[test]
    fn passwords_are_not_shown() {
        let cases = [
            ("redis://127.0.0.1:6379/2", "redis://127.0.0.1:6379/2"),
            ("redis://:secret@host:6379", "redis://:***@host:6379"),
            (
                "redis://user:p@ss:w@rd@host:6379/0",
                "redis://user:***@host:6379/0",
            ),
            ("redis://user@host", "redis://user@host"),
            ("not a url", "not a url"),
        ];
        for (url, shown) in cases {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }

    /// While `deliver` is busy with one payload, what arrives waits in the inbox and comes next
    /// as one: a slow room gets fewer, larger payloads, in order.
    #[test]
    fn what_arrives_while_deliver_is_busy_comes_next_as_one() {
        let redis = Redis::start();
        let (gate, held) = mpsc::channel::<()>();
        let held = Mutex::new(held);
        let (sender, delivered) = mpsc::channel();
        let deliver = move |payload: &[u8]| {
            let _ = sender.send(payload.to_vec());
            // Busy until the test says so.
            let held = held.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = held.recv_timeout(PATIENCE);
        };
        let a = Bus::connect(&redis.url(), "room", START, Box::new(deliver)).expect("a starts");
        let (deliver, _) = collector();
        let b = Bus::connect(&redis.url(), "room", START, deliver).expect("b starts");
        b.publish(&batch(b"first\n"));
        let first = delivered.recv_timeout(PATIENCE).expect("the first line");
        assert_eq!(first, b"first\n");
        let lines: Vec<String> = (0..10).map(|i| format!("line {i}\n")).collect();
        for line in &lines {
            b.publish(&batch(line.as_bytes()));
        }
        wait_until("all received", || a.counts().received == 11);
        gate.send(()).expect("deliver is waiting");
        let next = delivered.recv_timeout(PATIENCE).expect("the rest");
        assert_eq!(
            String::from_utf8_lossy(&next),
            lines.concat(),
            "one payload"
        );
        gate.send(()).expect("deliver is waiting");
        a.stop();
        b.stop();
    }

    #[test]
    fn servers_hear_each_other_once_in_order_and_never_themselves() {
        show_log();
        let redis = Redis::start();
        let (deliver, at_a) = collector();
        let a = Bus::connect(&redis.url(), "room", START, deliver).expect("a starts");
        let (deliver, at_b) = collector();
        let b = Bus::connect(&redis.url(), "room", START, deliver).expect("b starts");
        let (deliver, at_c) = collector();
        let c = Bus::connect(&redis.url(), "elsewhere", START, deliver).expect("c starts");
        let (deliver, _at_d) = collector();
        let d = Bus::connect(&redis.url(), "elsewhere", START, deliver).expect("d starts");
        assert_ne!(a.origin(), b.origin());
        assert_eq!(a.origin().len(), ORIGIN_LEN);

        let mut batches: Vec<Arc<[u8]>> = (0..500)
            .map(|i| batch(format!("127.0.0.1:5000 line {i}\n").as_bytes()))
            .collect();
        batches.push(batch(b"127.0.0.1:5000 \0\xff\r\n*3\r\nplugboard1 0 1\n"));
        batches.push(batch(b""));
        batches.push(batch(&vec![b'x'; 256 * 1024]));
        for payload in &batches {
            a.publish(payload);
        }
        let expected: Vec<Vec<u8>> = batches.iter().map(|p| p.to_vec()).collect();
        expect_delivered(&at_b, &expected);

        // Redis sends each subscriber what was published before this, first: A's own batches
        // would be here ahead of B's answer, and C's channel would have A's ahead of D's.
        b.publish(&batch(b"done\n"));
        expect_delivered(&at_a, &[b"done\n"]);
        d.publish(&batch(b"marker\n"));
        expect_delivered(&at_c, &[b"marker\n"]);

        // Counted in lines: 500, three in the odd one, and one each in the empty and the huge.
        let sent = 500 + 3 + 1 + 1;
        assert_eq!(batches.iter().map(|p| lines_in(p)).sum::<u64>(), sent);
        wait_until("all published", || a.counts().published == sent);
        assert_eq!(
            a.counts(),
            BusCounts {
                published: sent,
                received: 1,
                ..BusCounts::default()
            }
        );
        wait_until("B's one published", || b.counts().published == 1);
        assert_eq!(
            b.counts(),
            BusCounts {
                published: 1,
                received: sent,
                ..BusCounts::default()
            }
        );
        for bus in [&a, &b, &c, &d] {
            let started = Instant::now();
            bus.stop();
            assert!(
                started.elapsed() < STOP_BOUND,
                "stop took {:?}",
                started.elapsed()
            );
        }
        assert!(at_a.try_recv().is_err() && at_b.try_recv().is_err() && at_c.try_recv().is_err());
        a.publish(&batch(b"too late\n"));
        assert_eq!(
            a.counts().unpublished,
            1,
            "a publish after the stop is dropped"
        );
    }

    #[test]
    fn a_redis_that_is_down_fails_the_start_within_the_timeout() {
        let url = format!("redis://127.0.0.1:{}", free_port());
        let started = Instant::now();
        let (deliver, _) = collector();
        let error = Bus::connect(&url, "room", START, deliver)
            .err()
            .expect("no Redis: the start fails");
        assert!(started.elapsed() < START, "took {:?}", started.elapsed());
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("cannot reach the chat bus {url}: "))
                && text.to_lowercase().contains("refused"),
            "{text}"
        );

        // Something that takes connections but never answers: the start gives up at its timeout.
        let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let url = format!(
            "redis://127.0.0.1:{}",
            silent.local_addr().expect("address").port()
        );
        let timeout = Duration::from_millis(500);
        let started = Instant::now();
        let (deliver, _) = collector();
        let error = Bus::connect(&url, "room", timeout, deliver)
            .err()
            .expect("no answer: the start fails");
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "took {took:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("cannot reach the chat bus {url}: no answer within 500ms")
        );

        let (deliver, _) = collector();
        let error = Bus::connect("http://nowhere", "room", timeout, deliver)
            .err()
            .expect("not a Redis URL: the start fails");
        assert!(
            error
                .to_string()
                .starts_with("cannot reach the chat bus http://nowhere: "),
            "{error}"
        );
    }

    #[test]
    fn through_a_redis_restart_lines_are_dropped_counted_and_then_flow_again() {
        show_log();
        let mut redis = Redis::start();
        let (deliver, at_a) = collector();
        let a = Bus::connect(&redis.url(), "room", START, deliver).expect("a starts");
        let (deliver, at_b) = collector();
        let b = Bus::connect(&redis.url(), "room", START, deliver).expect("b starts");
        a.publish(&batch(b"before\n"));
        expect_delivered(&at_b, &[b"before\n"]);

        redis.kill();
        wait_until("both buses see Redis gone", || {
            !a.is_connected() && !b.is_connected()
        });
        const DURING: u64 = 1000;
        let payload = batch(&[b'y'; 1000]);
        let (started, mut slowest) = (Instant::now(), Duration::ZERO);
        for _ in 0..DURING {
            let one = Instant::now();
            a.publish(&payload);
            slowest = slowest.max(one.elapsed());
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1) && slowest < Duration::from_millis(100),
            "publishing {DURING} took {took:?}, the slowest {slowest:?}"
        );
        wait_until("A counts every batch unpublished", || {
            a.counts().unpublished == DURING
        });
        assert_eq!(a.queued(), 0);
        // B's publisher finds the loss by itself too (the subscriber has it check).
        wait_until("both publishers see Redis gone", || {
            !a.shared.lock_queue().connected && !b.shared.lock_queue().connected
        });

        redis.restart();
        wait_until("both buses reconnect", || {
            a.is_connected() && b.is_connected()
        });
        a.publish(&batch(b"after\n"));
        expect_delivered(&at_b, &[b"after\n"]);
        b.publish(&batch(b"back\n"));
        expect_delivered(&at_a, &[b"back\n"]);
        assert_eq!(b.counts().lost, DURING, "B saw A's gap");
        assert_eq!(b.counts().received, 2);
        assert_eq!(a.counts().lost, 0);
        wait_until("A's after published", || a.counts().published == 2);
        assert_eq!(a.counts().unpublished, DURING);
    }

    #[test]
    fn what_is_not_an_envelope_is_ignored_and_numbers_that_go_back_count_again() {
        show_log();
        let redis = Redis::start();
        let (deliver, at_a) = collector();
        let a = Bus::connect(&redis.url(), "room", START, deliver).expect("a starts");
        let (deliver, _at_b) = collector();
        let b = Bus::connect(&redis.url(), "room", START, deliver).expect("b starts");
        let garbage: [&[u8]; 6] = [
            b"",
            b"hello",
            b"\xff\xfe\0\r\n",
            b"plugboard1 0123456789abcdef 99999999999999999999999\nx",
            b"plugboard1 0123456789abcdef",
            b"plugboard9 0123456789abcdef 1\nx",
        ];
        for message in garbage {
            publish_raw(&redis, "room", message);
        }
        // A server of another process, with a repeat, a step back, and lines 4-5 and 7-8
        // missing.
        let forger = b"00000000000000ff";
        for (seq, payload) in [
            ("5", "five"),
            ("5", "five again"),
            ("3", "three"),
            ("6", "six"),
            ("9", "nine"),
        ] {
            publish_raw(&redis, "room", &envelope(forger, seq, payload.as_bytes()));
        }
        // Its own origin, as if it had sent it: dropped.
        publish_raw(
            &redis,
            "room",
            &envelope(a.origin().as_bytes(), "1", b"echo"),
        );
        b.publish(&batch(b"real\n"));
        expect_delivered(
            &at_a,
            &[
                &b"five"[..],
                b"five again",
                b"three",
                b"six",
                b"nine",
                b"real\n",
            ],
        );
        assert_eq!(
            a.counts(),
            BusCounts {
                received: 6,
                lost: 4,
                malformed: garbage.len() as u64,
                ..BusCounts::default()
            }
        );
    }

    #[cfg(unix)]
    #[test]
    fn stop_returns_in_time_while_redis_is_stuck() {
        show_log();
        let mut redis = Redis::start();
        let (deliver, _) = collector();
        let a = Bus::connect(&redis.url(), "room", START, deliver).expect("a starts");
        redis.pause();
        a.publish(&batch(b"into the void\n"));
        // Taken by the publisher, which now waits for an answer that does not come.
        wait_until("the publisher takes the batch", || a.queued() == 0);
        let started = Instant::now();
        a.stop();
        let took = started.elapsed();
        assert!(
            took < STOP_BOUND + Duration::from_millis(500),
            "stop took {took:?}"
        );
        let started = Instant::now();
        a.stop();
        drop(a);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "a second stop waited"
        );
    }
}
