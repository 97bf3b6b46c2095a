//! Other servers the tests run as real peers of the server: HAProxy in front of it
//! ([`Haproxy`]), and whatever comes next.
//!
//! Each is a [`Service`], started from a [`Recipe`]: a program run in the foreground, with a
//! directory of its own ([`TempDir`], removed when it is dropped) for its configuration, on free
//! loopback ports it is told in that configuration, ready once every one of them accepts a TCP
//! connection; its output is captured (and shown if the test fails), and it is killed on drop.
//! A port is picked by binding port 0 and letting it go, so another process may take it before
//! the service binds it: the service then fails to start saying so, and is started again on
//! other ports. A new service is a `Recipe` (what to write, what to run) and a small wrapper
//! like [`Haproxy`] for what its tests read from it.
//!
//! A service that is not installed fails the test, saying what installs it: these peers are part
//! of the suite, not optional.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use super::process::{Captured, Output};
use super::tls::TempDir;
use super::{EXIT_TIMEOUT, POLL_DEADLINE, POLL_EVERY, STARTUP_TIMEOUT, poll_until, render_command};

/// Where the readiness probes of [`Service::start`] connect from: a loopback address no test
/// uses, so that a service can turn them away unseen (HAProxy rejects them before they reach its
/// backend: no probe is ever a connection the server under test sees).
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 254);

/// How often a service is started on fresh ports when one of its ports was taken meanwhile.
const ATTEMPTS: usize = 5;

/// How to run one kind of service.
pub struct Recipe<'a> {
    /// Its name, for messages and its directory's name.
    pub name: &'a str,
    /// The program: looked up on PATH, then in the sbin directories, where Debian puts daemons
    /// (and which are not on an ordinary user's PATH).
    pub program: &'a str,
    /// What installs it, for the failure when it is missing.
    pub install: &'a str,
    /// How many loopback ports it listens on.
    pub ports: usize,
    /// Writes its configuration into the directory, for these ports (on 127.0.0.1); returns the
    /// program's arguments, which must keep it in the foreground.
    pub configure: &'a dyn Fn(&TempDir, &[u16]) -> Vec<String>,
    /// What it prints (stdout or stderr) when it cannot listen on a port: then it is started
    /// again, on other ports.
    pub port_taken: &'a str,
}

/// A running service; killed on drop, then its directory removed.
pub struct Service {
    // Dropped in this order: the process is killed before its directory is removed.
    process: Captured,
    dir: TempDir,
    ports: Vec<u16>,
    name: String,
}

impl Service {
    /// Starts the service and waits (bounded) until every one of its ports accepts connections.
    /// Fails the test if the program is missing, or it stops or is not ready in time.
    pub fn start(recipe: &Recipe<'_>) -> Service {
        let program = find_program(recipe.program).unwrap_or_else(|| {
            panic!(
                "`{}` is not installed (looked on PATH and in /usr/sbin, /usr/local/sbin, /sbin): \
                 {}",
                recipe.program, recipe.install
            )
        });
        for attempt in 1..=ATTEMPTS {
            let dir = TempDir::new(recipe.name);
            let ports = free_ports(recipe.ports);
            let args = (recipe.configure)(&dir, &ports);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let shown = program.to_string_lossy();
            let (process, lines) =
                Captured::spawn_program(program.as_os_str(), &args, render_command(&shown, &args));
            drop(lines);
            let mut service = Service {
                process,
                dir,
                ports,
                name: recipe.name.to_string(),
            };
            match service.await_ready() {
                Ok(()) => return service,
                Err(out) => {
                    let taken = out.stdout.contains(recipe.port_taken)
                        || out.stderr.contains(recipe.port_taken);
                    if !taken || attempt == ATTEMPTS {
                        panic!(
                            "{} stopped before it was ready (attempt {attempt} of {ATTEMPTS}; \
                             its files were in {})\n{out}",
                            recipe.name,
                            service.dir.path().display()
                        );
                    }
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Polls (bounded) until every port accepts a connection from [`PROBE_SOURCE`]: `Err` with
    /// its output if the process exited first; a panic if it is not ready in time.
    fn await_ready(&mut self) -> Result<(), Output> {
        let ready = poll_until(STARTUP_TIMEOUT, POLL_EVERY, || {
            if let Some(_status) = self.process.child().try_wait().expect("try_wait") {
                return Some(false);
            }
            let pid = self.process.pid();
            (self.ports.iter().all(|&port| accepts(port)) && listens_on(pid, &self.ports))
                .then_some(true)
        });
        match ready {
            Some(true) => Ok(()),
            Some(false) => Err(self.process.wait_exit(EXIT_TIMEOUT)),
            None => panic!(
                "{} did not accept connections on ports {:?} within {STARTUP_TIMEOUT:?} (its \
                 files are in {})\ncommand: {}\n{}",
                self.name,
                self.ports,
                self.dir.path().display(),
                self.process.command(),
                self.output_so_far()
            ),
        }
    }

    /// Its `i`th port, on 127.0.0.1.
    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports[i]))
    }

    /// What it has printed so far: stdout, then stderr.
    pub fn output_so_far(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.process.stdout_so_far(),
            self.process.stderr_so_far()
        )
    }

