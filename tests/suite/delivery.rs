//! The delivery contract, on the real binaries over loopback: a client exits 0 only if every
//! message it sent was printed; anything else reaches it as an `error: ` line and/or a reset and
//! exits 1; the server stops within a bound whatever its stdout, stderr and peers do.
//!
//! Each test here reproduces a way the contract once broke.

#![cfg(unix)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{
    self, EXIT_TIMEOUT, POLL_EVERY as POLL, Reaper, ServerProcess, greeted as join, json_field,
    messages_from, parse_listening_line, poll_until, run_client_to, signal,
};

const TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// 1. A server's FIN ends what it sends, not what it reads
// ------------------------------------------------------------------------------------------------

/// A server that closes its sending side at once (`ncat -l < /dev/null` does) still reads: the
/// client keeps sending and every message arrives; but that close came before the client's own,
/// so it confirms nothing, and the client exits 1 saying so.
#[test]
fn a_server_that_half_closes_early_still_gets_every_message() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.shutdown(Shutdown::Write).expect("half-close");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut received = String::new();
        (&stream)
            .read_to_string(&mut received)
            .expect("read to the client's end");
        received
    });
    let client = run_client_to(addr, &["--count", "10", "--interval", "10ms"], TIMEOUT);
    let received = server.join().expect("server thread");
    client.assert_code(1).assert_no_panic();
    assert!(
        client.error_lines()[0]
            .ends_with("closed its side before the client had finished: it confirmed nothing"),
        "{client}"
    );
    let expected: String = (0..10).map(|i| format!("hello world {i}\n")).collect();
    assert_eq!(received, expected, "{client}");
}

