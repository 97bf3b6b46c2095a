//! What both binaries share: logging flags and setup, framing and duration flags, exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// `-v`, `-q` and `--log-format`.
#[derive(Args, Debug)]
pub struct LogArgs {
    /// More log detail on stderr (-v debug, -vv trace). RUST_LOG, if set, takes precedence.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log detail on stderr (-q warnings and errors only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
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

/// Sends the log to stderr, at the level `-v`/`-q` ask for unless `RUST_LOG` says otherwise.
pub fn init_logging(args: &LogArgs) {
    let level = match (args.verbose, args.quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match args.log_format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Prints a runtime failure as one line (`error: ` and the cause chain) and gives exit code 1.
pub fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error:#}");
    ExitCode::from(1)
}
