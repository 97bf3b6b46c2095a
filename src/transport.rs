//! A connection's bytes on the wire, in the clear or under TLS: the one type the server's
//! `Stream`, the client and load mode read and write through.
//!
//! Two threads use one connection at once (a reader, and a sender: echo replies, chat lines, a
//! client's messages). A TLS session has one state machine for both directions, so it sits behind
//! a lock that is held only to decrypt what was read or to encrypt what is to be sent, never
//! across a blocking socket call:
//!
//! - The reader waits for the socket to have something (`peek`, which also honours the read
//!   timeout and wakes at a stop's cut), then, locked, takes what has arrived into the session
//!   and decrypts it. Where the system allows (Unix), it first tries without waiting.
//! - A sender holds a second lock, `unsent`, from encrypting to the last byte sent, so records
//!   leave in the order they were made. A non-blocking send ([`Transport::try_send`]) that the
//!   socket takes only part of keeps the rest of its last record there, and says so
//!   ([`Transport::has_unsent`]): the next send, or [`flush`](Transport::flush), sends it before
//!   anything newer.
//!
//! Ends: a clean end under TLS is a `close_notify` before the FIN
//! ([`close_notify`](Transport::close_notify)); a TLS peer whose stream ends without one is a
//! failure (`UnexpectedEof`), never a clean end, so a truncation can't pass for success.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use crate::addr::Addrs;
use crate::error::Error;
use crate::send::{self, SendError, deadline_in, is_timeout};
use crate::tls::{ClientTls, subject_name};

/// Plaintext encrypted at a time by a non-blocking send: one full TLS record, so that at most
/// one record is left unsent.
const RECORD: usize = 16 * 1024;

/// Plaintext encrypted before a blocking send sends it: three records, which with their
/// overhead stay under the 64 KiB from which the server's allocator maps blocks apart (and
/// unmaps them when freed: a system call or two per send).
const SEND: usize = 48 * 1024;

/// Room for the records of `plain` bytes: each adds a header, a tag and a content type.
fn sealed_size(plain: usize) -> usize {
    plain + (plain / RECORD + 1) * 64
}

/// The `unsent` buffer is kept between sends up to this size, and given back beyond it.
const KEEP_UNSENT: usize = 4 * 1024;

/// Most bytes of answers a peer's own TLS messages asked for (key updates) that may wait for
/// it to read them.
const MAX_UNANSWERED: usize = 64 * 1024;

/// How long a client's TLS handshake may take when the connect timeout leaves it to the system.
pub(crate) const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a client connects: the addresses a host resolved to, the host (the name TLS verifies),
/// and TLS if any.
#[derive(Clone, Debug)]
pub(crate) struct Dialer {
    addrs: Addrs,
    host: String,
    tls: Option<ClientTls>,
}

impl Dialer {
    pub(crate) fn new(addrs: Addrs, host: &str, tls: Option<ClientTls>) -> Dialer {
        Dialer {
            addrs,
            host: host.to_string(),
            tls,
        }
    }

    /// See [`Transport::connect`].
    pub(crate) fn connect(&self, timeout: Duration) -> Result<(Transport, SocketAddr), Error> {
        Transport::connect(&self.addrs, &self.host, timeout, self.tls.as_ref())
    }
}

/// A TCP connection, in the clear or under TLS.
#[derive(Debug)]
pub(crate) struct Transport {
    tcp: TcpStream,
    /// Boxed: a session is over a kilobyte, which a client in the clear needn't carry.
    tls: Option<Box<Tls>>,
}

#[derive(Debug)]
struct Tls {
    session: Mutex<Connection>,
    /// Held by whoever sends, from encrypting to the last byte sent; holds what a non-blocking
    /// send could not send of its last record.
    unsent: Mutex<Vec<u8>>,
    /// Whether `unsent` holds anything, for [`Transport::has_unsent`] without the lock.
    behind: AtomicBool,
    /// Why the session failed, once it has: reads return the failure after the data that came
    /// before it.
    failed: OnceLock<String>,
    /// The server's side of the session (what a peer's first bytes must look like differs).
    server: bool,
}

/// Why a TLS handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The peer's first bytes were not TLS.
    NotTls,
    /// No handshake within the timeout.
    Timeout(Duration),
    /// The peer closed the connection during the handshake.
    Closed,
    /// The connection failed.
    Io(io::Error),
    /// TLS said no: an untrusted certificate, a wrong name, no common protocol, ...
    Tls(rustls::Error),
}

