//! Behind a proxy, and several servers on one port: the server with `--proxy-protocol` behind a
//! real HAProxy ([`support::services::Haproxy`], `send-proxy` and `send-proxy-v2` in `mode tcp`),
//! headers written by hand where HAProxy sends none on request (a LOCAL header on a connection
//! of the test's own, a header cut short, none at all), and `--reuse-port`.
//!
//! Clients that must be told apart connect from loopback addresses of their own (127.0.0.2,
//! 127.0.0.3): HAProxy connects to the server from 127.0.0.1, so an address of 127.0.0.2 in the
//! server's output can only have come from a header.
//!
//! Unix only: servers are stopped with SIGTERM to read their whole output.

#![cfg(unix)]

use std::io::{BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::support::services::{Haproxy, Listen};
use crate::support::{
    self, IO_TIMEOUT, Output, ServerProcess, connect, expect_exactly_then_eof,
    expect_exactly_then_reset, greeted, greeting, greeting_peer, messages_from, poll_until,
    read_line, read_to_eof, run_client_to, run_server,
};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A client's own loopback address (HAProxy and the server are on 127.0.0.1).
const CLIENT_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Another client's.
const CLIENT_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// The 12 bytes a PROXY protocol version 2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// `server --proxy-protocol --trusted-proxy 127.0.0.1 extra...` on a port of its own.
fn proxied(extra: &[&str]) -> ServerProcess {
    let mut args = vec!["--proxy-protocol", "--trusted-proxy", "127.0.0.1"];
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

/// A connection from `source` (port chosen by the system) to `to`, with the bounded timeouts of
/// [`connect`].
fn connect_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .unwrap_or_else(|e| panic!("bind to {source}: {e}"));
    socket
        .connect_timeout(&to.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect from {source} to {to}: {e}"));
    let stream = support::bounded_io(TcpStream::from(socket));
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Connects from `source` to `to` (HAProxy) and reads the greeting, which must name the
/// connection's own address. Returns the stream, a buffered reader on a clone, and that address.
fn greeted_from(source: Ipv4Addr, to: SocketAddr) -> (TcpStream, BufReader<TcpStream>, SocketAddr) {
    let stream = connect_from(source, to);
    let me = stream.local_addr().expect("local addr");
    let mut reader = BufReader::new(stream.try_clone().expect("clone for reading"));
    assert_eq!(
        read_line(&mut reader).expect("greeting"),
        greeting(me),
        "the greeting through {to} names the client's own address"
    );
    (stream, reader, me)
}

/// Sends `lines` and half-closes; the server must then end the connection cleanly, having sent
/// nothing more.
fn send_and_finish(stream: &mut TcpStream, reader: BufReader<TcpStream>, lines: &[&str]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    stream.write_all(text.as_bytes()).expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    expect_exactly_then_eof(reader, "", "after the client's lines and half-close");
}

/// The fingerprint a `--tls-self-signed` server logs, `sha256:HEX`, for the client to pin.
fn logged_fingerprint(server: &ServerProcess) -> String {
    let logged = server.wait_for_log(&["tls fingerprint sha256:"]);
    logged
        .rsplit(' ')
        .next()
        .expect("the fingerprint ends the line")
        .to_string()
}

/// `hello world 0` ... for `count` messages.
fn hello(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("hello world {i}")).collect()
}

/// HAProxy with two frontends to `server`: `v1` (`send-proxy`) and `v2` (`send-proxy-v2`).
fn both_versions(server: SocketAddr) -> Haproxy {
    Haproxy::start(&[
        Listen {
            name: "v1",
            servers: &[server],
            options: "send-proxy",
        },
        Listen {
            name: "v2",
            servers: &[server],
            options: "send-proxy-v2",
        },
    ])
}

/// Asserts the summary counts `n` bad PROXY headers (and says nothing of them for none).
fn assert_bad_headers(out: &Output, n: usize) {
    support::assert_summary_counts(out, n, "bad PROXY headers");
}

/// A version 2 header: `command` 0 (LOCAL) or 1 (PROXY), `family` (0x11: TCP over IPv4), and
/// the address block.
fn v2_header(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.push(0x20 | command);
    header.push(family);
    let length = u16::try_from(addresses.len()).expect("a short address block");
    header.extend_from_slice(&length.to_be_bytes());
    header.extend_from_slice(addresses);
    header
}

/// A version 2 PROXY header for a TCP connection from `from` to `to` (IPv4).
fn v2_proxy(from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        panic!("IPv4 addresses expected: {from}, {to}");
    };
    let mut addresses = Vec::new();
    addresses.extend_from_slice(&from.ip().octets());
    addresses.extend_from_slice(&to.ip().octets());
    addresses.extend_from_slice(&from.port().to_be_bytes());
    addresses.extend_from_slice(&to.port().to_be_bytes());
    v2_header(1, 0x11, &addresses)
}

/// A version 2 LOCAL header: the proxy's own connection, no addresses.
fn v2_local() -> Vec<u8> {
    v2_header(0, 0x00, &[])
}

/// Polls (bounded) until `n` lines of the server's log pass `is`; returns them.
fn wait_for_lines(server: &ServerProcess, n: usize, is: impl Fn(&str) -> bool) -> Vec<String> {
    poll_until(support::POLL_DEADLINE, support::POLL_EVERY, || {
        let lines: Vec<String> = server
            .stderr_so_far()
            .lines()
            .filter(|l| is(l))
            .map(str::to_string)
            .collect();
        (lines.len() >= n).then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "the server did not log {n} such lines within {:?}\n--- stderr ---\n{}",
            support::POLL_DEADLINE,
            server.stderr_so_far()
        )
    })
}

