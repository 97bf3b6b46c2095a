//! The real binaries as child processes: spawned, their output captured by background threads,
//! waited for with a deadline, killed (and their output shown) if a test fails first.

use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{
    EXIT_TIMEOUT, POLL_DEADLINE, POLL_EVERY, STARTUP_TIMEOUT, abbreviate, bin_path, messages_from,
    parse_listening_line, poll_until, render_command, strip_ansi,
};

/// Everything a finished process left behind.
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// When the output pipes that were read had closed, i.e. the process had exited (to within
    /// the time a reader thread takes to see it).
    #[cfg(unix)]
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

/// Which output pipe of a [`Captured`] child is also handed over line by line, on the channel
/// its `spawn` returns: the server's log (stderr), or what a peer program prints (stdout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinesOf {
    Stdout,
    Stderr,
}

/// A spawned child whose stdout and stderr are drained by background threads, one of them also
/// sent line by line on a channel ([`LinesOf`]); killed on drop if still running (and its output
/// shown if the test failed). The binaries under test, the peer programs of the TLS tests
/// ([`Tool`](super::tls::Tool)) and the services ([`Service`](super::services::Service)) are all
/// run by this.
pub struct Captured {
    command: String,
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
    /// One message per output pipe read when it closes, which is when the process exits.
    closed: Receiver<()>,
    /// How many pipes are read (stdout is left unread for some tests, held open in `child`).
    pipes: usize,
}

impl Captured {
    /// Spawn `bin args...`; every complete stderr line is also sent on the returned channel.
    fn spawn(bin: &str, args: &[&str]) -> (Self, Receiver<String>) {
        let command = render_command(bin, args);
        Self::spawn_program(bin_path(bin).as_os_str(), args, command)
    }

    /// Like [`spawn`](Captured::spawn), but nobody reads stdout: it is left in the child (see
    /// [`ServerProcess::take_stdout`]), and once its pipe is full, writes to it block until the
    /// process exits.
    #[cfg(unix)]
    fn spawn_unread_stdout(bin: &str, args: &[&str]) -> (Self, Receiver<String>) {
        let command = render_command(bin, args);
        Self::spawn_with(
            bin_path(bin).as_os_str(),
            args,
            command,
            false,
            Stdio::null(),
            LinesOf::Stderr,
        )
    }

    /// Spawn `program args...` (any executable, e.g. a shell wrapping a binary); `command` is how
    /// failure messages show it. Stderr lines go to the channel.
    pub fn spawn_program(
        program: &OsStr,
        args: &[&str],
        command: String,
    ) -> (Self, Receiver<String>) {
        Self::spawn_with(program, args, command, true, Stdio::null(), LinesOf::Stderr)
    }

