//! Bytes to messages: line and raw framing.
//!
//! TCP is a byte stream: a read may hold half a message, several messages, or end inside a
//! multi-byte UTF-8 character. A [`Decoder`] keeps what is incomplete between reads, so the
//! messages it yields are the same however the bytes were split.
//!
//! Every message is decoded as UTF-8 (invalid bytes become U+FFFD) and its control characters are
//! escaped ([`escape_into`]), so a peer can neither inject terminal escape sequences nor fake a
//! line in what is printed or relayed.

use std::fmt;
use std::str::FromStr;

use crate::scan;

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
    /// Up to `used`, each message followed by `\n`. Only ever valid UTF-8 (checked, escaped or
    /// plain ASCII as it goes in); kept as bytes so printing it needs no second check. The `\n`
    /// after each lets a run of plain lines go in with one copy, and a message go out with its
    /// newline in one.
    ///
    /// After `used`: room a connection reads into (see [`Decoder::read_room`]), kept initialised
    /// across batches, so that plain lines are decoded where they were read, not copied.
    text: Vec<u8>,
    /// How much of `text` holds messages.
    used: usize,
    /// Where each message's `\n` is in `text`.
    ends: Vec<usize>,
    /// The messages' bytes exactly as received, with line framing's `\n`: kept only when asked
    /// for, by an echo server.
    raw: Option<Vec<u8>>,
}

impl Batch {
    /// An empty batch (to [`push`](Batch::push) messages into, for trying out a
    /// [`Sink`](crate::Sink)).
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
        self.used - self.ends.len()
    }

    /// The messages, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        // Always valid (see `text`), so this never falls back to "".
        self.lines()
            .map(|line| std::str::from_utf8(&line[..line.len() - 1]).unwrap_or_default())
    }

    /// Each message as UTF-8 bytes followed by `\n`, oldest first: for writing them out as lines
    /// without a second check.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let line = &self.text[start..=end];
            start = end + 1;
            line
        })
    }

    /// Every message with its `\n`, back to back, and where each `\n` is: for copying the
    /// messages out in blocks.
    pub(crate) fn text_and_ends(&self) -> (&[u8], &[usize]) {
        (&self.text[..self.used], &self.ends)
    }

    /// The messages' text, to append to (the read room after it is given up).
    fn text_to_append(&mut self) -> &mut Vec<u8> {
        self.text.truncate(self.used);
        &mut self.text
    }

    fn end_message(&mut self) {
        reserve(&mut self.ends, 1);
        self.ends.push(self.text.len());
        self.text.push(b'\n');
        self.used = self.text.len();
    }

    /// Appends one message.
    pub fn push(&mut self, message: &str) {
        extend(self.text_to_append(), message.as_bytes());
        self.end_message();
    }

    #[doc(hidden)] // the decoder's
    /// Appends one message decoded from bytes: invalid UTF-8 becomes U+FFFD and control
    /// characters are escaped (newlines too, unless `keep_newlines`).
    pub fn push_bytes(&mut self, bytes: &[u8], keep_newlines: bool) {
        let text = self.text_to_append();
        reserve(text, bytes.len() + 1);
        if is_printable_ascii(bytes) {
            // By far the most common case, checked 8 bytes at a time: copied as it is.
            text.extend_from_slice(bytes);
        } else {
            match std::str::from_utf8(bytes) {
                Ok(_) if !may_need_escape(bytes) => text.extend_from_slice(bytes),
                Ok(valid) => escape(text, valid, keep_newlines),
                Err(_) => escape(text, &String::from_utf8_lossy(bytes), keep_newlines),
            }
        }
        self.end_message();
    }

    #[doc(hidden)] // the decoder's
    /// Removes every message, keeping the memory for reuse.
    pub fn clear(&mut self) {
        self.used = 0;
        self.ends.clear();
        if let Some(raw) = &mut self.raw {
            raw.clear();
        }
    }

    /// Bytes its buffers hold, for a connection's memory accounting.
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.text.capacity()
            + self.ends.capacity() * size_of::<usize>()
            + self.raw.as_ref().map_or(0, Vec::capacity)
    }

    /// Gives back the memory of an empty batch beyond a small size (a connection gone quiet).
    pub(crate) fn shrink(&mut self) {
        // Past `used` is only read room, which `room` makes again when it is needed.
        self.text.truncate(self.used);
        shrink(&mut self.text);
        shrink(&mut self.ends);
        if let Some(raw) = &mut self.raw {
            shrink(raw);
        }
    }

    #[doc(hidden)] // the decoder's
    /// Also keeps the bytes of each message exactly as they came (see [`raw`](Batch::raw)).
    pub fn keep_raw(mut self) -> Batch {
        self.raw = Some(Vec::new());
        self
    }

    #[doc(hidden)] // the decoder's
    /// The messages' bytes exactly as received (a line with its `\r`, if any, and `\n`; a raw
    /// chunk as it was), or nothing unless [`keep_raw`](Batch::keep_raw) was set.
    pub fn raw(&self) -> &[u8] {
        self.raw.as_deref().unwrap_or_default()
    }

    /// Appends the complete lines at the start of `bytes` with one copy, if they are plain: valid
    /// UTF-8 with nothing to escape (see [`scan::plain_lines`]). Returns how many bytes that took
    /// and whether it stopped at a line longer than `max_line`, or `None` if `bytes` isn't plain.
    fn push_plain_lines(&mut self, bytes: &[u8], max_line: usize) -> Option<(usize, bool)> {
        // Lines of 64 bytes or more need no more room for their ends; shorter ones grow it.
        reserve(&mut self.ends, bytes.len() / 64);
        let (complete, too_long) = scan::plain_lines(bytes, self.used, max_line, &mut self.ends)?;
        extend(self.text_to_append(), &bytes[..complete]);
        self.used = self.text.len();
        self.record_raw(&bytes[..complete], b"");
        Some((complete, too_long))
    }

    /// Room for a read of `size` bytes that leaves `keep` bytes free before it, right after the
    /// messages.
    fn room(&mut self, keep: usize, size: usize) -> &mut [u8] {
        let start = self.used + keep;
        if self.text.len() < start + size {
            let more = start + size - self.text.len();
            reserve(&mut self.text, more);
            self.text.resize(start + size, 0);
        }
        &mut self.text[start..start + size]
    }

    /// Takes the plain lines of the `len` bytes after the messages, where they are (see
    /// [`scan::plain_lines`]). Returns how many bytes they took and whether a line was too long,
    /// or `None` if the bytes aren't plain.
    fn take_plain_lines(&mut self, len: usize, max_line: usize) -> Option<(usize, bool)> {
        let start = self.used;
        reserve(&mut self.ends, len / 64);
        let bytes = &self.text[start..start + len];
        let (complete, too_long) = scan::plain_lines(bytes, start, max_line, &mut self.ends)?;
        if let Some(raw) = &mut self.raw {
            extend(raw, &bytes[..complete]);
        }
        self.used += complete;
        Some((complete, too_long))
    }

    fn record_raw(&mut self, bytes: &[u8], terminator: &[u8]) {
        if let Some(raw) = &mut self.raw {
            extend(raw, bytes);
            extend(raw, terminator);
        }
    }
}

