//! The shared store: statistics and decision records that every worker of a fleet sees.
//!
//! A host may offer a store (SQLite on one machine, Redis for a fleet). Operations answer from
//! the host's local cache (the first read of a key fetches it once; [`keys`] and
//! [`compare_and_set`] wait for the store): additions are applied to that cache and sent
//! to the store in the background, reads see the store as of its last refresh plus this
//! process's own additions. Keys are the plugin's own: the host puts each plugin's keys in a
//! namespace of its name, so two plugins never see each other's.
//!
//! Without a store (an older host, a host configured without one, or a
//! [`Harness`](crate::Harness)) every function says so: `None` or `false`, never an error, and
//! the plugin keeps its own state.
//!
//! - [`add`]: atomic additions to named numeric fields of a key (`n`, `sum`, `sumsq` of an arm).
//! - [`add_once`]: the same, counted once fleet-wide per idempotency mark (a task id): a task
//!   scored twice, by a retry or a replayed batch, counts once. [`mark_once`] is a mark alone.
//! - [`read`]: a key's fields; [`keys`]: the keys under a prefix (for reports).
//!
//! Keys, marks and field names are plain text without newlines or tabs.
//! - [`record`] / [`record_since`] and [`compare_and_set`]: a small JSON record with a version, for decisions
//!   (a promotion) that exactly one worker of the fleet may make.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A versioned JSON record of the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Starts at 1 with the first write and grows by one with each; 0 means "no record yet"
    /// in [`compare_and_set`].
    pub version: u64,
    /// The record.
    pub value: Value,
}

/// Sends one operation to the host's store: the answer's JSON, or `None` without a store.
fn op(name: &str, args: &Value) -> Option<Value> {
    match crate::log::store_call(name, &args.to_string()) {
        Ok(Some(answer)) => serde_json::from_str(&answer).ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(operation = name, error = %e.message, "the host's store refused an operation");
            None
        }
    }
}

/// Sends one operation whose arguments and answer are plain text (the hot ones).
fn raw(name: &str, text: &str) -> Option<String> {
    match crate::log::store_call(name, text) {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(operation = name, error = %e.message, "the host's store refused an operation");
            None
        }
    }
}

/// Whether `name` can be a key, mark or field: not empty, no newline, no tab.
fn plain(name: &str) -> bool {
    !name.is_empty() && !name.contains(['\n', '\t'])
}

fn push_delta(text: &mut String, delta: f64) {
    use std::fmt::Write as _;
    // `Display` of an `f64` is the shortest text that reads back as the same number.
    let _ = write!(text, "{delta}");
}

/// Whether the host offers a store to this plugin.
pub fn available() -> bool {
    op("available", &Value::Null).is_some_and(|v| v == Value::Bool(true))
}

/// Adds each delta to its field of `key` (a missing field starts at 0). `false` without a
/// store, or when a name is empty or holds a newline or a tab, or a delta is not finite.
pub fn add(key: &str, fields: &[(&str, f64)]) -> bool {
    if !plain(key) || fields.iter().any(|(f, d)| !plain(f) || !d.is_finite()) {
        return false;
    }
    let mut text = String::with_capacity(key.len() + 24 * fields.len());
    text.push_str(key);
    for (field, delta) in fields {
        text.push('\n');
        text.push_str(field);
        text.push('\t');
        push_delta(&mut text, *delta);
    }
    raw("add", &text).is_some()
}

/// Adds the deltas of each key once fleet-wide for `mark`: a second call with the same mark,
/// from this worker or any other, adds nothing. `Some(true)` when this process had not seen the
/// mark since its last flush (the store decides for the fleet when it flushes, in the same
/// transaction as the additions, and the next refresh of the cache shows its decision);
/// `Some(false)` for a mark already pending here; `None` without a store.
pub fn add_once(mark: &str, adds: &[(&str, &[(&str, f64)])]) -> Option<bool> {
    let valid = plain(mark)
        && adds.iter().all(|(key, fields)| {
            plain(key) && fields.iter().all(|(f, d)| plain(f) && d.is_finite())
        });
    if !valid {
        return None;
    }
    let mut text = String::with_capacity(mark.len() + 48 * adds.len());
    text.push_str(mark);
    for (key, fields) in adds {
        for (field, delta) in *fields {
            text.push('\n');
            text.push_str(key);
            text.push('\t');
            text.push_str(field);
            text.push('\t');
            push_delta(&mut text, *delta);
        }
    }
    match raw("mark", &text)?.as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Sets the idempotency mark `mark`: `Some(true)` when this process had not seen it, `None`
/// without a store. See [`add_once`].
pub fn mark_once(mark: &str) -> Option<bool> {
    add_once(mark, &[])
}

/// The fields of `key` (empty when it has none yet); `None` without a store.
pub fn read(key: &str) -> Option<BTreeMap<String, f64>> {
    if !plain(key) {
        return None;
    }
    let answer = raw("read", key)?;
    Some(
        answer
            .lines()
            .filter_map(|line| {
                let (field, value) = line.split_once('\t')?;
                Some((field.to_owned(), value.parse().ok()?))
            })
            .collect(),
    )
}

/// The keys under `prefix` that hold fields, the fleet's and this process's: a scan that waits
/// for the store (within the host's timeouts), for reports rather than every call. `None`
/// without a store.
pub fn keys(prefix: &str) -> Option<Vec<String>> {
    let answer = op("keys", &json!({"prefix": prefix}))?;
    serde_json::from_value(answer).ok()
}

/// The record at `key`: `Some(None)` when there is none yet, `None` without a store.
pub fn record(key: &str) -> Option<Option<Record>> {
    record_since(key, 0)
}

/// The record at `key` if its version is above `since` (what the caller already has):
/// `Some(None)` when there is no newer one, `None` without a store. Cheaper than [`record`]
/// when nothing changed: the record's value is not sent.
pub fn record_since(key: &str, since: u64) -> Option<Option<Record>> {
    if !plain(key) {
        return None;
    }
    let answer = raw("record", &format!("{key}\n{since}"))?;
    let Some((version, value)) = answer.split_once('\n') else {
        return Some(None);
    };
    Some(Some(Record {
        version: version.parse().ok()?,
        value: serde_json::from_str(value).ok()?,
    }))
}

/// Writes `value` at `key` if the record's version is still `version` (0: no record yet).
/// `Some(true)` when written (the record's version is now `version + 1`), `Some(false)` when
/// another writer came first or the store cannot be reached, `None` without a store. This is
/// the one operation that waits for the store (within the host's bounded timeouts): a decision
/// must be the fleet's.
pub fn compare_and_set(key: &str, version: u64, value: &Value) -> Option<bool> {
    op(
        "cas",
        &json!({"key": key, "version": version, "value": value}),
    )
    .and_then(|v| v.as_bool())
}