    /// Spawn with this stdin (a piped stdin is left in `child` for the caller), reading stdout
    /// only if `read_stdout`; the lines of the pipe `lines` names go to the returned channel.
    pub fn spawn_with(
        program: &OsStr,
        args: &[&str],
        command: String,
        read_stdout: bool,
        stdin: Stdio,
        lines: LinesOf,
    ) -> (Self, Receiver<String>) {
        assert!(
            read_stdout || lines == LinesOf::Stderr,
            "the lines of a stdout nobody reads"
        );
        let mut child = Command::new(program)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{command}`: {e}"));

        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let (closed_tx, closed) = mpsc::channel();
        let mut threads = Vec::new();
        if read_stdout {
            let pipe = child.stdout.take().expect("piped stdout");
            let tx = (lines == LinesOf::Stdout).then(|| tx.clone());
            threads.push(drain(pipe, Arc::clone(&stdout), tx, closed_tx.clone()));
        }
        let pipe = child.stderr.take().expect("piped stderr");
        let tx = (lines == LinesOf::Stderr).then_some(tx);
        threads.push(drain(pipe, Arc::clone(&stderr), tx, closed_tx));
        (
            Captured {
                command,
                child: Some(child),
                stdout,
                stderr,
                threads,
                closed,
                pipes: if read_stdout { 2 } else { 1 },
            },
            rx,
        )
    }

    /// The command line, as failure messages show it.
    #[cfg(unix)]
    pub fn command(&self) -> &str {
        &self.command
    }

    #[cfg(unix)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child already reaped").id()
    }

    /// The child, while it has not been waited for.
    #[cfg(unix)]
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("stdout lock")).into_owned()
    }

    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    #[cfg(unix)]
    fn stdout_bytes(&self) -> Vec<u8> {
        self.stdout.lock().expect("stdout lock").clone()
    }

    #[cfg(unix)]
    fn stdout_newlines(&self) -> usize {
        self.stdout
            .lock()
            .expect("stdout lock")
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    /// Waits (bounded) for the process to exit, seen as the output pipes it reads closing (no
    /// polling: a reader thread reports each close); on timeout kills it and panics with its
    /// output.
    pub fn wait_exit(&mut self, timeout: Duration) -> Output {
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
        #[cfg(unix)]
        let exited_at = Instant::now();
        // Its pipes closed: the process is exiting, so this returns at once.
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
            #[cfg(unix)]
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

/// Reads `pipe` to its end into `buf` on a thread of its own, each complete line also to `lines`
/// if given (a reader gone is fine); says on `closed` when the pipe has closed.
fn drain(
    pipe: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
    lines: Option<Sender<String>>,
    closed: Sender<()>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        match lines {
            Some(lines) => {
                let mut reader = BufReader::new(pipe);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            buf.lock().expect("output lock").extend_from_slice(&line);
                            let text = String::from_utf8_lossy(&line).trim_end().to_string();
                            let _ = lines.send(text);
                        }
                    }
                }
            }
            None => {
                let mut pipe = pipe;
                let mut chunk = [0u8; 64 * 1024];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf
                            .lock()
                            .expect("output lock")
                            .extend_from_slice(&chunk[..n]),
                    }
                }
            }
        }
        let _ = closed.send(());
    })
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
    #[cfg(target_os = "linux")]
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
        Self::spawn(&loopback_port_0(extra))
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

    /// Polls (bounded) until the server has printed `expected` messages for `peer`, then returns
    /// what it printed for `peer` (which may be more, if the server misbehaves; callers compare).
    pub fn wait_for_messages(&self, peer: SocketAddr, expected: usize) -> Vec<String> {
        let got = poll_until(POLL_DEADLINE, POLL_EVERY, || {
            let stdout = self.stdout_so_far();
            let messages: Vec<String> = messages_from(&stdout, peer)
                .into_iter()
                .map(str::to_string)
                .collect();
            (messages.len() >= expected).then_some(messages)
        });
        got.unwrap_or_else(|| {
            panic!(
                "server did not print {expected} messages from {peer} within {POLL_DEADLINE:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout_so_far(),
                self.stderr_so_far()
            )
        })
    }

    /// Polls (bounded) until the server's log has a line with every one of `needles`; returns it.
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        self.wait_for_log_within(POLL_DEADLINE, needles)
    }

    /// [`wait_for_log`](ServerProcess::wait_for_log), waiting at most `within`.
    pub fn wait_for_log_within(&self, within: Duration, needles: &[&str]) -> String {
        let found = poll_until(within, POLL_EVERY, || {
            self.stderr_so_far()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
        });
        found.unwrap_or_else(|| {
            panic!(
                "server logged no line containing all of {needles:?} within {within:?}\n--- stderr ---\n{}",
                self.stderr_so_far()
            )
        })
    }
}

/// What only Unix tests use: the pid, signals, and reading the output after a graceful stop.
#[cfg(unix)]
impl ServerProcess {
    /// Like [`start`](ServerProcess::start), with a stdout nobody reads: once its pipe is full,
    /// the server's writes to it block for good (unless a test takes it, see
    /// [`take_stdout`](ServerProcess::take_stdout)).
    pub fn start_unread_stdout(extra: &[&str]) -> Self {
        let args = loopback_port_0(extra);
        let (inner, lines) = Captured::spawn_unread_stdout("server", &args);
        Self::await_listening(inner, lines, render_command("server", &args))
    }

    /// The read end of the stdout of a server from
    /// [`start_unread_stdout`](ServerProcess::start_unread_stdout), for a test to read and close.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.inner
            .child()
            .stdout
            .take()
            .expect("a stdout left unread, not taken yet")
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    pub fn port_arg(&self) -> String {
        self.addr.port().to_string()
    }

    pub fn command(&self) -> &str {
        &self.inner.command
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
    pub fn terminate(&self) -> Instant {
        signal(self.pid(), "TERM");
        Instant::now()
    }

    /// Send SIGTERM, wait (bounded) until the process has taken it (no signal pending for it in
    /// /proc), and send it again: two signals a few milliseconds apart, each seen on its own.
    #[cfg(target_os = "linux")]
    pub fn terminate_twice(&self) {
        self.terminate();
        let taken = poll_until(STARTUP_TIMEOUT, Duration::from_micros(100), || {
            (super::procfs::signal_pending(self.pid()) == Some(false)).then_some(())
        });
        assert!(taken.is_some(), "the first SIGTERM was never taken");
        self.terminate();
    }

    /// Wait (bounded) for the server to exit; returns status and everything it printed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Output {
        self.inner.wait_exit(timeout)
    }

    /// SIGTERM, then wait for exit.
    pub fn stop(&mut self) -> Output {
        self.terminate();
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// [`stop`](ServerProcess::stop), asserting that the server exited 0 without a panic.
    pub fn stop_cleanly(&mut self) -> Output {
        let out = self.stop();
        out.assert_code(0).assert_no_panic();
        out
    }
}

/// `--host 127.0.0.1 --port 0`, then `extra`.
fn loopback_port_0<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--host", "127.0.0.1", "--port", "0"];
    args.extend_from_slice(extra);
    args
}

/// Sends signal `name` (`TERM`, `KILL`) to process `pid` with `kill(1)`.
#[cfg(unix)]
pub fn signal(pid: u32, name: &str) {
    let pid = pid.to_string();
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed: {status}");
}

/// A client running in the background, its output captured; killed on drop if still running.
#[cfg(unix)]
pub struct Background(Captured);

#[cfg(unix)]
impl Background {
    /// Spawn `client --host HOST --port PORT extra...`.
    pub fn client_to(addr: SocketAddr, extra: &[&str]) -> Self {
        let args = client_args(addr, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (captured, lines) = Captured::spawn("client", &args);
        drop(lines);
        Background(captured)
    }

    /// Wait (bounded) for it to exit; returns status and everything it printed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Output {
        self.0.wait_exit(timeout)
    }
}

/// A child whose output goes wherever the test sends it (`/dev/full`, a pipe never read),
/// not captured; killed on drop unless it was waited for.
#[cfg(unix)]
pub struct Reaper(Option<Child>);

#[cfg(unix)]
impl Reaper {
    /// Spawn `bin args...` with these stdout and stderr, and no stdin.
    pub fn spawn(bin: &str, args: &[&str], stdout: Stdio, stderr: Stdio) -> Self {
        let child = Command::new(bin_path(bin))
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{}`: {e}", render_command(bin, args)));
        Reaper(Some(child))
    }

