//! Chat mode: the room of connected clients, and each one's seat in it.
//!
//! A line is relayed on the sender's own thread: for each other member, one write of the whole
//! batch, straight to its socket and never blocking (`MSG_DONTWAIT`). Only a member whose socket
//! can't take it all at once gets a queue, its outbox, and a thread that drains it with blocking
//! sends for as long as it is behind; while it is, senders only add to the queue, so what each
//! member receives stays in order. So a fast room costs one system call per recipient per batch,
//! with no lock held by anyone but the sender and no thread to wake, and a slow reader delays only
//! itself: its queue is bounded (a sender waits for room at most `--send-timeout` in all, however
//! many are full), and a member that takes nothing for `--send-timeout` is cut off.
//!
//! A few senders relay at a time (two a core, see `Relays`); one that finds no place free leaves
//! its payload and sleeps, and the next to relay takes the waiting payloads with its own and
//! writes them to each member as one. So when many speak at once a member gets one write a round,
//! not one a sender, and only a few threads are ready to run (with thousands ready, the server's
//! stop once waited seconds for its turn). Relayers go round the room from different places and
//! leave for the end a member another is writing to, or whose queue is full: holding a place,
//! nobody waits.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::framing::{Batch, LARGE_BUFFER};
use crate::limits::ThreadRoom;
use crate::options::CONNECTION_STACK;
use crate::send::{SendError, deadline_in};
use crate::sink::format_batch;
use crate::stream::Stream;

/// Who [`Room::broadcast`]s lines that came from another server (the chat bus): no member, so
/// every member gets them.
pub(crate) const ELSEWHERE: u64 = u64::MAX;

/// Most bytes waiting to be sent to one client; a sender waits for room beyond that.
pub(crate) const OUTBOX_BYTES: usize = 1024 * 1024;

/// What is waiting to be written to one client, and who sends it.
#[derive(Debug)]
struct Outbox {
    queue: Mutex<Queue>,
    /// Signalled when the drainer takes what was queued or stops draining (senders, and a
    /// leaving seat, wait on it).
    space: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    payloads: VecDeque<Arc<[u8]>>,
    /// Of the first payload, the bytes a direct write already sent.
    first_sent: usize,
    bytes: usize,
    /// A drainer owns sending to this client: senders only queue.
    draining: bool,
    closed: bool,
    /// Closed with what was queued dropped: the drainer stops at once.
    abandoned: bool,
}

/// Why a payload could not be delivered.
#[derive(Debug)]
enum Refused {
    /// Still full at the deadline: the client is not reading.
    Full,
    /// The client is leaving.
    Closed,
    /// The connection failed.
    Failed(io::Error),
}

/// What became of a delivered payload.
#[derive(Debug, PartialEq, Eq)]
enum Delivered {
    /// Written to the socket.
    Sent,
    /// Queued behind what a drainer is sending.
    Queued,
    /// The socket took part of it or none: queued, and a drainer must be started.
    Behind,
}

impl Outbox {
    fn new() -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            space: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers `payload` to `stream`: written at once if nothing is queued and the socket takes
    /// it, queued otherwise, waiting until `deadline` at most for room (backpressure on the
    /// sender). Under the outbox's lock, so that writes to one client never interleave.
    fn deliver(
        &self,
        stream: &Stream,
        payload: &Arc<[u8]>,
        deadline: Instant,
    ) -> Result<Delivered, Refused> {
        self.deliver_locked(self.lock(), stream, payload, deadline)
    }

