//! Chat mode: the room of connected clients, each with a bounded outbound queue drained by its own
//! writer thread, so that no slow reader can stall the others.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// Most bytes waiting to be sent to one client; a sender waits for room beyond that.
pub const OUTBOX_BYTES: usize = 1024 * 1024;

/// What is waiting to be written to one client.
#[derive(Debug)]
pub(crate) struct Outbox {
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
}

/// Why a payload could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Still full when the timeout ran out: the client is not reading.
    Full,
    /// The client is leaving.
    Closed,
}

impl Outbox {
    pub(crate) fn new() -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            space: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `payload`, waiting at most `timeout` for room (backpressure on the sender).
    pub(crate) fn push(&self, payload: Arc<[u8]>, timeout: Duration) -> Result<(), Refused> {
        let deadline = Instant::now() + timeout;
        let mut queue = self.lock();
        loop {
            if queue.closed {
                return Err(Refused::Closed);
            }
            // An empty outbox takes anything, so one large payload can't wait forever.
            if queue.bytes == 0 || queue.bytes + payload.len() <= OUTBOX_BYTES {
                break;
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
        queue.bytes += payload.len();
        queue.payloads.push_back(payload);
        drop(queue);
        self.ready.notify_one();
        Ok(())
    }

    /// Moves everything queued into `out`, waiting until there is something; false once the
    /// outbox is closed and empty.
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
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.space.notify_all();
    }

    /// No more payloads, and what is queued is dropped.
    pub(crate) fn abandon(&self) {
        {
            let mut queue = self.lock();
            queue.closed = true;
            queue.payloads.clear();
            queue.bytes = 0;
        }
        self.ready.notify_all();
        self.space.notify_all();
    }
}

/// A writer thread's work: send what the outbox holds until it closes or the client fails.
pub(crate) fn write_loop(outbox: &Outbox, stream: &TcpStream, peer: SocketAddr) {
    let mut buf = Vec::new();
    while outbox.take_all(&mut buf) {
        if let Err(e) = (&*stream).write_all(&buf) {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                warn!(
                    "{peer} disconnected: not reading (nothing could be sent within the send timeout)"
                );
            } else {
                debug!("{peer}: cannot send: {e}");
            }
            outbox.abandon();
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        buf.clear();
        if buf.capacity() > OUTBOX_BYTES {
            buf = Vec::new(); // a burst's buffer is not kept for an idle client
        }
    }
}

struct Member {
    peer: SocketAddr,
    stream: Arc<TcpStream>,
    outbox: Arc<Outbox>,
}

/// Everyone connected to a chat server.
#[derive(Default)]
pub(crate) struct Room {
    members: Mutex<HashMap<u64, Member>>,
}

impl Room {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Member>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn join(
        &self,
        id: u64,
        peer: SocketAddr,
        stream: Arc<TcpStream>,
        outbox: Arc<Outbox>,
    ) {
        self.lock().insert(
            id,
            Member {
                peer,
                stream,
                outbox,
            },
        );
    }

    pub(crate) fn leave(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Queues `payload` for every member but `from`. A member whose outbox stays full for
    /// `timeout` is not reading: it is disconnected, and the room carries on.
    pub(crate) fn broadcast(&self, from: u64, payload: &Arc<[u8]>, timeout: Duration) {
        let others: Vec<(SocketAddr, Arc<TcpStream>, Arc<Outbox>)> = self
            .lock()
            .iter()
            .filter(|(id, _)| **id != from)
            .map(|(_, m)| (m.peer, Arc::clone(&m.stream), Arc::clone(&m.outbox)))
            .collect();
        for (peer, stream, outbox) in others {
            if outbox.push(Arc::clone(payload), timeout) == Err(Refused::Full) {
                warn!(
                    "{peer} disconnected: not reading (outbound queue full for {})",
                    humantime::format_duration(timeout)
                );
                outbox.abandon();
                let _ = stream.shutdown(Shutdown::Both);
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
        outbox
            .push(payload(OUTBOX_BYTES), Duration::ZERO)
            .expect("fits");
        let started = Instant::now();
        assert_eq!(
            outbox.push(payload(1), Duration::from_millis(50)),
            Err(Refused::Full)
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        outbox.close();
        assert_eq!(
            outbox.push(payload(1), Duration::from_secs(10)),
            Err(Refused::Closed)
        );
    }

    #[test]
    fn the_writer_side_frees_room_and_drains_after_close() {
        let outbox = Arc::new(Outbox::new());
        outbox
            .push(payload(OUTBOX_BYTES), Duration::ZERO)
            .expect("fits");
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
            .push(payload(10), Duration::from_secs(10))
            .expect("room freed");
        outbox.close();
        assert_eq!(writer.join().expect("writer"), OUTBOX_BYTES + 10);
    }
}
