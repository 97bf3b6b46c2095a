//! Finding the lines of a read that holds plain text only: the server's hottest loop.
//!
//! Most reads from a busy client are lines of printable ASCII. Such lines need no UTF-8 check, no
//! `\r` strip and no escaping, so all that is left is to find their newlines and check their
//! lengths. On x86_64 one pass does both the check and the search, with SSE2 instructions that
//! each take 16 bytes, 64 bytes per step; elsewhere a vectorised check and `memchr` do it in two
//! passes.
//!
//! Lines of other text that need no escaping (Chinese, say, or ASCII with tabs) are checked
//! for the whole read at once: one vectorised check for characters to escape, one UTF-8
//! validation, `memchr` for the newlines.
//!
//! Finding each newline with `memchr` costs a call per line, which for 64-byte lines was more than
//! half the decoding time; a newline mask per 64 bytes costs a few instructions per line instead
//! (`cargo bench --bench hot_path` measures it; the README has the figures).

/// Scans `bytes`, which start at the start of a line, for lines that can be taken as they are:
/// valid UTF-8 with nothing to escape, ended by `\n`.
///
/// If it finds such lines, pushes `base + position` of each newline to `ends`, in order, and
/// returns the length of the complete lines and whether it stopped at a line longer than
/// `max_line` (its newline not pushed). A last line without its newline is neither pushed nor
/// measured. Otherwise returns `None` and leaves `ends` as it was: the read has to be decoded
/// line by line. That is always the case if a line holds a character to escape or a `\r`.
pub(crate) fn plain_lines(
    bytes: &[u8],
    base: usize,
    max_line: usize,
    ends: &mut Vec<usize>,
) -> Option<(usize, bool)> {
    ascii_lines(bytes, base, max_line, ends).or_else(|| utf8_lines(bytes, base, max_line, ends))
}

/// [`plain_lines`] for printable ASCII (0x20 to 0x7e): `Some` exactly if every byte of `bytes`
/// is printable ASCII or `\n`.
fn ascii_lines(
    bytes: &[u8],
    base: usize,
    max_line: usize,
    ends: &mut Vec<usize>,
) -> Option<(usize, bool)> {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    {
        // SAFETY: `sse2::ascii_lines` is safe code that needs SSE2, and this is compiled only
        // when the target has it (every x86_64 CPU does: it is part of the architecture's
        // baseline, which all of Rust's x86_64 targets assume).
        unsafe { sse2::ascii_lines(bytes, base, max_line, ends) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    {
        portable_ascii_lines(bytes, base, max_line, ends)
    }
}

/// [`ascii_lines`] in two passes, for every architecture.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
fn portable_ascii_lines(
    bytes: &[u8],
    base: usize,
    max_line: usize,
    ends: &mut Vec<usize>,
) -> Option<(usize, bool)> {
    if !is_plain_lines(bytes) {
        return None;
    }
    Some(newline_ends(bytes, base, max_line, ends))
}

/// [`plain_lines`] for other text: `Some` if no byte of `bytes` needs escaping and the complete
/// lines are valid UTF-8. (The unfinished last line may end inside a character; it is checked
/// again once complete.)
fn utf8_lines(
    bytes: &[u8],
    base: usize,
    max_line: usize,
    ends: &mut Vec<usize>,
) -> Option<(usize, bool)> {
    // The start first: reads that aren't plain (`\r\n` lines, say) mostly show it at once.
    if needs_escape(&bytes[..bytes.len().min(256)]) || needs_escape(bytes) {
        return None;
    }
    let before = ends.len();
    let (complete, too_long) = newline_ends(bytes, base, max_line, ends);
    if std::str::from_utf8(&bytes[..complete]).is_err() {
        ends.truncate(before);
        return None;
    }
    Some((complete, too_long))
}

/// Pushes `base + position` of each newline in `bytes` with `memchr`, up to a line longer than
/// `max_line`; returns the length of the complete lines and whether it stopped at a long one.
fn newline_ends(
    bytes: &[u8],
    base: usize,
    max_line: usize,
    ends: &mut Vec<usize>,
) -> (usize, bool) {
    let mut complete = 0;
    for newline in memchr::memchr_iter(b'\n', bytes) {
        if newline - complete > max_line {
            return (complete, true);
        }
        ends.push(base + newline);
        complete = newline + 1;
    }
    (complete, false)
}

/// Whether `bytes` may hold a character to escape or a `\r`: a C0 control but tab and `\n`, DEL,
/// the byte 0xC2, which starts the encoding of every C1 control (and of some printable
/// characters, which are then left to the slow path), or an invisible or bidi control character
/// ([`has_invisible`]). Without early exit, so that it compiles to vector instructions.
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |seen, &b| {
        let control = u8::from(b < 0x20) & u8::from(b != b'\n') & u8::from(b != b'\t');
        seen | control | u8::from(b == 0x7f) | u8::from(b == 0xc2)
    }) != 0
        || has_invisible(bytes)
}

