//! Server modes (echo, chat) and the client's --stdin, on real processes and loopback sockets.
//! Unix only: the server's full output is read after SIGTERM.

#![cfg(unix)]

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{self, ServerProcess, greeted as join, poll_until, read_line};

const TIMEOUT: Duration = Duration::from_secs(20);

fn read_to_end(reader: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .expect("read to the server's close");
    rest
}

#[test]
fn echo_returns_every_byte_in_order_and_prints_too() {
    let mut server = ServerProcess::start(&["--mode", "echo"]);
    let (mut stream, mut reader, me) = join(server.addr);
    // Pipelined: everything in one write, with a CRLF line, an escape and invalid UTF-8.
    let mut sent = Vec::new();
    for i in 0..1000 {
        sent.extend_from_slice(format!("line {i} 我\n").as_bytes());
    }
    sent.extend_from_slice(b"crlf\r\nesc\x1b[1m\nbad\xff\n");
    stream.write_all(&sent).expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(
        read_to_end(&mut reader),
        sent,
        "the echo is the exact bytes, in order"
    );

    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    let printed = support::messages_from(&out.stdout, me);
    assert_eq!(printed.len(), 1003, "{out}");
    assert_eq!(printed[999], "line 999 我");
    assert_eq!(&printed[1000..], ["crlf", "esc\\x1b[1m", "bad\u{fffd}"]);
}

#[test]
fn raw_echo_returns_the_chunks() {
    let mut server =
        ServerProcess::start(&["--mode", "echo", "--framing", "raw", "--greeting", ""]);
    let mut stream = TcpStream::connect_timeout(&server.addr, TIMEOUT).expect("connect");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    stream
        .write_all("no newline here, 你好".as_bytes())
        .expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut echoed = String::new();
    stream.read_to_string(&mut echoed).expect("read echo");
    assert_eq!(echoed, "no newline here, 你好");
    server.stop().assert_code(0);
}

#[test]
fn chat_relays_to_the_others_not_the_sender() {
    let mut server = ServerProcess::start(&["--mode", "chat"]);
    let (mut a, mut a_in, a_addr) = join(server.addr);
    let (mut b, mut b_in, b_addr) = join(server.addr);
    let (c, mut c_in, _) = join(server.addr);

    a.write_all(b"hi from a\n").expect("a sends");
    let from_a = format!("{a_addr} hi from a\n");
    assert_eq!(read_line(&mut b_in).expect("read a line"), from_a);
    assert_eq!(read_line(&mut c_in).expect("read a line"), from_a);
    b.write_all(b"\x1b[2Jclear\n").expect("b sends");
    let from_b = format!("{b_addr} \\x1b[2Jclear\n");
    assert_eq!(
        read_line(&mut a_in).expect("read a line"),
        from_b,
        "escaped, sender named"
    );
    assert_eq!(read_line(&mut c_in).expect("read a line"), from_b);

    // Everyone leaves; what each received in all is exactly the others' lines.
    for stream in [&a, &b, &c] {
        stream.shutdown(Shutdown::Write).expect("half-close");
    }
    assert!(read_to_end(&mut a_in).is_empty(), "a got nothing more");
    assert!(
        read_to_end(&mut b_in).is_empty(),
        "b never gets its own line"
    );
    assert!(read_to_end(&mut c_in).is_empty());

    let out = server.stop();
    out.assert_code(0).assert_no_panic();
    assert_eq!(support::messages_from(&out.stdout, a_addr), ["hi from a"]);
    assert_eq!(
        support::messages_from(&out.stdout, b_addr),
        ["\\x1b[2Jclear"]
    );
}

