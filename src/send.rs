//! Sending on a blocking socket without blocking for ever: every send waits in short slices and
//! counts only what the peer took, so that it gives up on time (a peer taking nothing for the
//! timeout) or when told to (a stop, an eviction). Used by the server's [`Stream`], the client
//! and load mode alike: no TLS or server concern lives here.
//!
//! [`Stream`]: crate::stream::Stream

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A blocked send wakes this often to see whether it should give up (a stop, an eviction).
const SEND_SLICE: Duration = Duration::from_millis(100);

/// Why a send did not finish.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The client took nothing for the whole send timeout.
    NotReading,
    /// The caller's `give_up` said to stop (the server is stopping, the client was evicted).
    GaveUp,
    /// The connection failed (reset, ...).
    Failed(io::Error),
}

/// The socket send timeout (`SO_SNDTIMEO`) for sends with [`send_all`] under `timeout`: a short
/// slice, so that a blocked send wakes to check how long nothing has been taken, and whether to
/// give up.
pub(crate) fn send_slice(timeout: Duration) -> Duration {
    timeout.clamp(Duration::from_millis(1), SEND_SLICE)
}

/// Sends all of `buf` on `tcp`, whose send timeout is [`send_slice`]`(timeout)`. Gives up when the
/// peer takes nothing for `timeout` (to within a slice), or when `give_up` says so (asked whenever
/// the send has waited a slice). A plain socket timeout won't do: a send that took part of the
/// data and then waited the whole timeout for the rest returns the part, which looks like
/// progress, so "nothing taken for 3s" came after 9 s.
pub(crate) fn send_all(
    tcp: &TcpStream,
    buf: &[u8],
    timeout: Duration,
    give_up: impl Fn() -> bool,
) -> Result<(), SendError> {
    let mut rest = buf;
    // Only read the clock once a send has had to wait: the usual send doesn't.
    let mut waiting_since: Option<Instant> = None;
    while !rest.is_empty() {
        match (&*tcp).write(rest) {
            Ok(0) => return Err(SendError::Failed(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                rest = &rest[n..];
                waiting_since = None;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if give_up() {
                    return Err(SendError::GaveUp);
                }
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= timeout {
                    return Err(SendError::NotReading);
                }
            }
            Err(e) => return Err(SendError::Failed(e)),
        }
    }
    Ok(())
}

/// [`send_all`] for several buffers, back to back, with vectored writes: for sending what is
/// queued without first copying it into one buffer.
pub(crate) fn send_all_vectored(
    tcp: &TcpStream,
    bufs: &[&[u8]],
    timeout: Duration,
    give_up: impl Fn() -> bool,
) -> Result<(), SendError> {
    /// At most this many buffers per write (well under any system's `IOV_MAX`).
    const BATCH: usize = 64;
    let (mut next, mut offset) = (0, 0);
    let mut waiting_since: Option<Instant> = None;
    while next < bufs.len() {
        if offset == bufs[next].len() {
            (next, offset) = (next + 1, 0);
            continue;
        }
        let end = (next + BATCH).min(bufs.len());
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&bufs[next][offset..])
            .chain(bufs[next + 1..end].iter().copied())
            .map(io::IoSlice::new)
            .collect();
        match (&*tcp).write_vectored(&slices) {
            Ok(0) => return Err(SendError::Failed(io::ErrorKind::WriteZero.into())),
            Ok(mut n) => {
                waiting_since = None;
                while n > 0 {
                    let left = bufs[next].len() - offset;
                    if n < left {
                        offset += n;
                        n = 0;
                    } else {
                        n -= left;
                        (next, offset) = (next + 1, 0);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if give_up() {
                    return Err(SendError::GaveUp);
                }
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= timeout {
                    return Err(SendError::NotReading);
                }
            }
            Err(e) => return Err(SendError::Failed(e)),
        }
    }
    Ok(())
}

/// The instant `timeout` from now; a timeout too long for the clock (centuries) is a century.
pub(crate) fn deadline_in(timeout: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + CENTURY)
}

/// A socket call that gave up waiting: `WouldBlock` on Unix, `TimedOut` on Windows.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
