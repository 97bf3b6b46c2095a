//! The chat bus (`server --mode chat --chat-bus redis://...`): chat rooms of several servers
//! joined through a real Redis's pub/sub ([`support::redis`]), with the tests' own clients on raw
//! sockets, the load client spread over servers, and Redis killed, restarted, stopped and fed
//! forged messages under the servers.
//!
//! What Redis delivers to one subscriber comes in the order Redis took the PUBLISHes. So once a
//! line from one server has reached another server's client, everything published before it has
//! reached that server's bus too: a "marker" line sent after the lines a test checks shows that
//! nothing more (no duplicate, no echo, nothing forged) came before it, without waiting for
//! silence.
//!
//! Unix only: servers are stopped with SIGTERM to read their summary, and Redis is stopped and
//! continued with signals.

#![cfg(unix)]

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::redis::Redis;
use crate::support::{
    self, Output, ServerProcess, json_field, poll_until, read_line, run_client, run_server,
};

const TIMEOUT: Duration = Duration::from_secs(20);

/// How soon a line must reach a client of the same server, whatever Redis is doing: far more
/// than it takes (well under a millisecond), far less than the bus's 5 s wait for Redis, which
/// would show if a sender waited for the bus.
const PROMPT: Duration = Duration::from_secs(2);

/// How long a server may take to find Redis back after an outage: its reconnect backoff goes
/// 100 ms, 200 ms, ... up to 5 s, so a few attempts at most.
const RECONNECT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// A chat server on the bus.
struct Node {
    server: ServerProcess,
    /// Its id on the bus (16 hex digits), from its startup line.
    origin: String,
}

impl Node {
    /// `server --mode chat --chat-bus URL extra...` on a port of its own; it has joined the bus
    /// (subscribed) before it logs `listening on`, so every line its clients send from then on
    /// reaches every server in the room.
    fn start(redis: &Redis, extra: &[&str]) -> Node {
        let url = redis.url();
        let room = extra
            .iter()
            .position(|a| *a == "--chat-room")
            .map_or(plugboard::DEFAULT_CHAT_ROOM, |i| extra[i + 1]);
        let args = [&["--mode", "chat", "--chat-bus", url.as_str()], extra].concat();
        let server = ServerProcess::start(&args);
        let line = server.wait_for_log(&[&format!("chat bus {url}: room {room:?}, this server ")]);
        let origin: String = line
            .split("this server ")
            .nth(1)
            .and_then(|rest| rest.strip_suffix(" on it"))
            .unwrap_or_else(|| panic!("no origin in the startup line {line:?}"))
            .to_string();
        assert!(
            origin.len() == 16
                && origin
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "the origin is 16 lowercase hex digits: {line:?}"
        );
        Node { server, origin }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Polls (bounded by `within`) until the log has a line with every one of `needles`.
    fn wait_for_log_within(&self, within: Duration, needles: &[&str]) -> String {
        self.server.wait_for_log_within(within, needles)
    }

    /// SIGTERM; it must exit 0 without a panic. Returns its output and its bus counts.
    fn stop(&mut self) -> (Output, BusCounts) {
        let out = self.server.stop_cleanly();
        let counts = BusCounts::of(&out);
        (out, counts)
    }
}

/// The chat bus part of a server's summary line: `; chat bus: P lines published, R received, L
/// lost, U not published`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BusCounts {
    published: u64,
    received: u64,
    lost: u64,
    unpublished: u64,
}

impl BusCounts {
    fn new(published: u64, received: u64, lost: u64, unpublished: u64) -> BusCounts {
        BusCounts {
            published,
            received,
            lost,
            unpublished,
        }
    }

    fn of(out: &Output) -> BusCounts {
        let line = support::stopped_line(out);
        let numbers: Vec<u64> = line
            .split("; chat bus: ")
            .nth(1)
            .unwrap_or_else(|| panic!("no chat bus counts in {line:?}"))
            .split(", ")
            .map(|part| {
                part.split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{part:?} in {line:?}"))
            })
            .collect();
        assert!(
            line.ends_with(&format!(
                "; chat bus: {} {} published, {} received, {} lost, {} not published",
                numbers[0],
                if numbers[0] == 1 { "line" } else { "lines" },
                numbers[1],
                numbers[2],
                numbers[3]
            )),
            "the summary's wording: {line:?}"
        );
        BusCounts::new(numbers[0], numbers[1], numbers[2], numbers[3])
    }
}

