//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer sends first on
//! each connection, naming the client it forwards.
//!
//! Parsing is the `ppp` crate's (the most used PROXY protocol parser on crates.io, with no
//! dependencies but `thiserror`, both versions, and a partial-input API); what is here is
//! reading exactly the header's bytes off the socket and no more, so that whatever follows (the
//! client's lines, or its TLS handshake) is read as if the header had never been there.
//!
//! No byte after the header is ever consumed: a header is at least 15 bytes (`PROXY
//! UNKNOWN\r\n`; a version 2 header is 16 and says how long the rest is), so those are read
//! first; a version 1 header then ends at its `\r\n`, found by peeking at what has arrived and
//! reading up to it.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ppp::{v1, v2};

use crate::send;

/// The 12 bytes a version 2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What a version 1 header starts with.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The shortest header of either version.
const SHORTEST: usize = 15;
/// The longest version 1 header, `\r\n` included (the specification's bound).
const V1_LONGEST: usize = 107;
/// A version 2 header's fixed part: the signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// The longest version 2 header taken: the addresses (216 bytes at most) and room for the TLVs a
/// proxy adds (TLS details, a unique id, a name). Its length field allows 64 KiB, which a
/// trusted proxy has no reason to send and thousands of pending headers would hold in memory.
const V2_LONGEST: usize = 8 * 1024;

/// Whom a connection is for, by its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The client the proxy forwards.
    Client(SocketAddr),
    /// The proxy's own connection (a version 2 `LOCAL` header, as in HAProxy's health checks,
    /// or addresses the header doesn't give: `UNKNOWN`, unspecified, a Unix socket): the
    /// connection's own addresses stand.
    Local,
}

/// Why no header was read.
#[derive(Debug)]
pub(crate) enum HeaderError {
    /// The first bytes are not a PROXY protocol header.
    NotProxy,
    /// A header, but not a valid one.
    Malformed(String),
    /// Not all of it arrived in time.
    Timeout(Duration),
    /// The connection ended first, after this many bytes of a header.
    Closed(usize),
    /// Reading failed.
    Io(io::Error),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::NotProxy => {
                f.write_str("no PROXY protocol header (the connection starts with something else)")
            }
            HeaderError::Malformed(why) => write!(f, "malformed PROXY protocol header: {why}"),
            HeaderError::Timeout(timeout) => write!(
                f,
                "no complete PROXY protocol header within {}",
                humantime::format_duration(*timeout)
            ),
            HeaderError::Closed(0) => f.write_str("closed before sending anything"),
            HeaderError::Closed(_) => {
                f.write_str("closed before its PROXY protocol header was complete")
            }
            HeaderError::Io(e) => write!(f, "reading its PROXY protocol header failed: {e}"),
        }
    }
}

/// Reads the PROXY protocol header that starts `tcp`, within `timeout`, and not a byte more;
/// gives up (`Closed`) if `cut` says the connection was cut (a stop) while it waited. Leaves
/// the socket's read timeout unset.
pub(crate) fn read_header(
    tcp: &TcpStream,
    timeout: Duration,
    cut: &dyn Fn() -> bool,
) -> Result<Origin, HeaderError> {
    let mut reader = Reader {
        tcp,
        deadline: Instant::now() + timeout,
        timeout,
        cut,
        header: Vec::with_capacity(V1_LONGEST),
    };
    let read = reader.read();
    let _ = tcp.set_read_timeout(None);
    read?;
    parse(&reader.header)
}

struct Reader<'a> {
    tcp: &'a TcpStream,
    deadline: Instant,
    timeout: Duration,
    cut: &'a dyn Fn() -> bool,
    header: Vec<u8>,
}