impl HandshakeError {
    /// The reason as a phrase, for the server's log (`server`) or a client's error.
    pub(crate) fn describe(&self, server: bool) -> String {
        match self {
            HandshakeError::NotTls if server => "not a TLS client".to_string(),
            HandshakeError::NotTls => "it answered in plaintext: not a TLS server?".to_string(),
            HandshakeError::Timeout(waited) => format!(
                "no TLS handshake within {}{}",
                humantime::format_duration(*waited),
                if server { "" } else { " (not a TLS server?)" }
            ),
            HandshakeError::Closed if server => "it closed the connection during the TLS handshake".to_string(),
            HandshakeError::Closed => "the server closed the connection during the handshake (not a TLS server, or it refused this client?)".to_string(),
            HandshakeError::Io(e) if server => e.to_string(),
            HandshakeError::Io(e) => format!("{e} (not a TLS server, or it refused this client?)"),
            HandshakeError::Tls(e) if server => format!("TLS handshake failed: {}", text(e)),
            HandshakeError::Tls(e) if is_ca_as_end_entity(e) => {
                "invalid peer certificate: the server presents a CA certificate as its own (pin it with --tls-fingerprint, or give the server a certificate that CA signed)".to_string()
            }
            HandshakeError::Tls(e) => format!("{}{}", text(e), hint(e)),
        }
    }
}

/// `e` as a phrase. rustls shows a certificate error of a verifier's own (the pin's mismatch)
/// in its debug form, `Other(OtherError(Custom { .. }))`: here, its text.
fn text(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            format!("invalid peer certificate: {other}")
        }
        e => e.to_string(),
    }
}

/// A self-signed certificate made as a CA (OpenSSL's `req -x509` does), given as a root and
/// presented as the server's own: webpki refuses it, with an error that says little.
fn is_ca_as_end_entity(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))
        if format!("{other:?}").contains("CaUsedAsEndEntity"))
}

/// A session's failure as the error of a read or a send, with what can be done about it.
fn failure(e: &rustls::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}{}", text(e), hint(e)),
    )
}

/// What a client can do about a certificate it refused.
fn hint(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError;
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            " (not signed by a root this client trusts: --tls-ca FILE names the CA, or --tls-fingerprint pins the server's certificate)"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => " (--tls-server-name NAME checks it for another name)",
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
            " (the server requires a client certificate: --tls-cert and --tls-key)"
        }
        rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::CertificateExpired
            | rustls::AlertDescription::CertificateUnknown,
        ) => " (the peer refused a certificate: this side's, if it presented one with --tls-cert)",
        _ => "",
    }
}

impl Transport {
    /// A connection in the clear.
    pub(crate) fn plain(tcp: TcpStream) -> Transport {
        Transport { tcp, tls: None }
    }

    /// The server's side of a TLS connection; [`handshake`](Transport::handshake) comes next.
    pub(crate) fn tls_server(tcp: TcpStream, config: &Arc<ServerConfig>) -> io::Result<Transport> {
        let session = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        Ok(Transport::with_session(tcp, session.into(), true))
    }