/// Whether UTF-8 `bytes` may hold one of the characters that change how text around them looks
/// without being seen ([`crate::framing::needs_escape`]): U+061C (`D8 9C`), U+200B to U+200F and
/// U+2028 to U+202E (`E2 80 8B..8F`, `E2 80 A8..AE`), U+2060 to U+2064 and U+2066 to U+2069
/// (`E2 81 A0..A4`, `E2 81 A6..A9`), U+FEFF (`EF BB BF`). Exact for valid UTF-8, and without
/// early exit, so that it compiles to vector instructions.
pub(crate) fn has_invisible(bytes: &[u8]) -> bool {
    let next = bytes.get(1..).unwrap_or_default();
    let third = bytes.get(2..).unwrap_or_default();
    let three = bytes
        .iter()
        .zip(next)
        .zip(third)
        .fold(0u8, |seen, ((&a, &b), &c)| {
            let general = u8::from(a == 0xe2)
                & ((u8::from(b == 0x80)
                    & (u8::from(c.wrapping_sub(0x8b) <= 4) | u8::from(c.wrapping_sub(0xa8) <= 6)))
                    | (u8::from(b == 0x81)
                        & (u8::from(c.wrapping_sub(0xa0) <= 4)
                            | u8::from(c.wrapping_sub(0xa6) <= 3))));
            let bom = u8::from(a == 0xef) & u8::from(b == 0xbb) & u8::from(c == 0xbf);
            seen | general | bom
        });
    // U+061C is two bytes: pairs, up to the very end.
    let two = bytes.iter().zip(next).fold(0u8, |seen, (&a, &b)| {
        seen | (u8::from(a == 0xd8) & u8::from(b == 0x9c))
    });
    three | two != 0
}

/// Whether `bytes` holds only printable ASCII and `\n`. Without early exit, so that it compiles
/// to vector instructions.
pub(crate) fn is_plain_lines(bytes: &[u8]) -> bool {
    // One unsigned compare catches both ends: below 0x20 and from 0x7f up.
    bytes.iter().fold(0u8, |bad, &b| {
        bad | (u8::from(b.wrapping_sub(0x20) > 0x5e) & u8::from(b != b'\n'))
    }) == 0
}

