//! The library on its own: a server with a collecting sink and the blocking client, on port 0.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::support;
use plugboard::{Batch, Client, Collector, Error, Framing, Server, ServerOptions, Sink, Summary};

const TIMEOUT: Duration = Duration::from_secs(10);

fn server(options: ServerOptions) -> (Server, Arc<Collector>) {
    let collector = Arc::new(Collector::new());
    let server = Server::bind("127.0.0.1", 0, options, collector.clone()).expect("bind port 0");
    (server, collector)
}

fn connect(server: &Server) -> Client {
    Client::connect("127.0.0.1", server.local_addr().port(), TIMEOUT).expect("connect")
}

#[test]
fn port_zero_reports_the_real_port() {
    let (server, _) = server(ServerOptions::default());
    assert_ne!(server.local_addr().port(), 0);
    assert_eq!(server.local_addr().ip().to_string(), "127.0.0.1");
}

#[test]
fn greets_and_collects_messages_in_order() {
    let (server, collector) = server(ServerOptions::default().greeting(Some("hi {peer}")));
    let client = connect(&server);
    let me = client.local_addr().expect("local addr");
    let mut received = client.receiver();
    assert_eq!(
        received.next().expect("greeting").expect("ok"),
        format!("hi {me}")
    );
    for i in 0..100 {
        client.send(&format!("message {i}")).expect("send");
    }
    client.finish().expect("half-close");
    assert!(
        support::bounded(TIMEOUT, "server close", move || received.next().is_none()),
        "nothing but the greeting expected"
    );
    let messages = collector.messages();
    let expected: Vec<(SocketAddr, String)> =
        (0..100).map(|i| (me, format!("message {i}"))).collect();
    assert_eq!(messages, expected);
    server.stop();
    let summary = server.join().expect("join");
    assert_eq!((summary.connections, summary.messages), (1, 100));
}

#[test]
fn no_greeting_when_none_is_set() {
    let (server, collector) = server(ServerOptions::default().greeting(None::<String>));
    let client = connect(&server);
    let mut received = client.receiver();
    client.send("only").expect("send");
    client.finish().expect("half-close");
    let rest: Vec<_> = support::bounded(TIMEOUT, "receive", move || {
        received.by_ref().collect::<Vec<_>>()
    });
    assert!(rest.is_empty(), "expected no greeting, got {rest:?}");
    assert_eq!(collector.wait_for(1, TIMEOUT)[0].1, "only");
}

#[test]
fn a_line_cut_inside_a_character_arrives_whole() {
    let (server, collector) = server(ServerOptions::default());
    let mut stream = TcpStream::connect(server.local_addr()).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let bytes = "我是客户端发送的消息\r\n".as_bytes();
    for byte in bytes {
        stream.write_all(&[*byte]).expect("write");
    }
    stream.shutdown(Shutdown::Write).expect("half-close");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("read to the server's close");
    let messages = collector.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0].1, "我是客户端发送的消息");
}

#[test]
fn raw_framing_passes_chunks_through() {
    let (server, collector) = server(
        ServerOptions::default()
            .framing(Framing::Raw)
            .greeting(Some("raw hello")),
    );
    let client = connect(&server).with_framing(Framing::Raw);
    let mut received = client.receiver();
    assert_eq!(received.next().expect("greeting").expect("ok"), "raw hello");
    client.send("hello world0").expect("send");
    client.send("你好").expect("send");
    client.finish().expect("half-close");
    assert!(support::bounded(TIMEOUT, "server close", move || received
        .next()
        .is_none()));
    let text: String = collector.messages().into_iter().map(|(_, m)| m).collect();
    assert_eq!(text, "hello world0你好");
}

/// What a client still connected at a stop receives: the reason, then a reset (never the clean
/// close that would confirm delivery).
fn cut_off_by_the_stop(mut receiver: plugboard::Receiver) {
    let mut rest: Vec<_> = support::bounded(TIMEOUT, "client sees the end", move || {
        receiver.by_ref().collect()
    });
    if rest.first().is_some_and(|first| {
        first
            .as_ref()
            .is_ok_and(|line| line.starts_with(support::greeting_prefix()))
    }) {
        let _greeting = rest.remove(0); // not read yet by the caller
    }
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert_eq!(rest[0].as_deref().ok(), Some("error: server stopping"));
    assert!(
        matches!(&rest[1], Err(Error::Connection { source, .. }) if source.kind() == io::ErrorKind::ConnectionReset),
        "{rest:?}"
    );
}

/// Twenty clients each send a line; then `finish` stops the server and waits for it. Every
/// message is counted and every client is told it was cut off.
fn twenty_clients_then(finish: impl FnOnce(Server) -> Result<Summary, Error> + Send + 'static) {
    let (server, collector) = server(ServerOptions::default());
    let clients: Vec<Client> = (0..20).map(|_| connect(&server)).collect();
    let mut receivers: Vec<_> = clients.iter().map(Client::receiver).collect();
    for (i, client) in clients.iter().enumerate() {
        let greeting = receivers[i].next().expect("greeting").expect("ok");
        assert!(
            greeting.starts_with(support::greeting_prefix()),
            "{greeting}"
        );
        client.send(&format!("from {i}")).expect("send");
    }
    assert_eq!(collector.wait_for(20, TIMEOUT).len(), 20);
    let summary = support::bounded(TIMEOUT, "stop", move || finish(server)).expect("stop");
    assert_eq!((summary.connections, summary.messages), (20, 20));
    for receiver in receivers {
        cut_off_by_the_stop(receiver);
    }
}

#[test]
fn stop_closes_live_connections_and_joins() {
    twenty_clients_then(|server| {
        server.stop();
        server.join()
    });
}

