//! Checking that text is one JSON value without building it: the check of a plugin's answer on
//! the text path ([`PluginHost::call_text`](crate::PluginHost::call_text)), which hands the
//! plugin's text on as it is.
//!
//! It accepts exactly what `serde_json::from_str::<serde_json::Value>` accepts, since callers
//! read the answer into a `Value` or a `String`: RFC 8259 JSON, surrounded by optional
//! whitespace, with at most [`MAX_DEPTH`] containers nested (`serde_json`'s recursion limit, an
//! empty container counting as one); a `\u` escape of a UTF-16 surrogate only as a high one
//! followed by a `\u` escape of a low one (a lone surrogate cannot be a `String`); and numbers
//! that `serde_json` can read into a value (`1e400` is refused as out of range, `1e-400` is
//! 0). A number's range is left to `serde_json` itself, on the few numbers that could be out of
//! it (more than 2 digits in the exponent, or more than 19 before the point), so the rule is
//! its rule in every feature state (`arbitrary_precision`, `float_roundtrip`). Being a single pass over the
//! bytes with no allocation, it costs a fraction of `serde_json`'s skip, which allocates a
//! scratch buffer and reads numbers digit by digit into values. Plain string bytes are skipped
//! eight at a time, tested as one `u64` word ([`first_special`]); only the byte that ends such
//! a run is looked at alone. (Digits are not: the runs in answers are short, and the same word
//! test on them cost more than it saved.) The tests
//! compare the checker with `serde_json` on every input of generated and mutated corpora.

/// The most containers nested: what `serde_json` reads into a value (its recursion limit of
/// 128 leaves 127).
pub(crate) const MAX_DEPTH: u32 = 127;

/// Whether `text` is exactly one JSON value, with optional whitespace around it.
pub(crate) fn is_json(text: &str) -> bool {
    Checker {
        bytes: text.as_bytes(),
        at: 0,
    }
    .document()
    .is_some()
}

