//! A real Redis for the chat bus tests: [`Redis`], `redis-server` in the foreground on a free
//! loopback port, with a directory of its own, that a test can kill, start again on the same
//! port, stop and continue (SIGSTOP, SIGCONT), and publish any bytes on.
//!
//! It is run by [`Captured`] (its output is shown if the test fails) rather than as a
//! [`Service`](super::services::Service), which has no way to start a service again on the port
//! it had: the servers under test know Redis by its URL, so after an outage it must come back
//! where it was. Redis is spoken to in raw RESP over a [`TcpStream`]: the tests need little of
//! it (PING, INFO, PUBLISH, PUBSUB NUMSUB), and forging what is published is the point.
//!
//! A missing `redis-server` fails the test, saying what installs it: the chat bus tests are part
//! of the suite, not optional.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{Captured, Output, signal};
use super::tls::TempDir;
use super::{EXIT_TIMEOUT, POLL_EVERY, STARTUP_TIMEOUT, poll_until, render_command};

/// Where Debian's package puts the server.
const PROGRAM: &str = "/usr/bin/redis-server";

/// What it prints when the port it was given is taken.
const PORT_TAKEN: &str = "Address already in use";

/// How often [`Redis::start`] picks another port when the one it picked was taken meanwhile.
const ATTEMPTS: usize = 5;

/// Timeouts of the tests' own connections to Redis (connect, each read and write).
const REDIS_IO: Duration = Duration::from_secs(5);

/// How long a PING may go unanswered before a stopped Redis counts as stuck (see
/// [`Redis::pause`]): a running one on loopback answers in microseconds.
const UNANSWERED: Duration = Duration::from_millis(200);

/// A reply, in RESP2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A running `redis-server` (unless [`kill`](Redis::kill)ed): killed on drop (continued first if
/// paused), then its directory removed.
pub struct Redis {
    /// `None` once killed, until [`restart`](Redis::restart).
    process: Option<Captured>,
    /// Its `--dir`; dropped after the process is (see `Drop`).
    dir: TempDir,
    program: PathBuf,
    port: u16,
    /// Stopped with SIGSTOP, not continued yet.
    paused: bool,
}