/// A server that says why before its early close (a plugboard server on Windows, stopped, sends
/// `error: server stopping`, then FIN, then a reset): the client reports that reason, whether it
/// still got all its messages out or a send failed after the close.
#[test]
fn a_reason_before_an_early_close_is_what_the_client_reports() {
    for read_on in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            let mut reader = BufReader::new(&stream);
            let mut first = String::new();
            reader.read_line(&mut first).expect("the first message");
            (&stream)
                .write_all(b"error: going away\n")
                .expect("say why");
            stream.shutdown(Shutdown::Write).expect("half-close");
            if read_on {
                let mut rest = String::new();
                reader
                    .read_to_string(&mut rest)
                    .expect("read to the client's end");
            }
            // Otherwise closed with the client's next messages unread: a reset.
        });
        let client = run_client_to(addr, &["--count", "10", "--interval", "10ms"], TIMEOUT);
        server.join().expect("server thread");
        client.assert_code(1).assert_no_panic();
        let errors = client.error_lines();
        assert_eq!(errors.len(), 1, "{client}");
        assert!(
            errors[0].ends_with(&format!("{addr} closed the connection: error: going away")),
            "read on: {read_on}\n{client}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 2. Load mode: a refusal is an error
// ------------------------------------------------------------------------------------------------

fn load_is_refused(server_args: &[&str], occupy: bool, reason: &str) {
    let mut server = ServerProcess::start(server_args);
    let _occupant = occupy.then(|| join(server.addr));
    for mode in [&[][..], &["--rtt"][..]] {
        let mut args = vec!["--connections", "3", "--count", "10", "--json"];
        args.extend_from_slice(mode);
        let client = run_client_to(server.addr, &args, TIMEOUT);
        client.assert_code(1).assert_no_panic();
        assert_eq!(json_field(&client.stdout, "errors"), 3.0, "{client}");
        assert!(client.stdout.contains(reason), "{client}");
        let errors = client.error_lines();
        assert_eq!(errors.len(), 1, "{client}");
        assert!(errors[0].contains(reason), "{client}");
    }
    let out = server.stop();
    out.assert_code(0);
    assert_eq!(out.stdout, "", "nothing of theirs printed\n{out}");
}

#[test]
fn load_mode_counts_connections_refused_as_full() {
    load_is_refused(
        &["--max-clients", "1"],
        true,
        "error: server full (1 clients)",
    );
}

#[test]
fn load_mode_counts_connections_refused_as_not_allowed() {
    load_is_refused(&["--deny", "127.0.0.1"], false, "error: not allowed");
}

// ------------------------------------------------------------------------------------------------
// 3. A stop during a burst
// ------------------------------------------------------------------------------------------------

/// SIGTERM while 50 connections pour 10,000 lines each: every connection the client counts as
/// delivered had all its lines printed, and the client exits 0 only if all did.
#[test]
fn a_stop_during_a_burst_confirms_only_what_was_printed() {
    const CONNECTIONS: usize = 50;
    const LINES: usize = 10_000;
    let mut server = ServerProcess::start(&[]);
    let mut client = support::Background::client_to(
        server.addr,
        &[
            "--connections",
            "50",
            "--count",
            "10000",
            "--size",
            "100",
            "--json",
            "-q",
        ],
    );
    let started = poll_until(TIMEOUT, Duration::from_millis(1), || {
        (server.stdout_line_count() >= 20_000).then_some(())
    });
    assert!(started.is_some(), "the burst never started");
    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    let client = client.wait_exit(TIMEOUT);
    client.assert_no_panic();
    let errors = json_field(&client.stdout, "errors") as usize;
    assert_eq!(
        client.code(),
        Some(if errors == 0 { 0 } else { 1 }),
        "{client}"
    );

    let mut printed: HashMap<&str, usize> = HashMap::new();
    for line in out.stdout.lines() {
        let (peer, message) = line.split_once(' ').expect("PEER MESSAGE");
        assert!(
            message.starts_with("hello world ") && message.len() == 99,
            "torn: {line:?}"
        );
        *printed.entry(peer).or_default() += 1;
    }
    let complete = printed.values().filter(|&&n| n == LINES).count();
    assert!(
        complete >= CONNECTIONS - errors,
        "the client counted {} connections delivered, but only {complete} had all {LINES} lines printed\n{client}",
        CONNECTIONS - errors
    );
}

// ------------------------------------------------------------------------------------------------
// 4. A log reader that goes away
// ------------------------------------------------------------------------------------------------

/// `/dev/full`, for an output whose every write fails.
#[cfg(target_os = "linux")]
fn dev_full() -> std::fs::File {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full")
}

/// A server whose stderr reader has gone (`server 2>&1 | head -3`) goes on serving: a client is
/// greeted, heard and confirmed, and SIGTERM still stops it with status 0.
#[test]
fn a_server_whose_log_reader_left_goes_on_serving() {
    let mut child = Reaper::server(Stdio::piped(), Stdio::piped());
    let stdout = child.child().stdout.take().expect("stdout");
    let printed = thread::spawn(move || {
        let mut all = String::new();
        let _ = BufReader::new(stdout).read_to_string(&mut all);
        all
    });
    let mut log = BufReader::new(child.child().stderr.take().expect("stderr"));
    let addr = loop {
        let mut line = String::new();
        assert!(
            log.read_line(&mut line).expect("log") > 0,
            "no listening line"
        );
        if let Some(addr) = parse_listening_line(&line) {
            break addr;
        }
    };
    drop(log); // the log's reader is gone

    for i in 0..3 {
        let client = run_client_to(
            addr,
            &[
                "--count",
                "2",
                "--interval",
                "0",
                "--message",
                &format!("c{i} {{i}}"),
            ],
            TIMEOUT,
        );
        client.assert_code(0).assert_no_panic();
    }
    signal(child.child().id(), "TERM");
    let status = child.wait(TIMEOUT, "the server");
    assert_eq!(status.code(), Some(0), "{status}");
    let printed = printed.join().expect("stdout reader");
    assert_eq!(printed.lines().count(), 6, "{printed}");
}

/// The same with a log that can't be written at all (`2>/dev/full`).
#[cfg(target_os = "linux")]
#[test]
fn a_server_whose_log_cannot_be_written_serves() {
    let mut child = Reaper::server(Stdio::null(), dev_full().into());
    let pid = child.child().id();
    let port = poll_until(TIMEOUT, POLL, || {
        if let Some(status) = child.child().try_wait().expect("try_wait") {
            panic!("the server exited at start: {status}");
        }
        support::procfs::listening_port(pid)
    })
    .expect("the server never listened");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let client = run_client_to(addr, &["--count", "2", "--interval", "0"], TIMEOUT);
    client.assert_code(0).assert_no_panic();
    signal(pid, "TERM");
    let status = child.wait(TIMEOUT, "the server");
    assert_eq!(status.code(), Some(0), "{status}");
}

/// A stderr pipe nobody reads, full after a few hundred log lines, holds up neither the server's
/// stop nor its last `error:` line: with stdout on `/dev/full` it stops itself and exits 1.
#[cfg(target_os = "linux")]
#[test]
fn a_full_stderr_pipe_does_not_hold_up_the_exit() {
    // stderr: never read.
    let mut child = Reaper::server(dev_full().into(), Stdio::piped());
    let pid = child.child().id();
    let port = poll_until(TIMEOUT, POLL, || support::procfs::listening_port(pid))
        .expect("the server never listened");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // Two log lines each: far more than a pipe holds.
    for _ in 0..1000 {
        drop(TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect"));
    }
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    (&stream).write_all(b"to /dev/full\n").expect("send");
    let status = child.wait(TIMEOUT, "the server, its output failed");
    assert_eq!(status.code(), Some(1), "{status}");
}

/// The client too: its stderr full of `sent` lines, a reset still ends it with status 1.
#[test]
fn a_client_with_a_full_stderr_pipe_still_exits() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut all = Vec::new();
        (&stream).read_to_end(&mut all).expect("read to the end");
        // Everything read, and then a reset rather than the confirming close.
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        all.len()
    });
    let port = addr.port().to_string();
    let mut client = Reaper::spawn(
        "client",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--count",
            "3000",
            "--interval",
            "0",
        ],
        Stdio::null(),
        Stdio::piped(), // never read
    );
    let status = client.wait(TIMEOUT, "the client");
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(server.join().expect("server") > 0);
}

