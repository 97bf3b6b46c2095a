//! End-to-end tests: the real `server` and `client` binaries talking over loopback sockets.
//!
//! Every server listens on port 0 and reports its address in a `listening on ADDR` log line;
//! every wait has a deadline; a server still running when a test fails is killed (and its output
//! printed) by the guard in `support`.
//!
//! Tests that need the server to stop gracefully send it SIGTERM, so they are Unix-only; the error
//! and flag tests also run on Windows.

#[cfg(unix)]
use std::net::SocketAddr;
use std::net::TcpListener;
use std::time::Duration;

use crate::support::*;

// ------------------------------------------------------------------------------------------------
// 1. The demo conversation
// ------------------------------------------------------------------------------------------------

/// One client sends three numbered messages; the greeting names the client's address and the
/// server prints exactly the three messages under that same address.
#[cfg(unix)]
#[test]
fn demo_conversation() {
    let mut server = ServerProcess::start(&[]);
    let client = run_client_to(
        server.addr,
        &["--count", "3", "--interval", "10ms"],
        EXIT_TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let peer = greeting_peer(&client);
    assert_eq!(
        peer.ip(),
        server.addr.ip(),
        "greeting should name the client's loopback address\n{client}"
    );
    assert_eq!(
        client.stdout,
        greeting(peer),
        "client should print exactly the greeting line\n{client}"
    );
    assert!(
        client
            .stderr
            .contains(&format!("connected to {}", server.addr)),
        "client should log `connected to {}`\n{client}",
        server.addr
    );

    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let expected: Vec<String> = (0..3).map(|i| format!("{peer} hello world {i}")).collect();
    assert_eq!(lines, expected, "server stdout\n{out}\nclient:\n{client}");
    assert!(
        out.stderr.contains(&format!("{peer} connected")),
        "server should log `{peer} connected`\n{out}"
    );
    assert!(
        out.stderr
            .contains(&format!("{peer} disconnected after 3 messages")),
        "server should log `{peer} disconnected after 3 messages, N bytes`\n{out}"
    );
    assert!(
        out.stderr.contains("stopped"),
        "no `stopped` summary line\n{out}"
    );
}

// ------------------------------------------------------------------------------------------------
// 2. Non-ASCII text
// ------------------------------------------------------------------------------------------------

/// Chinese text in the message template arrives byte-for-byte intact.
#[cfg(unix)]
#[test]
fn chinese_messages_arrive_intact() {
    let template = "我是客户端发送的消息,hello world{i}";
    let mut server = ServerProcess::start(&[]);
    let client = run_client_to(
        server.addr,
        &["--message", template, "--count", "5", "--interval", "0"],
        EXIT_TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let peer = greeting_peer(&client);

    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    let expected: Vec<String> = (0..5)
        .map(|i| template.replace("{i}", &i.to_string()))
        .collect();
    assert_eq!(
        messages_from(&out.stdout, peer),
        expected,
        "messages from {peer}\n{out}\nclient:\n{client}"
    );
    assert_eq!(
        out.stdout.lines().count(),
        5,
        "unexpected extra lines\n{out}"
    );
}

// ------------------------------------------------------------------------------------------------
// 3. Many concurrent clients, messages cut at random byte positions
// ------------------------------------------------------------------------------------------------

#[cfg(unix)]
mod concurrent {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::Shutdown;
    use std::thread;

    const CLIENTS: usize = 50;
    const MESSAGES: usize = 1000;
    const SEED: u64 = 0x5EED_0F0B_0A4D;

    fn message(c: usize, i: usize) -> String {
        format!("client {c} message {i} 我是ü€😀")
    }

    /// Connect, read the greeting, send all messages in randomly cut pieces, half-close, read to
    /// EOF. Returns (local address, greeting line).
    fn run_one(server: SocketAddr, c: usize) -> (SocketAddr, String) {
        let stream = connect(server);
        stream.set_nodelay(true).expect("set_nodelay");
        let local = stream.local_addr().expect("local_addr");

        let mut reader = BufReader::new(stream.try_clone().expect("try_clone"));
        let mut greeting = String::new();
        reader
            .read_line(&mut greeting)
            .unwrap_or_else(|e| panic!("client {c} ({local}): reading greeting: {e}"));
        assert!(
            greeting.ends_with('\n'),
            "client {c} ({local}): greeting not newline-terminated: {greeting:?}"
        );

        // Every 7th message ends in CRLF; the server drops the `\r`.
        let mut bytes = Vec::new();
        for i in 0..MESSAGES {
            bytes.extend_from_slice(message(c, i).as_bytes());
            bytes.extend_from_slice(if i % 7 == 3 { b"\r\n" } else { b"\n" });
        }

        let mut rng = XorShift::new(SEED ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut writer = &stream;
        let mut pos = 0;
        while pos < bytes.len() {
            // Mostly small pieces (often splitting a multi-byte character), sometimes larger.
            let len = if rng.range(0, 9) == 0 {
                rng.range(1, 400)
            } else {
                rng.range(1, 24)
            };
            let end = (pos + len).min(bytes.len());
            writer
                .write_all(&bytes[pos..end])
                .unwrap_or_else(|e| panic!("client {c} ({local}): write at byte {pos}: {e}"));
            pos = end;
        }
        stream
            .shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("client {c} ({local}): shutdown(Write): {e}"));

        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap_or_else(|e| {
            panic!("client {c} ({local}): waiting for the server to close: {e}")
        });
        (local, greeting.trim_end_matches(['\r', '\n']).to_string())
    }

    /// 50 clients × 1,000 messages each, written in pieces cut at random byte positions
    /// (including inside multi-byte characters): every message is printed exactly once, in
    /// order per client, and every stdout line is a well-formed `PEER MESSAGE`.
    #[test]
    fn fifty_clients_random_cuts() {
        let mut server = ServerProcess::start(&[]);
        let addr = server.addr;
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                thread::Builder::new()
                    .name(format!("client-{c}"))
                    .spawn(move || run_one(addr, c))
                    .expect("spawn client thread")
            })
            .collect();
        let mut clients: HashMap<SocketAddr, usize> = HashMap::new();
        for (c, h) in handles.into_iter().enumerate() {
            let (local, greeting) = h
                .join()
                .unwrap_or_else(|_| panic!("client thread {c} failed (see its panic above)"));
            assert_eq!(
                format!("{greeting}\n"),
                crate::support::greeting(local),
                "client {c}: greeting should name its own address"
            );
            assert!(
                clients.insert(local, c).is_none(),
                "duplicate local address {local}"
            );
        }

        let out = server.stop();
        out.assert_code(0).assert_no_panic();

        let mut received: HashMap<SocketAddr, Vec<&str>> = HashMap::new();
        for (n, line) in out.stdout.lines().enumerate() {
            let (peer, msg) = parse_message_line(line).unwrap_or_else(|| {
                panic!("stdout line {n} is not `PEER MESSAGE`: {line:?}\n{out}")
            });
            assert!(
                clients.contains_key(&peer),
                "stdout line {n} has unknown peer {peer}: {line:?}\n{out}"
            );
            received.entry(peer).or_default().push(msg);
        }

        let mut seen_peers = HashSet::new();
        for (&peer, &c) in &clients {
            let got = received.get(&peer).map(Vec::as_slice).unwrap_or(&[]);
            let expected: Vec<String> = (0..MESSAGES).map(|i| message(c, i)).collect();
            if let Some(i) = (0..expected.len().max(got.len()))
                .find(|&i| got.get(i).copied() != expected.get(i).map(String::as_str))
            {
                panic!(
                    "client {c} ({peer}): {} messages printed, {} sent; first difference at index {i}: got {:?}, expected {:?}\n{out}",
                    got.len(),
                    expected.len(),
                    got.get(i),
                    expected.get(i),
                );
            }
            seen_peers.insert(peer);
        }
        assert_eq!(seen_peers.len(), CLIENTS);
        assert_eq!(
            out.stdout.lines().count(),
            CLIENTS * MESSAGES,
            "total line count\n{out}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 4. A disconnecting client leaves the server idle and serving
// ------------------------------------------------------------------------------------------------

/// Connect, read the greeting, hang up without sending anything: the server's thread count goes
/// back to where it was, it does not spin, it prints nothing (no empty message) for that peer, and
/// it still serves the next client normally.
#[cfg(unix)]
#[test]
fn disconnect_leaves_server_idle_and_serving() {
    let mut server = ServerProcess::start(&[]);
    #[cfg(target_os = "linux")]
    let pid = server.pid();

    #[cfg(target_os = "linux")]
    let baseline = procfs::steady_threads(pid);

    let first_peer = {
        let stream = connect(server.addr);
        let local = stream.local_addr().expect("local_addr");
        assert_eq!(read_line(&stream).expect("read greeting"), greeting(local));
        local
        // Dropped here: the connection closes without a single message.
    };

    #[cfg(target_os = "linux")]
    {
        let settled = poll_until(Duration::from_secs(10), Duration::from_millis(10), || {
            (procfs::threads(pid) <= baseline).then_some(())
        });
        assert!(
            settled.is_some(),
            "server thread count stayed at {} (baseline {baseline}) after the client left\nstderr:\n{}",
            procfs::threads(pid),
            server.stderr_so_far()
        );

        // An idle server uses ~0 CPU; one spinning on the dead connection burns a core (~30
        // ticks in 300 ms). Watch for 300 ms; a spin fails the test as soon as it shows.
        let before = procfs::cpu_ticks(pid);
        let spinning = poll_until(
            Duration::from_millis(300),
            Duration::from_millis(20),
            || {
                let used = procfs::cpu_ticks(pid) - before;
                (used > 20).then_some(used)
            },
        );
        assert!(
            spinning.is_none(),
            "idle server used {spinning:?} clock ticks of CPU within 300 ms after a client disconnected"
        );
    }

    let client = run_client_to(
        server.addr,
        &["--count", "2", "--interval", "0"],
        EXIT_TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let second_peer = greeting_peer(&client);

    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    assert!(
        messages_from(&out.stdout, first_peer).is_empty(),
        "server printed something for the silent client {first_peer}\n{out}"
    );
    assert_eq!(
        messages_from(&out.stdout, second_peer),
        ["hello world 0", "hello world 1"],
        "second client {second_peer} not served normally\n{out}\nclient:\n{client}"
    );
    assert_eq!(out.stdout.lines().count(), 2, "unexpected lines\n{out}");
    assert!(
        out.stderr
            .contains(&format!("{first_peer} disconnected after 0 messages")),
        "server should log `{first_peer} disconnected after 0 messages, 0 bytes`\n{out}"
    );
}

// ------------------------------------------------------------------------------------------------
// 5. Raw framing
// ------------------------------------------------------------------------------------------------

/// With `--framing raw` on both sides the greeting arrives without a newline and the server's
/// printed chunks, concatenated, are exactly the bytes the client sent.
#[cfg(unix)]
#[test]
fn raw_framing_round_trip() {
    let mut server = ServerProcess::start(&["--framing", "raw"]);
    let client = run_client_to(
        server.addr,
        &[
            "--framing",
            "raw",
            "--count",
            "5",
            "--interval",
            "10ms",
            "--message",
            "hello world{i}",
        ],
        EXIT_TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();

    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    let peers: Vec<SocketAddr> = out
        .stdout
        .lines()
        .map(|l| {
            parse_message_line(l)
                .unwrap_or_else(|| panic!("line {l:?} is not `PEER CHUNK`\n{out}"))
                .0
        })
        .collect();
    let peer = *peers
        .first()
        .unwrap_or_else(|| panic!("server printed no chunks\n{out}\nclient:\n{client}"));
    assert!(
        peers.iter().all(|p| *p == peer),
        "chunks from more than one peer\n{out}"
    );

    assert_eq!(
        client.stdout,
        greeting(peer).trim_end_matches('\n'),
        "raw client should print the greeting with no newline added\n{client}"
    );
    let joined: String = messages_from(&out.stdout, peer).concat();
    let expected: String = (0..5).map(|i| format!("hello world{i}")).collect();
    assert_eq!(
        joined, expected,
        "concatenated chunks\n{out}\nclient:\n{client}"
    );
}

// ------------------------------------------------------------------------------------------------
// 6. IPv6
// ------------------------------------------------------------------------------------------------

/// Server and client on `::1`; peers are printed in bracketed IPv6 form.
///
/// Where `::1` can't be bound (no IPv6 loopback), there is nothing to test: the test passes, but
/// says `SKIPPED: server_client::ipv6_loopback: ...` on the test run's stderr, where a passing
/// test's output can't hide it (see `support::skipped`), rather than passing silently.
#[cfg(unix)]
#[test]
fn ipv6_loopback() {
    if let Err(e) = TcpListener::bind("[::1]:0") {
        skipped(
            "server_client::ipv6_loopback",
            &format!("cannot bind [::1]:0 here ({e})"),
        );
        return;
    }
    let mut server = ServerProcess::spawn(&["--host", "::1", "--port", "0"]);
    assert_eq!(
        server.addr.ip().to_string(),
        "::1",
        "server should listen on ::1, logged {}",
        server.addr
    );
    let port = server.port_arg();
    let client = run_client(
        &[
            "--host",
            "::1",
            "--port",
            &port,
            "--count",
            "2",
            "--interval",
            "0",
        ],
        EXIT_TIMEOUT,
    );
    client.assert_code(0).assert_no_panic();
    let peer = greeting_peer(&client);
    assert!(
        client
            .stdout
            .starts_with(&format!("{}[::1]:", greeting_prefix())),
        "greeting should carry an [::1]:PORT address\n{client}"
    );

    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{peer} hello world 0"),
            format!("{peer} hello world 1")
        ],
        "server stdout\n{out}"
    );
    assert!(
        lines.iter().all(|l| l.starts_with("[::1]:")),
        "lines should start with [::1]:\n{out}"
    );
}

// ------------------------------------------------------------------------------------------------
// 7. SIGTERM with 100 clients connected
// ------------------------------------------------------------------------------------------------

/// With 100 idle connections open, SIGTERM makes the server print all 100 received lines, tell
/// every client it was cut off and exit 0 within one second.
#[cfg(unix)]
#[test]
fn sigterm_with_100_clients() {
    use std::io::Write;

    const N: usize = 100;
    let mut server = ServerProcess::start(&[]);
    let mut clients = Vec::with_capacity(N);
    for c in 0..N {
        let mut stream = connect(server.addr);
        let local = stream.local_addr().expect("local_addr");
        // The greeting is read a byte at a time so nothing after it is consumed.
        let first = read_line(&stream).unwrap_or_else(|e| panic!("client {c}: greeting: {e}"));
        assert_eq!(first, greeting(local), "client {c}");
        stream
            .write_all(format!("client {c} is still here\n").as_bytes())
            .unwrap_or_else(|e| panic!("client {c}: write: {e}"));
        clients.push((local, stream));
    }

    // No waiting for the server to print the lines first: SIGTERM must still print whatever had
    // reached its sockets (on loopback, a completed write is in the server's receive queue).
    // The clock starts once `kill` has returned, i.e. after the signal was sent. `wait_exit` does
    // not poll: `exited_at` is when a reader thread saw the server's output pipes close, a
    // moment after the exit; no extra margin is allowed.
    let signalled = server.terminate();
    let out = server.wait_exit(EXIT_TIMEOUT);
    let took = out.exited_at.duration_since(signalled);
    out.assert_code(0).assert_no_panic();
    assert!(
        took < Duration::from_secs(1),
        "server took {took:?} to exit after SIGTERM with {N} clients connected\n{out}"
    );
    assert!(
        out.stderr.contains("stopped"),
        "no `stopped` summary line\n{out}"
    );

    for (c, (local, _)) in clients.iter().enumerate() {
        assert_eq!(
            messages_from(&out.stdout, *local),
            [format!("client {c} is still here")],
            "line from client {c} ({local})\n{out}"
        );
    }
    assert_eq!(
        out.stdout.lines().count(),
        N,
        "unexpected stdout lines\n{out}"
    );

    // They had not finished (no end of stream sent): each is told it was cut off, then reset,
    // never closed cleanly as if its messages had been confirmed.
    for (c, (local, stream)) in clients.iter().enumerate() {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set_read_timeout");
        expect_exactly_then_reset(
            stream,
            "error: server stopping\n",
            &format!("client {c} ({local})"),
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 8-11. Errors
// ------------------------------------------------------------------------------------------------

/// Assert exactly one `error:` line and return it.
fn single_error_line(out: &Output) -> String {
    let lines = out.error_lines();
    assert_eq!(lines.len(), 1, "expected exactly one `error:` line\n{out}");
    lines.into_iter().next().expect("one line")
}

/// A server asked to listen on a port that is already taken exits 1 with one `error:` line naming
/// the address and the cause.
#[test]
fn server_port_in_use() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let port = holder.local_addr().expect("local_addr").port().to_string();
    let out = run_server(&["--host", "127.0.0.1", "--port", &port], EXIT_TIMEOUT);
    out.assert_code(1).assert_no_panic();
    let line = single_error_line(&out);
    assert!(
        line.contains(&format!("127.0.0.1:{port}")),
        "error line should name 127.0.0.1:{port}\n{out}"
    );
    #[cfg(target_os = "linux")]
    assert!(
        line.contains("Address already in use"),
        "error line should give the cause\n{out}"
    );
    assert!(out.stdout.is_empty(), "nothing belongs on stdout\n{out}");
    drop(holder);
}

/// A client pointed at a closed port exits 1 with one `error:` line naming the address and saying
/// the connection was refused.
#[test]
fn client_connection_refused() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("local_addr").port()
    }; // closed again here
    let port = port.to_string();
    let out = run_client(
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--count",
            "1",
            "--interval",
            "0",
            "--connect-timeout",
            "5s",
        ],
        EXIT_TIMEOUT,
    );
    out.assert_code(1).assert_no_panic();
    let line = single_error_line(&out);
    assert!(
        line.contains(&format!("127.0.0.1:{port}")),
        "error line should name 127.0.0.1:{port}\n{out}"
    );
    assert!(
        line.to_lowercase().contains("refused"),
        "error line should say the connection was refused\n{out}"
    );
}

/// `--color always` colours the log even into a pipe; `never` and the default (stderr is a
/// pipe here) don't, NO_COLOR or not.
#[test]
fn color_flag_decides_the_log_colour() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("local_addr").port()
    }
    .to_string();
    // Load mode against a closed port: a summary line at INFO, then the error.
    let load = [
        "--port",
        port.as_str(),
        "--connections",
        "1",
        "--count",
        "1",
    ];
    let coloured = |extra: &[&str]| {
        let out = run_client(&[&load[..], extra].concat(), EXIT_TIMEOUT);
        out.assert_code(1).assert_no_panic();
        assert!(out.stderr.contains("1 connection, 0 messages, "), "{out}");
        out.stderr.contains("\x1b[")
    };
    assert!(coloured(&["--color", "always"]));
    assert!(!coloured(&["--color", "never"]));
    assert!(!coloured(&[]), "stderr is not a terminal");
}

