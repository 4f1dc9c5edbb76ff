//! The shared store plugins reach through `plugin_api::store`: additions to numeric fields,
//! idempotency marks and versioned records, kept in SQLite (one machine) or Redis (a fleet).
//!
//! Nothing on a plugin's call path waits for the backend (except a compare-and-set, a rare
//! decision): each process keeps a cache, applies additions to it at once, and a background
//! thread flushes them in batches and refreshes what the plugins read, every
//! [`StoreOptions::flush_interval`]. A batch is one backend transaction with its own id, so a
//! batch retried after an ambiguous failure is applied once; a group of additions under an
//! idempotency mark is applied only if the mark is new, in the same transaction. While the
//! backend cannot be reached the batch is kept and retried (one warning), and plugins go on
//! learning from the cache.

mod redis_backend;
mod sqlite;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::PluginError;

/// A key's numeric fields.
pub type Fields = BTreeMap<String, f64>;

/// A versioned JSON record as the store holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// 1 after the first write, one more with each.
    pub version: u64,
    /// The record's JSON text.
    pub value: String,
}

/// One addition of a batch: a field of a key (ids of the batch's names) and its delta.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    pub(crate) key: u32,
    pub(crate) field: u32,
    pub(crate) delta: f64,
}

/// Additions applied together, at most once per mark when there is one: where the group's
/// mark and rows end in the batch's text of marks (one buffer for all of them, not an
/// allocation each) and its rows; each starts where the group before it ends, and a group
/// without a mark has an empty one (marks are never empty). 16 bytes a group: with a range
/// of each it was 40, and a second of additions holds tens of thousands of groups, written
/// by the pipeline's thread (an outage's, millions).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Group {
    marks_end: usize,
    rows_end: usize,
}

/// Each of `groups`' mark (if it has one) in `marks` and rows in `rows`, in order.
fn walk<'a>(
    groups: &'a [Group],
    marks: &'a str,
    rows: &'a [Row],
) -> impl Iterator<Item = (Option<&'a str>, &'a [Row])> + 'a {
    let mut start = (0, 0);
    groups.iter().map(move |group| {
        let (marks_start, rows_start) =
            std::mem::replace(&mut start, (group.marks_end, group.rows_end));
        (
            marks
                .get(marks_start..group.marks_end)
                .filter(|mark| !mark.is_empty()),
            rows.get(rows_start..group.rows_end).unwrap_or_default(),
        )
    })
}

/// One flush: groups applied in one transaction, at most once per id. Keys and fields are
/// ids of `keys` and `fields` (the names interned when this batch was made).
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    pub(crate) id: String,
    pub(crate) keys: Vec<Arc<str>>,
    pub(crate) fields: Vec<Arc<str>>,
    pub(crate) groups: Vec<Group>,
    pub(crate) rows: Vec<Row>,
    /// The groups' marks, one after the other (see [`Group`]).
    pub(crate) marks: String,
}

impl Batch {
    /// Each group's mark (if it has one) and rows, in order.
    pub(crate) fn groups(&self) -> impl Iterator<Item = (Option<&str>, &[Row])> + '_ {
        walk(&self.groups, &self.marks, &self.rows)
    }

    /// The additions of `rows` (a group's): key, field, delta.
    pub(crate) fn adds<'a>(
        &'a self,
        rows: &'a [Row],
    ) -> impl Iterator<Item = (&'a str, &'a str, f64)> + 'a {
        rows.iter().filter_map(|row| {
            Some((
                &**self.keys.get(row.key as usize)?,
                &**self.fields.get(row.field as usize)?,
                row.delta,
            ))
        })
    }
}

/// What a backend does. Every call is bounded by the backend's timeouts.
pub(crate) trait Backend: Send {
    /// Applies the batch in one transaction; nothing when its id was applied before.
    fn apply(&mut self, batch: &Batch) -> anyhow::Result<()>;
    /// The fields of each key that has any.
    fn read(&mut self, keys: &[String]) -> anyhow::Result<HashMap<String, Fields>>;
    /// The records of each key that has one.
    fn records(&mut self, keys: &[String]) -> anyhow::Result<HashMap<String, StoredRecord>>;
    /// Writes `value` at `key` if its version is `version` (0: none yet).
    fn compare_and_set(&mut self, key: &str, version: u64, value: &str) -> anyhow::Result<bool>;
    /// Whether the backend answers.
    fn ping(&mut self) -> anyhow::Result<()>;
    /// Every key under `prefix` with its fields.
    fn scan(&mut self, prefix: &str) -> anyhow::Result<Vec<(String, Fields)>>;
    /// Writes the status of the worker `id` (a JSON text), kept for `ttl` unless written again.
    fn publish(&mut self, id: &str, status: &str, ttl: Duration) -> anyhow::Result<()>;
    /// Removes the status of the worker `id` (it stops).
    fn unpublish(&mut self, id: &str) -> anyhow::Result<()>;
    /// The workers' statuses not expired: at most [`MAX_WORKERS`], in the order of their ids;
    /// one whose id or text is not UTF-8, whose id is longer than [`MAX_WORKER_ID`] or whose
    /// text is longer than [`MAX_WORKER_STATUS`] bytes (not read), or that is not a text, is
    /// counted as unreadable.
    fn published(&mut self) -> anyhow::Result<Published>;
}

/// What [`Backend::published`] read.
#[derive(Debug, Default)]
pub(crate) struct Published {
    /// `(id, text)`.
    statuses: Vec<(String, String)>,
    unreadable: usize,
    /// Statuses past the first [`MAX_WORKERS`], not read.
    left_out: usize,
}

impl Published {
    /// Adds what was read under `id`: `None` for no text.
    fn push(&mut self, id: Vec<u8>, text: Option<Vec<u8>>) {
        let status = (id.len() <= MAX_WORKER_ID)
            .then_some(text)
            .flatten()
            .filter(|t| !t.is_empty() && t.len() <= MAX_WORKER_STATUS)
            .and_then(|t| Some((String::from_utf8(id).ok()?, String::from_utf8(t).ok()?)));
        match status {
            Some(status) => self.statuses.push(status),
            None => self.unreadable += 1,
        }
    }
}

/// The most workers' statuses [`Store::workers`] reads.
pub(crate) const MAX_WORKERS: usize = 1000;
/// The longest worker status read, in bytes.
pub(crate) const MAX_WORKER_STATUS: usize = 64 * 1024;
/// The longest worker id read, in bytes.
pub(crate) const MAX_WORKER_ID: usize = 256;
/// The shortest time between two statuses a worker publishes.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// How long a worker's status stays in the store without an update: ten flush intervals, and
/// at least a minute (a worker killed, or cut off from the store, drops out after that).
fn publish_ttl(flush_interval: Duration) -> Duration {
    flush_interval
        .saturating_mul(10)
        .max(Duration::from_secs(60))
}

/// The workers' statuses read from the store ([`Store::workers`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workers {
    /// Sorted by worker.
    pub workers: Vec<WorkerStatus>,
    /// Statuses left out as not a worker's: not UTF-8, over-long, not JSON of the shape of a
    /// [`WorkerStatus`], or under another worker's id (written by something else).
    pub unreadable: usize,
    /// Statuses not read, past the first 1000.
    pub left_out: usize,
}

/// What a worker publishes in the store after its flushes, for `worker store status` on any
/// machine of the fleet ([`Store::publish_as_worker`], [`Store::workers`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// `HOST:PID:NONCE` (the nonce tells apart two processes of one host name and pid: two
    /// containers, say).
    pub worker: String,
    /// When the worker opened the store (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// When it wrote this status.
    pub updated_ms: u64,
    /// How long after `updated_ms` the status is dropped unless written again.
    pub ttl_ms: u64,
    /// The worker's flush interval.
    pub flush_interval_ms: u64,
    /// As in [`StoreStatus`], for that worker.
    pub last_flush_ms: Option<u64>,
    /// As in [`StoreStatus`].
    pub pending: usize,
    /// As in [`StoreStatus`].
    pub holding: Vec<String>,
    /// As in [`StoreStatus`].
    pub errors: u64,
    /// As in [`StoreStatus`].
    pub last_error: Option<String>,
    /// As in [`StoreStatus`] (absent from a status written by an earlier version).
    #[serde(default)]
    pub last_error_ms: Option<u64>,
}

/// A worker publishing its status: see [`Store::publish_as_worker`].
struct Publisher {
    id: String,
    started_ms: u64,
    /// When it last published (0: never).
    last_ms: u64,
}

/// This worker's id in the store: `HOST:PID:NONCE`, the host name cut to 64 bytes of letters,
/// digits, `.`, `-` and `_`, the nonce six hexadecimal digits of the time it was made.
fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let host = if host.is_empty() { "localhost" } else { &host };
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
        d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(7)
    }) & 0xff_ffff;
    format!("{host}:{}:{nonce:06x}", std::process::id())
}

/// How the store behaves.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How often additions are flushed and reads refreshed (1 s by default).
    pub flush_interval: Duration,
    /// The bound of every wait on the backend: connecting, reading, a lock (5 s by default).
    pub timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

/// What `worker store status` shows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    /// The backend and where it is (no password).
    pub backend: String,
    /// When the last flush succeeded (milliseconds since the Unix epoch), if one did.
    pub last_flush_ms: Option<u64>,
    /// Groups of additions not yet in the store.
    pub pending: usize,
    /// The plugins (by name, sorted, once each) that may hold additions not handed to the
    /// worker yet, and so not counted in `pending`: a plugin keeps what its calls add (up to
    /// 16 kB) until the worker asks for it, after its next flush, or at a flush on request
    /// ([`Store::flush`]). Empty when every addition made is in `pending` or in the store.
    pub holding: Vec<String>,
    /// Whether the last attempt reached the store.
    pub reachable: bool,
    /// Failed attempts since the start.
    pub errors: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// When it happened (milliseconds since the Unix epoch).
    pub last_error_ms: Option<u64>,
}

/// The names of keys and fields that additions were made to, numbered at their first use:
/// pending additions are rows of these ids, and a plugin built against table version 6 hands
/// its additions over as ids (`plugin_api::store`).
#[derive(Default)]
struct Names {
    /// Full key names (the plugin's namespace included).
    keys: Vec<Arc<str>>,
    key_ids: HashMap<Arc<str>, u32>,
    fields: Vec<Arc<str>>,
    field_ids: HashMap<Arc<str>, u32>,
    /// How many names each plugin (by namespace) had numbered first.
    numbered: HashMap<String, usize>,
}

impl Names {
    /// The names `rows` use, as a batch's own tables, with the rows' ids renumbered into them:
    /// a flush sends the names of its additions, not every name the store ever numbered.
    fn used_by(&self, rows: &mut [Row]) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        fn renumber(
            id: &mut u32,
            all: &[Arc<str>],
            own: &mut Vec<Arc<str>>,
            map: &mut FxHashMap<u32, u32>,
        ) {
            let next = u32::try_from(own.len()).unwrap_or(u32::MAX);
            let new = *map.entry(*id).or_insert_with(|| {
                own.push(
                    all.get(*id as usize)
                        .cloned()
                        .unwrap_or_else(|| Arc::from("")),
                );
                next
            });
            *id = new;
        }
        let (mut keys, mut fields) = (Vec::new(), Vec::new());
        let (mut key_map, mut field_map) = (FxHashMap::default(), FxHashMap::default());
        for row in rows {
            renumber(&mut row.key, &self.keys, &mut keys, &mut key_map);
            renumber(&mut row.field, &self.fields, &mut fields, &mut field_map);
        }
        (keys, fields)
    }
}

/// The most names (keys and fields each) a store numbers; a plugin past it gets an error.
const MAX_NAMES: usize = 1 << 20;

/// The most names one plugin may have numbered (keys and fields together): a plugin that adds
/// under ever new keys (made from its input, say) runs out of its own share, not the others'.
const MAX_NAMES_PER_PLUGIN: usize = MAX_NAMES / 4;

/// Numbers `name` in `names`/`ids` (a new name gets the next id), counting it in `numbered`
/// against `namespace`'s share.
fn intern(
    names: &mut Vec<Arc<str>>,
    ids: &mut HashMap<Arc<str>, u32>,
    name: &str,
    numbered: &mut HashMap<String, usize>,
    namespace: &str,
) -> Option<u32> {
    if let Some(id) = ids.get(name) {
        return Some(*id);
    }
    let used = numbered.get(namespace).copied().unwrap_or(0);
    if names.len() >= MAX_NAMES || used >= MAX_NAMES_PER_PLUGIN {
        return None;
    }
    let id = u32::try_from(names.len()).ok()?;
    let name: Arc<str> = Arc::from(name);
    names.push(Arc::clone(&name));
    ids.insert(name, id);
    match numbered.get_mut(namespace) {
        Some(used) => *used += 1,
        None => {
            numbered.insert(namespace.to_owned(), 1);
        }
    }
    Some(id)
}