/// The longest unfinished line moved in front of the next read to decode it in place (see
/// [`Decoder::read_room`]).
const IN_PLACE_KEEP: usize = 4 * 1024;

/// A buffer up to this size grows as it needs; past it, it grows straight to [`LARGE_BUFFER`].
/// So a buffer is small or large, never one of the sizes in between: those, given back when a
/// connection goes quiet, would be left as holes in the allocator's heap, and the memory with
/// them (the `server` binary has the allocator map large blocks on their own, which go back to
/// the system whole).
const SMALL_BUFFER: usize = 4 * 1024;
/// The size a buffer grows to from [`SMALL_BUFFER`]; beyond it, it doubles.
pub(crate) const LARGE_BUFFER: usize = 64 * 1024;

/// How many items a vector that must hold `needed` of them is sized for, the way
/// [`SMALL_BUFFER`] says.
fn sized_for<T>(needed: usize) -> usize {
    let item = size_of::<T>().max(1);
    if needed * item <= SMALL_BUFFER {
        needed
    } else {
        needed.max(LARGE_BUFFER / item)
    }
}

/// Makes room in `v` for `additional` more items, the way [`SMALL_BUFFER`] says.
pub(crate) fn reserve<T>(v: &mut Vec<T>, additional: usize) {
    let needed = v.len() + additional;
    if needed > v.capacity() {
        v.reserve(sized_for::<T>(needed) - v.len());
    }
}

/// Gives back the memory `v` holds beyond what its items need, keeping them: a new vector, rather
/// than shrinking in place, which would leave a large block's mapping behind, one per connection.
fn shrink<T: Copy>(v: &mut Vec<T>) {
    if v.capacity() > sized_for::<T>(v.len()) {
        let mut fit = Vec::new();
        reserve(&mut fit, v.len());
        fit.extend_from_slice(v);
        *v = fit;
    }
}

/// Appends `bytes` to `v`, growing it the way [`SMALL_BUFFER`] says.
fn extend(v: &mut Vec<u8>, bytes: &[u8]) {
    reserve(v, bytes.len());
    v.extend_from_slice(bytes);
}

/// The longest line, in bytes, a server accepts by default.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;

/// A line longer than the decoder's limit: the stream can't be framed any further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong {
    /// The limit, in bytes.
    pub max: usize,
}

impl fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line too long (max {} bytes)", self.max)
    }
}