struct Checker<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Checker<'_> {
    /// One value and the end of the text; `None` at the first thing that is not JSON.
    fn document(&mut self) -> Option<()> {
        // The open containers, innermost in bit 0: 1 for an object, 0 for an array.
        let mut open: u128 = 0;
        let mut depth = 0u32;
        'value: loop {
            self.whitespace();
            match self.next()? {
                b'{' => {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    self.whitespace();
                    if self.peek() == Some(b'}') {
                        self.at += 1;
                    } else {
                        depth += 1;
                        open = (open << 1) | 1;
                        self.key()?;
                        continue 'value;
                    }
                }
                b'[' => {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    self.whitespace();
                    if self.peek() == Some(b']') {
                        self.at += 1;
                    } else {
                        depth += 1;
                        open <<= 1;
                        continue 'value;
                    }
                }
                b'"' => self.string()?,
                b't' => self.literal(b"rue")?,
                b'f' => self.literal(b"alse")?,
                b'n' => self.literal(b"ull")?,
                b'-' => {
                    let start = self.at - 1;
                    let first = self.next()?;
                    self.number(start, first)?;
                }
                first @ b'0'..=b'9' => self.number(self.at - 1, first)?,
                _ => return None,
            }
            // After a value: close containers until one goes on with a comma.
            loop {
                self.whitespace();
                if depth == 0 {
                    return (self.at == self.bytes.len()).then_some(());
                }
                let in_object = open & 1 == 1;
                match (self.next()?, in_object) {
                    (b',', true) => {
                        self.whitespace();
                        self.key()?;
                        continue 'value;
                    }
                    (b',', false) => continue 'value,
                    (b'}', true) | (b']', false) => {
                        open >>= 1;
                        depth -= 1;
                    }
                    _ => return None,
                }
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// An object's key (at its opening quote) and the colon after it.
    #[inline(always)]
    fn key(&mut self) -> Option<()> {
        if self.next()? != b'"' {
            return None;
        }
        self.string()?;
        self.whitespace();
        (self.next()? == b':').then_some(())
    }

    /// The rest of a string after its opening quote. The text is UTF-8 already (a `str`); what
    /// is left to check is escapes and control characters.
    #[inline(always)]
    fn string(&mut self) -> Option<()> {
        loop {
            self.skip_plain_words();
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        let unit = self.hex_escape()?;
                        if let 0xd800..=0xdfff = unit {
                            self.surrogate_pair(unit)?;
                        }
                    }
                    _ => return None,
                },
                0x00..=0x1f => return None,
                _ => {}
            }
        }
    }

    fn literal(&mut self, rest: &[u8]) -> Option<()> {
        let end = self.at.checked_add(rest.len())?;
        (self.bytes.get(self.at..end)? == rest).then(|| self.at = end)
    }

    /// The four hex digits of a `\u` escape, as a number.
    #[inline(always)]
    fn hex_escape(&mut self) -> Option<u16> {
        let mut n = 0u16;
        for _ in 0..4 {
            let digit = char::from(self.next()?).to_digit(16)?;
            n = (n << 4) | digit as u16;
        }
        Some(n)
    }

    /// After a `\u` escape of a surrogate (`unit`): as `serde_json` reads a string, a high
    /// surrogate followed at once by a `\u` escape of a low one; anything else is refused.
    #[cold]
    #[inline(never)]
    fn surrogate_pair(&mut self, unit: u16) -> Option<()> {
        if unit >= 0xdc00 || self.next()? != b'\\' || self.next()? != b'u' {
            return None;
        }
        matches!(self.hex_escape()?, 0xdc00..=0xdfff).then_some(())
    }

    /// A number from its first digit (after any minus sign, at `start`): `0` or digits not
    /// starting with 0, then an optional fraction and exponent.
    #[inline(always)]
    fn number(&mut self, start: usize, first: u8) -> Option<()> {
        let integer = self.at;
        match first {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        // Up to 19 digits before the point and 2 in the exponent, no number is out of range
        // (past 19, serde_json reads the integer part as a float); the rest is asked.
        let mut in_range = self.at - integer < 19;
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            let exponent = self.at;
            self.some_digits()?;
            in_range &= self.at - exponent <= 2;
        }
        if in_range {
            return Some(());
        }
        self.number_in_range(start)
    }

    /// Whether serde_json reads the number from `start` to here into a value: a float that
    /// overflows is refused (its `NumberOutOfRange`), one that underflows is 0. Asked of
    /// `serde_json` itself, so that its rule holds exactly in every feature state.
    #[cold]
    #[inline(never)]
    fn number_in_range(&self, start: usize) -> Option<()> {
        let text = self.bytes.get(start..self.at)?;
        serde_json::from_slice::<serde_json::Value>(text)
            .is_ok()
            .then_some(())
    }

    #[inline(always)]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    /// Inside a string: moves on by whole words of eight plain bytes, then to the first byte
    /// within a word that is not plain (the caller looks at it alone). Fewer than eight bytes
    /// left are left to the caller's byte loop.
    #[inline(always)]
    fn skip_plain_words(&mut self) {
        let rest = self.bytes.get(self.at..).unwrap_or_default();
        for word in rest.chunks_exact(8) {
            let Some(word) = word.first_chunk::<8>() else {
                return;
            };
            let found = first_special(u64::from_le_bytes(*word));
            if found != 0 {
                // The lowest marked byte is the first in the text (little-endian).
                self.at += (found.trailing_zeros() / 8) as usize;
                return;
            }
            self.at += 8;
        }
    }

    /// At least one digit.
    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }
}

/// `0x01` in every byte of a word.
const ONES: u64 = u64::from_le_bytes([0x01; 8]);
/// `0x80` in every byte of a word.
const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);

/// The high bit of each byte of `word` below `n` (`n` at most 0x80). Exact up to the first
/// such byte: the subtraction borrows only out of a byte that is below `n`, so a byte above
/// it may be marked wrongly, never one below. Callers only read the lowest mark.
#[inline(always)]
const fn bytes_below(word: u64, n: u8) -> u64 {
    word.wrapping_sub(ONES * n as u64) & !word & HIGHS
}

/// The high bit of each byte of `word` equal to `byte`, exact up to the first such byte.
#[inline(always)]
const fn bytes_equal(word: u64, byte: u8) -> u64 {
    bytes_below(word ^ (ONES * byte as u64), 1)
}

