//! `client`: connect, print what the server sends, send numbered messages at an interval.

mod common;

use std::io::{self, BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::builder::TypedValueParser;
use clap::{CommandFactory, Parser};
use plugboard::{Client, Framing, LoadOptions, Progress, Receiver, run_load_across};
use tracing::{debug, info};

use common::{FramingArg, LogArgs};
use plugboard::unstable::plural;

/// A TCP message client: prints every line the server sends and sends `--count` messages.
///
/// What the server sends goes to stdout; the log goes to stderr. After the last message the client
/// half-closes and waits (at most --linger) for the server to close: a plugboard server closes
/// cleanly only once it has printed everything, so exit status 0 means every message was printed.
#[derive(Parser, Debug)]
#[command(name = "client", version, after_long_help = EXAMPLES)]
struct Cli {
    /// Server address: IPv4, IPv6 or a host name.
    #[arg(help_heading = "Connection", long, default_value = "127.0.0.1", value_parser = common::host)]
    host: String,
    /// `HOST [PORT]`, as ncat takes them: the same as --host and --port.
    #[arg(value_name = "HOST [PORT]", num_args = 0..=2, conflicts_with_all = ["host", "port", "server"],
          help_heading = "Connection")]
    address: Vec<String>,
    /// Server port.
    #[arg(help_heading = "Connection", short, long, default_value_t = 8887, value_parser = common::port_to_connect)]
    port: u16,
    /// How many messages to send.
    #[arg(
        help_heading = "Messages",
        long,
        default_value_t = 10,
        value_name = "N"
    )]
    count: u64,
    /// Pause between messages (`2s`, `500ms`, `0`) [default: 2s; in load mode 0, as fast as
    /// possible].
    #[arg(help_heading = "Messages", long, value_parser = common::duration, value_name = "DURATION")]
    interval: Option<Duration>,
    /// Message text; `{i}` becomes the message's number, counting from 0; in load mode `{conn}`
    /// becomes the connection's.
    #[arg(
        help_heading = "Messages",
        long,
        default_value = "hello world {i}",
        value_name = "TEMPLATE"
    )]
    message: String,
    /// How long to wait for the connection (`0`: the operating system's limit).
    #[arg(help_heading = "Connection", long, default_value = "5s", value_parser = common::duration, value_name = "DURATION")]
    connect_timeout: Duration,
    /// After the last message, how long to wait for the server to confirm delivery by closing
    /// (with --rtt: also how long to wait for each echo); no close in time means exit status 1.
    #[arg(help_heading = "Messages", long, default_value = "2s", value_parser = positive_duration, value_name = "DURATION")]
    linger: Duration,
    /// Give up (exit status 1) when the server takes nothing of what is being sent for this long.
    #[arg(help_heading = "Messages", long, default_value = "10s", value_parser = positive_duration, value_name = "DURATION")]
    send_timeout: Duration,
    /// How messages are delimited.
    #[arg(help_heading = "Connection", long, value_enum, default_value_t)]
    framing: FramingArg,
    /// Send each line typed or piped on standard input instead of numbered messages; at its end,
    /// half-close and wait (at most --linger) for the server to close.
    #[arg(help_heading = "Messages", long, conflicts_with_all = ["count", "interval", "message", "connections", "rtt", "chat", "json", "size"])]
    stdin: bool,
    /// Load mode: this many connections in parallel (1 to 100000), each sending --count
    /// messages; a summary (messages/s, MB/s, errors) goes to stderr. Nothing received is
    /// printed.
    #[arg(help_heading = "Load mode", long, value_name = "N", value_parser = clap::value_parser!(u64).map(|n| usize::try_from(n).unwrap_or(usize::MAX)))]
    connections: Option<usize>,
    /// Load mode: pad each message to this many bytes on the wire (counting the newline), at
    /// most 16 MiB.
    #[arg(help_heading = "Load mode", long, value_name = "BYTES", value_parser = common::bytes)]
    size: Option<usize>,
    /// Load mode, against an echo server: send one message, wait for its echo, repeat; the
    /// summary adds latency percentiles.
    #[arg(help_heading = "Load mode", long)]
    rtt: bool,
    /// Load mode, against a chat server: every connection joins the room, then sends --count
    /// messages and counts those of the others; the summary adds how many were delivered and
    /// the delivery latency percentiles. A message missing is an error.
    #[arg(help_heading = "Load mode", long, conflicts_with = "rtt")]
    chat: bool,
    /// Load mode: each connection sends for this long (`30s`, `5m`) instead of --count
    /// messages.
    #[arg(help_heading = "Load mode", long, value_parser = positive_duration, value_name = "DURATION",
          conflicts_with_all = ["count", "chat", "stdin"])]
    duration: Option<Duration>,
    /// Load mode: messages per second per connection, on a fixed schedule whatever the server
    /// does (open loop); with --rtt and --chat each latency counts from when its message was
    /// due, so a stalled server shows in the percentiles.
    #[arg(help_heading = "Load mode", long, value_name = "N", value_parser = rate,
          conflicts_with_all = ["interval", "stdin"])]
    rate: Option<f64>,
    /// Load mode: open this many connections a second instead of all at once; the summary adds
    /// connect latency percentiles.
    #[arg(help_heading = "Load mode", long, value_name = "N", value_parser = rate,
          conflicts_with_all = ["chat", "stdin"])]
    connect_rate: Option<f64>,
    /// Load mode: also print the summary as one line of JSON on stdout.
    #[arg(help_heading = "Load mode", long)]
    json: bool,
    /// Load mode across several servers: spread the connections over these (repeatable), in
    /// turn, instead of --host/--port; with --chat, servers sharing a room (server --chat-bus).
    #[arg(help_heading = "Load mode", long, value_name = "HOST:PORT", value_parser = host_port,
          conflicts_with_all = ["host", "port", "stdin"])]
    server: Vec<(String, u16)>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish) or the man page
    /// (man) to stdout, and exit.
    #[arg(long, value_enum, value_name = "WHAT", hide_short_help = true)]
    generate: Option<common::Generate>,
    #[command(flatten)]
    log: LogArgs,
}