#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_and_si128, _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_movemask_epi8,
        _mm_or_si128, _mm_set_epi64x, _mm_set1_epi8,
    };

    /// [`ascii_lines`](super::ascii_lines), 64 bytes per step: for each 16, one compare finds
    /// the newlines and two check the rest are printable; the newlines of the 64 bytes become
    /// one 64-bit mask whose set bits are walked in order.
    #[target_feature(enable = "sse2")]
    pub(super) fn ascii_lines(
        bytes: &[u8],
        base: usize,
        max_line: usize,
        ends: &mut Vec<usize>,
    ) -> Option<(usize, bool)> {
        let before = ends.len();
        let newline = _mm_set1_epi8(b'\n' as i8);
        // Adding 0x60 maps printable 0x20..=0x7e, and only those, to -128..=-34 as signed bytes.
        let shift = _mm_set1_epi8(0x60);
        let printable_below = _mm_set1_epi8(-33);
        let mut complete = 0;
        let mut blocks = bytes.chunks_exact(64);
        let mut offset = 0;
        for block in &mut blocks {
            let mut plain = _mm_set1_epi8(-1);
            let mut newlines = 0u64;
            for (i, sixteen) in block.chunks_exact(16).enumerate() {
                let v = load(sixteen);
                let is_newline = _mm_cmpeq_epi8(v, newline);
                let printable = _mm_cmplt_epi8(_mm_add_epi8(v, shift), printable_below);
                plain = _mm_and_si128(plain, _mm_or_si128(is_newline, printable));
                newlines |= u64::from(_mm_movemask_epi8(is_newline) as u16) << (16 * i);
            }
            if _mm_movemask_epi8(plain) != 0xffff {
                ends.truncate(before);
                return None;
            }
            while newlines != 0 {
                let at = offset + newlines.trailing_zeros() as usize;
                if at - complete > max_line {
                    return finish_long(bytes, offset + 64, complete, ends, before);
                }
                ends.push(base + at);
                complete = at + 1;
                newlines &= newlines - 1;
            }
            offset += 64;
        }
        for (i, &b) in blocks.remainder().iter().enumerate() {
            if b == b'\n' {
                let at = offset + i;
                if at - complete > max_line {
                    return finish_long(bytes, at, complete, ends, before);
                }
                ends.push(base + at);
                complete = at + 1;
            } else if b.wrapping_sub(0x20) > 0x5e {
                ends.truncate(before);
                return None;
            }
        }
        Some((complete, false))
    }

    /// Stopped at a long line: the answer still depends on the bytes not yet checked.
    fn finish_long(
        bytes: &[u8],
        checked: usize,
        complete: usize,
        ends: &mut Vec<usize>,
        before: usize,
    ) -> Option<(usize, bool)> {
        if super::is_plain_lines(&bytes[checked..]) {
            Some((complete, true))
        } else {
            ends.truncate(before);
            None
        }
    }

    /// 16 bytes into a vector register, safely: the two halves compile to one unaligned load.
    #[target_feature(enable = "sse2")]
    fn load(sixteen: &[u8]) -> __m128i {
        let half = |at: usize| {
            let mut word = [0; 8];
            word.copy_from_slice(&sixteen[at..at + 8]);
            i64::from_le_bytes(word)
        };
        _mm_set_epi64x(half(8), half(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes near every edge the check draws: controls, `\n`, space, `~`, DEL, non-ASCII.
    fn edgy() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            8 => 0x20..0x7fu8,
            2 => Just(b'\n'),
            1 => prop::sample::select(vec![0u8, 0x09, 0x0d, 0x1f, 0x7f, 0x80, 0x9b, 0xc2, 0xff]),
        ];
        prop_oneof![
            proptest::collection::vec(byte, 0..400),
            "[ -~\n]{0,400}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..100),
            one_byte_changed(),
        ]
    }

    /// Text in and out of ASCII, with tabs, `\r`, C1 controls and 0xC2-encoded characters,
    /// invisible and bidi controls and their neighbours, cut anywhere (perhaps inside a
    /// character).
    fn text() -> impl Strategy<Value = Vec<u8>> {
        (
            "([ -~]|\n|\t|\r|我|是|€|😀|é|°|\u{9b}|\u{1b}|\u{202e}|\u{200b}|\u{feff}|\u{61c}|\u{2069}|\u{2028}|\u{201c}|\u{202f}|\u{2065}|\u{600}|\u{fefe}){0,120}",
            any::<prop::sample::Index>(),
        )
            .prop_map(|(text, cut)| {
                let mut bytes = text.into_bytes();
                bytes.truncate(cut.index(bytes.len() + 1));
                bytes
            })
    }

    /// Plain lines of a few blocks with one byte, anywhere, set to any value: the vector check
    /// must catch every value that isn't plain, alone in its block.
    fn one_byte_changed() -> impl Strategy<Value = Vec<u8>> {
        ("[ -~\n]{64,300}", any::<prop::sample::Index>(), any::<u8>()).prop_map(
            |(text, at, value)| {
                let mut bytes = text.into_bytes();
                let at = at.index(bytes.len());
                bytes[at] = value;
                bytes
            },
        )
    }

    /// What `ascii_lines` promises, written plainly.
    fn ascii_reference(
        bytes: &[u8],
        base: usize,
        max_line: usize,
    ) -> Option<(Vec<usize>, usize, bool)> {
        if !bytes
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) || b == b'\n')
        {
            return None;
        }
        lines(bytes, base, max_line)
    }

    /// What `plain_lines` promises, written plainly.
    fn plain_reference(
        bytes: &[u8],
        base: usize,
        max_line: usize,
    ) -> Option<(Vec<usize>, usize, bool)> {
        let escaped = |b: u8| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f || b == 0xc2;
        if bytes.iter().any(|&b| escaped(b)) || has_invisible_reference(bytes) {
            return None;
        }
        let found = lines(bytes, base, max_line)?;
        std::str::from_utf8(&bytes[..found.1]).ok()?;
        Some(found)
    }

    /// Whether the encoding of an invisible or bidi control character appears in `bytes`.
    fn has_invisible_reference(bytes: &[u8]) -> bool {
        (0x80..=0xffffu32)
            .filter_map(char::from_u32)
            .filter(|&c| crate::framing::needs_escape(c, false) && !c.is_control())
            .any(|c| {
                let mut buf = [0; 4];
                let encoded = c.encode_utf8(&mut buf).as_bytes();
                bytes.windows(encoded.len()).any(|w| w == encoded)
            })
    }

    #[test]
    fn has_invisible_finds_exactly_the_invisible_characters() {
        // Every character of the basic plane, alone and between others.
        for c in (0x80..=0xffffu32).filter_map(char::from_u32) {
            let invisible = crate::framing::needs_escape(c, false) && !c.is_control();
            let alone = c.to_string();
            let among = format!("ab{c}é");
            for text in [&alone, &among] {
                assert_eq!(
                    has_invisible(text.as_bytes()),
                    invisible,
                    "U+{:04X} in {text:?}",
                    c as u32
                );
            }
        }
    }

    /// The newlines of the complete lines, up to a line over `max_line`.
    fn lines(bytes: &[u8], base: usize, max_line: usize) -> Option<(Vec<usize>, usize, bool)> {
        let mut ends = Vec::new();
        let mut start = 0;
        for (at, &b) in bytes.iter().enumerate() {
            if b == b'\n' {
                if at - start > max_line {
                    return Some((ends, start, true));
                }
                ends.push(base + at);
                start = at + 1;
            }
        }
        Some((ends, start, false))
    }

    type Scan = fn(&[u8], usize, usize, &mut Vec<usize>) -> Option<(usize, bool)>;

    fn scanned(
        scan: Scan,
        bytes: &[u8],
        base: usize,
        max_line: usize,
    ) -> Option<(Vec<usize>, usize, bool)> {
        let mut ends = vec![7]; // kept as it was
        let found = scan(bytes, base, max_line, &mut ends);
        assert_eq!(ends[0], 7);
        if found.is_none() {
            assert_eq!(ends.len(), 1, "nothing pushed when not plain");
        }
        found.map(|(complete, too_long)| (ends[1..].to_vec(), complete, too_long))
    }

    #[test]
    fn every_byte_value_is_judged_alike_in_every_position() {
        let plain = |b: u8| (0x20..0x7f).contains(&b) || b == b'\n';
        for len in [1, 63, 64, 65, 128, 200] {
            for at in 0..len {
                for value in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = value;
                    let found = ascii_lines(&bytes, 0, usize::MAX, &mut Vec::new());
                    assert_eq!(found.is_some(), plain(value), "{value:#x} at {at} of {len}");
                }
            }
        }
    }

    #[test]
    fn long_plain_reads_are_found_exactly() {
        let line = format!("hello world 12345 {}\n", ".".repeat(45));
        let read: Vec<u8> = line.repeat(1000).into_bytes();
        let (ends, complete, too_long) = scanned(plain_lines, &read, 3, 100).expect("plain");
        assert_eq!((ends.len(), complete, too_long), (1000, read.len(), false));
        assert_eq!(ends[999], 3 + read.len() - 1);
        // One byte that isn't plain, anywhere, sends the whole read to the slow path.
        for at in [0, 63, 64, 5000, read.len() - 1] {
            let mut bad = read.clone();
            bad[at] = 0x1b;
            assert_eq!(scanned(plain_lines, &bad, 0, 100), None, "byte {at}");
        }
    }

    #[test]
    fn chinese_lines_and_tabs_are_plain_but_not_escapes_or_crlf() {
        let read = "我是客户端发送的消息,hello world 12345\n\tindented\n半个".as_bytes();
        let cut = &read[..read.len() - 1]; // the last line ends inside a character
        let (ends, complete, _) = scanned(plain_lines, cut, 0, 100).expect("plain");
        assert_eq!((ends.len(), complete), (2, read.len() - "半个".len()));
        for not_plain in ["a\r\n", "\x1b[31m\n", "\u{9b}\n", "1°\n", "\u{7f}\n"] {
            let bytes = format!("我{not_plain}");
            assert_eq!(
                scanned(plain_lines, bytes.as_bytes(), 0, 100),
                None,
                "{bytes:?}"
            );
        }
        let invalid = b"\xe6\x88\n";
        assert_eq!(scanned(plain_lines, invalid, 0, 100), None, "invalid UTF-8");
    }

    proptest! {
        #[test]
        fn ascii_lines_agrees_with_the_reference(bytes in edgy(), base in 0..1000usize, max_line in 0..150usize) {
            let expected = ascii_reference(&bytes, base, max_line);
            prop_assert_eq!(scanned(ascii_lines, &bytes, base, max_line), expected.clone());
            prop_assert_eq!(scanned(portable_ascii_lines, &bytes, base, max_line), expected);
        }

        #[test]
        fn plain_lines_agrees_with_the_reference(
            bytes in prop_oneof![edgy(), text()],
            base in 0..1000usize,
            max_line in 0..150usize,
        ) {
            let expected = plain_reference(&bytes, base, max_line);
            prop_assert_eq!(scanned(plain_lines, &bytes, base, max_line), expected);
        }

        #[test]
        fn the_whole_read_check_agrees_with_a_plain_check(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let plain = bytes.iter().all(|&b| (0x20..0x7f).contains(&b) || b == b'\n');
            prop_assert_eq!(is_plain_lines(&bytes), plain);
        }
    }
}