/// Where a checked entry of a batch is: its mark's bytes (if any) and its rows' bytes.
type EntryAt = (Option<(usize, usize)>, usize, usize);

/// The sums of additions per key and field (ids).
type Sums = FxHashMap<(u32, u32), f64>;

#[derive(Default)]
struct Cache {
    /// The store's fields as of the last refresh.
    base: HashMap<String, Fields>,
    names: Names,
    /// Sums of the additions not yet flushed (`pending`) and of the batch being flushed.
    pending_sum: Sums,
    inflight_sum: Sums,
    /// Groups under a mark, each applied only if its mark is new, their rows and their marks.
    pending: Vec<Group>,
    rows: Vec<Row>,
    marks_text: String,
    /// Additions without a mark, summed into one group at the next batch (they need no group
    /// of their own: nothing decides whether they apply).
    unmarked: Sums,
    /// The batch being flushed, kept (with its id) until the store took it.
    inflight: Option<Arc<Batch>>,
    /// The buffers of the last batch the store took, emptied and grown to what recent batches
    /// needed (see [`Spare::prepared`]), for the next batch to fill: a batch holds a second of
    /// additions, and growing fresh buffers to that size every flush (copying them at each
    /// doubling, faulting in new pages) cost the pipeline more than filling them.
    spare: Spare,
    /// Marks added through the `mark` operation (plugins that hand additions over one by one)
    /// since their last flush. A batching plugin keeps its own marks until they are flushed
    /// (`plugin_api::store`), so the host keeps none of them but in `carried`.
    marks: HashSet<Arc<str>>,
    /// The marks not yet flushed when a plugin got a new instance (a load or reload starts with
    /// an empty set while these may still be pending), and every mark added while it is not
    /// empty: checked for every mark until the batch `carried_until` is flushed.
    carried: HashSet<Arc<str>>,
    carried_until: u64,
    /// Batches taken for the backend so far (the pending additions go into the next one), and
    /// the number of the last one the store took: a batching plugin drops a mark once its
    /// batch is flushed.
    taken: u64,
    flushed: u64,
    records: HashMap<String, StoredRecord>,
    /// Kept between batches so that taking one allocates nothing of its own: the entries
    /// read (byte ranges).
    entries_scratch: Vec<EntryAt>,
    /// Keys the plugins read or wrote: refreshed by each flush.
    keys: HashSet<String>,
    record_keys: HashSet<String>,
    status: Status,
}

impl Cache {
    /// Groups not yet in the store: the pending ones, the unmarked sums (one group) and the
    /// batch in flight.
    fn pending_groups(&self) -> usize {
        self.pending.len()
            + usize::from(!self.unmarked.is_empty())
            + self.inflight.as_ref().map_or(0, |b| b.groups.len())
    }

    /// Whether additions are waiting for a batch.
    fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.unmarked.is_empty()
    }

    /// Whether anything is not in the store yet: pending, or in a batch being written.
    fn unwritten(&self) -> bool {
        self.has_pending() || self.inflight.is_some()
    }

    /// The id of the key `full` (its full name, in `namespace`), numbered (and refreshed from
    /// now on) if new.
    fn key_id(&mut self, full: &str, namespace: &str) -> Option<u32> {
        let names = &mut self.names;
        let id = intern(
            &mut names.keys,
            &mut names.key_ids,
            full,
            &mut names.numbered,
            namespace,
        )?;
        if !self.keys.contains(full) {
            self.keys.insert(full.to_owned());
        }
        Some(id)
    }

    /// The id of the field `name`, numbered (against `namespace`'s share) if new.
    fn field_id(&mut self, name: &str, namespace: &str) -> Option<u32> {
        let names = &mut self.names;
        intern(
            &mut names.fields,
            &mut names.field_ids,
            name,
            &mut names.numbered,
            namespace,
        )
    }

    /// Adds a row without a mark.
    fn add_unmarked(&mut self, row: Row) {
        *self.pending_sum.entry((row.key, row.field)).or_insert(0.0) += row.delta;
        *self.unmarked.entry((row.key, row.field)).or_insert(0.0) += row.delta;
    }

    /// Queues `rows` under the mark `namespace` + `mark` unless this process has seen the mark
    /// since its last flush; whether it was new. `kept`: the host keeps the mark in its set
    /// until it is flushed (a plugin handing additions over one by one); a batching plugin
    /// keeps its marks itself. The mark's full name is written once, into the pending marks'
    /// text.
    fn add_marked(
        &mut self,
        namespace: &str,
        mark: &str,
        rows: impl Iterator<Item = Row>,
        kept: bool,
    ) -> bool {
        let at = self.marks_text.len();
        self.marks_text.push_str(namespace);
        self.marks_text.push_str(mark);
        let full = self.marks_text.get(at..).unwrap_or_default();
        // One hash per set: a mark seen before is rare.
        let seen = (!self.carried.is_empty() && !self.carried.insert(Arc::from(full)))
            || (kept && !self.marks.insert(Arc::from(full)));
        if seen {
            self.marks_text.truncate(at);
            return false;
        }
        for row in rows {
            *self.pending_sum.entry((row.key, row.field)).or_insert(0.0) += row.delta;
            self.rows.push(row);
        }
        self.pending.push(Group {
            marks_end: self.marks_text.len(),
            rows_end: self.rows.len(),
        });
        true
    }

    /// Carries the marks of `namespace` not yet flushed over to a new instance of its plugin,
    /// which starts with an empty set of its own: until they are flushed, the host checks every
    /// mark against them.
    fn carry_marks(&mut self, namespace: &str) {
        let pending = walk(&self.pending, &self.marks_text, &self.rows)
            .chain(self.inflight.as_deref().into_iter().flat_map(Batch::groups));
        let marks: Vec<Arc<str>> = pending
            .filter_map(|(mark, _)| mark)
            .filter(|m| m.starts_with(namespace))
            .map(Arc::from)
            .collect();
        if marks.is_empty() {
            return;
        }
        self.carried.extend(marks);
        // The pending groups go into the next batch taken.
        self.carried_until = self.taken + 1;
    }

    /// The sums of `key` (its full name) in `sums`, by field name.
    fn sums_of<'a>(&'a self, sums: &'a Sums, key: &str) -> Vec<(&'a str, f64)> {
        let Some(id) = self.names.key_ids.get(key).copied() else {
            return Vec::new();
        };
        sums.iter()
            .filter(|((k, _), _)| *k == id)
            .filter_map(|((_, f), d)| Some((&**self.names.fields.get(*f as usize)?, *d)))
            .collect()
    }
}

/// Emptied buffers of a batch (see [`Cache::spare`]).
#[derive(Default)]
struct Spare {
    groups: Vec<Group>,
    rows: Vec<Row>,
    marks: String,
    /// The most items (groups, rows, mark bytes) of recent batches: the largest batch's,
    /// less a sixty-fourth for each batch since (a [`Store::flush`], or the round after an
    /// outage's retried batch, takes a small batch after a large one). A buffer far larger (one
    /// that grew over an outage) is not kept.
    peak: [usize; 3],
}

impl Spare {
    /// Notes the sizes of a batch the store took (see [`Spare::peak`]); the peaks after it.
    fn note(&mut self, batch: &Batch) -> [usize; 3] {
        let lens = [batch.groups.len(), batch.rows.len(), batch.marks.len()];
        for (peak, len) in self.peak.iter_mut().zip(lens) {
            *peak = len.max(*peak - *peak / 64);
        }
        self.peak
    }

    /// The buffers of a batch the store took, emptied, for [`Spare::install`], made outside the
    /// cache's lock: each is grown to what recent batches needed (see [`fitted`])
    /// and its pages touched here, on the flush thread, so that the pipeline's thread neither
    /// copies a growing buffer nor faults its pages in; a buffer far larger than that (one
    /// that grew over an outage) is not kept. What is not kept (the batch's names among it) is
    /// handed back to be freed.
    fn prepared(batch: Batch, peak: [usize; 3]) -> (Self, impl Send + use<>) {
        let Batch {
            groups,
            rows,
            marks,
            keys,
            fields,
            ..
        } = batch;
        let [groups_peak, rows_peak, marks_peak] = peak;
        let no_group = Group {
            marks_end: 0,
            rows_end: 0,
        };
        let no_row = Row {
            key: 0,
            field: 0,
            delta: 0.0,
        };
        let (groups, dropped_groups) = fitted(groups, groups_peak, no_group);
        let (rows, dropped_rows) = fitted(rows, rows_peak, no_row);
        let (marks, dropped_marks) = fitted(marks.into_bytes(), marks_peak, 0);
        let spare = Spare {
            groups,
            rows,
            // Emptied: no bytes, so UTF-8.
            marks: String::from_utf8(marks).unwrap_or_default(),
            peak,
        };
        (
            spare,
            (keys, fields, dropped_groups, dropped_rows, dropped_marks),
        )
    }

    /// Puts the buffers `prepared` made in place of the spare ones, empty (this round's batch,
    /// or an earlier round's, took them: rounds are serialized, and nothing else takes them).
    fn install(&mut self, prepared: Spare) {
        *self = prepared;
    }

    /// The buffers for a new batch of the pending `groups`, `rows` and `marks`: each pending
    /// buffer, and the spare one left in its place; or (see [`keeps_pending`]) the spare one
    /// with the pending items copied in, and the larger one left pending. A flush can take a
    /// small batch right after a large one (a [`Store::flush`] just after the flush thread's
    /// round, or what came in while an outage's batch was retried): without this, the buffer a
    /// second's additions grew would carry the small batch, and the next second would grow a
    /// small buffer all over again.
    fn take(
        &mut self,
        groups: &mut Vec<Group>,
        rows: &mut Vec<Row>,
        marks: &mut String,
    ) -> (Vec<Group>, Vec<Row>, String) {
        let [groups_peak, rows_peak, marks_peak] = self.peak;
        // The items copied in keep their places (the groups' ends in rows and marks).
        debug_assert!(self.groups.is_empty() && self.rows.is_empty() && self.marks.is_empty());
        let spare_marks = std::mem::take(&mut self.marks);
        let taken_marks = if keeps_pending(
            marks.len(),
            marks.capacity(),
            spare_marks.capacity(),
            marks_peak,
        ) {
            let mut taken = spare_marks;
            taken.push_str(marks);
            marks.clear();
            taken
        } else {
            std::mem::replace(marks, spare_marks)
        };
        (
            take_buffer(groups, std::mem::take(&mut self.groups), groups_peak),
            take_buffer(rows, std::mem::take(&mut self.rows), rows_peak),
            taken_marks,
        )
    }
}

/// Whether the pending buffer (`len` items of `capacity`) stays pending, its items copied into
/// the `spare` one for the batch: when the spare one is smaller, the items few (the spare one
/// holds them, or they fill a quarter of their buffer at most), and the pending one not far
/// larger than recent batches needed (`peak`; one that grew over an outage goes with the
/// batch, to be let go when the store took it).
fn keeps_pending(len: usize, capacity: usize, spare: usize, peak: usize) -> bool {
    let few = len <= spare.max(capacity / 4);
    let oversized = capacity > peak.max(1024).saturating_mul(4);
    spare < capacity && few && !oversized
}

/// See [`Spare::take`]: the buffer a new batch takes `pending`'s items in, and `pending` left
/// empty, with the larger buffer unless it is oversized.
fn take_buffer<T>(pending: &mut Vec<T>, mut spare: Vec<T>, peak: usize) -> Vec<T> {
    if keeps_pending(pending.len(), pending.capacity(), spare.capacity(), peak) {
        spare.append(pending);
        spare
    } else {
        std::mem::replace(pending, spare)
    }
}

/// `buffer` emptied, unless it is far larger than `peak`: then an empty buffer, and `buffer`
/// handed back. A buffer smaller than `peak` is grown to it and a quarter more, its pages
/// touched (with `filler`), but to four times what it held at most: after an outage, the
/// peak is the outage's batch for a while, and a normal batch's buffer is not grown to that.
/// The growth is skipped when the memory is not there.
fn fitted<T: Clone>(mut buffer: Vec<T>, peak: usize, filler: T) -> (Vec<T>, Vec<T>) {
    if buffer.capacity() > peak.max(1024).saturating_mul(4) {
        return (Vec::new(), buffer);
    }
    let target = peak.min(buffer.len().max(1024).saturating_mul(4));
    buffer.clear();
    if buffer.capacity() < target {
        let room = target.saturating_add(target / 4);
        if buffer.try_reserve_exact(room).is_ok() {
            buffer.resize(room, filler);
            buffer.clear();
        }
    }
    (buffer, Vec::new())
}