/// A chat client of the tests' own, on a raw socket (reads are bounded by its read timeout).
struct Member {
    name: &'static str,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Member {
    /// Connects to `node` and reads its greeting.
    fn join(name: &'static str, node: &Node) -> Member {
        let (stream, reader, addr) = support::greeted(node.addr());
        Member {
            name,
            stream,
            reader,
            addr,
        }
    }

    /// Sends one line per text, in one write.
    fn say(&mut self, texts: &[&str]) {
        let batch: String = texts.iter().map(|t| format!("{t}\n")).collect();
        self.stream
            .write_all(batch.as_bytes())
            .unwrap_or_else(|e| panic!("{} sends: {e}", self.name));
    }

    /// The line `PEER TEXT` as the server relays a line of `self`'s.
    fn line(&self, text: &str) -> String {
        format!("{} {text}\n", self.addr)
    }

    /// The next line it receives (bounded by the socket's read timeout).
    fn next_line(&mut self, expecting: &str) -> String {
        match read_line(&mut self.reader) {
            Ok(line) if !line.is_empty() => line,
            Ok(_) => panic!("{}: the server closed, expecting {expecting:?}", self.name),
            Err(e) => panic!(
                "{}: nothing received ({e}), expecting {expecting:?}",
                self.name
            ),
        }
    }

    /// Its next lines must be exactly `texts` from `from`, in order.
    fn hears(&mut self, from: &Member, texts: &[&str]) {
        for (i, text) in texts.iter().enumerate() {
            let expected = from.line(text);
            let got = self.next_line(&expected);
            assert_eq!(
                got,
                expected,
                "{} (line {i} of {}'s {}): received something else",
                self.name,
                from.name,
                texts.len()
            );
        }
    }

    /// [`hears`](Member::hears) one line, within [`PROMPT`] of now.
    fn hears_promptly(&mut self, from: &Member, text: &str) -> Duration {
        let asked = Instant::now();
        self.hears(from, &[text]);
        let took = asked.elapsed();
        assert!(
            took < PROMPT,
            "{} got {}'s {text:?} only after {took:?}",
            self.name,
            from.name
        );
        took
    }

    /// Says `text` and returns how long `to` took to receive it (at most [`PROMPT`]).
    fn say_and_time(&mut self, to: &mut Member, text: &str) -> Duration {
        self.say(&[text]);
        to.hears_promptly(self, text)
    }
}

/// `n` numbered lines with a tag: `TAG 0`, `TAG 1`, ...
fn numbered(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag} {i}")).collect()
}

fn strs(lines: &[String]) -> Vec<&str> {
    lines.iter().map(String::as_str).collect()
}

/// `server --host 127.0.0.1 --port 0 --mode chat --chat-bus URL`.
fn chat_on(url: &str) -> Vec<&str> {
    vec![
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--mode",
        "chat",
        "--chat-bus",
        url,
    ]
}

/// The server exited 1 without a panic, never listening, with one error line naming `url` and
/// `cause`.
fn assert_start_failed(out: &Output, url: &str, cause: &str) {
    out.assert_code(1).assert_no_panic();
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "one error line\n{out}");
    assert!(
        errors[0].starts_with(&format!("error: cannot reach the chat bus {url}: "))
            && errors[0].contains(cause),
        "{out}"
    );
    assert!(!out.stderr.contains("listening on"), "{out}");
}

/// The log lines (of a server's stderr) that contain `needle`.
fn log_lines<'a>(out: &'a Output, needle: &str) -> Vec<&'a str> {
    out.stderr.lines().filter(|l| l.contains(needle)).collect()
}

// ------------------------------------------------------------------------------------------------
// One room across servers
// ------------------------------------------------------------------------------------------------

