use std::collections::BTreeMap;

use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

use super::write;
use crate::json::tests::Rng;

/// What this writer makes of `value`, and what `serde_json` makes of it: the same text, or
/// errors with the same message.
fn assert_same<T: Serialize + ?Sized>(value: &T) {
    let mut ours = String::from("kept ");
    let written = write(&mut ours, value);
    match (written, serde_json::to_string(value)) {
        (Ok(()), Ok(theirs)) => assert_eq!(ours, format!("kept {theirs}")),
        (Err(ours_error), Err(theirs)) => {
            assert_eq!(ours_error.to_string(), theirs.to_string());
            assert_eq!(ours, "kept ", "nothing is left written after an error");
        }
        (ours_result, theirs) => panic!("{ours_result:?} {ours:?} against {theirs:?}"),
    }
}

/// A string of 0 to 40 characters, mostly plain, with what needs escaping and multi-byte
/// characters here and there.
fn random_string(rng: &mut Rng) -> String {
    const CHARS: [char; 20] = [
        'a', 'b', 'z', ' ', '0', '/', '"', '\\', '\n', '\t', '\r', '\u{8}', '\u{c}', '\u{0}',
        '\u{1f}', '\u{7f}', 'é', '€', '😀', '\u{feff}',
    ];
    let len = rng.below(41);
    (0..len)
        .map(|_| {
            if rng.below(4) == 0 {
                CHARS[rng.below(CHARS.len())]
            } else {
                char::from(b'a' + rng.below(26) as u8)
            }
        })
        .collect()
}

fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth == 0 { 7 } else { 9 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => Value::from(rng.next() as i64 >> rng.below(64)),
        3 => Value::from(rng.next() >> rng.below(64)),
        4 => Value::from(f64::from_bits(rng.next())),
        5 => Value::from((rng.next() % 2_000_000) as f64 / 1000.0 - 1000.0),
        6 => Value::from(random_string(rng)),
        7 => Value::Array(
            (0..rng.below(6))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(6))
                .map(|_| (random_string(rng), random_value(rng, depth - 1)))
                .collect(),
        ),
    }
}

#[test]
fn writes_what_serde_json_writes_for_random_values() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        assert_same(&random_value(&mut rng, 4));
    }
}

#[test]
fn floats_are_written_as_serde_json_writes_them() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let special = [
        0.0,
        -0.0,
        1.0,
        -1.5,
        0.1,
        1e20,
        1e21,
        1e-7,
        123_456_789.0,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    for value in special {
        assert_same(&value);
        assert_same(&(value as f32));
        assert_same(&[value, value]);
    }
    for _ in 0..50_000 {
        let bits = rng.next();
        assert_same(&f64::from_bits(bits));
        assert_same(&f32::from_bits(bits as u32));
    }
}

#[test]
fn integers_at_their_limits() {
    assert_same(&[i64::MIN, -1, 0, 1, i64::MAX]);
    assert_same(&[u64::MAX]);
    assert_same(&(i128::MIN, u128::MAX, i8::MIN, u8::MAX, i16::MIN, u16::MAX));
    assert_same(&(i32::MIN, u32::MAX));
}

/// Each character that needs escaping, and multi-byte ones, at every offset within the first
/// three words of a string.
#[test]
fn strings_escape_as_serde_json_does_at_every_offset() {
    for byte in 0..=0x7f_u8 {
        for before in 0..=24 {
            for after in [0, 1, 7, 8, 9] {
                let text = format!(
                    "{}{}{}",
                    "a".repeat(before),
                    char::from(byte),
                    "é".repeat(after)
                );
                assert_same(text.as_str());
                assert_same(&BTreeMap::from([(text.clone(), text.clone())]));
            }
        }
    }
    for text in [
        "",
        "€",
        "😀😀",
        "\u{10ffff}",
        "a\"\"b",
        "\\\\",
        "\n\n\n\n\n\n\n\n\n",
    ] {
        assert_same(text);
    }
    assert_same(&'"');
    assert_same(&'\u{1}');
    assert_same(&'é');
}

#[derive(Serialize)]
struct Unit;

#[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct Newtype(String);