#[derive(Default)]
struct Status {
    last_flush_ms: Option<u64>,
    reachable: bool,
    errors: u64,
    last_error: Option<String>,
    last_error_ms: Option<u64>,
    warned: bool,
    /// The last attempt failed: cold reads do not wait for the store.
    down: bool,
}

struct Shared {
    url: String,
    cache: Mutex<Cache>,
    backend: Mutex<Box<dyn Backend>>,
    /// Held for a whole flush round: the flush thread and [`Store::flush`] (a report, the
    /// last flush) would otherwise both apply the batch in flight, and the second to finish
    /// would take the batch the first made meanwhile for flushed, unapplied.
    flushing: Mutex<()>,
    stop: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<bool>,
    batch_prefix: String,
    options: StoreOptions,
    /// Grows whenever what the cache read from the store changes (a refresh, a cold read, a
    /// compare-and-set, a scan): a plugin keeps its reads while it is unchanged.
    generation: AtomicU64,
    /// Every plugin instance of this process that may hold additions (see [`Holder`]).
    holders: Mutex<Vec<std::sync::Weak<Holder>>>,
    /// Set by [`Store::close`] before it asks the holders: the flush thread asks none from
    /// then on (an ask of its own could land after the last flush), and no plugin may hold.
    closing: AtomicBool,
    /// Held by the flush thread while it decides to ask and asks, and by [`Store::close`]
    /// while it sets `closing`: an ask of the flush thread's is either out before `close`
    /// asks (which then waits for it), or never made.
    asking: Mutex<()>,
    /// Set when this process publishes its status (a worker): see [`Store::publish_as_worker`].
    publisher: Mutex<Option<Publisher>>,
}

impl Shared {
    /// Says that what the cache read from the store changed.
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// The store of one process: a cache, a backend and the thread that flushes to it.
/// Cheap to clone; the flush thread stops (after a last flush) when [`Store::close`] is called
/// or the last clone drops.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    _thread: Arc<FlushThread>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.shared.url)
            .finish()
    }
}

struct FlushThread {
    shared: Arc<Shared>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for FlushThread {
    fn drop(&mut self) {
        stop_thread(&self.shared, &self.handle);
    }
}

/// The longest wait for the flush thread's last flush at exit (three times a store
/// operation's own timeouts).
const STOP_BOUND: Duration = Duration::from_secs(15);

/// The longest wait for the flush thread at exit when nothing is pending: time for it to
/// remove the worker's status, not for a round of reads that a store that hangs holds up.
const STOP_BOUND_IDLE: Duration = Duration::from_secs(1);

fn stop_thread(shared: &Shared, handle: &Mutex<Option<std::thread::JoinHandle<()>>>) {
    shared.stop.store(true, Ordering::Release);
    *lock(&shared.wake_lock) = true;
    shared.wake.notify_all();
    if let Some(handle) = lock(handle).take() {
        // Bounded: a store that answers a byte at a time keeps its socket's per-read timeouts
        // from ever firing, and the process must still end. With nothing to write, the
        // thread's round is only reads (a process that only read: `worker store status`).
        // Looked at again while waiting: an addition may still come (a thread of the
        // process that outlived its plugin host), and then the whole bound applies.
        let started = std::time::Instant::now();
        let mut pending = unwritten(shared);
        while !handle.is_finished() {
            let bound = if pending { STOP_BOUND } else { STOP_BOUND_IDLE };
            if started.elapsed() >= bound {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            pending = pending || unwritten(shared);
        }
        if !handle.is_finished() && !pending {
            tracing::debug!(store = %shared.url, "the store's flush thread is still in a round of reads at exit; not waited for");
        } else if !handle.is_finished() {
            tracing::warn!(store = %shared.url, waited_s = STOP_BOUND.as_secs(), "the store's last flush did not finish in time (the store is slow or unreachable); exiting without it");
        } else {
            let _ = handle.join();
        }
        let cache = lock(&shared.cache);
        let left = cache.pending_groups();
        if left > 0 {
            tracing::warn!(store = %shared.url, groups = left, "the store could not be reached before exit: these additions are not in it (their idempotency marks are not either, so a re-run of the same tasks counts them)");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the Unix epoch, as the store's statuses give times.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// `d` in whole milliseconds (saturated).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Adds `delta` to `field` of `fields`.
fn add_into_fields(fields: &mut Fields, field: &str, delta: f64) {
    match fields.get_mut(field) {
        Some(value) => *value += delta,
        None => {
            fields.insert(field.to_owned(), delta);
        }
    }
}

/// Adds `fields` to `key`'s sums, allocating names only for a key or field seen the first time.
fn add_into<'a>(
    sum: &mut HashMap<String, Fields>,
    key: &str,
    fields: impl IntoIterator<Item = (&'a str, f64)>,
) {
    // One lookup for a key seen before (the common case), a second only for a new one.
    let entry = match sum.get_mut(key) {
        Some(entry) => entry,
        None => sum.entry(key.to_owned()).or_default(),
    };
    for (field, delta) in fields {
        match entry.get_mut(field) {
            Some(value) => *value += delta,
            None => {
                entry.insert(field.to_owned(), delta);
            }
        }
    }
}

/// The URL with any password replaced, for logs and status.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl Store {
    /// Opens the store at `url`: `sqlite://PATH` (a file, created if missing) or
    /// `redis://HOST:PORT/DB`. A Redis store that cannot be reached yet is not an error: the
    /// process learns locally until it can.
    ///
    /// # Errors
    ///
    /// The URL has another scheme or is malformed, or the SQLite file cannot be opened.
    pub fn open(url: &str, options: StoreOptions) -> anyhow::Result<Store> {
        let backend: Box<dyn Backend> = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                anyhow::bail!(
                    "store URL `{url}`: sqlite:// needs a file path, as in sqlite://state/store.db"
                );
            }
            Box::new(
                sqlite::Sqlite::open(std::path::Path::new(path), options.timeout)
                    .with_context(|| format!("opening the SQLite store {path}"))?,
            )
        } else if url.starts_with("redis://") {
            Box::new(
                redis_backend::Redis::new(url, options.timeout)
                    .with_context(|| format!("store URL `{}`", redact(url)))?,
            )
        } else {
            anyhow::bail!(
                "store URL `{}`: the scheme must be sqlite:// (a file) or redis:// (host:port/db)",
                redact(url)
            );
        };
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let shared = Arc::new(Shared {
            url: redact(url),
            cache: Mutex::new(Cache::default()),
            backend: Mutex::new(backend),
            flushing: Mutex::new(()),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
            batch_prefix: format!("{}-{nonce:x}", std::process::id()),
            options,
            generation: AtomicU64::new(1),
            holders: Mutex::default(),
            closing: AtomicBool::new(false),
            asking: Mutex::new(()),
            publisher: Mutex::new(None),
        });
        let worker = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("store-flush".into())
            .spawn(move || flush_loop(&worker))
            .context("starting the store's flush thread")?;
        Ok(Store {
            _thread: Arc::new(FlushThread {
                shared: Arc::clone(&shared),
                handle: Mutex::new(Some(handle)),
            }),
            shared,
        })
    }

    /// The store's status, as this process sees it.
    pub fn status(&self) -> StoreStatus {
        status_of(&self.shared)
    }

    /// Asks the store whether it answers (bounded by its timeout), and notes the answer in
    /// the status.
    ///
    /// # Errors
    ///
    /// The store could not be reached.
    pub fn ping(&self) -> anyhow::Result<()> {
        let answer = lock(&self.shared.backend).ping();
        let mut cache = lock(&self.shared.cache);
        match &answer {
            Ok(()) => note_up(&self.shared, &mut cache),
            Err(e) => note_down(&self.shared, &mut cache, e),
        }
        answer
    }

    /// Makes this process publish its status in the store, as a worker: after its first flush
    /// round and then after a round that reached the store, at most once a second, under
    /// `HOST:PID:NONCE`; it is removed after a last flush that reached the store as the store
    /// closes, and otherwise expires ten flush intervals (at least a minute) after its last
    /// update. [`Store::workers`], in any process on the same store, reads them.
    pub fn publish_as_worker(&self) {
        *lock(&self.shared.publisher) = Some(Publisher {
            id: worker_id(),
            started_ms: now_ms(),
            last_ms: 0,
        });
        // A first round now, rather than an interval from now.
        *lock(&self.shared.wake_lock) = true;
        self.shared.wake.notify_all();
    }

    /// The statuses the fleet's workers published in the store and that have not expired
    /// (the first 1000 by id), with the number of those that are not a worker's (see
    /// [`Workers`]).
    ///
    /// # Errors
    ///
    /// The store could not be reached.
    pub fn workers(&self) -> anyhow::Result<Workers> {
        let published = lock(&self.shared.backend).published()?;
        let mut unreadable = published.unreadable;
        let mut workers: Vec<WorkerStatus> = published
            .statuses
            .into_iter()
            .filter_map(|(id, text)| {
                let status = serde_json::from_str::<WorkerStatus>(&text)
                    .ok()
                    .filter(|s| s.worker == id);
                if status.is_none() {
                    unreadable += 1;
                }
                status
            })
            .collect();
        workers.sort_by(|a, b| a.worker.cmp(&b.worker));
        Ok(Workers {
            workers,
            unreadable,
            left_out: published.left_out,
        })
    }

    /// Asks every plugin holding additions to hand them over (waiting at most the store's
    /// timeout for them; one that does not is named in a warning, and its additions stay in
    /// it), then flushes now and waits for it, and for a round the flush thread has begun
    /// (bounded by the backend's timeouts). `Ok` when nothing the store holds is left
    /// pending.
    ///
    /// # Errors
    ///
    /// The store could not be reached; the additions stay pending.
    pub fn flush(&self) -> anyhow::Result<()> {
        // A plugin late with its hand-over is named in a warning; it does not fail the flush
        // of everything else.
        ask_holders(&self.shared, Some(self.shared.options.timeout));
        flush_all(&self.shared);
        let cache = lock(&self.shared.cache);
        if !cache.unwritten() {
            Ok(())
        } else {
            anyhow::bail!(
                "{} groups of additions are not in the store {} yet: {}",
                cache.pending_groups(),
                self.shared.url,
                cache
                    .status
                    .last_error
                    .as_deref()
                    .unwrap_or("unknown error")
            )
        }
    }

    /// Stops the flush thread after a last flush (of what plugins still loaded hold too, asked
    /// for as by [`Store::flush`]).
    pub fn close(&self) {
        {
            let _asking = lock(&self.shared.asking);
            self.shared.closing.store(true, Ordering::Release);
        }
        ask_holders(&self.shared, Some(self.shared.options.timeout));
        stop_thread(&self.shared, &self._thread.handle);
    }

    /// Every key of `plugin` under `prefix`, with its fields, read from the store now.
    ///
    /// # Errors
    ///
    /// The store could not be reached.
    pub fn scan(&self, plugin: &str, prefix: &str) -> anyhow::Result<Vec<(String, Fields)>> {
        let namespace = format!("{plugin}/");
        let rows = lock(&self.shared.backend).scan(&format!("{namespace}{prefix}"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, f)| k.strip_prefix(&namespace).map(|k| (k.to_owned(), f)))
            .collect())
    }

    /// The record of `plugin` at `key`, read from the store now.
    ///
    /// # Errors
    ///
    /// The store could not be reached.
    pub fn read_record(&self, plugin: &str, key: &str) -> anyhow::Result<Option<StoredRecord>> {
        let key = format!("{plugin}/{key}");
        let mut found = lock(&self.shared.backend).records(std::slice::from_ref(&key))?;
        Ok(found.remove(&key))
    }

    /// The handle a plugin's calls go through: its keys and marks in its own namespace.
    /// Made for each instance of the plugin (each load): the marks an earlier instance left
    /// pending are carried over (see `Cache::carry_marks`).
    pub(crate) fn for_plugin(&self, plugin: &str) -> PluginStore {
        let namespace = format!("{plugin}/");
        lock(&self.shared.cache).carry_marks(&namespace);
        let holder = Arc::new(Holder {
            plugin: plugin.into(),
            holds: AtomicBool::new(false),
            asked: AtomicBool::new(false),
            hand_over: std::sync::OnceLock::new(),
        });
        {
            let mut holders = lock(&self.shared.holders);
            holders.retain(|h| h.strong_count() > 0);
            holders.push(Arc::downgrade(&holder));
        }
        PluginStore {
            store: self.clone(),
            namespace,
            told: Arc::default(),
            holder,
        }
    }
}

/// Asks a plugin instance to hand over the additions it holds: set once its generation exists,
/// right after its `create` ([`Holder::can_ask`]). Runs on a thread of its own.
/// `false` when the hand-over failed: the instance is asked again after the next flush.
pub(crate) type HandOver = Box<dyn Fn() -> bool + Send + Sync>;

/// A plugin instance that may keep its additions past the end of its calls (`plugin_api`
/// hands them over once they reach 16 kB, or when asked). It tells the host when it starts
/// holding (`HostApi::store_hold`); the flush thread then asks it after the round, on a thread
/// of its own (a plugin stuck in its hand-over delays only itself, and is not asked again
/// until that one returns), so its additions reach the store about two flush intervals after
/// they were made. [`Store::flush`] and [`Store::close`] ask every holder and wait (bounded).
pub(crate) struct Holder {
    plugin: Box<str>,
    /// The plugin said it holds additions and was not asked since.
    holds: AtomicBool,
    /// A hand-over asked of the plugin has not returned yet.
    asked: AtomicBool,
    hand_over: std::sync::OnceLock<HandOver>,
}

impl Holder {
    /// Whether the host can ask this instance for its additions: only then may it hold them.
    pub(crate) fn can_ask(&self) -> bool {
        self.hand_over.get().is_some()
    }