impl std::error::Error for LineTooLong {}

/// Splits a byte stream into messages according to a [`Framing`].
///
/// In line framing a line may be at most [`max_line`](Decoder::max_line) bytes (not counting its
/// `\n` or `\r\n`), so a peer can't make it buffer without bound; once a line is too long the
/// decoder refuses everything after it.
#[derive(Debug, Clone)]
pub struct Decoder {
    framing: Framing,
    max_line: usize,
    keep_newlines: bool,
    failed: bool,
    // Line: the start of a line whose `\n` has not arrived. Raw: a cut UTF-8 character (<= 3 bytes).
    pending: Vec<u8>,
    /// How many bytes of `pending` the last [`read_room`](Decoder::read_room) left room for.
    kept: usize,
    /// Bytes read in place that must be decoded with copies after all.
    scratch: Vec<u8>,
}

impl Decoder {
    /// A decoder with nothing buffered and a line limit of [`DEFAULT_MAX_LINE`].
    pub fn new(framing: Framing) -> Decoder {
        Decoder {
            framing,
            max_line: DEFAULT_MAX_LINE,
            keep_newlines: false,
            failed: false,
            pending: Vec::new(),
            kept: 0,
            scratch: Vec::new(),
        }
    }

    /// Sets the longest line accepted, in bytes (line framing only; raw chunks are never longer
    /// than one read).
    pub fn max_line(mut self, max_line: usize) -> Decoder {
        self.max_line = max_line;
        self
    }

    /// Leaves `\n` unescaped inside messages: for showing raw chunks on a terminal.
    pub fn keep_newlines(mut self, keep: bool) -> Decoder {
        self.keep_newlines = keep;
        self
    }

