//! The client's load mode against real servers: counts, the JSON summary, round trips.

#![cfg(unix)]

use std::time::Duration;

use crate::support::{self, ServerProcess, json_field as field, run_client_to};

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn load_mode_sends_everything_and_reports_it() {
    let mut server = ServerProcess::start(&[]);
    let client = run_client_to(
        server.addr,
        &[
            "--connections",
            "4",
            "--count",
            "2500",
            "--size",
            "64",
            "--json",
        ],
        TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let json = client.stdout.trim();
    assert_eq!(field(json, "connections"), 4.0, "{client}");
    assert_eq!(field(json, "messages"), 10_000.0, "{client}");
    assert_eq!(
        field(json, "bytes"),
        640_000.0,
        "every message padded to 64 bytes\n{client}"
    );
    assert_eq!(field(json, "errors"), 0.0);
    assert!(field(json, "messages_per_s") > 0.0);
    assert!(
        client.stderr.contains("4 connections, 10000 messages"),
        "{client}"
    );

    // The client waited for the server to close each connection, so all is printed.
    let out = server.stop();
    out.assert_code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 10_000, "{out}");
    for line in &lines {
        let (_, message) = support::parse_message_line(line).expect("PEER MESSAGE");
        assert_eq!(message.len(), 63, "{line:?}");
        assert!(message.starts_with("hello world "));
    }
}

#[test]
fn round_trips_against_an_echo_server_report_latency() {
    let mut server = ServerProcess::start(&["--mode", "echo"]);
    let client = run_client_to(
        server.addr,
        &["--rtt", "--count", "300", "--size", "64", "--json"],
        TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let json = client.stdout.trim();
    assert_eq!(field(json, "messages"), 300.0, "{client}");
    let (p50, p99, max) = (field(json, "p50"), field(json, "p99"), field(json, "max"));
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{json}");
    assert!(client.stderr.contains("round trip p50"), "{client}");
    server.stop().assert_code(0);
}

#[test]
fn load_mode_counts_failed_connections() {
    // Nobody listens on a port that was just released.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let client = run_client_to(
        port,
        &["--connections", "3", "--count", "1", "--json"],
        TIMEOUT,
    );
    client.assert_code(1).assert_no_panic();
    assert_eq!(field(client.stdout.trim(), "errors"), 3.0, "{client}");
    let errors = client.error_lines();
    assert_eq!(errors.len(), 1, "{client}");
    assert!(errors[0].contains("3 of 3 connections failed") && errors[0].contains("refused"));
}

#[test]
fn rtt_needs_line_framing() {
    let client = support::run_client(&["--rtt", "--framing", "raw", "--port", "1"], TIMEOUT);
    client.assert_code(2).assert_no_panic();
}

/// Checks a `--chat --json` run of `connections` x `count` that went well: exit 0, every
/// message sent and delivered to all the others, no error, delivery latencies.
fn all_delivered(client: &support::Output, connections: usize, count: usize) {
    client.assert_code(0).assert_no_panic();
    let json = support::json_summary(client);
    let sent = connections * count;
    assert_eq!(field(json, "messages"), sent as f64, "{client}");
    let delivered = sent * (connections - 1);
    assert_eq!(field(json, "delivered"), delivered as f64, "{client}");
    assert_eq!(field(json, "errors"), 0.0, "{client}");
    assert!(json.contains("\"latency_us\""), "{client}");
}

/// `--chat` against a chat server: every connection gets every message of the others, and the
/// summary says so, with delivery latencies; the server printed every message sent.
#[test]
fn chat_load_counts_every_delivery() {
    let mut server = ServerProcess::start(&["--mode", "chat"]);
    let client = run_client_to(
        server.addr,
        &[
            "--chat",
            "--connections",
            "6",
            "--count",
            "50",
            "--size",
            "40",
            "--json",
        ],
        TIMEOUT,
    );
    all_delivered(&client, 6, 50);
    assert!(client.stderr.contains("1500 delivered"), "{client}");
    let out = server.stop();
    out.assert_code(0);
    assert_eq!(out.stdout.lines().count(), 300, "{out}");
}

/// `--chat --rate`: the fan-out on a schedule (open loop): everything is delivered, and the run
/// can't be over before the last message was due.
#[test]
fn chat_load_at_a_rate_keeps_its_schedule() {
    let mut server = ServerProcess::start(&["--mode", "chat"]);
    let started = std::time::Instant::now();
    let client = run_client_to(
        server.addr,
        &[
            "--chat",
            "--connections",
            "3",
            "--count",
            "20",
            "--rate",
            "100",
            "--json",
        ],
        TIMEOUT,
    );
    let took = started.elapsed();
    all_delivered(&client, 3, 20);
    // The 20th message of each was due 190 ms after the start.
    assert!(took >= Duration::from_millis(190), "{took:?}\n{client}");
    let out = server.stop();
    out.assert_code(0);
    assert_eq!(out.stdout.lines().count(), 60, "{out}");
}

/// A server's reason shows escaped in the load summary and the `error:` line, as printed lines
/// are: a peer can't drive the terminal through them.
#[test]
fn a_hostile_reason_is_shown_escaped() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port().to_string();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        (&stream)
            .write_all(b"error: bad \x1b[31m\x01 end\n")
            .expect("say why");
        // Closed with the client's first message unread: a reset.
        let mut byte = [0u8; 1];
        let _ = stream.peek(&mut byte);
    });
    let client = support::run_client(
        &[
            "-p",
            &port,
            "--connections",
            "1",
            "--count",
            "5",
            "--rate",
            "10",
            "--json",
        ],
        TIMEOUT,
    );
    server.join().expect("server thread");
    client.assert_code(1).assert_no_panic();
    assert!(
        !client.stderr.contains(['\x1b', '\x01']),
        "raw control characters\n{client}"
    );
    let errors = client.error_lines();
    assert_eq!(errors.len(), 1, "{client}");
    assert!(
        errors[0].contains("error: bad \\x1b[31m\\x01 end"),
        "{client}"
    );
}