/// One client never reads, another floods 100,000 lines, a third must get them all: the stuck
/// one is disconnected after --send-timeout and server memory stays bounded.
#[cfg(target_os = "linux")]
#[test]
fn a_stuck_reader_never_stalls_the_room() {
    const LINES: usize = 100_000;
    let mut server = ServerProcess::start(&["--mode", "chat", "--send-timeout", "1s"]);
    let (_stuck, _stuck_in, stuck_addr) = join(server.addr); // never reads again
    let (_reader, mut reader_in, _) = join(server.addr);
    let (mut flooder, _flooder_in, flooder_addr) = join(server.addr);

    // Lines of ~200 bytes: 20 MB in all, far more than the stuck client's socket buffers.
    let receiving =
        thread::spawn(move || support::receive_numbered(&mut reader_in, flooder_addr, LINES));
    support::flood_numbered(&mut flooder, LINES);

    let started = Instant::now();
    let received = poll_until(TIMEOUT, Duration::from_millis(20), || {
        receiving.is_finished().then_some(())
    });
    assert!(
        received.is_some(),
        "the reader did not get all {LINES} lines within {TIMEOUT:?}"
    );
    receiving
        .join()
        .expect("the reader got every line, in order");
    let peak = support::procfs::peak_rss_kib(server.pid());
    let waited = started.elapsed();

    let stderr = server.stderr_so_far();
    assert!(
        stderr.contains(&format!("{stuck_addr} disconnected: not reading")),
        "the stuck client was not disconnected\n{stderr}"
    );
    assert!(peak < 300 * 1024, "server peak RSS {peak} KiB");
    eprintln!(
        "100,000 lines relayed past a stuck reader; waited {waited:?}; server peak RSS {peak} KiB"
    );
    server.stop().assert_code(0);
}

/// Runs `client --stdin ARGS` with `input` on its standard input, closing it only if `close`.
fn client_with_stdin(args: &[&str], input: &[u8], close: bool) -> support::Output {
    let args = [args, &["--stdin"]].concat();
    support::run_client_with_stdin(&args, input, close, TIMEOUT)
}

#[test]
fn stdin_lines_go_to_an_echo_server_and_come_back() {
    let mut server = ServerProcess::start(&["--mode", "echo"]);
    let port = server.port_arg();
    let client = client_with_stdin(
        &["--port", &port],
        "one\ntwo 我\nlast without newline".as_bytes(),
        true,
    );
    client.assert_code(0).assert_no_panic();
    let lines: Vec<&str> = client.stdout.lines().collect();
    assert!(lines[0].starts_with(support::greeting_prefix()), "{client}");
    assert_eq!(&lines[1..], ["one", "two 我", "last without newline"]);
    server.stop().assert_code(0);
}

#[test]
fn stdin_client_reports_a_server_that_closes_first() {
    let mut server = ServerProcess::start(&["--max-clients", "1"]);
    let (_occupant, _occupant_in, _) = join(server.addr);
    let port = server.port_arg();
    // Standard input stays open: the client must notice the server's close by itself.
    let client = client_with_stdin(&["--port", &port], b"", false);
    assert_eq!(
        client.code(),
        Some(1),
        "an error line from the server is a failure\n{client}"
    );
    assert_eq!(client.stdout, "error: server full (1 clients)\n");
    let errors: Vec<&str> = client
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{client}");
    assert!(errors[0].contains("closed the connection") && errors[0].contains("server full"));
    let out = server.stop();
    out.assert_code(0);
}

/// A client flooding the server without ever reading; `stop` ends it.
struct Flooder {
    stream: TcpStream,
    thread: thread::JoinHandle<()>,
}

impl Flooder {
    fn start(server: SocketAddr) -> Flooder {
        let mut stream = TcpStream::connect_timeout(&server, TIMEOUT).expect("connect");
        stream
            .set_write_timeout(Some(TIMEOUT))
            .expect("write timeout");
        let control = stream.try_clone().expect("clone");
        let thread = thread::spawn(move || {
            let chunk = "flood line that nobody reads back\n".repeat(2000);
            while stream.write_all(chunk.as_bytes()).is_ok() {}
        });
        Flooder {
            stream: control,
            thread,
        }
    }

