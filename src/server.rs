//! The listener: binding, the accept loop, the registry of live connections, stop and join.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, error, info, warn};

use crate::bus::Bus;
use crate::connection;
use crate::context::{Context, DRAIN_TIME};
use crate::limits::{self, ThreadRoom};
use crate::options::{
    CHAT_BUS_CONNECT_TIMEOUT, CONNECTION_STACK, ChatBus, ServerOptions, TLS_CONNECTION_STACK,
};
use crate::room::ELSEWHERE;
use crate::sink::Sink;
use crate::stream::{self, STOPPING, Stream};
use crate::tls::ServerTls;
use crate::turnaway::Turnaway;
use crate::{Error, addr};

/// A connection that read nothing for this long before a stop is cut at once: its client is not
/// in the middle of sending.
const QUIET_AT_STOP: Duration = Duration::from_millis(100);

/// How long after the drain the output may take to write what was read, before the stop gives up
/// on it (a pipe nobody reads): what it did not write is counted, and those clients are told.
const OUTPUT_GRACE: Duration = Duration::from_millis(1500);

/// The bound on a stop: by then every connection has ended, or is given up on (left to the
/// process's exit, which resets its client).
const STOP_BOUND: Duration = Duration::from_secs(3);

/// Totals over a server's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Connections accepted.
    pub connections: u64,
    /// Messages received (complete messages read from clients).
    pub messages: u64,
    /// Of those, messages not printed: read but refused by the sink (it had failed), or taken by
    /// it and not written out (it failed later, or was still blocked when the stop gave up).
    pub unprinted: u64,
    /// Bytes read from clients.
    pub bytes: u64,
    /// Under TLS: connections whose handshake failed or did not finish in time (not a TLS
    /// client, an untrusted certificate, silence, ...).
    pub handshakes_failed: u64,
    /// Behind a proxy: connections refused because their PROXY protocol header was missing,
    /// malformed, or late.
    pub proxy_headers_failed: u64,
    /// With a chat bus: lines of this server's clients published to the other servers.
    pub chat_bus_published: u64,
    /// With a chat bus: lines from other servers relayed to this server's clients.
    pub chat_bus_received: u64,
    /// With a chat bus: lines of other servers never received (gaps in their sequence numbers,
    /// as after a Redis outage: Redis pub/sub delivers at most once).
    pub chat_bus_lost: u64,
    /// With a chat bus: lines of this server's clients not published (Redis unreachable, or not
    /// keeping up): the other servers' clients never got them.
    pub chat_bus_unpublished: u64,
}

/// A running server: one accept thread, one thread that starts connection threads, and one thread
/// per client.
///
/// Accepting and starting threads are split so that the accept loop only ever calls `accept`:
/// starting a thread costs several times as much as a connect, and a burst of connects would
/// otherwise overflow the kernel's accept queue and leave clients waiting a second on SYN retries.
///
/// Dropping it stops it and joins every thread.
pub struct Server {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    starter: Option<JoinHandle<()>>,
    turnaway: Option<JoinHandle<()>>,
}

/// Stops a [`Server`] from another thread (a signal handler, a test). Cheap to clone.
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Stops the server: see [`Server::stop`].
    pub fn stop(&self) {
        self.0.stop();
    }
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Stopper").field(&self.0.local_addr).finish()
    }
}

impl Server {
    /// Listens on `host:port` (port 0 picks a free port) and starts accepting clients.
    ///
    /// `host` may be an IPv4 or IPv6 address or a name; the first address that binds wins.
    pub fn bind(
        host: &str,
        port: u16,
        options: ServerOptions,
        sink: Arc<dyn Sink>,
    ) -> Result<Server, Error> {
        options.validate()?;
        // Each client is a descriptor; make room for them all before any thread starts.
        crate::limits::reserve_descriptors(options.max_clients.saturating_add(64));
        let (listener, local_addr) = addr::resolve(host, port)?.try_each(|addr| {
            let bound = listen(addr, options.backlog, options.reuse_port).and_then(|listener| {
                let local_addr = listener.local_addr()?;
                Ok((listener, local_addr))
            });
            bound.map_err(|source| Error::Bind { addr, source })
        })?;
        Server::start(listener, local_addr, options, sink)
    }