/// `--help` wraps to the terminal's width (COLUMNS here), words whole: no line is wider; it
/// groups flags under headings and ends with examples, which `-h` leaves out.
#[test]
fn help_wraps_to_the_terminal() {
    for bin in ["server", "client"] {
        let out = std::process::Command::new(bin_path(bin))
            .arg("--help")
            .env("COLUMNS", "80")
            .output()
            .expect("run --help");
        assert!(out.status.success(), "{bin} --help: {out:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        let wide: Vec<&str> = help.lines().filter(|l| l.chars().count() > 80).collect();
        assert!(wide.is_empty(), "{bin} --help at 80 columns: {wide:#?}");
        assert!(help.lines().count() > 20, "{bin} --help: {help}");
        for heading in ["Connection:", "TLS:", "Logging:", "Examples:"] {
            assert!(
                help.contains(heading),
                "{bin} --help has no {heading}\n{help}"
            );
        }
        let short = run_bin(bin, &["-h"], EXIT_TIMEOUT);
        short.assert_code(0);
        assert!(
            !short.stdout.contains("Examples:")
                && short.stdout.lines().count() < help.lines().count(),
            "{bin} -h stays short\n{short}"
        );
    }
}

/// An address with its port given to `--host` is a usage error that says to use `--port`.
#[test]
fn host_with_a_port_says_use_port() {
    for bin in ["server", "client"] {
        for (host, says) in [
            ("127.0.0.1:9000", "--host 127.0.0.1 --port 9000"),
            ("[::1]:9000", "--host ::1 --port 9000"),
            ("localhost:9000", "--host localhost --port 9000"),
        ] {
            // As --host, and as the one positional (the server's PORT, the client's HOST).
            for args in [&["--host", host][..], &[host][..]] {
                let out = run_bin(bin, args, EXIT_TIMEOUT);
                out.assert_code(2).assert_no_panic();
                assert!(out.stderr.contains(says), "{bin} {args:?}\n{out}");
            }
        }
    }
}

/// Byte sizes take units (`--max-line 1KiB`, `--size 1k`), and a `--size` too small for the
/// message is a usage error, not silently ignored.
#[cfg(unix)]
#[test]
fn sizes_take_units() {
    let mut server =
        ServerProcess::spawn(&["--host", "127.0.0.1", "-p", "0", "--max-line", "1KiB"]);
    let port = server.addr.port().to_string();
    let long = "x".repeat(1025);
    let out = run_client(
        &[
            "-p",
            &port,
            "--count",
            "1",
            "--interval",
            "0",
            "--message",
            &long,
        ],
        EXIT_TIMEOUT,
    );
    out.assert_code(1).assert_no_panic();
    assert!(
        out.stderr.contains("line too long (max 1024 bytes)"),
        "{out}"
    );
    let load = [
        "-p",
        &port,
        "--connections",
        "1",
        "--count",
        "2",
        "--message",
        "hi",
    ];
    let out = run_client(
        &[&load[..], &["--size", "1k", "--json"]].concat(),
        EXIT_TIMEOUT,
    );
    out.assert_code(0).assert_no_panic();
    assert_eq!(json_field(&out.stdout, "bytes") as u64, 2000, "{out}");
    let out = run_client(&[&load[..], &["--size", "2"]].concat(), EXIT_TIMEOUT);
    out.assert_code(2).assert_no_panic();
    assert!(out.stderr.contains("less than the message"), "{out}");
    server.stop();
}

/// `--generate` prints shell completions and the man page: the bash script is valid bash that
/// completes the binary's flags, the man page is roff naming the binary; nothing else starts.
#[cfg(unix)]
#[test]
fn completions_and_man_page() {
    for bin in ["server", "client"] {
        let bash = run_bin(bin, &["--generate", "bash"], EXIT_TIMEOUT);
        bash.assert_code(0).assert_no_panic();
        assert!(
            bash.stdout.contains(&format!("complete -F _{bin}")) && bash.stdout.contains("--port"),
            "{bash}"
        );
        let checked = std::process::Command::new("bash")
            .args(["-n", "-c", &bash.stdout])
            .status()
            .expect("run bash -n");
        assert!(checked.success(), "{bin}'s bash completion does not parse");
        for shell in ["zsh", "fish", "powershell", "elvish"] {
            let out = run_bin(bin, &["--generate", shell], EXIT_TIMEOUT);
            out.assert_code(0).assert_no_panic();
            assert!(out.stdout.contains("port"), "{bin} {shell}: {out}");
        }
        let man = run_bin(bin, &["--generate", "man"], EXIT_TIMEOUT);
        man.assert_code(0).assert_no_panic();
        assert!(man.stdout.contains(&format!(".TH {bin} 1")), "{man}");
        assert!(man.stderr.is_empty(), "nothing started: {man}");
        // A stdout that can't be written: one line and exit 1, not a panic.
        #[cfg(target_os = "linux")]
        for what in ["bash", "man"] {
            let full = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .expect("/dev/full");
            let out = std::process::Command::new(bin_path(bin))
                .args(["--generate", what])
                .stdout(full)
                .output()
                .expect("run");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{bin} --generate {what}: {stderr}"
            );
            assert!(
                stderr.starts_with("error: cannot write to stdout"),
                "{stderr}"
            );
        }
    }
}

