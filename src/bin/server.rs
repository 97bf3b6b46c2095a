//! `server`: listen, greet each client, print every message received as `PEER MESSAGE`.

mod common;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Parser;
use plugboard::{DEFAULT_GREETING, Error, Server, ServerOptions};
use tracing::info;

use common::{FramingArg, LogArgs};

/// A TCP message server: greets each client and prints each message it sends.
///
/// Every message goes to stdout as one line `PEER MESSAGE`; the log goes to stderr.
/// SIGINT or SIGTERM stops it cleanly; a second one exits at once.
#[derive(Parser, Debug)]
#[command(name = "server", version)]
struct Cli {
    /// Address to listen on: IPv4, IPv6 or a host name.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (logged as `listening on ADDR`).
    #[arg(long, default_value_t = 8887)]
    port: u16,
    /// Line sent to each client on connect; `{peer}` becomes its address; '' sends none.
    #[arg(long, default_value = DEFAULT_GREETING)]
    greeting: String,
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
        Ok(code) => code,
        Err(error) => common::fail(&error),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let options = ServerOptions::default()
        .greeting(Some(cli.greeting))
        .framing(cli.framing.into());
    let server = Server::bind(&cli.host, cli.port, options, Arc::new(plugboard::stdout()))?;
    let addr = server.local_addr();
    install_signal_handler(&server, addr)?;
    info!("listening on {addr}");

    let result = server.join();
    let flushed = io::stdout().flush();
    match result {
        Ok(summary) => {
            info!(
                "stopped: {} connections, {} messages, {} bytes",
                summary.connections, summary.messages, summary.bytes
            );
            match flushed {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                    Err(Error::Output(e)).context("stdout")
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        // Whoever read our output has gone (`server | head`): nothing left to do, not a failure.
        Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            info!("stopped: stdout was closed");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => Err(error.into()),
    }
}

/// First SIGINT/SIGTERM (Ctrl-C or console close on Windows): stop cleanly. Second: exit now.
fn install_signal_handler(server: &Server, addr: SocketAddr) -> anyhow::Result<()> {
    let stopper = server.stopper();
    let signalled = AtomicBool::new(false);
    ctrlc::set_handler(move || {
        if signalled.swap(true, Ordering::SeqCst) {
            eprintln!("error: second signal: server on {addr} exiting at once");
            std::process::exit(1);
        }
        info!("signal received: stopping (again to exit at once)");
        stopper.stop();
    })
    .context("cannot install the signal handler")
}