impl Reader<'_> {
    /// Reads the whole header into `self.header`.
    fn read(&mut self) -> Result<(), HeaderError> {
        while self.header.len() < SHORTEST {
            self.read_some(SHORTEST - self.header.len())?;
            if !could_be_header(&self.header) {
                return Err(HeaderError::NotProxy);
            }
        }
        if self.header.starts_with(V2_SIGNATURE) {
            self.read_up_to(V2_FIXED)?;
            let length = usize::from(u16::from_be_bytes([self.header[14], self.header[15]]));
            if V2_FIXED + length > V2_LONGEST {
                return Err(HeaderError::Malformed(format!(
                    "a version 2 header of {} bytes (at most {V2_LONGEST} taken)",
                    V2_FIXED + length
                )));
            }
            self.read_up_to(V2_FIXED + length)
        } else {
            self.read_v1_line()
        }
    }

    /// Reads a version 1 header up to its `\r\n`: peeks at what has arrived, and reads up to
    /// the line's end if it is there, or all of it (all header) and waits for more if not.
    fn read_v1_line(&mut self) -> Result<(), HeaderError> {
        let mut peeked = [0; V1_LONGEST];
        loop {
            if let Some(end) = memchr::memmem::find(&self.header, b"\r\n") {
                if end + 2 != self.header.len() {
                    // Only possible within the first 15 bytes, and no header is that short.
                    return Err(HeaderError::Malformed("line too short".into()));
                }
                return Ok(());
            }
            let room = V1_LONGEST - self.header.len();
            if room == 0 {
                return Err(HeaderError::Malformed(format!(
                    "no line end within {V1_LONGEST} bytes"
                )));
            }
            let seen = match self.wait(self.header.len(), |tcp| tcp.peek(&mut peeked[..room]))? {
                0 => return Err(HeaderError::Closed(self.header.len())),
                seen => seen,
            };
            // A `\r` already read may end with a `\n` just arrived.
            let last_cr = self.header.last() == Some(&b'\r');
            let take = if last_cr && peeked[0] == b'\n' {
                1
            } else {
                memchr::memmem::find(&peeked[..seen], b"\r\n").map_or(seen, |at| at + 2)
            };
            let want = self.header.len() + take;
            self.read_up_to(want)?;
        }
    }

    /// Reads until the header holds `len` bytes.
    fn read_up_to(&mut self, len: usize) -> Result<(), HeaderError> {
        while self.header.len() < len {
            self.read_some(len - self.header.len())?;
        }
        Ok(())
    }

    /// One read of at most `most` bytes onto the header.
    fn read_some(&mut self, most: usize) -> Result<(), HeaderError> {
        let start = self.header.len();
        // Read in place (a buffer on the stack would be memory held by every connection
        // thread), so the header is taken out of `self` meanwhile.
        let mut header = std::mem::take(&mut self.header);
        header.resize(start + most, 0);
        let read = self.wait(start, |mut tcp| tcp.read(&mut header[start..]));
        header.truncate(start + read.as_ref().map_or(0, |n| *n));
        self.header = header;
        match read? {
            0 => Err(HeaderError::Closed(start)),
            _ => Ok(()),
        }
    }

    /// Runs `op` (a read or a peek, with `held` bytes of the header read so far) until it
    /// returns, the deadline passes or the connection is cut: on Windows it waits in slices,
    /// looking for the cut after each.
    fn wait(
        &self,
        held: usize,
        mut op: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Result<usize, HeaderError> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HeaderError::Timeout(self.timeout));
            }
            self.tcp
                .set_read_timeout(Some(send::read_slice(left)))
                .map_err(HeaderError::Io)?;
            match op(self.tcp) {
                Err(e) if send::is_timeout(&e) && (self.cut)() => {
                    return Err(HeaderError::Closed(held));
                }
                Err(e) if send::is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(e, held)),
                Ok(n) => return Ok(n),
            }
        }
    }
}

/// What a failed read means, with `held` bytes of the header read.
fn failed(e: io::Error, held: usize) -> HeaderError {
    match e.kind() {
        // Reset before a byte came: a port probe, as a plain TCP health check is.
        io::ErrorKind::ConnectionReset if held == 0 => HeaderError::Closed(0),
        _ => HeaderError::Io(e),
    }
}

/// Whether `start` (at most [`SHORTEST`] bytes) can begin a header of either version.
fn could_be_header(start: &[u8]) -> bool {
    let agrees = |prefix: &[u8]| {
        let n = start.len().min(prefix.len());
        start[..n] == prefix[..n]
    };
    agrees(V1_PREFIX) || agrees(V2_SIGNATURE)
}