/// A client whose stdout fails (`/dev/full`) exits 1 with one line naming the server whose
/// lines it could not print, and the cause.
#[cfg(unix)]
#[test]
fn a_client_whose_stdout_fails_names_the_server() {
    let mut server = ServerProcess::start(&[]);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut client = std::process::Command::new(bin_path("client"));
    client
        .args(["-p", &server.addr.port().to_string()])
        .args(["--count", "1", "--interval", "0"])
        .stdout(full);
    let out = bounded(EXIT_TIMEOUT, "the client", move || {
        client.output().expect("run the client")
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with(&format!(
            "error: cannot write to stdout what {} sent: ",
            server.addr
        )),
        "{stderr}"
    );
    server.stop();
}

/// `server [HOST] PORT` and `client HOST [PORT]`, as ncat takes them, mean --host and --port,
/// and `-p` is `--port`; with --port as well, or a third value, they are usage errors.
#[cfg(unix)]
#[test]
fn host_and_port_as_positionals_and_short_port() {
    let mut server = ServerProcess::spawn(&["127.0.0.1", "0"]);
    let port = server.addr.port().to_string();
    let mut peers = Vec::new();
    for args in [&["127.0.0.1", &port][..], &["-p", &port]] {
        let out = run_client(
            &[args, &["--count", "1", "--interval", "0"]].concat(),
            EXIT_TIMEOUT,
        );
        out.assert_code(0).assert_no_panic();
        peers.push(greeting_peer(&out));
    }
    let printed = server.stop();
    for peer in peers {
        assert_eq!(
            messages_from(&printed.stdout, peer),
            ["hello world 0"],
            "{printed}"
        );
    }
    assert!(
        printed.stderr.contains("listening on 127.0.0.1:"),
        "{printed}"
    );
    for args in [
        &["127.0.0.1", "1", "--port", "2"][..],
        &["a", "1", "extra"],
        &["127.0.0.1", "notaport"],
    ] {
        run_bin("client", args, EXIT_TIMEOUT)
            .assert_code(2)
            .assert_no_panic();
    }
}

/// In load mode `{conn}` in --message is the connection's number and `{i}` the message's.
#[cfg(unix)]
#[test]
fn load_templates_name_connection_and_message() {
    let mut server = ServerProcess::spawn(&["--host", "127.0.0.1", "-p", "0"]);
    let port = server.addr.port().to_string();
    let out = run_client(
        &[
            "-p",
            &port,
            "--connections",
            "3",
            "--count",
            "2",
            "--message",
            "c{conn} m{i}",
        ],
        EXIT_TIMEOUT,
    );
    out.assert_code(0).assert_no_panic();
    let printed = server.stop();
    let mut texts: Vec<&str> = printed
        .stdout
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, text)| text))
        .collect();
    texts.sort_unstable();
    assert_eq!(
        texts,
        ["c0 m0", "c0 m1", "c1 m0", "c1 m1", "c2 m0", "c2 m1"],
        "{printed}"
    );
}

