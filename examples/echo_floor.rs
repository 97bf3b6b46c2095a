//! The floor for round-trip benchmarks: a minimal blocking echo server, std only, that copies
//! bytes back and does nothing else (no framing, no printing). With `--discard` it only reads,
//! which measures how fast one client can send.
//!
//! `cargo run --release --example echo_floor [-- --discard]` prints `listening on ADDR` on stderr.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

fn serve(mut stream: TcpStream, discard: bool) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) if !discard => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Ok(_) => {}
        }
    }
}

fn main() -> std::io::Result<()> {
    let discard = std::env::args().any(|a| a == "--discard");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    eprintln!("listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let stream = stream?;
        thread::spawn(move || serve(stream, discard));
    }
    Ok(())
}
