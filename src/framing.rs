//! Bytes to messages: line and raw framing.
//!
//! TCP is a byte stream: a read may hold half a message, several messages, or end inside a
//! multi-byte UTF-8 character. A [`Decoder`] keeps what is incomplete between reads, so the
//! messages it yields are the same however the bytes were split.

use std::fmt;
use std::str::FromStr;

/// How messages are delimited on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Framing {
    /// UTF-8 text lines ending in `\n`; a trailing `\r` is dropped, so `nc` and `telnet` work.
    #[default]
    Line,
    /// No delimiter: each chunk read is one message, never cut inside a UTF-8 character.
    ///
    /// This is how the original C# demo programs talk: they send no newlines.
    Raw,
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Framing::Line => "line",
            Framing::Raw => "raw",
        })
    }
}

/// The error for a framing name that is neither `line` nor `raw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFraming(String);

impl fmt::Display for UnknownFraming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown framing {:?} (expected line or raw)", self.0)
    }
}

impl std::error::Error for UnknownFraming {}

impl FromStr for Framing {
    type Err = UnknownFraming;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "line" => Ok(Framing::Line),
            "raw" => Ok(Framing::Raw),
            other => Err(UnknownFraming(other.to_string())),
        }
    }
}

/// Messages decoded from one or more reads, stored back to back in one buffer.
///
/// A connection reuses one `Batch` for its whole life, so decoding allocates nothing per message.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    text: String,
    ends: Vec<usize>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// How many messages the batch holds.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Total length in bytes of the messages' text.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// The messages, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let message = &self.text[start..end];
            start = end;
            message
        })
    }

    /// Appends one message.
    pub fn push(&mut self, message: &str) {
        self.text.push_str(message);
        self.ends.push(self.text.len());
    }

    /// Appends one message decoded from bytes, invalid UTF-8 replaced by U+FFFD.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.push(text),
            Err(_) => self.push(&String::from_utf8_lossy(bytes)),
        }
    }

    /// Removes every message, keeping the memory for reuse.
    pub fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
    }
}

/// Splits a byte stream into messages according to a [`Framing`].
#[derive(Debug, Clone)]
pub struct Decoder {
    framing: Framing,
    // Line: the start of a line whose `\n` has not arrived. Raw: a cut UTF-8 character (<= 3 bytes).
    pending: Vec<u8>,
}

impl Decoder {
    /// A decoder with nothing buffered.
    pub fn new(framing: Framing) -> Decoder {
        Decoder {
            framing,
            pending: Vec::new(),
        }
    }