/// `--duration`: each connection sends until the time is up instead of `--count` messages,
/// and every message it counts was printed.
#[cfg(unix)]
#[test]
fn load_for_a_duration() {
    let mut server = ServerProcess::spawn(&["--host", "127.0.0.1", "-p", "0"]);
    let port = server.addr.port().to_string();
    let load = [
        "-p",
        &port,
        "--connections",
        "2",
        "--duration",
        "300ms",
        "--interval",
        "10ms",
    ];
    let out = run_client(&[&load[..], &["--json"]].concat(), EXIT_TIMEOUT);
    out.assert_code(0).assert_no_panic();
    let messages = json_field(&out.stdout, "messages") as usize;
    assert!(json_field(&out.stdout, "elapsed_s") >= 0.3, "{out}");
    assert!(
        messages >= 2,
        "each connection sent until the time was up: {out}"
    );
    let printed = server.stop();
    assert_eq!(printed.stdout.lines().count(), messages, "{printed}");
}

/// A pace slower than the duration (`--rate 0.2`: one message every 5 s; `--interval 5s`)
/// sends what falls within it, the first message, and ends with the duration, not at the next
/// message's turn.
#[cfg(unix)]
#[test]
fn a_slow_pace_ends_with_the_duration() {
    let mut server = ServerProcess::start(&[]);
    for pace in [&["--rate", "0.2"][..], &["--interval", "5s"][..]] {
        let mut args = vec!["--connections", "2", "--duration", "300ms", "--json"];
        args.extend_from_slice(pace);
        let out = run_client_to(server.addr, &args, EXIT_TIMEOUT);
        out.assert_code(0).assert_no_panic();
        assert_eq!(json_field(&out.stdout, "messages"), 2.0, "{out}");
        let elapsed = json_field(&out.stdout, "elapsed_s");
        assert!(
            (0.3..3.0).contains(&elapsed),
            "{pace:?}: {elapsed} s\n{out}"
        );
    }
    let printed = server.stop();
    assert_eq!(printed.stdout.lines().count(), 4, "{printed}");
}