    /// A client's side of a TLS connection to `name`; [`handshake`](Transport::handshake)
    /// comes next.
    pub(crate) fn tls_client(
        tcp: TcpStream,
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Transport> {
        let session = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
        Ok(Transport::with_session(tcp, session.into(), false))
    }

    fn with_session(tcp: TcpStream, session: Connection, server: bool) -> Transport {
        Transport {
            tcp,
            tls: Some(Box::new(Tls {
                session: Mutex::new(session),
                unsent: Mutex::new(Vec::new()),
                behind: AtomicBool::new(false),
                failed: OnceLock::new(),
                server,
            })),
        }
    }

    /// Connects to the first of `addrs` that answers, with TLS if `tls` says so (verifying the
    /// server as `host`, unless a server name is set); the handshake has its own `timeout`
    /// (zero: [`CLIENT_HANDSHAKE_TIMEOUT`]).
    pub(crate) fn connect(
        addrs: &Addrs,
        host: &str,
        timeout: Duration,
        tls: Option<&ClientTls>,
    ) -> Result<(Transport, SocketAddr), Error> {
        let (tcp, peer) = addrs.connect(timeout)?;
        let Some(tls) = tls else {
            return Ok((Transport::plain(tcp), peer));
        };
        let name = tls.name_for(host)?;
        let transport = Transport::tls_client(tcp, tls.config(), name)
            .map_err(|source| Error::Connection { addr: peer, source })?;
        let timeout = if timeout.is_zero() {
            CLIENT_HANDSHAKE_TIMEOUT
        } else {
            timeout
        };
        transport
            .handshake(timeout, &|| false)
            .map_err(|e| Error::Handshake {
                addr: peer,
                problem: e.describe(false),
            })?;
        Ok((transport, peer))
    }

    /// The socket, for a connection given up on before anything was said on it.
    pub(crate) fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// The socket.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether this connection is under TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Runs the TLS handshake (nothing in the clear), within `timeout` in all: a peer that
    /// sends nothing, or stalls halfway, is given up on then, and so is one whose connection
    /// `cut` says was cut (a stop) while it waited. Restores a read timeout of none.
    pub(crate) fn handshake(
        &self,
        timeout: Duration,
        cut: &dyn Fn() -> bool,
    ) -> Result<(), HandshakeError> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        let deadline = deadline_in(timeout);
        let result = self.handshake_until(tls, deadline, timeout, cut);
        if result.is_ok() {
            self.tcp
                .set_read_timeout(None)
                .map_err(HandshakeError::Io)?;
        }
        result
    }

