//! Everything the tests share: spawning the real `server` and `client` binaries and capturing
//! their output ([`process`]), the tests' side of a connection ([`net`]), what /proc says about a
//! process ([`procfs`], Linux), certificates and peers for the TLS tests ([`tls`], Unix), other
//! servers run as real peers, such as HAProxy ([`services`], Unix) and Redis ([`redis`], Unix),
//! the Windows binaries under Wine ([`wine`], Linux), and reading what the server printed.
//!
//! Nothing here sleeps to synchronise: the server's address comes from its `listening on ADDR`
//! log line (read by a thread and handed over a channel), a process's exit is seen as its output
//! pipes closing, and everything else is polled with a deadline.

pub mod net;
pub mod process;
#[cfg(target_os = "linux")]
pub mod procfs;
#[cfg(unix)]
pub mod redis;
#[cfg(unix)]
pub mod services;
#[cfg(unix)]
pub mod tls;
#[cfg(target_os = "linux")]
pub mod wine;

pub use net::*;
pub use process::*;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

/// How long to wait for the server to report that it is listening.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for a process to exit after it was told to (or for a client run to finish).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline for anything polled (a line to appear in the server's output, a slot to free up).
pub const POLL_DEADLINE: Duration = Duration::from_secs(15);
/// Interval between polls.
pub const POLL_EVERY: Duration = Duration::from_millis(10);

/// Path of one of the crate's binaries (`server` or `client`), looked up at run time.
pub fn bin_path(name: &str) -> PathBuf {
    assert_cmd::cargo::cargo_bin(name)
}

/// A readable rendering of a command line, for failure messages.
fn render_command(bin: &str, args: &[&str]) -> String {
    let mut s = bin.to_string();
    for a in args {
        s.push(' ');
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        } else {
            s.push_str(a);
        }
    }
    s
}

/// Keep failure messages readable when a process printed megabytes.
fn abbreviate(text: &str) -> String {
    const KEEP: usize = 6000;
    if text.len() <= 2 * KEEP {
        return text.to_string();
    }
    let mut head_end = KEEP;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut tail_start = text.len() - KEEP;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!(
        "{}\n[... {} bytes omitted ...]\n{}",
        &text[..head_end],
        tail_start - head_end,
        &text[tail_start..]
    )
}

/// Remove ANSI escape sequences (the server should not emit any when stderr is a pipe, but the
/// address parser should not be the thing that fails if it does).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Find `listening on ADDR` in a log line and parse ADDR.
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    // The address is the whitespace-delimited token; also tolerate a closing quote or comma
    // right after it (e.g. JSON logs).
    let token: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '[' | ']' | ':' | '.' | '%'))
        .collect();
    token.parse().ok()
}

/// Split a server stdout line `PEER MESSAGE` into its parts. PEER must be a `SocketAddr`.
pub fn parse_message_line(line: &str) -> Option<(SocketAddr, &str)> {
    let (peer, message) = line.split_once(' ')?;
    Some((peer.parse().ok()?, message))
}

/// The lines of `stdout` (as printed by the server) whose peer is `peer`, message text only.
pub fn messages_from(stdout: &str, peer: SocketAddr) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(parse_message_line)
        .filter(|(p, _)| *p == peer)
        .map(|(_, m)| m)
        .collect()
}

/// A number field of a JSON line, as the client's `--json` summary prints it (`"name":N`).
#[cfg(unix)]
pub fn json_field(json: &str, name: &str) -> f64 {
    let key = format!("\"{name}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
        + key.len();
    json[at..]
        .split([',', '}'])
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not a number in {json}"))
}

/// Runs `f` on a thread and fails the test if it takes longer than `timeout`: for a call that
/// would block for ever if the code under test hung.
pub fn bounded<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}"))
}

/// Poll `check` until it returns `Some`, or `None` once `timeout` has passed.
pub fn poll_until<T>(
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(interval);
    }
}

/// Paces a client that deliberately sends or reads slowly. This does not synchronise anything:
/// tests wait for what they check by reading sockets or polling with a deadline.
pub fn pace(d: Duration) {
    thread::sleep(d);
}

/// Says, where a passing test's output can't hide it, that (part of) a test was skipped and
/// why: `cargo test` captures what tests print with `eprintln!`, and shows it only for failures,
/// so this writes to the process's stderr directly.
#[cfg(unix)]
pub fn skipped(what: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}: {why}");
}

/// Small deterministic PRNG (xorshift64*), so random cuts are reproducible.
#[cfg(unix)]
pub struct XorShift(u64);

#[cfg(unix)]
impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// The server's `stopped: ...` summary line.
#[cfg(unix)]
pub fn stopped_line(out: &Output) -> String {
    out.stderr
        .lines()
        .find(|l| l.contains(" stopped: "))
        .unwrap_or_else(|| panic!("no `stopped:` line\n{out}"))
        .to_string()
}

/// Asserts that the summary line ends with `, N WHAT` (`, 2 failed TLS handshakes`), and says
/// nothing of `what` for none.
#[cfg(unix)]
pub fn assert_summary_counts(out: &Output, n: usize, what: &str) {
    let line = stopped_line(out);
    if n == 0 {
        assert!(!line.contains(what), "no {what} expected: {line}\n{out}");
    } else {
        // `what` in the plural: `1 failed TLS handshake`, `2 failed TLS handshakes`.
        let counted = match n {
            1 => format!("1 {}", what.strip_suffix('s').unwrap_or(what)),
            n => format!("{n} {what}"),
        };
        assert!(
            line.ends_with(&format!(", {counted}")),
            "expected {counted}: {line}\n{out}"
        );
    }
}

/// Checks a demo client's side: it exited 0, printed nothing but its greeting and logged
/// `connected to SERVER`. Returns its address, from the greeting.
#[cfg(unix)]
pub fn assert_demo_client(client: &Output, server: SocketAddr) -> SocketAddr {
    client.assert_code(0).assert_no_panic();
    let peer = greeting_peer(client);
    assert_eq!(client.stdout, greeting(peer), "{client}");
    assert!(
        client.stderr.contains(&format!("connected to {server}")),
        "the client should log `connected to {server}`\n{client}"
    );
    peer
}

/// The pin a `--tls-self-signed` server logs (`tls fingerprint sha256:HEX`), once it has.
#[cfg(unix)]
pub fn logged_fingerprint(server: &ServerProcess) -> String {
    let line = server.wait_for_log(&["tls fingerprint "]);
    line.split("tls fingerprint ")
        .nth(1)
        .expect("after the needle")
        .trim()
        .to_string()
}

/// The `--json` summary line a load client printed.
#[cfg(unix)]
pub fn json_summary(client: &Output) -> &str {
    client
        .stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary\n{client}"))
}

/// The client's address, from the greeting it printed first (line framing).
#[cfg(unix)]
pub fn greeting_peer(client: &Output) -> SocketAddr {
    let first = client
        .stdout
        .lines()
        .next()
        .unwrap_or_else(|| panic!("client printed no greeting\n{client}"));
    let peer = first
        .strip_prefix(greeting_prefix())
        .unwrap_or_else(|| panic!("first client line {first:?} is not the greeting\n{client}"));
    peer.parse()
        .unwrap_or_else(|e| panic!("greeting address {peer:?} is not an address ({e})\n{client}"))
}