/// `--rate` sends on a schedule whatever the server does, and with `--rtt` counts each latency
/// from when its message was due: an echo server that stalls 300 ms once, at 100 messages a
/// second, holds up the 30 or so messages due meanwhile, and the percentiles show it (measured
/// from when each was sent, only the one stalled message would be slow: p90 would stay under a
/// millisecond).
#[cfg(unix)]
#[test]
fn rate_counts_latency_from_the_schedule() {
    use std::io::{BufRead, BufReader, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port().to_string();
    let echo = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        // Each echo in one write, at once: no Nagle delay mistaken for the stall.
        stream.set_nodelay(true).expect("nodelay");
        let mut out = stream.try_clone().expect("clone");
        for (n, line) in BufReader::new(stream).lines().enumerate() {
            let Ok(line) = line else { break };
            if n == 10 {
                // The stall being measured: a slow peer, not a wait for anything.
                pace(Duration::from_millis(300));
            }
            if out.write_all(format!("{line}\n").as_bytes()).is_err() {
                break;
            }
        }
        let _ = out.shutdown(std::net::Shutdown::Write);
    });
    let out = run_client(
        &[
            "-p", &port, "--rtt", "--rate", "100", "--count", "60", "--json",
        ],
        EXIT_TIMEOUT,
    );
    out.assert_code(0).assert_no_panic();
    let _ = echo.join();
    let p90_ms = json_field(&out.stdout, "p90") / 1000.0;
    eprintln!("p90 with a 300 ms stall: {p90_ms} ms");
    assert!(
        p90_ms >= 50.0,
        "p90 {p90_ms} ms: the stall is in the percentiles\n{out}"
    );
}