// ------------------------------------------------------------------------------------------------
// 5. A stdout nobody reads
// ------------------------------------------------------------------------------------------------

/// Its stdout full and never read, the server still stops within a few seconds of SIGTERM; it
/// says how many messages it could not print and exits 1, and the clients whose messages were
/// not printed are told so (a reset), never confirmed.
#[test]
fn a_stuck_stdout_does_not_hold_up_the_stop() {
    let mut server = ServerProcess::start_unread_stdout(&[]);
    let addr = server.addr;
    // Writers that pour lines until the server stops taking them (the pipe, then its queue,
    // then the sockets fill up).
    let stuck = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let stuck = Arc::clone(&stuck);
            thread::spawn(move || {
                let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
                stream
                    .set_write_timeout(Some(Duration::from_millis(300)))
                    .expect("timeout");
                let chunk = format!("writer {w} {}\n", "x".repeat(90)).repeat(1000);
                let deadline = Instant::now() + TIMEOUT;
                while Instant::now() < deadline {
                    if let Err(e) = (&stream).write_all(chunk.as_bytes()) {
                        assert!(
                            matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ),
                            "writer {w}: {e}"
                        );
                        stuck.fetch_add(1, Ordering::Relaxed);
                        return stream;
                    }
                }
                panic!("writer {w}: the server never stopped taking lines");
            })
        })
        .collect();
    let streams: Vec<TcpStream> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    assert_eq!(stuck.load(Ordering::Relaxed), 4);

    let signalled = server.terminate();
    let out = server.wait_exit(EXIT_TIMEOUT);
    let took = out.exited_at.duration_since(signalled);
    out.assert_no_panic().assert_code(1);
    assert!(
        took < Duration::from_secs(5),
        "the stop took {took:?}\n{out}"
    );
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "{out}");
    // "up to N of the M messages received ... were not printed": N is at most M.
    let numbers: Vec<u64> = errors[0]
        .split(' ')
        .filter_map(|word| word.parse().ok())
        .collect();
    assert!(
        errors[0].contains("were not printed") && numbers.len() >= 2 && numbers[0] <= numbers[1],
        "{out}"
    );
    for stream in streams {
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut rest = Vec::new();
        let ended = (&stream).read_to_end(&mut rest);
        assert!(
            ended.is_err(),
            "a clean close would confirm delivery: {ended:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 6. Chat: slow readers cost one broadcast one send timeout in all
// ------------------------------------------------------------------------------------------------

/// Ten clients that read, but far too slowly, one that reads, one that floods: the reader gets
/// every line in order, and the slow ones cost the room one send timeout in all (each is
/// disconnected once its queue stays full that long), not one send timeout each.
#[cfg(target_os = "linux")]
#[test]
fn slow_chat_readers_cost_one_send_timeout_in_all() {
    const LINES: usize = 100_000;
    const SLOW: usize = 10;
    let mut server = ServerProcess::start(&["--mode", "chat", "--send-timeout", "1s"]);
    let done = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            let (stream, mut reader, me) = join(server.addr);
            let done = Arc::clone(&done);
            let thread = thread::spawn(move || {
                // 8 KiB every 20 ms: 400 KiB/s, against megabytes a second for the others. Fast
                // enough that a send to it always makes progress, too slow to keep its queue
                // from staying full.
                let mut buf = [0; 8192];
                while !done.load(Ordering::Relaxed)
                    && matches!(reader.read(&mut buf), Ok(n) if n > 0)
                {
                    support::pace(Duration::from_millis(20));
                }
            });
            (stream, me, thread)
        })
        .collect();
    let (_reader, mut reader_in, _) = join(server.addr);
    let (mut flooder, _flooder_in, flooder_addr) = join(server.addr);

    let started = Instant::now();
    let receiving = thread::spawn(move || {
        support::receive_numbered(&mut reader_in, flooder_addr, LINES);
        started.elapsed()
    });
    support::flood_numbered(&mut flooder, LINES);
    let took = receiving
        .join()
        .expect("the reader got every line, in order");
    eprintln!("the fast reader had every line after {took:?}");
    done.store(true, Ordering::Relaxed);
    let log = server.stderr_so_far();
    for (_, addr, thread) in slow {
        thread.join().expect("slow reader");
        assert!(
            log.contains(&format!("{addr} disconnected: not reading")),
            "{addr} was not disconnected\n{log}"
        );
    }
    // One send timeout each would be 10 s or more. One in all is about 1-2 s on a quiet machine;
    // with the rest of the suite running on the same two CPUs the flood itself slows, and the
    // slow readers' queues take longer to stay full for a whole timeout (5.5 s seen once).
    assert!(
        took < Duration::from_secs(SLOW as u64 * 8 / 10),
        "{SLOW} slow readers held the room up for {took:?} (send timeout 1s)"
    );
    server.stop().assert_code(0);
}