    /// Ends the flood: shutting our socket fails the blocked write at once (waiting for the
    /// closed server to reset a zero-window connection can take many seconds).
    fn stop(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.thread.join().expect("flooder thread");
    }
}

/// Waits (bounded) until the server's output stops growing: its threads are blocked sending to a
/// client that doesn't read. Polls the line count every 200 ms until two readings agree.
fn wait_until_stuck(server: &ServerProcess) {
    let mut last = 0;
    let stuck = poll_until(TIMEOUT, Duration::from_millis(200), || {
        let now = server.stdout_line_count();
        let same = now > 10_000 && now == last;
        last = now;
        same.then_some(())
    });
    assert!(
        stuck.is_some(),
        "the server never blocked ({last} lines printed)"
    );
}

/// SIGTERM, then the exit status and how long the exit took.
fn terminate_timed(server: &mut ServerProcess) -> (support::Output, Duration) {
    let signalled = server.terminate();
    let out = server.wait_exit(support::EXIT_TIMEOUT);
    let took = out.exited_at.duration_since(signalled);
    (out, took)
}

/// A client that floods an echo server and never reads the echoes leaves the server's thread
/// blocked sending; a stop must still be quick and print only whole lines.
#[test]
fn echo_stop_is_quick_with_a_client_that_never_reads() {
    let mut server = ServerProcess::start(&["--mode", "echo"]);
    let flooder = Flooder::start(server.addr);
    wait_until_stuck(&server);
    let (out, took) = terminate_timed(&mut server);
    out.assert_code(0).assert_no_panic();
    assert!(took < Duration::from_secs(1), "exit took {took:?}\n{out}");
    assert!(
        out.stdout
            .lines()
            .all(|l| l.ends_with(" flood line that nobody reads back")),
        "a torn line\n{out}"
    );
    flooder.stop();
}

/// The same in chat mode, with a stuck recipient and a flooding sender.
#[test]
fn chat_stop_is_quick_with_a_stuck_reader() {
    let mut server = ServerProcess::start(&["--mode", "chat"]);
    let (_stuck, _stuck_in, _) = join(server.addr);
    let flooder = Flooder::start(server.addr);
    wait_until_stuck(&server);
    let (out, took) = terminate_timed(&mut server);
    out.assert_code(0).assert_no_panic();
    assert!(took < Duration::from_secs(1), "exit took {took:?}\n{out}");
    flooder.stop();
}

/// A refused client is told why even when it sends at once (the demo client does) or its input
/// ends first: the reason is its error line and exit status 1, never a bare reset.
#[test]
fn a_refused_client_always_reports_the_reason() {
    let mut server = ServerProcess::start(&["--deny", "127.0.0.1"]);
    for attempt in 0..5 {
        let client =
            support::run_client_to(server.addr, &["--count", "2", "--interval", "0"], TIMEOUT);
        client.assert_code(1).assert_no_panic();
        assert_eq!(
            client.stdout, "error: not allowed\n",
            "attempt {attempt}\n{client}"
        );
        let errors = client.error_lines();
        assert_eq!(errors.len(), 1, "attempt {attempt}\n{client}");
        assert!(
            errors[0].ends_with("closed the connection: error: not allowed"),
            "{client}"
        );
    }
    let port = server.port_arg();
    let client = client_with_stdin(&["--port", &port], b"", true);
    assert_eq!(
        client.code(),
        Some(1),
        "standard input ending first must not hide the refusal\n{client}"
    );
    assert_eq!(client.stdout, "error: not allowed\n");
    server.stop().assert_code(0);
}

#[test]
fn round_trips_against_a_server_that_does_not_echo_end_with_an_error() {
    let mut server = ServerProcess::start(&[]);
    let client = support::run_client_to(
        server.addr,
        &["--rtt", "--count", "3", "--linger", "300ms"],
        TIMEOUT,
    );
    client.assert_code(1).assert_no_panic();
    assert!(client.stderr.contains("is it an echo server?"), "{client}");
    server.stop().assert_code(0);
}