    /// Polls (bounded) until it has printed a line with every one of `needles`; returns it.
    pub fn wait_for_output(&self, needles: &[&str]) -> String {
        let found = poll_until(POLL_DEADLINE, POLL_EVERY, || {
            let out = self.process.stdout_so_far() + &self.process.stderr_so_far();
            out.lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
        });
        found.unwrap_or_else(|| {
            panic!(
                "{} printed no line containing all of {needles:?} within {POLL_DEADLINE:?}\n{}",
                self.name,
                self.output_so_far()
            )
        })
    }
}

/// `program` if it is a path or on PATH, else where the sbin directories have it.
fn find_program(program: &str) -> Option<PathBuf> {
    if super::installed(program) {
        return Some(PathBuf::from(program));
    }
    ["/usr/sbin", "/usr/local/sbin", "/sbin"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|path| path.is_file() && super::installed(&path.to_string_lossy()))
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    // All bound at once, so that they differ.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Whether process `pid` itself listens on every one of `ports`: its socket descriptors looked
/// up in /proc/net/tcp. A port picked can be taken by another process (another test's server on
/// port 0, say) before the service binds it; a probe would then be answered by that process, and
/// the service, failing to bind, exit a moment later.
#[cfg(target_os = "linux")]
fn listens_on(pid: u32, ports: &[u16]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let sockets: Vec<String> = fds
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.ok()?.path()).ok()?;
            let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect();
    let mut listening = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st (0A: LISTEN), ..., inode (the tenth field).
            if fields.len() > 9 && fields[3] == "0A" && sockets.iter().any(|s| s == fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap_or_default();
                listening.extend(u16::from_str_radix(port, 16).ok());
            }
        }
    }
    ports.iter().all(|port| listening.contains(port))
}

/// Elsewhere there is no /proc to ask: a probe answered is taken for the service's.
#[cfg(not(target_os = "linux"))]
fn listens_on(_pid: u32, _ports: &[u16]) -> bool {
    true
}

/// Whether 127.0.0.1:`port` accepts a connection from [`PROBE_SOURCE`] (closed at once).
fn accepts(port: u16) -> bool {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((PROBE_SOURCE, 0)).into())
        .unwrap_or_else(|e| panic!("bind the probe to {PROBE_SOURCE}: {e}"));
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    socket
        .connect_timeout(&to.into(), Duration::from_secs(1))
        .is_ok()
}

