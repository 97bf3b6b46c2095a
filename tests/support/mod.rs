//! Shared helpers for the integration tests: spawning the real `server` and `client` binaries,
//! capturing their output in background threads, and reporting everything on failure.
//!
//! Nothing here sleeps to synchronise: the server's address comes from its `listening on ADDR`
//! log line (read by a thread and handed over a channel), and every wait has a deadline.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long to wait for the server to report that it is listening.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for a process to exit after it was told to (or for a client run to finish).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Everything a finished process left behind.
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// When both output pipes had closed, i.e. the process had exited.
    pub exited_at: Instant,
}

impl Output {
    /// The exit code, or `None` if killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stderr lines that begin with `error:` (after stripping any colour codes).
    pub fn error_lines(&self) -> Vec<String> {
        self.stderr
            .lines()
            .map(strip_ansi)
            .filter(|l| l.trim_start().starts_with("error:"))
            .collect()
    }

    /// Assert the process exited with `code`, showing everything if not.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code(), Some(code), "unexpected exit status\n{self}");
        self
    }

    /// Assert nothing panicked.
    pub fn assert_no_panic(&self) -> &Self {
        assert!(
            !self.stderr.contains("panicked"),
            "process panicked\n{self}"
        );
        self
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.command)?;
        writeln!(f, "status:  {}", self.status)?;
        writeln!(f, "--- stdout ---\n{}", abbreviate(&self.stdout))?;
        writeln!(f, "--- stderr ---\n{}", abbreviate(&self.stderr))?;
        write!(f, "--------------")
    }
}

/// A spawned child whose stdout and stderr are drained by background threads.
struct Captured {
    command: String,
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
    /// One message per output pipe read when it closes, which is when the process exits.
    closed: Receiver<()>,
    /// How many pipes are read (stdout is left unread for some tests).
    pipes: usize,
    /// Stdout when left unread: held open, so that writes to it block once it is full.
    unread_stdout: Option<std::process::ChildStdout>,
}

impl Captured {
    /// Spawn `bin args...`; every complete stderr line is also sent on the returned channel.
    fn spawn(bin: &str, args: &[&str]) -> (Self, Receiver<String>) {
        let command = render_command(bin, args);
        Self::spawn_program(bin_path(bin).as_os_str(), args, command)
    }

    /// Like [`spawn`](Captured::spawn), but nobody reads stdout: once its pipe is full, writes
    /// to it block until the process exits.
    fn spawn_unread_stdout(bin: &str, args: &[&str]) -> (Self, Receiver<String>) {
        let command = render_command(bin, args);
        Self::spawn_with(bin_path(bin).as_os_str(), args, command, false)
    }

    /// Spawn `program args...` (any executable, e.g. a shell wrapping a binary); `command` is how
    /// failure messages show it.
    fn spawn_program(program: &OsStr, args: &[&str], command: String) -> (Self, Receiver<String>) {
        Self::spawn_with(program, args, command, true)
    }