    /// Spawn `server --host 127.0.0.1 --port 0` with these stdout and stderr.
    pub fn server(stdout: Stdio, stderr: Stdio) -> Self {
        Self::spawn("server", &loopback_port_0(&[]), stdout, stderr)
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already reaped")
    }

    /// Waits for the exit, polling every 10 ms; kills it and panics past `timeout`.
    pub fn wait(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let child = self.child();
        let exited = poll_until(timeout, POLL_EVERY, || child.try_wait().expect("try_wait"));
        match exited {
            Some(status) => {
                self.0 = None;
                status
            }
            None => panic!("{what} did not exit within {timeout:?}"),
        }
    }
}

#[cfg(unix)]
impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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

/// `--host HOST --port PORT` for `addr`, then `extra`.
#[cfg(unix)]
fn client_args(addr: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--host".to_string(),
        addr.ip().to_string(),
        "--port".to_string(),
        addr.port().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Run `client --host HOST --port PORT extra...` to completion, bounded by `timeout`.
#[cfg(unix)]
pub fn run_client_to(addr: SocketAddr, extra: &[&str], timeout: Duration) -> Output {
    let args = client_args(addr, extra);
    run_client(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        timeout,
    )
}

/// Run `client args...` with `input` on its standard input, to completion (bounded by
/// `timeout`). Its stdin is closed after `input` if `close`, else held open until it exits.
#[cfg(unix)]
pub fn run_client_with_stdin(
    args: &[&str],
    input: &[u8],
    close: bool,
    timeout: Duration,
) -> Output {
    use std::io::Write;
    let command = format!("{} < input", render_command("client", args));
    let (mut captured, lines) = Captured::spawn_with(
        bin_path("client").as_os_str(),
        args,
        command,
        true,
        Stdio::piped(),
        LinesOf::Stderr,
    );
    drop(lines);
    let mut stdin = captured.child().stdin.take().expect("piped stdin");
    stdin.write_all(input).expect("write the client's stdin");
    let held_open = if close {
        drop(stdin);
        None
    } else {
        Some(stdin)
    };
    let out = captured.wait_exit(timeout);
    drop(held_open);
    out
}

/// Run `server args...` expecting it to exit by itself (errors, bad flags).
pub fn run_server(args: &[&str], timeout: Duration) -> Output {
    run_bin("server", args, timeout)
}

/// Whether `program` (a name looked up on PATH, or a path) can be run here at all.
#[cfg(unix)]
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
