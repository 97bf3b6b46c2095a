//! The Windows binaries, run: cross-built for `x86_64-pc-windows-gnu` and started under Wine
//! ([`support::wine`]), talking to the Linux binaries over loopback. The original demo was a
//! Windows console program; these tests hold the Windows build to what the Linux one promises:
//! the demo conversation both ways round, Ctrl-C (Wine turns a SIGINT into the console's
//! `CTRL_C_EVENT`) stopping the server cleanly, a client cut off by a stop exiting 1, TLS under
//! load, and the log and exit codes.

use std::net::TcpListener;

use crate::support::wine::wine;
use crate::support::{
    self, EXIT_TIMEOUT, Output, POLL_DEADLINE, POLL_EVERY, ServerProcess, greeting, greeting_peer,
    json_field, messages_from, poll_until, run_client_to, signal, stopped_line,
};

/// `--host 127.0.0.1 --port 0`, then `extra`.
fn on_port_0<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--host", "127.0.0.1", "--port", "0"];
    args.extend_from_slice(extra);
    args
}

/// A port nothing listens on (bound a moment ago, closed again).
fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local addr")
        .port()
        .to_string()
}

/// The one `error:` line of a process that failed.
fn single_error_line(out: &Output) -> String {
    let lines = out.error_lines();
    assert_eq!(lines.len(), 1, "expected exactly one `error:` line\n{out}");
    lines.into_iter().next().expect("one line")
}

/// Waits (bounded) for the first message the server printed, and returns who sent it.
fn first_sender(server: &ServerProcess) -> std::net::SocketAddr {
    poll_until(POLL_DEADLINE, POLL_EVERY, || {
        server
            .stdout_so_far()
            .lines()
            .find_map(support::parse_message_line)
            .map(|(peer, _)| peer)
    })
    .unwrap_or_else(|| panic!("the server printed no message\n{}", server.stderr_so_far()))
}

