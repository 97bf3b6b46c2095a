//! One client's thread: greet, read, frame, deliver, and account for it at the end.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use tracing::{debug, info, warn};

use crate::framing::{Batch, Decoder, Framing};
use crate::server::Shared;

/// The first read buffer; it doubles up to [`MAX_READ`] while reads fill it, so an idle client
/// costs a few KiB and a streaming one gets large reads.
const FIRST_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;

/// How a connection ended.
enum End {
    /// The client closed its side (or the server's stop shut ours).
    Closed,
    /// The server stopped and the drain time ran out.
    Stopped,
    /// The connection failed (reset, ...).
    Failed(io::Error),
    /// The sink could not take the messages.
    OutputFailed,
}

/// Serves one client until it leaves or the server stops.
pub(crate) fn serve(shared: &Shared, stream: &TcpStream, peer: SocketAddr) {
    info!("{peer} connected");
    let framing = shared.options.framing;
    if let Some(greeting) = &shared.options.greeting {
        let mut text = greeting.replace("{peer}", &peer.to_string());
        if framing == Framing::Line {
            text.push('\n');
        }
        if let Err(e) = (&*stream).write_all(text.as_bytes()) {
            debug!("{peer}: cannot send the greeting: {e}");
        }
    }

    let mut decoder = Decoder::new(framing);
    let mut batch = Batch::new();
    let mut buf = vec![0; FIRST_READ];
    let mut messages = 0u64;
    let mut bytes = 0u64;
    let end = loop {
        if shared.drain_expired() {
            break End::Stopped;
        }
        let n = match (&*stream).read(&mut buf) {
            Ok(0) => {
                // After a stop, end of stream may be our own shutdown: an unfinished line is not
                // a message the client sent, so it is dropped rather than printed torn.
                if !shared.is_stopping() {
                    decoder.finish(&mut batch);
                }
                if !deliver(shared, peer, &mut batch, &mut messages) {
                    break End::OutputFailed;
                }
                break End::Closed;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break End::Failed(e),
        };
        bytes += n as u64;
        decoder.feed(&buf[..n], &mut batch);
        if !deliver(shared, peer, &mut batch, &mut messages) {
            break End::OutputFailed;
        }
        if n == buf.len() && buf.len() < MAX_READ {
            buf.resize(buf.len() * 2, 0);
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    shared.add_totals(messages, bytes);

    let unfinished = decoder.pending_len();
    let dropped = if unfinished > 0 && framing == Framing::Line {
        format!(" ({unfinished} bytes of an unfinished line dropped)")
    } else {
        String::new()
    };
    match end {
        End::Closed => {
            info!("{peer} disconnected after {messages} messages, {bytes} bytes{dropped}")
        }
        End::Stopped => info!(
            "{peer} closed by the server stop after {messages} messages, {bytes} bytes{dropped}"
        ),
        End::Failed(e) => {
            warn!("{peer} disconnected: {e}; after {messages} messages, {bytes} bytes{dropped}")
        }
        End::OutputFailed => debug!("{peer} closed: output failed"),
    }
}

/// Hands the batch to the sink and empties it; false if the sink failed (the server then stops).
fn deliver(shared: &Shared, peer: SocketAddr, batch: &mut Batch, messages: &mut u64) -> bool {
    if batch.is_empty() {
        return true;
    }
    *messages += batch.len() as u64;
    let result = shared.sink.deliver(peer, batch);
    batch.clear();
    match result {
        Ok(()) => true,
        Err(e) => {
            shared.output_failed(e);
            false
        }
    }
}