/// TLS flags: any of them turns TLS on.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "TLS")]
struct TlsArgs {
    /// Connect with TLS, verifying the server against the system's root certificates.
    #[arg(long)]
    tls: bool,
    /// Trust these root certificates (PEM) instead of the system's; implies --tls.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Accept exactly the server certificate with this SHA-256 fingerprint
    /// (`sha256:` and 64 hex digits, as `server --tls-self-signed` logs it), whatever its name
    /// and dates; implies --tls.
    #[arg(long, value_name = "sha256:HEX", value_parser = fingerprint, conflicts_with = "tls_ca")]
    tls_fingerprint: Option<String>,
    /// The name the server's certificate must be valid for (default: --host); implies --tls.
    #[arg(long, value_name = "NAME", value_parser = server_name)]
    tls_server_name: Option<String>,
    /// Present this certificate chain (PEM) to a server that requires one; implies --tls.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS settings the flags ask for; `None` without any.
    fn settings(&self) -> Result<Option<plugboard::ClientTls>, plugboard::Error> {
        use plugboard::ClientTls;
        let wanted = self.tls
            || self.tls_ca.is_some()
            || self.tls_fingerprint.is_some()
            || self.tls_server_name.is_some()
            || self.tls_cert.is_some();
        if !wanted {
            return Ok(None);
        }
        let mut tls = match (&self.tls_fingerprint, &self.tls_ca) {
            (Some(pin), _) => ClientTls::pinned(pin)?,
            (None, Some(ca)) => ClientTls::trusting_file(ca)?,
            (None, None) => ClientTls::system_roots()?,
        };
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity_files(cert, key)?;
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.server_name(name);
        }
        Ok(Some(tls))
    }
}

/// A `--tls-server-name` that is a host name or an address (an IPv6 one may be in brackets).
fn server_name(text: &str) -> Result<String, String> {
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(bare.to_string())
        .map(|_| text.to_string())
        .map_err(|e| format!("not a host name or an address: {e}"))
}

/// A `--server`: `HOST:PORT`, with an IPv6 address in brackets (`[::1]:8887`).
fn host_port(text: &str) -> Result<(String, u16), String> {
    const EXPECTED: &str = "expected HOST:PORT, such as 127.0.0.1:8887 or [::1]:8887";
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let (host, port) = bracketed.split_once(']').ok_or(EXPECTED)?;
            (host, port.strip_prefix(':').ok_or(EXPECTED)?)
        }
        None => {
            if text.parse::<std::net::Ipv6Addr>().is_ok() {
                return Err(format!(
                    "an IPv6 address goes in brackets, then its port: [{text}]:PORT"
                ));
            }
            let (host, port) = text.rsplit_once(':').ok_or(EXPECTED)?;
            if host.contains(':') {
                return Err(format!("an IPv6 address goes in brackets: [{host}]:{port}"));
            }
            (host, port)
        }
    };
    if host.is_empty() {
        return Err(EXPECTED.to_string());
    }
    let port = common::port_to_connect(port).map_err(|e| format!("{port:?}: {e}"))?;
    Ok((host.to_string(), port))
}