    /// Sets how to ask the instance (once; later calls are ignored).
    pub(crate) fn set_hand_over(&self, hand_over: HandOver) {
        let _ = self.hand_over.set(hand_over);
    }

    /// Asks the instance on a thread of its own, unless an earlier ask has not returned;
    /// `done` is sent to once the hand-over returned. `false` when it was not asked.
    ///
    /// `holds` is let go only once `asked` is set (and set again before `asked` is let go
    /// when no thread could be had): a [`holding`] between the two sees one or the other.
    fn ask(self: &Arc<Self>, done: Option<std::sync::mpsc::Sender<Box<str>>>) -> bool {
        if self.hand_over.get().is_none() || self.asked.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.holds.store(false, Ordering::Release);
        let holder = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("store-hand-over".into())
            .spawn(move || {
                // A panic (the host's own code around the plugin's) must not leave the
                // holder marked as asked, and so never asked again.
                let handed = holder.hand_over.get().is_none_or(|hand_over| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(hand_over))
                        .unwrap_or(false)
                });
                if !handed {
                    holder.holds.store(true, Ordering::Release);
                }
                holder.asked.store(false, Ordering::Release);
                if let Some(done) = done {
                    let _ = done.send(holder.plugin.clone());
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(plugin = %self.plugin, error = %e, "no thread to ask the plugin for the store additions it holds; asked again after the next flush");
            self.holds.store(true, Ordering::Release);
            self.asked.store(false, Ordering::Release);
            return false;
        }
        true
    }
}

/// The plugins that said they hold additions and have not handed them over since (asked or
/// not), sorted, each once (an instance being reloaded and its successor are one plugin).
fn holding(shared: &Shared) -> Vec<String> {
    let mut names: Vec<String> = lock(&shared.holders)
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .filter(|h| h.holds.load(Ordering::Acquire) || h.asked.load(Ordering::Acquire))
        .map(|h| h.plugin.to_string())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Asks each plugin that said it holds additions to hand them over. With `wait`, asks every
/// holder (after an ask already out returned: it may have begun before what is asked for now)
/// and waits at most that long for them all; then answers the name of one that did not hand
/// over in time (its additions stay in it, and it is asked again after the next flush).
fn ask_holders(shared: &Shared, wait: Option<Duration>) -> Option<Box<str>> {
    let holders: Vec<Arc<Holder>> = {
        let mut holders = lock(&shared.holders);
        holders.retain(|h| h.strong_count() > 0);
        holders
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    };
    let Some(wait) = wait else {
        for holder in holders {
            // Not asked now (an earlier ask is still out): `holds` stays, and it is asked
            // after the next flush.
            if holder.holds.load(Ordering::Acquire) {
                holder.ask(None);
            }
        }
        return None;
    };
    let deadline = std::time::Instant::now() + wait;
    let (done, returned) = std::sync::mpsc::channel();
    // Holders with an ask already out: asked again once it returned.
    let mut out: Vec<Arc<Holder>> = Vec::new();
    // The plugins asked, each taken off when its hand-over returned.
    let mut asked: Vec<Box<str>> = Vec::new();
    for holder in holders.into_iter().filter(|h| h.can_ask()) {
        if holder.ask(Some(done.clone())) {
            asked.push(holder.plugin.clone());
        } else {
            out.push(holder);
        }
    }
    while !out.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        out.retain(|holder| {
            let now = holder.ask(Some(done.clone()));
            if now {
                asked.push(holder.plugin.clone());
            }
            !now
        });
    }
    drop(done);
    while !asked.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(plugin) = returned.recv_timeout(left) else {
            break;
        };
        if let Some(at) = asked.iter().position(|p| *p == plugin) {
            asked.swap_remove(at);
        }
    }
    for holder in &out {
        // Asked after the next flush.
        holder.holds.store(true, Ordering::Release);
    }
    let late = out
        .first()
        .map(|h| h.plugin.clone())
        .or_else(|| asked.first().cloned());
    if let Some(plugin) = &late {
        tracing::warn!(store = %shared.url, plugin = %plugin, waited_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "a plugin did not hand over the store additions it holds in time; they stay in it");
    }
    late
}

/// Whether anything may not be in the store yet: pending or being written in this process,
/// or held by a plugin that has not handed it over.
fn unwritten(shared: &Shared) -> bool {
    lock(&shared.cache).unwritten() || !holding(shared).is_empty()
}

fn status_of(shared: &Shared) -> StoreStatus {
    // Before the cache's lock: the holders' lock is never taken under it.
    let holding = holding(shared);
    let cache = lock(&shared.cache);
    StoreStatus {
        backend: shared.url.clone(),
        last_flush_ms: cache.status.last_flush_ms,
        pending: cache.pending_groups(),
        holding,
        reachable: cache.status.reachable,
        errors: cache.status.errors,
        last_error: cache.status.last_error.clone(),
        last_error_ms: cache.status.last_error_ms,
    }
}

/// Publishes this worker's status, if it publishes one, the last is a second old and the
/// round before reached the store (one that did not waited for it already: this would wait
/// again, and the status could not be written anyway). A failure is left to the flush's own
/// report of the outage.
fn publish(shared: &Shared) {
    let mut publisher = lock(&shared.publisher);
    let Some(publisher) = publisher.as_mut() else {
        return;
    };
    let now = now_ms();
    let every = millis(PUBLISH_EVERY);
    if publisher.last_ms != 0 && now.saturating_sub(publisher.last_ms) < every {
        return;
    }
    let status = status_of(shared);
    if !status.reachable || shared.stop.load(Ordering::Acquire) {
        return;
    }
    let ttl = publish_ttl(shared.options.flush_interval);
    let record = WorkerStatus {
        worker: publisher.id.clone(),
        started_ms: publisher.started_ms,
        updated_ms: now,
        ttl_ms: millis(ttl),
        flush_interval_ms: millis(shared.options.flush_interval),
        last_flush_ms: status.last_flush_ms,
        pending: status.pending,
        holding: status.holding,
        errors: status.errors,
        last_error: status.last_error,
        last_error_ms: status.last_error_ms,
    };
    let Ok(text) = serde_json::to_string(&record) else {
        return;
    };
    match lock(&shared.backend).publish(&publisher.id, &text, ttl) {
        Ok(()) => publisher.last_ms = now,
        Err(e) => {
            tracing::debug!(store = %shared.url, error = %format!("{e:#}"), "this worker's status could not be published");
        }
    }
}

/// Removes this worker's status from the store, if it published one and the last flush
/// reached the store (otherwise the status expires on its own).
fn unpublish(shared: &Shared) {
    let reachable = lock(&shared.cache).status.reachable;
    if let Some(publisher) = lock(&shared.publisher).take()
        && publisher.last_ms != 0
        && reachable
        && let Err(e) = lock(&shared.backend).unpublish(&publisher.id)
    {
        tracing::debug!(store = %shared.url, error = %format!("{e:#}"), "this worker's status could not be removed; it expires on its own");
    }
}

fn flush_loop(shared: &Shared) {
    loop {
        {
            let mut woken = lock(&shared.wake_lock);
            if !*woken {
                woken = shared
                    .wake
                    .wait_timeout(woken, shared.options.flush_interval)
                    .map_or_else(|p| p.into_inner().0, |(g, _)| g);
            }
            *woken = false;
        }
        if shared.stop.load(Ordering::Acquire) {
            // The last flush, at exit: everything pending (with nothing pending there is
            // nothing to write, and reads are of no use any more: a process that only read,
            // `worker store status` say, does not wait for a store that does not answer).
            // (What a plugin still holds cannot be written until it hands it over.)
            let unwritten = || lock(&shared.cache).unwritten();
            if unwritten() {
                flush_all(shared);
            }
            unpublish(shared);
            // An addition that came meanwhile.
            if unwritten() {
                flush_all(shared);
            }
            return;
        }
        flush_due(shared);
        {
            // What plugins hold goes into the next round.
            let _asking = lock(&shared.asking);
            if !shared.closing.load(Ordering::Acquire) && !shared.stop.load(Ordering::Acquire) {
                ask_holders(shared, None);
            }
        }
        publish(shared);
    }
}

/// The flush thread's work each interval: the batch an earlier round could not apply (after
/// an outage), then one batch of what is pending. What comes in meanwhile waits for the next
/// interval: going on until nothing was pending took, on a busy worker, up to eight rounds an
/// interval of ever smaller batches, each a transaction of its own, a read of every key, and
/// every plugin's copies of what it read dropped.
fn flush_due(shared: &Shared) {
    let retrying = lock(&shared.cache).inflight.is_some();
    if flush_once(shared) && retrying && lock(&shared.cache).has_pending() {
        flush_once(shared);
    }
}