/// Three servers on one Redis share one room: a line said on A reaches the other client on A and
/// the clients on B and C exactly once each, named by its sender's address, in the order said;
/// its sender never gets it back (not from its own server, not from Redis); lines from B reach
/// A's and C's clients the same way. Marker lines sent afterwards prove that nothing duplicated
/// or echoed arrived before them, and the summaries count exactly the lines that crossed.
#[test]
fn a_room_spans_servers_every_line_exactly_once_in_order() {
    let redis = Redis::start();
    let mut a = Node::start(&redis, &[]);
    let mut b = Node::start(&redis, &[]);
    let mut c = Node::start(&redis, &[]);
    assert!(
        a.origin != b.origin && b.origin != c.origin && a.origin != c.origin,
        "every server has an id of its own: {} {} {}",
        a.origin,
        b.origin,
        c.origin
    );
    assert_eq!(
        redis.subscribers(plugboard::DEFAULT_CHAT_ROOM),
        3,
        "the room is the Redis channel `plugboard`, one subscriber a server"
    );
    let mut a1 = Member::join("a1", &a);
    let mut a2 = Member::join("a2", &a);
    let mut b1 = Member::join("b1", &b);
    let mut c1 = Member::join("c1", &c);

    // a1 speaks in one write (one batch on the bus) and then line by line (a batch each).
    let from_a1 = numbered("from a1", 20);
    a1.say(&strs(&from_a1[..10]));
    for line in &from_a1[10..] {
        a1.say(&[line]);
    }
    for member in [&mut a2, &mut b1, &mut c1] {
        member.hears(&a1, &strs(&from_a1));
    }

    let from_b1 = numbered("from b1 ✓ \u{1b}[1m", 10);
    b1.say(&strs(&from_b1));
    let escaped: Vec<String> = numbered("from b1 ✓ \\x1b[1m", 10);
    for member in [&mut a1, &mut a2, &mut c1] {
        member.hears(&b1, &strs(&escaped));
    }

    // Markers: c1's reaches A and B after everything published before it, so an echo of a1's
    // lines (to a1 or, a second time, to a2) or a duplicate at B would come first.
    c1.say(&["marker from c1"]);
    for member in [&mut a1, &mut a2, &mut b1] {
        member.hears(&c1, &["marker from c1"]);
    }
    // And b1's after c1's: c1 never gets its own marker back.
    b1.say(&["marker from b1"]);
    for member in [&mut a1, &mut a2, &mut c1] {
        member.hears(&b1, &["marker from b1"]);
    }

    let (a_out, a_counts) = a.stop();
    let (_, b_counts) = b.stop();
    let (_, c_counts) = c.stop();
    // A: a1's 20 out; b1's 11 and c1's 1 in. B: its 11 out; 20 + 1 in. C: 1 out; 31 in.
    assert_eq!(a_counts, BusCounts::new(20, 12, 0, 0), "A\n{a_out}");
    assert_eq!(b_counts, BusCounts::new(11, 21, 0, 0), "B");
    assert_eq!(c_counts, BusCounts::new(1, 31, 0, 0), "C");
    // A prints what its own clients said, not what came over the bus.
    assert_eq!(support::messages_from(&a_out.stdout, a1.addr).len(), 20);
    assert!(support::messages_from(&a_out.stdout, b1.addr).is_empty());
}

/// Rooms are separate: servers in `--chat-room other` (the Redis channel `other`) hear nothing
/// of room `plugboard`, and the other way round, while each room works across its own servers.
#[test]
fn rooms_are_separate_channels() {
    let redis = Redis::start();
    let mut p1 = Node::start(&redis, &[]);
    let mut p2 = Node::start(&redis, &[]);
    let mut o1 = Node::start(&redis, &["--chat-room", "other"]);
    let mut o2 = Node::start(&redis, &["--chat-room", "other"]);
    assert_eq!(redis.subscribers("plugboard"), 2);
    assert_eq!(redis.subscribers("other"), 2);
    let mut p1c = Member::join("p1c", &p1);
    let mut p2c = Member::join("p2c", &p2);
    let mut o1c = Member::join("o1c", &o1);
    let mut o2c = Member::join("o2c", &o2);

    p1c.say(&["in plugboard"]);
    p2c.hears(&p1c, &["in plugboard"]);
    // Published after `in plugboard` was: were it to reach o2c, it would come first.
    o1c.say(&["in other"]);
    o2c.hears(&o1c, &["in other"]);
    o2c.say(&["other's marker"]);
    o1c.hears(&o2c, &["other's marker"]);
    // And the other way round: `in other` and the marker would come before this.
    p2c.say(&["plugboard's marker"]);
    p1c.hears(&p2c, &["plugboard's marker"]);
    p1c.say(&["plugboard's last"]);
    p2c.hears(&p1c, &["plugboard's last"]);

    for (node, counts) in [
        (&mut p1, BusCounts::new(2, 1, 0, 0)),
        (&mut p2, BusCounts::new(1, 2, 0, 0)),
        (&mut o1, BusCounts::new(1, 1, 0, 0)),
        (&mut o2, BusCounts::new(1, 1, 0, 0)),
    ] {
        let (out, got) = node.stop();
        assert_eq!(got, counts, "{out}");
    }
}