// ------------------------------------------------------------------------------------------------
// 7. The client's send timeout
// ------------------------------------------------------------------------------------------------

/// Against a server that accepts and never reads, the client gives up after --send-timeout, in
/// the numbered mode and in load mode, and says so; soon after it, not at three times it.
#[test]
fn the_client_gives_up_on_a_server_that_never_reads() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = thread::spawn(move || {
        // Holds both connections open without reading, until the test ends.
        let a = listener.accept().expect("accept");
        let b = listener.accept().expect("accept");
        (a, b)
    });
    // 100 KB: an argument can't be much longer.
    let big = "x".repeat(100_000);
    let numbered = ["--count", "300", "--interval", "0", "--message", &big];
    let load = ["--connections", "1", "--count", "1000", "--size", "100000"];
    for mode in [&numbered, &load] {
        let started = Instant::now();
        let args = [&mode[..], &["--send-timeout", "1s"]].concat();
        let out = run_client_to(addr, &args, TIMEOUT);
        out.assert_code(1).assert_no_panic();
        assert!(
            out.error_lines()[0].contains("nothing taken for 1s"),
            "{out}"
        );
        // Measured once: 1.6 s, where a send that took a part and then waited counted as
        // progress took 3.1 s; the bound sits between.
        let took = out.exited_at.duration_since(started);
        assert!(took < Duration::from_millis(2500), "gave up after {took:?}");
    }
    drop(held.join());
}