    /// The framing this decoder applies.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Bytes held back waiting for the rest of a message.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Bytes its buffers hold, for a connection's memory accounting.
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.pending.capacity() + self.scratch.capacity()
    }

    /// Gives back memory it holds beyond what an unfinished line needs (a connection gone quiet).
    pub(crate) fn shrink(&mut self) {
        self.scratch = Vec::new();
        shrink(&mut self.pending);
    }

    /// Decodes the next bytes of the stream, appending every message they complete to `out`.
    ///
    /// On a line that is too long, the messages before it are in `out` and the error is returned,
    /// now and for every later call.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Batch) -> Result<(), LineTooLong> {
        if self.failed {
            return Err(self.too_long());
        }
        match self.framing {
            Framing::Line => self.feed_lines(bytes, out),
            Framing::Raw => {
                self.feed_raw(bytes, out);
                Ok(())
            }
        }
    }

    /// Room in `batch` for reading up to `size` bytes of the stream: read into it, then pass
    /// how many bytes came to [`decode_read`](Decoder::decode_read) before anything else.
    ///
    /// Decoding the bytes where they were read saves a copy of every plain line: the lines are
    /// already in the batch. Room is left before the read for the start of a line held back.
    pub(crate) fn read_room<'b>(&mut self, batch: &'b mut Batch, size: usize) -> &'b mut [u8] {
        // A long unfinished line is not moved in front of every read: that would copy it again
        // and again (a line trickling in a byte a read, say). Nor is one longer than the read:
        // copying the read is then cheaper. Its continuation is decoded with a copy, as by `feed`.
        self.kept =
            if self.framing == Framing::Line && self.pending.len() <= IN_PLACE_KEEP.min(size) {
                self.pending.len()
            } else {
                0
            };
        batch.room(self.kept, size)
    }

    /// Decodes the `n` bytes read into the room [`read_room`](Decoder::read_room) gave, like
    /// [`feed`](Decoder::feed).
    pub(crate) fn decode_read(&mut self, n: usize, batch: &mut Batch) -> Result<(), LineTooLong> {
        if self.failed {
            return Err(self.too_long());
        }
        let kept = std::mem::take(&mut self.kept);
        let start = batch.used;
        if self.framing != Framing::Line || self.pending.len() != kept {
            // Framed otherwise, or after a long unfinished line: as `feed` does.
            return self.decode_copy(batch, start + kept..start + kept + n, Decoder::feed);
        }
        let read = start..start + kept + n;
        batch.text[start..start + kept].copy_from_slice(&self.pending);
        self.pending.clear();
        match batch.take_plain_lines(read.len(), self.max_line) {
            Some((_, true)) => Err(self.too_long()),
            Some((complete, false)) => {
                extend(&mut self.pending, &batch.text[start + complete..read.end]);
                self.check_pending()
            }
            // Known not to be plain, so not checked again.
            None => self.decode_copy(batch, read, Decoder::lines_one_by_one),
        }
    }

    /// Decodes bytes in `batch`'s read room with `decode`, from a copy: decoding appends to the
    /// batch where the bytes lie.
    fn decode_copy(
        &mut self,
        batch: &mut Batch,
        room: std::ops::Range<usize>,
        decode: fn(&mut Decoder, &[u8], &mut Batch) -> Result<(), LineTooLong>,
    ) -> Result<(), LineTooLong> {
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        extend(&mut bytes, &batch.text[room]);
        let decoded = decode(self, &bytes, batch);
        if bytes.capacity() <= DEFAULT_MAX_LINE {
            self.scratch = bytes;
        }
        decoded
    }

    /// Ends the stream: whatever is held back (a last line without `\n`) becomes a message.
    pub fn finish(&mut self, out: &mut Batch) -> Result<(), LineTooLong> {
        if self.failed {
            return Err(self.too_long());
        }
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            match self.framing {
                Framing::Line => self.push_line(&pending, out)?,
                Framing::Raw => {
                    out.push_bytes(&pending, self.keep_newlines);
                    out.record_raw(&pending, b"");
                }
            }
        }
        Ok(())
    }

    fn too_long(&mut self) -> LineTooLong {
        self.failed = true;
        self.pending = Vec::new();
        LineTooLong { max: self.max_line }
    }

    /// Pushes one line (without its `\n`), or fails if it is over the limit.
    fn push_line(&mut self, line: &[u8], out: &mut Batch) -> Result<(), LineTooLong> {
        let text = strip_cr(line);
        if text.len() > self.max_line {
            return Err(self.too_long());
        }
        out.push_bytes(text, self.keep_newlines);
        out.record_raw(line, b"\n");
        Ok(())
    }

    fn feed_lines(&mut self, mut bytes: &[u8], out: &mut Batch) -> Result<(), LineTooLong> {
        if !self.pending.is_empty() {
            let Some(newline) = memchr::memchr(b'\n', bytes) else {
                extend(&mut self.pending, bytes);
                return self.check_pending();
            };
            let mut line = std::mem::take(&mut self.pending);
            extend(&mut line, &bytes[..newline]);
            self.push_line(&line, out)?;
            line.clear();
            self.pending = line; // keep the allocation
            bytes = &bytes[newline + 1..];
        }
        match out.push_plain_lines(bytes, self.max_line) {
            // Plain text, checked once for the whole read: the lines need no UTF-8 check of
            // their own, no `\r` strip and no escaping, only the length limit, and go into the
            // batch with one copy.
            Some((_, true)) => Err(self.too_long()),
            Some((complete, false)) => {
                extend(&mut self.pending, &bytes[complete..]);
                self.check_pending()
            }
            None => self.lines_one_by_one(bytes, out),
        }
    }

    /// Decodes `bytes`, which start at the start of a line, line by line: the way for text that
    /// isn't plain.
    fn lines_one_by_one(&mut self, bytes: &[u8], out: &mut Batch) -> Result<(), LineTooLong> {
        let mut start = 0;
        for newline in memchr::memchr_iter(b'\n', bytes) {
            self.push_line(&bytes[start..newline], out)?;
            start = newline + 1;
        }
        extend(&mut self.pending, &bytes[start..]);
        self.check_pending()
    }

    /// Fails early on an unfinished line that is already too long, so memory stays bounded.
    fn check_pending(&mut self) -> Result<(), LineTooLong> {
        // One byte of slack: a trailing `\r` may yet turn out to be half of `\r\n`.
        if self.pending.len() > self.max_line.saturating_add(1)
            || (self.pending.len() == self.max_line.saturating_add(1)
                && self.pending.last() != Some(&b'\r'))
        {
            return Err(self.too_long());
        }
        if self.pending.is_empty() && self.pending.capacity() > DEFAULT_MAX_LINE {
            self.pending = Vec::new(); // don't keep a long line's buffer for an idle client
        }
        Ok(())
    }

    fn feed_raw(&mut self, bytes: &[u8], out: &mut Batch) {
        if self.pending.is_empty() {
            let keep = incomplete_utf8_tail(bytes);
            let (ready, rest) = bytes.split_at(bytes.len() - keep);
            if !ready.is_empty() {
                out.push_bytes(ready, self.keep_newlines);
                out.record_raw(ready, b"");
            }
            extend(&mut self.pending, rest);
        } else {
            extend(&mut self.pending, bytes);
            let keep = incomplete_utf8_tail(&self.pending);
            let ready = self.pending.len() - keep;
            if ready > 0 {
                out.push_bytes(&self.pending[..ready], self.keep_newlines);
                out.record_raw(&self.pending[..ready], b"");
                self.pending.drain(..ready);
            }
        }
    }
}