/// The load client spread over two servers of one room (`client --chat --server A --server B`):
/// 20 connections, 10 on each, 50 messages each; every connection receives every other's 50,
/// wherever it is (20 × 19 × 50 deliveries), no errors; each server published its clients' 500
/// lines and received the other's 500.
#[test]
fn the_load_client_across_two_servers_gets_every_message() {
    let redis = Redis::start();
    let mut a = Node::start(&redis, &[]);
    let mut b = Node::start(&redis, &[]);
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    let started = Instant::now();
    let client = run_client(
        &[
            "--chat",
            "--server",
            &a_addr,
            "--server",
            &b_addr,
            "--connections",
            "20",
            "--count",
            "50",
            "--json",
        ],
        TIMEOUT,
    );
    let took = started.elapsed();
    client.assert_code(0).assert_no_panic();
    let json = support::json_summary(&client);
    assert_eq!(json_field(json, "connections"), 20.0, "{json}");
    assert_eq!(json_field(json, "messages"), 1000.0, "{json}");
    assert_eq!(json_field(json, "errors"), 0.0, "{json}");
    assert_eq!(
        json_field(json, "delivered"),
        (20 * 19 * 50) as f64,
        "{json}"
    );

    let (a_out, a_counts) = a.stop();
    let (b_out, b_counts) = b.stop();
    assert_eq!(a_counts, BusCounts::new(500, 500, 0, 0), "A\n{a_out}");
    assert_eq!(b_counts, BusCounts::new(500, 500, 0, 0), "B\n{b_out}");
    eprintln!("20 × 50 chat messages across two servers in {took:?}: {json}");
}

// ------------------------------------------------------------------------------------------------
// Starting, and flags
// ------------------------------------------------------------------------------------------------

/// A server whose Redis is not there (killed: nothing listens on its port) exits 1 at once with
/// one line, `error: cannot reach the chat bus URL: CAUSE`, and never listens. No panic.
#[test]
fn a_server_without_its_redis_exits_1_naming_it() {
    let mut redis = Redis::start();
    let url = redis.url();
    redis.kill();
    let started = Instant::now();
    let out = run_server(&chat_on(&url), TIMEOUT);
    let took = out.exited_at - started;
    assert_start_failed(&out, &url, "refused");
    assert!(took < Duration::from_secs(2), "exit 1 took {took:?}\n{out}");
    eprintln!("no Redis: exit 1 in {took:?}");
}

/// A server whose Redis is stuck (SIGSTOP: connecting works, nothing is ever answered) gives up
/// within its 5 s start bound: exit 1, one line `error: cannot reach the chat bus URL: no answer
/// within 5s`, never listening.
#[test]
fn a_server_whose_redis_is_stuck_exits_1_within_the_start_bound() {
    let mut redis = Redis::start();
    let url = redis.url();
    redis.pause();
    let started = Instant::now();
    let out = run_server(&chat_on(&url), TIMEOUT);
    let took = out.exited_at - started;
    assert_start_failed(&out, &url, "no answer within 5s");
    assert!(took < Duration::from_secs(7), "exit 1 took {took:?}\n{out}");
    redis.resume();
}