    fn spawn_with(
        program: &OsStr,
        args: &[&str],
        command: String,
        read_stdout: bool,
    ) -> (Self, Receiver<String>) {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{command}`: {e}"));

        let stdout_pipe = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();

        let out_buf = Arc::clone(&stdout);
        let (closed_tx, closed) = mpsc::channel();
        let out_closed = closed_tx.clone();
        let mut threads = Vec::new();
        let mut unread_stdout = None;
        if read_stdout {
            threads.push(thread::spawn(move || {
                let mut pipe = stdout_pipe;
                let mut buf = [0u8; 64 * 1024];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => out_buf
                            .lock()
                            .expect("stdout lock")
                            .extend_from_slice(&buf[..n]),
                    }
                }
                let _ = out_closed.send(());
            }));
        } else {
            unread_stdout = Some(stdout_pipe);
        }

        let err_buf = Arc::clone(&stderr);
        let err_thread = thread::spawn(move || {
            let mut reader = BufReader::new(stderr_pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        err_buf
                            .lock()
                            .expect("stderr lock")
                            .extend_from_slice(&line);
                        let text = String::from_utf8_lossy(&line).trim_end().to_string();
                        // Nobody listening any more is fine.
                        let _ = tx.send(text);
                    }
                }
            }
            let _ = closed_tx.send(());
        });

        threads.push(err_thread);
        (
            Captured {
                command,
                child: Some(child),
                stdout,
                stderr,
                threads,
                closed,
                pipes: if read_stdout { 2 } else { 1 },
                unread_stdout,
            },
            rx,
        )
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("child already reaped").id()
    }

    fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("stdout lock")).into_owned()
    }

    fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    fn stdout_bytes(&self) -> Vec<u8> {
        self.stdout.lock().expect("stdout lock").clone()
    }

    fn stdout_newlines(&self) -> usize {
        self.stdout
            .lock()
            .expect("stdout lock")
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    /// Waits (bounded) for the process to exit, seen as both its output pipes closing; on
    /// timeout kills it and panics with its output.
    fn wait_exit(&mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        for _pipe in 0..self.pipes {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.closed.recv_timeout(left).is_err() {
                let child = self.child.as_mut().expect("child already reaped");
                let _ = child.kill();
                let status = child.wait().expect("wait after kill");
                self.child = None;
                self.join_readers();
                panic!(
                    "process did not exit within {timeout:?}; killed it\ncommand: {}\nstatus:  {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.command,
                    abbreviate(&self.stdout_so_far()),
                    abbreviate(&self.stderr_so_far()),
                );
            }
        }
        let exited_at = Instant::now();
        // Both pipes closed: the process is exiting, so this returns at once.
        let child = self.child.as_mut().expect("child already reaped");
        let status = child
            .wait()
            .unwrap_or_else(|e| panic!("wait failed for `{}`: {e}", self.command));
        self.child = None;
        // The pipes close when the process exits, so the readers finish promptly.
        self.join_readers();
        Output {
            command: self.command.clone(),
            status,
            stdout: self.stdout_so_far(),
            stderr: self.stderr_so_far(),
            exited_at,
        }
    }

    fn join_readers(&mut self) {
        for t in self.threads.drain(..) {
            t.join().expect("output reader thread panicked");
        }
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if thread::panicking() {
                self.join_readers();
                eprintln!(
                    "[support] killed `{}` (test failed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.command,
                    abbreviate(&self.stdout_so_far()),
                    abbreviate(&self.stderr_so_far()),
                );
            }
        }
    }
}

/// A running `server`. Killed on drop if still running (and its output shown if the test failed).
pub struct ServerProcess {
    inner: Captured,
    /// The address from the `listening on ADDR` log line.
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Spawn `server args...` and wait (bounded) for its `listening on ADDR` line.
    pub fn spawn(args: &[&str]) -> Self {
        let (inner, lines) = Captured::spawn("server", args);
        Self::await_listening(inner, lines, render_command("server", args))
    }

    /// Spawn `program args...`, some wrapper that ends up running the server with the same pid
    /// (e.g. `sh -c 'ulimit -n 40; exec SERVER ...'`), and wait for its `listening on ADDR` line.
    pub fn spawn_program(program: &str, args: &[&str]) -> Self {
        let command = render_command(program, args);
        let (inner, lines) = Captured::spawn_program(OsStr::new(program), args, command.clone());
        Self::await_listening(inner, lines, command)
    }

    fn await_listening(mut inner: Captured, lines: Receiver<String>, command: String) -> Self {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening_line(&line) {
                        break addr;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let stderr = inner.stderr_so_far();
                    drop(inner); // kills it
                    panic!(
                        "server did not log `listening on ADDR` within {STARTUP_TIMEOUT:?}\ncommand: {command}\n--- stderr ---\n{stderr}",
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Stderr closed: the server exited (or closed stderr) before listening.
                    let out = inner.wait_exit(EXIT_TIMEOUT);
                    panic!("server stopped before logging `listening on ADDR`\n{out}");
                }
            }
        };
        // Keep draining stderr lines into the buffer; the channel is no longer needed.
        drop(lines);
        ServerProcess { inner, addr }
    }

    /// Spawn with `--port 0` (and `--host 127.0.0.1`) prepended to `extra`.
    pub fn start(extra: &[&str]) -> Self {
        let mut args = vec!["--host", "127.0.0.1", "--port", "0"];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// Like [`start`](ServerProcess::start), with a stdout nobody reads: once its pipe is full,
    /// the server's writes to it block for good.
    pub fn start_unread_stdout(extra: &[&str]) -> Self {
        let mut args = vec!["--host", "127.0.0.1", "--port", "0"];
        args.extend_from_slice(extra);
        let (inner, lines) = Captured::spawn_unread_stdout("server", &args);
        Self::await_listening(inner, lines, render_command("server", &args))
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn port_arg(&self) -> String {
        self.addr.port().to_string()
    }

    pub fn command(&self) -> &str {
        &self.inner.command
    }

    /// The complete lines the server has printed to stdout so far: a line still being captured
    /// is left out, so that part of a long line is never taken for a message.
    pub fn stdout_so_far(&self) -> String {
        let mut stdout = self.inner.stdout_so_far();
        let complete = stdout.rfind('\n').map_or(0, |at| at + 1);
        stdout.truncate(complete);
        stdout
    }

    /// What the server has logged so far.
    pub fn stderr_so_far(&self) -> String {
        self.inner.stderr_so_far()
    }

    /// The raw bytes the server has printed to stdout so far (no lossy UTF-8 conversion; still
    /// readable after `wait_exit`, when it is everything the server printed).
    pub fn stdout_bytes(&self) -> Vec<u8> {
        self.inner.stdout_bytes()
    }

    /// How many complete lines the server has printed to stdout so far, without copying them.
    pub fn stdout_line_count(&self) -> usize {
        self.inner.stdout_newlines()
    }

    /// Send SIGTERM. Returns the instant right after `kill` reported success, i.e. once the
    /// signal has been sent.
    #[cfg(unix)]
    pub fn terminate(&self) -> Instant {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
        Instant::now()
    }

    /// Send SIGTERM, wait (bounded) until the process has taken it (no signal pending for it in
    /// /proc), and send it again: two signals a few milliseconds apart, each seen on its own.
    #[cfg(target_os = "linux")]
    pub fn terminate_twice(&self) {
        self.terminate();
        let taken = poll_until(STARTUP_TIMEOUT, Duration::from_micros(100), || {
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
            let pending = status.lines().find_map(|l| l.strip_prefix("ShdPnd:"))?;
            (pending.trim().trim_start_matches('0').is_empty()).then_some(())
        });
        assert!(taken.is_some(), "the first SIGTERM was never taken");
        self.terminate();
    }

    /// Wait (bounded) for the server to exit; returns status and everything it printed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Output {
        self.inner.wait_exit(timeout)
    }

    /// SIGTERM, then wait for exit.
    #[cfg(unix)]
    pub fn stop(&mut self) -> Output {
        self.terminate();
        self.wait_exit(EXIT_TIMEOUT)
    }
}

/// A binary running in the background, its output captured; killed on drop if still running.
pub struct Background(Captured);

impl Background {
    /// Spawn `bin args...`.
    pub fn spawn(bin: &str, args: &[&str]) -> Self {
        let (captured, lines) = Captured::spawn(bin, args);
        drop(lines);
        Background(captured)
    }

    /// Spawn `client --host 127.0.0.1 --port PORT extra...`.
    pub fn client_to(addr: SocketAddr, extra: &[&str]) -> Self {
        let host = addr.ip().to_string();
        let port = addr.port().to_string();
        let mut args = vec!["--host", host.as_str(), "--port", port.as_str()];
        args.extend_from_slice(extra);
        Self::spawn("client", &args)
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// What it has logged so far.
    pub fn stderr_so_far(&self) -> String {
        self.0.stderr_so_far()
    }

    /// Wait (bounded) for it to exit; returns status and everything it printed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Output {
        self.0.wait_exit(timeout)
    }
}

/// The port a process listens on, from /proc (for a server whose log can't be read).
#[cfg(target_os = "linux")]
pub fn listening_port(pid: u32) -> Option<u16> {
    let mut sockets = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let link = std::fs::read_link(fd.ok()?.path()).ok()?;
        if let Some(inode) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
        {
            sockets.push(inode.to_string());
        }
    }
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st (0A: LISTEN), ..., inode (the tenth field).
            if fields.len() > 9 && fields[3] == "0A" && sockets.iter().any(|s| s == fields[9]) {
                let port = fields[1].rsplit(':').next()?;
                return u16::from_str_radix(port, 16).ok();
            }
        }
    }
    None
}

/// Run a binary to completion (bounded by `timeout`; killed and reported if it overruns).
pub fn run_bin(bin: &str, args: &[&str], timeout: Duration) -> Output {
    let (mut captured, lines) = Captured::spawn(bin, args);
    drop(lines);
    captured.wait_exit(timeout)
}

/// Run `client args...` to completion, bounded by `timeout`.
pub fn run_client(args: &[&str], timeout: Duration) -> Output {
    run_bin("client", args, timeout)
}

/// Run `client --host 127.0.0.1 --port PORT extra...`.
pub fn run_client_to(addr: SocketAddr, extra: &[&str], timeout: Duration) -> Output {
    let host = addr.ip().to_string();
    let port = addr.port().to_string();
    let mut args = vec!["--host", host.as_str(), "--port", port.as_str()];
    args.extend_from_slice(extra);
    run_client(&args, timeout)
}

/// Run `server args...` expecting it to exit by itself (errors, bad flags).
pub fn run_server(args: &[&str], timeout: Duration) -> Output {
    run_bin("server", args, timeout)
}

/// Small deterministic PRNG (xorshift64*), so random cuts are reproducible.
pub struct XorShift(u64);

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

/// Connects to a server with the default greeting and reads it; the stream has bounded read and
/// write timeouts (20 s) and `TCP_NODELAY`. Returns it, a reader on a clone, and our address.
pub fn greeted(
    server: SocketAddr,
) -> (
    std::net::TcpStream,
    BufReader<std::net::TcpStream>,
    SocketAddr,
) {
    let timeout = Duration::from_secs(20);
    let stream = std::net::TcpStream::connect_timeout(&server, timeout).expect("connect");
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    stream.set_write_timeout(Some(timeout)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    let me = stream.local_addr().expect("local addr");
    let mut reader = BufReader::new(stream.try_clone().expect("clone for reading"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("greeting");
    assert_eq!(greeting, format!("welcome to plugboard, {me}\n"));
    (stream, reader, me)
}

/// Sends `lines` lines of about 200 bytes, `{i:08} xxx…` numbered from 0, in 64 KiB writes: a
/// chat flood.
pub fn flood_numbered(stream: &mut std::net::TcpStream, lines: usize) {
    use std::io::Write;
    let padding = "x".repeat(180);
    let mut batch = Vec::new();
    for i in 0..lines {
        batch.extend_from_slice(format!("{i:08} {padding}\n").as_bytes());
        if batch.len() > 64 * 1024 || i + 1 == lines {
            stream.write_all(&batch).expect("flood");
            batch.clear();
        }
    }
}

/// Reads the `lines` lines of [`flood_numbered`] as a chat server relays them from `from`,
/// checking that none is missing or out of order.
pub fn receive_numbered(reader: &mut impl BufRead, from: SocketAddr, lines: usize) {
    let mut line = String::new();
    for i in 0..lines {
        line.clear();
        reader.read_line(&mut line).expect("receive");
        let expected = format!("{from} {i:08} ");
        assert!(line.starts_with(&expected), "line {i}: {line:?}");
    }
}

/// Paces a client that deliberately sends or reads slowly. This does not synchronise anything:
/// tests wait for what they check by reading sockets or polling with a deadline.
pub fn pace(d: Duration) {
    thread::sleep(d);
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

/// A number field of /proc/PID/status (`VmRSS:`, `VmHWM:` in KiB, `Threads:`), for the
/// memory and thread checks.
#[cfg(target_os = "linux")]
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
}