impl Redis {
    /// Starts `redis-server` on a free port of 127.0.0.1 (no persistence, a directory of its
    /// own) and waits (bounded) until it answers PING. A port found free may be taken before
    /// Redis binds it: then it is started again on another. Fails the test if `redis-server` is
    /// not installed.
    pub fn start() -> Redis {
        let program = find_program();
        let dir = TempDir::new("redis");
        for attempt in 1..=ATTEMPTS {
            let port = free_port();
            match launch(&program, &dir, port) {
                Ok(process) => {
                    return Redis {
                        process: Some(process),
                        dir,
                        program,
                        port,
                        paused: false,
                    };
                }
                Err(out) if port_taken(&out) && attempt < ATTEMPTS => {}
                Err(out) => panic!(
                    "redis-server stopped before it answered PING (attempt {attempt} of \
                     {ATTEMPTS})\n{out}"
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `redis://127.0.0.1:PORT`, for `--chat-bus`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.process
            .as_ref()
            .expect("redis-server was killed and not restarted")
            .pid()
    }

    /// Kills it (SIGKILL: no goodbye to its clients but the kernel's) and waits (bounded) until
    /// it has exited, so its port is closed when this returns. Returns what it printed.
    pub fn kill(&mut self) -> Output {
        let mut process = self
            .process
            .take()
            .expect("redis-server was killed already");
        process.child().kill().expect("SIGKILL redis-server");
        self.paused = false;
        process.wait_exit(EXIT_TIMEOUT)
    }

    /// Starts it again on the same port, after [`kill`](Redis::kill), and waits (bounded) until
    /// it answers PING. While the port is still being freed (or someone else holds it for a
    /// moment) the start is tried again, for up to [`STARTUP_TIMEOUT`].
    pub fn restart(&mut self) {
        assert!(self.process.is_none(), "restart: kill it first");
        let mut last = None;
        let started = poll_until(STARTUP_TIMEOUT, Duration::from_millis(50), || match launch(
            &self.program,
            &self.dir,
            self.port,
        ) {
            Ok(process) => Some(Ok(process)),
            Err(out) if port_taken(&out) => {
                last = Some(out);
                None
            }
            Err(out) => Some(Err(out)),
        });
        match started {
            Some(Ok(process)) => self.process = Some(process),
            Some(Err(out)) => panic!("redis-server did not start again\n{out}"),
            None => panic!(
                "redis-server could not have port {} back within {STARTUP_TIMEOUT:?}\n{}",
                self.port,
                last.map_or_else(String::new, |out| out.to_string())
            ),
        }
    }

    /// Stops it with SIGSTOP: its sockets stay open and connecting still works (the kernel
    /// queues), but nothing is answered. Returns once a PING goes unanswered (bounded).
    pub fn pause(&mut self) {
        let pid = self.pid();
        signal(pid, "STOP");
        self.paused = true;
        let stuck = poll_until(STARTUP_TIMEOUT, POLL_EVERY, || {
            (!answers_ping(self.port, UNANSWERED)).then_some(())
        });
        assert!(
            stuck.is_some(),
            "redis-server (pid {pid}) still answers PING after SIGSTOP"
        );
    }

    /// Continues it with SIGCONT, and waits (bounded) until it answers PING again.
    pub fn resume(&mut self) {
        let pid = self.pid();
        signal(pid, "CONT");
        self.paused = false;
        let port = self.port;
        let back = poll_until(STARTUP_TIMEOUT, POLL_EVERY, || {
            answers_ping(port, REDIS_IO).then_some(())
        });
        assert!(
            back.is_some(),
            "redis-server (pid {pid}) does not answer PING after SIGCONT"
        );
    }

    /// Sends one command (its arguments as bulk strings) on a connection of its own, and returns
    /// the reply.
    pub fn command(&self, args: &[&[u8]]) -> Reply {
        let mut stream = open(self.port).unwrap_or_else(|e| panic!("connect to Redis: {e}"));
        let mut packed = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            packed.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            packed.extend_from_slice(arg);
            packed.extend_from_slice(b"\r\n");
        }
        stream
            .write_all(&packed)
            .unwrap_or_else(|e| panic!("send a command to Redis: {e}"));
        read_reply(&mut BufReader::new(stream))
            .unwrap_or_else(|e| panic!("read Redis's reply to {:?}: {e}", show(args)))
    }

    /// `PUBLISH channel payload`, the payload any bytes at all (for forging messages): returns
    /// how many subscribers Redis handed it to.
    pub fn publish_raw(&self, channel: &str, payload: &[u8]) -> i64 {
        match self.command(&[b"PUBLISH", channel.as_bytes(), payload]) {
            Reply::Integer(n) => n,
            other => panic!("PUBLISH {channel}: unexpected reply {other:?}"),
        }
    }

    /// How many connections are subscribed to `channel` (`PUBSUB NUMSUB`).
    pub fn subscribers(&self, channel: &str) -> i64 {
        match self.command(&[b"PUBSUB", b"NUMSUB", channel.as_bytes()]) {
            Reply::Array(items) => match items.as_slice() {
                [_, Reply::Integer(n)] => *n,
                _ => panic!("PUBSUB NUMSUB {channel}: unexpected reply {items:?}"),
            },
            other => panic!("PUBSUB NUMSUB {channel}: unexpected reply {other:?}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(process) = self.process.as_mut()
            && self.paused
        {
            // Continued first, so that nothing of it is left stopped whatever happens next
            // (SIGKILL, which dropping the process sends, ends a stopped process too).
            let _ = Command::new("kill")
                .args(["-CONT", &process.pid().to_string()])
                .status();
        }
        // Killed (and its output shown if the test failed) before `dir` is removed.
        self.process = None;
    }
}

/// The program, or a failure saying what installs it.
fn find_program() -> PathBuf {
    [PROGRAM, "redis-server"]
        .iter()
        .find(|program| super::installed(program))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not installed (looked for {PROGRAM} and on PATH): the chat bus \
                 tests run the servers on a real Redis; bash .ci/run installs it (Debian's \
                 redis-server)"
            )
        })
}

/// Spawns `redis-server` on `port` and waits (bounded) until it answers PING, as itself:
/// `Err` with its output if it exited first (a port taken, say).
fn launch(program: &Path, dir: &TempDir, port: u16) -> Result<Captured, Output> {
    let port_text = port.to_string();
    let dir_text = dir.path().to_string_lossy().into_owned();
    let args = [
        "--port",
        port_text.as_str(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir_text.as_str(),
    ];
    let shown = program.to_string_lossy();
    let (mut process, lines) =
        Captured::spawn_program(program.as_os_str(), &args, render_command(&shown, &args));
    drop(lines);
    let pid = process.pid();
    let ready = poll_until(STARTUP_TIMEOUT, POLL_EVERY, || {
        if process.child().try_wait().expect("try_wait").is_some() {
            return Some(false);
        }
        is_redis(port, pid).then_some(true)
    });
    match ready {
        Some(true) => Ok(process),
        Some(false) => Err(process.wait_exit(EXIT_TIMEOUT)),
        None => panic!(
            "redis-server did not answer PING on port {port} within {STARTUP_TIMEOUT:?}\n\
             command: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            process.command(),
            process.stdout_so_far(),
            process.stderr_so_far()
        ),
    }
}

/// Whether it failed to start because its port was taken.
fn port_taken(out: &Output) -> bool {
    out.stdout.contains(PORT_TAKEN) || out.stderr.contains(PORT_TAKEN)
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A connection to the Redis on `port`, with bounded timeouts.
fn open(port: u16) -> io::Result<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), REDIS_IO)?;
    stream.set_read_timeout(Some(REDIS_IO))?;
    stream.set_write_timeout(Some(REDIS_IO))?;
    Ok(stream)
}

/// Whether what listens on `port` answers `PING` with `+PONG` within `within`.
fn answers_ping(port: u16, within: Duration) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut stream = open(port)?;
        stream.set_read_timeout(Some(within))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}