    fn start(
        listener: TcpListener,
        local_addr: SocketAddr,
        options: ServerOptions,
        sink: Arc<dyn Sink>,
    ) -> Result<Server, Error> {
        let plain = options.tls.is_none();
        let (turnaway, turnaway_thread) = Turnaway::start(plain).map_err(Error::Thread)?;
        // On Linux a stop wakes the accept loop by shutting the listener (see `Shared::stop`).
        #[cfg(target_os = "linux")]
        let listener_to_shut = listener.try_clone().map_err(|source| Error::Bind {
            addr: local_addr,
            source,
        })?;
        // Maps kept for everything but connection threads: the large buffers the budget allows,
        // the output's, the heap's, the libraries'.
        let spare = 1024 + options.buffer_budget / crate::framing::LARGE_BUFFER;
        // One thread a client in every mode, and in chat one more for each client while it is
        // behind (its drainer): both draw on the same room.
        let room = limits::thread_room(spare);
        if let Some(room) = room
            && room < options.max_clients
        {
            warn!(
                "vm.max_map_count leaves room for about {room} threads here, fewer than --max-clients {}: clients beyond are refused (server full)",
                options.max_clients
            );
        }
        let threads = Arc::new(ThreadRoom::new(room));
        let shared = Arc::new_cyclic(|shared: &Weak<Shared>| {
            let shared = Weak::clone(shared);
            // A failed output stops the whole server.
            let request_stop = Box::new(move || {
                if let Some(shared) = shared.upgrade() {
                    shared.stop();
                }
            });
            Shared {
                ctx: Arc::new(Context::new(
                    options,
                    sink,
                    Arc::clone(&threads),
                    request_stop,
                )),
                #[cfg(target_os = "linux")]
                listener_to_shut,
                threads,
                local_addr,
                registry: Mutex::new(Registry::default()),
                idle: Condvar::new(),
                connections: AtomicU64::new(0),
                turnaway,
            }
        });
        if let Some(config) = &shared.ctx.options.chat_bus {
            match connect_bus(config, &shared) {
                Ok(bus) => {
                    let _ = shared.ctx.bus.set(bus);
                }
                Err(e) => {
                    shared.turnaway.stop();
                    let _ = turnaway_thread.join();
                    return Err(e);
                }
            }
        }
        let (accepted, to_start) = mpsc::channel();
        let starter_shared = Arc::clone(&shared);
        let starter = thread::Builder::new()
            .name("plugboard-start".into())
            .spawn(move || start_loop(&to_start, &starter_shared))
            .map_err(Error::Thread)?;
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("plugboard-accept".into())
            .spawn(move || {
                accept_loop(&listener, &accept_shared, &accepted);
                drop(listener);
                accept_shared.drain();
            });
        let accept = match accept {
            Ok(accept) => accept,
            Err(e) => {
                // Dropping the closure's sender ends the starter.
                let _ = starter.join();
                shared.turnaway.stop();
                let _ = turnaway_thread.join();
                return Err(Error::Thread(e));
            }
        };
        Ok(Server {
            shared,
            accept: Some(accept),
            starter: Some(starter),
            turnaway: Some(turnaway_thread),
        })
    }