/// Whether a log line is the proxy's own connection's (a health check's: a v2 LOCAL header, or
/// a v1 header naming the connection's own address), logged at debug.
fn is_local_check(line: &str) -> bool {
    line.contains(" DEBUG ") && line.ends_with(" connected (the proxy's own connection)")
}

/// Asserts that the log says nothing of LOCAL connections (health checks) above the debug level.
fn assert_local_checks_at_debug(out: &Output) {
    let above: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("the proxy's own connection") && !l.contains(" DEBUG "))
        .collect();
    assert!(
        above.is_empty(),
        "health checks logged above debug: {above:#?}\n{out}"
    );
}

// ------------------------------------------------------------------------------------------------
// 1. Through HAProxy
// ------------------------------------------------------------------------------------------------

/// HAProxy's `send-proxy` (v1) and `send-proxy-v2` both bring the real client to the server: a
/// client on 127.0.0.2 is greeted with its own address, its lines are printed under it (never
/// under HAProxy's), the log says it came via the very connection HAProxy made for it, and its
/// half-close gets a clean end through the proxy.
#[test]
fn haproxy_v1_and_v2_headers_name_the_real_client() {
    let mut server = proxied(&[]);
    let haproxy = both_versions(server.addr);
    let mut clients = Vec::new();
    for name in ["v1", "v2"] {
        let (mut stream, reader, me) = greeted_from(CLIENT_A, haproxy.frontend(name));
        assert_eq!(me.ip(), IpAddr::V4(CLIENT_A));
        let lines = [format!("{name} one"), format!("{name} two 我")];
        send_and_finish(&mut stream, reader, &[&lines[0], &lines[1]]);
        let session = haproxy.session(me);
        assert_eq!(session.client, me);
        assert_eq!(session.end, "--", "a normal end for HAProxy: {session:?}");
        assert_eq!(session.proxy.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        server.wait_for_log(&[&format!("{me} connected (via proxy {})", session.proxy)]);
        server.wait_for_log(&[&format!("{me} disconnected after 2 messages")]);
        clients.push((me, lines));
    }
    let out = server.stop_cleanly();
    for (me, lines) in &clients {
        assert_eq!(messages_from(&out.stdout, *me), lines, "{out}");
    }
    assert_eq!(
        out.stdout.lines().count(),
        4,
        "nothing else is printed\n{out}"
    );
    assert_bad_headers(&out, 0);
}

/// The real client through HAProxy (v1 and v2) exits 0, delivery confirmed through the proxy,
/// and every message it sent is printed under its own address: the one its greeting named,
/// which is the one HAProxy saw it connect from, not HAProxy's own.
#[test]
fn the_client_through_haproxy_is_printed_under_its_own_address() {
    let mut server = proxied(&[]);
    let haproxy = both_versions(server.addr);
    let mut peers = Vec::new();
    for name in ["v1", "v2"] {
        let client = run_client_to(
            haproxy.frontend(name),
            &["--count", "5", "--interval", "0"],
            TIMEOUT,
        );
        client.assert_code(0).assert_no_panic();
        let peer = greeting_peer(&client);
        assert_eq!(client.stdout, greeting(peer), "{client}");
        let session = haproxy.session(peer);
        server.wait_for_log(&[&format!("{peer} connected (via proxy {})", session.proxy)]);
        peers.push(peer);
    }
    let out = server.stop_cleanly();
    for peer in peers {
        assert_eq!(messages_from(&out.stdout, peer), hello(5), "{out}");
    }
    assert_eq!(
        out.stdout.lines().count(),
        10,
        "nothing else is printed\n{out}"
    );
    assert_bad_headers(&out, 0);
}

/// `--deny` judges the client the header names, not the proxy: through HAProxy, a client on
/// 127.0.0.2 (denied) is told `error: not allowed`, nothing it sent is printed, and the server
/// ends the connection with an error (HAProxy logs the server side ending it, `S...`); one on
/// 127.0.0.3 is served.
#[test]
fn deny_judges_the_address_in_the_header() {
    let mut server = proxied(&["--deny", "127.0.0.2"]);
    let haproxy = Haproxy::start(&[Listen {
        name: "v2",
        servers: &[server.addr],
        options: "send-proxy-v2",
    }]);
    let front = haproxy.frontend("v2");

    let mut denied = connect_from(CLIENT_A, front);
    let denied_addr = denied.local_addr().expect("local addr");
    denied
        .write_all(b"let me in\n")
        .expect("send before reading the refusal");
    // Then an end: HAProxy passes the server's reset on as a clean close (see
    // behind_haproxy_only_tls_keeps_the_delivery_promise).
    let (got, _) = read_to_eof(&denied);
    assert_eq!(got, "error: not allowed\n", "no greeting, only the refusal");
    let session = haproxy.session(denied_addr);
    assert!(
        session.end.starts_with('S'),
        "the server ended it with an error: {session:?}"
    );
    server.wait_for_log(&[&format!(
        "{denied_addr} refused: not allowed by --allow/--deny (via proxy {})",
        session.proxy
    )]);

    let (mut stream, reader, allowed) = greeted_from(CLIENT_B, front);
    send_and_finish(&mut stream, reader, &["allowed in"]);

    let out = server.stop_cleanly();
    assert!(
        messages_from(&out.stdout, denied_addr).is_empty(),
        "nothing of the denied client is printed\n{out}"
    );
    assert_eq!(messages_from(&out.stdout, allowed), ["allowed in"], "{out}");
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    assert_bad_headers(&out, 0);
}

/// Chat behind HAProxy: the room relays each line prefixed with its sender's real address (from
/// the header), to the other client only.
#[test]
fn chat_through_haproxy_names_senders_by_their_real_address() {
    let mut server = proxied(&["--mode", "chat"]);
    let haproxy = Haproxy::start(&[Listen {
        name: "chat",
        servers: &[server.addr],
        options: "send-proxy-v2",
    }]);
    let front = haproxy.frontend("chat");
    let (mut a, mut a_in, a_addr) = greeted_from(CLIENT_A, front);
    let (mut b, mut b_in, b_addr) = greeted_from(CLIENT_B, front);

    a.write_all(b"hi from a\n").expect("a sends");
    assert_eq!(
        read_line(&mut b_in).expect("b reads"),
        format!("{a_addr} hi from a\n")
    );
    b.write_all(b"hi from b\n").expect("b sends");
    assert_eq!(
        read_line(&mut a_in).expect("a reads"),
        format!("{b_addr} hi from b\n")
    );

    // Each leaves; neither got its own line back, or anything else.
    a.shutdown(Shutdown::Write).expect("a half-closes");
    expect_exactly_then_eof(a_in, "", "a, at its end");
    b.shutdown(Shutdown::Write).expect("b half-closes");
    expect_exactly_then_eof(b_in, "", "b, at its end");

    let out = server.stop_cleanly();
    assert_eq!(messages_from(&out.stdout, a_addr), ["hi from a"], "{out}");
    assert_eq!(messages_from(&out.stdout, b_addr), ["hi from b"], "{out}");
    assert_bad_headers(&out, 0);
}

/// TLS passes through HAProxy (`mode tcp`, `send-proxy-v2`): the header comes first, then the
/// client's handshake. The real client pinning the server's self-signed certificate exits 0 and
/// is printed under its own address; the log says TLS and the proxy. A TLS client straight to
/// the server (trusted, but no header) is not served, and is a bad header.
#[test]
fn tls_passes_through_haproxy_after_the_header() {
    let mut server = proxied(&["--tls-self-signed"]);
    let pin = logged_fingerprint(&server);
    let haproxy = Haproxy::start(&[Listen {
        name: "tls",
        servers: &[server.addr],
        options: "send-proxy-v2",
    }]);

    let client = run_client_to(
        haproxy.frontend("tls"),
        &["--tls-fingerprint", &pin, "--count", "3", "--interval", "0"],
        TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let peer = greeting_peer(&client);
    let session = haproxy.session(peer);
    server.wait_for_log(&[&format!(
        "{peer} connected (TLS 1.3, via proxy {})",
        session.proxy
    )]);

    let direct = run_client_to(
        server.addr,
        &["--tls-fingerprint", &pin, "--count", "1", "--interval", "0"],
        TIMEOUT,
    );
    direct.assert_code(1).assert_no_panic();
    assert!(
        direct
            .stderr
            .contains(&format!("TLS handshake with {} failed", server.addr)),
        "{direct}"
    );
    server.wait_for_log(&["refused: no PROXY protocol header"]);

    let out = server.stop_cleanly();
    assert_eq!(messages_from(&out.stdout, peer), hello(3), "{out}");
    assert_eq!(out.stdout.lines().count(), 3, "{out}");
    assert_bad_headers(&out, 1);
}

/// The README's HAProxy configuration: two servers behind one frontend, `balance leastconn`,
/// `send-proxy-v2 check check-send-proxy`. Both are health-checked with LOCAL headers (logged at
/// debug only); real clients one after another are spread over both, each printed under its own
/// address by the server HAProxy says it forwarded it to, and by no other; nothing is a bad
/// header.
#[test]
fn the_readme_configuration_spreads_clients_over_two_servers() {
    let mut a = proxied(&["-v"]);
    let mut b = proxied(&["-v"]);
    let haproxy = Haproxy::start(&[Listen {
        name: "chat",
        servers: &[a.addr, b.addr],
        options: "send-proxy-v2 check check-send-proxy inter 200ms",
    }]);
    for server in [&a, &b] {
        wait_for_lines(server, 1, is_local_check);
    }
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = run_client_to(
            haproxy.frontend("chat"),
            &["--count", "2", "--interval", "0"],
            TIMEOUT,
        );
        client.assert_code(0).assert_no_panic();
        let peer = greeting_peer(&client);
        clients.push((peer, haproxy.session(peer).server));
    }
    let (a_addr, b_addr) = (a.addr, b.addr);
    let out_a = a.stop_cleanly();
    let out_b = b.stop_cleanly();
    for (peer, to) in &clients {
        let (served, other) = if *to == a_addr {
            (&out_a, &out_b)
        } else {
            assert_eq!(*to, b_addr, "HAProxy forwarded {peer} elsewhere");
            (&out_b, &out_a)
        };
        assert_eq!(messages_from(&served.stdout, *peer), hello(2), "{served}");
        assert!(messages_from(&other.stdout, *peer).is_empty(), "{other}");
    }
    assert!(
        clients.iter().any(|(_, to)| *to == a_addr) && clients.iter().any(|(_, to)| *to == b_addr),
        "leastconn spreads clients one after another over both servers: {clients:?}"
    );
    for out in [&out_a, &out_b] {
        assert_bad_headers(out, 0);
        assert_local_checks_at_debug(out);
    }
}

/// What the delivery promise is worth behind HAProxy, as the README tells it. The server cuts a
/// client off (`--max-line 8`: `error: line too long`, then a reset), and HAProxy passes the
/// reset on as a clean close. In the clear the client, nothing of it printed, therefore exits 0,
/// the server's `error:` line on its stdout; under TLS end to end the clean end is the server's
/// close_notify, which HAProxy cannot make, so the same client exits 1.
#[test]
fn behind_haproxy_only_tls_keeps_the_delivery_promise() {
    for tls in [false, true] {
        let mut extra = vec!["--max-line", "8"];
        if tls {
            extra.push("--tls-self-signed");
        }
        let mut server = proxied(&extra);
        let pin = tls.then(|| logged_fingerprint(&server));
        let haproxy = Haproxy::start(&[Listen {
            name: "cut",
            servers: &[server.addr],
            options: "send-proxy-v2",
        }]);
        let mut args = vec!["--count", "2", "--interval", "0"];
        if let Some(pin) = &pin {
            args.extend(["--tls-fingerprint", pin.as_str()]);
        }
        let client = run_client_to(haproxy.frontend("cut"), &args, TIMEOUT);
        client.assert_no_panic();
        let peer = greeting_peer(&client);
        assert_eq!(
            client.stdout,
            format!("{}error: line too long (max 8 bytes)\n", greeting(peer)),
            "tls: {tls}\n{client}"
        );
        server.wait_for_log(&[&format!("{peer} cut off: line too long")]);
        client.assert_code(if tls { 1 } else { 0 });
        let out = server.stop_cleanly();
        assert!(out.stdout.is_empty(), "nothing was printed\n{out}");
    }
}

/// HAProxy's health checks with `check check-send-proxy`, every 200 ms, against a server
/// logging at debug (`-v`). Under `send-proxy-v2` each check is a v2 LOCAL header: the server
/// logs the proxy's own connection, at the debug level only. Under `send-proxy` (version 1 has no
/// LOCAL) HAProxy 2.6 sends a TCP4 header naming the check's own connection: the server takes a
/// header naming the connection's own peer for the proxy's own connection too. HAProxy resets
/// each check's connection at once; none is a bad header, none is refused, none is logged above
/// debug, nothing is printed.
#[test]
fn haproxy_health_checks_are_not_bad_headers() {
    const CHECKS: usize = 3;
    let mut server = proxied(&["-v"]);
    let _haproxy = Haproxy::start(&[
        Listen {
            name: "checked_v2",
            servers: &[server.addr],
            options: "send-proxy-v2 check check-send-proxy inter 200ms",
        },
        Listen {
            name: "checked_v1",
            servers: &[server.addr],
            options: "send-proxy check check-send-proxy inter 200ms",
        },
    ]);
    // Both kinds: v2's LOCAL, and v1's header naming the check's own connection.
    wait_for_lines(&server, 2 * CHECKS, is_local_check);

    let out = server.stop_cleanly();
    let loud: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && l.contains("connected"))
        .collect();
    assert!(
        loud.is_empty(),
        "checks logged above debug: {loud:#?}\n{out}"
    );
    assert_bad_headers(&out, 0);
    assert_local_checks_at_debug(&out);
    assert!(!out.stderr.contains("refused"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}

/// Under TLS too, a health check (its header, then a reset, as HAProxy's checks do; or a reset
/// before any byte, as a plain TCP check) is no failed handshake and no bad header, and is
/// logged at the debug level only.
#[test]
fn health_checks_under_tls_are_quiet() {
    let mut server = proxied(&["--tls-self-signed", "-v"]);
    for header in [v2_local(), Vec::new()] {
        let mut check = connect(server.addr);
        check.write_all(&header).expect("send the header");
        socket2::SockRef::from(&check)
            .set_linger(Some(Duration::ZERO))
            .expect("linger 0");
        drop(check); // a reset
    }
    // The LOCAL one is logged (at debug) when its handshake ends with the reset.
    wait_for_lines(&server, 1, |l| {
        l.contains(" DEBUG ") && l.contains("the proxy's own connection ended")
    });
    let out = server.stop_cleanly();
    assert_bad_headers(&out, 0);
    support::assert_summary_counts(&out, 0, "failed TLS handshakes");
    let loud: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && (l.contains("reset") || l.contains("own connection")))
        .collect();
    assert!(
        loud.is_empty(),
        "checks logged above debug: {loud:#?}\n{out}"
    );
}

// ------------------------------------------------------------------------------------------------
// 2. Headers by hand, and connections that bring none
// ------------------------------------------------------------------------------------------------

/// Headers written by hand on a trusted connection: a v2 LOCAL header (what HAProxy's v2 health
/// checks send) keeps the connection's own address, in the greeting, the log and what is
/// printed; v1 (IPv4 and IPv6) and v2 headers name whatever client they say, and the bytes
/// behind a header in the same write are the client's first line, none of them lost.
#[test]
fn headers_written_by_hand() {
    // At debug: a LOCAL connection is logged connected only there (it is usually a health check).
    let mut server = proxied(&["-v"]);
    let port = server.addr.port();

    let mut local = connect(server.addr);
    let own = local.local_addr().expect("local addr");
    local.write_all(&v2_local()).expect("send the header");
    let mut reader = BufReader::new(local.try_clone().expect("clone"));
    assert_eq!(read_line(&mut reader).expect("greeting"), greeting(own));
    send_and_finish(&mut local, reader, &["over the proxy's own connection"]);
    server.wait_for_log(&[&format!("{own} connected (the proxy's own connection)")]);

    let named: [(Vec<u8>, SocketAddr); 3] = [
        (
            format!("PROXY TCP4 192.0.2.7 127.0.0.1 51000 {port}\r\n").into_bytes(),
            "192.0.2.7:51000".parse().expect("addr"),
        ),
        (
            format!("PROXY TCP6 2001:db8::7 ::1 443 {port}\r\n").into_bytes(),
            "[2001:db8::7]:443".parse().expect("addr"),
        ),
        (
            v2_proxy("198.51.100.9:4242".parse().expect("addr"), server.addr),
            "198.51.100.9:4242".parse().expect("addr"),
        ),
    ];
    for (header, client) in &named {
        let mut stream = connect(server.addr);
        let proxy = stream.local_addr().expect("local addr");
        let mut first = header.clone();
        first.extend_from_slice(format!("first line from {client}\n").as_bytes());
        stream
            .write_all(&first)
            .expect("send the header and a line");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        assert_eq!(read_line(&mut reader).expect("greeting"), greeting(*client));
        send_and_finish(&mut stream, reader, &["second line"]);
        server.wait_for_log(&[&format!("{client} connected (via proxy {proxy})")]);
    }

    let out = server.stop_cleanly();
    assert_eq!(
        messages_from(&out.stdout, own),
        ["over the proxy's own connection"],
        "{out}"
    );
    for (_, client) in &named {
        assert_eq!(
            messages_from(&out.stdout, *client),
            [
                format!("first line from {client}"),
                "second line".to_string()
            ],
            "{out}"
        );
    }
    assert_bad_headers(&out, 0);
}

/// A connection from outside `--trusted-proxy` is refused at accept, whatever it sends (a header
/// naming a trusted address is not believed): told why in the clear, then reset; the log names
/// its real address. That is no bad header: it was never read.
#[test]
fn a_connection_from_outside_the_trusted_proxies_is_refused() {
    let mut server = proxied(&[]);
    let stream = connect_from(CLIENT_A, server.addr);
    let me = stream.local_addr().expect("local addr");
    let forged = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 40000 {}\r\nforged\n",
        server.addr.port()
    );
    (&stream)
        .write_all(forged.as_bytes())
        .expect("send before reading the refusal");
    expect_exactly_then_reset(&stream, "error: not a trusted proxy\n", "untrusted");
    server.wait_for_log(&[&format!(
        "{me} refused: not a trusted proxy (--trusted-proxy)"
    )]);

    let out = server.stop_cleanly();
    assert!(out.stdout.is_empty(), "nothing may be printed\n{out}");
    assert_bad_headers(&out, 0);
}