static BATCH_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One round: the batch in flight (or a new one from the pending groups) to the backend, then
/// the keys the plugins use read back.
fn flush_once(shared: &Shared) -> bool {
    let _round = lock(&shared.flushing);
    let (batch, keys, record_keys) = {
        let mut cache = lock(&shared.cache);
        if cache.inflight.is_none() && cache.has_pending() {
            // The pending additions go on in the buffers of a batch the store took.
            let cache = &mut *cache;
            let (mut groups, mut rows, marks) =
                cache
                    .spare
                    .take(&mut cache.pending, &mut cache.rows, &mut cache.marks_text);
            // Every row and mark byte belongs to a group: each group starts where the one
            // before it ends.
            debug_assert_eq!(
                groups.last().map_or((0, 0), |g| (g.marks_end, g.rows_end)),
                (marks.len(), rows.len())
            );
            let unmarked = std::mem::take(&mut cache.unmarked);
            if !unmarked.is_empty() {
                rows.extend(unmarked.into_iter().map(|((key, field), delta)| Row {
                    key,
                    field,
                    delta,
                }));
                groups.push(Group {
                    marks_end: marks.len(),
                    rows_end: rows.len(),
                });
            }
            let sum = std::mem::take(&mut cache.pending_sum);
            cache.inflight_sum = sum;
            let seq = BATCH_SEQ.fetch_add(1, Ordering::Relaxed);
            let (keys, fields) = cache.names.used_by(&mut rows);
            cache.taken += 1;
            cache.inflight = Some(Arc::new(Batch {
                id: format!("{}-{seq}", shared.batch_prefix),
                keys,
                fields,
                groups,
                rows,
                marks,
            }));
        }
        let keys: Vec<String> = cache.keys.iter().cloned().collect();
        let record_keys: Vec<String> = cache.record_keys.iter().cloned().collect();
        (cache.inflight.clone(), keys, record_keys)
    };
    let mut backend = lock(&shared.backend);
    let applied = match &batch {
        Some(batch) => backend.apply(batch).map(|()| true),
        None => backend.ping().map(|()| false),
    };
    let read = match &applied {
        Ok(_) => backend
            .read(&keys)
            .and_then(|fields| Ok((fields, backend.records(&record_keys)?))),
        Err(_) => Err(anyhow::anyhow!("not read: the flush failed")),
    };
    drop(backend);
    // The cache's reference alone is left, so that the buffers of a batch the store took can
    // be kept for the next one.
    drop(batch);
    let mut cache = lock(&shared.cache);
    // What the store took is freed after the lock is let go (the plugins' calls wait for it).
    let mut flushed_batch = None;
    let mut flushed_sums = Sums::default();
    let ok = match applied {
        Ok(applied) => {
            if applied {
                // The store holds these marks now and decides for them: the local set keeps
                // only the marks not yet flushed, so it stays small in a long-running worker.
                if let Some(batch) = cache.inflight.take() {
                    if !cache.marks.is_empty() {
                        for mark in batch.groups().filter_map(|(mark, _)| mark) {
                            cache.marks.remove(mark);
                        }
                    }
                    cache.flushed = cache.taken;
                    if cache.flushed >= cache.carried_until {
                        cache.carried = HashSet::new();
                    }
                    flushed_batch = match Arc::try_unwrap(batch) {
                        Ok(batch) => {
                            let peak = cache.spare.note(&batch);
                            Some((batch, peak))
                        }
                        // Still read elsewhere (nothing keeps a reference but the cache, and
                        // rounds are serialized): freed with its last reference.
                        Err(batch) => {
                            drop(batch);
                            None
                        }
                    };
                }
                flushed_sums = std::mem::take(&mut cache.inflight_sum);
                if read.is_err() {
                    // Keep what was flushed visible until the next read.
                    let cache = &mut *cache;
                    for ((key, field), delta) in &flushed_sums {
                        if let (Some(key), Some(field)) = (
                            cache.names.keys.get(*key as usize),
                            cache.names.fields.get(*field as usize),
                        ) {
                            add_into(&mut cache.base, key, [(&**field, *delta)]);
                        }
                    }
                }
            }
            if let Ok((mut fields, records)) = read {
                // Only the keys this round read: a key a cold read added meanwhile stays.
                for key in &keys {
                    match fields.remove(key) {
                        Some(f) => {
                            cache.base.insert(key.clone(), f);
                        }
                        None => {
                            cache.base.remove(key);
                        }
                    }
                }
                for (key, record) in records {
                    let newer = cache
                        .records
                        .get(&key)
                        .is_none_or(|r| r.version <= record.version);
                    if newer {
                        cache.records.insert(key, record);
                    }
                }
            }
            shared.bump();
            cache.status.last_flush_ms = Some(now_ms());
            note_up(shared, &mut cache);
            true
        }
        Err(e) => {
            note_down(shared, &mut cache, &e);
            false
        }
    };
    drop(cache);
    drop(flushed_sums);
    if let Some((batch, peak)) = flushed_batch {
        let (spare, dropped) = Spare::prepared(batch, peak);
        drop(dropped);
        lock(&shared.cache).spare.install(spare);
    }
    ok
}

/// Flushes until nothing is pending (a batch retried after an outage, then what came in
/// meanwhile), or an attempt fails; at most a few rounds: for [`Store::flush`] and the last
/// flush at exit.
fn flush_all(shared: &Shared) {
    for _ in 0..8 {
        if !flush_once(shared) {
            return;
        }
        let cache = lock(&shared.cache);
        if !cache.unwritten() {
            return;
        }
    }
}

/// Records that the store answered (said once after an outage that was warned of).
fn note_up(shared: &Shared, cache: &mut Cache) {
    if !cache.status.reachable && cache.status.warned {
        tracing::info!(store = %shared.url, "the store is reachable again; flushing the pending additions");
    }
    cache.status.reachable = true;
    cache.status.down = false;
    cache.status.warned = false;
}

/// Records a failure to reach the store (one warning until it answers again).
fn note_down(shared: &Shared, cache: &mut Cache, e: &anyhow::Error) {
    // What a server said goes into the log: its control characters (a newline that would
    // forge a log line) are escaped.
    let message = crate::text::escape_control(&format!("{e:#}")).into_owned();
    cache.status.errors += 1;
    cache.status.reachable = false;
    cache.status.down = true;
    if !cache.status.warned {
        tracing::warn!(store = %shared.url, error = %message, "the store cannot be reached: what this process adds is kept and flushed when it is back, and its plugins go on with what they read last");
        cache.status.warned = true;
    }
    cache.status.last_error = Some(message);
    cache.status.last_error_ms = Some(now_ms());
}

/// Answers a plugin's store operations elsewhere: an isolated plugin's go to the host process.
pub(crate) type StoreForward =
    Box<dyn Fn(&str, &str) -> Result<Option<String>, PluginError> + Send + Sync>;

/// How a plugin reaches the store: this process's, or the host's through its process link.
pub(crate) enum StoreAccess {
    /// The store of this process, in the plugin's namespace.
    Local(PluginStore),
    /// The host process answers (the plugin runs isolated in a child process).
    Forward(StoreForward),
}

impl StoreAccess {
    /// Answers one operation of `plugin_api::store`.
    pub(crate) fn op(&self, op: &str, text: &str) -> Result<Option<String>, PluginError> {
        match self {
            StoreAccess::Local(store) => store.op(op, text),
            StoreAccess::Forward(forward) => forward(op, text),
        }
    }

    /// Takes a batch of additions (see [`PluginStore::batch`]).
    pub(crate) fn batch(&self, bytes: &[u8]) -> Result<Option<String>, PluginError> {
        match self {
            StoreAccess::Local(store) => store.batch(bytes),
            // An isolated plugin sees generation 0, so its `plugin_api` sends each addition as
            // an operation and never a batch.
            StoreAccess::Forward(_) => Err(invalid(
                "store.batch: an isolated plugin hands its additions over one by one".to_owned(),
            )),
        }
    }

    /// The generation of the cache the plugin reads: it changes whenever what the cache read
    /// from the store changes. 0 when it cannot be known or is not worth knowing (an isolated
    /// plugin): the plugin then asks every time.
    pub(crate) fn generation(&self) -> u64 {
        match self {
            StoreAccess::Local(store) => store.store.shared.generation.load(Ordering::Acquire),
            // Asking an isolated plugin's host for it costs the round trip a read costs: the
            // plugin asks for every read instead (one round trip, never two).
            StoreAccess::Forward(_) => 0,
        }
    }

    /// The plugin holds additions past the end of its call and asks to be asked for them
    /// (`HostApi::store_hold`): `true` when the host will ask (see [`Holder`]), `false` when
    /// it cannot (an isolated plugin, or an instance still in its `create`), and the plugin
    /// then hands them over itself.
    pub(crate) fn hold(&self) -> bool {
        match self {
            StoreAccess::Local(store)
                if store.holder.can_ask()
                    && !store.store.shared.closing.load(Ordering::Acquire) =>
            {
                store.holder.holds.store(true, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    /// This instance as one that may hold additions: `None` for an isolated plugin.
    pub(crate) fn holder(&self) -> Option<&Arc<Holder>> {
        match self {
            StoreAccess::Local(store) => Some(&store.holder),
            StoreAccess::Forward(_) => None,
        }
    }
}

/// One plugin's view of the store.
#[derive(Clone)]
pub(crate) struct PluginStore {
    store: Store,
    namespace: String,
    /// The batch numbers last answered to this instance (`batch`): the same numbers again are
    /// answered with an empty text, which needs no allocation. Read and written only under the
    /// cache's lock, which orders them (no lock of their own on every crossing).
    told: Arc<[AtomicU64; 2]>,
    /// This instance as one that may hold additions.
    holder: Arc<Holder>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefixArgs {
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasArgs {
    key: String,
    version: u64,
    value: Value,
}

fn invalid(message: String) -> PluginError {
    PluginError {
        kind: crate::ErrorKind::InvalidParams,
        message,
    }
}

/// The largest batch of additions a plugin may hand over at once (bytes).
const MAX_BATCH: usize = 1 << 20;

fn too_many_names() -> PluginError {
    invalid(format!(
        "store: a plugin numbers at most {MAX_NAMES_PER_PLUGIN} distinct keys and field names, and this process at most {MAX_NAMES} of each, until the worker restarts; use fewer distinct keys"
    ))
}

/// The entries of a batch of additions (see [`PluginStore::batch`]): a byte, 0 or 1 (a mark
/// follows: its length as a `u32`, its UTF-8 bytes), then the number of rows as a `u32` and
/// the rows, 16 bytes each (key id and field id as `u32`, delta as the bits of an `f64`), all
/// little-endian.
struct Entries<'a>(&'a [u8]);

struct Entry<'a> {
    mark: Option<&'a str>,
    rows: &'a [u8],
}

impl Entry<'_> {
    fn rows(&self) -> impl Iterator<Item = Row> + '_ {
        Self::rows_of(self.rows)
    }

    /// The rows of an entry's row bytes (16 each).
    fn rows_of(rows: &[u8]) -> impl Iterator<Item = Row> + '_ {
        rows.chunks_exact(16).map(|row| {
            let word = |at: usize| {
                let mut bytes = [0; 4];
                bytes.copy_from_slice(&row[at..at + 4]);
                u32::from_le_bytes(bytes)
            };
            let mut delta = [0; 8];
            delta.copy_from_slice(&row[8..16]);
            Row {
                key: word(0),
                field: word(4),
                delta: f64::from_le_bytes(delta),
            }
        })
    }
}

impl<'a> Entries<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PluginError> {
        if self.0.len() < n {
            self.0 = &[];
            return Err(invalid(
                "store.batch: the batch ends inside an entry".to_owned(),
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn length(&mut self) -> Result<usize, PluginError> {
        let mut bytes = [0; 4];
        bytes.copy_from_slice(self.take(4)?);
        usize::try_from(u32::from_le_bytes(bytes))
            .map_err(|_| invalid("store.batch: a length out of range".to_owned()))
    }

    fn entry(&mut self) -> Result<Entry<'a>, PluginError> {
        let mark = match self.take(1)?[0] {
            0 => None,
            1 => {
                let len = self.length()?;
                let bytes = self.take(len)?;
                Some(
                    std::str::from_utf8(bytes)
                        .map_err(|_| invalid("store.batch: a mark is not UTF-8 text".to_owned()))?,
                )
            }
            other => {
                self.0 = &[];
                return Err(invalid(format!(
                    "store.batch: an entry starts with {other}, not 0 (no mark) or 1 (a mark)"
                )));
            }
        };
        let count = self.length()?;
        let size = count
            .checked_mul(16)
            .ok_or_else(|| invalid("store.batch: too many rows".to_owned()))?;
        let rows = self.take(size)?;
        Ok(Entry { mark, rows })
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, PluginError>;

    fn next(&mut self) -> Option<Self::Item> {
        (!self.0.is_empty()).then(|| self.entry())
    }
}

/// Longest key or mark a plugin may use (bytes).
const MAX_KEY: usize = 512;

fn args<T: serde::de::DeserializeOwned>(op: &str, text: &str) -> Result<T, PluginError> {
    serde_json::from_str(text)
        .map_err(|e| invalid(format!("store.{op}: the arguments do not fit: {e}")))
}

fn check_key(what: &str, key: &str) -> Result<(), PluginError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(invalid(format!(
            "store: a {what} must have 1 to {MAX_KEY} bytes, found {}",
            key.len()
        )));
    }
    if memchr::memchr2(b'\n', b'\t', key.as_bytes()).is_some() {
        return Err(invalid(format!(
            "store: a {what} may not contain a newline or a tab"
        )));
    }
    Ok(())
}

/// A field's name and its delta (text), checked.
fn field_delta<'a>(field: &'a str, delta: &str) -> Result<(&'a str, f64), PluginError> {
    check_key("field name", field)?;
    match delta.parse::<f64>() {
        Ok(d) if d.is_finite() => Ok((field, d)),
        _ => Err(invalid(format!(
            "store: the delta of field `{field}` must be a finite number, found `{delta}`"
        ))),
    }
}