    /// The address the server really listens on (with the port the OS chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// A handle that can stop the server from any thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::clone(&self.shared))
    }

    /// Stops the server without waiting: no new clients are accepted; a client that sent nothing
    /// for a moment is cut off at once, and one in the middle of sending may go on for at most
    /// half a second: if it finishes, it gets its clean close; if not, it is cut off too. A client
    /// cut off is told (`error: server stopping`, then a reset). Idempotent.
    pub fn stop(&self) {
        self.shared.stop();
    }

    /// Waits until the server is stopped (by [`stop`](Server::stop), a [`Stopper`], or a failed
    /// sink) and every thread it started has ended.
    ///
    /// Bounded once stopped: a connection still running three seconds after the stop (its thread
    /// stuck in a sink that never returns) is given up on and its thread left running.
    ///
    /// Returns the totals, or [`Error::Output`] if the sink failed.
    pub fn join(mut self) -> Result<Summary, Error> {
        self.join_threads(true);
        self.result()
    }

    /// Like [`join`](Server::join), for a program that exits right after: waits until the server
    /// is stopped and every connection is done (its messages delivered, its socket shut down),
    /// but not for the connection threads to exit. Those that end after the stop stay parked
    /// instead, with their stacks, until the process exits and ends them all at once: a program
    /// that goes on running should call `join`.
    ///
    /// That shortens the stop with many clients (the README's Scale section has the figures): a
    /// thread that exits unmaps its signal stack and gives back its stack, and each of those
    /// makes every CPU flush its TLB.
    pub fn wait(mut self) -> Result<Summary, Error> {
        self.shared.ctx.set_exit_follows();
        self.join_threads(false);
        self.result()
    }

    fn result(&self) -> Result<Summary, Error> {
        match self.shared.ctx.take_output_error() {
            Some(error) => Err(Error::Output(error)),
            None => Ok(self.shared.summary()),
        }
    }

    /// The totals so far.
    pub fn summary(&self) -> Summary {
        self.shared.summary()
    }

    /// Joins the server's own threads and waits for every connection to end (at most until the
    /// stop's bound); joins the connection threads too if `connections`.
    fn join_threads(&mut self, connections: bool) {
        let stopped_at = self.shared.wait_for_stop();
        let bound = stopped_at + STOP_BOUND;
        for thread in [
            self.accept.take(),
            self.starter.take(),
            self.turnaway.take(),
        ]
        .into_iter()
        .flatten()
        {
            // Not a plain join: a thread's exit can wait a long time behind thousands of others
            // giving back their memory; its work is done once `is_finished`.
            while !thread.is_finished() && Instant::now() < bound {
                thread::sleep(Duration::from_millis(5));
            }
            if connections && thread.is_finished() {
                let _ = thread.join();
            } else {
                let_go(thread, connections);
            }
        }
        let finished = {
            let mut registry = self.shared.registry();
            while !registry.live.is_empty() {
                let left = bound.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // Stuck in the sink, most likely: their sockets reset when they are closed,
                    // at the latest when the process exits.
                    warn!(
                        "{} still busy {} after the stop; giving up on them",
                        crate::unstable::plural(registry.live.len() as u64, "connection"),
                        humantime::format_duration(STOP_BOUND)
                    );
                    for live in registry.live.values_mut() {
                        if let Some(thread) = live.thread.take() {
                            let_go(thread, connections);
                        }
                    }
                    break;
                }
                registry = self
                    .shared
                    .idle
                    .wait_timeout(registry, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::take(&mut registry.finished)
        };
        for thread in finished {
            if connections {
                let _ = thread.join();
            } else {
                let_go(thread, connections);
            }
        }
        // Last: what the connections published on their way out gets its chance to go.
        if let Some(bus) = self.shared.ctx.bus.get() {
            bus.stop();
        }
    }
}

/// Connects the chat bus that joins this server's room to others' (`--chat-bus`): lines from
/// other servers are broadcast to every client here, on the bus's own thread.
fn connect_bus(config: &ChatBus, shared: &Arc<Shared>) -> Result<Bus, Error> {
    // Weak: the bus belongs to the server, not the other way round. (The bus delivers nothing
    // once it is stopped, which `join_threads` does before the server goes.)
    let server = Arc::downgrade(shared);
    let timeout = shared.ctx.options.send_timeout;
    // What a relayed line of this server's own can be: the address and --max-line bytes, each
    // escaped to at most 4 (a control byte as `\x1b`). Servers sharing a room should share
    // --max-line; a longer line from the bus is dropped, as no client here could have sent it.
    let longest = shared
        .ctx
        .options
        .max_line
        .saturating_mul(4)
        .saturating_add(64);
    let deliver = Box::new(move |lines: &[u8]| {
        if lines.is_empty() {
            return;
        }
        if let Some(server) = server.upgrade() {
            // Anyone who can publish on the channel can send anything: relayed only as lines,
            // escaped, as a client's would be.
            let (lines, dropped) = crate::framing::escape_lines(lines, longest);
            if dropped > 0 {
                warn!(
                    "chat bus: dropped {dropped} lines from another server longer than this server's lines can be ({longest} bytes with the address, from --max-line)"
                );
            }
            if !lines.is_empty() {
                server
                    .ctx
                    .room
                    .broadcast(ELSEWHERE, &Arc::from(&*lines), timeout);
            }
        }
    });
    let bus = Bus::connect(&config.url, &config.room, CHAT_BUS_CONNECT_TIMEOUT, deliver)?;
    info!(
        "chat bus {}: room {:?}, this server {} on it",
        crate::bus::redacted(&config.url),
        config.room,
        bus.origin()
    );
    Ok(bus)
}

/// Lets a thread go without joining it: detached, or if the process exits next (`!joining`),
/// not even that. Freeing a finished thread's stack, which a join or a detach does, takes a lock
/// of the C library's that every thread exiting takes too: with thousands exiting at once after
/// a stop, `Server::wait` waited seconds on it, for memory the exit frees anyway.
fn let_go(thread: JoinHandle<()>, joining: bool) {
    if joining {
        drop(thread);
    } else {
        std::mem::forget(thread);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() || self.starter.is_some() || self.turnaway.is_some() {
            self.shared.stop();
            self.join_threads(true);
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.shared.local_addr)
            .field("options", &self.shared.ctx.options)
            .finish()
    }
}