/// Flags that make no sense are usage errors (exit 2, never listening): `--chat-bus` outside chat
/// mode, `--chat-room` without `--chat-bus`, and a bus URL that is not `redis://` (named in the
/// message).
#[test]
fn chat_bus_flag_misuse_is_a_usage_error() {
    let redis = "redis://127.0.0.1:9";
    for (args, says) in [
        (vec!["--mode", "log", "--chat-bus", redis], "chat mode"),
        (vec!["--chat-bus", redis], "chat mode"),
        (vec!["--mode", "echo", "--chat-bus", redis], "chat mode"),
        (vec!["--mode", "chat", "--chat-room", "lobby"], "--chat-bus"),
        (
            vec!["--mode", "chat", "--chat-bus", "http://x"],
            "\"http://x\"",
        ),
        (
            vec!["--mode", "chat", "--chat-bus", "127.0.0.1:6379"],
            "127.0.0.1:6379",
        ),
    ] {
        let args = [&["--host", "127.0.0.1", "--port", "0"], args.as_slice()].concat();
        let out = run_server(&args, TIMEOUT);
        out.assert_code(2).assert_no_panic();
        // Clap's message may go on over several lines after its one `error:` line.
        assert!(
            out.error_lines().len() == 1 && out.stderr.contains(says),
            "one error naming {says:?}\n{out}"
        );
        assert!(!out.stderr.contains("listening on"), "{out}");
    }
}

// ------------------------------------------------------------------------------------------------
// Redis in trouble
// ------------------------------------------------------------------------------------------------

/// Redis killed under two servers: local chat goes on at once (a1's lines reach a2 promptly,
/// before and after the servers notice), both warn `connection lost ...; reconnecting`, nothing
/// crosses meanwhile. Redis back on the same port: both say they are connected again, lines cross
/// again both ways by themselves, and what was said during the outage is not replayed late. A
/// counted 4 lines not published and B, seeing A's sequence jump, 4 lost (and said so, naming A).
#[test]
fn redis_killed_and_restarted_local_chat_goes_on_and_the_bus_comes_back() {
    let mut redis = Redis::start();
    let url = redis.url();
    let mut a = Node::start(&redis, &[]);
    let mut b = Node::start(&redis, &[]);
    let mut a1 = Member::join("a1", &a);
    let mut a2 = Member::join("a2", &a);
    let mut b1 = Member::join("b1", &b);

    a1.say(&["before"]);
    a2.hears(&a1, &["before"]);
    b1.hears(&a1, &["before"]);

    redis.kill();
    // Said at once, before the servers may have noticed; and after they did.
    let mut slowest = a1.say_and_time(&mut a2, "during 1");
    let lost = format!("chat bus {url}: connection lost: ");
    for node in [&a, &b] {
        let warning = node.wait_for_log_within(RECONNECT, &[&lost]);
        assert!(
            warning.contains("WARN") && warning.ends_with("; reconnecting"),
            "{warning}"
        );
    }
    for text in ["during 2", "during 3", "during 4"] {
        slowest = slowest.max(a1.say_and_time(&mut a2, text));
    }

    redis.restart();
    let again = format!("chat bus {url}: connected again after ");
    for node in [&a, &b] {
        let line = node.wait_for_log_within(RECONNECT, &[&again]);
        assert!(line.contains("INFO"), "{line}");
    }
    a1.say(&["after"]);
    a2.hears(&a1, &["after"]);
    // The very next line at B: nothing of the outage came late.
    b1.hears(&a1, &["after"]);
    b1.say(&["back"]);
    a1.hears(&b1, &["back"]);
    a2.hears(&b1, &["back"]);

    let (a_out, a_counts) = a.stop();
    let (b_out, b_counts) = b.stop();
    // A published `before` and `after`; the 4 lines of the outage were dropped, counted.
    assert_eq!(a_counts, BusCounts::new(2, 1, 0, 4), "A\n{a_out}");
    // B saw A's sequence numbers jump by 4 at `after`.
    assert_eq!(b_counts, BusCounts::new(1, 2, 4, 0), "B\n{b_out}");
    let gap = format!(
        "chat bus: 4 lines from server {}.. lost (Redis pub/sub delivers at most once)",
        &a.origin[..8]
    );
    assert_eq!(log_lines(&b_out, &gap).len(), 1, "B warns once\n{b_out}");
    assert!(log_lines(&a_out, "lines from server").is_empty(), "{a_out}");
    for out in [&a_out, &b_out] {
        assert_eq!(
            log_lines(out, &lost).len(),
            1,
            "one warning per outage\n{out}"
        );
        assert_eq!(log_lines(out, &again).len(), 1, "{out}");
    }
    eprintln!("Redis killed: local lines took at most {slowest:?}");
}