/// A trusted connection that starts with anything but a header (a line, or a header that does
/// not parse) is refused at once, far inside `--proxy-header-timeout` (20 s here): told `error:
/// PROXY protocol header expected`, reset, logged as a warning, and counted as a bad header.
#[test]
fn a_trusted_connection_without_a_header_is_refused_at_once() {
    let mut server = proxied(&["--proxy-header-timeout", "20s"]);
    let cases: [(&[u8], &str); 2] = [
        (b"hello\n", "refused: no PROXY protocol header"),
        (
            b"PROXY TCP4 999.0.0.1 127.0.0.1 1 2\r\n",
            "refused: malformed PROXY protocol header",
        ),
    ];
    for (start, logged) in cases {
        let what = String::from_utf8_lossy(start).into_owned();
        let stream = connect(server.addr);
        let me = stream.local_addr().expect("local addr");
        let sent = Instant::now();
        (&stream).write_all(start).expect("send");
        let told = read_line(&stream).expect("read the refusal");
        let took = sent.elapsed();
        assert_eq!(told, "error: PROXY protocol header expected\n", "{what:?}");
        assert!(
            took < Duration::from_secs(10),
            "{what:?}: refused after {took:?}, not at once"
        );
        expect_exactly_then_reset(&stream, "", &what);
        let line = server.wait_for_log(&[&format!("{me} {logged}")]);
        assert!(line.contains(" WARN "), "a warning: {line}");
    }
    let out = server.stop_cleanly();
    assert!(out.stdout.is_empty(), "nothing may be printed\n{out}");
    assert_bad_headers(&out, 2);
}