/// `--chat` cut off by the server's stop mid-flood: every connection is an error, and the
/// first says the server's reason, not the failed send that came after it.
#[test]
fn chat_load_cut_by_a_stop_gives_the_reason() {
    let mut server = ServerProcess::start(&["--mode", "chat"]);
    let mut client = support::Background::client_to(
        server.addr,
        &[
            "--chat",
            "--connections",
            "6",
            "--count",
            "1000000",
            "--json",
        ],
    );
    support::poll_until(TIMEOUT, support::POLL_EVERY, || {
        (!server.stdout_so_far().is_empty()).then_some(())
    })
    .expect("the flood reached the server");
    server.stop().assert_code(0);
    let client = client.wait_exit(TIMEOUT);
    client.assert_code(1).assert_no_panic();
    let json = support::json_summary(&client);
    assert_eq!(field(json, "errors"), 6.0, "{client}");
    assert!(
        json.contains("closed the connection: error: server stopping"),
        "{client}"
    );
}

/// Against a server that relays nothing (log mode), `--chat` gets none of the others' messages:
/// each connection is an error saying how many were missing, and the client exits 1.
#[test]
fn chat_load_reports_missing_deliveries() {
    let mut server = ServerProcess::start(&[]);
    let client = run_client_to(
        server.addr,
        &[
            "--chat",
            "--connections",
            "3",
            "--count",
            "10",
            "--linger",
            "300ms",
            "--json",
        ],
        TIMEOUT,
    );
    client.assert_code(1).assert_no_panic();
    let json = client.stdout.trim();
    assert_eq!(field(json, "delivered"), 0.0, "{client}");
    assert_eq!(field(json, "errors"), 3.0, "{client}");
    assert!(
        client.error_lines()[0].contains("0 of the 20 messages from the other connections"),
        "{client}"
    );
    server.stop().assert_code(0);
}

/// `--chat` with no one else to hear from (one connection, or no messages) has nothing to wait
/// for: it confirms and exits 0 at once, not after --linger.
#[test]
fn chat_load_with_nothing_to_hear_is_done_at_once() {
    let mut server = ServerProcess::start(&["--mode", "chat"]);
    for args in [
        &[
            "--chat",
            "--connections",
            "1",
            "--count",
            "10",
            "--linger",
            "5s",
        ][..],
        &[
            "--chat",
            "--connections",
            "2",
            "--count",
            "0",
            "--linger",
            "5s",
        ],
    ] {
        let started = std::time::Instant::now();
        let client = run_client_to(server.addr, args, TIMEOUT);
        client.assert_code(0).assert_no_panic();
        let took = client.exited_at.duration_since(started);
        assert!(
            took < Duration::from_secs(3),
            "{args:?} took {took:?}\n{client}"
        );
    }
    server.stop().assert_code(0);
}

/// Against a server without a greeting, the first connection to find none says so, and the
/// others, joining after it, don't each wait --linger for one.
#[test]
fn chat_load_without_a_greeting_fails_once_not_per_connection() {
    let mut server = ServerProcess::start(&["--mode", "chat", "--greeting", ""]);
    let started = std::time::Instant::now();
    let client = run_client_to(
        server.addr,
        &[
            "--chat",
            "--connections",
            "8",
            "--count",
            "1",
            "--linger",
            "500ms",
        ],
        TIMEOUT,
    );
    client.assert_code(1).assert_no_panic();
    let took = client.exited_at.duration_since(started);
    // One wait of 0.5 s, where one per connection took 4 s.
    assert!(took < Duration::from_secs(2), "took {took:?}\n{client}");
    assert!(
        client.error_lines()[0].contains("8 of 8 connections failed; first: no greeting"),
        "{client}"
    );
    server.stop().assert_code(0);
}

/// A room where someone else talks too (here a stand-in server that sends each connection three
/// lines from a stranger, connection 7, where the other connection sent one): more lines than the
/// others sent can't be told apart, so the run is an error, not a count inflated by the stranger.
#[test]
fn chat_load_overhearing_a_stranger_is_an_error() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let room = std::thread::spawn(move || {
        let members: Vec<_> = (0..2)
            .map(|_| {
                let (mut stream, peer) = listener.accept().expect("accept");
                stream.write_all(b"welcome\n").expect("greet");
                std::thread::spawn(move || {
                    for i in 0..3 {
                        let line = format!("127.0.0.1:1 chat 7 {i} 5\n");
                        stream.write_all(line.as_bytes()).expect("relay");
                    }
                    // Read to the client's end, then close cleanly: its confirmation.
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest);
                    peer
                })
            })
            .collect();
        for member in members {
            member.join().expect("member");
        }
    });
    let client = run_client_to(
        addr,
        &["--chat", "--connections", "2", "--count", "1", "--json"],
        TIMEOUT,
    );
    room.join().expect("room");
    client.assert_code(1).assert_no_panic();
    assert!(
        client.error_lines()[0].contains(
            "3 lines arrived from the other connections, which sent 1: someone else is talking"
        ),
        "{client}"
    );
}
