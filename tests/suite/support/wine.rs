//! The Windows binaries, run under Wine: cross-built once per test run for
//! `x86_64-pc-windows-gnu` (release, linked by Debian's mingw) into a target directory of their
//! own, `target/wine`, beside a test-only `bcryptprimitives.dll` (`tests/windows/`: Wine 8 lacks
//! the `ProcessPrng` that Rust's standard library imports from it), and run in a Wine prefix of
//! their own, `target/wine/prefix`.
//!
//! `.ci/run` builds the same binaries before `cargo test`, so the build here finds them up to
//! date; run alone, the first Windows test builds them (a few minutes) while the others wait.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::{Captured, Output, ServerProcess, installed, render_command};

/// The Rust target the binaries are built for.
const TARGET: &str = "x86_64-pc-windows-gnu";
/// How long the build may take when nothing was built yet (a release build of every dependency).
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long Wine may take to make its prefix (about 25 s the first time, 3 s after).
const PREFIX_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Where the Windows binaries are and the prefix they run in.
pub struct Wine {
    bin_dir: PathBuf,
    prefix: PathBuf,
}

/// The Windows binaries, built (with the shim beside them) and a prefix ready, once per run. A
/// test that calls this fails, saying why, where that can't be done.
pub fn wine() -> &'static Wine {
    static WINE: OnceLock<Wine> = OnceLock::new();
    WINE.get_or_init(Wine::prepare)
}

impl Wine {
    fn prepare() -> Wine {
        for (program, package) in [
            ("wine", "wine64"),
            ("x86_64-w64-mingw32-gcc", "gcc-mingw-w64-x86-64"),
        ] {
            assert!(
                installed(program),
                "`{program}` is not installed: the Windows tests run the binaries under Wine \
                 (bash .ci/run installs Debian's {package})"
            );
        }
        // CARGO_TARGET_TMPDIR is `<target dir>/tmp`.
        let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target directory")
            .join("wine");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let target_arg = target_dir.to_string_lossy();
        run(
            &cargo,
            &[
                "build",
                "--release",
                "--locked",
                "--bins",
                "--target",
                TARGET,
                "--target-dir",
                &target_arg,
            ],
            BUILD_TIMEOUT,
        );
        let bin_dir = target_dir.join(TARGET).join("release");
        let shim = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/windows/bcryptprimitives.c"
        );
        let dll = bin_dir.join("bcryptprimitives.dll");
        run(
            "x86_64-w64-mingw32-gcc",
            &[
                "-O2",
                "-shared",
                "-o",
                &dll.to_string_lossy(),
                shim,
                "-ladvapi32",
            ],
            Duration::from_secs(120),
        );
        let wine = Wine {
            bin_dir,
            prefix: target_dir.join("prefix"),
        };
        // Made (or brought up to date) before any test starts a program in it.
        let (program, args) = wine.command_line("wineboot", &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&program, &args, PREFIX_TIMEOUT);
        wine
    }

    /// `env WINEPREFIX=... wine PROGRAM args...`: `PROGRAM` is `server` or `client` (the built
    /// `.exe`), or a program of Wine's own (`wineboot`). The environment keeps Wine quiet
    /// (`WINEDEBUG=-all`: its own messages would mix with the log the tests read) and stops it
    /// offering to install Mono and Gecko, which nothing here needs. `env` and Debian's `wine`
    /// script both exec, so the process started is the Windows program itself: a signal sent
    /// to it reaches Wine's handlers in that program.
    fn command_line(&self, program: &str, args: &[&str]) -> (String, Vec<String>) {
        let exe = match program {
            "server" | "client" => self
                .bin_dir
                .join(format!("{program}.exe"))
                .to_string_lossy()
                .into_owned(),
            other => other.to_string(),
        };
        let mut line = vec![
            format!("WINEPREFIX={}", self.prefix.display()),
            "WINEDEBUG=-all".to_string(),
            "WINEDLLOVERRIDES=mscoree,mshtml=".to_string(),
            "wine".to_string(),
            exe,
        ];
        line.extend(args.iter().map(|a| a.to_string()));
        ("env".to_string(), line)
    }

    /// Spawns the Windows `server` or `client` with `args`, its output captured.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Captured {
        let (env, line) = self.command_line(program, args);
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        let (captured, lines) =
            Captured::spawn_program(OsStr::new(&env), &line, render_command(&env, &line));
        drop(lines);
        captured
    }

    /// Runs the Windows `server` or `client` with `args` to its end (bounded by `timeout`).
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        self.spawn(program, args).wait_exit(timeout)
    }

    /// Starts the Windows server with `args` and its stdout sent on by bash as `SERVER ARGS
    /// STDOUT` (`>/dev/full`, `| head -1`), and waits for its `listening on ADDR` line. The
    /// process is bash, which exits with the server's status; a signal to it doesn't reach the
    /// server.
    pub fn server_with_stdout(&self, stdout: &str, args: &[&str]) -> ServerProcess {
        let (env, line) = self.command_line("server", args);
        let script = format!("\"$@\" {stdout}; exit ${{PIPESTATUS[0]}}");
        let mut argv = vec!["-c", script.as_str(), "bash", env.as_str()];
        argv.extend(line.iter().map(String::as_str));
        ServerProcess::spawn_program("bash", &argv)
    }

    /// Starts the Windows server with `args` and waits for its `listening on ADDR` line.
    pub fn server(&self, args: &[&str]) -> ServerProcess {
        let (env, line) = self.command_line("server", args);
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        ServerProcess::spawn_program(&env, &line)
    }
}

/// Runs `program args...` to its end, failing the test with its output unless it exits 0.
fn run(program: &str, args: &[&str], timeout: Duration) {
    let command = render_command(program, args);
    let (mut captured, lines) = Captured::spawn_program(OsStr::new(program), args, command);
    drop(lines);
    let out = captured.wait_exit(timeout);
    assert_eq!(
        out.code(),
        Some(0),
        "preparing the Windows binaries failed\n{out}"
    );
}