/// A trusted connection whose header never completes (half a header, or nothing at all) is
/// refused once `--proxy-header-timeout 1s` has passed, not before, nor much after: told `error:
/// no PROXY protocol header in time`, reset, logged, and counted as a bad header.
#[test]
fn a_header_that_never_completes_is_refused_after_the_timeout() {
    let mut server = proxied(&["--proxy-header-timeout", "1s"]);
    let started = Instant::now();
    let half = connect(server.addr);
    (&half)
        .write_all(b"PROXY TCP4 127.0.0.2 ")
        .expect("send half a header");
    let silent = connect(server.addr);
    for (stream, what) in [(&half, "half a header"), (&silent, "nothing")] {
        let me = stream.local_addr().expect("local addr");
        let told = read_line(stream).expect("read the refusal");
        let took = started.elapsed();
        assert_eq!(told, "error: no PROXY protocol header in time\n", "{what}");
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(10),
            "{what}: refused after {took:?}, not after the 1 s timeout"
        );
        expect_exactly_then_reset(stream, "", what);
        server.wait_for_log(&[&format!(
            "{me} refused: no complete PROXY protocol header within 1s"
        )]);
    }
    let out = server.stop_cleanly();
    assert_bad_headers(&out, 2);
}

/// A trusted connection closed before its header is complete. With nothing sent at all (a port
/// probe, such as a TCP health check) it is no bad header and nothing is refused: it is only
/// noted at debug. With part of a header sent, it is a bad header, logged as a warning, and told
/// nothing.
#[test]
fn a_connection_closed_before_its_header_ends() {
    let mut server = proxied(&["-v"]);
    let probe = connect(server.addr);
    let probe_addr = probe.local_addr().expect("local addr");
    drop(probe);
    let noted = server.wait_for_log(&[&format!("{probe_addr}: closed before sending anything")]);
    assert!(noted.contains(" DEBUG "), "at debug only: {noted}");

    let part = connect(server.addr);
    let part_addr = part.local_addr().expect("local addr");
    (&part)
        .write_all(b"PROXY TCP4 127.0.0.2 ")
        .expect("send part of a header");
    part.shutdown(Shutdown::Write).expect("half-close");
    let refused = server.wait_for_log(&[&format!(
        "{part_addr} refused: closed before its PROXY protocol header was complete"
    )]);
    assert!(refused.contains(" WARN "), "a warning: {refused}");
    let (told, _) = read_to_eof(&part);
    assert_eq!(told, "", "nothing to tell a connection that has ended");

    let out = server.stop_cleanly();
    assert!(
        !out.stderr.contains(&format!("{probe_addr} refused")),
        "{out}"
    );
    assert_bad_headers(&out, 1);
}