/// A `--rate`: messages per second, more than 0 (`0.5` is one every two seconds).
fn rate(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|r| (LoadOptions::MIN_RATE..=LoadOptions::MAX_RATE).contains(r))
        .ok_or_else(|| "must be a number per second from 0.001 to 1000000000".to_string())
}

/// A `--tls-fingerprint` that is one.
fn fingerprint(text: &str) -> Result<String, String> {
    plugboard::ClientTls::pinned(text)
        .map(|_| text.to_string())
        .map_err(|e| match e {
            plugboard::Error::Tls { problem, .. } => problem,
            e => e.to_string(),
        })
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Err(problem) = common::positionals(&cli.address, false, &mut cli.host, &mut cli.port) {
        usage_error(clap::error::ErrorKind::ValueValidation, problem);
    }
    if let Some(what) = cli.generate {
        return common::generate(Cli::command(), what);
    }
    let log = common::init_logging(&cli.log);
    match run(cli) {
        Ok(()) => {
            log.finish(common::LOG_FLUSH);
            ExitCode::SUCCESS
        }
        Err(error) => common::fail(&log, &error),
    }
}

/// The end of `--help`.
const EXAMPLES: &str = "\
Examples:
  client --port 8887                  the demo: 10 messages, 2 s apart
  client --stdin < lines.txt          send a file; exit 0 once all was printed
  client --tls-fingerprint sha256:HEX --count 1 --message hello
  client --connections 100 --count 10000 --size 64      throughput
  client --rtt --count 20000 --json   round trips, against server --mode echo
  client --chat --connections 50 --server 10.0.0.1:8887 --server 10.0.0.2:8887";

/// The pause between the demo's messages, as in the original.
const DEMO_INTERVAL: Duration = Duration::from_secs(2);

/// What the main thread waits for.
enum Event {
    /// The reader is done: the server closed its side, or the connection failed.
    ServerEnded(Ending),
    /// Standard input ended (`Ok`) or a line from it could not be read or sent.
    StdinEnded(anyhow::Result<()>),
}

/// How the server's side of the connection ended, as the reader saw it.
struct Ending {
    /// The connection failed (a reset: the server refused or cut us off), or our stdout did.
    failure: Option<anyhow::Error>,
    /// The last line received, if it is a server's `error: ` line: the reason for a failure or
    /// an early close (after a confirming close, just text).
    reason: Option<String>,
}

impl Ending {
    /// The failure, described by the server's reason when it gave one.
    fn into_error(self, server: SocketAddr) -> anyhow::Error {
        match (self.reason, self.failure) {
            (Some(reason), _) => plugboard::Error::Ended {
                addr: server,
                reason,
            }
            .into(),
            (None, Some(failure)) => failure,
            (None, None) => anyhow!("{server} closed the connection"),
        }
    }

    /// For a server that closed its side before ours: its reason if it gave one (a plugboard
    /// server on Windows says why it stops, then sends FIN), else that it closed early.
    fn into_early_error(self, server: SocketAddr) -> anyhow::Error {
        match self.reason {
            Some(reason) => plugboard::Error::Ended {
                addr: server,
                reason,
            }
            .into(),
            None => plugboard::Error::ClosedEarly { addr: server }.into(),
        }
    }
}

/// Why sending stopped early.
enum Stopped {
    /// The server's side failed (the reader saw a reset).
    ServerEnded(Ending),
    /// A send failed.
    Send(anyhow::Error),
}