#[test]
fn wait_returns_once_every_connection_is_done_and_closed() {
    // Waiting before the stop, so that the connections end while it waits and their threads
    // park: they never exit, but every client is still told the end.
    twenty_clients_then(|server| {
        let stopper = server.stopper();
        let waited = thread::spawn(move || server.wait());
        stopper.stop();
        waited.join().expect("wait thread")
    });
}

#[test]
fn wait_returns_when_a_stop_lands_among_connects() {
    // Connections ending after the stop park; the thread that starts connections must never
    // wait for one of them (it joins finished threads between connects).
    for trial in 0..5 {
        let (server, _) = server(ServerOptions::default());
        let addr = server.local_addr();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn: Vec<_> = (0..8)
            .map(|_| {
                let done = Arc::clone(&done);
                thread::spawn(move || {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(stream) = TcpStream::connect_timeout(&addr, TIMEOUT) {
                            drop(stream);
                        }
                    }
                })
            })
            .collect();
        // The race needs connects arriving as the stop lands.
        let deadline = std::time::Instant::now() + TIMEOUT;
        while server.summary().connections < 100 {
            assert!(
                std::time::Instant::now() < deadline,
                "no connects in trial {trial}"
            );
            thread::yield_now();
        }
        let stopper = server.stopper();
        let waited = thread::spawn(move || server.wait());
        stopper.stop();
        support::bounded(TIMEOUT, &format!("wait in trial {trial}"), move || {
            waited.join()
        })
        .expect("wait thread")
        .expect("wait");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in churn {
            thread.join().expect("churn thread");
        }
    }
}

#[test]
fn stop_from_another_thread_and_drop_are_safe() {
    let (server, _) = server(ServerOptions::default());
    let stopper = server.stopper();
    let client = connect(&server);
    // Once it is being served: one still in the listen backlog gets a bare reset, no line.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while server.summary().connections == 0 {
        assert!(std::time::Instant::now() < deadline, "never served");
        thread::yield_now();
    }
    thread::spawn(move || stopper.stop());
    support::bounded(TIMEOUT, "join", move || server.join()).expect("join");
    // Cut off before or after its greeting, depending on when the stop landed.
    cut_off_by_the_stop(client.receiver());
    // A server dropped while running stops and joins too.
    let (dropped, _) = self::server(ServerOptions::default());
    let addr = dropped.local_addr();
    support::bounded(TIMEOUT, "drop", move || drop(dropped));
    let refused = TcpStream::connect_timeout(&addr, TIMEOUT);
    assert!(refused.is_err(), "nobody listens after drop");
}

struct FailingSink;

impl Sink for FailingSink {
    fn deliver(&self, _: SocketAddr, _: &Batch) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::BrokenPipe, "reader gone"))
    }
}

#[test]
fn a_failing_sink_stops_the_server_with_an_output_error() {
    let server = Server::bind(
        "127.0.0.1",
        0,
        ServerOptions::default(),
        Arc::new(FailingSink),
    )
    .expect("bind");
    let client = connect(&server);
    client.send("lost").expect("send");
    let result = support::bounded(TIMEOUT, "join", move || server.join());
    assert!(
        matches!(&result, Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe),
        "{result:?}"
    );
}

#[test]
fn errors_name_the_address() {
    let (server, _) = server(ServerOptions::default());
    let addr = server.local_addr();
    let taken = Server::bind(
        "127.0.0.1",
        addr.port(),
        ServerOptions::default(),
        Arc::new(Collector::new()),
    )
    .expect_err("port in use");
    assert!(matches!(taken, Error::Bind { .. }));
    assert_eq!(taken.to_string(), format!("cannot listen on {addr}"));
    drop(server);

    let refused = Client::connect("127.0.0.1", addr.port(), TIMEOUT).expect_err("nobody listens");
    assert!(
        matches!(&refused, Error::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    assert_eq!(refused.to_string(), format!("cannot connect to {addr}"));
}

/// When the system has no more threads to give, the client that needed one is told `error:
/// server full` and reset; the server neither aborts nor stops serving the others. (Thread
/// creation is made to fail through the library: as root, `ulimit -u` is not enforced here.)
#[test]
fn no_thread_to_be_had_refuses_that_client_and_serves_the_others() {
    let (server, collector) = server(ServerOptions::default().fail_threads_after(2));
    let served: Vec<Client> = (0..2).map(|_| connect(&server)).collect();
    let mut receivers: Vec<_> = served.iter().map(Client::receiver).collect();
    for receiver in &mut receivers {
        let greeting = receiver.next().expect("greeting").expect("ok");
        assert!(
            greeting.starts_with(support::greeting_prefix()),
            "{greeting}"
        );
    }
    let refused = connect(&server);
    let told: Vec<_> = support::bounded(TIMEOUT, "refusal", {
        let mut receiver = refused.receiver();
        move || receiver.by_ref().collect()
    });
    assert_eq!(told.len(), 2, "{told:?}");
    assert_eq!(told[0].as_deref().ok(), Some("error: server full"));
    assert!(
        matches!(&told[1], Err(Error::Connection { source, .. }) if source.kind() == io::ErrorKind::ConnectionReset),
        "{told:?}"
    );
    // The others carry on: heard, printed, confirmed.
    for (i, (client, mut receiver)) in served.iter().zip(receivers).enumerate() {
        client.send(&format!("still here {i}")).expect("send");
        client.finish().expect("finish");
        assert!(support::bounded(TIMEOUT, "confirmation", move || receiver
            .next()
            .is_none()));
    }
    assert_eq!(collector.messages().len(), 2);
    server.stop();
    let summary = support::bounded(TIMEOUT, "join", move || server.join()).expect("join");
    assert_eq!(summary.connections, 2);
}