    /// [`deliver`](Outbox::deliver) if no other sender is delivering to this client right now;
    /// `None` (and nothing done) if one is.
    fn try_deliver(
        &self,
        stream: &Stream,
        payload: &Arc<[u8]>,
        deadline: Instant,
    ) -> Option<Result<Delivered, Refused>> {
        let queue = match self.queue.try_lock() {
            Ok(queue) => queue,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(self.deliver_locked(queue, stream, payload, deadline))
    }

    fn deliver_locked(
        &self,
        mut queue: MutexGuard<'_, Queue>,
        stream: &Stream,
        payload: &Arc<[u8]>,
        deadline: Instant,
    ) -> Result<Delivered, Refused> {
        loop {
            if queue.closed {
                return Err(Refused::Closed);
            }
            if !queue.draining {
                let sent = match stream.try_send(payload) {
                    Ok(sent) => sent,
                    Err(e) if crate::send::is_timeout(&e) => 0,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(e) => return Err(Refused::Failed(e)),
                };
                if sent == payload.len() && !stream.has_unsent() {
                    return Ok(Delivered::Sent);
                }
                if sent == payload.len() {
                    // TLS: all of it is in records, but the socket did not take the last one
                    // whole. The drainer sends the rest (nothing queued: the stream holds it).
                    queue.draining = true;
                    return Ok(Delivered::Behind);
                }
                queue.first_sent = sent;
                queue.bytes = payload.len() - sent;
                queue.payloads.push_back(Arc::clone(payload));
                queue.draining = true;
                return Ok(Delivered::Behind);
            }
            // An empty outbox takes anything, so one large payload can't wait forever.
            if queue.bytes == 0 || queue.bytes + payload.len() <= OUTBOX_BYTES {
                queue.bytes += payload.len();
                queue.payloads.push_back(Arc::clone(payload));
                return Ok(Delivered::Queued);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Refused::Full);
            }
            queue = self
                .space
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Queues `payload` for a drainer that is to run next (the greeting, before the seat joins).
    fn queue_first(&self, payload: Arc<[u8]>) {
        let mut queue = self.lock();
        queue.bytes += payload.len();
        queue.payloads.push_back(payload);
        queue.draining = true;
    }

    /// For the drainer: moves everything queued into `out` (the payloads themselves, shared with
    /// the other recipients' queues, not copies), and into `skip` how much of the first was sent
    /// already; false (and no longer draining) once nothing is queued, or the outbox was
    /// abandoned.
    fn take_all(&self, out: &mut Vec<Arc<[u8]>>, skip: &mut usize) -> bool {
        let mut queue = self.lock();
        if queue.payloads.is_empty() || queue.abandoned {
            queue.draining = false;
            drop(queue);
            self.space.notify_all();
            return false;
        }
        *skip = std::mem::take(&mut queue.first_sent);
        out.extend(queue.payloads.drain(..));
        queue.bytes = 0;
        drop(queue);
        self.space.notify_all();
        true
    }

    /// No more payloads; a drainer still sends what is queued.
    fn close(&self) {
        self.lock().closed = true;
        self.space.notify_all();
    }

    /// No more payloads, and what is queued is dropped: a drainer ends at once. Returns whether
    /// this call abandoned it (not an earlier one): of several senders finding the same client
    /// not reading, one says so.
    fn abandon(&self) -> bool {
        let first = {
            let mut queue = self.lock();
            let first = !queue.abandoned;
            queue.closed = true;
            queue.abandoned = true;
            queue.payloads.clear();
            queue.first_sent = 0;
            queue.bytes = 0;
            first
        };
        self.space.notify_all();
        first
    }

    /// For a drainer that fails, or one that can't start: abandoned, and no longer draining.
    /// Returns whether this call abandoned it (see [`abandon`](Outbox::abandon)).
    fn give_up_draining(&self) -> bool {
        let first = self.abandon();
        self.lock().draining = false;
        self.space.notify_all();
        first
    }

    fn is_abandoned(&self) -> bool {
        self.lock().abandoned
    }

    /// Waits until no drainer is sending: after [`close`](Outbox::close), once what was queued
    /// is sent or the send failed; after [`abandon`](Outbox::abandon), within a send slice.
    fn wait_until_drained(&self) {
        let mut queue = self.lock();
        while queue.draining {
            queue = self
                .space
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A client's place in the chat room: its outbox.
pub(crate) struct Seat {
    id: u64,
    outbox: Arc<Outbox>,
    /// Reused buffer for formatting `PEER MESSAGE` lines.
    lines: Vec<u8>,
}

impl Seat {
    /// Sends `greeting` and joins the room as `id`. The greeting is queued before the seat
    /// joins and sent by this thread before it returns, with whatever was relayed meanwhile
    /// behind it: no relayed line comes before the greeting, and once greeted the client
    /// receives every line relayed after that.
    pub(crate) fn take(
        room: &Room,
        id: u64,
        stream: &Arc<Stream>,
        greeting: Option<String>,
        send_timeout: Duration,
    ) -> Seat {
        let outbox = Arc::new(Outbox::new());
        if let Some(greeting) = greeting {
            outbox.queue_first(greeting.into_bytes().into());
        }
        room.join(id, Arc::clone(stream), Arc::clone(&outbox));
        drain(&outbox, stream, send_timeout);
        Seat {
            id,
            outbox,
            lines: Vec::new(),
        }
    }

    /// Relays `batch`, from `peer`, to everyone else in the room as `PEER MESSAGE` lines;
    /// returns those lines (for the chat bus to relay to other servers).
    pub(crate) fn relay(
        &mut self,
        room: &Room,
        peer: SocketAddr,
        batch: &Batch,
        send_timeout: Duration,
    ) -> Arc<[u8]> {
        self.lines.clear();
        format_batch(&mut self.lines, peer, batch);
        let payload: Arc<[u8]> = Arc::from(&self.lines[..]);
        room.broadcast(self.id, &payload, send_timeout);
        if self.lines.capacity() > LARGE_BUFFER {
            self.lines = Vec::new(); // a burst's buffer is not kept for an idle client
        }
        payload
    }

    /// Leaves the room. If `drain`, what is queued for the client is sent first (it closed its
    /// side cleanly); otherwise it is dropped. Returns once nothing is sending to it any more.
    pub(crate) fn leave(self, room: &Room, drain: bool) {
        room.leave(self.id);
        if drain {
            self.outbox.close();
        } else {
            self.outbox.abandon();
        }
        self.outbox.wait_until_drained();
    }
}

/// A drainer's work: send what the outbox holds until it is empty, or the client fails. A client
/// that takes nothing for `send_timeout` is not reading: it is cut off, and its reader woken to
/// end the connection.
fn drain(outbox: &Outbox, stream: &Stream, send_timeout: Duration) {
    let mut taken: Vec<Arc<[u8]>> = Vec::new();
    let mut skip = 0;
    loop {
        if !outbox.take_all(&mut taken, &mut skip) {
            // Nothing queued; what a TLS record left unsent still goes (a sender that comes
            // meanwhile waits for it, or queues).
            match stream.flush(send_timeout, || outbox.is_abandoned()) {
                Ok(()) => return,
                Err(error) => return drain_failed(outbox, stream, error),
            }
        }
        let bufs: Vec<&[u8]> = taken
            .iter()
            .enumerate()
            .map(|(n, payload)| {
                if n == 0 {
                    &payload[skip..]
                } else {
                    &payload[..]
                }
            })
            .collect();
        let sent = stream.send_vectored(&bufs, send_timeout, || outbox.is_abandoned());
        drop(bufs);
        taken.clear();
        let Err(error) = sent else {
            continue;
        };
        return drain_failed(outbox, stream, error);
    }
}

/// A drainer's send failed: the client is cut off.
fn drain_failed(outbox: &Outbox, stream: &Stream, error: SendError) {
    // Given up on: by its seat or a stop (nothing more to do), or the client failed. Said only
    // if no sender found it first.
    let first = outbox.give_up_draining();
    match error {
        SendError::GaveUp => {}
        SendError::NotReading => {
            if first {
                warn!(
                    "{} disconnected: not reading (nothing could be sent within the send timeout)",
                    stream.peer()
                );
            }
            stream.cut();
        }
        SendError::Failed(e) => {
            if first {
                debug!("{}: cannot send: {e}", stream.peer());
            }
            stream.send_failed(&e);
        }
    }
}

/// Starts a thread that drains `outbox`; a client nothing can be sent to is cut off.
fn start_drainer(
    stream: &Arc<Stream>,
    outbox: &Arc<Outbox>,
    send_timeout: Duration,
    threads: &Arc<ThreadRoom>,
) {
    let spawned = if threads.take() {
        let stream = Arc::clone(stream);
        let outbox = Arc::clone(outbox);
        let room = Arc::clone(threads);
        let spawned = thread::Builder::new()
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                drain(&outbox, &stream, send_timeout);
                room.give_back();
            });
        if spawned.is_err() {
            threads.give_back();
        }
        spawned.map(drop)
    } else {
        Err(io::Error::other(
            "no room for another thread (vm.max_map_count)",
        ))
    };
    if let Err(e) = spawned {
        warn!(
            "{} disconnected: cannot start a thread to send to it: {e}",
            stream.peer()
        );
        outbox.give_up_draining();
        stream.cut();
    }
}

#[derive(Clone)]
struct Member {
    id: u64,
    stream: Arc<Stream>,
    outbox: Arc<Outbox>,
}

/// Everyone connected to a chat server.
pub(crate) struct Room {
    members: Mutex<Members>,
    /// After a stop: nothing more is relayed. Also in `members`, under its lock, for joins; here
    /// for broadcasts to see at each member without a lock.
    closed: AtomicBool,
    /// Who relays: see [`Relays`].
    relays: Relays,
    /// What drainer threads draw on, with the connections' threads.
    threads: Arc<ThreadRoom>,
}

/// Lets a few senders at a time relay (two a core), and has the others' payloads relayed by
/// them: a sender that finds every place taken leaves its payload and sleeps, and whoever
/// relays next takes the waiting payloads with its own, writing them to each member as one (a
/// member that sent one of them gets the others one by one). So when many speak at once each
/// member gets one write per round instead of one per sender, and only a few threads are ready
/// to run: with thousands ready, the scheduler gives each a turn in thousands, and a thread with
/// more than a moment's work (the one stopping the server, say) waits seconds between turns.
struct Relays {
    state: Mutex<RelayState>,
}

struct RelayState {
    /// Places free: a sender that finds one relays.
    open: usize,
    /// Payloads waiting for someone to relay them, in the order they came.
    waiting: VecDeque<Waiting>,
}

struct Waiting {
    from: u64,
    payload: Arc<[u8]>,
    turn: Arc<Turn>,
}

/// A waiting sender's state, and how to wake it.
struct Turn {
    state: AtomicU8,
    thread: Thread,
}

/// Waiting for its payload to be relayed.
const WAITING: u8 = 0;
/// Given a place: it relays its payload, and others', itself.
const LEAD: u8 = 1;
/// Its payload was relayed (or the room closed).
const DONE: u8 = 2;

/// Payloads one sender relays at once, at most, and their bytes (beyond the first).
const ROUND_PAYLOADS: usize = 256;
const ROUND_BYTES: usize = 256 * 1024;

impl Turn {
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.thread.unpark();
    }
}

/// A place in [`Relays`], given back when dropped (panics included).
struct Place<'a>(&'a Relays);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// The payloads of one round, and the senders to tell when it is done (whatever happens,
/// panics included: when dropped).
struct Round {
    payloads: Vec<(u64, Arc<[u8]>)>,
    turns: Vec<Arc<Turn>>,
}

impl Drop for Round {
    fn drop(&mut self) {
        for turn in self.turns.drain(..) {
            turn.set(DONE);
        }
    }
}

impl Relays {
    fn new(places: usize) -> Relays {
        Relays {
            state: Mutex::new(RelayState {
                open: places.max(1),
                waiting: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once this sender holds a place (`Some`: it relays `payload` itself) or its payload
    /// was relayed by another (`None`).
    fn take_place(&self, from: u64, payload: &Arc<[u8]>) -> Option<Round> {
        let mut round = Round {
            payloads: vec![(from, Arc::clone(payload))],
            turns: Vec::new(),
        };
        let turn = {
            let mut state = self.lock();
            if state.open > 0 {
                // Nobody is waiting (a place given back goes to the first waiting): relay alone.
                state.open -= 1;
                return Some(round);
            }
            let turn = Arc::new(Turn {
                state: AtomicU8::new(WAITING),
                thread: thread::current(),
            });
            state.waiting.push_back(Waiting {
                from,
                payload: Arc::clone(payload),
                turn: Arc::clone(&turn),
            });
            turn
        };
        loop {
            match turn.state.load(Ordering::Acquire) {
                DONE => return None,
                LEAD => break,
                _ => thread::park(),
            }
        }
        // Given a place: the others waiting come along.
        let mut state = self.lock();
        let mut bytes = 0;
        while round.payloads.len() < ROUND_PAYLOADS
            && let Some(next) = state.waiting.front()
            && bytes + next.payload.len() <= ROUND_BYTES
        {
            bytes += next.payload.len();
            if let Some(next) = state.waiting.pop_front() {
                round.payloads.push((next.from, next.payload));
                round.turns.push(next.turn);
            }
        }
        Some(round)
    }

    /// Gives a place back: to the first sender waiting, if any, who then relays.
    fn give_back(&self) {
        let mut state = self.lock();
        match state.waiting.pop_front() {
            Some(next) => next.turn.set(LEAD),
            None => state.open += 1,
        }
    }
}

#[derive(Default)]
struct Members {
    all: HashMap<u64, Member>,
    /// Everyone in `all`, as of the last broadcast since a join or leave: a broadcast takes the
    /// list with one reference count, not one per member.
    snapshot: Option<Arc<[Member]>>,
    /// After a stop: nothing more is relayed.
    closed: bool,
}

impl Room {
    pub(crate) fn new(threads: Arc<ThreadRoom>) -> Room {
        // Two a core: one can be in a system call while the other runs.
        let cores = thread::available_parallelism().map_or(2, usize::from);
        Room {
            members: Mutex::default(),
            closed: AtomicBool::new(false),
            relays: Relays::new(cores.saturating_mul(2)),
            threads,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a client; after [`close`](Room::close) it is not added, and its outbox is abandoned.
    fn join(&self, id: u64, stream: Arc<Stream>, outbox: Arc<Outbox>) {
        let mut members = self.lock();
        if members.closed {
            outbox.abandon();
            return;
        }
        members.all.insert(id, Member { id, stream, outbox });
        members.snapshot = None;
    }

    fn leave(&self, id: u64) {
        let mut members = self.lock();
        members.all.remove(&id);
        members.snapshot = None;
    }

    /// The server is stopping: nothing more is relayed, what is queued is dropped, and no sender
    /// waits for a full outbox any more.
    pub(crate) fn close(&self) {
        // First, so that senders relaying right now stop at their next member.
        self.closed.store(true, Ordering::Release);
        let outboxes: Vec<Arc<Outbox>> = {
            let mut members = self.lock();
            members.closed = true;
            members
                .all
                .values()
                .map(|m| Arc::clone(&m.outbox))
                .collect()
        };
        for outbox in outboxes {
            outbox.abandon();
        }
    }

    /// Delivers `payload` to every member but `from`, waiting for full outboxes at most
    /// `timeout` in all, however many there are. A member whose outbox is still full then is not
    /// reading: it is disconnected, and the room carries on. Returns once `payload` was handed
    /// to every member's socket or queue, by this thread or by another (see [`Relays`]).
    pub(crate) fn broadcast(&self, from: u64, payload: &Arc<[u8]>, timeout: Duration) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(round) = self.relays.take_place(from, payload) {
            self.relay(&round, timeout);
        }
    }

    /// Relays a round of payloads while holding a place, then gives the place back.
    fn relay(&self, round: &Round, timeout: Duration) {
        let place = Place(&self.relays);
        let everyone = {
            let mut members = self.lock();
            if members.closed {
                return;
            }
            let members = &mut *members;
            let all = &members.all;
            Arc::clone(
                members
                    .snapshot
                    .get_or_insert_with(|| all.values().cloned().collect()),
            )
        };
        // Everyone's payloads as one, for the members that sent none of them.
        let joined: Arc<[u8]> = match &round.payloads[..] {
            [(_, payload)] => Arc::clone(payload),
            payloads => {
                let mut all = Vec::with_capacity(payloads.iter().map(|(_, p)| p.len()).sum());
                for (_, payload) in payloads {
                    all.extend_from_slice(payload);
                }
                all.into()
            }
        };
        let mut senders: Vec<u64> = round.payloads.iter().map(|(from, _)| *from).collect();
        senders.sort_unstable();
        // Relayers go round the room from different places, and a member another relayer is
        // writing to right now, or whose queue is full, is come back to after the place is
        // given back rather than waited for: while holding a place, nobody waits.
        let start = usize::try_from(round.payloads[0].0).unwrap_or(0) % everyone.len().max(1);
        let mut later: Vec<(&Member, &Arc<[u8]>)> = Vec::new();
        let now = Instant::now();
        for member in everyone[start..].iter().chain(&everyone[..start]) {
            if self.closed.load(Ordering::Acquire) {
                break;
            }
            let mut deliver =
                |payload| match member.outbox.try_deliver(&member.stream, payload, now) {
                    None | Some(Err(Refused::Full)) => later.push((member, payload)),
                    Some(outcome) => self.delivered(member, outcome, timeout),
                };
            if senders.binary_search(&member.id).is_err() {
                deliver(&joined);
            } else {
                for (from, payload) in &round.payloads {
                    if *from != member.id {
                        deliver(payload);
                    }
                }
            }
        }
        drop(place);
        let deadline = deadline_in(timeout);
        for (member, payload) in later {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let outcome = member.outbox.deliver(&member.stream, payload, deadline);
            self.delivered(member, outcome, timeout);
        }
    }

    /// Acts on what became of a delivery to `member`.
    fn delivered(&self, member: &Member, outcome: Result<Delivered, Refused>, timeout: Duration) {
        let Member { stream, outbox, .. } = member;
        match outcome {
            Ok(Delivered::Sent | Delivered::Queued) | Err(Refused::Closed) => {}
            Ok(Delivered::Behind) => start_drainer(stream, outbox, timeout, &self.threads),
            Err(Refused::Full) => {
                if outbox.abandon() {
                    warn!(
                        "{} disconnected: not reading (outbound queue full for {})",
                        stream.peer(),
                        humantime::format_duration(timeout)
                    );
                }
                stream.cut();
            }
            Err(Refused::Failed(e)) => {
                if outbox.abandon() {
                    debug!("{}: cannot send: {e}", stream.peer());
                }
                stream.send_failed(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::tls::{ClientTls, ServerTls};
    use crate::transport::Transport;

    /// The client's end of a connection, in the clear or under TLS; clones share it.
    #[derive(Clone)]
    struct Client(Arc<Transport>);

    impl Read for Client {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    /// A served socket and the client's end of it, on loopback.
    fn pair() -> (Arc<Stream>, Client) {
        pair_with(false)
    }

    /// [`pair`], under TLS if `tls` (handshake done).
    fn pair_with(tls: bool) -> (Arc<Stream>, Client) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (served, peer) = listener.accept().expect("accept");
        if !tls {
            let stream = Arc::new(Stream::new(served, peer, 0, None).expect("stream"));
            stream
                .prepare(Duration::from_secs(5), true)
                .expect("prepare");
            return (stream, Client(Arc::new(Transport::plain(client))));
        }
        let server_tls = ServerTls::self_signed(&["localhost".to_string()]).expect("cert");
        let client_tls = ClientTls::pinned(&server_tls.fingerprint()).expect("pin");
        let stream =
            Arc::new(Stream::new(served, peer, 0, Some(server_tls.config())).expect("stream"));
        stream
            .prepare(Duration::from_secs(5), true)
            .expect("prepare");
        let handshake = thread::spawn(move || {
            let name = client_tls.name_for("localhost").expect("name");
            let client = Transport::tls_client(client, client_tls.config(), name).expect("session");
            client
                .handshake(Duration::from_secs(5), &|| false)
                .map(|()| client)
        });
        stream.handshake(Duration::from_secs(5)).expect("handshake");
        let client = handshake.join().expect("thread").expect("handshake");
        (stream, Client(Arc::new(client)))
    }

    fn payload(bytes: usize, byte: u8) -> Arc<[u8]> {
        vec![byte; bytes].into()
    }

    #[test]
    fn a_reading_client_gets_each_payload_at_once_and_in_order() {
        let (stream, mut client) = pair();
        let outbox = Outbox::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        for byte in [b'a', b'b', b'c'] {
            let delivered = outbox.deliver(&stream, &payload(10, byte), deadline);
            assert_eq!(delivered.expect("delivered"), Delivered::Sent);
        }
        let mut got = [0; 30];
        client.read_exact(&mut got).expect("read");
        assert_eq!(&got[..], [[b'a'; 10], [b'b'; 10], [b'c'; 10]].concat());
    }

    #[test]
    fn a_client_behind_gets_a_queue_bounded_by_the_deadline_then_everything_in_order() {
        behind_then_in_order(false);
    }

    /// With TLS, a direct send the socket takes only part of leaves part of a record in the
    /// stream: the drainer must send it before anything queued.
    #[test]
    fn under_tls_a_client_behind_still_gets_everything_in_order() {
        behind_then_in_order(true);
    }

    fn behind_then_in_order(tls: bool) {
        let (stream, mut client) = pair_with(tls);
        let outbox = Arc::new(Outbox::new());
        let deadline = Instant::now() + Duration::from_millis(100);
        // More than any socket buffer takes: the first payloads go straight out, then one is
        // left behind and the rest queue, until the queue is full.
        let mut sent = Vec::new();
        let mut behind = false;
        for n in 0.. {
            let chunk = payload(256 * 1024, b'a' + (n % 26) as u8);
            match outbox.deliver(&stream, &chunk, deadline) {
                Ok(Delivered::Sent) => assert!(!behind, "sent straight after falling behind"),
                Ok(Delivered::Behind) => {
                    assert!(!behind, "behind twice");
                    behind = true;
                }
                Ok(Delivered::Queued) => assert!(behind, "queued while not behind"),
                Err(Refused::Full) => break,
                Err(other) => panic!("{other:?}"),
            }
            sent.extend_from_slice(&chunk);
        }
        assert!(behind);
        assert!(Instant::now() >= deadline, "refused before the deadline");
        let reader = thread::spawn(move || {
            let mut got = Vec::new();
            client.read_to_end(&mut got).map(|_| got)
        });
        let drainer = Arc::clone(&outbox);
        let sender = Arc::clone(&stream);
        thread::spawn(move || drain(&drainer, &sender, Duration::from_secs(5)));
        outbox.close();
        outbox.wait_until_drained();
        stream.close_cleanly(Duration::from_secs(5));
        drop(stream);
        let got = reader.join().expect("reader").expect("read");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes out of order");
    }

    #[test]
    fn many_senders_at_once_reach_every_other_member_in_order_and_never_themselves() {
        many_senders(false);
    }

    #[test]
    fn under_tls_many_senders_reach_every_other_member_in_order() {
        many_senders(true);
    }

    fn many_senders(tls: bool) {
        const MEMBERS: u64 = 24;
        const LINES: usize = 200;
        let room = Arc::new(Room::new(Arc::new(ThreadRoom::new(None))));
        let mut clients = Vec::new();
        for id in 0..MEMBERS {
            let (stream, client) = pair_with(tls);
            room.join(id, Arc::clone(&stream), Arc::new(Outbox::new()));
            clients.push((stream, client));
        }
        // Every member reads all it gets until the room closes its socket.
        let readers: Vec<_> = clients
            .iter()
            .map(|(_, client)| {
                let mut client = client.clone();
                thread::spawn(move || {
                    let mut got = String::new();
                    client.read_to_string(&mut got).map(|_| got)
                })
            })
            .collect();
        // All at once: far more senders than relaying places, so payloads are relayed in rounds
        // by whoever holds a place.
        let senders: Vec<_> = (0..MEMBERS)
            .map(|id| {
                let room = Arc::clone(&room);
                thread::spawn(move || {
                    for line in 0..LINES {
                        let payload: Arc<[u8]> = format!("{id} {line}\n").into_bytes().into();
                        room.broadcast(id, &payload, Duration::from_secs(10));
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().expect("sender");
        }
        for (stream, _) in &clients {
            stream.close_cleanly(Duration::from_secs(5));
        }
        for (id, reader) in readers.into_iter().enumerate() {
            let got = reader.join().expect("reader").expect("read");
            let mut next = vec![0usize; MEMBERS as usize];
            for line in got.lines() {
                let (from, n) = line.split_once(' ').expect("FROM N");
                let (from, n): (usize, usize) =
                    (from.parse().expect("from"), n.parse().expect("n"));
                assert_ne!(from, id, "member {id} got its own line");
                assert_eq!(n, next[from], "member {id}: from {from} out of order");
                next[from] += 1;
            }
            for (from, count) in next.iter().enumerate() {
                let expected = if from == id { 0 } else { LINES };
                assert_eq!(*count, expected, "member {id}: lines from {from}");
            }
        }
    }

    #[test]
    fn a_closed_outbox_refuses_at_once() {
        let (stream, _client) = pair();
        let outbox = Outbox::new();
        outbox.close();
        assert!(matches!(
            outbox.deliver(
                &stream,
                &payload(1, b'x'),
                Instant::now() + Duration::from_secs(5)
            ),
            Err(Refused::Closed)
        ));
    }
}
