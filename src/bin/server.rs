//! `server`: listen, greet each client, print every message received as `PEER MESSAGE`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{CommandFactory, Parser, ValueEnum};
use plugboard::{
    Access, ChatBus, DEFAULT_GREETING, Error, Mode, Range, Server, ServerOptions, ServerTls,
};
use tracing::{debug, info};

use common::{FramingArg, LogArgs};
use plugboard::unstable::plural;

/// A TCP message server: greets each client and prints each message it sends.
///
/// Every message goes to stdout as one line `PEER MESSAGE`; the log goes to stderr.
/// SIGINT or SIGTERM stops it cleanly; a second one exits at once.
#[derive(Parser, Debug)]
#[command(name = "server", version, after_long_help = EXAMPLES)]
#[command(group(clap::ArgGroup::new("tls_on").args(["tls_cert", "tls_self_signed"])))]
struct Cli {
    /// Address to listen on: IPv4, IPv6 or a host name.
    #[arg(help_heading = "Connection", long, default_value = "127.0.0.1", value_parser = common::host)]
    host: String,
    /// `[HOST] PORT`, as ncat takes them: the same as --host and --port.
    #[arg(value_name = "[HOST] PORT", num_args = 0..=2, conflicts_with_all = ["host", "port"],
          help_heading = "Connection")]
    address: Vec<String>,
    /// Port to listen on; 0 picks a free one (logged as `listening on ADDR`).
    #[arg(help_heading = "Connection", short, long, default_value_t = 8887, value_parser = common::port)]
    port: u16,
    /// Line sent to each client on connect; `{peer}` becomes its address; '' sends none.
    #[arg(help_heading = "Connection", long, default_value = DEFAULT_GREETING)]
    greeting: String,
    /// How messages are delimited.
    #[arg(help_heading = "Connection", long, value_enum, default_value_t)]
    framing: FramingArg,
    /// What to do with each message besides printing it.
    #[arg(help_heading = "Connection", long, value_enum, default_value_t = ModeArg::Log)]
    mode: ModeArg,
    /// A client that takes nothing sent to it for this long (the greeting, echoes, chat lines),
    /// or whose chat queue stays full this long, is disconnected.
    #[arg(help_heading = "Limits", long, default_value = "5s", value_parser = common::duration, value_name = "DURATION")]
    send_timeout: Duration,
    /// Most clients at once; one more is told `error: server full (N clients)` and closed.
    #[arg(help_heading = "Limits", long, default_value_t = 10_000, value_name = "N",
          value_parser = clap::value_parser!(u64).map(|n| usize::try_from(n).unwrap_or(usize::MAX)))]
    max_clients: usize,
    /// Longest line in bytes; a client sending a longer one is told `error: line too long` and closed.
    #[arg(help_heading = "Limits", long, default_value = "64KiB", value_name = "BYTES", value_parser = common::bytes)]
    max_line: usize,
    /// Close a client that completes no message for this long (`30s`, `5m`); 0 = never.
    #[arg(help_heading = "Limits", long, default_value = "0", value_parser = common::duration, value_name = "DURATION")]
    idle_timeout: Duration,
    /// Bytes all clients' buffers may hold together beyond each one's small allowance (larger
    /// reads, long unfinished lines); a client whose unfinished line does not fit is told
    /// `error: server busy (buffers full)` and closed.
    #[arg(help_heading = "Limits", long, default_value = "256MiB", value_name = "BYTES", value_parser = common::bytes)]
    buffer_budget: usize,
    /// Admit only clients in this range (CIDR or address; repeatable). Default: everyone.
    #[arg(help_heading = "Limits", long, value_name = "CIDR")]
    allow: Vec<Range>,
    /// Refuse clients in this range (CIDR or address; repeatable). Deny wins over allow.
    #[arg(help_heading = "Limits", long, value_name = "CIDR")]
    deny: Vec<Range>,
    /// Listen backlog: connections the kernel queues before they are accepted (Linux caps it at
    /// net.core.somaxconn, 4096 by default).
    #[arg(help_heading = "Limits", long, default_value_t = 4096, value_name = "N",
          value_parser = backlog)]
    backlog: i32,
    /// Serve TLS with this certificate chain (PEM, the server's own first); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key", help_heading = "TLS")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert", help_heading = "TLS")]
    tls_key: Option<PathBuf>,
    /// Serve TLS with a throwaway certificate made at start (for localhost and the listen
    /// address); its fingerprint is logged as `tls fingerprint sha256:HEX`, for clients to pin.
    #[arg(long, conflicts_with = "tls_cert", help_heading = "TLS")]
    tls_self_signed: bool,
    /// Require every client to present a certificate signed by these roots (PEM): mutual TLS.
    /// The client's name (its certificate's CN, or first SAN) is logged when it connects.
    #[arg(long, value_name = "FILE", requires = "tls_on", help_heading = "TLS")]
    tls_client_ca: Option<PathBuf>,
    /// A client whose TLS handshake has not finished this long after it connected is closed.
    #[arg(long, default_value = "10s", value_parser = positive_duration, value_name = "DURATION",
          requires = "tls_on", help_heading = "TLS")]
    tls_handshake_timeout: Duration,
    /// Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy and send-proxy-v2
    /// send) first on every connection, and serve the client it names; needs --trusted-proxy.
    #[arg(
        long,
        requires = "trusted_proxy",
        help_heading = "Behind a proxy, and several servers"
    )]
    proxy_protocol: bool,
    /// Who may send PROXY headers (CIDR or address; repeatable): a connection from anywhere
    /// else is refused. --allow/--deny then judge the client the header names.
    #[arg(
        long,
        value_name = "CIDR",
        requires = "proxy_protocol",
        help_heading = "Behind a proxy, and several servers"
    )]
    trusted_proxy: Vec<Range>,
    /// A connection whose PROXY header has not fully arrived this long after it connected is
    /// refused (the specification asks for at least 3 s).
    #[arg(long, default_value = "5s", value_parser = positive_duration, value_name = "DURATION",
          requires = "proxy_protocol", help_heading = "Behind a proxy, and several servers")]
    proxy_header_timeout: Duration,
    /// Share the port with other servers started with --reuse-port (SO_REUSEPORT; Linux and
    /// the BSDs): the kernel spreads new connections among them.
    #[arg(long, help_heading = "Behind a proxy, and several servers")]
    reuse_port: bool,
    /// Chat mode: join this server's room to other servers' through Redis pub/sub
    /// (redis://HOST:PORT[/DB]); every line reaches every client of every server once while
    /// Redis is up.
    #[arg(
        long,
        value_name = "URL",
        help_heading = "Behind a proxy, and several servers"
    )]
    chat_bus: Option<String>,
    /// The room to join on the chat bus: the Redis channel's name.
    #[arg(long, value_name = "NAME", default_value = plugboard::DEFAULT_CHAT_ROOM,
          requires = "chat_bus", help_heading = "Behind a proxy, and several servers")]
    chat_room: String,
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish) or the man page
    /// (man) to stdout, and exit.
    #[arg(long, value_enum, value_name = "WHAT", hide_short_help = true)]
    generate: Option<common::Generate>,
    #[command(flatten)]
    log: LogArgs,
}