/// Creates a listening socket with our backlog (std's is fixed at 128), shared with other
/// sockets on the same port if `reuse_port` (checked by `ServerOptions::validate` to be possible).
fn listen(addr: SocketAddr, backlog: i32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // On Unix this only lets us rebind over TIME_WAIT leftovers; on Windows it would let another
    // process steal the port, so it stays off there.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    #[cfg(all(
        unix,
        not(any(
            target_os = "solaris",
            target_os = "illumos",
            target_os = "cygwin",
            target_os = "nuttx",
            target_os = "wasi"
        ))
    ))]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    let _ = reuse_port; // elsewhere `validate` refused it
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Accepts connections and hands them to the starter; refuses those `--allow`/`--deny` exclude.
fn accept_loop(
    listener: &TcpListener,
    shared: &Shared,
    starter: &mpsc::Sender<(TcpStream, SocketAddr)>,
) {
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = listener.accept();
        if shared.ctx.is_stopping() {
            if let Ok((stream, _)) = accepted {
                // A client (or the stop's own wake-up) that came just as it stopped.
                shared.turn_away_now(&stream, STOPPING);
            }
            break;
        }
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                let options = &shared.ctx.options;
                // Behind a proxy, `--allow`/`--deny` are for the client its header names: the
                // connection thread judges that.
                if let Some(trusted) = &options.trusted_proxies
                    && !trusted.iter().any(|range| range.contains(peer.ip()))
                {
                    info!("{peer} refused: not a trusted proxy (--trusted-proxy)");
                    shared.turnaway.refuse(stream, "not a trusted proxy");
                } else if options.trusted_proxies.is_none() && !options.access.permits(peer.ip()) {
                    info!("{peer} refused: not allowed by --allow/--deny");
                    shared.turnaway.refuse(stream, "not allowed");
                } else if starter.send((stream, peer)).is_err() {
                    break; // the starter is gone: the server is stopping
                }
            }
            Err(e) if is_transient_accept_error(&e) => debug!("accept: {e}"),
            Err(e) => {
                // Out of descriptors or memory: wait a little for clients to leave, then go on.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                warn!(
                    "accept on {} failed: {e}; retrying in {backoff:?}",
                    shared.local_addr
                );
                thread::sleep(backoff);
            }
        }
    }
    debug!("accept loop on {} ended", shared.local_addr);
}