    fn handshake_until(
        &self,
        tls: &Tls,
        deadline: Instant,
        timeout: Duration,
        cut: &dyn Fn() -> bool,
    ) -> Result<(), HandshakeError> {
        let mut first = true;
        let mut out = Vec::new();
        loop {
            let handshaking = {
                let mut session = tls.session();
                take_sealed(&mut session, &mut out).map_err(HandshakeError::Io)?;
                session.is_handshaking()
            };
            if !out.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                send::send_all(&self.tcp, &out, left.max(Duration::from_millis(1)), || {
                    false
                })
                .map_err(|e| match e {
                    SendError::Failed(e) => HandshakeError::Io(e),
                    SendError::NotReading | SendError::GaveUp => HandshakeError::Timeout(timeout),
                })?;
                out.clear();
            }
            if !handshaking {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HandshakeError::Timeout(timeout));
            }
            self.tcp
                .set_read_timeout(Some(send::read_slice(left)))
                .map_err(HandshakeError::Io)?;
            let mut byte = [0u8; 1];
            match self.tcp.peek(&mut byte) {
                Ok(0) => return Err(HandshakeError::Closed),
                // A handshake record first (a server may also start with an alert).
                Ok(_) if first && byte[0] != 0x16 && (tls.server || byte[0] != 0x15) => {
                    return Err(HandshakeError::NotTls);
                }
                Ok(_) => first = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) && cut() => return Err(HandshakeError::Closed),
                // A slice of the wait, on Windows: the deadline says whether it is over.
                Err(e) if is_timeout(&e) => continue,
                Err(e) => return Err(HandshakeError::Io(e)),
            }
            let mut session = tls.session();
            match session.read_tls(&mut Recv::waiting(&self.tcp)) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => return Err(HandshakeError::Timeout(timeout)),
                Err(e) => return Err(HandshakeError::Io(e)),
            }
            if let Err(e) = session.process_new_packets() {
                // The alert that says why, if the socket takes it.
                let _ = take_sealed(&mut session, &mut out);
                drop(session);
                let _ = send_now(&self.tcp, &out);
                return Err(HandshakeError::Tls(e));
            }
        }
    }

    /// Under TLS: the protocol version, and the name the client's certificate gives (mutual
    /// TLS), for the log.
    pub(crate) fn tls_description(&self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let session = tls.session();
        let version = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_string(),
            Some(other) => format!("{other:?}"),
            None => "TLS".to_string(),
        };
        let client = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| subject_name(cert).unwrap_or_else(|| "(no name)".to_string()));
        Some(match client {
            Some(name) => format!("{version}, client {name:?}"),
            None => version,
        })
    }

    /// Reads what the peer sent: `Ok(0)` at its clean end (under TLS: its `close_notify`).
    /// Waits as long as the socket's read timeout says.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return (&self.tcp).read(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        // Where a read can't be made not to wait (Windows), only once `peek` says data is there.
        let mut arrived = cfg!(unix);
        loop {
            if let Some(n) = self.open(tls, buf, arrived)? {
                return Ok(n);
            }
            let mut byte = [0u8; 1];
            match self.tcp.peek(&mut byte) {
                Ok(_) => arrived = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what has already arrived, never waiting: `WouldBlock` for nothing yet. Where that
    /// can't be done (Windows, in the clear), it reads nothing: `WouldBlock`.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return Recv::now(&self.tcp).read(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        match self.open(tls, buf, cfg!(unix))? {
            Some(n) => Ok(n),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Decrypted bytes into `buf`, as many as have arrived, or (`take`) as what has arrived on
    /// the socket makes: `None` for none yet, `Some(0)` at the peer's `close_notify`. A session
    /// that fails sends its alert if the socket takes it at once.
    fn open(&self, tls: &Tls, buf: &mut [u8], mut take: bool) -> io::Result<Option<usize>> {
        let mut session = tls.session();
        let mut filled = 0;
        let some = |filled: usize| Ok((filled > 0).then_some(filled));
        loop {
            match session.reader().read(&mut buf[filled..]) {
                // The clean end: what came before it first; it is found again next time.
                Ok(0) => return Ok(Some(filled)),
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        return Ok(Some(filled));
                    }
                }
                // The session failed after what was read: that first, then why.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(why) = tls.failed.get() {
                        return match filled {
                            0 => Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())),
                            filled => Ok(Some(filled)),
                        };
                    }
                }
                // An end without `close_notify`, found again next time.
                Err(_) if filled > 0 => return Ok(Some(filled)),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended without TLS close_notify (cut short, or reset)",
                    ));
                }
                Err(e) => return Err(e),
            }
            if !take {
                return some(filled);
            }
            let mut recv = if cfg!(unix) {
                Recv::now(&self.tcp)
            } else {
                Recv::waiting(&self.tcp)
            };
            match session.read_tls(&mut recv) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return some(filled),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) if filled > 0 => return Ok(Some(filled)),
                Err(e) => return Err(e),
            }
            // What has arrived is in; on Windows the next read must wait for `peek` again.
            take = cfg!(unix);
            let processed = session.process_new_packets();
            let answered = if session.wants_write() {
                // An alert, or an answer to the peer's key update: sent now if nobody is
                // sending and the socket takes it, else with the next send.
                self.pass_on(tls, &mut session)
            } else {
                Ok(())
            };
            // A failure ends the connection, after what the records before it held: the loop
            // takes that, then returns the failure.
            if let Err(e) = processed {
                let _ = tls.failed.set(failure(&e).to_string());
            } else if let Err(e) = answered {
                let _ = tls.failed.set(e.to_string());
            }
        }
    }

    /// Sends what the session has to say that no send asked for, without waiting for anyone.
    /// A peer that keeps asking for answers (key updates) and reads none of them fails once
    /// [`MAX_UNANSWERED`] bytes of them wait.
    fn pass_on(&self, tls: &Tls, session: &mut Connection) -> io::Result<()> {
        let Some(mut unsent) = try_lock(&tls.unsent) else {
            return Ok(());
        };
        take_sealed(session, &mut unsent)?;
        let sent = send_now(&self.tcp, &unsent).unwrap_or(0);
        unsent.drain(..sent);
        tls.behind.store(!unsent.is_empty(), Ordering::Release);
        if unsent.len() > MAX_UNANSWERED {
            return Err(io::Error::other(
                "it keeps asking for TLS answers (key updates) and reads none",
            ));
        }
        Ok(())
    }

    /// Sends all of `buf`. Gives up when the peer takes nothing for `timeout`, or when `give_up`
    /// says so (asked whenever the send has waited a moment); see [`send::send_all`].
    pub(crate) fn send_all(
        &self,
        buf: &[u8],
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        if self.tls.is_none() {
            return send::send_all(&self.tcp, buf, timeout, give_up);
        }
        // Under TLS one buffer is a case of several: sealed into the same records either way.
        self.send_all_vectored(&[buf], timeout, give_up)
    }

    /// [`send_all`](Transport::send_all) for several buffers back to back.
    pub(crate) fn send_all_vectored(
        &self,
        bufs: &[&[u8]],
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        let Some(tls) = &self.tls else {
            return send::send_all_vectored(&self.tcp, bufs, timeout, give_up);
        };
        let mut unsent = lock(&tls.unsent);
        self.send_unsent(tls, &mut unsent, timeout, &give_up)?;
        // Small buffers (chat lines) go out joined into full records, not one record each.
        let total: usize = bufs.iter().map(|buf| buf.len()).sum();
        unsent.reserve_exact(sealed_size(total.min(SEND)));
        let mut record = Vec::new();
        for buf in bufs {
            let mut rest = *buf;
            while !rest.is_empty() {
                let take = rest.len().min(RECORD - record.len());
                record.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if record.len() == RECORD {
                    seal(tls, &record, &mut unsent).map_err(SendError::Failed)?;
                    record.clear();
                    if unsent.len() >= SEND {
                        self.send_unsent(tls, &mut unsent, timeout, &give_up)?;
                    }
                }
            }
        }
        seal(tls, &record, &mut unsent).map_err(SendError::Failed)?;
        self.send_unsent(tls, &mut unsent, timeout, &give_up)?;
        give_back(&mut unsent);
        Ok(())
    }

    /// Sends what `unsent` holds, under its lock.
    fn send_unsent(
        &self,
        tls: &Tls,
        unsent: &mut Vec<u8>,
        timeout: Duration,
        give_up: &impl Fn() -> bool,
    ) -> Result<(), SendError> {
        if unsent.is_empty() {
            return Ok(());
        }
        send::send_all(&self.tcp, unsent, timeout, give_up)?;
        unsent.clear();
        tls.behind.store(false, Ordering::Release);
        Ok(())
    }

    /// Sends what the socket takes of `buf` at once, never waiting: how many bytes (`WouldBlock`
    /// for none). Under TLS, bytes counted as taken may still be in their record, unsent:
    /// [`has_unsent`](Transport::has_unsent) says so, and the next send or
    /// [`flush`](Transport::flush) sends it first. Where sends can't be made not to wait
    /// (Windows), it takes none: the caller queues.
    pub(crate) fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return send_now(&self.tcp, buf);
        };
        if cfg!(not(unix)) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // Another thread sending to this peer right now: the caller queues.
        let Some(mut unsent) = try_lock(&tls.unsent) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if !unsent.is_empty() && !self.send_some(tls, &mut unsent)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut taken = 0;
        for record in buf.chunks(RECORD) {
            seal(tls, record, &mut unsent)?;
            taken += record.len();
            if !self.send_some(tls, &mut unsent)? {
                break;
            }
        }
        Ok(taken)
    }

    /// Sends what the socket takes of `unsent` at once; whether that was all.
    fn send_some(&self, tls: &Tls, unsent: &mut Vec<u8>) -> io::Result<bool> {
        let sent = match send_now(&self.tcp, unsent) {
            Ok(sent) => sent,
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        unsent.drain(..sent);
        let all = unsent.is_empty();
        tls.behind.store(!all, Ordering::Release);
        Ok(all)
    }

    /// Whether a non-blocking send left part of a record unsent (never, in the clear).
    pub(crate) fn has_unsent(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|tls| tls.behind.load(Ordering::Acquire))
    }

    /// Sends what a non-blocking send left unsent, as [`send_all`](Transport::send_all) would.
    pub(crate) fn flush(
        &self,
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        self.send_all(&[], timeout, give_up)
    }

    /// Writes `bytes` as far as the socket takes them now, for a last word before a reset (the
    /// socket is non-blocking by then). Under TLS, only if nobody else is sending and nothing
    /// is left unsent.
    pub(crate) fn write_now(&self, bytes: &[u8]) {
        let Some(tls) = &self.tls else {
            let _ = (&self.tcp).write(bytes);
            return;
        };
        let Some(mut unsent) = try_lock(&tls.unsent) else {
            return;
        };
        if unsent.is_empty() && seal(tls, bytes, &mut unsent).is_ok() {
            let _ = (&self.tcp).write(&unsent);
            unsent.clear();
        }
    }

    /// Under TLS, sends `close_notify` (after anything unsent): the clean end of what this side
    /// sends. The FIN is the caller's. Nothing in the clear.
    pub(crate) fn close_notify(&self, timeout: Duration) -> Result<(), SendError> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        let mut unsent = lock(&tls.unsent);
        {
            let mut session = tls.session();
            session.send_close_notify();
            take_sealed(&mut session, &mut unsent).map_err(SendError::Failed)?;
        }
        self.send_unsent(tls, &mut unsent, timeout, &|| false)?;
        give_back(&mut unsent);
        Ok(())
    }
}

