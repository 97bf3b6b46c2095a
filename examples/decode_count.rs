//! Decodes one 64 KiB read 200 times, for counting instructions: on a shared machine, times
//! drift by a fifth from hour to hour, and instruction counts don't.
//!
//! ```sh
//! cargo build --release --example decode_count
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/decode_count ascii    # or utf8, crlf, escapes
//! ```
//!
//! The reads are those of `benches/hot_path.rs`: 64-byte ASCII lines, Chinese lines, 64-byte
//! lines ending in `\r\n`, and lines full of escape sequences.

use std::hint::black_box;
use std::process::ExitCode;

use plugboard::unstable::Decoder;
use plugboard::{Batch, Framing};

fn main() -> ExitCode {
    let which = std::env::args().nth(1).unwrap_or_default();
    let line = match which.as_str() {
        "ascii" => format!("hello world 12345 {}\n", ".".repeat(45)),
        "utf8" => "我是客户端发送的消息,hello world 12345\n".to_string(),
        "crlf" => format!("hello world 12345 {}\r\n", ".".repeat(44)),
        "escapes" => "\x1b[31mred\x1b[0m and a bell \x07 here\n".to_string(),
        _ => {
            eprintln!("usage: decode_count ascii|utf8|crlf|escapes");
            return ExitCode::from(2);
        }
    };
    let mut read = Vec::with_capacity(64 * 1024);
    while read.len() + line.len() < 64 * 1024 {
        read.extend_from_slice(line.as_bytes());
    }
    let mut batch = Batch::new();
    for _ in 0..200 {
        let mut decoder = Decoder::new(Framing::Line);
        batch.clear();
        let _ = decoder.feed(black_box(&read), &mut batch);
        black_box(batch.len());
    }
    ExitCode::SUCCESS
}