// ------------------------------------------------------------------------------------------------
// 8. Echo: what is counted is printed
// ------------------------------------------------------------------------------------------------

/// A client that floods an echo server and never reads is cut off; the count the server logs
/// for it is the number of its lines printed.
#[test]
fn echo_prints_every_message_it_counts() {
    let mut server = ServerProcess::start(&["--mode", "echo", "--send-timeout", "300ms"]);
    let stream = TcpStream::connect_timeout(&server.addr, TIMEOUT).expect("connect");
    stream.set_write_timeout(Some(TIMEOUT)).expect("timeout");
    let me = stream.local_addr().expect("addr");
    let chunk = "never read back\n".repeat(4096);
    while (&stream).write_all(chunk.as_bytes()).is_ok() {}
    let logged = server.wait_for_log(&[&format!("{me} disconnected: not reading")]);
    let counted: usize = logged
        .split("after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {logged:?}"));
    let out = server.stop();
    out.assert_code(0);
    assert_eq!(messages_from(&out.stdout, me).len(), counted, "{logged}");
}

// ------------------------------------------------------------------------------------------------
// 9. Chat: once greeted, every later line
// ------------------------------------------------------------------------------------------------

/// Clients connect in a burst; each, once greeted, sends a numbered line. Every client receives
/// every line sent after it was greeted (a number drawn after its greeting arrived).
#[test]
fn chat_clients_receive_every_line_sent_after_their_greeting() {
    const CLIENTS: usize = 60;
    let mut server = ServerProcess::start(&["--mode", "chat"]);
    let addr = server.addr;
    let next = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(CLIENTS));
    let all_sent = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, start, all_sent) =
                (Arc::clone(&next), Arc::clone(&start), Arc::clone(&all_sent));
            thread::spawn(move || {
                start.wait();
                let (stream, mut reader, _) = join(addr);
                // Every line numbered from here on was sent after this client was greeted.
                let greeted_at = next.load(Ordering::SeqCst);
                let mine = next.fetch_add(1, Ordering::SeqCst);
                (&stream)
                    .write_all(format!("line {mine}\n").as_bytes())
                    .expect("send");
                all_sent.wait();
                let total = next.load(Ordering::SeqCst);
                let mut expected: Vec<u64> = (greeted_at..total).filter(|&n| n != mine).collect();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut line = String::new();
                while !expected.is_empty() {
                    line.clear();
                    if reader.read_line(&mut line).is_err() || line.is_empty() {
                        return Err(format!("never received lines {expected:?}"));
                    }
                    let n: u64 = line
                        .trim_end()
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(u64::MAX);
                    expected.retain(|&e| e != n);
                }
                stream.shutdown(Shutdown::Write).expect("half-close");
                Ok(())
            })
        })
        .collect();
    let missed: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().expect("client thread").err())
        .collect();
    assert!(
        missed.is_empty(),
        "{} clients missed lines: {missed:?}",
        missed.len()
    );
    server.stop().assert_code(0);
}

// ------------------------------------------------------------------------------------------------
// 11. A user's `error:` text is not a refusal
// ------------------------------------------------------------------------------------------------

/// Echoed back, a user's line that starts `error:` is text like any other: exit status 0.
#[test]
fn an_echoed_error_line_is_not_a_refusal() {
    let mut server = ServerProcess::start(&["--mode", "echo"]);
    let port = server.port_arg();
    let client = support::run_client_with_stdin(
        &["--port", &port, "--stdin"],
        b"error: disk full\n",
        true,
        TIMEOUT,
    );
    client.assert_code(0);
    assert!(client.stdout.ends_with("\nerror: disk full\n"), "{client}");
    server.stop().assert_code(0);
}

// ------------------------------------------------------------------------------------------------
// 13. Hostile flag values, and signals
// ------------------------------------------------------------------------------------------------