/// 0x01 in every byte of a word, and the high bit of every byte.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Whether every byte is printable ASCII (0x20 to 0x7e): text that needs neither a UTF-8 check
/// nor escaping. Eight bytes at a time, with the usual bit tricks for "has a byte below n" and
/// "has a zero byte"; they are exact about whether such a byte exists, which is all we ask.
fn is_printable_ascii(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut bad = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let del = x ^ (ONES * 0x7f);
        // High bit: non-ASCII; below 0x20: a control; zero after xor 0x7f: DEL.
        bad |= x | (x.wrapping_sub(ONES * 0x20) & !x) | (del.wrapping_sub(ONES) & !del);
    }
    bad & HIGH == 0 && chunks.remainder().iter().all(|b| (0x20..0x7f).contains(b))
}

/// Whether valid UTF-8 `bytes` may hold a character to escape: a C0 control (tab too, to keep
/// this simple), DEL, a C1 control, whose encoding starts with 0xC2, or an invisible or bidi
/// control character. Written without early exit so that it compiles to vector instructions: it
/// runs on every byte received.
fn may_need_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |seen, &b| {
        seen | u8::from(b < 0x20) | u8::from(b == 0x7f) | u8::from(b == 0xc2)
    }) != 0
        || scan::has_invisible(bytes)
}

/// Whether `c` is written as an escape: C0 controls but tab, DEL, C1 controls, and the
/// characters that change how the text around them looks without being seen themselves, so that
/// a peer can't make its line look like something else:
///
/// - the bidirectional controls U+061C, U+200E, U+200F, U+202A to U+202E and U+2066 to U+2069,
///   which can reorder what follows them (U+202E shows the rest of a line right to left);
/// - the zero-width and invisible characters U+200B to U+200D, U+2060 to U+2064 and U+FEFF;
/// - the line and paragraph separators U+2028 and U+2029, which some terminals break lines at.
pub fn needs_escape(c: char, keep_newlines: bool) -> bool {
    match c {
        '\t' => false,
        '\n' => !keep_newlines,
        '\u{061c}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{feff}' => true,
        c => c.is_control(), // exactly C0, DEL and C1
    }
}

/// Appends `text` to `out` with the characters of [`needs_escape`] escaped: `\x1b` for C0 and
/// DEL, `\u{9b}` or `\u{202e}` for the others (lowercase hex). Tab is kept; `\n` is kept only if
/// `keep_newlines`. Backslashes are not escaped, so escaping twice changes nothing.
pub fn escape_into(out: &mut String, text: &str, keep_newlines: bool) {
    let mut bytes = Vec::with_capacity(text.len());
    escape(&mut bytes, text, keep_newlines);
    // Escaping valid text gives valid text.
    out.push_str(std::str::from_utf8(&bytes).unwrap_or_default());
}

/// A line a peer sent, for a message of ours (a server's `error: ` reason): lossy UTF-8,
/// escaped as printed lines are, so that it can't drive the terminal it is shown on.
pub(crate) fn peer_text(line: &[u8]) -> String {
    let mut out = String::with_capacity(line.len());
    escape_into(&mut out, &String::from_utf8_lossy(line), false);
    out
}

/// `lines` made safe to print and relay as a client's lines are: each line escaped (which
/// leaves a line that already was as it is: escaping is idempotent, since its output has no
/// character it escapes) and ended with `\n`; a line longer than `longest` bytes is dropped.
/// For lines that come from elsewhere (the chat bus), which anyone who can publish there could
/// have written. Returns the lines and how many were dropped.
pub(crate) fn escape_lines(lines: &[u8], longest: usize) -> (std::borrow::Cow<'_, [u8]>, usize) {
    let short = || {
        let mut start = 0;
        memchr::memchr_iter(b'\n', lines).all(|end| {
            let fits = end - start <= longest;
            start = end + 1;
            fits
        })
    };
    // Printable ASCII, the usual case, by the decoder's own vectorised check; other text
    // character by character.
    let clean = lines.ends_with(b"\n")
        && (scan::is_plain_lines(lines)
            || std::str::from_utf8(lines)
                .is_ok_and(|text| !text.chars().any(|c| needs_escape(c, true))));
    if clean && (lines.len() <= longest || short()) {
        return (std::borrow::Cow::Borrowed(lines), 0);
    }
    let text = String::from_utf8_lossy(lines);
    let mut out = Vec::with_capacity(text.len() + 1);
    let mut dropped = 0;
    for line in text.strip_suffix('\n').unwrap_or(&text).split('\n') {
        let start = out.len();
        escape(&mut out, line, false);
        if out.len() - start > longest {
            out.truncate(start);
            dropped += 1;
        } else {
            out.push(b'\n');
        }
    }
    (std::borrow::Cow::Owned(out), dropped)
}