#[derive(Serialize)]
struct Pair(i32, &'static str);

#[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
enum Variants {
    Unit,
    Newtype(u8),
    Tuple(u8, u8),
    EmptyTuple(),
    Struct { a: u8, b: Option<&'static str> },
    EmptyStruct {},
}

#[test]
fn every_shape_serde_can_describe() {
    assert_same(&Unit);
    assert_same(&Newtype("n\"t".to_owned()));
    assert_same(&Pair(-3, "x"));
    assert_same(&());
    assert_same(&None::<u8>);
    assert_same(&Some(true));
    assert_same(&Vec::<u8>::new());
    assert_same(&BTreeMap::<String, u8>::new());
    assert_same(&(1, "two", 3.0, [4u8; 0], (5,)));
    for variant in [
        Variants::Unit,
        Variants::Newtype(7),
        Variants::Tuple(1, 2),
        Variants::EmptyTuple(),
        Variants::Struct { a: 1, b: None },
        Variants::Struct { a: 2, b: Some("s") },
        Variants::EmptyStruct {},
    ] {
        assert_same(&variant);
        assert_same(&[&variant, &variant]);
        assert_same(&BTreeMap::from([("k", &variant)]));
    }
    assert_same(&BTreeMap::from([(Variants::Unit, 1)]));
    assert_same(&BTreeMap::from([(Newtype("k".to_owned()), 1)]));
}

struct Bytes(&'static [u8]);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// Declares no elements and then writes two: `serde_json` writes `[],1,2` for that.
struct Lying;

impl Serialize for Lying {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(0))?;
        seq.serialize_element(&1)?;
        seq.serialize_element(&2)?;
        seq.end()
    }
}

struct Failing;

impl Serialize for Failing {
    fn serialize<S: Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("the value refused to be written"))
    }
}

/// A map written without a length, so serde_json cannot close it early.
struct Unsized;

impl Serialize for Unsized {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("a", &1)?;
        map.serialize_entry("b", &[2])?;
        map.end()
    }
}

#[test]
fn odd_impls_and_errors_come_out_as_serde_json_s() {
    assert_same(&Bytes(b""));
    assert_same(&Bytes(b"\x00\xff"));
    assert_same(&Lying);
    assert_same(&Unsized);
    assert_same(&Failing);
    assert_same(&[Some(Failing)]);
    assert_same(&BTreeMap::from([("a", Failing)]));
    // Keys that are not strings: numbers and booleans quoted, the rest refused.
    assert_same(&BTreeMap::from([(1, "one"), (2, "two")]));
    assert_same(&BTreeMap::from([(-1i64, 0)]));
    assert_same(&BTreeMap::from([(true, 0)]));
    assert_same(&BTreeMap::from([('c', 0)]));
    assert_same(&BTreeMap::from([(vec![1], 0)]));
    assert_same(&BTreeMap::from([((), 0)]));
    assert_same(&BTreeMap::from([(Some("k"), 0)]));
    assert_same(&[(BTreeMap::from([(1.5f64.to_bits(), 0)]))]);
}

/// Shapes like the ones a host's embedder writes, with random text and numbers: a call's
/// params (optional fields skipped, camelCase) and an event's payload (a map of timings
/// inside). The worker's own params and payloads are checked against serde_json in the
/// worker's pipeline tests.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct AskParams<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    task_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    experiment: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_words: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    handlers: Option<&'a [String]>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    optional: bool,
}

#[derive(Serialize)]
struct ScoredEvent<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    task_type: &'a str,
    variant: Option<&'a str>,
    score: f64,
    latency_ms: f64,
    output_len: usize,
    plugins_ms: &'a BTreeMap<String, f64>,
}

#[test]
fn params_and_payloads_of_an_embedder_s_shapes() {
    let mut rng = Rng(7);
    let handlers = vec!["builtin:summarize".to_owned(), "plugin:echo".to_owned()];
    for _ in 0..2_000 {
        let context = random_string(&mut rng);
        let id = random_string(&mut rng);
        assert_same(&AskParams::default());
        assert_same(&AskParams {
            task_type: Some("summarize"),
            experiment: Some(&id),
            context: Some(&context),
            input_words: Some(rng.below(1000)),
            handlers: Some(&handlers),
            optional: rng.below(2) == 0,
        });
        let timings = BTreeMap::from([
            ("task-policy".to_owned(), f64::from_bits(rng.next())),
            ("model-router".to_owned(), rng.below(10_000) as f64 / 1000.0),
        ]);
        assert_same(&ScoredEvent {
            id: &id,
            task_type: "classify",
            variant: (rng.below(2) == 0).then_some("b"),
            score: rng.below(1000) as f64 / 999.0,
            latency_ms: f64::from_bits(rng.next()),
            output_len: rng.below(500),
            plugins_ms: &timings,
        });
    }
}