#[test]
fn absurd_flag_values_are_usage_errors() {
    for args in [
        &["--send-timeout", "300000000000years"][..],
        &["--idle-timeout", "300000000000years"],
        &["--max-clients", "0"],
        &["--send-timeout", "0"],
    ] {
        let out = support::run_server(args, TIMEOUT);
        out.assert_code(2).assert_no_panic();
    }
    for args in [
        &["--rtt", "--linger", "0"][..],
        &["--linger", "0"],
        &["--interval", "300000000000years"],
        &["--send-timeout", "0"],
        &["--size", "18446744073709551615"],
        &["--connections", "100001"],
        &["--message", "two\nlines"],
    ] {
        let out = support::run_client(args, TIMEOUT);
        out.assert_code(2).assert_no_panic();
    }
}

/// `--max-clients` at its largest is a number to saturate, not to wrap.
#[test]
fn the_largest_max_clients_serves() {
    let mut server = ServerProcess::start(&["--max-clients", "18446744073709551615"]);
    let client = run_client_to(server.addr, &["--count", "1", "--interval", "0"], TIMEOUT);
    client.assert_code(0);
    let out = server.stop();
    out.assert_code(0).assert_no_panic();
}

/// `timeout(1)` sends SIGTERM to the process and to its group: a second signal right after the
/// first is the same request, not an order to exit at once with status 1.
#[cfg(target_os = "linux")]
#[test]
fn a_second_signal_right_after_the_first_is_one_clean_stop() {
    let mut server = ServerProcess::start(&[]);
    // Many clients make the stop take a moment: the second signal lands while it runs.
    let clients: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect_timeout(&server.addr, TIMEOUT).expect("connect"))
        .collect();
    let connected = poll_until(TIMEOUT, POLL, || {
        (server.stderr_so_far().matches(" connected").count() >= clients.len()).then_some(())
    });
    assert!(connected.is_some(), "not every client got in");
    // Two signals a few milliseconds apart, each taken on its own (back to back, the kernel
    // would merge them into one).
    server.terminate_twice();
    let out = server.wait_exit(EXIT_TIMEOUT);
    out.assert_code(0).assert_no_panic();
    assert!(out.stderr.contains("signal received"), "{out}");
    drop(clients);
}

// ------------------------------------------------------------------------------------------------
// The contract's other ends
// ------------------------------------------------------------------------------------------------

/// A client in the middle of its messages when the server stops is told, and exits 1.
#[test]
fn a_client_cut_off_by_a_stop_exits_1() {
    let mut server = ServerProcess::start(&[]);
    let mut client =
        support::Background::client_to(server.addr, &["--count", "10", "--interval", "1s"]);
    let me = poll_until(TIMEOUT, POLL, || {
        server
            .stdout_so_far()
            .lines()
            .find_map(support::parse_message_line)
            .map(|(peer, _)| peer)
    })
    .expect("the client's first message");
    let out = server.stop();
    out.assert_code(0);
    let client = client.wait_exit(TIMEOUT);
    client.assert_code(1).assert_no_panic();
    let errors = client.error_lines();
    assert_eq!(errors.len(), 1, "{client}");
    assert!(
        errors[0].ends_with("closed the connection: error: server stopping"),
        "{client}"
    );
    assert_eq!(messages_from(&out.stdout, me), ["hello world 0"]);
}

/// A server that dies (SIGKILL) never seems to confirm: its clients see a reset, not the clean
/// close the kernel would otherwise send for it.
#[test]
fn a_killed_server_resets_its_clients() {
    let mut server = ServerProcess::start(&[]);
    let (stream, mut reader, me) = join(server.addr);
    (&stream).write_all(b"printed\n").expect("send");
    // Once it has printed, it has read everything we sent: closing the socket then would send a
    // plain FIN.
    server.wait_for_messages(me, 1);
    signal(server.pid(), "KILL");
    let _ = server.wait_exit(EXIT_TIMEOUT);
    let (_, ended) = support::read_to_eof(&mut reader);
    assert!(
        matches!(&ended, Some(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "a reset, not a clean close: {ended:?}"
    );
    drop(stream);
}