/// Exits with a usage error (status 2), as clap reports its own.
fn usage_error(kind: clap::error::ErrorKind, message: impl std::fmt::Display) -> ! {
    Cli::command().error(kind, message).exit()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.connections.is_some()
        || cli.size.is_some()
        || cli.rtt
        || cli.chat
        || cli.json
        || cli.duration.is_some()
        || cli.rate.is_some()
        || cli.connect_rate.is_some()
        || !cli.server.is_empty()
    {
        return load(&cli);
    }
    if matches!(cli.framing, FramingArg::Line) && cli.message.contains('\n') {
        usage_error(
            clap::error::ErrorKind::ValueValidation,
            "--message can't hold a newline in line framing: it would be two messages",
        );
    }
    let framing: Framing = cli.framing.into();
    let client = match cli.tls.settings()? {
        Some(tls) => Client::connect_tls(&cli.host, cli.port, cli.connect_timeout, &tls)?,
        None => Client::connect(&cli.host, cli.port, cli.connect_timeout)?,
    };
    let mut client = client.with_framing(framing);
    client.set_send_timeout(Some(cli.send_timeout))?;
    let server = client.peer_addr();
    info!("connected to {server}");

    let (events_tx, events) = mpsc::channel();
    let receiver = client.receiver();
    {
        let events_tx = events_tx.clone();
        // Never joined: it may be stuck writing to a stdout nobody reads, and then it ends with
        // the process; what it found out comes over the channel.
        thread::Builder::new()
            .name("reader".into())
            .spawn(move || {
                let ending = print_received(receiver, framing, server);
                let _ = events_tx.send(Event::ServerEnded(ending));
            })
            .context("cannot start the reader thread")?;
    }

    // A server that closes its side early has only stopped sending (as `ncat -l < /dev/null`
    // does): that ends what we read, not what we send. A plugboard server never does: it closes
    // cleanly only after reading our end of stream, and otherwise resets the connection.
    let mut closed_early = None;
    let sent = if cli.stdin {
        send_stdin(&client, &events, events_tx, &mut closed_early)
    } else {
        send_numbered(&client, &cli, &events, &mut closed_early)
    };
    let ending = match sent {
        Ok(()) => {
            // Asked before our own close: after it, the server's close is the confirmation.
            let early = closed_early.is_some() || client.closed_early();
            if let Err(e) = client.finish() {
                // The connection has failed; the reader will say how.
                debug!("half-close: {e:#}");
            }
            let printed = PRINTED.load(Ordering::Acquire);
            // The reader has ended already if the server closed early.
            let ending = closed_early.or_else(|| wait_for_end(&events, cli.linger));
            match ending {
                Some(ending) if ending.failure.is_some() => ending,
                Some(ending) if early => return Err(ending.into_early_error(server)),
                None if early => {
                    return Err(plugboard::Error::ClosedEarly { addr: server }.into());
                }
                Some(ending) => ending,
                None => {
                    client.close();
                    // Stuck writing what came before the close, if any: not if it printed on
                    // meanwhile (a chat room still talking), where the close just didn't come.
                    if PRINTING.load(Ordering::Acquire)
                        && PRINTED.load(Ordering::Acquire) == printed
                    {
                        bail!(
                            "cannot write to stdout: blocked for {} or more, so {server}'s confirmation could not be read",
                            humantime::format_duration(cli.linger)
                        );
                    }
                    return Err(plugboard::Error::Unconfirmed {
                        addr: server,
                        waited: cli.linger,
                    }
                    .into());
                }
            }
        }
        Err(Stopped::ServerEnded(ending)) => ending,
        // Nothing more to hear: the reader has ended, or the server takes nothing at all.
        Err(Stopped::Send(error))
            if closed_early.is_some()
                || matches!(
                    error.downcast_ref(),
                    Some(plugboard::Error::SendTimeout { .. })
                ) =>
        {
            // A server that said why before it closed early: that, not the failed send.
            return Err(match closed_early {
                Some(early) if early.reason.is_some() => early.into_early_error(server),
                _ => error,
            });
        }
        Err(Stopped::Send(error)) => {
            // The server most likely refused or cut us off: its reason, if it sent one, is on
            // its way to the reader, which sees the reset right after.
            match wait_for_end(&events, cli.linger) {
                Some(ending) if ending.failure.is_some() && ending.reason.is_some() => ending,
                _ => return Err(error),
            }
        }
    };
    match ending.failure {
        None => Ok(()),
        Some(_) => Err(ending.into_error(server)),
    }
}

/// Waits at most `timeout` for the reader to end.
fn wait_for_end(events: &mpsc::Receiver<Event>, timeout: Duration) -> Option<Ending> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::ServerEnded(ending)) => return Some(ending),
            Ok(Event::StdinEnded(_)) => {}
            Err(_) => return None,
        }
    }
}

/// Takes the news that the server's side ended while sending: a clean close (it stopped
/// sending) is noted and sending goes on; a failure stops it.
fn server_ended(ending: Ending, closed_early: &mut Option<Ending>) -> Result<(), Stopped> {
    if ending.failure.is_some() {
        return Err(Stopped::ServerEnded(ending));
    }
    *closed_early = Some(ending);
    Ok(())
}