/// [`escape_into`], appending to UTF-8 bytes.
fn escape(out: &mut Vec<u8>, text: &str, keep_newlines: bool) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut rest = text;
    while let Some(at) = rest.find(|c| needs_escape(c, keep_newlines)) {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        let c = rest[at..].chars().next().unwrap_or_default();
        let code = c as u32;
        if code < 0x80 {
            // C0 and DEL: two hex digits.
            out.extend_from_slice(b"\\x");
            out.push(HEX[(code >> 4 & 0xf) as usize]);
            out.push(HEX[(code & 0xf) as usize]);
        } else {
            // Up to four hex digits (every escaped character is below U+10000), no leading zeros.
            out.extend_from_slice(b"\\u{");
            let digits = (32 - code.leading_zeros()).div_ceil(4).max(1);
            for shift in (0..digits).rev() {
                out.push(HEX[(code >> (shift * 4) & 0xf) as usize]);
            }
            out.push(b'}');
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.extend_from_slice(rest.as_bytes());
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

    /// Lines from elsewhere are relayed as a client's would be: already-escaped lines pass as
    /// they are (borrowed), anything else is escaped and cut into lines, each ending with `\n`.
    #[test]
    fn lines_from_elsewhere_are_escaped_once() {
        let clean = "127.0.0.1:5000 hi \\x1b not an escape\n[::1]:7 tab\there\n".as_bytes();
        assert!(matches!(
            escape_lines(clean, 100),
            (std::borrow::Cow::Borrowed(_), 0)
        ));
        let hostile = b"no newline\x1b[2Jevil \xe2\x80\xae\r\nnext\xff";
        let (escaped, dropped) = escape_lines(hostile, 100);
        assert_eq!(
            String::from_utf8_lossy(&escaped),
            "no newline\\x1b[2Jevil \\u{202e}\\x0d\nnext\u{fffd}\n"
        );
        assert_eq!(dropped, 0);
        let once = escaped.into_owned();
        assert_eq!(
            escape_lines(&once, 100).0,
            once,
            "escaping twice changes nothing"
        );
        assert_eq!(&*escape_lines(b"", 100).0, b"\n");
        // Too long, before or after escaping: dropped, the others kept.
        let (kept, dropped) = escape_lines(b"0123456789\nshort\n\x01\x01\x01\n", 9);
        assert_eq!((&*kept, dropped), (&b"short\n"[..], 2));
    }

    /// Messages decoded from `pieces`, and whether a line was too long.
    fn decode_with(decoder: Decoder, pieces: &[&[u8]]) -> (Vec<String>, Option<LineTooLong>) {
        let mut decoder = decoder;
        let mut batch = Batch::new();
        let mut error = None;
        for piece in pieces {
            if let Err(e) = decoder.feed(piece, &mut batch) {
                error = Some(e);
                break;
            }
        }
        if error.is_none() {
            error = decoder.finish(&mut batch).err();
        }
        (batch.iter().map(str::to_string).collect(), error)
    }

    fn decode(framing: Framing, pieces: &[&[u8]]) -> Vec<String> {
        let (messages, error) = decode_with(Decoder::new(framing), pieces);
        assert_eq!(error, None);
        messages
    }

    #[test]
    fn lines_are_split_on_newline_and_lose_one_trailing_cr() {
        let got = decode(Framing::Line, &[b"a\nb\r\n\nc\r\r\nlast"]);
        assert_eq!(got, ["a", "b", "", "c\\x0d", "last"]);
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
    fn control_characters_are_escaped() {
        assert_eq!(
            decode(Framing::Line, &[b"red \x1b[31m\tbell\x07 del\x7f\n"]),
            ["red \\x1b[31m\tbell\\x07 del\\x7f"]
        );
        assert_eq!(
            decode(Framing::Line, &["c1 \u{9b}31m \u{85}\n".as_bytes()]),
            ["c1 \\u{9b}31m \\u{85}"]
        );
        // Characters that rearrange or hide text: a peer can't make its line look like another.
        assert_eq!(
            decode(
                Framing::Line,
                &[
                    "evil\u{202e}txt.exe \u{200b}zw\u{feff} \u{2066}iso\u{2069} \u{61c}\n"
                        .as_bytes()
                ]
            ),
            ["evil\\u{202e}txt.exe \\u{200b}zw\\u{feff} \\u{2066}iso\\u{2069} \\u{61c}"]
        );
        // In raw framing a newline inside a chunk must not fake a second printed line...
        assert_eq!(decode(Framing::Raw, &[b"one\ntwo\r"]), ["one\\x0atwo\\x0d"]);
        // ...unless the caller shows chunks as they are, as the client does.
        let (kept, _) = decode_with(
            Decoder::new(Framing::Raw).keep_newlines(true),
            &[b"a\nb\x1b"],
        );
        assert_eq!(kept, ["a\nb\\x1b"]);
    }

    #[test]
    fn line_limit_counts_bytes_without_the_terminator() {
        let limited = || Decoder::new(Framing::Line).max_line(3);
        assert_eq!(decode_with(limited(), &[b"abc\r\nabc\n"]).0, ["abc", "abc"]);
        let (before, error) = decode_with(limited(), &[b"ok\nabcd\nnever\n"]);
        assert_eq!(
            (before, error),
            (vec!["ok".to_string()], Some(LineTooLong { max: 3 }))
        );
        // Caught before the newline arrives, so the buffer stays bounded.
        let (_, error) = decode_with(limited(), &[b"abcd"]);
        assert_eq!(error, Some(LineTooLong { max: 3 }));
        let mut decoder = limited();
        let mut batch = Batch::new();
        assert!(decoder.feed(b"abcdefgh", &mut batch).is_err());
        assert_eq!(decoder.pending_len(), 0);
        assert!(decoder.feed(b"\n", &mut batch).is_err(), "stays failed");
    }

    #[test]
    fn raw_bytes_are_kept_exactly_when_asked() {
        let mut decoder = Decoder::new(Framing::Line);
        let mut batch = Batch::new().keep_raw();
        decoder
            .feed(b"a\r\nb\x1b\xff\nc", &mut batch)
            .expect("feed");
        decoder.finish(&mut batch).expect("finish");
        assert_eq!(batch.raw(), b"a\r\nb\x1b\xff\nc\n");
        assert_eq!(
            batch.iter().collect::<Vec<_>>(),
            ["a", "b\\x1b\u{fffd}", "c"]
        );
        batch.clear();
        assert!(batch.raw().is_empty());
        assert!(Batch::new().raw().is_empty(), "not kept unless asked");
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

    /// Cuts `bytes` at the given positions (sorted here).
    fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for at in cuts {
            pieces.push(&bytes[start..at]);
            start = at;
        }
        pieces.push(&bytes[start..]);
        pieces
    }

    /// Decodes `pieces` as a connection does: each read straight into the batch's room (`spare`
    /// bytes more than the read), the messages taken out after every read (unless `keep`), raw
    /// bytes kept.
    fn decode_in_place(
        decoder: Decoder,
        pieces: &[&[u8]],
        spare: usize,
        keep: bool,
    ) -> (Vec<String>, Option<LineTooLong>, Vec<u8>) {
        let mut decoder = decoder;
        let mut batch = Batch::new().keep_raw();
        let (mut messages, mut raw, mut error) = (Vec::new(), Vec::new(), None);
        for piece in pieces {
            let room = decoder.read_room(&mut batch, piece.len() + spare);
            room[..piece.len()].copy_from_slice(piece);
            let decoded = decoder.decode_read(piece.len(), &mut batch);
            // Bounded memory, as with `feed`: the limit, the `\r` slack and one read at most.
            if decoder.framing() == Framing::Line {
                assert!(decoder.pending_len() <= decoder.max_line + 1 + piece.len());
            }
            if !keep || decoded.is_err() {
                messages.extend(batch.iter().map(str::to_string));
                raw.extend_from_slice(batch.raw());
                batch.clear();
            }
            if let Err(e) = decoded {
                error = Some(e);
                break;
            }
        }
        if error.is_none() {
            error = decoder.finish(&mut batch).err();
        }
        messages.extend(batch.iter().map(str::to_string));
        raw.extend_from_slice(batch.raw());
        (messages, error, raw)
    }

    #[test]
    fn a_long_unfinished_line_is_decoded_with_copies() {
        let line = format!("{}\n", "x".repeat(3 * IN_PLACE_KEEP));
        let pieces: Vec<&[u8]> = line.as_bytes().chunks(1000).collect();
        let decoder = Decoder::new(Framing::Line).max_line(4 * IN_PLACE_KEEP);
        let (messages, error, raw) = decode_in_place(decoder, &pieces, 64 * 1024, false);
        assert_eq!((messages, error), (vec![line.trim_end().to_string()], None));
        assert_eq!(raw, line.as_bytes());
    }

    /// Text rich in what matters here: multi-byte characters, `\r`, `\n`, controls.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            "(\\PC|\r|\n|\u{1b}|\u{9b}|\u{7f}){0,200}".prop_map(String::into_bytes),
            // Printable ASCII and newlines: the fast path.
            "[ -~\n]{0,200}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..300),
        ]
    }

    fn cuts() -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(0..300usize, 0..20)
    }

    /// What the escaping promises: no control character left but tab, and nothing else changed.
    fn reference_escape(text: &str) -> String {
        let mut out = String::new();
        for c in text.chars() {
            match c {
                '\t' => out.push(c),
                c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                    out.push_str(&format!("\\x{:02x}", c as u32))
                }
                c if (0x80..0xa0).contains(&(c as u32))
                    || matches!(c, '\u{61c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
                        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}') =>
                {
                    out.push_str(&format!("\\u{{{:x}}}", c as u32))
                }
                c => out.push(c),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn line_framing_ignores_how_bytes_are_split(bytes in stream(), cuts in cuts(), max in 0..40usize) {
            let whole = decode_with(Decoder::new(Framing::Line).max_line(max), &[&bytes]);
            let split = decode_with(Decoder::new(Framing::Line).max_line(max), &cut(&bytes, &cuts));
            prop_assert_eq!(split, whole);
        }

        #[test]
        fn reading_in_place_decodes_like_feeding(
            // Also long plain lines: held back across reads, they test the line limit there.
            bytes in prop_oneof![
                stream(),
                "[ -~]{0,90}(\n[ -~]{0,90}){0,3}".prop_map(String::into_bytes),
            ],
            cuts in cuts(),
            max in 0..40usize,
            raw_framing in any::<bool>(),
            spare in 0..400usize,
            keep in any::<bool>(),
        ) {
            let framing = if raw_framing { Framing::Raw } else { Framing::Line };
            let decoder = Decoder::new(framing).max_line(max);
            let fed = decode_with(decoder.clone(), &cut(&bytes, &cuts));
            let (messages, error, raw) =
                decode_in_place(decoder, &cut(&bytes, &cuts), spare, keep);
            prop_assert_eq!((messages, error), fed);
            if error.is_none() {
                let mut expected = bytes.clone();
                if !raw_framing && !bytes.is_empty() && bytes.last() != Some(&b'\n') {
                    expected.push(b'\n');
                }
                prop_assert_eq!(raw, expected);
            }
        }

        #[test]
        fn line_limit_holds_for_every_split(bytes in stream(), cuts in cuts(), max in 0..40usize) {
            let mut decoder = Decoder::new(Framing::Line).max_line(max);
            let mut batch = Batch::new();
            for piece in cut(&bytes, &cuts) {
                let result = decoder.feed(piece, &mut batch);
                // Bounded memory: never more than the limit, the `\r` slack and one read held.
                prop_assert!(decoder.pending_len() <= max + 1 + piece.len());
                if result.is_err() {
                    prop_assert_eq!(decoder.pending_len(), 0);
                    break;
                }
            }
            let _ = decoder.finish(&mut batch);
            // Every line delivered is within the limit (measured on the bytes it came from).
            let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
            for (message, line) in batch.iter().zip(lines) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                prop_assert!(line.len() <= max);
                prop_assert_eq!(message, reference_escape(&String::from_utf8_lossy(line)));
            }
        }

        #[test]
        fn raw_framing_keeps_text_and_characters_whole(bytes in stream(), cuts in cuts()) {
            let (whole, _) = decode_with(Decoder::new(Framing::Raw), &[&bytes]);
            let (split, _) = decode_with(Decoder::new(Framing::Raw), &cut(&bytes, &cuts));
            prop_assert_eq!(split.concat(), whole.concat());
            prop_assert!(split.iter().all(|m| !m.is_empty()));
            if let Ok(text) = std::str::from_utf8(&bytes) {
                // Valid text is never cut inside a character, so escaping each chunk equals
                // escaping the whole.
                prop_assert_eq!(split.concat(), reference_escape(text));
            }
        }

        #[test]
        fn kept_raw_bytes_are_the_stream(bytes in stream(), cuts in cuts(), raw_framing in any::<bool>()) {
            let framing = if raw_framing { Framing::Raw } else { Framing::Line };
            let mut decoder = Decoder::new(framing).max_line(usize::MAX);
            let mut batch = Batch::new().keep_raw();
            for piece in cut(&bytes, &cuts) {
                decoder.feed(piece, &mut batch).expect("no limit");
            }
            decoder.finish(&mut batch).expect("no limit");
            let mut expected = bytes.clone();
            if !raw_framing && !bytes.is_empty() && bytes.last() != Some(&b'\n') {
                expected.push(b'\n'); // the last line, completed
            }
            prop_assert_eq!(batch.raw(), &expected[..]);
        }

        #[test]
        fn the_ascii_fast_path_agrees_with_a_plain_check(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let plain = bytes.iter().all(|b| (0x20..0x7f).contains(b));
            prop_assert_eq!(is_printable_ascii(&bytes), plain);
        }

        #[test]
        fn escaping_is_applied_exactly_once(text in "(\\PC|\r|\n|\t|\u{1b}|\u{9b}|\u{7f}|\\\\|\u{202e}|\u{2066}|\u{200b}|\u{feff}|\u{61c}|\u{2028}){0,100}") {
            let mut once = String::new();
            escape_into(&mut once, &text, false);
            prop_assert_eq!(&once, &reference_escape(&text));
            prop_assert!(!once.chars().any(|c| c.is_control() && c != '\t'));
            let mut twice = String::new();
            escape_into(&mut twice, &once, false);
            prop_assert_eq!(twice, once, "escaping escaped text changes nothing");
        }
    }
}
