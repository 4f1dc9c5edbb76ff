//! Writing the host's params and hook payloads as compact JSON text, byte for byte what
//! `serde_json::to_writer` writes, at a fraction of its cost on the short keys and strings the
//! host writes.
//!
//! `serde_json` passes every byte of every key and string through its escape table and every
//! piece through its `io::Write` and `Formatter` layers. This writer appends to a `String`
//! (so the text is UTF-8 by construction and needs no check afterwards), copies a string in one
//! piece when a word-at-a-time scan ([`json::first_special`](crate::json::first_special))
//! finds nothing in it to escape, and writes numbers with the crates `serde_json` itself uses
//! (`itoa` for integers, `zmij` for floats; a float that is not finite is `null`).
//!
//! Map keys are written as `serde_json` writes them (numbers, booleans and chars quoted), and
//! `serde_json`'s own tokens (a `RawValue`, an `arbitrary_precision` `Number`) as their text,
//! so that a value `serde_json` writes is written here in one pass. Only an error (a
//! `Serialize` impl that fails, a key `serde_json` refuses) makes [`write`] start again with
//! `serde_json::to_writer`, which then reports its own error: so a `Serialize` impl that fails
//! may run twice, one that succeeds runs once. The errors are `serde_json`'s by construction;
//! the tests compare the two writers' text on the rest.

use std::fmt;

use serde::Serialize;
use serde::ser::{self, Impossible};

/// Appends `value` as compact JSON to `out`: the same text `serde_json::to_writer` writes.
///
/// # Errors
///
/// `serde_json`'s error, when `serde_json` cannot write `value` either (its `Serialize` impl
/// fails, or a map has keys that are not strings); `out` then holds what it held before.
pub(crate) fn write<T: Serialize + ?Sized>(out: &mut String, value: &T) -> serde_json::Result<()> {
    let start = out.len();
    let mut writer = Writer { out, failed: false };
    // An error anywhere, even one a `Serialize` impl caught and went on from, leaves text
    // that only serde_json knows how to write (or refuse).
    if value.serialize(&mut writer).is_ok() && !writer.failed {
        return Ok(());
    }
    out.truncate(start);
    let mut bytes = std::mem::take(out).into_bytes();
    let written = serde_json::to_writer(&mut bytes, value);
    // serde_json writes UTF-8; were it not to, nothing written is kept.
    *out = String::from_utf8(bytes).unwrap_or_else(|e| {
        let mut bytes = e.into_bytes();
        bytes.truncate(start);
        String::from_utf8(bytes).unwrap_or_default()
    });
    if written.is_err() {
        out.truncate(start);
    }
    written
}

/// The JSON text of `value`, compact: the same text as `serde_json::to_string`, written the
/// way the host writes params and hook payloads (at less cost on short keys and strings).
/// Code that measures or mimics the host (a benchmark's baseline, a caller preparing text for
/// [`PluginHost::call_text`](crate::PluginHost::call_text)) gets the host's text and cost.
///
/// # Errors
///
/// `serde_json`'s error, when `serde_json` cannot write `value` either: its `Serialize` impl
/// fails, or a map has keys that are not strings.
///
/// # Examples
///
/// ```
/// let text = plugin_host::to_json_string(&serde_json::json!({"a": [1, 2.5, "x\n"], "b": null}))?;
/// assert_eq!(text, r#"{"a":[1,2.5,"x\n"],"b":null}"#);
/// # Ok::<(), serde_json::Error>(())
/// ```
pub fn to_json_string<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    // The room the host makes for a hook payload's text (dispatch's PAYLOAD_TEXT_CAPACITY),
    // made always, even for a small value: what matters to a baseline is to allocate and grow
    // as the host does, not to fit the value; the room left over is the caller's to shrink.
    let mut text = String::with_capacity(512);
    write(&mut text, value)?;
    Ok(text)
}

/// Something this writer leaves to `serde_json` (which then also reports the error, if any).
#[derive(Debug)]
struct Fallback;

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("left to serde_json")
    }
}

