//! `client`: connect, print what the server sends, send numbered messages at an interval.

mod common;

use std::io::{self, BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use plugboard::{Client, Framing, LoadOptions, Progress, Receiver, run_load};
use tracing::{debug, info, warn};

use common::{FramingArg, LogArgs};
use humantime::parse_duration;

/// A TCP message client: prints every line the server sends and sends `--count` messages.
///
/// What the server sends goes to stdout; the log goes to stderr. After the last message the client
/// half-closes and waits (at most --linger) for the server to close.
#[derive(Parser, Debug)]
#[command(name = "client", version)]
struct Cli {
    /// Server address: IPv4, IPv6 or a host name.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Server port.
    #[arg(long, default_value_t = 8887)]
    port: u16,
    /// How many messages to send.
    #[arg(long, default_value_t = 10, value_name = "N")]
    count: u64,
    /// Pause between messages (`2s`, `500ms`, `0`) [default: 2s; in load mode 0, as fast as
    /// possible].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    interval: Option<Duration>,
    /// Message text; `{i}` becomes the message's number, counting from 0.
    #[arg(long, default_value = "hello world {i}", value_name = "TEMPLATE")]
    message: String,
    /// How long to wait for the connection (`0`: the operating system's limit).
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,
    /// After the last message, how long to wait for the server to close before closing anyway
    /// (with --rtt: how long to wait for each echo).
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    linger: Duration,
    /// How messages are delimited.
    #[arg(long, value_enum, default_value_t)]
    framing: FramingArg,
    /// Send each line typed or piped on standard input instead of numbered messages; at its end,
    /// half-close and wait (at most --linger) for the server to close.
    #[arg(long, conflicts_with_all = ["count", "interval", "message", "connections", "rtt", "json", "size"])]
    stdin: bool,
    /// Load mode: this many connections in parallel, each sending --count messages; a summary
    /// (messages/s, MB/s, errors) goes to stderr. Nothing received is printed.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..100_000))]
    connections: Option<u64>,
    /// Load mode: pad each message to this many bytes on the wire (counting the newline).
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Load mode, against an echo server: send one message, wait for its echo, repeat; the
    /// summary adds latency percentiles.
    #[arg(long)]
    rtt: bool,
    /// Load mode: also print the summary as one line of JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::init_logging(&cli.log);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => common::fail(&error),
    }
}

/// The pause between the demo's messages, as in the original.
const DEMO_INTERVAL: Duration = Duration::from_secs(2);

/// What the main thread waits for.
enum Event {
    /// The reader saw the server close (or the connection fail).
    ServerClosed,
    /// Standard input ended (`Ok`) or a line from it could not be sent.
    StdinEnded(anyhow::Result<()>),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.connections.is_some() || cli.size.is_some() || cli.rtt || cli.json {
        return load(&cli);
    }
    let framing: Framing = cli.framing.into();
    let client = Client::connect(&cli.host, cli.port, cli.connect_timeout)?.framing(framing);
    let server = client.peer_addr();
    info!("connected to {server}");

    let (events_tx, events) = mpsc::channel();
    let receiver = client.receiver();
    let reader = {
        let events_tx = events_tx.clone();
        thread::Builder::new()
            .name("reader".into())
            .spawn(move || {
                let result = print_received(receiver, framing);
                let _ = events_tx.send(Event::ServerClosed);
                result
            })
            .context("cannot start the reader thread")?
    };

    let server_closed_first = if cli.stdin {
        send_stdin(&client, &events, events_tx)?
    } else {
        send_numbered(&client, &cli, &events)?
    };