/// What a complete header says.
fn parse(header: &[u8]) -> Result<Origin, HeaderError> {
    // The parser's messages may quote `\r\n` as it is: kept to one log line.
    let malformed = |e: &dyn std::fmt::Display| {
        HeaderError::Malformed(e.to_string().replace('\r', "\\r").replace('\n', "\\n"))
    };
    if header.starts_with(V2_SIGNATURE) {
        let header = v2::Header::try_from(header).map_err(|e| malformed(&e))?;
        if header.command == v2::Command::Local {
            return Ok(Origin::Local);
        }
        return Ok(match header.addresses {
            v2::Addresses::IPv4(a) => {
                Origin::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
            }
            v2::Addresses::IPv6(a) => {
                Origin::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
            }
            v2::Addresses::Unspecified | v2::Addresses::Unix(_) => Origin::Local,
        });
    }
    // "The receiver must ignore anything presented before the CRLF" after UNKNOWN, which the
    // parser doesn't.
    if header.starts_with(b"PROXY UNKNOWN") {
        return Ok(Origin::Local);
    }
    let header = v1::Header::try_from(header).map_err(|e| malformed(&e))?;
    Ok(match header.addresses {
        v1::Addresses::Tcp4(a) => {
            Origin::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v1::Addresses::Tcp6(a) => {
            Origin::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v1::Addresses::Unknown => Origin::Local,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;

    /// A connected pair: what the test writes to `.0` the server side `.1` reads.
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    /// Sends `chunks` one write each (`None`: half-close), then reads a header and what
    /// follows it until the end.
    fn read_after(chunks: &[&[u8]]) -> (Result<Origin, HeaderError>, Vec<u8>) {
        let (mut client, server) = pair();
        client.set_nodelay(true).expect("nodelay");
        for chunk in chunks {
            client.write_all(chunk).expect("write");
        }
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let origin = read_header(&server, Duration::from_secs(5), &|| false);
        let mut rest = Vec::new();
        let _ = (&server).read_to_end(&mut rest);
        (origin, rest)
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("an address")
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        let length = u16::try_from(addresses.len()).expect("short");
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(addresses);
        header
    }

    #[test]
    fn a_v1_header_gives_the_client_and_leaves_what_follows() {
        let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 8887\r\n";
        let (origin, rest) = read_after(&[header, b"hello\n"]);
        assert_eq!(
            origin.expect("a header"),
            Origin::Client(addr("192.0.2.7:51000"))
        );
        assert_eq!(rest, b"hello\n");
        let header = b"PROXY TCP6 2001:db8::7 2001:db8::1 443 8887\r\nhi";
        let (origin, rest) = read_after(&[header]);
        assert_eq!(
            origin.expect("a header"),
            Origin::Client(addr("[2001:db8::7]:443"))
        );
        assert_eq!(rest, b"hi");
    }

    /// The header in pieces, its `\r` and `\n` apart too, with data right behind it in the
    /// same write.
    #[test]
    fn a_v1_header_in_pieces_is_read_whole_and_no_further() {
        let (origin, rest) = read_after(&[
            b"PROXY TCP4 10.",
            b"0.0.1 10.0.0.2 1",
            b"234 80\r",
            b"\nGET",
        ]);
        assert_eq!(
            origin.expect("a header"),
            Origin::Client(addr("10.0.0.1:1234"))
        );
        assert_eq!(rest, b"GET");
        let (origin, rest) = read_after(&[b"PROXY UNKNOWN\r\nx"]);
        assert_eq!(origin.expect("a header"), Origin::Local);
        assert_eq!(rest, b"x");
        // Whatever follows UNKNOWN is ignored, as the specification says.
        let (origin, rest) = read_after(&[b"PROXY UNKNOWN a b c d e \xff\r\ny"]);
        assert_eq!(origin.expect("a header"), Origin::Local);
        assert_eq!(rest, b"y");
    }

    #[test]
    fn a_v2_header_gives_the_client_or_says_local() {
        let mut ipv4 = vec![192, 0, 2, 9, 198, 51, 100, 1];
        ipv4.extend_from_slice(&4242u16.to_be_bytes());
        ipv4.extend_from_slice(&8887u16.to_be_bytes());
        let mut stream = v2(1, 0x11, &ipv4);
        stream.extend_from_slice(b"\x16\x03\x01");
        let (origin, rest) = read_after(&[&stream[..5], &stream[5..20], &stream[20..]]);
        assert_eq!(
            origin.expect("a header"),
            Origin::Client(addr("192.0.2.9:4242"))
        );
        assert_eq!(rest, b"\x16\x03\x01");
        let (origin, rest) = read_after(&[&v2(0, 0, &[]), b"after"]);
        assert_eq!(origin.expect("a header"), Origin::Local);
        assert_eq!(rest, b"after");
    }

    #[test]
    fn what_is_not_a_header_is_refused_without_waiting() {
        for start in [
            &b"hello world\n"[..],
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00",
        ] {
            let (client, server) = pair();
            (&client).write_all(start).expect("write");
            // Not all 15 bytes are there, and none will come: refused on what did come.
            let at = Instant::now();
            let origin = read_header(&server, Duration::from_secs(30), &|| false);
            assert!(
                matches!(origin, Err(HeaderError::NotProxy)),
                "{start:?}: {origin:?}"
            );
            assert!(at.elapsed() < Duration::from_secs(10));
        }
    }

    #[test]
    fn bad_headers_are_malformed() {
        let cases: [&[u8]; 4] = [
            b"PROXY TCP4 999.0.0.1 10.0.0.2 1 2\r\n",
            b"PROXY TCP4 10.0.0.1\r\n             ",
            b"PROXY SOMETHING ELSE ENTIRELY 1 2\r\n",
            &[b'A'; 200],
        ];
        for case in cases {
            let mut header = b"PROXY ".to_vec();
            header.extend_from_slice(case.strip_prefix(b"PROXY ").unwrap_or(case));
            let (origin, _) = read_after(&[&header]);
            assert!(
                matches!(origin, Err(HeaderError::Malformed(_))),
                "{:?}: {origin:?}",
                String::from_utf8_lossy(&header)
            );
        }
        let (origin, _) = read_after(&[&v2(7, 0x11, &[0; 12])]);
        assert!(
            matches!(origin, Err(HeaderError::Malformed(_))),
            "{origin:?}"
        );
        // Longer than any proxy sends: refused before it is read.
        let (client, server) = pair();
        (&client)
            .write_all(&v2(1, 0x11, &[0; 12])[..14])
            .expect("write");
        (&client).write_all(&[0xff, 0xff]).expect("write");
        let origin = read_header(&server, Duration::from_secs(30), &|| false);
        assert!(
            matches!(&origin, Err(HeaderError::Malformed(why)) if why.contains("65551")),
            "{origin:?}"
        );
        // No message on two lines.
        let (origin, _) = read_after(&[b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2 3\r\n"]);
        let said = origin.expect_err("too many fields").to_string();
        assert!(!said.contains(['\r', '\n']), "{said:?}");
    }

    #[test]
    fn a_header_cut_short_or_late_is_an_error() {
        let (origin, _) = read_after(&[b"PROXY TCP4 10.0.0.1 "]);
        assert!(matches!(origin, Err(HeaderError::Closed(20))), "{origin:?}");
        let (origin, _) = read_after(&[]);
        assert!(matches!(origin, Err(HeaderError::Closed(0))), "{origin:?}");
        let (client, server) = pair();
        (&client).write_all(b"PROXY TCP4 10.0.0.1 ").expect("write");
        let at = Instant::now();
        let origin = read_header(&server, Duration::from_millis(300), &|| false);
        assert!(matches!(origin, Err(HeaderError::Timeout(_))), "{origin:?}");
        assert!(at.elapsed() >= Duration::from_millis(300));
        assert!(at.elapsed() < Duration::from_secs(5));
        drop(client);
    }
}
