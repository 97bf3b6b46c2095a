//! The server's per-message work, without sockets: framing a read, escaping, formatting output.
//!
//! `cargo bench --bench hot_path` (not on Windows, where criterion isn't built).

#[cfg(windows)]
fn main() {}

#[cfg(not(windows))]
mod bench {

    use std::hint::black_box;
    use std::net::SocketAddr;

    use criterion::{Criterion, Throughput, criterion_group};
    use plugboard::unstable::{Decoder, escape_into, format_batch};
    use plugboard::{Batch, Framing};

    /// A 64 KiB read of `line` repeated (each with `\n`), like one read from a busy client.
    fn read_of(line: &str) -> Vec<u8> {
        let mut read = Vec::with_capacity(64 * 1024);
        while read.len() + line.len() < 64 * 1024 {
            read.extend_from_slice(line.as_bytes());
        }
        read
    }

    fn framing(c: &mut Criterion) {
        let mut group = c.benchmark_group("decode 64 KiB read");
        let cases = [
            (
                "ascii 64 B lines",
                format!("hello world 12345 {}\n", ".".repeat(45)),
            ),
            (
                "utf-8 lines",
                "我是客户端发送的消息,hello world 12345\n".to_string(),
            ),
            (
                "ascii 64 B lines ending in \\r\\n",
                format!("hello world 12345 {}\r\n", ".".repeat(44)),
            ),
            (
                "lines with escapes",
                "\x1b[31mred\x1b[0m and a bell \x07 here\n".to_string(),
            ),
        ];
        for (name, line) in cases {
            let read = read_of(&line);
            group.throughput(Throughput::Bytes(read.len() as u64));
            let mut batch = Batch::new();
            group.bench_function(name, |b| {
                b.iter(|| {
                    let mut decoder = Decoder::new(Framing::Line);
                    batch.clear();
                    let _ = decoder.feed(black_box(&read), &mut batch);
                    black_box(batch.len())
                })
            });
        }
        group.finish();
    }

    fn output(c: &mut Criterion) {
        let read = read_of(&format!("hello world 12345 {}\n", ".".repeat(45)));
        let mut batch = Batch::new();
        let _ = Decoder::new(Framing::Line).feed(&read, &mut batch);
        let peer: SocketAddr = "127.0.0.1:53422".parse().expect("address");
        let mut group = c.benchmark_group("format");
        group.throughput(Throughput::Elements(batch.len() as u64));
        let mut buf = Vec::new();
        group.bench_function("PEER MESSAGE lines for a 64 KiB read", |b| {
            b.iter(|| {
                buf.clear();
                format_batch(&mut buf, black_box(peer), &batch);
                black_box(buf.len())
            })
        });
        let hostile = "\x1b]0;title\x07\x1b[2J\u{9b}31m".repeat(20);
        group.throughput(Throughput::Bytes(hostile.len() as u64));
        group.bench_function("escape control characters", |b| {
            b.iter(|| {
                let mut out = String::new();
                escape_into(&mut out, black_box(&hostile), false);
                black_box(out.len())
            })
        });
        group.finish();
    }

    criterion_group!(benches, framing, output);
}

#[cfg(not(windows))]
fn main() {
    bench::benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