    if !server_closed_first {
        // A failure here means the server has closed already; the reader says how.
        if let Err(e) = client.finish() {
            debug!("half-close: {e:#}");
        }
        match events.recv_timeout(cli.linger) {
            Ok(Event::ServerClosed) | Err(RecvTimeoutError::Disconnected) => {}
            Ok(Event::StdinEnded(_)) | Err(RecvTimeoutError::Timeout) => {
                warn!(
                    "{server} did not close within {}; closing",
                    humantime::format_duration(cli.linger)
                );
                client.close();
            }
        }
    }
    let Ok((last, failure)) = reader.join() else {
        bail!("the reader thread panicked");
    };
    // The server's own reason comes first: a refused client may also see a reset or a failed
    // send, which says less.
    if let Some(error) = last.filter(|line| line.starts_with("error:")) {
        bail!("{server} closed the connection: {error}");
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    if server_closed_first {
        if !cli.stdin {
            bail!(
                "{server} closed the connection before all {} messages were sent",
                cli.count
            );
        }
        warn!("{server} closed the connection");
    }
    Ok(())
}

/// Sends `--count` numbered messages `--interval` apart; true if the server closed first.
fn send_numbered(
    client: &Client,
    cli: &Cli,
    events: &mpsc::Receiver<Event>,
) -> anyhow::Result<bool> {
    for i in 0..cli.count {
        if i > 0 {
            match events.recv_timeout(cli.interval.unwrap_or(DEMO_INTERVAL)) {
                Err(RecvTimeoutError::Timeout) | Ok(Event::StdinEnded(_)) => {}
                Ok(Event::ServerClosed) | Err(RecvTimeoutError::Disconnected) => return Ok(true),
            }
        }
        let message = cli.message.replace("{i}", &i.to_string());
        if let Err(e) = client.send(&message) {
            // The server has gone; the reader knows why.
            debug!("send: {e:#}");
            return Ok(true);
        }
        info!("sent {message:?}");
    }
    Ok(false)
}

/// Sends each line of standard input as it is read, until it ends or the server closes; true if
/// the server closed first.
fn send_stdin(
    client: &Client,
    events: &mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
) -> anyhow::Result<bool> {
    let sender = client.clone();
    // Not joined: if the server closes first, this thread may be blocked reading a terminal,
    // and it ends with the process.
    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let result = forward_stdin(&sender);
            let _ = events_tx.send(Event::StdinEnded(result));
        })
        .context("cannot start the stdin thread")?;
    match events.recv() {
        Ok(Event::StdinEnded(Ok(()))) => Ok(false),
        Ok(Event::StdinEnded(Err(e))) => {
            // Most likely the server went away mid-send; the reader says how.
            debug!("sending stopped: {e:#}");
            Ok(true)
        }
        Ok(Event::ServerClosed) | Err(_) => Ok(true),
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
        if client.framing_in_use() == Framing::Line && line.last() == Some(&b'\n') {
            line.pop();
        }
        client.send_bytes(&line)?;
        debug!("sent {} bytes", line.len());
    }
}

/// Prints every message as it arrives: a line per message, or raw chunks as they are. Returns
/// the last message, and how the connection failed if it did.
fn print_received(receiver: Receiver, framing: Framing) -> (Option<String>, Option<anyhow::Error>) {
    let stdout = io::stdout();
    let mut last = None;
    for message in receiver {
        let message = match message {
            Ok(message) => message,
            Err(e) => return (last, Some(e.into())),
        };
        let mut out = stdout.lock();
        let written = match framing {
            Framing::Line => writeln!(out, "{message}"),
            Framing::Raw => out.write_all(message.as_bytes()),
        };
        match written.and_then(|()| out.flush()) {
            Ok(()) => {}
            // Nobody reads our output any more; keep draining the connection quietly.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                let failure = anyhow::Error::new(e).context("cannot write to stdout");
                return (last, Some(failure));
            }
        }
        last = Some(message);
    }
    (last, None)
}

/// Load mode: many connections, a summary at the end.
fn load(cli: &Cli) -> anyhow::Result<()> {
    let options = LoadOptions {
        connections: cli.connections.unwrap_or(1) as usize,
        count: cli.count,
        interval: cli.interval.unwrap_or(Duration::ZERO),
        message: cli.message.clone(),
        size: cli.size.unwrap_or(0),
        framing: cli.framing.into(),
        rtt: cli.rtt,
        connect_timeout: cli.connect_timeout,
        linger: cli.linger,
    };
    if options.rtt && options.framing != Framing::Line {
        // Usage error, like clap's own: exit 2.
        eprintln!("error: --rtt needs line framing");
        std::process::exit(2);
    }
    plugboard::raise_fd_limit().ok();
    let progress = Arc::new(Progress::default());
    let done = Arc::new(AtomicBool::new(false));
    let ticker = io::stderr().is_terminal().then(|| {
        let (progress, done) = (Arc::clone(&progress), Arc::clone(&done));
        thread::spawn(move || show_progress(&progress, &done))
    });
    let report = run_load(&cli.host, cli.port, &options, &progress);
    done.store(true, Ordering::Relaxed);
    if let Some(ticker) = ticker {
        let _ = ticker.join();
    }
    let report = report?;
    info!("{report}");
    if cli.json {
        println!("{}", report.to_json());
    }
    if let Some(error) = report.first_error {
        bail!(
            "{} of {} connections failed; first: {error}",
            report.errors,
            report.connections
        );
    }
    Ok(())
}

/// Rewrites one progress line on stderr every half second until `done`.
fn show_progress(progress: &Progress, done: &AtomicBool) {
    let started = Instant::now();
    while !done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(500)); // a display refresh, not synchronisation
        let sent = progress.messages();
        let rate = sent as f64 / started.elapsed().as_secs_f64();
        eprint!("\r{sent} messages sent, {rate:.0}/s   ");
    }
    eprint!("\r\x1b[K");
}
