//! Chat mode: the room of connected clients, each with a bounded outbound queue drained by its own
//! writer thread, so that no slow reader can stall the others for long.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::framing::{Batch, LARGE_BUFFER};
use crate::options::CONNECTION_STACK;
use crate::send::{SendError, deadline_in};
use crate::sink::format_batch;
use crate::stream::Stream;

/// Most bytes waiting to be sent to one client; a sender waits for room beyond that.
pub(crate) const OUTBOX_BYTES: usize = 1024 * 1024;

/// What is waiting to be written to one client.
#[derive(Debug)]
struct Outbox {
    queue: Mutex<Queue>,
    /// Signalled when something is queued or the outbox closes (the writer waits on it).
    ready: Condvar,
    /// Signalled when the writer takes what was queued (senders wait on it).
    space: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    payloads: VecDeque<Arc<[u8]>>,
    bytes: usize,
    closed: bool,
    /// Closed with what was queued dropped: the writer stops at once.
    abandoned: bool,
    /// The writer has finished (see [`Outbox::writer_done`]).
    writer_done: bool,
}

/// Why a payload could not be queued.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// Still full at the deadline: the client is not reading.
    Full,
    /// The client is leaving.
    Closed,
}

impl Outbox {
    fn new() -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            space: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `payload`, waiting until `deadline` at most for room (backpressure on the sender;
    /// `None`: no waiting).
    fn push(&self, payload: Arc<[u8]>, deadline: Option<Instant>) -> Result<(), Refused> {
        let mut queue = self.lock();
        loop {
            if queue.closed {
                return Err(Refused::Closed);
            }
            // An empty outbox takes anything, so one large payload can't wait forever.
            if queue.bytes == 0 || queue.bytes + payload.len() <= OUTBOX_BYTES {
                break;
            }
            let left = deadline.map_or(Duration::ZERO, |deadline| {
                deadline.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Err(Refused::Full);
            }
            queue = self
                .space
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        queue.bytes += payload.len();
        queue.payloads.push_back(payload);
        drop(queue);
        self.ready.notify_one();
        Ok(())
    }

    /// Moves everything queued into `out`, waiting until there is something; false once the
    /// outbox is closed and empty, or abandoned.
    fn take_all(&self, out: &mut Vec<u8>) -> bool {
        let mut queue = self.lock();
        while queue.payloads.is_empty() {
            if queue.closed {
                return false;
            }
            queue = self
                .ready
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        for payload in queue.payloads.drain(..) {
            out.extend_from_slice(&payload);
        }
        queue.bytes = 0;
        drop(queue);
        self.space.notify_all();
        true
    }

    /// No more payloads; the writer sends what is queued, then ends.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.space.notify_all();
    }

    /// No more payloads, and what is queued is dropped: the writer ends at once.
    fn abandon(&self) {
        {
            let mut queue = self.lock();
            queue.closed = true;
            queue.abandoned = true;
            queue.payloads.clear();
            queue.bytes = 0;
        }
        self.ready.notify_all();
        self.space.notify_all();
    }

    fn is_abandoned(&self) -> bool {
        self.lock().abandoned
    }

    /// The writer has finished its work: what [`wait_for_writer`](Outbox::wait_for_writer)
    /// waits for. (Its thread may not have exited yet: after a stop it doesn't, see
    /// `Server::wait`.)
    fn writer_done(&self) {
        self.lock().writer_done = true;
        self.space.notify_all();
    }

    /// Waits until the writer has finished: after [`close`](Outbox::close), once it has sent
    /// what was queued or failed; after [`abandon`](Outbox::abandon), within a send slice.
    fn wait_for_writer(&self) {
        let mut queue = self.lock();
        while !queue.writer_done {
            queue = self
                .space
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A client's place in the chat room: its outbox and the writer thread that drains it.
pub(crate) struct Seat {
    id: u64,
    outbox: Arc<Outbox>,
    /// Reused buffer for formatting `PEER MESSAGE` lines.
    lines: Vec<u8>,
}

impl Seat {
    /// Joins the room as `id`, with `greeting` queued first, and starts the writer thread, which
    /// parks when done if `parks` says so (the process exits next: see `Server::wait`).
    pub(crate) fn take(
        room: &Room,
        id: u64,
        stream: &Arc<Stream>,
        greeting: Option<String>,
        send_timeout: Duration,
        parks: impl Fn() -> bool + Send + 'static,
    ) -> io::Result<Seat> {
        // The greeting goes through the outbox, so no relayed line can come before it; and the
        // client joins the room before its writer starts, so once it is greeted it receives
        // every line relayed after that.
        let outbox = Arc::new(Outbox::new());
        if let Some(greeting) = greeting {
            let _ = outbox.push(greeting.into_bytes().into(), None);
        }
        room.join(id, Arc::clone(stream), Arc::clone(&outbox));
        let writer = {
            let outbox = Arc::clone(&outbox);
            let stream = Arc::clone(stream);
            thread::Builder::new()
                .stack_size(CONNECTION_STACK)
                .spawn(move || {
                    {
                        // Done even if the loop panics: the connection waits for it.
                        let _done = WriterDone(&outbox);
                        write_loop(&outbox, &stream, send_timeout);
                    }
                    drop((outbox, stream));
                    if parks() {
                        // As connection threads do: ended with the process, not on its own.
                        loop {
                            thread::park();
                        }
                    }
                })
        };
        match writer {
            Ok(_detached) => Ok(Seat {
                id,
                outbox,
                lines: Vec::new(),
            }),
            Err(e) => {
                room.leave(id);
                Err(e)
            }
        }
    }

    /// Relays `batch`, from `peer`, to everyone else in the room as `PEER MESSAGE` lines.
    pub(crate) fn relay(
        &mut self,
        room: &Room,
        peer: SocketAddr,
        batch: &Batch,
        send_timeout: Duration,
    ) {
        self.lines.clear();
        format_batch(&mut self.lines, peer, batch);
        let payload: Arc<[u8]> = Arc::from(&self.lines[..]);
        room.broadcast(self.id, &payload, send_timeout);
        if self.lines.capacity() > LARGE_BUFFER {
            self.lines = Vec::new(); // a burst's buffer is not kept for an idle client
        }
    }

    /// Leaves the room. If `drain`, what is queued for the client is sent first (it closed its
    /// side cleanly); otherwise it is dropped. Returns once the writer is done.
    pub(crate) fn leave(self, room: &Room, drain: bool) {
        room.leave(self.id);
        if drain {
            self.outbox.close();
        } else {
            self.outbox.abandon();
        }
        self.outbox.wait_for_writer();
    }
}

/// Tells the seat its writer is done when dropped, even by a panic.
struct WriterDone<'a>(&'a Outbox);

impl Drop for WriterDone<'_> {
    fn drop(&mut self) {
        self.0.writer_done();
    }
}

/// A writer thread's work: send what the outbox holds until it closes or the client fails. A
/// client that takes nothing for `send_timeout` is not reading: it is cut off, and its reader
/// woken to end the connection.
fn write_loop(outbox: &Outbox, stream: &Stream, send_timeout: Duration) {
    let mut buf = Vec::new();
    while outbox.take_all(&mut buf) {
        match stream.send(&buf, send_timeout, || outbox.is_abandoned()) {
            Ok(()) => {}
            Err(SendError::GaveUp) => return,
            Err(SendError::NotReading) => {
                warn!(
                    "{} disconnected: not reading (nothing could be sent within the send timeout)",
                    stream.peer()
                );
                outbox.abandon();
                stream.cut();
                return;
            }
            Err(SendError::Failed(e)) => {
                debug!("{}: cannot send: {e}", stream.peer());
                outbox.abandon();
                stream.cut();
                return;
            }
        }
        buf.clear();
        if buf.capacity() > OUTBOX_BYTES {
            buf = Vec::new(); // a burst's buffer is not kept for an idle client
        }
    }
}

struct Member {
    stream: Arc<Stream>,
    outbox: Arc<Outbox>,
}

/// Everyone connected to a chat server.
#[derive(Default)]
pub(crate) struct Room {
    members: Mutex<Members>,
}

#[derive(Default)]
struct Members {
    all: HashMap<u64, Member>,
    /// After a stop: nothing more is relayed.
    closed: bool,
}

impl Room {
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
        members.all.insert(id, Member { stream, outbox });
    }

    fn leave(&self, id: u64) {
        self.lock().all.remove(&id);
    }

    /// The server is stopping: nothing more is relayed, what is queued is dropped, and no sender
    /// waits for a full outbox any more.
    pub(crate) fn close(&self) {
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

    /// Queues `payload` for every member but `from`, waiting for full outboxes at most `timeout`
    /// in all, however many there are. A member whose outbox is still full then is not reading:
    /// it is disconnected, and the room carries on.
    pub(crate) fn broadcast(&self, from: u64, payload: &Arc<[u8]>, timeout: Duration) {
        let others: Vec<(Arc<Stream>, Arc<Outbox>)> = {
            let members = self.lock();
            if members.closed {
                return;
            }
            members
                .all
                .iter()
                .filter(|(id, _)| **id != from)
                .map(|(_, m)| (Arc::clone(&m.stream), Arc::clone(&m.outbox)))
                .collect()
        };
        let deadline = deadline_in(timeout);
        for (stream, outbox) in others {
            if outbox.push(Arc::clone(payload), Some(deadline)) == Err(Refused::Full) {
                warn!(
                    "{} disconnected: not reading (outbound queue full for {})",
                    stream.peer(),
                    humantime::format_duration(timeout)
                );
                outbox.abandon();
                stream.cut();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(bytes: usize) -> Arc<[u8]> {
        vec![b'x'; bytes].into()
    }

    #[test]
    fn a_full_outbox_refuses_after_the_timeout_and_a_closed_one_at_once() {
        let outbox = Outbox::new();
        outbox.push(payload(OUTBOX_BYTES), None).expect("fits");
        let started = Instant::now();
        assert_eq!(
            outbox.push(payload(1), Some(started + Duration::from_millis(50))),
            Err(Refused::Full)
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        outbox.close();
        assert_eq!(
            outbox.push(payload(1), Some(Instant::now() + Duration::from_secs(10))),
            Err(Refused::Closed)
        );
    }

    #[test]
    fn the_writer_side_frees_room_and_drains_after_close() {
        let outbox = Arc::new(Outbox::new());
        outbox.push(payload(OUTBOX_BYTES), None).expect("fits");
        let taker = Arc::clone(&outbox);
        let writer = std::thread::spawn(move || {
            let mut total = 0;
            let mut buf = Vec::new();
            while taker.take_all(&mut buf) {
                total += buf.len();
                buf.clear();
            }
            total
        });
        // Waits (bounded) until the writer has taken the first payload.
        outbox
            .push(payload(10), Some(Instant::now() + Duration::from_secs(10)))
            .expect("room freed");
        outbox.close();
        assert_eq!(writer.join().expect("writer"), OUTBOX_BYTES + 10);
    }
}
