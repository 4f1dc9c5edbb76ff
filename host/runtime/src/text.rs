//! Text that came from a plugin (error messages, log events, manifest fields) made safe for the
//! places where a control character means something: a log line, an HTTP header, a terminal.
//! A newline there forges a line of its own, and an escape sequence (`ESC [ 2 J`) clears the
//! operator's screen.
//!
//! JSON output needs none of this (serde escapes control characters itself); call these where
//! plugin text is written as plain text.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

/// Whether `c` is escaped: every control character (C0, DEL, C1), and the invisible Unicode
/// formatting characters that move or reorder text (line and paragraph separators,
/// bidirectional overrides and isolates).
#[inline]
pub(crate) fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn write_escaped(f: &mut impl fmt::Write, text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some((at, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
        f.write_str(&rest[..at])?;
        match c {
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if (c as u32) < 0x80 => write!(f, "\\x{:02x}", c as u32)?,
            c => write!(f, "\\u{{{:x}}}", c as u32)?,
        }
        rest = &rest[at + c.len_utf8()..];
    }
    f.write_str(rest)
}

/// `text` with its control characters escaped (`\n`, `\r`, `\t`, `\x1b`, `\u{85}`, ...), so it
/// stays on one line and cannot drive a terminal. Borrows `text` when there is nothing to
/// escape (no allocation in the common case).
///
/// Use it for plugin-provided text in log lines, HTTP header values and plain-text CLI output.
///
/// ```
/// assert_eq!(plugin_host::text::escape_control("ok"), "ok");
/// assert_eq!(plugin_host::text::escape_control("a\nb\x1b[2J"), "a\\nb\\x1b[2J");
/// ```
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    // Writing to a `String` cannot fail.
    let _ = write_escaped(&mut escaped, text);
    Cow::Owned(escaped)
}

/// Displays a string with its control characters escaped, as [`escape_control`], without
/// allocating: for log fields, `tracing::warn!(error = %EscapeControl(&message), ...)`.
#[derive(Debug, Clone, Copy)]
pub struct EscapeControl<'a>(pub &'a str);

impl fmt::Display for EscapeControl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0)
    }
}

/// Displays a path with its control characters escaped, as [`EscapeControl`] does for text:
/// for every path that names a file in the plugins or state directory (whoever can write
/// there chooses the names), `tracing::warn!(file = %EscapePath(&path), ...)`. A name that is
/// not UTF-8 is shown with U+FFFD in place of the bytes that are not.
#[derive(Debug, Clone, Copy)]
pub struct EscapePath<'a>(pub &'a Path);

impl fmt::Display for EscapePath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.0.to_string_lossy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(
            escape_control("plain, ünïcode ✓"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_control("x\x1b[2J\ny\r\t\x00\x7f\u{85}z\u{202e}"),
            "x\\x1b[2J\\ny\\r\\t\\x00\\x7f\\u{85}z\\u{202e}"
        );
        assert_eq!(
            EscapeControl("a\nb").to_string(),
            escape_control("a\nb").into_owned()
        );
        assert_eq!(
            EscapePath(Path::new("/p/a\nb\x1b.so")).to_string(),
            "/p/a\\nb\\x1b.so"
        );
    }
}