/// Whether what listens on `port` is the Redis whose pid is `pid`: it answers PING, and INFO
/// names that process (a Redis another test started on a port it found free at the same time
/// answers PING too).
fn is_redis(port: u16, pid: u32) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut stream = open(port)?;
        stream.write_all(b"PING\r\nINFO server\r\n")?;
        let mut reader = BufReader::new(stream);
        if read_reply(&mut reader)? != Reply::Status("PONG".into()) {
            return Ok(false);
        }
        let Reply::Bulk(Some(info)) = read_reply(&mut reader)? else {
            return Ok(false);
        };
        let info = String::from_utf8_lossy(&info);
        Ok(info
            .lines()
            .any(|l| l.trim_end() == format!("process_id:{pid}")))
    };
    attempt().unwrap_or(false)
}

/// Reads one RESP2 reply.
fn read_reply(reader: &mut impl BufRead) -> io::Result<Reply> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(bad(format!(
            "a reply line without CRLF: {:?}",
            String::from_utf8_lossy(&line)
        )));
    };
    let (kind, rest) = line
        .split_first()
        .ok_or_else(|| bad("an empty reply line".into()))?;
    let text = String::from_utf8_lossy(rest).into_owned();
    let number = || -> io::Result<i64> {
        text.parse()
            .map_err(|_| bad(format!("not a number: {text:?}")))
    };
    Ok(match kind {
        b'+' => Reply::Status(text.clone()),
        b'-' => Reply::Error(text.clone()),
        b':' => Reply::Integer(number()?),
        b'$' => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(len) => {
                let mut data = vec![0u8; len + 2];
                reader.read_exact(&mut data)?;
                data.truncate(len);
                Reply::Bulk(Some(data))
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => Reply::Array(Vec::new()),
            Ok(n) => Reply::Array(
                (0..n)
                    .map(|_| read_reply(reader))
                    .collect::<io::Result<_>>()?,
            ),
        },
        other => return Err(bad(format!("unknown reply type {:?}", char::from(*other)))),
    })
}

/// A command's arguments, readable.
fn show(args: &[&[u8]]) -> Vec<String> {
    args.iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}