impl std::error::Error for Fallback {}

impl ser::Error for Fallback {
    fn custom<M: fmt::Display>(_message: M) -> Self {
        Fallback
    }
}

type Result<T = ()> = std::result::Result<T, Fallback>;

struct Writer<'a> {
    out: &'a mut String,
    /// Set by every error made or passed on here: a `Serialize` impl may catch an error and
    /// go on (after a `,` was written for an element that never came), so its `Ok` at the top
    /// does not mean the text is whole.
    failed: bool,
}

impl Writer<'_> {
    /// A value inside a container or a variant; an error is remembered (see `failed`).
    #[inline]
    fn nested<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        let written = value.serialize(&mut *self);
        if written.is_err() {
            self.failed = true;
        }
        written
    }

    /// An error made here: remembered, then returned.
    #[cold]
    fn fail<T>(&mut self) -> Result<T> {
        self.failed = true;
        Err(Fallback)
    }

    /// A JSON string: copied in one piece when nothing needs escaping, else escaped as
    /// `serde_json` escapes.
    #[inline(always)]
    fn string(&mut self, value: &str) {
        if needs_escape(value.as_bytes()) {
            self.escaped(value);
        } else {
            self.out.push('"');
            self.out.push_str(value);
            self.out.push('"');
        }
    }

    /// A string with something to escape, quoted.
    #[cold]
    #[inline(never)]
    fn escaped(&mut self, value: &str) {
        self.out.push('"');
        self.escaped_contents(value);
        self.out.push('"');
    }

    /// A piece of a string's contents, escaped if need be (no quotes).
    #[inline]
    fn contents(&mut self, value: &str) {
        if needs_escape(value.as_bytes()) {
            self.escaped_contents(value);
        } else {
            self.out.push_str(value);
        }
    }

    /// A string's contents with something to escape: `\"`, `\\`, the short escapes
    /// `\b \t \n \f \r`, and `\u00xx` with lower-case hex for the other control characters,
    /// as `serde_json` writes them; the runs between them copied whole.
    #[cold]
    #[inline(never)]
    fn escaped_contents(&mut self, value: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut rest = value;
        loop {
            let plain = plain_prefix(rest.as_bytes());
            self.out.push_str(rest.get(..plain).unwrap_or_default());
            let Some(&byte) = rest.as_bytes().get(plain) else {
                break;
            };
            // The byte is ASCII, so the rest starts on a character boundary.
            rest = rest.get(plain + 1..).unwrap_or_default();
            let short = match byte {
                b'"' => '"',
                b'\\' => '\\',
                0x08 => 'b',
                b'\t' => 't',
                b'\n' => 'n',
                0x0c => 'f',
                b'\r' => 'r',
                _ => 'u',
            };
            self.out.push('\\');
            self.out.push(short);
            if short == 'u' {
                self.out.push_str("00");
                self.out.push(char::from(HEX[usize::from(byte >> 4)]));
                self.out.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
        }
    }

    #[inline]
    fn integer(&mut self, value: impl itoa::Integer) {
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    #[inline]
    fn float(&mut self, value: impl zmij::Float, finite: bool) {
        if finite {
            self.out.push_str(zmij::Buffer::new().format_finite(value));
        } else {
            self.out.push_str("null");
        }
    }

    /// `{"variant":` of an enum variant with content.
    fn variant_key(&mut self, variant: &str) {
        self.out.push('{');
        self.string(variant);
        self.out.push(':');
    }
}

/// Whether a JSON string must escape any of `bytes` (a `"`, a `\\` or a control character):
/// eight bytes at a time, the last word overlapping the one before; a string shorter than a
/// word is tested as one word made of two overlapping halves (or quarters), padded with spaces.
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    use crate::json::first_special;
    const SPACES: u64 = u64::from_le_bytes([b' '; 8]);
    let len = bytes.len();
    let word = if len >= 8 {
        for word in bytes.chunks_exact(8) {
            if word
                .first_chunk::<8>()
                .is_some_and(|w| first_special(u64::from_le_bytes(*w)) != 0)
            {
                return true;
            }
        }
        bytes
            .last_chunk::<8>()
            .map_or(0, |w| u64::from_le_bytes(*w))
    } else if len >= 4 {
        let low = bytes
            .first_chunk::<4>()
            .map_or(0, |w| u32::from_le_bytes(*w));
        let high = bytes
            .last_chunk::<4>()
            .map_or(0, |w| u32::from_le_bytes(*w));
        u64::from(low) | u64::from(high) << 32
    } else if len >= 2 {
        let low = bytes
            .first_chunk::<2>()
            .map_or(0, |w| u16::from_le_bytes(*w));
        let high = bytes
            .last_chunk::<2>()
            .map_or(0, |w| u16::from_le_bytes(*w));
        u64::from(low) | u64::from(high) << 16 | SPACES << 32
    } else {
        bytes
            .first()
            .map_or(SPACES, |&b| u64::from(b) | SPACES << 8)
    };
    first_special(word) != 0
}