/// Sends `--count` numbered messages `--interval` apart.
fn send_numbered(
    client: &Client,
    cli: &Cli,
    events: &mpsc::Receiver<Event>,
    closed_early: &mut Option<Ending>,
) -> Result<(), Stopped> {
    let interval = cli.interval.unwrap_or(DEMO_INTERVAL);
    for i in 0..cli.count {
        if i > 0 {
            let next = Instant::now() + interval;
            loop {
                let left = next.saturating_duration_since(Instant::now());
                match events.recv_timeout(left) {
                    Ok(Event::ServerEnded(ending)) => server_ended(ending, closed_early)?,
                    Ok(Event::StdinEnded(_)) | Err(RecvTimeoutError::Disconnected) => {}
                    Err(RecvTimeoutError::Timeout) => break,
                }
                if left.is_zero() {
                    break;
                }
            }
        }
        let message = cli.message.replace("{i}", &i.to_string());
        client.send(&message).map_err(|e| Stopped::Send(e.into()))?;
        info!("sent {message:?}");
    }
    Ok(())
}

/// Sends each line of standard input as it is read, until it ends or sending fails.
fn send_stdin(
    client: &Client,
    events: &mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
    closed_early: &mut Option<Ending>,
) -> Result<(), Stopped> {
    let sender = client.clone();
    // Not joined: if the server fails first, this thread may be blocked reading a terminal,
    // and it ends with the process.
    let started = thread::Builder::new().name("stdin".into()).spawn(move || {
        let result = forward_stdin(&sender);
        let _ = events_tx.send(Event::StdinEnded(result));
    });
    if let Err(e) = started {
        return Err(Stopped::Send(
            anyhow::Error::new(e).context("cannot start the stdin thread"),
        ));
    }
    loop {
        match events.recv() {
            Ok(Event::StdinEnded(Ok(()))) => return Ok(()),
            Ok(Event::StdinEnded(Err(e))) => return Err(Stopped::Send(e)),
            Ok(Event::ServerEnded(ending)) => server_ended(ending, closed_early)?,
            Err(_) => return Err(Stopped::Send(anyhow!("the stdin thread ended"))),
        }
    }
}

fn forward_stdin(client: &Client) -> anyhow::Result<()> {
    let stdin = io::stdin();
    let mut stdin = stdin.lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        if stdin
            .read_until(b'\n', &mut line)
            .context("cannot read standard input")?
            == 0
        {
            return Ok(());
        }
        // In line framing the client adds the newline; in raw framing the bytes go as read.
        if client.framing() == Framing::Line && line.last() == Some(&b'\n') {
            line.pop();
        }
        client.send_bytes(&line)?;
        debug!("sent {} bytes", line.len());
    }
}

/// Set while the reader writes to stdout: if that blocks, it can't read on.
static PRINTING: AtomicBool = AtomicBool::new(false);
/// Messages the reader has written to stdout so far.
static PRINTED: AtomicU64 = AtomicU64::new(0);

/// Prints every message as it arrives: a line per message, or raw chunks as they are. Says how
/// the server's side ended, with its reason if the last line was an `error: ` line.
fn print_received(receiver: Receiver, framing: Framing, server: SocketAddr) -> Ending {
    let stdout = io::stdout();
    let mut last: Option<String> = None;
    let mut failure = None;
    for message in receiver {
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                failure = Some(e.into());
                break;
            }
        };
        PRINTING.store(true, Ordering::Release);
        let mut out = stdout.lock();
        let written = match framing {
            Framing::Line => writeln!(out, "{message}"),
            Framing::Raw => out.write_all(message.as_bytes()),
        };
        let written = written.and_then(|()| out.flush());
        drop(out);
        PRINTING.store(false, Ordering::Release);
        PRINTED.fetch_add(1, Ordering::AcqRel);
        match written {
            Ok(()) => {}
            // Nobody reads our output any more; keep draining the connection quietly.
            Err(e) if plugboard::unstable::reader_gone(&e) => {}
            Err(e) => {
                failure = Some(
                    anyhow::Error::new(e)
                        .context(format!("cannot write to stdout what {server} sent")),
                );
                break;
            }
        }
        last = Some(message);
    }
    // A reason only explains a failure, or a close before ours: after a confirming close an
    // `error: ` line is just text (an echo server sending back what we sent, say).
    let reason = last.filter(|line| line.starts_with("error: "));
    Ending { failure, reason }
}