/// The demo, the Windows server's side: a Linux client is greeted with its address and its ten
/// numbered messages are printed under it, in order; Ctrl-C then stops the server, exit 0, with
/// its summary. The log on a pipe has no colour codes.
#[test]
fn the_windows_server_holds_the_demo_conversation_and_stops_on_ctrl_c() {
    let mut server = wine().server(&on_port_0(&[]));
    let client = run_client_to(
        server.addr,
        &["--count", "10", "--interval", "10ms"],
        EXIT_TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let peer = greeting_peer(&client);
    assert_eq!(client.stdout, greeting(peer), "{client}");
    server.wait_for_log(&[&format!("{peer} disconnected after 10 messages")]);

    signal(server.pid(), "INT");
    let out = server.wait_exit(EXIT_TIMEOUT);
    out.assert_code(0).assert_no_panic();
    let expected: Vec<String> = (0..10).map(|i| format!("hello world {i}")).collect();
    assert_eq!(messages_from(&out.stdout, peer), expected, "{out}");
    assert_eq!(out.stdout.lines().count(), 10, "{out}");
    assert!(out.stderr.contains(&format!("{peer} connected")), "{out}");
    assert!(
        out.stderr.contains("signal received: stopping"),
        "Ctrl-C should be logged\n{out}"
    );
    assert!(
        stopped_line(&out).ends_with("stopped: 1 connection, 10 messages, 140 bytes"),
        "{out}"
    );
    assert!(
        !out.stderr.contains('\x1b'),
        "colour codes on a pipe\n{out}"
    );
}

/// The demo, the Windows client's side: greeted by a Linux server, it prints the greeting, logs
/// each message sent, and exits 0 once the server has printed all ten.
#[test]
fn the_windows_client_holds_the_demo_conversation() {
    let mut server = ServerProcess::start(&[]);
    let port = server.addr.port().to_string();
    let client = wine().run(
        "client",
        &["--port", &port, "--count", "10", "--interval", "10ms"],
        EXIT_TIMEOUT,
    );
    let peer = support::assert_demo_client(&client, server.addr);
    assert!(client.stderr.contains("sent \"hello world 9\""), "{client}");
    assert!(
        !client.stderr.contains('\x1b'),
        "colour codes on a pipe\n{client}"
    );

    let out = server.stop_cleanly();
    let expected: Vec<String> = (0..10).map(|i| format!("hello world {i}")).collect();
    assert_eq!(messages_from(&out.stdout, peer), expected, "{out}");
}

/// The promise on Windows, from both ends: a client in the middle of its messages when the
/// server stops is told, and exits 1, whichever side runs on Windows; what it sent before was
/// printed.
#[test]
fn a_stop_cuts_off_a_client_with_exit_1_either_way_round() {
    let cut_off = |client: &Output| {
        client.assert_code(1).assert_no_panic();
        assert!(
            single_error_line(client).ends_with("closed the connection: error: server stopping"),
            "{client}"
        );
    };
    let slow = ["--count", "10", "--interval", "1s"];

    // The Windows client, the Linux server.
    let mut server = ServerProcess::start(&[]);
    let port = server.addr.port().to_string();
    let mut args = vec!["--port", &port];
    args.extend_from_slice(&slow);
    let mut client = wine().spawn("client", &args);
    let me = first_sender(&server);
    let out = server.stop_cleanly();
    assert_eq!(messages_from(&out.stdout, me), ["hello world 0"], "{out}");
    cut_off(&client.wait_exit(EXIT_TIMEOUT));

    // The Windows server, stopped with Ctrl-C, the Linux client.
    let mut server = wine().server(&on_port_0(&[]));
    let mut client = support::Background::client_to(server.addr, &slow);
    let me = first_sender(&server);
    signal(server.pid(), "INT");
    let out = server.wait_exit(EXIT_TIMEOUT);
    out.assert_code(0).assert_no_panic();
    assert_eq!(messages_from(&out.stdout, me), ["hello world 0"], "{out}");
    cut_off(&client.wait_exit(EXIT_TIMEOUT));
}

/// A Windows server whose stdout fails (`/dev/full`) confirms nothing: the client whose line it
/// could not print is told why and exits 1. (A cut there once shut the socket's write side,
/// and the FIN that sent came before the reset: a client that had sent everything took it for
/// the confirmation and exited 0.)
#[test]
fn a_windows_server_that_cannot_print_confirms_nothing() {
    for _ in 0..3 {
        let mut server = wine().server_with_stdout(">/dev/full", &on_port_0(&[]));
        let client = run_client_to(
            server.addr,
            &["--count", "1", "--interval", "0"],
            EXIT_TIMEOUT,
        );
        client.assert_code(1).assert_no_panic();
        assert!(
            single_error_line(&client)
                .ends_with("closed the connection: error: server output failed"),
            "{client}"
        );
        let out = server.wait_exit(EXIT_TIMEOUT);
        out.assert_code(1).assert_no_panic();
        assert!(out.stderr.contains("cannot write output"), "{out}");
    }
}

/// A Windows server whose stdout's reader leaves (`server | head -1`) stops as on Linux: logs
/// that, and exits 0; its client is told, and exits 1. (Wine reports the pipe as not connected,
/// 233, where Windows says it is being closed, 232: once an output failure, exit 1.)
#[test]
fn a_windows_server_whose_reader_leaves_stops_cleanly() {
    let mut server = wine().server_with_stdout("| head -1", &on_port_0(&[]));
    let client = run_client_to(
        server.addr,
        &["--count", "200", "--interval", "5ms"],
        EXIT_TIMEOUT,
    );
    client.assert_code(1).assert_no_panic();
    assert!(
        single_error_line(&client).ends_with("closed the connection: error: server output failed"),
        "{client}"
    );
    let out = server.wait_exit(EXIT_TIMEOUT);
    out.assert_code(0).assert_no_panic();
    assert!(out.stderr.contains("output closed by its reader"), "{out}");
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
}

/// A stop on Windows doesn't wait on quiet clients: one connected and silent is told why and cut
/// at once, and so is one silent in its TLS handshake or before its PROXY protocol header, not
/// given up on at the stop's 3 s bound (a cut can't wake a blocked read there; the reader looks
/// for the cut itself).
#[test]
fn the_windows_server_cuts_a_quiet_client_at_a_stop() {
    let mut server = wine().server(&on_port_0(&["-v"]));
    let (stream, reader, me) = support::greeted(server.addr);
    server.wait_for_log(&[&format!("{me} connected")]);
    signal(server.pid(), "INT");
    let (told, _) = support::read_to_eof(reader);
    assert_eq!(told, "error: server stopping\n");
    let out = server.wait_exit(EXIT_TIMEOUT);
    out.assert_code(0).assert_no_panic();
    assert!(
        out.stderr
            .contains(&format!("{me} cut off by the server stop after 0 messages")),
        "{out}"
    );
    assert!(!out.stderr.contains("giving up"), "{out}");
    drop(stream);

    for (flags, cut) in [
        (
            &["--tls-self-signed"][..],
            "cut off by the server stop during its TLS handshake",
        ),
        (
            &["--proxy-protocol", "--trusted-proxy", "127.0.0.1"][..],
            "cut off by the server stop before its PROXY protocol header",
        ),
    ] {
        let mut args = vec!["-v"];
        args.extend_from_slice(flags);
        let mut server = wine().server(&on_port_0(&args));
        let silent = support::connect(server.addr);
        server.wait_for_log(&["1 client connected"]);
        signal(server.pid(), "INT");
        let out = server.wait_exit(EXIT_TIMEOUT);
        out.assert_code(0).assert_no_panic();
        assert!(out.stderr.contains(cut), "{out}");
        assert!(!out.stderr.contains("giving up"), "{out}");
        drop(silent);
    }
}

/// The Windows server as an echo server over TLS (ring's code built by mingw), with a
/// self-signed certificate, under a Linux load client pinning its fingerprint: every round trip
/// answered, none failed.
#[test]
fn the_windows_server_echoes_over_tls_under_load() {
    let mut server = wine().server(&on_port_0(&["--mode", "echo", "--tls-self-signed"]));
    let pin = support::logged_fingerprint(&server);
    let client = run_client_to(
        server.addr,
        &[
            "--tls-fingerprint",
            &pin,
            "--connections",
            "8",
            "--count",
            "200",
            "--rtt",
            "--json",
        ],
        EXIT_TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let json = support::json_summary(&client);
    assert_eq!(json_field(json, "connections"), 8.0, "{json}");
    assert_eq!(json_field(json, "messages"), 1600.0, "{json}");
    assert_eq!(json_field(json, "errors"), 0.0, "{json}");

    signal(server.pid(), "INT");
    let out = server.wait_exit(EXIT_TIMEOUT);
    out.assert_code(0).assert_no_panic();
    assert!(
        stopped_line(&out).contains("stopped: 8 connections, 1600 messages"),
        "{out}"
    );
}

/// The Windows load client against a server that closes its side at once (`ncat -l <
/// /dev/null` does) and reads on: no connection counts as delivered. (It can't look at the
/// socket there without reading it; what its reading thread saw says so.)
#[test]
fn the_windows_load_client_sees_an_early_close() {
    use std::io::Read;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port().to_string();
    let server = std::thread::spawn(move || {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (stream, _) = listener.accept().expect("accept");
                stream
                    .shutdown(std::net::Shutdown::Write)
                    .expect("half-close");
                stream
                    .set_read_timeout(Some(EXIT_TIMEOUT))
                    .expect("timeout");
                std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = (&stream).read_to_end(&mut sink);
                })
            })
            .collect();
        for reader in readers {
            let _ = reader.join();
        }
    });
    let client = wine().run(
        "client",
        &[
            "--port",
            &port,
            "--connections",
            "2",
            "--count",
            "5",
            "--rate",
            "20",
            "--json",
        ],
        EXIT_TIMEOUT,
    );
    server.join().expect("server thread");
    client.assert_code(1).assert_no_panic();
    let json = support::json_summary(&client);
    assert_eq!(json_field(json, "errors"), 2.0, "{client}");
    assert!(
        json.contains("closed its side before the client had finished"),
        "{client}"
    );
}

/// Exit codes and error lines on Windows as on Linux: 2 and clap's message for a bad flag, 1
/// and one line naming the address for a refused connection and a port already taken; nothing
/// on stdout.
#[test]
fn windows_exit_codes_and_error_lines() {
    let w = wine();

    let out = w.run("server", &["--port", "99999"], EXIT_TIMEOUT);
    out.assert_code(2).assert_no_panic();
    assert!(single_error_line(&out).contains("--port"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");

    let port = closed_port();
    let out = w.run(
        "client",
        &["--port", &port, "--count", "1", "--interval", "0"],
        EXIT_TIMEOUT,
    );
    out.assert_code(1).assert_no_panic();
    let line = single_error_line(&out);
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{out}");
    assert!(line.to_lowercase().contains("refused"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");

    let holder = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let port = holder.local_addr().expect("local addr").port().to_string();
    let out = w.run("server", &["--port", &port], EXIT_TIMEOUT);
    out.assert_code(1).assert_no_panic();
    assert!(
        single_error_line(&out).contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{out}"
    );
    assert!(out.stdout.is_empty(), "{out}");
    drop(holder);
}