/// How many bytes at the start of `bytes` a JSON string holds as they are: up to the first
/// `"`, `\\` or control character, found eight bytes at a time.
#[inline]
fn plain_prefix(bytes: &[u8]) -> usize {
    let mut at = 0;
    for word in bytes.chunks_exact(8) {
        let Some(word) = word.first_chunk::<8>() else {
            break;
        };
        let found = crate::json::first_special(u64::from_le_bytes(*word));
        if found != 0 {
            return at + (found.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    for &byte in bytes.get(at..).unwrap_or_default() {
        if byte == b'"' || byte == b'\\' || byte < 0x20 {
            return at;
        }
        at += 1;
    }
    at
}

/// Where a container is: `serde_json`'s states, kept so that a `Serialize` impl that declares
/// a length of 0 and then writes elements gets the same (odd) text from both writers.
#[derive(PartialEq, Eq, Clone, Copy)]
enum State {
    Empty,
    First,
    Rest,
    /// A `serde_json` token (its name): its one field is written as it is.
    Token(&'static str),
}

/// An open array or object; `close` is what ends it (`]`, `}`, or a variant's `]}`/`}}`).
struct Compound<'w, 'a> {
    writer: &'w mut Writer<'a>,
    state: State,
    close: &'static str,
}

impl<'w, 'a> Compound<'w, 'a> {
    /// Opens a container; one declared empty is closed at once, as `serde_json` does.
    fn open(
        writer: &'w mut Writer<'a>,
        open: char,
        close: &'static str,
        len: Option<usize>,
    ) -> Self {
        writer.out.push(open);
        let state = if len == Some(0) {
            writer.out.push_str(close.get(..1).unwrap_or_default());
            State::Empty
        } else {
            State::First
        };
        Compound {
            writer,
            state,
            close,
        }
    }

    #[inline]
    fn separate(&mut self) {
        if self.state != State::First {
            self.writer.out.push(',');
        }
        self.state = State::Rest;
    }

    #[inline]
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.separate();
        self.writer.nested(value)
    }

    #[inline]
    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result {
        self.separate();
        self.writer.string(key);
        self.writer.out.push(':');
        self.writer.nested(value)
    }

    #[inline]
    fn close(self) -> Result {
        // A container declared empty has its bracket already; a variant's object still ends.
        let close = if self.state == State::Empty {
            self.close.get(1..).unwrap_or_default()
        } else {
            self.close
        };
        self.writer.out.push_str(close);
        Ok(())
    }
}

impl<'w, 'a> ser::Serializer for &'w mut Writer<'a> {
    type Ok = ();
    type Error = Fallback;
    type SerializeSeq = Compound<'w, 'a>;
    type SerializeTuple = Compound<'w, 'a>;
    type SerializeTupleStruct = Compound<'w, 'a>;
    type SerializeTupleVariant = Compound<'w, 'a>;
    type SerializeMap = Compound<'w, 'a>;
    type SerializeStruct = Compound<'w, 'a>;
    type SerializeStructVariant = Compound<'w, 'a>;

    fn serialize_bool(self, v: bool) -> Result {
        self.out.push_str(if v { "true" } else { "false" });
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_i16(self, v: i16) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_i32(self, v: i32) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_i64(self, v: i64) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_i128(self, v: i128) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_u8(self, v: u8) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_u16(self, v: u16) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_u32(self, v: u32) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_u64(self, v: u64) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_u128(self, v: u128) -> Result {
        self.integer(v);
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result {
        self.float(v, v.is_finite());
        Ok(())
    }

    fn serialize_f64(self, v: f64) -> Result {
        self.float(v, v.is_finite());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result {
        self.string(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result {
        self.string(v);
        Ok(())
    }

    /// A string written by `value`'s `Display`, escaped piece by piece as it comes (escaping
    /// is per character, so the pieces escaped make the whole escaped) rather than gathered
    /// into a `String` first.
    fn collect_str<T: fmt::Display + ?Sized>(self, value: &T) -> Result {
        struct Contents<'w, 'a>(&'w mut Writer<'a>);

        impl fmt::Write for Contents<'_, '_> {
            fn write_str(&mut self, piece: &str) -> fmt::Result {
                self.0.contents(piece);
                Ok(())
            }
        }

        self.out.push('"');
        // Only the `Display` impl can fail here; serde_json (and serde's own `to_string`)
        // panic then, so the fallback is reached only to do the same.
        if fmt::Write::write_fmt(&mut Contents(&mut *self), format_args!("{value}")).is_err() {
            return self.fail();
        }
        self.out.push('"');
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result {
        use ser::SerializeSeq;
        let mut seq = self.serialize_seq(Some(v.len()))?;
        for byte in v {
            seq.serialize_element(byte)?;
        }
        seq.end()
    }

    fn serialize_none(self) -> Result {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result {
        self.out.push_str("null");
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result {
        self.string(variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result {
        self.variant_key(variant);
        self.nested(value)?;
        self.out.push('}');
        Ok(())
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Compound<'w, 'a>> {
        Ok(Compound::open(self, '[', "]", len))
    }

    fn serialize_tuple(self, len: usize) -> Result<Compound<'w, 'a>> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Compound<'w, 'a>> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Compound<'w, 'a>> {
        self.variant_key(variant);
        Ok(Compound::open(self, '[', "]}", Some(len)))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Compound<'w, 'a>> {
        Ok(Compound::open(self, '{', "}", len))
    }

    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Compound<'w, 'a>> {
        // serde_json's own tokens (a `RawValue`; a `Number` when a crate in the build enables
        // `arbitrary_precision`): their field's text as it is, when serde_json knows them.
        if (name == RAW_VALUE_TOKEN || name == NUMBER_TOKEN) && serde_json_knows(name) {
            return Ok(Compound {
                writer: self,
                state: State::Token(name),
                close: "",
            });
        }
        self.serialize_map(Some(len))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Compound<'w, 'a>> {
        self.variant_key(variant);
        Ok(Compound::open(self, '{', "}}", Some(len)))
    }
}

impl ser::SerializeSeq for Compound<'_, '_> {
    type Ok = ();
    type Error = Fallback;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.element(value)
    }

    fn end(self) -> Result {
        self.close()
    }
}

impl ser::SerializeTuple for Compound<'_, '_> {
    type Ok = ();
    type Error = Fallback;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.element(value)
    }

    fn end(self) -> Result {
        self.close()
    }
}

impl ser::SerializeTupleStruct for Compound<'_, '_> {
    type Ok = ();
    type Error = Fallback;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.element(value)
    }

    fn end(self) -> Result {
        self.close()
    }
}

impl ser::SerializeTupleVariant for Compound<'_, '_> {
    type Ok = ();
    type Error = Fallback;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.element(value)
    }

    fn end(self) -> Result {
        self.close()
    }
}

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = Fallback;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result {
        self.separate();
        let written = key.serialize(KeyWriter {
            writer: &mut *self.writer,
        });
        if written.is_err() {
            self.writer.failed = true;
        }
        written
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.writer.out.push(':');
        self.writer.nested(value)
    }

    fn end(self) -> Result {
        self.close()
    }
}

impl ser::SerializeStruct for Compound<'_, '_> {
    type Ok = ();
    type Error = Fallback;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result {
        if let State::Token(token) = self.state {
            // serde_json refuses any other field of a token.
            if key != token {
                return self.writer.fail();
            }
            let written = value.serialize(TokenWriter {
                writer: &mut *self.writer,
            });
            if written.is_err() {
                self.writer.failed = true;
            }
            return written;
        }
        self.field(key, value)
    }

    fn end(self) -> Result {
        self.close()
    }
}

impl ser::SerializeStructVariant for Compound<'_, '_> {
    type Ok = ();
    type Error = Fallback;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result {
        self.field(key, value)
    }

    fn end(self) -> Result {
        self.close()
    }
}

/// A map's key, written as `serde_json`'s `MapKeySerializer` writes it: a string, a char, a
/// unit variant as a string; an integer, a boolean or a finite float quoted; a newtype or a
/// `Some` as what it holds. What `serde_json` refuses (any other key, a float that is not
/// finite) is left to it, to report its error.
struct KeyWriter<'w, 'a> {
    writer: &'w mut Writer<'a>,
}

/// The methods of [`KeyWriter`] that leave the key to `serde_json`.
macro_rules! fall_back {
    ($($method:ident($($arg:ty),*) -> $ok:ty;)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<$ok> {
            self.writer.fail()
        })*
    };
}

impl KeyWriter<'_, '_> {
    /// A key that is a number or a boolean: its JSON text, quoted.
    #[inline]
    fn quoted(self, text: &str) -> Result {
        let out = &mut *self.writer.out;
        out.push('"');
        out.push_str(text);
        out.push('"');
        Ok(())
    }
}

impl ser::Serializer for KeyWriter<'_, '_> {
    type Ok = ();
    type Error = Fallback;
    type SerializeSeq = Impossible<(), Fallback>;
    type SerializeTuple = Impossible<(), Fallback>;
    type SerializeTupleStruct = Impossible<(), Fallback>;
    type SerializeTupleVariant = Impossible<(), Fallback>;
    type SerializeMap = Impossible<(), Fallback>;
    type SerializeStruct = Impossible<(), Fallback>;
    type SerializeStructVariant = Impossible<(), Fallback>;

    fn serialize_str(self, v: &str) -> Result {
        self.writer.string(v);
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result {
        self.writer.string(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn collect_str<T: fmt::Display + ?Sized>(self, value: &T) -> Result {
        ser::Serializer::collect_str(self.writer, value)
    }

    fn serialize_bool(self, v: bool) -> Result {
        self.quoted(if v { "true" } else { "false" })
    }

    fn serialize_i8(self, v: i8) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_i16(self, v: i16) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_i32(self, v: i32) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_i64(self, v: i64) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_i128(self, v: i128) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_u8(self, v: u8) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_u16(self, v: u16) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_u32(self, v: u32) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_u64(self, v: u64) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    fn serialize_u128(self, v: u128) -> Result {
        self.quoted(itoa::Buffer::new().format(v))
    }

    /// A finite float, quoted; `serde_json` refuses one that is not finite.
    fn serialize_f32(self, v: f32) -> Result {
        if !v.is_finite() {
            return self.writer.fail();
        }
        self.quoted(zmij::Buffer::new().format_finite(v))
    }

    fn serialize_f64(self, v: f64) -> Result {
        if !v.is_finite() {
            return self.writer.fail();
        }
        self.quoted(zmij::Buffer::new().format_finite(v))
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result {
        self.writer.string(variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result {
        value.serialize(self)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result {
        self.writer.fail()
    }

    fall_back! {
        serialize_bytes(&[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(&'static str) -> ();
        serialize_seq(Option<usize>) -> Impossible<(), Fallback>;
        serialize_tuple(usize) -> Impossible<(), Fallback>;
        serialize_tuple_struct(&'static str, usize) -> Impossible<(), Fallback>;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Impossible<(), Fallback>;
        serialize_map(Option<usize>) -> Impossible<(), Fallback>;
        serialize_struct(&'static str, usize) -> Impossible<(), Fallback>;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Impossible<(), Fallback>;
    }
}

/// The value of a `serde_json` token's one field (a `RawValue`'s text, an
/// `arbitrary_precision` `Number`'s digits): a string, written as it is, as `serde_json`
/// writes it. Anything else is an error in `serde_json` too.
struct TokenWriter<'w, 'a> {
    writer: &'w mut Writer<'a>,
}

impl ser::Serializer for TokenWriter<'_, '_> {
    type Ok = ();
    type Error = Fallback;
    type SerializeSeq = Impossible<(), Fallback>;
    type SerializeTuple = Impossible<(), Fallback>;
    type SerializeTupleStruct = Impossible<(), Fallback>;
    type SerializeTupleVariant = Impossible<(), Fallback>;
    type SerializeMap = Impossible<(), Fallback>;
    type SerializeStruct = Impossible<(), Fallback>;
    type SerializeStructVariant = Impossible<(), Fallback>;

    fn serialize_str(self, v: &str) -> Result {
        self.writer.out.push_str(v);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result {
        self.writer.fail()
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _value: &T,
    ) -> Result {
        self.writer.fail()
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result {
        self.writer.fail()
    }

    fall_back! {
        serialize_bool(bool) -> ();
        serialize_i8(i8) -> ();
        serialize_i16(i16) -> ();
        serialize_i32(i32) -> ();
        serialize_i64(i64) -> ();
        serialize_i128(i128) -> ();
        serialize_u8(u8) -> ();
        serialize_u16(u16) -> ();
        serialize_u32(u32) -> ();
        serialize_u64(u64) -> ();
        serialize_u128(u128) -> ();
        serialize_f32(f32) -> ();
        serialize_f64(f64) -> ();
        serialize_char(char) -> ();
        serialize_bytes(&[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(&'static str) -> ();
        serialize_unit_variant(&'static str, u32, &'static str) -> ();
        serialize_seq(Option<usize>) -> Impossible<(), Fallback>;
        serialize_tuple(usize) -> Impossible<(), Fallback>;
        serialize_tuple_struct(&'static str, usize) -> Impossible<(), Fallback>;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Impossible<(), Fallback>;
        serialize_map(Option<usize>) -> Impossible<(), Fallback>;
        serialize_struct(&'static str, usize) -> Impossible<(), Fallback>;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Impossible<(), Fallback>;
    }
}

/// `serde_json`'s private token of a `RawValue` (its struct name and field name).
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";
/// `serde_json`'s private token of a `Number` under `arbitrary_precision`.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Whether the `serde_json` in this build writes a struct named `token` as its field's text
/// (its `raw_value` or `arbitrary_precision` feature is on) rather than as an object. Any
/// crate of the build may turn those features on, so it is asked once, by writing a struct of
/// that name.
fn serde_json_knows(token: &'static str) -> bool {
    use std::sync::OnceLock;

    struct Probe(&'static str);

    impl Serialize for Probe {
        fn serialize<S: ser::Serializer>(
            &self,
            serializer: S,
        ) -> std::result::Result<S::Ok, S::Error> {
            use ser::SerializeStruct;
            let mut probe = serializer.serialize_struct(self.0, 1)?;
            probe.serialize_field(self.0, "0")?;
            probe.end()
        }
    }

    static RAW_VALUE: OnceLock<bool> = OnceLock::new();
    static NUMBER: OnceLock<bool> = OnceLock::new();
    let known = if token == RAW_VALUE_TOKEN {
        &RAW_VALUE
    } else {
        &NUMBER
    };
    *known.get_or_init(|| serde_json::to_string(&Probe(token)).is_ok_and(|text| text == "0"))
}

#[cfg(test)]
mod tests;