impl PluginStore {
    /// Answers one operation of `plugin_api::store` (JSON text in, JSON text out).
    pub(crate) fn op(&self, op: &str, text: &str) -> Result<Option<String>, PluginError> {
        let answer = match op {
            "available" => json!(true),
            // The hot operations speak lines, not JSON: `add` is the key, then `field\tdelta`
            // lines; `mark` the mark, then `key\tfield\tdelta` lines; `read` the key, answered
            // with `field\tvalue` lines.
            "add" => {
                let mut lines = text.split('\n');
                let key = lines.next().unwrap_or_default();
                check_key("key", key)?;
                // Every line is checked before anything is added: an operation applies whole.
                let fields = lines
                    .map(|line| {
                        let (field, delta) = line.split_once('\t').unwrap_or((line, ""));
                        field_delta(field, delta)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let full = self.key(key);
                let mut cache = lock(&self.store.shared.cache);
                let key = cache
                    .key_id(&full, &self.namespace)
                    .ok_or_else(too_many_names)?;
                // Every name numbered before anything is added, for the same reason.
                let rows = fields
                    .into_iter()
                    .map(|(field, delta)| {
                        let field = cache
                            .field_id(field, &self.namespace)
                            .ok_or_else(too_many_names)?;
                        Ok(Row { key, field, delta })
                    })
                    .collect::<Result<Vec<_>, PluginError>>()?;
                for row in rows {
                    cache.add_unmarked(row);
                }
                // Any answer means "added"; an empty one needs no allocation.
                return Ok(Some(String::new()));
            }
            "mark" => {
                let mut lines = text.split('\n');
                let mark = lines.next().unwrap_or_default();
                check_key("mark", mark)?;
                let mut adds = Vec::new();
                for line in lines {
                    let mut parts = line.splitn(3, '\t');
                    let (key, field, delta) = (
                        parts.next().unwrap_or_default(),
                        parts.next().unwrap_or_default(),
                        parts.next().unwrap_or_default(),
                    );
                    check_key("key", key)?;
                    let (field, delta) = field_delta(field, delta)?;
                    adds.push((self.key(key), field, delta));
                }
                let mut cache = lock(&self.store.shared.cache);
                let rows = adds
                    .iter()
                    .map(|(key, field, delta)| {
                        Ok(Row {
                            key: cache
                                .key_id(key, &self.namespace)
                                .ok_or_else(too_many_names)?,
                            field: cache
                                .field_id(field, &self.namespace)
                                .ok_or_else(too_many_names)?,
                            delta: *delta,
                        })
                    })
                    .collect::<Result<Vec<_>, PluginError>>()?;
                let new = cache.add_marked(&self.namespace, mark, rows.into_iter(), true);
                return Ok(Some(if new { "true" } else { "false" }.to_owned()));
            }
            // `k\tNAME` (a key) or `f\tNAME` (a field): its id, for the additions a plugin
            // hands over in batches (`batch`).
            "intern" => {
                let (kind, name) = text.split_once('\t').unwrap_or(("", text));
                let mut cache = lock(&self.store.shared.cache);
                let id = match kind {
                    "k" => {
                        check_key("key", name)?;
                        cache.key_id(&self.key(name), &self.namespace)
                    }
                    "f" => {
                        check_key("field name", name)?;
                        cache.field_id(name, &self.namespace)
                    }
                    _ => {
                        return Err(invalid(format!(
                            "store.intern: `{kind}` is not a kind of name (k: a key, f: a field)"
                        )));
                    }
                };
                return Ok(Some(id.ok_or_else(too_many_names)?.to_string()));
            }
            "read" => {
                check_key("key", text)?;
                return Ok(Some(self.read_lines(&self.key(text))));
            }
            "keys" => {
                let a: PrefixArgs = args(op, text)?;
                json!(self.keys(&a.prefix))
            }
            // Lines too: the key, then the version the caller has; answered with nothing (no
            // newer record) or the version and the record's JSON text on the next line.
            "record" => {
                let (key, since) = text.split_once('\n').unwrap_or((text, "0"));
                check_key("key", key)?;
                let since: u64 = since
                    .parse()
                    .map_err(|_| invalid(format!("store.record: `{since}` is not a version")))?;
                let key = self.key(key);
                let shared = &self.store.shared;
                let mut cache = lock(&shared.cache);
                if cache.record_keys.insert(key.clone()) && !cache.status.down {
                    // A cold miss, as in `read`.
                    drop(cache);
                    let read = lock(&shared.backend).records(std::slice::from_ref(&key));
                    cache = lock(&shared.cache);
                    match read {
                        Ok(mut found) => {
                            if let Some(record) = found.remove(&key)
                                && cache
                                    .records
                                    .get(&key)
                                    .is_none_or(|r| r.version < record.version)
                            {
                                cache.records.insert(key.clone(), record);
                            }
                            shared.bump();
                        }
                        Err(e) => note_down(shared, &mut cache, &e),
                    }
                }
                return Ok(Some(match cache.records.get(&key) {
                    Some(r) if r.version > since => format!("{}\n{}", r.version, r.value),
                    _ => String::new(),
                }));
            }
            "cas" => {
                let a: CasArgs = args(op, text)?;
                check_key("key", &a.key)?;
                json!(self.compare_and_set(&self.key(&a.key), a.version, &a.value.to_string()))
            }
            other => {
                return Err(invalid(format!(
                    "store: no operation `{other}` (this host knows available, add, mark, intern, read, keys, record, cas)"
                )));
            }
        };
        Ok(Some(answer.to_string()))
    }

    /// The full name of the plugin's `key` (a plain concatenation: `format!` cost a thousand
    /// instructions, on every operation).
    fn key(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.namespace.len() + key.len());
        full.push_str(&self.namespace);
        full.push_str(key);
        full
    }

    /// The plugin's keys under `prefix` that hold fields: the store's (a scan, which waits for
    /// it) and this process's own. Meant for reports, not for every call.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let shared = &self.store.shared;
        let full = self.key(prefix);
        let scanned = lock(&shared.backend).scan(&full);
        let mut cache = lock(&shared.cache);
        let mut keys: std::collections::BTreeSet<String> = cache
            .keys
            .iter()
            .filter(|k| k.starts_with(&full))
            .cloned()
            .collect();
        match scanned {
            Ok(rows) => {
                for (key, fields) in rows {
                    cache.base.entry(key.clone()).or_insert(fields);
                    cache.keys.insert(key.clone());
                    keys.insert(key);
                }
                shared.bump();
            }
            Err(e) => note_down(shared, &mut cache, &e),
        }
        keys.into_iter()
            .filter_map(|k| k.strip_prefix(&self.namespace).map(str::to_owned))
            .collect()
    }

    /// Reads and checks every entry of `bytes` into `entries` (the mark's and the rows' byte
    /// ranges): marks, ids given to this plugin, finite deltas.
    fn check_batch(
        &self,
        cache: &Cache,
        bytes: &[u8],
        entries: &mut Vec<EntryAt>,
    ) -> Result<(), PluginError> {
        let fields = cache.names.fields.len();
        // The keys found to be this plugin's, by the low bits of their ids: a batch's entries
        // use a few keys again and again (an arm's, a variant's), whose names are then compared
        // with the namespace once a batch, not once an entry.
        let mut checked: [Option<u32>; 16] = [None; 16];
        for entry in Entries(bytes) {
            let entry = entry?;
            let at = |part: &[u8]| {
                let start = part.as_ptr() as usize - bytes.as_ptr() as usize;
                (start, start + part.len())
            };
            let mark = match entry.mark {
                Some(mark) => {
                    check_key("mark", mark)?;
                    Some(at(mark.as_bytes()))
                }
                None => None,
            };
            for row in entry.rows() {
                let slot = &mut checked[row.key as usize % 16];
                if *slot != Some(row.key) {
                    let key = cache.names.keys.get(row.key as usize);
                    if !key.is_some_and(|k| k.starts_with(&self.namespace)) {
                        return Err(invalid(format!(
                            "store.batch: key id {} was not given to this plugin (store.intern)",
                            row.key
                        )));
                    }
                    *slot = Some(row.key);
                }
                if row.field as usize >= fields {
                    return Err(invalid(format!(
                        "store.batch: field id {} was not given to this plugin (store.intern)",
                        row.field
                    )));
                }
                if !row.delta.is_finite() {
                    return Err(invalid(format!(
                        "store.batch: the delta of a field must be a finite number, found {}",
                        row.delta
                    )));
                }
            }
            let (start, end) = at(entry.rows);
            entries.push((mark, start, end));
        }
        Ok(())
    }

    /// Takes the additions a plugin hands over in one batch (the binary form of
    /// `plugin_api::abi::HostApi::store_batch`): every entry is checked (ids numbered for this
    /// plugin, finite deltas, marks, sizes) before anything is added, so a batch applies whole
    /// or not at all. The plugin keeps the batch's marks (the host keeps none, but those carried
    /// over from an earlier instance of the plugin). The answer is `P F`: the number of the
    /// batch these additions go into and of the last batch the store took (the plugin drops the
    /// marks flushed), or empty when both are what this instance was last told; after `dup `
    /// when a mark of the batch was already pending here (an earlier instance's: its additions
    /// are dropped, and the plugin's copies of the keys are then stale).
    pub(crate) fn batch(&self, bytes: &[u8]) -> Result<Option<String>, PluginError> {
        if bytes.len() > MAX_BATCH {
            return Err(invalid(format!(
                "store.batch: {} bytes, over the limit of {MAX_BATCH}; hand additions over in smaller batches",
                bytes.len()
            )));
        }
        let mut cache = lock(&self.store.shared.cache);
        let cache = &mut *cache;
        // Every entry is read and checked before anything is added.
        let mut entries = std::mem::take(&mut cache.entries_scratch);
        entries.clear();
        let checked = self.check_batch(cache, bytes, &mut entries);
        let mut dup = false;
        if checked.is_ok() {
            for &(mark, start, end) in &entries {
                let rows = Entry::rows_of(bytes.get(start..end).unwrap_or_default());
                match mark {
                    None => rows.for_each(|row| cache.add_unmarked(row)),
                    Some((start, end)) => {
                        let mark = bytes.get(start..end).unwrap_or_default();
                        let mark = std::str::from_utf8(mark).unwrap_or_default();
                        dup |= !cache.add_marked(&self.namespace, mark, rows, false);
                    }
                }
            }
        }
        cache.entries_scratch = entries;
        checked?;
        let (next, flushed) = (cache.taken + 1, cache.flushed);
        let [told_next, told_flushed] = &*self.told;
        let told = (
            told_next.load(Ordering::Relaxed),
            told_flushed.load(Ordering::Relaxed),
        );
        if !dup && told == (next, flushed) {
            return Ok(Some(String::new()));
        }
        told_next.store(next, Ordering::Relaxed);
        told_flushed.store(flushed, Ordering::Relaxed);
        Ok(Some(if dup {
            format!("dup {next} {flushed}")
        } else {
            format!("{next} {flushed}")
        }))
    }

    /// The fields of `key` (its full name) as `field\tvalue` lines: the last refresh plus the
    /// sums not yet in the store.
    fn read_lines(&self, key: &str) -> String {
        use std::fmt::Write as _;
        let cache = self.warm(key);
        let mut fields = cache.base.get(key).cloned().unwrap_or_default();
        for sums in [&cache.inflight_sum, &cache.pending_sum] {
            for (field, delta) in cache.sums_of(sums, key) {
                add_into_fields(&mut fields, field, delta);
            }
        }
        drop(cache);
        let mut answer = String::new();
        for (field, value) in fields {
            let _ = writeln!(answer, "{field}\t{value}");
        }
        answer
    }

