//! `client`: connect, print what the server sends, send numbered messages at an interval.

mod common;

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use plugboard::{Client, Framing, Receiver};
use tracing::{info, warn};

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
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// Pause between messages (`2s`, `500ms`, `0`).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// Message text; `{i}` becomes the message's number, counting from 0.
    #[arg(long, default_value = "hello world {i}")]
    message: String,
    /// How long to wait for the connection (`0`: the operating system's limit).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// After the last message, how long to wait for the server to close before closing anyway.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    linger: Duration,
    /// How messages are delimited.
    #[arg(long, value_enum, default_value_t)]
    framing: FramingArg,
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let framing: Framing = cli.framing.into();
    let client = Client::connect(&cli.host, cli.port, cli.connect_timeout)?.framing(framing);
    let server = client.peer_addr();
    info!("connected to {server}");

    let (closed_tx, closed) = mpsc::channel();
    let receiver = client.receiver();
    let reader = thread::Builder::new()
        .name("reader".into())
        .spawn(move || {
            let result = print_received(receiver, framing);
            let _ = closed_tx.send(());
            result
        })
        .context("cannot start the reader thread")?;

    let mut server_closed = false;
    for i in 0..cli.count {
        if i > 0 {
            match closed.recv_timeout(cli.interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    server_closed = true;
                    break;
                }
            }
        }
        let message = cli.message.replace("{i}", &i.to_string());
        client.send(&message)?;
        info!("sent {message:?}");
    }

    if !server_closed {
        client.finish()?;
        match closed.recv_timeout(cli.linger) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => {
                warn!(
                    "{server} did not close within {}; closing",
                    humantime::format_duration(cli.linger)
                );
                client.close();
            }
        }
    }
    match reader.join() {
        Ok(result) => result?,
        Err(_) => bail!("the reader thread panicked"),
    }
    if server_closed {
        bail!(
            "{server} closed the connection before all {} messages were sent",
            cli.count
        );
    }
    Ok(())
}

/// Prints every message as it arrives: a line per message, or raw chunks as they are.
fn print_received(receiver: Receiver, framing: Framing) -> anyhow::Result<()> {
    let stdout = io::stdout();
    for message in receiver {
        let message = message?;
        let mut out = stdout.lock();
        let written = match framing {
            Framing::Line => writeln!(out, "{message}"),
            Framing::Raw => out.write_all(message.as_bytes()),
        };
        match written.and_then(|()| out.flush()) {
            Ok(()) => {}
            // Nobody reads our output any more; keep draining the connection quietly.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
    }
    Ok(())
}