/// Load mode: many connections, a summary at the end.
fn load(cli: &Cli) -> anyhow::Result<()> {
    let options = LoadOptions {
        connections: cli.connections.unwrap_or(1),
        count: cli.count,
        duration: cli.duration,
        rate: cli.rate,
        connect_rate: cli.connect_rate,
        interval: cli.interval.unwrap_or(Duration::ZERO),
        message: cli.message.clone(),
        size: cli.size.unwrap_or(0),
        framing: cli.framing.into(),
        rtt: cli.rtt,
        chat: cli.chat,
        connect_timeout: cli.connect_timeout,
        linger: cli.linger,
        send_timeout: cli.send_timeout,
        tls: None,
    };
    if let Err(error) = options.validate() {
        common::invalid_options(Cli::command(), &error);
    }
    let options = LoadOptions {
        tls: cli.tls.settings()?,
        ..options
    };
    if let Err(error) = options.validate() {
        common::invalid_options(Cli::command(), &error);
    }
    plugboard::raise_fd_limit().ok();
    let progress = Arc::new(Progress::default());
    // Dropped when the load is done: wakes the progress line at once.
    let (done, finished) = mpsc::channel::<()>();
    let total = match options.duration {
        Some(duration) => Total::Time(duration),
        None => Total::Messages((options.connections as u64).saturating_mul(options.count)),
    };
    let ticker = (io::stderr().is_terminal() && !cli.log.is_quiet()).then(|| {
        let progress = Arc::clone(&progress);
        thread::spawn(move || show_progress(&progress, total, &finished))
    });
    let servers: Vec<(&str, u16)> = if cli.server.is_empty() {
        vec![(cli.host.as_str(), cli.port)]
    } else {
        cli.server.iter().map(|(h, p)| (h.as_str(), *p)).collect()
    };
    let report = run_load_across(&servers, &options, &progress);
    drop(done);
    if let Some(ticker) = ticker {
        let _ = ticker.join();
    }
    let report = report?;
    info!("{report}");
    if cli.json {
        // A closed stdout is no reason to panic: the summary is in the log too.
        let _ = writeln!(io::stdout(), "{}", report.to_json());
    }
    if let Some(error) = report.first_error {
        bail!(
            "{} of {} failed; first: {:#}",
            report.errors,
            plural(report.connections as u64, "connection"),
            anyhow::Error::new(error)
        );
    }
    Ok(())
}

/// How much a load run will send: messages in all, or for how long.
#[derive(Clone, Copy)]
enum Total {
    Messages(u64),
    Time(Duration),
}

/// Rewrites one progress line on stderr every half second (messages sent, of how many, the rate,
/// and the time left) until `finished` says the load is done, at once.
fn show_progress(progress: &Progress, total: Total, finished: &mpsc::Receiver<()>) {
    let started = Instant::now();
    while let Err(mpsc::RecvTimeoutError::Timeout) =
        finished.recv_timeout(Duration::from_millis(500))
    {
        let sent = progress.messages();
        let elapsed = started.elapsed();
        let rate = sent as f64 / elapsed.as_secs_f64();
        let (of, left) = match total {
            Total::Messages(total) if rate > 0.0 => (
                format!(" of {total}"),
                Duration::try_from_secs_f64(total.saturating_sub(sent) as f64 / rate)
                    .unwrap_or(Duration::MAX),
            ),
            Total::Messages(total) => (format!(" of {total}"), Duration::ZERO),
            Total::Time(duration) => (String::new(), duration.saturating_sub(elapsed)),
        };
        let done = matches!(total, Total::Messages(total) if sent >= total);
        // Whole seconds, rounded up: `0s left` only when nothing is.
        let left = Duration::from_secs(
            left.as_secs()
                .saturating_add(u64::from(left.subsec_nanos() > 0)),
        );
        let left = if done {
            "waiting for the server to confirm".to_string()
        } else {
            format!("{} left", humantime::format_duration(left))
        };
        let _ = write!(
            io::stderr(),
            "\r{sent}{of} messages sent, {rate:.0}/s, {left}   "
        );
    }
    let _ = write!(io::stderr(), "\r\x1b[K");
}

/// [`common::duration`], but more than zero.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match common::duration(text)? {
        Duration::ZERO => Err("must be more than 0".to_string()),
        duration => Ok(duration),
    }
}