    /// The cache, with `key` in it: its first read waits for the store (a cold miss).
    fn warm(&self, key: &str) -> MutexGuard<'_, Cache> {
        let shared = &self.store.shared;
        let mut cache = lock(&shared.cache);
        if !cache.keys.contains(key) {
            // A cold miss: the one read of this key that waits for the store (bounded by its
            // timeout, and skipped while the store is known to be down). Later reads come from
            // the cache the flush thread refreshes.
            cache.keys.insert(key.to_owned());
            if !cache.status.down {
                drop(cache);
                let read = lock(&shared.backend).read(&[key.to_owned()]);
                cache = lock(&shared.cache);
                match read {
                    Ok(mut found) => {
                        if let Some(fields) = found.remove(key) {
                            cache.base.entry(key.to_owned()).or_insert(fields);
                        }
                        shared.bump();
                    }
                    Err(e) => note_down(shared, &mut cache, &e),
                }
            }
        }
        cache
    }

    fn compare_and_set(&self, key: &str, version: u64, value: &str) -> bool {
        let shared = &self.store.shared;
        lock(&shared.cache).record_keys.insert(key.to_owned());
        let mut backend = lock(&shared.backend);
        let written = backend.compare_and_set(key, version, value);
        let fresh = backend.records(&[key.to_owned()]);
        drop(backend);
        let mut cache = lock(&shared.cache);
        if let Ok(mut fresh) = fresh
            && let Some(record) = fresh.remove(key)
        {
            cache.records.insert(key.to_owned(), record);
        }
        shared.bump();
        match written {
            Ok(written) => written,
            Err(e) => {
                tracing::warn!(store = %shared.url, key, error = %crate::text::EscapeControl(&format!("{e:#}")), "a compare-and-set could not reach the store; the decision waits");
                cache.status.errors += 1;
                cache.status.last_error = Some(format!("{e:#}"));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(groups: usize, marks: &str) -> Batch {
        let mut batch = Batch {
            id: String::new(),
            keys: Vec::new(),
            fields: Vec::new(),
            groups: Vec::with_capacity(groups),
            rows: Vec::with_capacity(groups),
            marks: marks.to_owned(),
        };
        for n in 0..groups {
            batch.groups.push(Group {
                marks_end: 0,
                rows_end: n + 1,
            });
            batch.rows.push(Row {
                key: 0,
                field: 0,
                delta: 1.0,
            });
        }
        batch
    }

    /// Each group's mark and rows start where the group before it ends: a group without a
    /// mark, or without rows (a mark alone), has none.
    #[test]
    fn a_batch_s_groups_are_read_back_as_they_were_added() {
        let row = |key| Row {
            key,
            field: 0,
            delta: 1.0,
        };
        let mut cache = Cache::default();
        cache.add_marked("p/", "a", [row(1), row(2)].into_iter(), false);
        cache.add_marked("p/", "bc", std::iter::empty(), false);
        cache.add_marked("p/", "d", [row(3)].into_iter(), false);
        let batch = Batch {
            id: String::new(),
            keys: Vec::new(),
            fields: Vec::new(),
            groups: cache.pending.clone(),
            rows: cache.rows.clone(),
            marks: cache.marks_text.clone(),
        };
        let mut groups: Vec<_> = batch
            .groups()
            .map(|(mark, rows)| (mark, rows.iter().map(|r| r.key).collect::<Vec<_>>()))
            .collect();
        assert_eq!(
            groups,
            [
                (Some("p/a"), vec![1, 2]),
                (Some("p/bc"), vec![]),
                (Some("p/d"), vec![3])
            ]
        );
        // The unmarked sums, as a flush appends them.
        let mut batch = batch;
        batch.rows.push(row(4));
        batch.groups.push(Group {
            marks_end: batch.marks.len(),
            rows_end: batch.rows.len(),
        });
        groups = batch
            .groups()
            .map(|(mark, rows)| (mark, rows.iter().map(|r| r.key).collect()))
            .collect();
        assert_eq!(groups.last(), Some(&(None, vec![4])));
    }

    /// What the flush does with a batch the store took: its buffers become the spare ones.
    fn flushed(spare: &mut Spare, batch: Batch) {
        let peak = spare.note(&batch);
        let (prepared, dropped) = Spare::prepared(batch, peak);
        drop(dropped);
        spare.install(prepared);
    }

    /// The buffers a second of additions grew are reused by the next seconds, even when a
    /// small batch (what came in while a large one was written) is flushed in between; one
    /// that grew over an outage is let go once normal batches follow.
    #[test]
    fn the_buffers_a_second_grew_are_reused_and_an_outage_s_are_let_go() {
        let mut spare = Spare::default();
        let (mut groups, mut rows, mut marks) = (Vec::new(), Vec::new(), String::new());
        // A large batch is taken and flushed: the spare buffers are grown to its size.
        flushed(&mut spare, batch_of(10_000, "m"));
        assert!(spare.groups.capacity() >= 10_000);
        // The next batch is taken: the pending additions go on in the large buffers.
        let (taken, _, _) = spare.take(&mut groups, &mut rows, &mut marks);
        assert!(taken.is_empty());
        let capacity = groups.capacity();
        assert!(capacity >= 10_000);
        // A few additions come in, and a small batch is taken right away: they are copied
        // into the spare buffer, and the large one stays pending.
        flushed(&mut spare, batch_of(3, ""));
        groups.extend(batch_of(5, "").groups);
        marks.push_str("abc");
        let (taken, _, taken_marks) = spare.take(&mut groups, &mut rows, &mut marks);
        assert_eq!(taken.len(), 5);
        assert_eq!(taken_marks, "abc");
        assert!(groups.is_empty() && marks.is_empty());
        assert_eq!(
            groups.capacity(),
            capacity,
            "the large buffer stays pending"
        );
        // An outage: the pending buffer grows to a million groups, is taken and flushed, and
        // normal batches of 10 000 follow. However the buffers move between the pending
        // additions and the batches, the outage's is let go.
        groups.extend((0..1_000_000).map(|_| Group {
            marks_end: 0,
            rows_end: 0,
        }));
        let outage = groups.capacity();
        for round in 0..400 {
            let (taken_groups, taken_rows, taken_marks) =
                spare.take(&mut groups, &mut rows, &mut marks);
            flushed(
                &mut spare,
                Batch {
                    groups: taken_groups,
                    rows: taken_rows,
                    marks: taken_marks,
                    ..batch_of(0, "")
                },
            );
            groups.extend(batch_of(10_000, "").groups);
            // The outage's buffer goes round for a while, but a normal batch's is not grown
            // to the outage's size meanwhile.
            assert!(
                groups.capacity() + spare.groups.capacity() <= outage + 100_000,
                "round {round}: {} pending, {} spare",
                groups.capacity(),
                spare.groups.capacity()
            );
        }
        assert!(
            groups.capacity() <= 100_000 && spare.groups.capacity() <= 100_000,
            "an outage's buffer is let go: {} pending, {} spare",
            groups.capacity(),
            spare.groups.capacity()
        );
    }

    /// A plugin that numbers ever new names (keys made from its input) runs out of its own
    /// share only: names it has are still answered, and other plugins go on numbering theirs.
    #[test]
    fn a_plugin_that_numbers_too_many_names_uses_up_only_its_own_share() {
        let mut cache = Cache::default();
        for n in 0..MAX_NAMES_PER_PLUGIN {
            assert!(cache.field_id(&format!("f{n}"), "greedy/").is_some());
        }
        assert_eq!(cache.key_id("greedy/one-more", "greedy/"), None);
        assert_eq!(cache.field_id("another", "greedy/"), None);
        assert!(cache.field_id("f7", "greedy/").is_some());
        assert!(cache.key_id("modest/k", "modest/").is_some());
        assert!(cache.field_id("n", "modest/").is_some());
        assert!(
            too_many_names()
                .to_string()
                .contains("a plugin numbers at most 262144")
        );
    }

    /// A flush names only what its rows add to, with the rows renumbered to match, however
    /// many names the store numbered before.
    #[test]
    fn a_batch_names_only_what_its_rows_use() {
        let mut names = Names::default();
        for n in 0..1000 {
            let names = &mut names;
            intern(
                &mut names.keys,
                &mut names.key_ids,
                &format!("p/key{n}"),
                &mut names.numbered,
                "p/",
            )
            .unwrap();
            intern(
                &mut names.fields,
                &mut names.field_ids,
                &format!("f{n}"),
                &mut names.numbered,
                "p/",
            )
            .unwrap();
        }
        let mut rows = vec![
            Row {
                key: 700,
                field: 3,
                delta: 1.0,
            },
            Row {
                key: 5,
                field: 3,
                delta: 2.0,
            },
            Row {
                key: 700,
                field: 999,
                delta: 3.0,
            },
        ];
        let (keys, fields) = names.used_by(&mut rows);
        assert_eq!(
            keys.iter().map(|k| &**k).collect::<Vec<_>>(),
            ["p/key700", "p/key5"]
        );
        assert_eq!(
            fields.iter().map(|f| &**f).collect::<Vec<_>>(),
            ["f3", "f999"]
        );
        let batch = Batch {
            id: "b".to_owned(),
            keys,
            fields,
            groups: vec![Group {
                marks_end: 0,
                rows_end: 3,
            }],
            rows,
            marks: String::new(),
        };
        let groups: Vec<_> = batch.groups().collect();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].0, None);
        let adds: Vec<_> = batch.adds(groups[0].1).collect();
        assert_eq!(
            adds,
            [
                ("p/key700", "f3", 1.0),
                ("p/key5", "f3", 2.0),
                ("p/key700", "f999", 3.0)
            ]
        );
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let options = StoreOptions {
            flush_interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
        };
        (dir, Store::open(&url, options).unwrap())
    }

    /// A worker's status is published after a round and removed as the store closes; one
    /// that is not updated expires; one of another shape, under another id, not UTF-8 or
    /// over-long is left out and counted.
    #[test]
    fn workers_publish_their_status_and_it_expires() {
        let (dir, store) = store();
        assert!(store.workers().unwrap().workers.is_empty());
        store.publish_as_worker();
        let me = worker_id();
        let pid = format!(":{}:", std::process::id());
        assert!(me.contains(&pid), "{me}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let listed = loop {
            let listed = store.workers().unwrap();
            if !listed.workers.is_empty() || std::time::Instant::now() > deadline {
                break listed;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mine = listed.workers[0].clone();
        assert!(mine.worker.contains(&pid), "{listed:?}");
        assert_eq!(listed.workers.len(), 1, "{listed:?}");
        assert_eq!(
            (mine.flush_interval_ms, mine.ttl_ms),
            (3_600_000, 36_000_000)
        );
        assert_eq!(mine.pending, 0);
        // What the worker holds is in its next status.
        let a = store.for_plugin("a");
        let (k, n) = (id(&a, "k", "arm"), id(&a, "f", "n"));
        a.batch(&entry(None, &[(k, n, 1.0)])).unwrap();
        lock(&store.shared.publisher).as_mut().unwrap().last_ms = 0;
        publish(&store.shared);
        let listed = store.workers().unwrap();
        assert_eq!(listed.workers[0].pending, 1, "{listed:?}");
        {
            let mut backend = lock(&store.shared.backend);
            let other = serde_json::to_string(&mine).unwrap();
            let minute = Duration::from_secs(60);
            backend
                .publish("gone:1", &other, Duration::from_millis(1))
                .unwrap();
            backend.publish("other:2", &other, minute).unwrap();
            backend.publish("junk:3", "not json", minute).unwrap();
            let huge = "x".repeat(MAX_WORKER_STATUS + 1);
            backend.publish("huge:4", &huge, minute).unwrap();
        }
        // Not UTF-8, as any writer of the file could leave it.
        let conn = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
        conn.execute(
            "INSERT INTO workers (id, status, expires) VALUES (?1, ?2, ?3)",
            rusqlite::params![&b"bad\xff:5"[..], &b"{\xfe}"[..], i64::MAX],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let listed = store.workers().unwrap();
        // `gone` expired; `other` says it is another worker; `junk` is no status; `huge` is
        // not read; the last is not text.
        assert_eq!(listed.workers.len(), 1, "{listed:?}");
        assert_eq!(listed.workers[0].worker, mine.worker);
        assert_eq!((listed.unreadable, listed.left_out), (4, 0), "{listed:?}");
        store.close();
        let again = Store::open(
            &format!("sqlite://{}", dir.path().join("store.db").display()),
            StoreOptions::default(),
        )
        .unwrap();
        let listed = again.workers().unwrap();
        assert!(listed.workers.is_empty(), "{listed:?}");
        assert_eq!(listed.unreadable, 4);
    }

    /// One entry of a batch, as `plugin_api::store` writes it.
    fn entry(mark: Option<&str>, rows: &[(u32, u32, f64)]) -> Vec<u8> {
        let mut out = Vec::new();
        match mark {
            None => out.push(0),
            Some(mark) => {
                out.push(1);
                out.extend_from_slice(&u32::try_from(mark.len()).unwrap().to_le_bytes());
                out.extend_from_slice(mark.as_bytes());
            }
        }
        out.extend_from_slice(&u32::try_from(rows.len()).unwrap().to_le_bytes());
        for (key, field, delta) in rows {
            out.extend_from_slice(&key.to_le_bytes());
            out.extend_from_slice(&field.to_le_bytes());
            out.extend_from_slice(&delta.to_le_bytes());
        }
        out
    }

    fn id(plugin: &PluginStore, kind: &str, name: &str) -> u32 {
        let answer = plugin.op("intern", &format!("{kind}\t{name}")).unwrap();
        answer.unwrap().parse().unwrap()
    }

    fn read(plugin: &PluginStore, key: &str) -> String {
        plugin.op("read", key).unwrap().unwrap()
    }

    /// An `add` that cannot number one of its fields (the plugin's share of names is used up)
    /// adds none of them: a retry then counts each field once.
    #[test]
    fn an_add_that_cannot_number_a_field_adds_nothing() {
        let (_dir, store) = store();
        let a = store.for_plugin("a");
        a.op("add", "key\nknown\t1").unwrap();
        {
            let mut cache = lock(&store.shared.cache);
            let mut n = 0;
            while cache.field_id(&format!("filler{n}"), "a/").is_some() {
                n += 1;
            }
        }
        assert!(a.op("add", "key\nknown\t1\nnew\t1").is_err());
        assert_eq!(read(&a, "key"), "known\t1\n");
    }

    #[test]
    fn a_batch_answers_its_batch_and_the_last_flushed() {
        let (_dir, store) = store();
        let a = store.for_plugin("a");
        let (k, n) = (id(&a, "k", "arm"), id(&a, "f", "n"));
        let mut batch = entry(None, &[(k, n, 1.0)]);
        batch.extend(entry(Some("t1"), &[(k, n, 2.0)]));
        // Into batch 1; none flushed yet.
        assert_eq!(a.batch(&batch).unwrap().as_deref(), Some("1 0"));
        assert_eq!(read(&a, "arm"), "n\t3\n");
        store.flush().unwrap();
        assert_eq!(read(&a, "arm"), "n\t3\n");
        // Flushed, the mark is the store's to decide: it refuses the repeat.
        let again = entry(Some("t1"), &[(k, n, 2.0)]);
        assert_eq!(a.batch(&again).unwrap().as_deref(), Some("2 1"));
        store.flush().unwrap();
        assert_eq!(read(&a, "arm"), "n\t3\n");
    }

    /// The flush thread takes one batch an interval while additions keep coming: going on
    /// until nothing was pending, it ran up to eight rounds an interval (each a transaction, a
    /// read of every key and every plugin's copies dropped). Nothing is lost either way.
    #[test]
    fn the_flush_thread_takes_one_batch_an_interval_while_additions_keep_coming() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let interval = Duration::from_millis(100);
        let options = StoreOptions {
            flush_interval: interval,
            timeout: Duration::from_secs(5),
        };
        let store = Store::open(&url, options).unwrap();
        let a = store.for_plugin("a");
        let (k, n) = (id(&a, "k", "arm"), id(&a, "f", "n"));
        let started = std::time::Instant::now();
        let mut added = 0_u32;
        // `seen`: the batches taken at the last change seen, and the look before it (the
        // change came after that look); two batches were at most `now - seen.1` apart, and
        // `closest` is the smallest such bound.
        let mut seen = (0_u64, started);
        let mut look = started;
        let mut closest = Duration::MAX;
        // A task every 50 µs or so, marked, for a second: something comes in during every
        // round, however short.
        while started.elapsed() < Duration::from_secs(1) {
            added += 1;
            a.batch(&entry(Some(&format!("t{added}")), &[(k, n, 1.0)]))
                .unwrap();
            let taken = lock(&store.shared.cache).taken;
            let now = std::time::Instant::now();
            if taken != seen.0 {
                if seen.0 > 0 {
                    // The last batch was taken after `seen.1`, this one by `now`; more than one
                    // since the last look were taken within `now - look`.
                    let apart = if taken > seen.0 + 1 {
                        now - look
                    } else {
                        now - seen.1
                    };
                    closest = closest.min(apart);
                }
                seen = (taken, look);
            }
            look = now;
            std::thread::sleep(Duration::from_micros(50));
        }
        let taken = lock(&store.shared.cache).taken;
        let intervals = started.elapsed().as_millis() / interval.as_millis();
        // The thread waits an interval after each round, and wakes for nothing else.
        assert!(
            u128::from(taken) <= intervals + 1,
            "{taken} batches in {intervals} intervals"
        );
        assert!(
            closest >= interval / 2,
            "two batches {closest:?} apart, with an interval of {interval:?}"
        );
        store.flush().unwrap();
        assert_eq!(read(&a, "arm"), format!("n\t{added}\n"));
    }

    /// Rounds started by `Store::flush` on other threads (a report, the last flush) while the
    /// flush thread runs its own, with additions coming in and the store refusing writes now
    /// and then (another connection holds it locked): every addition reaches the store, once.
    /// Two rounds at a time would both apply the batch in flight, and the second to finish
    /// would take the batch the first made meanwhile for applied; when that batch's own round
    /// then failed, nothing was left to retry.
    #[test]
    fn flushes_on_several_threads_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let url = format!("sqlite://{}", path.display());
        let options = StoreOptions {
            flush_interval: Duration::from_millis(2),
            timeout: Duration::from_millis(1),
        };
        let store = Store::open(&url, options).unwrap();
        let a = store.for_plugin("a");
        let (k, n) = (id(&a, "k", "arm"), id(&a, "f", "n"));
        let adding = AtomicBool::new(true);
        let added = std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    while adding.load(Ordering::Relaxed) {
                        // The refusals are the point; only what is lost counts.
                        let _ = store.flush();
                    }
                });
            }
            scope.spawn(|| {
                let locker = rusqlite::Connection::open(&path).unwrap();
                while adding.load(Ordering::Relaxed) {
                    if locker.execute_batch("BEGIN EXCLUSIVE").is_ok() {
                        std::thread::sleep(Duration::from_millis(3));
                        locker.execute_batch("COMMIT").unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(3));
                }
            });
            let mut added = 0_u32;
            let started = std::time::Instant::now();
            let mut refused = None;
            while refused.is_none() && started.elapsed() < Duration::from_millis(1200) {
                added += 1;
                refused = a
                    .batch(&entry(Some(&format!("t{added}")), &[(k, n, 1.0)]))
                    .err();
                if refused.is_none() && added.is_multiple_of(8) {
                    refused = a.batch(&entry(None, &[(k, n, 1.0)])).err();
                    added += 1;
                }
            }
            // The other threads stop before any failure is told: the scope waits for them.
            adding.store(false, Ordering::Relaxed);
            assert!(refused.is_none(), "a batch refused: {refused:?}");
            added
        });
        store.flush().unwrap();
        assert_eq!(read(&a, "arm"), format!("n\t{added}\n"));
        // What the store holds, read by a store of its own (a cache that never saw them).
        store.close();
        let other = Store::open(&url, options).unwrap();
        assert_eq!(read(&other.for_plugin("a"), "arm"), format!("n\t{added}\n"));
        other.close();
    }

    /// A new instance of a plugin starts with no marks of its own: the marks its predecessor
    /// left pending are checked by the host until they are flushed.
    #[test]
    fn a_new_instance_cannot_add_twice_under_a_pending_mark() {
        let (_dir, store) = store();
        let a = store.for_plugin("a");
        let (k, n) = (id(&a, "k", "arm"), id(&a, "f", "n"));
        let marked = entry(Some("t1"), &[(k, n, 2.0)]);
        assert_eq!(a.batch(&marked).unwrap().as_deref(), Some("1 0"));
        // Another plugin's new instance carries nothing of `a`'s.
        let _b = store.for_plugin("b");
        assert_eq!(lock(&store.shared.cache).carried.len(), 0);
        let a2 = store.for_plugin("a");
        assert_eq!(a2.batch(&marked).unwrap().as_deref(), Some("dup 1 0"));
        assert_eq!(read(&a2, "arm"), "n\t2\n");
        store.flush().unwrap();
        assert_eq!(read(&a2, "arm"), "n\t2\n");
        // Flushed, the carried marks are let go.
        assert!(lock(&store.shared.cache).carried.is_empty());
        assert_eq!(a2.batch(&marked).unwrap().as_deref(), Some("2 1"));
        store.flush().unwrap();
        assert_eq!(read(&a2, "arm"), "n\t2\n");
    }

    #[test]
    fn a_hostile_batch_is_refused_whole() {
        let (_dir, store) = store();
        let a = store.for_plugin("a");
        let b = store.for_plugin("b");
        let (k, n) = (id(&a, "k", "arm"), id(&a, "f", "n"));
        let theirs = id(&b, "k", "arm");
        // Another plugin's key whose id falls in the same slot of the checked keys as `k`.
        let same_slot = (0..64)
            .map(|i| id(&b, "k", &format!("arm{i}")))
            .find(|&other| other % 16 == k % 16)
            .expect("one of 64 ids in k's slot");
        let good = entry(None, &[(k, n, 1.0)]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                [good.clone(), entry(None, &[(same_slot, n, 1.0)])].concat(),
                "key id",
            ),
            (
                [good.clone(), entry(None, &[(k + 7, n, 1.0)])].concat(),
                "key id",
            ),
            // An id in the same slot of the checked keys as one of this plugin's, checked in
            // an earlier entry of the batch: checked as well.
            (
                [good.clone(), entry(None, &[(k + 16, n, 1.0)])].concat(),
                "key id",
            ),
            (
                [good.clone(), vec![1, 2, 0, 0, 0, 0xff, 0xfe, 0, 0, 0, 0]].concat(),
                "not UTF-8",
            ),
            // Another plugin's key after one of this plugin's, in one entry.
            (
                entry(None, &[(k, n, 1.0), (k, n, 2.0), (theirs, n, 1.0)]),
                "key id",
            ),
            (
                [good.clone(), entry(None, &[(k, n + 7, 1.0)])].concat(),
                "field id",
            ),
            (
                [good.clone(), entry(None, &[(k, n, f64::NAN)])].concat(),
                "finite",
            ),
            ([good.clone(), entry(Some("a\nb"), &[])].concat(), "newline"),
            (
                [good.clone(), entry(Some(""), &[])].concat(),
                "1 to 512 bytes",
            ),
            (good[..good.len() - 3].to_vec(), "ends inside"),
            ([good.clone(), vec![9]].concat(), "starts with 9"),
            (vec![0, 0xff, 0xff, 0xff, 0xff], "ends inside"),
            (vec![0; MAX_BATCH + 1], "over the limit"),
        ];
        for (bytes, says) in cases {
            let error = a.batch(&bytes).unwrap_err();
            assert!(error.message.contains(says), "{}", error.message);
        }
        // Another plugin's key.
        let error = b.batch(&good).unwrap_err();
        assert!(
            error.message.contains("not given to this plugin"),
            "{}",
            error.message
        );
        assert_eq!(read(&a, "arm"), "");
        assert_eq!(store.status().pending, 0);
    }

    #[test]
    fn names_are_checked_when_numbered() {
        let (_dir, store) = store();
        let a = store.for_plugin("a");
        for text in ["k\t", "k\ta\nb", "f\tx\ty", "z\tname"] {
            assert!(a.op("intern", text).is_err(), "{text:?}");
        }
        assert_eq!(id(&a, "k", "arm"), id(&a, "k", "arm"));
    }

    /// The flush thread asks each holder that said it holds, after every round, on a thread of
    /// its own: a holder stuck in its hand-over is asked once and delays nobody (the rounds go
    /// on, another holder is asked every time, `Store::flush` returns after its bound), and is
    /// asked again once it returned.
    #[test]
    fn a_holder_stuck_in_its_hand_over_delays_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let options = StoreOptions {
            flush_interval: Duration::from_millis(10),
            timeout: Duration::from_millis(200),
        };
        let store = Store::open(&url, options).unwrap();
        let (stuck, fine) = (
            StoreAccess::Local(store.for_plugin("stuck")),
            StoreAccess::Local(store.for_plugin("fine")),
        );
        assert!(!stuck.hold(), "no holding before the host can ask");
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let stuck_asked = Arc::new(AtomicU64::new(0));
        let fine_asked = Arc::new(AtomicU64::new(0));
        stuck.holder().unwrap().set_hand_over({
            let asked = Arc::clone(&stuck_asked);
            Box::new(move || {
                asked.fetch_add(1, Ordering::SeqCst);
                let _ = lock(&released).recv();
                true
            })
        });
        fine.holder().unwrap().set_hand_over({
            let asked = Arc::clone(&fine_asked);
            Box::new(move || {
                asked.fetch_add(1, Ordering::SeqCst);
                true
            })
        });
        let asked_within = |asked: &AtomicU64, n: u64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while asked.load(Ordering::SeqCst) < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a holder was not asked"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        assert!(stuck.hold() && fine.hold());
        asked_within(&stuck_asked, 1);
        for n in 1..=5 {
            asked_within(&fine_asked, n);
            assert!(fine.hold());
            assert!(stuck.hold());
        }
        // Asked on request too: a flush waits for the stuck one's ask out, within the store's
        // timeout, names it (in a warning; here from the asking itself), and still flushes.
        let late = ask_holders(&store.shared, Some(store.shared.options.timeout));
        assert_eq!(late.as_deref(), Some("stuck"));
        store.flush().unwrap();
        assert_eq!(
            stuck_asked.load(Ordering::SeqCst),
            1,
            "asked once while stuck"
        );
        assert!(fine_asked.load(Ordering::SeqCst) >= 6);
        // Once it returns it is asked again (it said it holds meanwhile).
        release.send(()).unwrap();
        asked_within(&stuck_asked, 2);
        // No ask blocks from now on.
        drop(release);
        store.flush().unwrap();
        // Holders that are gone leave the list (an ask still out holds its holder until it
        // returns).
        drop((stuck, fine));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            store.flush().unwrap();
            if lock(&store.shared.holders).is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the holders stay listed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
