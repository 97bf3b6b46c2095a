//! Clients turned away at accept (not allowed, server full): told why in one line, then given a
//! moment to read it before the reset. Under TLS there is no session yet to say why in: the
//! reset alone, and the server's log says why.
//!
//! A refusal ends in a reset, never a clean close, which would mean success (see `stream`). A
//! reset can destroy the reason in the client's receive queue before it reads it (Windows drops
//! what was not read), so each refused connection is kept for up to half a second, or until the
//! client closes its side, while what it sends is read and dropped, by one thread for all of
//! them, never blocking the accept loop.

use std::io::{self, ErrorKind, Read};
use std::net::TcpStream;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::options::CONNECTION_STACK;
use crate::stream::{LINGER_AFTER_ERROR, turn_away_now};

/// How often lingering connections are read while some are waiting.
const SWEEP: Duration = Duration::from_millis(10);
/// At most this many linger at once; beyond that (a flood) they are closed at once.
const MAX_LINGERING: usize = 1024;

/// The handle that hands refused connections to the turnaway thread.
#[derive(Debug)]
pub(crate) struct Turnaway {
    queue: mpsc::Sender<Option<TcpStream>>,
    /// In the clear the reason is said; under TLS there is no session to say it in.
    plain: bool,
}

impl Turnaway {
    /// Starts the thread.
    pub(crate) fn start(plain: bool) -> io::Result<(Turnaway, JoinHandle<()>)> {
        let (queue, refused) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("plugboard-turnaway".into())
            .stack_size(CONNECTION_STACK) // as small as a connection's
            .spawn(move || linger_loop(&refused))?;
        Ok((Turnaway { queue, plain }, thread))
    }

    /// Tells the client why in one line `error: REASON` and lets it read that; the reset follows.
    pub(crate) fn refuse(&self, stream: TcpStream, reason: &str) {
        // Never blocks the caller: a fresh connection's send buffer is empty, so the line fits.
        turn_away_now(&stream, reason, self.plain);
        let _ = self.queue.send(Some(stream));
    }

    /// Ends the thread; connections still lingering are closed.
    pub(crate) fn stop(&self) {
        let _ = self.queue.send(None);
    }
}

fn linger_loop(refused: &mpsc::Receiver<Option<TcpStream>>) {
    let mut lingering: Vec<(TcpStream, Instant)> = Vec::new();
    let mut scratch = [0u8; 4096];
    loop {
        let next = if lingering.is_empty() {
            refused.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            refused.recv_timeout(SWEEP)
        };
        match next {
            Ok(Some(stream)) if lingering.len() < MAX_LINGERING => {
                lingering.push((stream, Instant::now() + LINGER_AFTER_ERROR));
            }
            Ok(Some(_flood)) => {} // closed at once
            Ok(None) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        lingering.retain(|(stream, deadline)| now < *deadline && still_open(stream, &mut scratch));
    }
}

/// Reads and drops what a refused client has sent; false once it has closed or failed.
fn still_open(mut stream: &TcpStream, scratch: &mut [u8]) -> bool {
    loop {
        match stream.read(scratch) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}