/// Starts a thread for each accepted connection, until the accept loop ends.
fn start_loop(accepted: &mpsc::Receiver<(TcpStream, SocketAddr)>, shared: &Arc<Shared>) {
    for (stream, peer) in accepted {
        if shared.ctx.is_stopping() {
            // Accepted but never served: told so, and reset.
            shared.turn_away_now(&stream, STOPPING);
        } else {
            shared.start_connection(stream, peer);
        }
        shared.reap();
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// State shared by the accept and starter threads, every connection thread and the handles.
struct Shared {
    /// What the connections see.
    ctx: Arc<Context>,
    local_addr: SocketAddr,
    /// The listening socket, for a stop to shut: that wakes `accept` at once and resets the
    /// connections still queued, where a wake-up connect can be late on a loaded machine.
    #[cfg(target_os = "linux")]
    listener_to_shut: TcpListener,
    /// The threads the process can still start before the kernel's limit on memory maps would
    /// make the next one abort it (see [`limits::thread_room`]), shared with the chat room's
    /// drainers.
    threads: Arc<ThreadRoom>,
    registry: Mutex<Registry>,
    /// Signalled when the last live connection ends, and at the stop.
    idle: Condvar,
    connections: AtomicU64,
    /// Clients refused at accept linger here for a moment.
    turnaway: Turnaway,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    live: HashMap<u64, Live>,
    /// Threads that have finished their work, waiting to be joined.
    finished: Vec<JoinHandle<()>>,
}

struct Live {
    stream: Arc<Stream>,
    thread: Option<JoinHandle<()>>,
}

/// Removes a connection from the registry when its thread ends, even by panic.
struct Deregister<'a> {
    shared: &'a Shared,
    id: u64,
    /// Set if the thread is to park rather than exit (see [`Server::wait`]).
    park: &'a Cell<bool>,
}

impl Drop for Deregister<'_> {
    fn drop(&mut self) {
        let mut registry = self.shared.registry();
        // Decided under the lock, with where the handle goes: a thread that will park is never
        // handed to anyone who joins threads (the starter reaps finished ones between connects).
        let park = self.shared.ctx.parks_after_stop();
        if let Some(thread) = registry.live.remove(&self.id).and_then(|live| live.thread) {
            if park {
                drop(thread); // detached: it never ends
            } else {
                registry.finished.push(thread);
            }
        }
        self.park.set(park);
        debug!(
            "{} connected",
            crate::unstable::plural(registry.live.len() as u64, "client")
        );
        if registry.live.is_empty() {
            self.shared.idle.notify_all();
        }
    }
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the server is stopped; returns when it was.
    fn wait_for_stop(&self) -> Instant {
        let mut registry = self.registry();
        loop {
            if let Some(at) = self.ctx.stopped_at() {
                return at;
            }
            registry = self
                .idle
                .wait(registry)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn summary(&self) -> Summary {
        let totals = self.ctx.totals();
        let bus = self.ctx.bus_counts().unwrap_or_default();
        Summary {
            connections: self.connections.load(Ordering::Relaxed),
            messages: totals.messages,
            unprinted: totals.unprinted,
            bytes: totals.bytes,
            handshakes_failed: totals.handshakes_failed,
            proxy_headers_failed: totals.proxy_headers_failed,
            chat_bus_published: bus.published,
            chat_bus_received: bus.received,
            chat_bus_lost: bus.lost,
            chat_bus_unpublished: bus.unpublished,
        }
    }

    fn stop(&self) {
        let Some(now) = self.ctx.begin_stop() else {
            return;
        };
        {
            // Wakes `wait_for_stop`: under the lock it waits with, so the wake can't be missed.
            let _registry = self.registry();
            self.idle.notify_all();
        }
        self.turnaway.stop();
        self.ctx.sink.stop(now + DRAIN_TIME + OUTPUT_GRACE);
        // No more relaying: what is queued for chat clients is dropped, and no sender waits.
        self.ctx.room.close();
        // Cut the connections whose clients are not sending; the others get the drain time to
        // finish (see `drain`). None is missed: a connection registered after this saw
        // `stopping` and was refused.
        self.cut_quiet(false);
        self.wake_accept_loop();
    }

    /// Wakes the accept loop, if it is waiting in `accept`, to see the stop.
    fn wake_accept_loop(&self) {
        // On Linux, shutting a listening socket stops it listening and wakes `accept`.
        #[cfg(target_os = "linux")]
        if socket2::SockRef::from(&self.listener_to_shut)
            .shutdown(std::net::Shutdown::Read)
            .is_ok()
        {
            return;
        }
        // Elsewhere, a connection to it. If that doesn't get through, the backlog is full: the
        // loop is busy accepting and sees the stop by itself.
        let wake = wake_addr(self.local_addr);
        match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            // Reset: the loop woke, accepted it and turned it away before the connect returned.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => warn!("cannot wake the accept loop through {wake}: {e}"),
        }
    }

    /// After a stop: lets the connections still reading finish, for at most the drain time;
    /// cuts each as soon as it has read nothing for [`QUIET_AT_STOP`], and the rest at the end.
    fn drain(&self) {
        let Some(stopped_at) = self.ctx.stopped_at() else {
            return;
        };
        let deadline = stopped_at + DRAIN_TIME;
        loop {
            let now = Instant::now();
            let over = now >= deadline;
            if !self.cut_quiet(over) || over {
                return;
            }
            // Woken early when the last connection ends.
            let registry = self.registry();
            let wait = (deadline - now).min(QUIET_AT_STOP / 4);
            drop(
                self.idle
                    .wait_timeout(registry, wait)
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }

    /// Cuts the connections not cut yet that have read nothing for [`QUIET_AT_STOP`], or all of
    /// them if `all`; says whether any connection is left. The cuts are made outside the lock,
    /// so that the readers they wake can deregister meanwhile.
    fn cut_quiet(&self, all: bool) -> bool {
        let quiet_before = self
            .ctx
            .now_ms()
            .saturating_sub(QUIET_AT_STOP.as_millis() as u64);
        let (left, cut): (bool, Vec<Arc<Stream>>) = {
            let registry = self.registry();
            let cut = registry
                .live
                .values()
                .filter(|live| {
                    !live.stream.was_cut() && (all || live.stream.last_read() <= quiet_before)
                })
                .map(|live| Arc::clone(&live.stream))
                .collect();
            (!registry.live.is_empty(), cut)
        };
        for stream in cut {
            stream.cut();
        }
        left
    }

    fn start_connection(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let mut registry = self.registry();
        // Checked under the lock that stop() takes, so no connection escapes its cut.
        if self.ctx.is_stopping() {
            drop(registry);
            return self.turn_away_now(&tcp, STOPPING);
        }
        let live = registry.live.len();
        if live >= self.ctx.options.max_clients {
            drop(registry);
            let max = self.ctx.options.max_clients;
            info!("{peer} refused: server full ({max} clients)");
            return self
                .turnaway
                .refuse(tcp, &format!("server full ({max} clients)"));
        }
        // No thread to be had: told why, with the time to read it that every refusal gets.
        let injected = self
            .ctx
            .options
            .thread_limit
            .is_some_and(|limit| self.connections.load(Ordering::Relaxed) >= limit as u64);
        if injected || !self.threads.take() {
            drop(registry);
            let cause = if injected {
                "no more threads (injected by a test)"
            } else {
                "no room for another thread (vm.max_map_count)"
            };
            error!("{peer} refused: server full: cannot start a connection thread: {cause}");
            return self.turnaway.refuse(tcp, "server full");
        }
        let tls = self.ctx.options.tls.as_ref().map(ServerTls::config);
        let stream = match Stream::new(tcp, peer, self.ctx.now_ms(), tls) {
            Ok(stream) => Arc::new(stream),
            Err(e) => {
                drop(registry);
                self.threads.give_back();
                error!("{peer} refused: cannot start its TLS session: {e}");
                return;
            }
        };
        let id = registry.next_id;
        registry.next_id += 1;
        let shared = Arc::clone(self);
        let thread_stream = Arc::clone(&stream);
        // Logged here, before the thread can log its end, and not on the new thread: formatting
        // a log line takes a page of stack, and this thread's is already there (4 KiB less per
        // client). Under TLS, or behind a proxy, the thread says it after the handshake or the
        // header, with what it learnt.
        if !stream.is_tls() && self.ctx.options.trusted_proxies.is_none() {
            info!("{peer} connected");
        }
        // Unnamed: naming costs each new thread a system call, on the path of every connect.
        let threads = Arc::clone(&self.threads);
        // A TLS handshake's cryptography needs more stack than reading does; only the pages
        // touched are memory.
        let stack = if stream.is_tls() {
            TLS_CONNECTION_STACK
        } else {
            CONNECTION_STACK
        };
        let spawned = thread::Builder::new().stack_size(stack).spawn(move || {
            let park = Cell::new(false);
            {
                let _deregister = Deregister {
                    shared: &shared,
                    id,
                    park: &park,
                };
                connection::serve(&shared.ctx, id, &thread_stream);
            }
            drop(thread_stream);
            if park.get() {
                // After a stop, with the process exiting next: ended with it, not on its own
                // (its room is not given back: it is still there).
                loop {
                    thread::park();
                }
            }
            threads.give_back();
        });
        match spawned {
            Ok(thread) => {
                self.connections.fetch_add(1, Ordering::Relaxed);
                registry.live.insert(
                    id,
                    Live {
                        stream,
                        thread: Some(thread),
                    },
                );
                drop(registry);
                debug!(
                    "{} connected",
                    crate::unstable::plural(live as u64 + 1, "client")
                );
            }
            Err(e) => {
                drop(registry);
                self.threads.give_back();
                // Never an abort: the client is told, everyone else carries on.
                error!("{peer} refused: server full: cannot start a connection thread: {e}");
                match Arc::try_unwrap(stream) {
                    Ok(stream) => self.turnaway.refuse(stream.into_tcp(), "server full"),
                    Err(stream) => stream.tell_now("server full"),
                }
            }
        }
    }

    /// Refuses a connection that never became a client: `error: REASON` in the clear, a bare
    /// reset under TLS.
    fn turn_away_now(&self, tcp: &TcpStream, reason: &str) {
        stream::turn_away_now(tcp, reason, self.ctx.options.tls.is_none());
    }

    /// Joins connection threads that have finished, so handles don't pile up.
    fn reap(&self) {
        let finished = std::mem::take(&mut self.registry().finished);
        for thread in finished {
            let _ = thread.join();
        }
    }
}

/// Where to connect to reach our own listener: loopback when bound to "any address".
fn wake_addr(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}