    /// The framing this decoder applies.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Bytes held back waiting for the rest of a message.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Decodes the next bytes of the stream, appending every message they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Batch) {
        match self.framing {
            Framing::Line => self.feed_lines(bytes, out),
            Framing::Raw => self.feed_raw(bytes, out),
        }
    }

    /// Ends the stream: whatever is held back (a last line without `\n`) becomes a message.
    pub fn finish(&mut self, out: &mut Batch) {
        if self.pending.is_empty() {
            return;
        }
        match self.framing {
            Framing::Line => out.push_bytes(strip_cr(&self.pending)),
            Framing::Raw => out.push_bytes(&self.pending),
        }
        self.pending.clear();
    }

    fn feed_lines(&mut self, mut bytes: &[u8], out: &mut Batch) {
        if !self.pending.is_empty() {
            let Some(newline) = memchr::memchr(b'\n', bytes) else {
                self.pending.extend_from_slice(bytes);
                return;
            };
            self.pending.extend_from_slice(&bytes[..newline]);
            out.push_bytes(strip_cr(&self.pending));
            self.pending.clear();
            bytes = &bytes[newline + 1..];
        }
        let mut start = 0;
        for newline in memchr::memchr_iter(b'\n', bytes) {
            out.push_bytes(strip_cr(&bytes[start..newline]));
            start = newline + 1;
        }
        self.pending.extend_from_slice(&bytes[start..]);
    }

    fn feed_raw(&mut self, bytes: &[u8], out: &mut Batch) {
        if self.pending.is_empty() {
            let keep = incomplete_utf8_tail(bytes);
            let (ready, rest) = bytes.split_at(bytes.len() - keep);
            if !ready.is_empty() {
                out.push_bytes(ready);
            }
            self.pending.extend_from_slice(rest);
        } else {
            self.pending.extend_from_slice(bytes);
            let keep = incomplete_utf8_tail(&self.pending);
            let ready = self.pending.len() - keep;
            if ready > 0 {
                out.push_bytes(&self.pending[..ready]);
                self.pending.drain(..ready);
            }
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// How many bytes at the end of `bytes` are the start of a UTF-8 character cut short (0 to 3).
fn incomplete_utf8_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: the lead byte is further back
        }
        let width = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if width > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(framing: Framing, pieces: &[&[u8]]) -> Vec<String> {
        let mut decoder = Decoder::new(framing);
        let mut batch = Batch::new();
        for piece in pieces {
            decoder.feed(piece, &mut batch);
        }
        decoder.finish(&mut batch);
        batch.iter().map(str::to_string).collect()
    }

    #[test]
    fn lines_are_split_on_newline_and_lose_one_trailing_cr() {
        let got = decode(Framing::Line, &[b"a\nb\r\n\nc\r\r\nlast"]);
        assert_eq!(got, ["a", "b", "", "c\r", "last"]);
    }

    #[test]
    fn a_line_split_inside_a_character_is_whole() {
        let text = "我是客户端\n".as_bytes();
        let got = decode(Framing::Line, &[&text[..1], &text[1..4], &text[4..]]);
        assert_eq!(got, ["我是客户端"]);
    }

    #[test]
    fn raw_never_cuts_a_character() {
        let text = "a€b".as_bytes(); // '€' is 3 bytes
        let got = decode(Framing::Raw, &[&text[..2], &text[2..3], &text[3..]]);
        assert_eq!(got, ["a", "€b"]);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        assert_eq!(decode(Framing::Line, &[b"a\xffb\n"]), ["a\u{fffd}b"]);
        assert_eq!(decode(Framing::Raw, &[b"a\xff"]), ["a\u{fffd}"]);
        // A cut character at the very end of the stream is decoded as invalid, not dropped.
        assert_eq!(decode(Framing::Raw, &[b"x\xe2\x82"]), ["x", "\u{fffd}"]);
    }

    #[test]
    fn incomplete_tail_lengths() {
        assert_eq!(incomplete_utf8_tail(b""), 0);
        assert_eq!(incomplete_utf8_tail(b"abc"), 0);
        assert_eq!(incomplete_utf8_tail("€".as_bytes()), 0);
        assert_eq!(incomplete_utf8_tail(&"€".as_bytes()[..2]), 2);
        assert_eq!(incomplete_utf8_tail(&"😀".as_bytes()[..3]), 3);
        assert_eq!(incomplete_utf8_tail(&"😀".as_bytes()[..1]), 1);
        assert_eq!(incomplete_utf8_tail(b"\x80\x80\x80"), 0);
    }

    #[test]
    fn framing_names_round_trip() {
        for framing in [Framing::Line, Framing::Raw] {
            assert_eq!(framing.to_string().parse::<Framing>(), Ok(framing));
        }
        assert!("lines".parse::<Framing>().is_err());
    }

    /// Cuts `bytes` at the given (sorted, deduplicated) positions.
    fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut start = 0;
        for &at in cuts {
            pieces.push(&bytes[start..at]);
            start = at;
        }
        pieces.push(&bytes[start..]);
        pieces
    }

    fn text_and_cuts() -> impl Strategy<Value = (String, Vec<usize>)> {
        "(\\PC|\r|\n){0,200}".prop_flat_map(|text| {
            let len = text.len();
            (Just(text), proptest::collection::vec(0..=len, 0..20))
        })
    }

    proptest! {
        #[test]
        fn line_framing_ignores_how_bytes_are_split((text, mut cuts) in text_and_cuts()) {
            cuts.sort_unstable();
            let whole = decode(Framing::Line, &[text.as_bytes()]);
            prop_assert_eq!(decode(Framing::Line, &cut(text.as_bytes(), &cuts)), whole);
        }

        #[test]
        fn raw_framing_keeps_text_and_characters_whole((text, mut cuts) in text_and_cuts()) {
            cuts.sort_unstable();
            let messages = decode(Framing::Raw, &cut(text.as_bytes(), &cuts));
            prop_assert_eq!(messages.concat(), text);
            prop_assert!(messages.iter().all(|m| !m.is_empty()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), mut cuts in proptest::collection::vec(0..300usize, 0..10)) {
            cuts.retain(|&c| c <= bytes.len());
            cuts.sort_unstable();
            let whole = decode(Framing::Line, &[&bytes]);
            prop_assert_eq!(decode(Framing::Line, &cut(&bytes, &cuts)), whole);
            let whole_raw: String = decode(Framing::Raw, &[&bytes]).concat();
            prop_assert_eq!(decode(Framing::Raw, &cut(&bytes, &cuts)).concat(), whole_raw);
        }
    }
}