/// The end of `--help`.
const EXAMPLES: &str = "\
Examples:
  server --port 8887                  the demo: print what each client sends
  server --port 0 --mode chat         a chat room on a free port (logged)
  server --mode echo --max-clients 100 --idle-timeout 5m
  server --host :: --allow 10.0.0.0/8 --deny 10.0.0.13
  server --tls-self-signed            TLS; clients pin the logged fingerprint
  server --proxy-protocol --trusted-proxy 10.0.0.2 --reuse-port
  server --mode chat --chat-bus redis://127.0.0.1:6379 --chat-room lobby";

/// A `--backlog`: 1 to 2,147,483,647 (what `listen` takes), said in words.
fn backlog(text: &str) -> Result<i32, String> {
    text.parse::<i32>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| "must be a whole number from 1 to 2147483647".to_string())
}

/// [`common::duration`], but more than zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match common::duration(text)? {
        Duration::ZERO => Err("must be more than 0".to_string()),
        duration => Ok(duration),
    }
}

/// `--mode`, mapped onto the library's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// print each message
    Log,
    /// print, and send each message back to its sender unchanged
    Echo,
    /// print, and send each message to every other client as `PEER MESSAGE`
    Chat,
}

impl From<ModeArg> for Mode {
    fn from(arg: ModeArg) -> Mode {
        match arg {
            ModeArg::Log => Mode::Log,
            ModeArg::Echo => Mode::Echo,
            ModeArg::Chat => Mode::Chat,
        }
    }
}