/// One `listen` section of an [`Haproxy`]: a frontend `name` on a free loopback port, forwarding
/// (in `mode tcp`, `balance leastconn`) to the servers at `servers`, named `s1`, `s2`, ..., each
/// `server` line ending with `options` (`send-proxy`, `send-proxy-v2`, `check ...`).
pub struct Listen<'a> {
    pub name: &'a str,
    pub servers: &'a [SocketAddr],
    pub options: &'a str,
}

/// One connection through HAProxy, as its log tells it.
#[derive(Debug)]
pub struct Session {
    /// The client, as HAProxy saw it.
    pub client: SocketAddr,
    /// HAProxy's own end of its connection to the server: what the server sees as its peer.
    pub proxy: SocketAddr,
    /// The server it forwarded the client to.
    pub server: SocketAddr,
    /// How it ended: HAProxy's two-letter termination state (`--` for a normal end, `SD` for
    /// the server's side ending it with an error, ...).
    pub end: String,
}

/// A real HAProxy (`haproxy -db`, Debian's 2.6 in CI) in front of servers under test; killed on
/// drop. It logs every connection to its stderr, one line in a format of its own that
/// [`session`](Haproxy::session) reads.
pub struct Haproxy {
    service: Service,
    names: Vec<String>,
}

impl Haproxy {
    /// Starts HAProxy with one `listen` section per entry of `listens`, and waits (bounded)
    /// until every frontend accepts connections.
    pub fn start(listens: &[Listen<'_>]) -> Haproxy {
        let configure = |dir: &TempDir, ports: &[u16]| -> Vec<String> {
            let mut config = String::from(
                "global\n\
                 \x20   log stderr format raw local0 info\n\
                 defaults\n\
                 \x20   mode tcp\n\
                 \x20   log global\n\
                 \x20   log-format \"session client=%ci:%cp proxy=%bi:%bp server=%si:%sp frontend=%ft end=%ts\"\n\
                 \x20   timeout connect 5s\n\
                 \x20   timeout client 1m\n\
                 \x20   timeout server 1m\n",
            );
            for (listen, port) in listens.iter().zip(ports) {
                config += &format!(
                    "listen {name}\n\
                     \x20   bind 127.0.0.1:{port}\n\
                     \x20   tcp-request connection reject if {{ src {PROBE_SOURCE} }}\n\
                     \x20   balance leastconn\n",
                    name = listen.name,
                );
                for (i, server) in listen.servers.iter().enumerate() {
                    config += &format!("    server s{} {server} {}\n", i + 1, listen.options);
                }
            }
            let file = dir.write("haproxy.cfg", config);
            vec!["-f".to_string(), file, "-db".to_string()]
        };
        let service = Service::start(&Recipe {
            name: "haproxy",
            program: "haproxy",
            install: "the PROXY protocol tests run the server behind a real HAProxy; bash .ci/run \
                      installs it (Debian's haproxy)",
            ports: listens.len(),
            configure: &configure,
            port_taken: "cannot bind socket",
        });
        Haproxy {
            service,
            names: listens.iter().map(|l| l.name.to_string()).collect(),
        }
    }

    /// The address of the frontend `name`.
    pub fn frontend(&self, name: &str) -> SocketAddr {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no frontend {name:?} (there are {:?})", self.names));
        self.service.addr(i)
    }

    /// Waits (bounded) for HAProxy to log the end of `client`'s connection, and returns what
    /// the line says.
    pub fn session(&self, client: SocketAddr) -> Session {
        let line = self
            .service
            .wait_for_output(&[&format!("session client={client} ")]);
        let field = |key: &str| -> &str {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in HAProxy's line {line:?}"))
        };
        let address = |key: &str| -> SocketAddr {
            field(key)
                .parse()
                .unwrap_or_else(|e| panic!("{key} in HAProxy's line {line:?}: {e}"))
        };
        Session {
            client: address("client="),
            proxy: address("proxy="),
            server: address("server="),
            end: field("end=").to_string(),
        }
    }
}
