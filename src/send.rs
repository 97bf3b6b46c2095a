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

/// Prepares `tcp` for sends that give up after `timeout` without progress (zero or `None`:
/// never): its socket timeout becomes a [`send_slice`]. Returns the timeout to pass to the sends.
pub(crate) fn set_send_timeout(
    tcp: &TcpStream,
    timeout: Option<Duration>,
) -> io::Result<Option<Duration>> {
    let timeout = timeout.filter(|t| !t.is_zero());
    tcp.set_write_timeout(timeout.map(send_slice))?;
    Ok(timeout)
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
    let mut wait = Wait::new(timeout);
    let mut rest = buf;
    while !rest.is_empty() {
        let sent = wait.after((&*tcp).write(rest), &give_up)?;
        rest = &rest[sent..];
    }
    Ok(())
}

/// How long a send has waited: what both kinds of send do after each write.
struct Wait {
    timeout: Duration,
    /// Since when nothing was taken; the clock is read only once a send has had to wait (the
    /// usual send doesn't).
    since: Option<Instant>,
}

impl Wait {
    fn new(timeout: Duration) -> Wait {
        Wait {
            timeout,
            since: None,
        }
    }

    /// How much a write sent (nothing, to try again), or why to stop.
    fn after(
        &mut self,
        written: io::Result<usize>,
        give_up: &impl Fn() -> bool,
    ) -> Result<usize, SendError> {
        match written {
            Ok(0) => Err(SendError::Failed(io::ErrorKind::WriteZero.into())),
            Ok(sent) => {
                self.since = None;
                Ok(sent)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) if is_timeout(&e) => {
                if give_up() {
                    return Err(SendError::GaveUp);
                }
                if self.since.get_or_insert_with(Instant::now).elapsed() >= self.timeout {
                    return Err(SendError::NotReading);
                }
                Ok(0)
            }
            Err(e) => Err(SendError::Failed(e)),
        }
    }
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
    const BATCH: usize = 16;
    let mut wait = Wait::new(timeout);
    let (mut next, mut offset) = (0, 0);
    while next < bufs.len() {
        if offset == bufs[next].len() {
            (next, offset) = (next + 1, 0);
            continue;
        }
        let end = (next + BATCH).min(bufs.len());
        let mut slices = [io::IoSlice::new(&[]); BATCH];
        slices[0] = io::IoSlice::new(&bufs[next][offset..]);
        for (slice, buf) in slices[1..].iter_mut().zip(&bufs[next + 1..end]) {
            *slice = io::IoSlice::new(buf);
        }
        let mut sent = wait.after((&*tcp).write_vectored(&slices[..end - next]), &give_up)?;
        while sent > 0 {
            let left = bufs[next].len() - offset;
            if sent < left {
                offset += sent;
                sent = 0;
            } else {
                sent -= left;
                (next, offset) = (next + 1, 0);
            }
        }
    }
    Ok(())
}

/// Makes a client's connection end in a reset if it is closed before [`finish_sending`]: a client
/// killed in the middle of a line then can't have the server take that half line for a last
/// message, as it would after a clean close. (The server's sockets do the same, see `stream`.)
/// Best effort: a socket that can't be set still works.
pub(crate) fn reset_unless_finished(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// The client's end of sending: its clean close from now on, then the half-close.
pub(crate) fn finish_sending(tcp: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(tcp).set_linger(None)?;
    tcp.shutdown(std::net::Shutdown::Write)
}

/// The instant `timeout` from now; a timeout too long for the clock (centuries) is a century.
pub(crate) fn deadline_in(timeout: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + CENTURY)
}

/// How long a blocked read may wait, of the `left` it has, before it looks whether the server
/// cut its connection. All of it but on Windows, where a cut can't wake a read (see
/// `Stream::cut`): there [`LOOK_FOR_CUT`] at the most.
pub(crate) fn read_slice(left: Duration) -> Duration {
    if cfg!(windows) {
        left.min(LOOK_FOR_CUT)
    } else {
        left
    }
}

/// Windows: how often a blocked read wakes to see whether the server cut its connection (a
/// stop, an eviction); elsewhere the cut's shutdown wakes it.
pub(crate) const LOOK_FOR_CUT: Duration = Duration::from_millis(250);

/// A socket call that gave up waiting: `WouldBlock` on Unix, `TimedOut` on Windows.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