fn main() -> ExitCode {
    map_large_blocks_apart();
    let mut cli = Cli::parse();
    if let Err(problem) = common::positionals(&cli.address, true, &mut cli.host, &mut cli.port) {
        Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, problem)
            .exit();
    }
    if let Some(what) = cli.generate {
        return common::generate(Cli::command(), what);
    }
    // The library's own check of the options, reported as clap reports a bad flag (exit 2).
    let options = match options(&cli) {
        Ok(options) => options,
        Err(error) => common::invalid_options(Cli::command(), &error),
    };
    let log = common::init_logging(&cli.log);
    match run(cli, options, &log) {
        Ok(()) => {
            log.finish(common::LOG_FLUSH);
            ExitCode::SUCCESS
        }
        Err(error) => common::fail(&log, &error),
    }
}

/// The library's options from the flags, checked.
fn options(cli: &Cli) -> Result<ServerOptions, Error> {
    let access = cli.allow.iter().cloned().fold(Access::new(), Access::allow);
    let access = cli.deny.iter().cloned().fold(access, Access::deny);
    let options = ServerOptions::default()
        .greeting(Some(cli.greeting.as_str()))
        .framing(cli.framing.into())
        .max_clients(cli.max_clients)
        .max_line(cli.max_line)
        .idle_timeout((!cli.idle_timeout.is_zero()).then_some(cli.idle_timeout))
        .access(access)
        .backlog(cli.backlog)
        .mode(cli.mode.into())
        .send_timeout(cli.send_timeout)
        .buffer_budget(cli.buffer_budget)
        .tls_handshake_timeout(cli.tls_handshake_timeout)
        .proxy_protocol(cli.proxy_protocol.then(|| cli.trusted_proxy.clone()))
        .proxy_header_timeout(cli.proxy_header_timeout)
        .reuse_port(cli.reuse_port)
        .chat_bus(
            cli.chat_bus
                .as_ref()
                .map(|url| ChatBus::new(url).room(&cli.chat_room)),
        );
    options.validate()?;
    Ok(options)
}

/// The TLS settings the flags ask for (`None`: in the clear), with what to log about them.
fn tls(cli: &Cli) -> Result<Option<ServerTls>, Error> {
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => ServerTls::from_pem_files(cert, key)?,
        _ if cli.tls_self_signed => ServerTls::self_signed(&self_signed_names(&cli.host))?,
        _ => return Ok(None),
    };
    let tls = match &cli.tls_client_ca {
        Some(ca) => tls.require_client_certificates_file(ca)?,
        None => tls,
    };
    info!("tls fingerprint {}", tls.fingerprint());
    if tls.requires_client_certificates() {
        info!("tls: clients must present a certificate");
    }
    Ok(Some(tls))
}

/// What a throwaway certificate is made for: `localhost`, the loopback addresses, and the
/// listen address (a name, or an address other than "any").
fn self_signed_names(host: &str) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let any = bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    if !bare.is_empty() && !any && !names.iter().any(|n| n == bare) {
        names.push(bare.to_string());
    }
    names
}