/// `--connect-rate`: connections open on a schedule (10 at 50 a second take at least 0.18 s),
/// and the summary adds connect latency percentiles.
#[cfg(unix)]
#[test]
fn connect_rate_spreads_connects_and_times_them() {
    let mut server = ServerProcess::spawn(&["--host", "127.0.0.1", "-p", "0"]);
    let port = server.addr.port().to_string();
    let out = run_client(
        &[
            "-p",
            &port,
            "--connections",
            "10",
            "--connect-rate",
            "50",
            "--count",
            "1",
            "--json",
        ],
        EXIT_TIMEOUT,
    );
    out.assert_code(0).assert_no_panic();
    assert!(json_field(&out.stdout, "elapsed_s") >= 0.18, "{out}");
    assert!(out.stdout.contains("\"connect_us\":{\"p50\":"), "{out}");
    assert!(out.stderr.contains("; connect p50 "), "{out}");
    let printed = server.stop();
    assert_eq!(printed.stdout.lines().count(), 10, "{printed}");
}

/// Malformed flags are usage errors: exit 2, no panic.
#[test]
fn bad_flags_exit_2() {
    let cases: [(&str, &[&str]); 15] = [
        ("client", &["--server", "127.0.0.1:0"]),
        ("client", &["--port", "0"]),
        ("server", &["", "0"]),
        ("server", &["--port", "notaport"]),
        // Once a panic: one message every 1e20 s is more than a Duration holds.
        ("client", &["--rate", "1e-20"]),
        ("client", &["--chat", "--rate", "1e-300"]),
        ("client", &["--connect-rate", "0"]),
        ("server", &["--port", "99999"]),
        ("client", &["-p", "65536"]),
        ("server", &["99999"]),
        ("server", &["--framing", "nope"]),
        ("client", &["--interval", "xyz"]),
        ("client", &["--count", "-1"]),
        ("server", &["--backlog", "99999999999"]),
        ("client", &["--connections", "0"]),
    ];
    for (bin, args) in cases {
        let out = run_bin(bin, args, EXIT_TIMEOUT);
        out.assert_code(2).assert_no_panic();
        assert!(
            !out.stderr.trim().is_empty(),
            "usage error should explain itself\n{out}"
        );
        // Ranges in words, not Rust's `1..=100000`.
        assert!(
            !out.stderr.contains("..=") && !out.stderr.contains("1.."),
            "{out}"
        );
        if args.contains(&"99999") || args.contains(&"65536") {
            let range = if bin == "server" {
                "0 to 65535"
            } else {
                "1 to 65535"
            };
            assert!(
                out.stderr
                    .contains(&format!("must be a port number from {range}")),
                "{out}"
            );
        }
    }
}