/// serde_json's own types that it writes through a private token (a `RawValue` here; a
/// `Number` under `arbitrary_precision` takes the same way) come out as serde_json writes
/// them, not as a struct named by the token.
#[test]
fn serde_json_s_raw_values_are_written_as_serde_json_writes_them() {
    let raw =
        serde_json::value::RawValue::from_string(r#"{"kept": [1, 2.50]}"#.to_owned()).unwrap();
    assert_same(&raw);
    let mut map = BTreeMap::new();
    map.insert("inner", raw);
    assert_same(&map);
    let mut ours = String::new();
    write(&mut ours, &map).unwrap();
    assert_eq!(ours, r#"{"inner":{"kept": [1, 2.50]}}"#);
}

/// A map that can be written once (its entries taken out of it, as a stream or an iterator
/// is), counting how often it was asked to.
struct OneShot<K> {
    entries: std::cell::RefCell<Option<std::vec::IntoIter<(K, &'static str)>>>,
    calls: std::cell::Cell<u32>,
}

impl<K> OneShot<K> {
    fn new(entries: Vec<(K, &'static str)>) -> Self {
        OneShot {
            entries: std::cell::RefCell::new(Some(entries.into_iter())),
            calls: std::cell::Cell::new(0),
        }
    }
}

impl<K: Serialize> Serialize for OneShot<K> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.calls.set(self.calls.get() + 1);
        let entries = self.entries.borrow_mut().take().into_iter().flatten();
        serializer.collect_map(entries)
    }
}

/// Keys serde_json quotes (integers, booleans, chars, floats, `Some`) are written here, not
/// left to serde_json: a map that can be written once comes out whole, its `Serialize` run
/// once.
#[test]
fn keys_serde_json_quotes_are_written_in_one_pass() {
    fn once<K: Serialize>(entries: Vec<(K, &'static str)>) {
        let expected = serde_json::to_string(&OneShot::new(
            entries.iter().map(|(k, v)| (k, *v)).collect::<Vec<_>>(),
        ))
        .unwrap();
        let map = OneShot::new(entries);
        let mut ours = String::new();
        write(&mut ours, &map).unwrap();
        assert_eq!(ours, expected);
        assert_eq!(map.calls.get(), 1, "{expected}");
    }
    once(vec![(1u32, "a")]);
    once(vec![(-7i8, "a"), (i8::MAX, "b")]);
    once(vec![(i64::MIN, "a"), (0, "b")]);
    once(vec![(u64::MAX, "a")]);
    once(vec![(i128::MIN, "a"), (i128::MAX, "b")]);
    once(vec![(u128::MAX, "a"), (0, "b")]);
    once(vec![(u16::MAX, "a"), (0, "b")]);
    once(vec![(i32::MIN, "a"), (1, "b")]);
    once(vec![(true, "a"), (false, "b")]);
    once(vec![('c', "a"), ('"', "b"), ('\n', "c"), ('é', "d")]);
    once(vec![(1.5f64, "a"), (-0.0, "b"), (1e21, "c"), (5e-324, "d")]);
    once(vec![(0.1f32, "a"), (f32::MAX, "b")]);
    once(vec![(Some(3u8), "a")]);
    once(vec![(Some("k"), "a")]);
    once(vec![(Newtype("k".to_owned()), "a")]);
    once(vec![(Variants::Unit, "a")]);
}

/// Counts how often its value was written.
struct Counted<T> {
    value: T,
    calls: std::cell::Cell<u32>,
}

impl<T: Serialize> Serialize for Counted<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.calls.set(self.calls.get() + 1);
        self.value.serialize(serializer)
    }
}

/// A struct named by one of serde_json's tokens, with one field (named `field`) holding
/// `value`: what `serde_json::Number` writes under `arbitrary_precision`.
struct Token {
    name: &'static str,
    field: &'static str,
    value: Value,
}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut token = serializer.serialize_struct(self.name, 1)?;
        token.serialize_field(self.field, &self.value)?;
        token.end()
    }
}

/// The `arbitrary_precision` `Number` token, which this workspace cannot turn on: written as
/// serde_json writes it with the features of this build (its digits as they are when the
/// feature is on, an object when it is off), and so are malformed tokens.
#[test]
fn serde_json_s_number_token_is_written_as_serde_json_writes_it() {
    const NUMBER: &str = "$serde_json::private::Number";
    const RAW: &str = "$serde_json::private::RawValue";
    for name in [NUMBER, RAW] {
        let digits = Token {
            name,
            field: name,
            value: Value::from("123456789012345678901234567890.50"),
        };
        assert_same(&digits);
        assert_same(&[&digits, &digits]);
        assert_same(&BTreeMap::from([("n", &digits)]));
        for (field, value) in [("other", Value::from("1")), (name, Value::from(1))] {
            assert_same(&Token { name, field, value });
        }
    }
}

