//! The tests' side of a connection: connecting with bounded timeouts, the greeting, and reading
//! what the server sends.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Read/write timeout on every test socket, and the connect timeout.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The default greeting's text before the client's address (`welcome to plugboard, `), from
/// [`plugboard::DEFAULT_GREETING`].
pub fn greeting_prefix() -> &'static str {
    plugboard::DEFAULT_GREETING
        .split_once("{peer}")
        .expect("DEFAULT_GREETING names the {peer}")
        .0
}

/// The default greeting as a line-framing server sends it to a client at `peer`.
pub fn greeting(peer: SocketAddr) -> String {
    format!(
        "{}\n",
        plugboard::DEFAULT_GREETING.replace("{peer}", &peer.to_string())
    )
}

/// Connects with bounded connect, read and write timeouts ([`IO_TIMEOUT`]).
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    bounded_io(stream)
}

/// `stream` with read and write timeouts of [`IO_TIMEOUT`].
pub fn bounded_io(stream: TcpStream) -> TcpStream {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("set_read_timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("set_write_timeout");
    stream
}

/// Reads one line (through its `\n`) a byte at a time, so nothing after it is consumed. At EOF it
/// returns what it has (possibly empty, possibly without `\n`).
pub fn read_line(mut from: impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match from.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Reads until EOF or an error (the socket's read timeout bounds it). Returns everything read and
/// the error that ended it, if any: a peer that is cut off may see a reset after the server's last
/// words, and some tests tolerate that.
pub fn read_to_eof(mut from: impl Read) -> (String, Option<io::Error>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let error = loop {
        match from.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    (String::from_utf8_lossy(&data).into_owned(), error)
}

/// Asserts that the server sends exactly `expected` and then closes cleanly (EOF, no error).
pub fn expect_exactly_then_eof(from: impl Read, expected: &str, what: &str) {
    let (got, error) = read_to_eof(from);
    assert_eq!(got, expected, "{what}: what the server sent");
    assert!(
        error.is_none(),
        "{what}: expected EOF after {expected:?}, got error {error:?}"
    );
}

/// Asserts that the server sends exactly `expected` and then resets the connection: how it ends
/// a connection it refuses or cuts off, so that the client can't mistake it for the clean close
/// that confirms delivery.
pub fn expect_exactly_then_reset(from: impl Read, expected: &str, what: &str) {
    let (got, error) = read_to_eof(from);
    assert_eq!(got, expected, "{what}: what the server sent");
    assert!(
        matches!(&error, Some(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{what}: expected a reset after {expected:?}, got {error:?}"
    );
}

/// Connects (see [`connect`]) to a server with the default greeting, with `TCP_NODELAY`, and
/// reads the greeting. Returns the stream, a buffered reader on a clone, and our address.
#[cfg(unix)]
pub fn greeted(server: SocketAddr) -> (TcpStream, io::BufReader<TcpStream>, SocketAddr) {
    let stream = connect(server);
    stream.set_nodelay(true).expect("nodelay");
    let me = stream.local_addr().expect("local addr");
    let mut reader = io::BufReader::new(stream.try_clone().expect("clone for reading"));
    assert_eq!(read_line(&mut reader).expect("greeting"), greeting(me));
    (stream, reader, me)
}

/// Sends `lines` lines of about 200 bytes, `{i:08} xxx…` numbered from 0, in 64 KiB writes: a
/// chat flood.
#[cfg(unix)]
pub fn flood_numbered(stream: &mut TcpStream, lines: usize) {
    use std::io::Write;
    let padding = "x".repeat(180);
    let mut batch = Vec::new();
    for i in 0..lines {
        batch.extend_from_slice(format!("{i:08} {padding}\n").as_bytes());
        if batch.len() > 64 * 1024 || i + 1 == lines {
            stream.write_all(&batch).expect("flood");
            batch.clear();
        }
    }
}

/// Reads the `lines` lines of [`flood_numbered`] as a chat server relays them from `from`,
/// checking that none is missing or out of order.
#[cfg(unix)]
pub fn receive_numbered(reader: &mut impl io::BufRead, from: SocketAddr, lines: usize) {
    let mut line = String::new();
    for i in 0..lines {
        line.clear();
        reader.read_line(&mut line).expect("receive");
        let expected = format!("{from} {i:08} ");
        assert!(line.starts_with(&expected), "line {i}: {line:?}");
    }
}