/// A stuck Redis (SIGSTOP: connected, never answering) never stalls local chat: a1's lines reach
/// a2 promptly while the bus's publisher waits for an answer, and after it gave up (`connection
/// lost: no answer within 5s`); and the server still stops within its bound, its bus threads
/// being left to Redis.
#[test]
fn a_stuck_redis_never_stalls_local_chat_or_the_stop() {
    let mut redis = Redis::start();
    let url = redis.url();
    let mut a = Node::start(&redis, &[]);
    let mut a1 = Member::join("a1", &a);
    let mut a2 = Member::join("a2", &a);
    a1.say(&["before"]);
    a2.hears(&a1, &["before"]);

    redis.pause();
    let mut slowest = Duration::ZERO;
    for text in ["stuck 1", "stuck 2", "stuck 3"] {
        slowest = slowest.max(a1.say_and_time(&mut a2, text));
    }
    // The publisher gives up on its PUBLISH after 5 s; local chat goes on meanwhile and after.
    let warning = a.wait_for_log_within(
        TIMEOUT,
        &[&format!(
            "chat bus {url}: connection lost: no answer within 5s; reconnecting"
        )],
    );
    assert!(warning.contains("WARN"), "{warning}");
    for text in ["stuck 4", "stuck 5"] {
        slowest = slowest.max(a1.say_and_time(&mut a2, text));
    }

    // It now waits to connect to the stuck Redis again; the stop does not wait for that.
    let asked = a.server.terminate();
    let out = a.server.wait_exit(TIMEOUT);
    let took = out.exited_at - asked;
    out.assert_code(0).assert_no_panic();
    assert!(
        took < Duration::from_secs(5),
        "the stop took {took:?}\n{out}"
    );
    // Every line is accounted for: the publisher gave up before the stop, dropping what it had.
    // The five said while Redis was stuck are not published; `before` is, unless Redis stopped
    // before its answer to A's PUBLISH went out (a2 had it from A directly).
    let counts = BusCounts::of(&out);
    assert_eq!(
        (
            counts.published + counts.unpublished,
            counts.received,
            counts.lost
        ),
        (6, 0, 0),
        "{out}"
    );
    assert!(counts.unpublished >= 5, "{out}");
    redis.resume();
    eprintln!("a stuck Redis: local lines took at most {slowest:?}; the stop took {took:?}");
}

/// Messages on the channel that are not plugboard's (garbage, an empty one, envelopes with a bad
/// origin, sequence number or version, binary junk) are ignored, each counted as not
/// plugboard's: no client receives anything of them, no server crashes, and the genuine lines
/// that follow arrive as the very next lines.
#[test]
fn forged_and_malformed_messages_on_the_channel_are_ignored() {
    let redis = Redis::start();
    let mut a = Node::start(&redis, &["-v"]);
    let mut b = Node::start(&redis, &["-v"]);
    let mut a1 = Member::join("a1", &a);
    let mut a2 = Member::join("a2", &a);
    let mut b1 = Member::join("b1", &b);

    let forged: [&[u8]; 12] = [
        b"garbage",
        b"",
        b"plugboard1 ",
        b"plugboard1 XYZ 1\nhi\n",
        b"plugboard1 0123456789ABCDEF 1\nuppercase origin\n",
        b"plugboard1 0123456789abcde 1\nshort origin\n",
        b"plugboard1 0123456789abcdef 0\nsequence 0\n",
        b"plugboard1 0123456789abcdef 01\nleading zero\n",
        b"plugboard1 0123456789abcdef 99999999999999999999999\ntoo big\n",
        b"plugboard1 0123456789abcdef 1",
        b"plugboard2 0123456789abcdef 1\nanother version\n",
        b"\0\xff\r\n*1\r\n$4\r\nPING\r\n\x1b[2J",
    ];
    for message in forged {
        assert_eq!(
            redis.publish_raw("plugboard", message),
            2,
            "both servers are subscribed and get {message:?}"
        );
    }
    // Both servers saw each of them and dropped it as not plugboard's (their debug log says).
    for node in [&a, &b] {
        let seen = poll_until(support::POLL_DEADLINE, support::POLL_EVERY, || {
            let ignored = node
                .server
                .stderr_so_far()
                .lines()
                .filter(|l| l.contains("that is not plugboard's"))
                .count();
            (ignored >= forged.len()).then_some(ignored)
        });
        assert_eq!(seen, Some(forged.len()), "{}", node.server.stderr_so_far());
    }

    // Published after the forged ones: anything of theirs would come before at A.
    b1.say(&["genuine from b1"]);
    a1.hears(&b1, &["genuine from b1"]);
    a2.hears(&b1, &["genuine from b1"]);
    a1.say(&["genuine from a1"]);
    a2.hears(&a1, &["genuine from a1"]);
    b1.hears(&a1, &["genuine from a1"]);

    let (a_out, a_counts) = a.stop();
    let (b_out, b_counts) = b.stop();
    assert_eq!(a_counts, BusCounts::new(1, 1, 0, 0), "A\n{a_out}");
    assert_eq!(b_counts, BusCounts::new(1, 1, 0, 0), "B\n{b_out}");
}

