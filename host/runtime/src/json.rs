//! Checking that text is one JSON value without building it: the check of a plugin's answer on
//! the text path ([`PluginHost::call_text`](crate::PluginHost::call_text)), which hands the
//! plugin's text on as it is.
//!
//! It accepts what `serde_json` accepts when it reads a value: RFC 8259 JSON, surrounded by
//! optional whitespace, with at most [`MAX_DEPTH`] containers nested (`serde_json`'s recursion
//! limit, an empty container counting as one); numbers are checked for their syntax, not their
//! range (`1e400` passes, as it does when `serde_json` skips a value). Being a single pass over the
//! bytes with no allocation, it costs a fraction of `serde_json`'s skip, which allocates a
//! scratch buffer and reads numbers digit by digit into values. The tests compare the two on
//! every input of a generated corpus.

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
                    let first = self.next()?;
                    self.number(first)?;
                }
                first @ b'0'..=b'9' => self.number(first)?,
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
    fn string(&mut self) -> Option<()> {
        loop {
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        for _ in 0..4 {
                            if !self.next()?.is_ascii_hexdigit() {
                                return None;
                            }
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

    /// A number from its first digit (after any minus sign): `0` or digits not starting with
    /// 0, then an optional fraction and exponent.
    fn number(&mut self, first: u8) -> Option<()> {
        match first {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    /// At least one digit.
    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
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
        ];
        for case in cases {
            assert_eq!(is_json(case), serde_accepts(case), "{case:?}");
        }
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
}
