//! What both binaries share: logging flags and setup, framing and duration flags, exit codes.

pub mod log;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// `-v`, `-q` and `--log-format`.
#[derive(Args, Debug)]
pub struct LogArgs {
    /// More log detail on stderr (-v debug, -vv trace). RUST_LOG, if set, takes precedence.
    #[arg(help_heading = "Logging", short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log detail on stderr (-q warnings and errors only, -qq errors only).
    #[arg(help_heading = "Logging", short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// Log format on stderr.
    #[arg(help_heading = "Logging", long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Colour in the log: auto (when stderr is a terminal and NO_COLOR is not set), always,
    /// never.
    #[arg(help_heading = "Logging", long, value_enum, default_value_t = ColorChoice::Auto, global = true, value_name = "WHEN")]
    color: ColorChoice,
}

impl LogArgs {
    /// Whether `-q` was given: nothing but warnings and errors on stderr.
    #[allow(dead_code)] // the client's; this module is compiled into each binary
    pub fn is_quiet(&self) -> bool {
        self.quiet > 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Whether to colour, given whether stderr is a terminal and `NO_COLOR`'s value: as
    /// <https://no-color.org> asks, any non-empty `NO_COLOR` turns colour off unless asked for.
    fn colours(self, terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => terminal && no_color.is_none_or(|v| v.is_empty()),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--framing line|raw`, mapped onto the library's type.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum FramingArg {
    /// UTF-8 lines ending in \n (a trailing \r is dropped)
    #[default]
    Line,
    /// no delimiter: each chunk read is a message (talks to the original C# demo)
    Raw,
}

impl From<FramingArg> for plugboard::Framing {
    fn from(arg: FramingArg) -> plugboard::Framing {
        match arg {
            FramingArg::Line => plugboard::Framing::Line,
            FramingArg::Raw => plugboard::Framing::Raw,
        }
    }
}

/// The longest duration any flag takes, a year (`1y`, which humantime counts as 365.25 days):
/// longer ones are surely a mistake, and would overflow the clock when added to it.
const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// Parses a duration flag (`2s`, `500ms`, `1m30s`, `0`) of at most a year.
pub fn duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration > MAX_DURATION {
        return Err(format!("{text} is too long (at most a year, 1y)"));
    }
    Ok(duration)
}

/// Sends the log to stderr, at the level `-v`/`-q` ask for unless `RUST_LOG` says otherwise.
/// Returns the way to stderr: [`finish`](log::Log::finish) it before exiting.
pub fn init_logging(args: &LogArgs) -> log::Log {
    let level = match (args.verbose, args.quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    // rustls logs what peers do wrong (an IP address sent as a TLS server name, ...) as
    // warnings, once per connection: a peer could fill the log. Handshake failures are logged
    // by plugboard itself, once each; `RUST_LOG=rustls=debug` shows rustls's own lines.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},rustls=error")));
    let log = log::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(log.clone())
        .log_internal_errors(false)
        .with_target(false);
    match args.log_format {
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR");
            let ansi = args
                .color
                .colours(std::io::stderr().is_terminal(), no_color.as_deref());
            builder.with_ansi(ansi).init();
        }
        LogFormat::Json => builder.json().init(),
    }
    log
}

/// `--generate`: what to print instead of running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Generate {
    Bash,
    Zsh,
    Fish,
    Powershell,
    Elvish,
    /// the man page (roff)
    Man,
}

/// Prints the completion script or man page `what` for `command` to stdout (clap_complete,
/// clap_mangen, as ripgrep and fd ship them). Made in memory first: clap_complete panics on a
/// write that fails, and `server --generate bash | head` closes stdout early.
pub fn generate(mut command: clap::Command, what: Generate) -> std::process::ExitCode {
    use clap_complete::Shell;
    let name = command.get_name().to_string();
    let mut text = Vec::new();
    let shell = match what {
        Generate::Bash => Shell::Bash,
        Generate::Zsh => Shell::Zsh,
        Generate::Fish => Shell::Fish,
        Generate::Powershell => Shell::PowerShell,
        Generate::Elvish => Shell::Elvish,
        Generate::Man => {
            // Into a Vec: writing can't fail.
            let _ = clap_mangen::Man::new(command).render(&mut text);
            return print_generated(&text);
        }
    };
    clap_complete::generate(shell, &mut command, name, &mut text);
    print_generated(&text)
}

/// Writes what `--generate` made to stdout; a reader that left early is no failure.
fn print_generated(text: &[u8]) -> std::process::ExitCode {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if plugboard::unstable::reader_gone(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Positional `HOST PORT` (or just one of them) as ncat takes them: with one value, `port_alone`
/// says whether it is the port (the server's `[HOST] PORT`) or the host (the client's
/// `HOST [PORT]`). Sets `host` and `port`; an error names what is wrong.
pub fn positionals(
    values: &[String],
    port_alone: bool,
    host: &mut String,
    port: &mut u16,
) -> Result<(), String> {
    let port_of = |text: &str| {
        let port = if port_alone {
            self::port(text)
        } else {
            self::port_to_connect(text)
        };
        port.map_err(|e| match self::host(text) {
            // `127.0.0.1:9000` where the port goes: the hint --host gives.
            Err(hint) if text.contains(':') => hint,
            _ => format!("{text:?}: {e}"),
        })
    };
    match values {
        [] => {}
        [one] if port_alone => *port = port_of(one)?,
        [one] => *host = self::host(one)?,
        [h, p] => {
            *host = self::host(h)?;
            *port = port_of(p)?;
        }
        _ => return Err("at most two: HOST PORT".to_string()),
    }
    Ok(())
}

/// A size in bytes: a number, with a unit or not (`65536`, `64KiB`, `1k` = 1,000, `1MiB`,
/// `1.5MB`), by the parse-size crate.
pub fn bytes(text: &str) -> Result<usize, String> {
    let bytes = parse_size::parse_size(text).map_err(|e| {
        format!("{e} (a number of bytes, with a unit or not: 65536, 64KiB, 1k, 1MiB)")
    })?;
    // Past what this machine can address: as good as no limit.
    Ok(usize::try_from(bytes).unwrap_or(usize::MAX))
}

/// A `--port` to listen on (or a `PORT` given alone), said in words when it is none.
pub fn port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| "must be a port number from 0 to 65535".to_string())
}

/// A `--port` to connect to: not 0, which only a listener can ask for.
pub fn port_to_connect(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) => Err(
            "must be a port number from 1 to 65535 (0 is for a server: any free port)".to_string(),
        ),
        Ok(port) => Ok(port),
        Err(_) => Err("must be a port number from 1 to 65535".to_string()),
    }
}

/// A `--host`: anything but an address with a port glued on (`127.0.0.1:9000`, `[::1]:9000`,
/// `localhost:9000`), which is told to use `--port`. Names and addresses are resolved later.
pub fn host(text: &str) -> Result<String, String> {
    let with_port = match text.parse::<std::net::SocketAddr>() {
        Ok(addr) => Some((addr.ip().to_string(), addr.port())),
        // `name:digits`: one colon, so not an IPv6 address.
        Err(_) => text
            .split_once(':')
            .filter(|(name, port)| !name.is_empty() && !name.contains(':') && !port.contains(':'))
            .and_then(|(name, port)| Some((name.to_string(), port.parse::<u16>().ok()?))),
    };
    match with_port {
        Some((host, port)) => Err(format!(
            "a host, without a port: --host {host} --port {port}"
        )),
        None if text.is_empty() => Err("must be a host name or address, not empty".to_string()),
        None => Ok(text.to_string()),
    }
}

/// Reports options the library refused ([`plugboard::Error::Options`]) the way clap reports a bad
/// flag, and exits with status 2: the library's check is the binaries' check.
pub fn invalid_options(mut command: clap::Command, error: &plugboard::Error) -> ! {
    let message = match error {
        plugboard::Error::Options { option, problem } => {
            format!(
                "invalid value for '--{}': {problem}",
                option.replace('_', "-")
            )
        }
        other => other.to_string(),
    };
    command
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

/// How long the log may take to reach stderr at exit, so that a stuck stderr can't hold it up.
pub const LOG_FLUSH: Duration = Duration::from_millis(500);

/// Prints a runtime failure as one line after the log (`error: ` and the cause chain) and gives
/// exit code 1. Never panics or blocks for long, whatever stderr is.
pub fn fail(log: &log::Log, error: &anyhow::Error) -> ExitCode {
    log.last_line(&format!("error: {error:#}"), LOG_FLUSH);
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::ColorChoice;

    #[test]
    fn sizes_take_units_and_the_defaults_are_the_library_s() {
        assert_eq!(super::bytes("64KiB"), Ok(plugboard::DEFAULT_MAX_LINE));
        assert_eq!(super::bytes("256MiB"), Ok(plugboard::DEFAULT_BUFFER_BUDGET));
        assert_eq!(super::bytes("1k"), Ok(1000));
        assert_eq!(super::bytes("1.5 KiB"), Ok(1536));
        assert_eq!(super::bytes("100"), Ok(100));
        assert!(super::bytes("-1").is_err());
        assert!(super::bytes("lots").is_err());
    }

    #[test]
    fn colour_follows_the_flag_then_no_color_then_the_terminal() {
        let set = Some(OsStr::new("1"));
        let empty = Some(OsStr::new(""));
        assert!(ColorChoice::Auto.colours(true, None));
        assert!(
            ColorChoice::Auto.colours(true, empty),
            "an empty NO_COLOR is unset"
        );
        assert!(!ColorChoice::Auto.colours(true, set));
        assert!(!ColorChoice::Auto.colours(false, None));
        assert!(ColorChoice::Always.colours(false, set), "asked for");
        assert!(!ColorChoice::Never.colours(true, None));
    }
}