/// A well-formed envelope from a server nobody runs (anyone who can publish on the channel can
/// write one) is relayed only as lines, escaped as a client's would be: terminal escapes and
/// bidirectional controls arrive as text, a carriage return cannot rewrite a line, and a payload
/// without a final newline cannot glue itself to the next line.
#[test]
fn lines_from_an_invented_server_are_relayed_escaped() {
    let redis = Redis::start();
    let a = Node::start(&redis, &[]);
    let mut a1 = Member::join("a1", &a);
    let mut a2 = Member::join("a2", &a);
    let invented = b"plugboard1 0123456789abcdef 1\n9.9.9.9:1 \x1b[2Jclear \xe2\x80\xae\rrewrite";
    assert_eq!(redis.publish_raw("plugboard", invented), 1);
    assert_eq!(
        a1.next_line("the invented line"),
        "9.9.9.9:1 \\x1b[2Jclear \\u{202e}\\x0drewrite\n"
    );
    // Its missing newline was added: the next line is a line of its own.
    a2.say(&["after it"]);
    a1.hears(&a2, &["after it"]);
}

/// A client of B that stops reading while a client of A floods the room (100,000 lines of about
/// 200 bytes, over the bus) is disconnected after B's `--send-timeout 1s`, and B's other client
/// receives every line, in order: the lines from the bus wait for a stuck reader no longer than
/// the send timeout, and nothing is lost on the way.
#[test]
fn a_stuck_reader_never_stalls_lines_from_the_bus() {
    const LINES: usize = 100_000;
    let redis = Redis::start();
    let mut a = Node::start(&redis, &[]);
    let mut b = Node::start(&redis, &["--send-timeout", "1s"]);
    let mut flooder = Member::join("flooder", &a);
    let stuck = Member::join("stuck", &b); // never reads again
    let reader = Member::join("reader", &b);

    let flooder_addr = flooder.addr;
    let mut reader_in = reader.reader;
    let started = Instant::now();
    let receiving = thread::spawn(move || {
        support::receive_numbered(&mut reader_in, flooder_addr, LINES);
        started.elapsed()
    });
    support::flood_numbered(&mut flooder.stream, LINES);
    let received = poll_until(TIMEOUT, Duration::from_millis(20), || {
        receiving.is_finished().then_some(())
    });
    assert!(
        received.is_some(),
        "B's reader did not get all {LINES} lines within {TIMEOUT:?}\n--- A ---\n{}\n--- B \
         ---\n{}",
        a.server.stderr_so_far(),
        b.server.stderr_so_far()
    );
    let took = receiving
        .join()
        .expect("B's reader got every line, in order");
    b.server
        .wait_for_log(&[&format!("{} disconnected: not reading", stuck.addr)]);

    let (a_out, a_counts) = a.stop();
    let (b_out, b_counts) = b.stop();
    assert_eq!(
        a_counts,
        BusCounts::new(LINES as u64, 0, 0, 0),
        "A\n{a_out}"
    );
    assert_eq!(
        b_counts,
        BusCounts::new(0, LINES as u64, 0, 0),
        "B\n{b_out}"
    );
    drop(stuck);
    eprintln!("{LINES} lines from A reached B's reader past a stuck one in {took:?}");
}