/// A host name that cannot resolve is reported as such: exit 1, `cannot resolve`, no panic.
#[test]
fn client_unresolvable_host() {
    let out = run_client(
        &[
            "--host",
            "no-such-host.invalid",
            "--port",
            "9",
            "--connect-timeout",
            "2s",
            "--count",
            "1",
            "--interval",
            "0",
        ],
        Duration::from_secs(30),
    );
    out.assert_code(1).assert_no_panic();
    let line = single_error_line(&out);
    assert!(
        line.contains("cannot resolve"),
        "error line should say `cannot resolve`\n{out}"
    );
    assert!(
        line.contains("no-such-host.invalid"),
        "error line should name the host\n{out}"
    );
}

// ------------------------------------------------------------------------------------------------
// 12. Half-close with a final unterminated line
// ------------------------------------------------------------------------------------------------

/// LF and CRLF lines, then a final line with no newline and a half-close: all three are printed,
/// the `\r` dropped, and the server closes the connection.
#[cfg(unix)]
#[test]
fn half_close_flushes_last_line() {
    use std::io::Write;
    use std::net::Shutdown;

    let mut server = ServerProcess::start(&[]);
    let stream = connect(server.addr);
    let local = stream.local_addr().expect("local_addr");
    (&stream)
        .write_all(b"a\nb\r\nlast-without-newline")
        .expect("write");
    stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
    // The server should send only the greeting, then close the connection after the half-close.
    expect_exactly_then_eof(&stream, &greeting(local), "the half-closed client");

    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    assert_eq!(
        messages_from(&out.stdout, local),
        ["a", "b", "last-without-newline"],
        "server stdout\n{out}"
    );
    assert_eq!(out.stdout.lines().count(), 3, "unexpected lines\n{out}");
    assert!(
        out.stderr
            .contains(&format!("{local} disconnected after 3 messages")),
        "server should log `{local} disconnected after 3 messages, N bytes`\n{out}"
    );
}