fn run(cli: Cli, options: ServerOptions, log: &common::log::Log) -> anyhow::Result<()> {
    let options = options.tls(tls(&cli)?);
    raise_fd_limit(cli.max_clients);
    let server = Server::bind(&cli.host, cli.port, options, Arc::new(plugboard::stdout()))?;
    let addr = server.local_addr();
    install_signal_handler(&server, addr, log.clone())?;
    info!("listening on {addr}");
    if cli.mode != ModeArg::Log {
        info!("mode: {}", Mode::from(cli.mode));
    }
    // The client reads lines of up to 1 MiB: in echo and chat mode a longer line sent back is
    // one it refuses (and fails on).
    if cli.mode != ModeArg::Log && cli.max_line > 1024 * 1024 - 64 {
        tracing::warn!(
            "--max-line {} is more than plugboard clients read in a line (1 MiB with the address): a line that long, echoed or relayed, makes them fail",
            cli.max_line
        );
    }

    // The process exits next: its connection threads needn't exit one by one. Stdout is not
    // touched here: the sink flushed what it wrote, and a writer stuck on it must not hold the
    // exit up.
    match server.wait() {
        Ok(summary) => {
            let mut failures = String::new();
            if summary.handshakes_failed > 0 {
                failures += &format!(
                    ", {}",
                    plural(summary.handshakes_failed, "failed TLS handshake")
                );
            }
            if summary.proxy_headers_failed > 0 {
                failures += &format!(
                    ", {}",
                    plural(summary.proxy_headers_failed, "bad PROXY header")
                );
            }
            if cli.chat_bus.is_some() {
                failures += &format!(
                    "; chat bus: {} published, {} received, {} lost, {} not published",
                    plural(summary.chat_bus_published, "line"),
                    summary.chat_bus_received,
                    summary.chat_bus_lost,
                    summary.chat_bus_unpublished
                );
            }
            info!(
                "stopped: {}, {}, {}{failures}",
                plural(summary.connections, "connection"),
                plural(summary.messages, "message"),
                plural(summary.bytes, "byte")
            );
            if summary.unprinted > 0 {
                // A batch the output was still writing counts whole: "up to".
                anyhow::bail!(
                    "cannot write output: up to {} of the {} messages received on {addr} were not printed before the stop's bound ran out (stdout too slow, or the chat room too busy)",
                    summary.unprinted,
                    summary.messages
                );
            }
            Ok(())
        }
        // Whoever read our output has gone (`server | head`): nothing left to do, not a failure.
        Err(Error::Output(e)) if plugboard::unstable::reader_gone(&e) => {
            info!("stopped: stdout was closed");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// A second signal this soon after the first is taken as the same request: `timeout(1)`, for
/// one, sends SIGTERM to the process and to its group.
const SECOND_SIGNAL_GRACE: Duration = Duration::from_millis(250);

/// First SIGINT/SIGTERM (Ctrl-C or console close on Windows): stop cleanly. Another, later than
/// [`SECOND_SIGNAL_GRACE`]: exit now.
fn install_signal_handler(
    server: &Server,
    addr: SocketAddr,
    log: common::log::Log,
) -> anyhow::Result<()> {
    let stopper = server.stopper();
    let first = OnceLock::new();
    ctrlc::set_handler(move || match first.get() {
        None => {
            let _ = first.set(Instant::now());
            info!("signal received: stopping (again to exit at once)");
            // On its own thread: this handler runs signal by signal, so a stop that took a
            // while here (thousands of connections to cut) would make a second signal sent
            // right after the first look late, and exit at once.
            let stopping = stopper.clone();
            if std::thread::Builder::new()
                .name("stop".into())
                .spawn(move || stopping.stop())
                .is_err()
            {
                stopper.stop();
            }
        }
        Some(at) if at.elapsed() < SECOND_SIGNAL_GRACE => {
            debug!("a second signal right after the first: taken as the same");
        }
        Some(_) => {
            log.last_line(
                &format!("error: second signal: server on {addr} exiting at once"),
                Duration::from_millis(100),
            );
            std::process::exit(1);
        }
    })
    .context("cannot install the signal handler")
}

/// Has glibc's allocator map every block of 64 KiB or more on its own (and not raise that bound as
/// it goes, which it otherwise does), so that a connection's large buffers, given back when it
/// goes quiet, return their memory to the system instead of staying in the heap as holes. The
/// library's buffers are small or exactly that large, never in between (see `framing.rs`). The
/// README's Memory section has what each of those two choices saves.
fn map_large_blocks_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a tuning parameter of glibc's malloc; it takes plain
        // integers and is called before any other thread exists.
        let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024) };
        if set != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) failed");
        }
    }
}

/// Each client is one file descriptor, and the usual soft limit of 1024 would cap the server near
/// 1,000 clients: raise it to the hard limit and say if that is still short of `--max-clients`.
fn raise_fd_limit(max_clients: usize) {
    match plugboard::raise_fd_limit() {
        // A few descriptors go to stdio, the listener and the wake-up connection.
        Ok(limit) if limit < (max_clients as u64).saturating_add(16) => tracing::warn!(
            "open file limit is {limit}: fewer than {max_clients} clients fit (raise it with ulimit -Hn)"
        ),
        Ok(limit) => tracing::debug!("open file limit: {limit}"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
}