/// A `RawValue` is written in one pass, not left to serde_json.
#[test]
fn raw_values_are_written_in_one_pass() {
    let raw = serde_json::value::RawValue::from_string(r#"[1, "x"]"#.to_owned()).unwrap();
    let counted = Counted {
        value: &raw,
        calls: std::cell::Cell::new(0),
    };
    let mut ours = String::new();
    write(&mut ours, &BTreeMap::from([("raw", &counted)])).unwrap();
    assert_eq!(ours, r#"{"raw":[1, "x"]}"#);
    assert_eq!(counted.calls.get(), 1);
}

/// Catches the error of its first element and writes `"x"` instead, counting its runs.
struct Swallowing<T> {
    bad: T,
    calls: std::cell::Cell<u32>,
}

impl<T: Serialize> Serialize for Swallowing<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.calls.set(self.calls.get() + 1);
        let mut seq = serializer.serialize_seq(None)?;
        if seq.serialize_element(&self.bad).is_err() {
            seq.serialize_element("x")?;
        }
        seq.end()
    }
}

/// An error caught inside a `Serialize` impl still hands the text to serde_json (whatever it
/// writes, here the same broken `[{,"x"]`), rather than passing off this writer's partial
/// text as whole.
#[test]
fn an_error_caught_by_the_value_still_leaves_the_text_to_serde_json() {
    fn check<T: Serialize>(bad: T) {
        let value = Swallowing {
            bad,
            calls: std::cell::Cell::new(0),
        };
        let theirs = serde_json::to_string(&value);
        value.calls.set(0);
        let mut ours = String::new();
        let written = write(&mut ours, &value);
        assert_eq!(value.calls.get(), 2, "serde_json wrote {theirs:?}");
        assert_eq!(written.is_ok(), theirs.is_ok());
        if let Ok(theirs) = theirs {
            assert_eq!(ours, theirs);
        }
    }
    check(BTreeMap::from([(vec![1], 0)]));
    check(BTreeMap::from([(1u8, Failing)]));
    check(Failing);
    check([Some(Failing)]);
}

/// A map from its entries in order, for keys that are not `Ord` (floats).
struct Entries<K, V>(Vec<(K, V)>);

impl<K: Serialize, V: Serialize> Serialize for Entries<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// Keys of every type serde can write, and what serde_json refuses among them (a float that
/// is not finite, `None`, unit, a sequence), inside containers too.
#[test]
fn keys_of_every_type_come_out_as_serde_json_s() {
    for key in [
        0.0,
        -0.0,
        1.5,
        0.1,
        1e21,
        1e-7,
        f64::MAX,
        5e-324,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        assert_same(&Entries(vec![(key, 1)]));
        assert_same(&Entries(vec![(key as f32, 1)]));
        assert_same(&[Entries(vec![(0.5, "a"), (key, "b")])]);
    }
    assert_same(&Entries(vec![(true, 1), (false, 2)]));
    assert_same(&Entries(vec![('a', 1), ('\u{0}', 2), ('\\', 3), ('😀', 4)]));
    assert_same(&Entries(vec![(i128::MIN, 1), (-1, 2), (i128::MAX, 3)]));
    assert_same(&Entries(vec![(u128::MAX, 1), (0, 2)]));
    assert_same(&Entries(vec![(i8::MIN, 1), (i8::MAX, 2)]));
    assert_same(&Entries(vec![(u8::MAX, 1), (0, 2)]));
    assert_same(&Entries(vec![(Some(1.5), 1), (None, 2)]));
    assert_same(&Entries(vec![(Some(Some('k')), 1)]));
    assert_same(&Entries(vec![((), 1)]));
    assert_same(&Entries(vec![(Unit, 1)]));
    assert_same(&Entries(vec![(Variants::Newtype(1), 1)]));
    assert_same(&Entries(vec![(Bytes(b"k"), 1)]));
    assert_same(&Entries(vec![(Pair(1, "a"), 1)]));
}

/// Written through `collect_str` in several pieces (as `Display` impls write), some needing
/// escapes, some plain, some empty.
struct Pieces(&'static [&'static str]);

impl std::fmt::Display for Pieces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for piece in self.0 {
            f.write_str(piece)?;
        }
        Ok(())
    }
}

impl Serialize for Pieces {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[test]
fn collected_strings_are_escaped_piece_by_piece_as_serde_json_escapes_them() {
    for pieces in [
        &[][..],
        &[""],
        &["plain"],
        &["a\"", "\n", "", "é€😀", "\\", "\u{1}\u{1f}"],
        &[
            "a fairly long plain piece over words",
            "\"",
            "another long plain piece",
        ],
        &["\r\n\t", "x"],
    ] {
        assert_same(&Pieces(pieces));
        assert_same(&[Pieces(pieces), Pieces(pieces)]);
        assert_same(&Entries(vec![(Pieces(pieces), Pieces(pieces))]));
    }
    assert_same(&Entries(vec![(format_args!("{}-{}", 1, "\"k\""), 1)]));
}