/// Marks the bytes of eight string bytes that a string cannot hold as they are: its closing
/// `"`, a `\` starting an escape and the control characters (below 0x20). Bytes of 0x80 and
/// above (UTF-8 beyond ASCII, valid already in a `str`) are plain.
#[inline(always)]
pub(crate) const fn first_special(word: u64) -> u64 {
    bytes_equal(word, b'"') | bytes_equal(word, b'\\') | bytes_below(word, 0x20)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What the checker must agree with: what callers read the answer into.
    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(text).is_ok()
    }

    #[test]
    fn agrees_with_serde_json_on_hand_picked_inputs() {
        let cases = [
            "",
            " ",
            "null",
            " null ",
            "nul",
            "nulll",
            "true",
            "false",
            "tru",
            "0",
            "-0",
            "01",
            "-",
            "1.",
            "1.5",
            ".5",
            "1e",
            "1e+",
            "1e+5",
            "1E-5",
            "-1.25e10",
            "00",
            "1x",
            "[]",
            "[ ]",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[1,2]",
            "{}",
            "{ }",
            r#"{"a":1}"#,
            r#"{"a" : 1 }"#,
            r#"{"a":}"#,
            r#"{"a"1}"#,
            r#"{a:1}"#,
            r#"{"a":1,}"#,
            r#"{"a":1,"b":[true,{}]}"#,
            r#"{"a":1}}"#,
            r#"[[]]]"#,
            r#"[{]}"#,
            r#"{"a":[}"#,
            r#""\u00e9""#,
            r#""\u00g9""#,
            r#""\x""#,
            "\"a\tb\"",
            "\"é\"",
            r#""\"""#,
            r#""\\""#,
            r#"""#,
            "\"abc",
            "[1]x",
            "1 2",
            "{\"a\":1}\n",
            "\u{feff}1",
            "[\"\\/\"]",
            "-a",
            "--1",
            "+1",
            "[-]",
            // Surrogates: only a high one followed by a low one.
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\udfff""#,
            r#""\ud83d\ude00""#,
            r#""\uD83D\uDE00""#,
            r#""\ud800\ud800""#,
            r#""\ud800\u0041""#,
            r#""\ud800\n""#,
            r#""\ud800x""#,
            r#""\udbff\udfff""#,
            r#""\ud7ff\ue000""#,
            r#"{"\ud800":1}"#,
            // Numbers out of range: refused when they overflow, 0 when they underflow.
            "1e400",
            "-1e400",
            "1e-400",
            "0e400",
            "0.0e99999999999",
            "1e99999999999",
            "1e-99999999999",
            "1e308",
            "1e309",
            "1.7976931348623157e308",
            "1.7976931348623159e308",
            "17976931348623157e292",
            "0.1e310",
            "[1e400]",
            r#"{"n":1E+400}"#,
        ];
        for case in cases {
            assert_eq!(is_json(case), serde_accepts(case), "{case:?}");
        }
    }

    /// Integers and mantissas of many lengths with exponents around the edges of `f64`, on
    /// both sides of the rule's cheap bound (19 digits before the point, 2 in the exponent).
    #[test]
    fn number_ranges_agree_with_serde_json() {
        let mut checked = 0;
        for digits in [1, 2, 18, 19, 20, 21, 40, 300, 308, 309, 310, 400] {
            let integer = "9".repeat(digits);
            let ones = format!("1{}", "0".repeat(digits - 1));
            for exponent in [
                "",
                "e0",
                "e99",
                "e-99",
                "e100",
                "e288",
                "e289",
                "e290",
                "e307",
                "e308",
                "e309",
                "e-324",
                "e-400",
                "e+0308",
                "e0000000000000",
                "e2147483647",
                "e2147483648",
                "e-2147483648",
                "e99999999999",
            ] {
                for mantissa in [
                    integer.clone(),
                    ones.clone(),
                    format!("{integer}.5"),
                    format!("0.{integer}"),
                    format!("1.{integer}"),
                ] {
                    for sign in ["", "-"] {
                        let text = format!("{sign}{mantissa}{exponent}");
                        assert_eq!(is_json(&text), serde_accepts(&text), "{text}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 2_000);
    }

    fn serde_reads(text: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(text).is_ok()
    }

    #[test]
    fn nesting_stops_at_serde_json_s_limit() {
        for depth in [127, 128, 129, 130] {
            for text in [
                format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
                format!("{}1{}", "[".repeat(depth), "]".repeat(depth)),
                format!(
                    "{}{{}}{}",
                    r#"{"a":"#.repeat(depth - 1),
                    "}".repeat(depth - 1)
                ),
            ] {
                assert_eq!(is_json(&text), serde_reads(&text), "depth {depth}: {text}");
            }
        }
    }

    /// Generated inputs from JSON's own alphabet, so that most are nearly JSON: the checker
    /// and `serde_json` agree on every one.
    #[test]
    fn agrees_with_serde_json_on_generated_inputs() {
        const PIECES: [&str; 24] = [
            "{", "}", "[", "]", ",", ":", " ", "\"", "\"k\"", "\"v\\n\"", "\\", "\\u12af", "0",
            "-", "1", "2.5", ".", "e", "E+", "true", "null", "fals", "\t", "x",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for _ in 0..200_000 {
            let len = next() % 12;
            let text: String = (0..len)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            let expected = serde_accepts(&text);
            assert_eq!(is_json(&text), expected, "{text:?}");
            accepted += usize::from(expected);
        }
        // The corpus reaches both answers often enough to mean something.
        assert!(accepted > 1_000, "only {accepted} valid inputs");
    }
    /// A small generator for the corpora below and the writer's (xorshift; the same inputs
    /// every run).
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Where a byte-at-a-time scan stops in a word: the index of the first byte `stops`
    /// accepts, 8 when none does.
    fn first_by_bytes(word: u64, stops: impl Fn(u8) -> bool) -> u32 {
        word.to_le_bytes()
            .iter()
            .position(|&b| stops(b))
            .map_or(8, |at| at as u32)
    }

    fn first_by_word(marks: u64) -> u32 {
        marks.trailing_zeros() / 8
    }

    fn is_special(byte: u8) -> bool {
        byte == b'"' || byte == b'\\' || byte < 0x20
    }

    /// The word test finds the same first byte as a byte loop: every byte value at every
    /// position among plain bytes (ASCII and not), and random words, where marks above the
    /// first may be wrong.
    #[test]
    fn word_test_stops_where_a_byte_loop_stops() {
        for fill in [b'a', b'5', b' ', 0x7f, 0x80, 0xc3, 0xff, b'"', b'0', b'9'] {
            for at in 0..8 {
                for byte in 0..=255u8 {
                    let mut bytes = [fill; 8];
                    bytes[at] = byte;
                    let word = u64::from_le_bytes(bytes);
                    assert_eq!(
                        first_by_word(first_special(word)),
                        first_by_bytes(word, is_special),
                        "{bytes:x?}"
                    );
                }
            }
        }
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..200_000 {
            let word = rng.next();
            // Biased towards the bytes that matter, so that most words stop somewhere inside.
            let mut bytes = word.to_le_bytes();
            for byte in &mut bytes {
                if rng.below(3) == 0 {
                    *byte = *rng.pick(&[b'"', b'\\', 0x1f, 0x20, 0x00, b'0', b'9', b'/', b':']);
                }
            }
            let word = u64::from_le_bytes(bytes);
            assert_eq!(
                first_by_word(first_special(word)),
                first_by_bytes(word, is_special),
                "{bytes:x?}"
            );
        }
    }

    /// Escapes, control characters, quotes and multi-byte UTF-8 at every offset within the
    /// first three words of a string, alone and inside containers.
    #[test]
    fn strings_agree_at_every_offset_within_a_word() {
        let middles = [
            "\"",
            "\\\"",
            "\\\\",
            "\\/",
            "\\n",
            "\\t",
            "\\b",
            "\\f",
            "\\r",
            "\\u00e9",
            "\\u00E9",
            "\\u12g4",
            "\\u12",
            "\\x",
            "\\",
            "\\\n",
            "\n",
            "\t",
            "\r",
            "\u{0}",
            "\u{1f}",
            " ",
            "\u{7f}",
            "é",
            "€",
            "\u{10348}",
            "\u{feff}",
            "\\ud83d\\ude00",
            "\\ud83d",
            "/",
            "'",
        ];
        let mut checked = 0;
        for before in 0..=24 {
            for after in [0, 1, 7, 8, 9] {
                for middle in middles {
                    let inner = format!("{}{middle}{}", "a".repeat(before), "é".repeat(after));
                    for text in [
                        format!("\"{inner}\""),
                        format!("\"{inner}"),
                        format!("[\"{inner}\",1]"),
                        format!("{{\"{inner}\":\"{inner}\"}}"),
                    ] {
                        assert_eq!(is_json(&text), serde_accepts(&text), "{text:?}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 10_000);
    }

    /// Runs of digits of every length across word boundaries, in each part of a number, with
    /// what may and may not follow them.
    #[test]
    fn numbers_agree_at_every_length() {
        let digits = "12345678901234567890123";
        let ends = [
            "", " ", ",", "]", "}", "x", ".", "e", "E", "-", "+", "0", "\"", "é",
        ];
        for len in 0..=digits.len() {
            let run = &digits[..len];
            let zero_run = "0".repeat(len);
            for end in ends {
                for text in [
                    format!("{run}{end}"),
                    format!("-{run}{end}"),
                    format!("{zero_run}{end}"),
                    format!("1.{run}{end}"),
                    format!("0.{zero_run}{end}"),
                    format!("1e{run}{end}"),
                    format!("-2.5E-{run}{end}"),
                    format!("[{run}{end}]"),
                    format!("{{\"n\":1.{run}{end}}}"),
                ] {
                    assert_eq!(is_json(&text), serde_accepts(&text), "{text:?}");
                }
            }
        }
    }

    /// A random value of at most `depth` levels, with strings that need escapes and numbers
    /// of every kind.
    fn random_value(rng: &mut Rng, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        const TEXTS: [&str; 12] = [
            "",
            "plain",
            "a\"quote",
            "back\\slash",
            "tab\there",
            "nl\n",
            "\u{1}",
            "été",
            "€ and 😀",
            "a fairly long plain string over many words",
            "\u{7f}",
            "/",
        ];
        match rng.below(if depth == 0 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.below(2) == 0),
            2 => Value::from(rng.next() as i64 >> rng.below(64)),
            3 => Value::from(f64::from_bits(rng.next())),
            4 => Value::from((rng.next() % 100_000) as f64 / 1000.0),
            5 => Value::from(*rng.pick(&TEXTS)),
            6 => Value::Array(
                (0..rng.below(5))
                    .map(|_| random_value(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.below(5))
                    .map(|_| {
                        let key = format!("{}{}", rng.pick(&TEXTS), rng.below(10));
                        (key, random_value(rng, depth - 1))
                    })
                    .collect(),
            ),
        }
    }

    /// Valid documents (random values written compact and pretty), each then mutated: a
    /// character replaced by one of JSON's own, one deleted, one inserted, or the text cut.
    /// The checker agrees with `serde_json` on every one.
    #[test]
    fn agrees_with_serde_json_on_mutated_documents() {
        const INSERTS: [&str; 20] = [
            "\"", "\\", "{", "}", "[", "]", ",", ":", " ", "0", "1", "-", ".", "e", "\n", "\u{1}",
            "é", "n", "u", "t",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut valid, mut invalid) = (0, 0);
        for round in 0..20_000 {
            let value = random_value(&mut rng, 4);
            let text = if round % 2 == 0 {
                serde_json::to_string(&value)
            } else {
                serde_json::to_string_pretty(&value)
            };
            let Ok(text) = text else { continue };
            assert!(is_json(&text), "{text:?}");
            let chars: Vec<char> = text.chars().collect();
            for _ in 0..4 {
                let mut mutated = chars.clone();
                let at = rng.below(mutated.len() + 1);
                match rng.below(4) {
                    0 if at < mutated.len() => {
                        mutated.remove(at);
                    }
                    1 if at < mutated.len() => {
                        mutated[at] = rng.pick(&INSERTS).chars().next().unwrap_or(' ');
                    }
                    2 => mutated.truncate(at),
                    _ => {
                        for c in rng.pick(&INSERTS).chars().rev() {
                            mutated.insert(at, c);
                        }
                    }
                }
                let mutated: String = mutated.into_iter().collect();
                let expected = serde_accepts(&mutated);
                assert_eq!(is_json(&mutated), expected, "{mutated:?}");
                if expected {
                    valid += 1;
                } else {
                    invalid += 1;
                }
            }
        }
        assert!(
            valid > 5_000 && invalid > 20_000,
            "{valid} valid, {invalid} invalid"
        );
    }
}