impl Tls {
    fn session(&self) -> MutexGuard<'_, Connection> {
        lock(&self.session)
    }
}

/// An emptied `unsent` keeps its buffer only if it is small: an idle connection holds little.
fn give_back(unsent: &mut Vec<u8>) {
    if unsent.is_empty() && unsent.capacity() > KEEP_UNSENT {
        *unsent = Vec::new();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn try_lock<T>(mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Encrypts `plain` into records appended to `out` (with anything the session had to say
/// before them).
fn seal(tls: &Tls, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mut session = tls.session();
    let mut rest = plain;
    while !rest.is_empty() {
        // A session that failed says why (the peer's alert, read by the reader meanwhile).
        let taken = session.writer().write(rest).map_err(|e| {
            match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(tls) => failure(tls),
                None => e,
            }
        })?;
        take_sealed(&mut session, out)?;
        if taken == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        rest = &rest[taken..];
    }
    take_sealed(&mut session, out)
}

/// Moves what the session has to send into `out`.
fn take_sealed(session: &mut Connection, out: &mut Vec<u8>) -> io::Result<()> {
    while session.wants_write() {
        session.write_tls(out)?;
    }
    Ok(())
}

/// Sends what the socket takes of `buf` at once, never waiting (`WouldBlock` for none; where
/// that can't be done, always `WouldBlock`).
fn send_now(tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    #[cfg(unix)]
    {
        use rustix::net::{SendFlags, send};
        send(tcp, buf, SendFlags::DONTWAIT | SendFlags::NOSIGNAL).map_err(Into::into)
    }
    #[cfg(not(unix))]
    {
        let _ = (tcp, buf);
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// The socket as a reader for the session: waiting, or only taking what has arrived.
struct Recv<'a> {
    tcp: &'a TcpStream,
    wait: bool,
}

impl<'a> Recv<'a> {
    fn waiting(tcp: &'a TcpStream) -> Recv<'a> {
        Recv { tcp, wait: true }
    }

    fn now(tcp: &'a TcpStream) -> Recv<'a> {
        Recv { tcp, wait: false }
    }
}

impl Read for Recv<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.wait {
            return (&*self.tcp).read(buf);
        }
        #[cfg(unix)]
        {
            use rustix::net::{RecvFlags, recv};
            recv(self.tcp, buf, RecvFlags::DONTWAIT)
                .map(|(n, _)| n)
                .map_err(Into::into)
        }
        #[cfg(not(unix))]
        {
            let _ = buf;
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}

/// A client's send of all of `bytes` to `peer`: with a `timeout`, giving up when the server takes
/// nothing for that long ([`Error::SendTimeout`]; the socket's send timeout must be
/// [`send::send_slice`]`(timeout)`), and without one, waiting as long as the system does.
pub(crate) fn send_to(
    transport: &Transport,
    peer: SocketAddr,
    bytes: &[u8],
    timeout: Option<Duration>,
) -> Result<(), Error> {
    let broken = |source| Error::Connection { addr: peer, source };
    let (limit, timeout) = match timeout {
        Some(timeout) => (timeout, Some(timeout)),
        None => (Duration::MAX, None),
    };
    transport
        .send_all(bytes, limit, || false)
        .map_err(|e| match (e, timeout) {
            (SendError::Failed(source), _) => broken(source),
            (SendError::NotReading | SendError::GaveUp, Some(timeout)) => Error::SendTimeout {
                addr: peer,
                timeout,
            },
            (SendError::NotReading | SendError::GaveUp, None) => {
                broken(io::ErrorKind::TimedOut.into())
            }
        })
}

/// The client's end of sending: under TLS its `close_notify`, then its clean close from now on,
/// and the half-close.
pub(crate) fn finish_sending(transport: &Transport, timeout: Option<Duration>) -> io::Result<()> {
    transport
        .close_notify(timeout.unwrap_or(Duration::MAX))
        .map_err(|e| match e {
            SendError::Failed(e) => e,
            SendError::NotReading | SendError::GaveUp => io::ErrorKind::TimedOut.into(),
        })?;
    send::finish_sending(&transport.tcp)
}