/// `--proxy-protocol` and `--trusted-proxy` need each other (and `--proxy-header-timeout` needs
/// both): alone, each is a usage error (exit 2) naming what is missing, and nothing listens.
#[test]
fn proxy_flags_need_each_other() {
    let cases: [(&[&str], &[&str]); 3] = [
        (&["--proxy-protocol"], &["--trusted-proxy"]),
        (&["--trusted-proxy", "127.0.0.1"], &["--proxy-protocol"]),
        (
            &["--proxy-header-timeout", "1s"],
            &["--proxy-protocol", "--trusted-proxy"],
        ),
    ];
    for (flags, missing) in cases {
        let mut args = vec!["--port", "0"];
        args.extend_from_slice(flags);
        let out = run_server(&args, TIMEOUT);
        out.assert_code(2).assert_no_panic();
        assert!(!out.stderr.contains("listening on"), "{out}");
        let (_, after) = out
            .stderr
            .split_once("required arguments were not provided")
            .unwrap_or_else(|| panic!("no missing argument named\n{out}"));
        let named = after.split("Usage:").next().unwrap_or_default();
        for flag in missing {
            assert!(named.contains(flag), "{flag} not named as missing\n{out}");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// 3. Several servers on one port
// ------------------------------------------------------------------------------------------------

/// Greeted by whichever server the kernel picks, sends one line and half-closes, and waits for
/// the clean end; returns the client's address.
fn one_line(addr: SocketAddr, line: &str) -> SocketAddr {
    let (mut stream, reader, me) = greeted(addr);
    send_and_finish(&mut stream, reader, &[line]);
    me
}

/// `--reuse-port`: a second server listens on the port of the first (a third without the flag
/// cannot: exit 1, naming the address); the kernel spreads clients over both, each client
/// served by exactly one; once one stops, the other serves every new client alone.
#[test]
fn reuse_port_shares_a_port_between_servers() {
    const MOST: usize = 200;
    let mut a = ServerProcess::start(&["--reuse-port"]);
    let port = a.port_arg();
    let mut b = ServerProcess::spawn(&["--host", "127.0.0.1", "--port", &port, "--reuse-port"]);
    assert_eq!(b.addr, a.addr);
    let lone = run_server(&["--host", "127.0.0.1", "--port", &port], TIMEOUT);
    lone.assert_code(1).assert_no_panic();
    assert!(
        lone.error_lines()
            .iter()
            .any(|l| l.contains(&format!("cannot listen on {}", a.addr))),
        "{lone}"
    );

    // Clients until both servers have printed one (the odds of 200 all going to one are 2^-199).
    let mut sent = Vec::new();
    for i in 0..MOST {
        let line = format!("shared {i}");
        sent.push((one_line(a.addr, &line), line));
        if !a.stdout_so_far().is_empty() && !b.stdout_so_far().is_empty() {
            break;
        }
    }
    let both = poll_until(support::POLL_DEADLINE, support::POLL_EVERY, || {
        (!a.stdout_so_far().is_empty() && !b.stdout_so_far().is_empty()).then_some(())
    });
    assert!(
        both.is_some(),
        "after {} clients, not both servers served one\n--- a ---\n{}\n--- b ---\n{}",
        sent.len(),
        a.stdout_so_far(),
        b.stdout_so_far()
    );

    let out_a = a.stop_cleanly();
    let mut alone = Vec::new();
    for i in 0..20 {
        let line = format!("alone {i}");
        let me = one_line(b.addr, &line);
        assert_eq!(b.wait_for_messages(me, 1), [line.as_str()]);
        alone.push((me, line));
    }
    let out_b = b.stop_cleanly();

    for (me, line) in &sent {
        let by_a = messages_from(&out_a.stdout, *me);
        let by_b = messages_from(&out_b.stdout, *me);
        let printed: Vec<&str> = by_a.iter().chain(&by_b).copied().collect();
        assert_eq!(
            printed,
            [line.as_str()],
            "printed once, by one server\n{out_a}\n{out_b}"
        );
    }
    for (me, line) in &alone {
        assert_eq!(messages_from(&out_b.stdout, *me), [line.as_str()]);
    }
    let total = out_a.stdout.lines().count() + out_b.stdout.lines().count();
    assert_eq!(total, sent.len() + alone.len(), "{out_a}\n{out_b}");
}
