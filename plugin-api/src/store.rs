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
//! - [`read`]: a key's fields ([`read_values`]: some of them, without allocating); [`keys`]:
//!   the keys under a prefix (for reports).
//!
//! Keys, marks and field names are plain text without newlines or tabs. A key used again and
//! again is best made once as a [`Key`]: the host numbers it at its first addition and the key
//! keeps the number, so later additions neither build nor look up its name.
//! - [`record`] / [`record_since`] and [`compare_and_set`]: a small JSON record with a version, for decisions
//!   (a promotion) that exactly one worker of the fleet may make.
//!
//! Reads are kept on the plugin's side too: the host numbers the changes of its cache (a
//! generation, read through a plain function of the host, no text), and a read answers from
//! the plugin's copy, with this plugin's own additions applied to it, while the number is
//! unchanged. A host older than the generation is asked every time, as before.
//!
//! Additions are handed to the host in batches: at the end of the plugin call that made them,
//! or, with a host that says it will ask for them (table version 7), once they reach 16 kB, when
//! the host asks (after each of its flushes), on a read this plugin has no copy for, when the
//! plugin's state is saved and when it is destroyed. They reach the store about two flush
//! intervals after they were made, from a plugin that is not called again too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use rustc_hash::FxHashMap;
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

/// The hash of the plugin's copies of keys it reads (names the plugin makes, a few per
/// context or arm): seeded at random per process, which defeats collisions chosen in advance,
/// and several times cheaper than std's SipHash-1-3 on short strings. It does not claim to
/// resist an attacker who can watch the process for long (foldhash says so itself), so the
/// marks, one per task and made from task ids that come from outside, are told apart by
/// SipHash-1-3 under a random key ([`mark_id`]).
type Keyed = foldhash::quality::RandomState;

/// A store key made once and used for many additions and reads: `Key::joined(&["arm",
/// context, arm])`. The host numbers its name at its first addition and the key keeps that
/// number, so an addition to it hands the number over without building or looking up the name.
/// Cheap to clone (the name is shared). Every function of this module that takes a key takes a
/// `Key`, a `str` or a `String`.
#[derive(Clone)]
pub struct Key(Arc<KeyInner>);

struct KeyInner {
    name: Box<str>,
    /// The host's number of the name, once given ([`NOT_NUMBERED`] before).
    id: AtomicU32,
}

/// The keys of [`mark_id`], drawn at random once per process (std's randomly keyed hash of
/// two constants).
static MARK_KEY: LazyLock<(u64, u64)> = LazyLock::new(|| {
    use std::hash::BuildHasher as _;
    let random = std::hash::RandomState::new();
    (random.hash_one(0_u8), random.hash_one(1_u8))
});

/// A mark's identity in the plugin's set of marks: the 128 bits of SipHash-1-3 under a key
/// drawn at random per process, in one pass over the mark. Marks come from task ids, which
/// come from outside; without the key nobody can choose two marks with the same id, and by
/// chance two of a set of `n` share one with a probability of about `n² / 2¹²⁹` (a second's
/// marks: under 10⁻²⁸). The table hashes the id with a cheap hash: it is random already.
#[inline(always)]
fn mark_id(text: &[u8]) -> u128 {
    use siphasher::sip128::{Hasher128 as _, SipHasher13};
    use std::hash::Hasher as _;
    let (k0, k1) = *MARK_KEY;
    let mut hasher = SipHasher13::new_with_keys(k0, k1);
    hasher.write(text);
    hasher.finish128().as_u128()
}

/// A [`Key`]'s id before the host numbered its name.
const NOT_NUMBERED: u32 = u32::MAX;

impl Key {
    /// A key of this name (checked when the host numbers it: 1 to 512 bytes, no newline, no
    /// tab; an addition to a key that breaks them answers `false`, as with a name).
    pub fn new(name: impl Into<String>) -> Key {
        Key(Arc::new(KeyInner {
            name: name.into().into_boxed_str(),
            id: AtomicU32::new(NOT_NUMBERED),
        }))
    }

    /// The key named by the parts joined with `/` (see [`join`]).
    pub fn joined(parts: &[&str]) -> Key {
        Key::new(join(parts))
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Key").field(&self.name()).finish()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Key {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for str {}
    impl Sealed for String {}
    impl Sealed for super::Key {}
}

/// What names a store key: a [`Key`] (numbered once), a `str` or a `String` (looked up by name
/// on each addition).
pub trait StoreKey: sealed::Sealed {
    /// The key's name.
    fn key_name(&self) -> &str;
    /// Where a [`Key`] keeps the host's number of its name.
    #[doc(hidden)]
    fn id_slot(&self) -> Option<&AtomicU32> {
        None
    }
}

impl StoreKey for str {
    fn key_name(&self) -> &str {
        self
    }
}

impl StoreKey for String {
    fn key_name(&self) -> &str {
        self
    }
}

impl StoreKey for Key {
    fn key_name(&self) -> &str {
        self.name()
    }

    fn id_slot(&self) -> Option<&AtomicU32> {
        Some(&self.0.id)
    }
}

/// The plugin's copy of what it read, valid for one generation of the host's cache, and the
/// additions it has not handed to the host yet.
struct ReadCache {
    generation: u64,
    /// Grows with every addition this plugin makes: a read that crossed while another thread
    /// added keeps its answer out of the cache (it may lack that addition).
    writes: u64,
    /// Additions sent to the host and not yet applied to the copies: a read answered
    /// meanwhile may already hold them, so it is not kept (they would count twice).
    adding: u64,
    fields: HashMap<String, FieldCopy, Keyed>,
    /// The last record read of each key (`None`: there was none).
    records: HashMap<String, Option<Record>, Keyed>,
    /// Additions not handed to the host yet, in the host's batch form (`HostApi::store_batch`):
    /// handed over in one crossing at the end of the plugin call that made them, or, when the
    /// host will ask for them (`holding`), once they reach [`HOLD_UP_TO`] or it asks.
    batch: Vec<u8>,
    /// The ids the host gave to key names and field names.
    key_ids: Names,
    field_ids: Names,
    /// The marks this plugin added under and the store has not taken yet: [`add_once`]
    /// answers from them, and the host keeps no set of its own for them.
    marks: Marks,
    /// The host's numbers last answered (`P F`, see [`ReadCache::note_batches`]): an empty
    /// answer means they are unchanged.
    told: (u64, u64),
    /// The host said it will ask for the batch (`HostApi::store_hold`): the batch stays here
    /// past the end of calls, until it reaches [`HOLD_UP_TO`] or the host asks for it.
    holding: bool,
}

/// Asks the host for its id of a name used for the first time, and keeps it in `ids`. Out of
/// line and cold, as are the other paths an addition rarely takes, so that the code an addition
/// runs every time stays in few cache lines.
#[cold]
#[inline(never)]
fn intern(ids: &mut Names, kind: &str, name: &str) -> Option<u32> {
    if !plain(name) {
        return None;
    }
    let id: u32 = raw("intern", &format!("{kind}\t{name}"))?.parse().ok()?;
    ids.insert(name, id);
    Some(id)
}

/// A map from names to values: the first [`SHORT_NAMES`] names of at most 16 bytes in a list
/// looked through in order (a plugin's field names: `n`, `sum`, `sumsq`), the others in a hash
/// map (names the plugin chose, so a cheap hash serves; the marks, often from input, keep a
/// keyed one in [`MarkSet`]). A look through a list of a few names reads a cache line or two
/// and hashes nothing, where a map's hashes the name and compares it with a copy elsewhere in
/// memory; a name past a full list (up to four lines of it) is then hashed as well. Used for
/// the host's ids of names ([`Names`]) and for the plugin's copies of a key's fields
/// ([`FieldCopy`]).
#[derive(Clone)]
struct ShortMap<V> {
    /// Each name padded with zeros, its length, its value.
    short: Vec<([u8; 16], u8, V)>,
    others: FxHashMap<String, V>,
}

impl<V> Default for ShortMap<V> {
    fn default() -> Self {
        ShortMap {
            short: Vec::new(),
            others: FxHashMap::default(),
        }
    }
}

/// The ids the host gave to names.
type Names = ShortMap<u32>;

/// A plugin's copy of a key's fields.
type FieldCopy = ShortMap<f64>;

/// The most names a [`ShortMap`] keeps in its list.
const SHORT_NAMES: usize = 8;

impl<V: Copy> ShortMap<V> {
    #[inline(always)]
    fn get(&self, name: &str) -> Option<V> {
        match padded(name) {
            Some(padded) => {
                let len = name.len() as u8;
                match self
                    .short
                    .iter()
                    .find(|(short, short_len, _)| *short_len == len && *short == padded)
                {
                    Some(&(_, _, value)) => Some(value),
                    // A short name goes into the map only once the list is full.
                    None if self.short.len() < SHORT_NAMES => None,
                    None => self.other(name),
                }
            }
            None => self.other(name),
        }
    }

    #[inline(always)]
    fn get_mut(&mut self, name: &str) -> Option<&mut V> {
        match padded(name) {
            Some(padded) => {
                let len = name.len() as u8;
                let full = self.short.len() >= SHORT_NAMES;
                match self
                    .short
                    .iter_mut()
                    .find(|(short, short_len, _)| *short_len == len && *short == padded)
                {
                    Some((_, _, value)) => Some(value),
                    None if !full => None,
                    None => other_mut(&mut self.others, name),
                }
            }
            None => other_mut(&mut self.others, name),
        }
    }

    /// A name past the list: out of line, as is the map's code.
    #[cold]
    #[inline(never)]
    fn other(&self, name: &str) -> Option<V> {
        self.others.get(name).copied()
    }

    /// [`ShortMap::insert`] out of line, for a hot path that rarely takes it.
    #[cold]
    #[inline(never)]
    fn insert_new(&mut self, name: &str, value: V) {
        self.insert(name, value);
    }

    /// Puts `name` in (it is not in yet).
    fn insert(&mut self, name: &str, value: V) {
        match padded(name) {
            Some(padded) if self.short.len() < SHORT_NAMES => {
                self.short.push((padded, name.len() as u8, value));
            }
            _ => {
                self.others.insert(name.to_owned(), value);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&str, V)> {
        let short = self.short.iter().map(|(padded, len, value)| {
            // The bytes of a `str`, cut where it ended.
            let name = padded.get(..usize::from(*len)).unwrap_or_default();
            (std::str::from_utf8(name).unwrap_or_default(), *value)
        });
        short.chain(
            self.others
                .iter()
                .map(|(name, value)| (name.as_str(), *value)),
        )
    }
}

impl FieldCopy {
    /// Adds `delta` to the field `name` (a field missing starts at 0).
    #[inline(always)]
    fn add(&mut self, name: &str, delta: f64) {
        match self.get_mut(name) {
            Some(value) => *value += delta,
            None => self.insert_new(name, delta),
        }
    }

    fn to_map(&self) -> BTreeMap<String, f64> {
        self.iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect()
    }
}

impl FromIterator<(String, f64)> for FieldCopy {
    fn from_iter<I: IntoIterator<Item = (String, f64)>>(fields: I) -> FieldCopy {
        let mut copy = FieldCopy::default();
        for (name, value) in fields {
            match copy.get_mut(&name) {
                Some(kept) => *kept = value,
                None => copy.insert(&name, value),
            }
        }
        copy
    }
}

/// [`ShortMap::get_mut`] of a name past the list: out of line, as is the map's code.
#[cold]
#[inline(never)]
fn other_mut<'a, V>(others: &'a mut FxHashMap<String, V>, name: &str) -> Option<&'a mut V> {
    others.get_mut(name)
}

/// `name` padded with zeros to 16 bytes; `None` when longer.
#[inline]
fn padded(name: &str) -> Option<[u8; 16]> {
    let bytes = name.as_bytes();
    let len = bytes.len();
    let mut padded = [0; 16];
    // Copies of a fixed size, two of them overlapping for the lengths between: a few moves,
    // where a copy of the name's own length is a call (this runs for every field added).
    let to = padded.get_mut(..len)?;
    let from = bytes;
    match len {
        8..=16 => {
            to[..8].copy_from_slice(&from[..8]);
            to[len - 8..].copy_from_slice(&from[len - 8..]);
        }
        4..=7 => {
            to[..4].copy_from_slice(&from[..4]);
            to[len - 4..].copy_from_slice(&from[len - 4..]);
        }
        _ => {
            for (to, from) in to.iter_mut().zip(from) {
                *to = *from;
            }
        }
    }
    Some(padded)
}

static READ_CACHE: LazyLock<Mutex<ReadCache>> = LazyLock::new(|| Mutex::new(ReadCache::new()));

/// Whether [`READ_CACHE`] holds additions to hand over at the end of the call (read without its
/// lock at the end of every call): not set for a batch held until the host asks for it.
static PENDING: AtomicBool = AtomicBool::new(false);

/// Plugin calls in progress on any thread: an addition made with none (on a thread of the
/// plugin's own) is handed over at once, the others at the end of a call (or held).
static CALLS: AtomicUsize = AtomicUsize::new(0);

/// Set at this plugin's first batched addition. Before it, no call is counted in [`CALLS`],
/// so an addition made during a call that began earlier is handed over at once.
static BATCHING: AtomicBool = AtomicBool::new(false);

/// Set when the instance is being destroyed: the host will not ask for a held batch any more,
/// so nothing is held from then on.
static CLOSING: AtomicBool = AtomicBool::new(false);

/// A batch past this size is handed over at once (the host takes at most 1 MiB).
const HAND_OVER_AT: usize = 64 * 1024;

/// A batch held past the end of calls (see [`ReadCache::end_of_call`]) is handed over at the
/// end of the call that takes it past this size. Crossing into the host once per call ran the
/// host's code for a batch (4.7 kB of it) once per call, out of the instruction cache every
/// time; once per 16 kB it runs about once every hundred calls of a bundled plugin.
const HOLD_UP_TO: usize = 16 * 1024;

/// The longest name (key, field or mark) the host takes, in bytes.
const MAX_NAME: usize = 512;

/// The most rows one addition puts in a batch (16 bytes each): with [`HAND_OVER_AT`], a batch
/// stays under the host's limit of a MiB.
const MAX_ENTRY_ROWS: usize = 32 * 1024;

/// A generation's marks (see [`Marks`]): the list of their [`mark_id`]s, and a Bloom filter of
/// them that answers "not here" for nearly every new mark without a look at the list. A hash
/// set of a second's ids (up to 2 MB for a plugin adding two marks a task) cost the pipeline
/// more than its own work: each insertion brought two of its cache lines in and pushed out the
/// rest of the pipeline's. The filter takes 4 bytes a mark and one cache line a look, and the
/// ids are written at the end of the list, one after the other. A mark the filter may hold (a
/// mark seen before, or at most one new mark in about 60 000) is looked for in the list; after
/// [`SCANS_BEFORE_INDEX`] such looks in a generation (a replay, say) its ids go into a hash
/// set, which answers from then on.
#[derive(Default)]
struct MarkSet {
    /// A mark sets one bit in each word of one block.
    bloom: Vec<Block>,
    /// The marks noted in the filter since it was last made: the list's and those taken out
    /// since (their bits stay). Past [`MarkSet::room`], the filter is made again: twice as
    /// large when the list needs it, else at its size from the list alone.
    noted: usize,
    ids: Vec<u128>,
    /// The ids in a hash set, once looks through them became frequent.
    index: Option<HashSet<u128, foldhash::fast::RandomState>>,
    scans: u32,
}

/// A block of a [`MarkSet`]'s filter: one cache line, so that a look reads one.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Block([u64; 8]);

/// Bits of the filter a mark: one new mark in about 60 000 is taken for one the filter may
/// hold when the filter is full (16 marks a block), one in millions when it is half full.
const BLOOM_BITS: usize = 32;

/// Looks through a generation's list before its ids are put in a hash set. A look reads every
/// id (100 to 200 µs for a second's marks) and a hash set of them costs about as much as 50
/// looks, so a replay costs a generation at most about twice what a hash set of its marks did;
/// new marks the filter lets through make one or two looks a second's generation.
const SCANS_BEFORE_INDEX: u32 = 16;

impl MarkSet {
    /// The block and the bits of `id` (random already: its low half picks the block, its high
    /// half a bit in each of the block's words).
    #[inline(always)]
    fn bloom_bits(&self, id: u128) -> (usize, [u64; 8]) {
        // The low half times the number of blocks, its top 64 bits: a block in range, as
        // evenly as the low half is random, for any number of blocks.
        let block = ((u128::from(id as u64) * self.bloom.len() as u128) >> 64) as usize;
        let high = (id >> 64) as u64;
        let mut bits = [0; 8];
        for (j, bit) in bits.iter_mut().enumerate() {
            *bit = 1 << ((high >> (j * 6)) & 63);
        }
        (block, bits)
    }

    #[inline(always)]
    fn may_hold(&self, id: u128) -> bool {
        if self.bloom.is_empty() {
            return false;
        }
        let (at, bits) = self.bloom_bits(id);
        self.bloom
            .get(at)
            .is_some_and(|block| block.0.iter().zip(bits).all(|(word, bit)| word & bit != 0))
    }

    #[inline(always)]
    fn note(&mut self, id: u128) {
        let (at, bits) = self.bloom_bits(id);
        if let Some(block) = self.bloom.get_mut(at) {
            for (word, bit) in block.0.iter_mut().zip(bits) {
                *word |= bit;
            }
        }
    }

    /// Sizes the filter for `marks` marks (and notes the ids again when it grows).
    fn make_room(&mut self, marks: usize) {
        let marks = marks.max(1024);
        let blocks = marks.saturating_mul(BLOOM_BITS).div_ceil(512);
        if blocks > self.bloom.len() {
            self.bloom = vec![Block::default(); blocks];
            self.renote();
        }
    }

    /// Notes the list's ids in an emptied filter (the bits of marks taken out are gone).
    fn renote(&mut self) {
        self.bloom.fill(Block::default());
        let ids = std::mem::take(&mut self.ids);
        for &id in &ids {
            self.note(id);
        }
        self.noted = ids.len();
        self.ids = ids;
    }

    #[inline(always)]
    fn contains(&mut self, id: u128) -> bool {
        if !self.may_hold(id) {
            return false;
        }
        self.look(id)
    }

    /// [`MarkSet::contains`] for an id the filter may hold: rare, out of line.
    #[cold]
    #[inline(never)]
    fn look(&mut self, id: u128) -> bool {
        if self.index.is_none() {
            self.scans += 1;
            if self.scans <= SCANS_BEFORE_INDEX {
                return self.ids.contains(&id);
            }
            let mut index = HashSet::with_capacity_and_hasher(self.ids.len(), Default::default());
            index.extend(self.ids.iter().copied());
            self.index = Some(index);
        }
        self.index.as_ref().is_some_and(|index| index.contains(&id))
    }

    /// Adds `id`: `false` when it is there already.
    #[inline(always)]
    fn insert(&mut self, id: u128) -> bool {
        if self.contains(id) {
            return false;
        }
        if self.noted >= self.room() {
            self.grow();
        }
        self.noted += 1;
        self.note(id);
        self.ids.push(id);
        if let Some(index) = &mut self.index {
            index.insert(id);
        }
        true
    }

    /// Makes the full filter room for more marks: out of line, once per doubling.
    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        if self.bloom.is_empty() || self.ids.len() * 2 > self.room() {
            self.make_room(self.ids.len() * 2);
        } else {
            // Filled by marks mostly taken out again (batches the host refused): made
            // again at its size.
            self.renote();
        }
    }

    /// Takes `id` out (its bits stay in the filter: a mark it may hold is looked for). The
    /// list is searched from its end: the marks taken out are the last ones added, as a rule
    /// (a crossing's, taken out newest first, or one whose entry could not be written).
    fn remove(&mut self, id: u128) -> bool {
        if !self.may_hold(id) {
            return false;
        }
        if let Some(index) = &mut self.index {
            index.remove(&id);
        }
        match self.ids.iter().rposition(|&i| i == id) {
            Some(at) => {
                self.ids.swap_remove(at);
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// The marks the filter is sized for.
    fn room(&self) -> usize {
        self.bloom.len() * 512 / BLOOM_BITS
    }

    /// How large the set has grown: the marks its filter has room for, or its list's
    /// capacity if larger (what [`Marks::drop_flushed`] weighs to keep it or let it go).
    fn capacity(&self) -> usize {
        self.room().max(self.ids.capacity())
    }

    /// Empties the set, keeping its filter's and list's memory (not the index's: a replay is
    /// over when its generation is).
    fn clear(&mut self) {
        self.bloom.fill(Block::default());
        self.noted = 0;
        self.ids.clear();
        self.index = None;
        self.scans = 0;
    }

    fn extend(&mut self, ids: impl IntoIterator<Item = u128>) {
        for id in ids {
            self.insert(id);
        }
    }
}

/// The marks a plugin added under and the store has not taken yet, in generations: the marks
/// that went into one of the host's batches. A generation is dropped whole once the store took
/// its batch. One set of every mark pending grew to a second's marks or more, and kept each
/// with its crossing to be picked out at each flush: its entries were spread over megabytes,
/// and an insertion cost a cache miss; a generation's set is a fraction of that, and is emptied
/// for reuse rather than freed.
#[derive(Default)]
struct Marks {
    /// Oldest first, each with the host's batch its marks went into (0: not known yet, the
    /// newest only); the newest takes new marks.
    generations: VecDeque<(u64, MarkSet)>,
    /// Emptied sets, for the next generations, the largest last.
    spare: Vec<MarkSet>,
    /// The most marks of a recent generation: the largest one's, less a sixty-fourth for each
    /// generation since (a `Store::flush` in the host, or the round after an outage's retried
    /// batch, takes a small batch after a large one). A set far larger (one that grew over an
    /// outage) is not kept.
    peak: usize,
}

impl Marks {
    /// Adds a mark: `false` when it is there already.
    #[inline(always)]
    fn insert(&mut self, id: u128) -> bool {
        if self.generations.is_empty() {
            self.start_generation();
        }
        let newest = self.generations.len() - 1;
        for (at, (_, set)) in self.generations.iter_mut().enumerate() {
            if at < newest {
                if set.contains(id) {
                    return false;
                }
            } else {
                return set.insert(id);
            }
        }
        false
    }

    /// The first generation after the last was dropped: out of line.
    #[cold]
    #[inline(never)]
    fn start_generation(&mut self) {
        let mut set = self.spare.pop().unwrap_or_default();
        set.make_room(self.peak);
        self.generations.push_back((0, set));
    }

    fn remove(&mut self, id: u128) {
        for (_, set) in &mut self.generations {
            set.remove(id);
        }
    }

    /// The marks of the last crossing (`crossed`, in the newest generation) went into the
    /// host's batch `batch`, and the store took every batch up to `flushed`. When the host moved
    /// on to a later batch than the newest generation's, those marks start a generation of
    /// their own (the older one is then dropped as soon as its batch is taken, not a batch
    /// later); the generations the store took are dropped.
    fn handed(&mut self, batch: u64, flushed: u64, crossed: impl Iterator<Item = u128>) {
        let moved_on = match self.generations.back_mut() {
            Some((known, _)) if *known == 0 => {
                *known = batch;
                false
            }
            Some((known, _)) => batch > *known,
            None => false,
        };
        // The crossing's marks are taken out first, the generations the store took dropped,
        // then the new generation made: it takes the largest set kept, a dropped one's among
        // them (made before the drop, it took a smaller set and grew it again).
        let mut moved = Vec::new();
        if moved_on && let Some((_, newest)) = self.generations.back_mut() {
            // The crossing's marks are the newest's last ids: taken out newest first, each is
            // found at the end of the list.
            let crossed: Vec<u128> = crossed.collect();
            moved.extend(crossed.into_iter().rev().filter(|&id| newest.remove(id)));
        }
        self.drop_flushed(flushed);
        if moved_on {
            let mut next = self.spare.pop().unwrap_or_default();
            next.make_room(self.peak);
            next.extend(moved);
            self.generations.push_back((batch, next));
        }
    }

    /// Drops the generations the store took (their batches up to `flushed`), keeping their
    /// sets, emptied, for the next generations.
    fn drop_flushed(&mut self, flushed: u64) {
        while let Some((known, _)) = self.generations.front()
            && *known != 0
            && *known <= flushed
        {
            if let Some((_, mut set)) = self.generations.pop_front() {
                self.peak = set.len().max(self.peak - self.peak / 64);
                if set.capacity() > self.peak.max(1024).saturating_mul(4) {
                    continue;
                }
                set.clear();
                let at = self
                    .spare
                    .partition_point(|s| s.capacity() <= set.capacity());
                self.spare.insert(at, set);
                // As many as there were generations at most (two, as a rule).
                if self.spare.len() > 3 {
                    self.spare.remove(0);
                }
            }
        }
    }
}

/// The marks of a batch in the host's form (see [`ReadCache::batch`]).
struct Entries<'a>(&'a [u8]);

impl<'a> Iterator for Entries<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        fn word(bytes: &[u8], at: usize) -> Option<usize> {
            let word: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
            usize::try_from(u32::from_le_bytes(word)).ok()
        }
        loop {
            let bytes = self.0;
            let (mark, at) = match bytes.first()? {
                0 => (None, 1),
                1 => {
                    let end = word(bytes, 1)?.checked_add(5)?;
                    (Some(bytes.get(5..end)?), end)
                }
                // Not a batch this plugin wrote.
                _ => return None,
            };
            let rows = word(bytes, at)?.checked_mul(16)?;
            let next = at.checked_add(4)?.checked_add(rows)?;
            self.0 = bytes.get(next..).unwrap_or_default();
            if let Some(mark) = mark {
                return Some(mark);
            }
        }
    }
}

#[inline(always)]
fn read_cache() -> MutexGuard<'static, ReadCache> {
    READ_CACHE.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReadCache {
    fn new() -> ReadCache {
        ReadCache {
            generation: 0,
            writes: 0,
            adding: 0,
            fields: HashMap::default(),
            records: HashMap::default(),
            batch: Vec::new(),
            key_ids: Names::default(),
            field_ids: Names::default(),
            marks: Marks::default(),
            told: (0, 0),
            holding: false,
        }
    }

    /// Empties the copies if the host's cache changed since they were made (the marks stay
    /// until the store has them: see [`ReadCache::hand_over`]).
    fn renew(&mut self, generation: u64) {
        if generation != self.generation {
            self.fields.clear();
            self.records.clear();
            self.generation = generation;
        }
    }

    /// Notes where the host put the crossing's additions (`P F`: the number of its batch
    /// they go into, the last batch the store took; empty: as last told), and drops the marks
    /// of every batch the store took: the store decides for them from now on, as for every
    /// worker's.
    fn note_batches(&mut self, numbers: &str) {
        let (batch, flushed) = if numbers.is_empty() {
            self.told
        } else {
            let mut numbers = numbers.split(' ').map(str::parse::<u64>);
            let (Some(Ok(batch)), Some(Ok(flushed))) = (numbers.next(), numbers.next()) else {
                // Not an answer this plugin knows: its marks are not kept past the crossing.
                self.forget_batch();
                return;
            };
            self.told = (batch, flushed);
            (batch, flushed)
        };
        if batch == 0 {
            // Never told (not an answer this plugin knows).
            self.forget_batch();
            return;
        }
        let crossed = Entries(&self.batch).map(mark_id);
        self.marks.handed(batch, flushed, crossed);
    }

    /// Drops the marks of the batch being handed over (the host did not take it).
    fn forget_batch(&mut self) {
        // Newest first: each is then found at the end of its generation's list.
        let ids: Vec<u128> = Entries(&self.batch).map(mark_id).collect();
        for id in ids.into_iter().rev() {
            self.marks.remove(id);
        }
    }

    /// The host's id of a key (`kind` "k") or field ("f") name, asked for at its first use.
    #[inline(always)]
    fn id(&mut self, kind: &str, name: &str) -> Option<u32> {
        let ids = if kind == "k" {
            &mut self.key_ids
        } else {
            &mut self.field_ids
        };
        if let Some(id) = ids.get(name) {
            return Some(id);
        }
        intern(ids, kind, name)
    }

    /// The host's id of `key`: a [`Key`]'s own once numbered, else by name (and kept in the
    /// `Key`).
    #[inline(always)]
    fn key_id<K: StoreKey + ?Sized>(&mut self, key: &K) -> Option<u32> {
        let slot = key.id_slot();
        if let Some(slot) = slot {
            let id = slot.load(Ordering::Relaxed);
            if id != NOT_NUMBERED {
                return Some(id);
            }
        }
        let id = self.id("k", key.key_name())?;
        if let Some(slot) = slot {
            slot.store(id, Ordering::Relaxed);
        }
        Some(id)
    }

    /// Hands the pending additions to the host, in one crossing.
    fn hand_over(&mut self) {
        PENDING.store(false, Ordering::Relaxed);
        // The next batch is held only once the host said again that it will ask for it.
        self.holding = false;
        if self.batch.is_empty() {
            return;
        }
        match crate::log::store_batch(&self.batch) {
            Ok(Some(answer)) => match answer.strip_prefix("dup ") {
                // A mark was already pending in the host (an earlier instance of this plugin
                // added it): the host added nothing for it, so the copies, which did, are
                // dropped and read again.
                Some(numbers) => {
                    self.fields.clear();
                    self.note_batches(numbers);
                }
                None => self.note_batches(&answer),
            },
            Ok(None) => self.forget_batch(),
            Err(e) => {
                tracing::warn!(error = %e.message, "the host's store refused a batch of additions");
                self.fields.clear();
                self.forget_batch();
            }
        }
        self.batch.clear();
    }

    /// Appends one entry (under `mark`, if any, which goes into the set of marks) to the batch
    /// and applies it to the copies: `Ok(false)` (nothing appended) for a mark in the set
    /// already; `Err` (nothing appended, the mark not kept) for a mark that is no name, or
    /// when the host would not give an id.
    fn append<K: StoreKey + ?Sized>(
        &mut self,
        mark: Option<&Mark<'_>>,
        adds: &[(&K, &[(&str, f64)])],
    ) -> Result<bool, NotAppended> {
        let start = self.batch.len();
        let mut marked = None;
        match mark {
            None => self.batch.push(0),
            Some(mark) => {
                // The mark is written in place (its length checked first: a task id can be
                // megabytes, and the batch's buffer is kept), then its bytes checked there.
                let len = mark.len();
                let Some(len) = u32::try_from(len)
                    .ok()
                    .filter(|&l| l != 0 && l as usize <= MAX_NAME)
                else {
                    return Err(NotAppended::Mark);
                };
                self.batch.push(1);
                self.batch.extend_from_slice(&len.to_le_bytes());
                mark.write_to(&mut self.batch);
                let text = self.batch.get(start + 5..).unwrap_or_default();
                if !plain_bytes(text) {
                    self.batch.truncate(start);
                    return Err(NotAppended::Mark);
                }
                let id = mark_id(text);
                // The mark is inserted first (a mark seen before is rare) and taken out again
                // if its entry cannot be written.
                if !self.marks.insert(id) {
                    self.batch.truncate(start);
                    return Ok(false);
                }
                marked = Some(id);
            }
        }
        if self.encode_rows(adds).is_none() {
            if let Some(id) = marked {
                self.marks.remove(id);
            }
            self.batch.truncate(start);
            return Err(NotAppended::Names);
        }
        self.writes += 1;
        if !self.fields.is_empty() {
            for (key, fields) in adds {
                if let Some(entry) = self.fields.get_mut(key.key_name()) {
                    for (field, delta) in *fields {
                        entry.add(field, *delta);
                    }
                }
            }
        }
        // SeqCst here and in `end_call`: this thread stores PENDING then loads CALLS, a call's
        // end decrements CALLS then loads PENDING; one of the two must see the other's
        // store, or the addition would wait in the batch with no call left to hand it over.
        // A batch the host will ask for needs no call's end until it is large.
        if !self.holding || self.batch.len() >= HOLD_UP_TO {
            PENDING.store(true, Ordering::SeqCst);
        }
        if self.batch.len() >= HAND_OVER_AT || CALLS.load(Ordering::SeqCst) == 0 {
            self.hand_over();
        }
        Ok(true)
    }

    /// At the end of a call that added: keeps a small batch when the host will ask for it
    /// (`HostApi::store_hold`, asked once per batch), hands it over otherwise.
    fn end_of_call(&mut self) {
        PENDING.store(false, Ordering::Relaxed);
        if self.batch.is_empty() {
            return;
        }
        if self.batch.len() < HOLD_UP_TO
            && !CLOSING.load(Ordering::Relaxed)
            && (self.holding || crate::log::store_hold())
        {
            self.holding = true;
            return;
        }
        self.hand_over();
    }

    /// Writes one entry's rows at the end of the batch (the caller truncates it on `None`):
    /// `None` for rows the host would refuse, so that they never spoil a batch of others.
    #[inline(always)]
    fn encode_rows<K: StoreKey + ?Sized>(&mut self, adds: &[(&K, &[(&str, f64)])]) -> Option<()> {
        let rows: usize = adds.iter().map(|(_, fields)| fields.len()).sum();
        if rows > MAX_ENTRY_ROWS {
            return None;
        }
        let rows = u32::try_from(rows).ok()?;
        self.batch.extend_from_slice(&rows.to_le_bytes());
        for (key, fields) in adds {
            let key = self.key_id(*key)?;
            for (field, delta) in *fields {
                let field = self.id("f", field)?;
                let mut row = [0; 16];
                row[..4].copy_from_slice(&key.to_le_bytes());
                row[4..8].copy_from_slice(&field.to_le_bytes());
                row[8..].copy_from_slice(&delta.to_le_bytes());
                self.batch.extend_from_slice(&row);
            }
        }
        Some(())
    }
}

/// A mark given to [`add_once`], or the parts [`add_once_joined`] joins into one: written
/// straight into the batch, never built on its own but on the older path.
enum Mark<'a> {
    Text(&'a str),
    Parts(&'a [&'a str]),
}

impl Mark<'_> {
    /// The length of the mark's text, in bytes.
    #[inline(always)]
    fn len(&self) -> usize {
        match self {
            Mark::Text(text) => text.len(),
            Mark::Parts(parts) => parts.iter().fold(parts.len().saturating_sub(1), |len, p| {
                len.saturating_add(p.len())
            }),
        }
    }

    /// Writes the mark's text at the end of `out`.
    #[inline(always)]
    fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Mark::Text(text) => out.extend_from_slice(text.as_bytes()),
            Mark::Parts(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        out.push(b'/');
                    }
                    out.extend_from_slice(part.as_bytes());
                }
            }
        }
    }

    fn text(&self) -> String {
        match self {
            Mark::Text(text) => (*text).to_owned(),
            Mark::Parts(parts) => join(parts),
        }
    }
}

/// Why [`ReadCache::append`] appended nothing.
enum NotAppended {
    /// The mark is no name (empty, too long, a newline or a tab).
    Mark,
    /// The host would not number a key or field name: the older path says why.
    Names,
}

/// Counts a plugin call as begun (the export shims call it), once this plugin batches
/// additions (a plugin without a store pays one load): additions made during it are handed
/// over when it ends ([`end_call`], given what this answered).
pub(crate) fn begin_call() -> bool {
    let counted = BATCHING.load(Ordering::Relaxed);
    if counted {
        CALLS.fetch_add(1, Ordering::Relaxed);
    }
    counted
}

/// Ends a call begun with [`begin_call`]: hands over the additions waiting, if any, or holds
/// them (see [`ReadCache::end_of_call`]).
pub(crate) fn end_call(counted: bool) {
    if counted {
        CALLS.fetch_sub(1, Ordering::SeqCst);
        if PENDING.load(Ordering::SeqCst) {
            read_cache().end_of_call();
        }
    }
}

/// Hands over the additions this plugin holds, if any: when the host asks
/// (`PluginTable::store_hand_over`), when its state is saved and when it is destroyed.
pub(crate) fn hand_over_held() {
    if BATCHING.load(Ordering::Relaxed) {
        read_cache().hand_over();
    }
}

/// The instance is being destroyed: hands over what it holds and holds nothing from now on.
pub(crate) fn closing() {
    CLOSING.store(true, Ordering::Relaxed);
    hand_over_held();
}

/// The plugin's cache, when the host takes batches (renewed for the host's generation at the
/// first batched addition only, see below); `None` for the older paths (an older host, an
/// isolated plugin, no store).
#[inline(always)]
fn batching() -> Option<MutexGuard<'static, ReadCache>> {
    // Once batching, always (a host's store stays for the instance's life). The copies are
    // not renewed here: an addition applied to copies older than the host's cache is dropped
    // with them at the next read, which renews them first.
    if BATCHING.load(Ordering::Relaxed) {
        return Some(read_cache());
    }
    start_batching()
}

/// [`batching`] before this plugin's first batched addition.
#[cold]
#[inline(never)]
fn start_batching() -> Option<MutexGuard<'static, ReadCache>> {
    if !crate::log::has_store_batch() {
        return None;
    }
    let generation = crate::log::store_generation()?;
    BATCHING.store(true, Ordering::Relaxed);
    let mut cache = read_cache();
    cache.renew(generation);
    Some(cache)
}

/// The plugin's read cache, emptied if the host's cache changed since it was filled; `None`
/// when the host does not number its cache (no store, or a host older than the generation):
/// the caller asks the host.
fn fresh_cache() -> Option<MutexGuard<'static, ReadCache>> {
    let generation = crate::log::store_generation()?;
    let mut cache = read_cache();
    cache.renew(generation);
    Some(cache)
}

/// Notes an addition about to be sent to the host; [`note_adds`] ends it.
fn begin_add() {
    let mut cache = read_cache();
    cache.writes += 1;
    cache.adding += 1;
}

/// Ends an addition begun with [`begin_add`]: applies this plugin's additions, when the host
/// took them (`adds`), to its copies of the keys.
fn note_adds<'a>(adds: impl IntoIterator<Item = (&'a str, &'a [(&'a str, f64)])>) {
    let mut cache = read_cache();
    cache.writes += 1;
    cache.adding = cache.adding.saturating_sub(1);
    if cache.fields.is_empty() {
        return;
    }
    for (key, fields) in adds {
        if let Some(entry) = cache.fields.get_mut(key) {
            for (field, delta) in fields {
                entry.add(field, *delta);
            }
        }
    }
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

/// Whether `key`'s name can be a key: a [`Key`] the host numbered was checked then.
fn plain_key<K: StoreKey + ?Sized>(key: &K) -> bool {
    key.id_slot()
        .is_some_and(|slot| slot.load(Ordering::Relaxed) != NOT_NUMBERED)
        || plain(key.key_name())
}

/// Whether `name` can be a key, mark or field: 1 to 512 bytes, no newline, no tab.
fn plain(name: &str) -> bool {
    plain_bytes(name.as_bytes())
}

#[inline(always)]
fn plain_bytes(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !has_newline_or_tab(name)
}

/// Whether `bytes` hold a newline or a tab, eight bytes at a time: names are short, and this
/// loop is a few instructions where a general search first picks a routine for the machine
/// (code that a hot path then fetches again on every addition).
#[inline(always)]
fn has_newline_or_tab(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Non-zero exactly when a byte of `x` is zero.
    let any_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut eight = [0; 8];
        eight.copy_from_slice(word);
        let x = u64::from_ne_bytes(eight);
        if any_zero(x ^ (ONES * u64::from(b'\n'))) | any_zero(x ^ (ONES * u64::from(b'\t'))) != 0 {
            return true;
        }
    }
    words.remainder().iter().any(|&b| b == b'\n' || b == b'\t')
}

fn push_delta(text: &mut String, delta: f64) {
    use std::fmt::Write as _;
    // `Display` of an `f64` is the shortest text that reads back as the same number.
    let _ = write!(text, "{delta}");
}

/// The parts joined with `/`, as a key or a mark (`join(&["arm", context, arm])`): what
/// `format!` makes, for a fraction of its cost on a hot path.
pub fn join(parts: &[&str]) -> String {
    let len = parts.iter().map(|p| p.len() + 1).sum::<usize>();
    let mut out = String::with_capacity(len.saturating_sub(1));
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(part);
    }
    out
}

/// A number that changes whenever what [`read`], [`read_values`] and [`record`] answer may
/// change otherwise than by this plugin's own additions (a refresh from the store, a key's first
/// read, a compare-and-set): what a plugin derives from records alone (a decision it follows,
/// say) can be kept while it is unchanged, without reading them again. `None` without a store
/// or when the host cannot say (an older host, an isolated plugin): read every time.
pub fn generation() -> Option<u64> {
    crate::log::store_generation()
}

/// Whether the host offers a store to this plugin.
pub fn available() -> bool {
    op("available", &Value::Null).is_some_and(|v| v == Value::Bool(true))
}

/// Adds each delta to its field of `key` (a missing field starts at 0). `false` without a
/// store, or when a name is empty or holds a newline or a tab, or a delta is not finite.
pub fn add<K: StoreKey + ?Sized>(key: &K, fields: &[(&str, f64)]) -> bool {
    if fields.iter().any(|(_, d)| !d.is_finite()) {
        return false;
    }
    // Names are checked when the host numbers them (the first use).
    if let Some(mut cache) = batching()
        && cache.append(None, &[(key, fields)]).is_ok()
    {
        return true;
    }
    add_unbatched(key.key_name(), fields)
}

/// [`add`] as one operation, when the host takes no batches (an older host, an isolated
/// plugin, no store) or would not number a name.
#[cold]
#[inline(never)]
fn add_unbatched(key: &str, fields: &[(&str, f64)]) -> bool {
    if !plain(key) || fields.iter().any(|(f, _)| !plain(f)) {
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
    begin_add();
    let added = raw("add", &text).is_some();
    note_adds(if added { Some((key, fields)) } else { None });
    added
}

/// Adds the deltas of each key once fleet-wide for `mark`: a second call with the same mark,
/// from this worker or any other, adds nothing. `Some(true)` when this process had not seen the
/// mark since its last flush (the store decides for the fleet when it flushes, in the same
/// transaction as the additions, and the next refresh of the cache shows its decision);
/// `Some(false)` for a mark already pending here; `None` without a store. (Pending marks are
/// told apart here by 128 bits of a hash keyed at random per process: two marks taken for one
/// has a chance of about `n² / 2¹²⁹` among `n` pending, which nobody without the key can raise.)
pub fn add_once<K: StoreKey + ?Sized>(mark: &str, adds: &[(&K, &[(&str, f64)])]) -> Option<bool> {
    once(&Mark::Text(mark), adds)
}

/// [`add_once`] under the mark `join(parts)`, written straight where it goes (no string is
/// made for it): `add_once_joined(&["scored", context, id], adds)`.
pub fn add_once_joined<K: StoreKey + ?Sized>(
    parts: &[&str],
    adds: &[(&K, &[(&str, f64)])],
) -> Option<bool> {
    once(&Mark::Parts(parts), adds)
}

fn once<K: StoreKey + ?Sized>(mark: &Mark<'_>, adds: &[(&K, &[(&str, f64)])]) -> Option<bool> {
    let finite = adds
        .iter()
        .all(|(_, fields)| fields.iter().all(|(_, d)| d.is_finite()));
    if !finite {
        return None;
    }
    // Names are checked when the host numbers them (the first use), the mark in the batch.
    if let Some(mut cache) = batching() {
        match cache.append(Some(mark), adds) {
            Ok(new) => return Some(new),
            Err(NotAppended::Mark) => return None,
            // The older path, for a name the host would not number (it says why).
            Err(NotAppended::Names) => {}
        }
    }
    once_unbatched(mark, adds)
}

/// [`once`] as one operation (see [`add_unbatched`]).
#[cold]
#[inline(never)]
fn once_unbatched<K: StoreKey + ?Sized>(
    mark: &Mark<'_>,
    adds: &[(&K, &[(&str, f64)])],
) -> Option<bool> {
    let mark = mark.text();
    let mark = mark.as_str();
    let valid = plain(mark)
        && adds
            .iter()
            .all(|(key, fields)| plain(key.key_name()) && fields.iter().all(|(f, _)| plain(f)));
    if !valid {
        return None;
    }
    let mut text = String::with_capacity(mark.len() + 48 * adds.len());
    text.push_str(mark);
    for (key, fields) in adds {
        for (field, delta) in *fields {
            text.push('\n');
            text.push_str(key.key_name());
            text.push('\t');
            text.push_str(field);
            text.push('\t');
            push_delta(&mut text, *delta);
        }
    }
    begin_add();
    let answer = raw("mark", &text);
    let taken = answer.as_deref() == Some("true");
    note_adds(
        adds.iter()
            .filter(|_| taken)
            .map(|(key, fields)| (key.key_name(), *fields)),
    );
    match answer?.as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Sets the idempotency mark `mark`: `Some(true)` when this process had not seen it, `None`
/// without a store. See [`add_once`].
pub fn mark_once(mark: &str) -> Option<bool> {
    add_once::<str>(mark, &[])
}

/// The fields of `key` (empty when it has none yet); `None` without a store.
pub fn read<K: StoreKey + ?Sized>(key: &K) -> Option<BTreeMap<String, f64>> {
    if !plain_key(key) {
        return None;
    }
    let key = key.key_name();
    let cached = fresh_cache().map(|mut cache| {
        let hit = cache.fields.get(key).map(FieldCopy::to_map);
        if hit.is_none() {
            // The host answers with what it holds: this plugin's additions first.
            cache.hand_over();
        }
        (hit, cache.generation, cache.writes)
    });
    if let Some((Some(fields), _, _)) = cached {
        return Some(fields);
    }
    let answer = raw("read", key)?;
    let fields: BTreeMap<String, f64> = answer
        .lines()
        .filter_map(|line| {
            let (field, value) = line.split_once('\t')?;
            Some((field.to_owned(), value.parse().ok()?))
        })
        .collect();
    if let Some((None, generation, writes)) = cached {
        let mut cache = read_cache();
        // Kept only when nothing changed while the read crossed (a newer generation empties
        // the cache at its next check anyway).
        if cache.generation == generation && cache.writes == writes && cache.adding == 0 {
            let copy = fields.iter().map(|(f, v)| (f.clone(), *v)).collect();
            cache.fields.insert(key.to_owned(), copy);
        }
    }
    Some(fields)
}

/// The values of `fields` of `key`, in that order (0 for a field it does not have yet): [`read`]
/// without the map, for a plugin's hot path (no allocation when the plugin's copy of the key
/// answers). `None` without a store.
pub fn read_values<K: StoreKey + ?Sized, const N: usize>(
    key: &K,
    fields: [&str; N],
) -> Option<[f64; N]> {
    if !plain_key(key) {
        return None;
    }
    let key = key.key_name();
    if let Some(cache) = fresh_cache()
        && let Some(found) = cache.fields.get(key)
    {
        return Some(fields.map(|f| found.get(f).unwrap_or(0.0)));
    }
    let found = read(key)?;
    Some(fields.map(|f| found.get(f).copied().unwrap_or(0.0)))
}

/// The keys under `prefix` that hold fields, the fleet's and this process's: a scan that waits
/// for the store (within the host's timeouts), for reports rather than every call. `None`
/// without a store.
pub fn keys(prefix: &str) -> Option<Vec<String>> {
    // The host answers with what it holds: this plugin's additions first.
    hand_over_held();
    let answer = op("keys", &json!({"prefix": prefix}))?;
    serde_json::from_value(answer).ok()
}

/// The record at `key`: `Some(None)` when there is none yet, `None` without a store.
pub fn record<K: StoreKey + ?Sized>(key: &K) -> Option<Option<Record>> {
    record_since(key, 0)
}

/// The record at `key` if its version is above `since` (what the caller already has):
/// `Some(None)` when there is no newer one, `None` without a store. Cheaper than [`record`]
/// when nothing changed: the record's value is not sent.
pub fn record_since<K: StoreKey + ?Sized>(key: &K, since: u64) -> Option<Option<Record>> {
    if !plain_key(key) {
        return None;
    }
    let key = key.key_name();
    let newer = |record: &Option<Record>| record.as_ref().filter(|r| r.version > since).cloned();
    let cached = fresh_cache().map(|cache| {
        let hit = cache.records.get(key).map(newer);
        (hit, cache.generation, cache.writes)
    });
    if let Some((Some(hit), _, _)) = cached {
        return Some(hit);
    }
    // Without a copy, the whole record (from version 0), to keep.
    let asked = if cached.is_some() { 0 } else { since };
    let answer = raw("record", &format!("{key}\n{asked}"))?;
    let record = match answer.split_once('\n') {
        None => None,
        Some((version, value)) => Some(Record {
            version: version.parse().ok()?,
            value: serde_json::from_str(value).ok()?,
        }),
    };
    if let Some((None, generation, writes)) = cached {
        let mut cache = read_cache();
        if cache.generation == generation && cache.writes == writes && cache.adding == 0 {
            cache.records.insert(key.to_owned(), record.clone());
        }
    }
    Some(newer(&record))
}

/// Writes `value` at `key` if the record's version is still `version` (0: no record yet).
/// `Some(true)` when written (the record's version is now `version + 1`), `Some(false)` when
/// another writer came first or the store cannot be reached, `None` without a store. This is
/// the one operation that waits for the store (within the host's bounded timeouts): a decision
/// must be the fleet's.
pub fn compare_and_set<K: StoreKey + ?Sized>(key: &K, version: u64, value: &Value) -> Option<bool> {
    let key = key.key_name();
    let written = op(
        "cas",
        &json!({"key": key, "version": version, "value": value}),
    )
    .and_then(|v| v.as_bool());
    // Whatever the answer, the record changed or another writer's is newer: read it again.
    let mut cache = read_cache();
    cache.writes += 1;
    cache.records.remove(key);
    written
}

#[cfg(test)]
mod tests {
    use super::{
        Entries, FieldCopy, MarkSet, Marks, Names, ReadCache, SCANS_BEFORE_INDEX, SHORT_NAMES,
        has_newline_or_tab, mark_id, padded,
    };

    #[test]
    fn a_mark_is_seen_in_every_generation_until_the_store_took_its_batch() {
        let mut marks = Marks::default();
        let (a, b, c) = (
            mark_id(b"scored/a"),
            mark_id(b"scored/b"),
            mark_id(b"scored/c"),
        );
        assert!(marks.insert(a));
        assert!(!marks.insert(a), "a mark pending is seen");
        // `a` handed over into the host's batch 1, nothing flushed yet.
        marks.handed(1, 0, [a].into_iter());
        assert!(marks.insert(b));
        // `b`'s crossing went into batch 2: the host moved on, and `b` goes into a generation
        // of its own.
        marks.handed(2, 0, [b].into_iter());
        assert_eq!(marks.generations.len(), 2);
        assert!(marks.insert(c));
        assert!(!marks.insert(a) && !marks.insert(b) && !marks.insert(c));
        // Batch 1 flushed: `a`'s generation is dropped, and the store decides for it now.
        marks.handed(2, 1, [c].into_iter());
        assert_eq!(marks.generations.len(), 1);
        assert!(!marks.insert(b) && !marks.insert(c));
        assert!(marks.insert(a), "a flushed mark is the store's to decide");
        // `a`'s crossing went into batch 3, and batch 2 was flushed: `a` starts a generation,
        // and `b` and `c` are the store's to decide.
        marks.handed(3, 2, [a].into_iter());
        assert_eq!(marks.generations.len(), 1);
        assert!(marks.insert(c) && !marks.insert(a));
        // The emptied sets are kept for the next generations.
        assert!(!marks.spare.is_empty());
    }

    /// The set a second's marks grew serves the next generations, the small ones between
    /// included; one grown over an outage is let go once normal generations follow.
    #[test]
    fn a_generation_s_set_is_reused_and_an_outage_s_is_let_go() {
        let mut marks = Marks::default();
        let mut next = 0_u64;
        let mut batch = 0;
        // As the host answers: a crossing goes into the next batch as the last one is flushed
        // (its mark moves into a new generation, the last one's is dropped), then `n` more
        // marks go into the same batch.
        let mut generation = |marks: &mut Marks, n: usize| {
            batch += 1;
            next += 1;
            let first = mark_id(&next.to_le_bytes());
            marks.insert(first);
            marks.handed(batch, batch - 1, [first].into_iter());
            // The largest set, in use or kept.
            let spare = (marks.spare.iter())
                .chain(marks.generations.iter().map(|(_, set)| set))
                .map(|s| s.capacity())
                .max()
                .unwrap_or(0);
            for _ in 0..n {
                next += 1;
                let id = mark_id(&next.to_le_bytes());
                marks.insert(id);
                marks.handed(batch, batch - 1, [id].into_iter());
            }
            spare
        };
        // Each call answers the largest set, in use or kept, once the generation before it was
        // dropped.
        generation(&mut marks, 5_000);
        let large = generation(&mut marks, 10);
        assert!(large >= 5_000);
        for _ in 0..3 {
            assert_eq!(generation(&mut marks, 10), large, "kept through small ones");
        }
        generation(&mut marks, 500_000);
        let outage = generation(&mut marks, 5_000);
        assert!(outage >= 500_000);
        let mut kept = outage;
        for _ in 0..200 {
            kept = generation(&mut marks, 5_000);
        }
        assert!(kept < 500_000, "an outage's set is let go: {kept}");
    }

    /// A mark the filter may hold is looked for in the ids: one that only shares its block
    /// and bits with a mark there is new; a set grown past its filter keeps every mark.
    #[test]
    fn a_mark_set_answers_exactly_past_its_filter() {
        let mut set = MarkSet::default();
        let a = mark_id(b"scored/a");
        // The same block and bits as `a` (the low half and the high half's first 48 bits),
        // another id.
        let twin = a ^ (1 << 127);
        assert!(set.insert(a));
        assert!(set.may_hold(twin), "the twin passes the filter");
        assert!(set.insert(twin), "and is new all the same");
        assert!(!set.insert(a) && !set.insert(twin));
        assert!(set.remove(twin) && !set.contains(twin) && set.contains(a));
        assert!(!set.remove(twin), "taken out already");
        // Grown well past the room its filter was first made for, then filled to its room.
        let mut n = 0_u32;
        let mut ids = Vec::new();
        while ids.len() < 20_000 || set.len() < set.room() {
            n += 1;
            let id = mark_id(&n.to_le_bytes());
            assert!(set.insert(id));
            ids.push(id);
        }
        assert_eq!(set.len(), set.room());
        // New marks rarely pass a full filter: about 3 in 200 000 (1 in 60 000); 15 would be
        // a chance of 1 in 100 000, and a filter with half its blocks or half its bits lets
        // through over a hundred.
        assert_few_pass(&set, 200_000);
        assert!(set.index.is_none(), "{} looks", set.scans);
        assert!(ids.iter().all(|&id| set.contains(id)));
        set.clear();
        assert!(set.len() == 0 && !set.may_hold(a) && set.insert(a));
    }

    /// Fewer than 15 of `n` marks never added pass `set`'s filter.
    fn assert_few_pass(set: &MarkSet, n: u32) {
        let passed = (0..n)
            .filter(|m| set.may_hold(mark_id(&(u64::from(*m) << 32).to_le_bytes())))
            .count();
        assert!(passed < 15, "{passed} of {n} new marks passed the filter");
    }

    /// Marks taken out leave their bits behind; a filter filled by them is made again from
    /// the marks that stayed, so that new marks still pass it rarely.
    #[test]
    fn a_filter_filled_by_marks_taken_out_is_made_again() {
        let mut set = MarkSet::default();
        let keep = mark_id(b"kept");
        assert!(set.insert(keep));
        for n in 0..100_000_u32 {
            let id = mark_id(&n.to_le_bytes());
            assert!(set.insert(id));
            assert!(set.remove(id));
        }
        assert_eq!(set.len(), 1);
        assert!(
            set.noted <= set.room(),
            "{} noted, room {}",
            set.noted,
            set.room()
        );
        assert_few_pass(&set, 20_000);
        assert!(!set.insert(keep) && set.index.is_none());
    }

    /// A batch the host did not take has its marks forgotten: added again, they are new.
    #[test]
    fn a_batch_not_taken_forgets_its_marks() {
        let mut cache = ReadCache::new();
        let kept = mark_id(b"kept");
        assert!(cache.marks.insert(kept));
        for mark in [b"m/1".as_slice(), b"m/2"] {
            cache.batch.push(1);
            cache.batch.extend_from_slice(&3_u32.to_le_bytes());
            cache.batch.extend_from_slice(mark);
            cache.batch.extend_from_slice(&0_u32.to_le_bytes());
            assert!(cache.marks.insert(mark_id(mark)));
        }
        cache.forget_batch();
        assert!(cache.marks.insert(mark_id(b"m/1")) && cache.marks.insert(mark_id(b"m/2")));
        assert!(!cache.marks.insert(kept), "a mark of another batch stays");
    }

    /// A replay (every mark seen before) looks through the ids a few times, then through a
    /// hash set of them, and answers the same.
    #[test]
    fn a_replay_puts_a_generation_s_marks_in_a_hash_set() {
        let mut set = MarkSet::default();
        let ids: Vec<u128> = (0..5_000_u32).map(|n| mark_id(&n.to_le_bytes())).collect();
        set.extend(ids.iter().copied());
        for &id in &ids {
            assert!(!set.insert(id), "seen before");
        }
        assert!(set.index.is_some(), "after {SCANS_BEFORE_INDEX} looks");
        // The set keeps answering exactly, adding and taking out marks with its hash set.
        let new = mark_id(b"new");
        assert!(set.insert(new) && !set.insert(new));
        assert!(set.remove(new) && set.insert(new));
        assert!(set.remove(ids[10]) && set.insert(ids[10]) && !set.insert(ids[11]));
        // An emptied set starts without it.
        set.clear();
        assert!(set.index.is_none() && set.insert(ids[0]));
    }

    /// A crossing's marks moved into a new generation are there and no longer in the old one;
    /// a replay of an older generation's marks is turned away as they are.
    #[test]
    fn a_crossing_s_marks_move_and_an_older_generation_is_replayed_exactly() {
        let mut marks = Marks::default();
        let ids: Vec<u128> = (0..3_000_u32).map(|n| mark_id(&n.to_le_bytes())).collect();
        let (older, crossing) = ids.split_at(2_000);
        for &id in older {
            assert!(marks.insert(id));
        }
        marks.handed(1, 0, older.iter().copied());
        for &id in crossing {
            assert!(marks.insert(id));
        }
        // The host put the last crossing into batch 2: its marks start a generation.
        marks.handed(2, 0, crossing.iter().copied());
        assert_eq!(marks.generations.len(), 2);
        let mut generations = marks.generations.iter_mut();
        let (Some((_, old)), Some((_, new))) = (generations.next(), generations.next()) else {
            unreachable!("two generations");
        };
        assert_eq!((old.len(), new.len()), (2_000, 1_000));
        assert!(
            crossing
                .iter()
                .all(|&id| new.contains(id) && !old.contains(id))
        );
        // Every mark replayed, the older generation's through its hash set once built.
        for &id in &ids {
            assert!(!marks.insert(id), "seen before");
        }
        assert!(marks.generations[0].1.index.is_some());
        assert!(marks.insert(mark_id(b"new")));
    }

    #[test]
    fn a_removed_mark_is_new_again() {
        let mut marks = Marks::default();
        let a = mark_id(b"a");
        assert!(marks.insert(a));
        marks.remove(a);
        assert!(marks.insert(a));
    }

    #[test]
    fn the_ids_of_two_marks_differ_and_one_mark_keeps_its_id() {
        assert_eq!(mark_id(b"scored/x/1"), mark_id(b"scored/x/1"));
        assert_ne!(mark_id(b"scored/x/1"), mark_id(b"scored/x/2"));
        // The two halves are hashes of different inputs.
        let id = mark_id(b"scored/x/1");
        assert_ne!(id >> 64, id & u128::from(u64::MAX));
    }

    #[test]
    fn the_marks_of_a_batch_are_read_back_and_a_cut_batch_ends_them() {
        let mut batch = Vec::new();
        // An entry without a mark and one row, then one with the mark "m/1" and two rows.
        batch.push(0);
        batch.extend_from_slice(&1_u32.to_le_bytes());
        batch.extend_from_slice(&[7; 16]);
        batch.push(1);
        batch.extend_from_slice(&3_u32.to_le_bytes());
        batch.extend_from_slice(b"m/1");
        batch.extend_from_slice(&2_u32.to_le_bytes());
        batch.extend_from_slice(&[9; 32]);
        let marks: Vec<&[u8]> = Entries(&batch).collect();
        assert_eq!(marks, [b"m/1".as_slice()]);
        for cut in 0..batch.len() {
            // Never a panic, never more marks than there are.
            assert!(Entries(batch.get(..cut).unwrap_or_default()).count() <= 1);
        }
    }

    #[test]
    fn a_newline_or_a_tab_is_found_at_every_place_and_no_other_byte_is_taken_for_one() {
        for len in 0..40 {
            let clean: Vec<u8> = (0..len)
                .map(|i| b"a/\x0b\x08\x0a\x09\x00\xff"[i % 8] ^ 0x40)
                .collect();
            assert!(!has_newline_or_tab(&clean), "{clean:?}");
            for at in 0..len {
                for odd in [b'\n', b'\t'] {
                    let mut with = clean.clone();
                    with[at] = odd;
                    assert!(has_newline_or_tab(&with), "{with:?}");
                }
            }
        }
        // Every byte but the two, next to each other and across a word's edge.
        let all: Vec<u8> = (0..=255).filter(|b| *b != b'\n' && *b != b'\t').collect();
        for shift in 0..8 {
            assert!(!has_newline_or_tab(&all[shift..]));
        }
    }

    #[test]
    fn names_past_the_short_list_and_long_ones_keep_their_ids() {
        let mut names = Names::default();
        let mut all: Vec<String> = (0..SHORT_NAMES + 4).map(|i| format!("f{i}")).collect();
        all.push("a name longer than sixteen bytes".to_owned());
        all.push("sum".to_owned());
        all.push("sum\0".to_owned());
        all.push(String::new());
        for (id, name) in all.iter().enumerate() {
            assert_eq!(names.get(name), None, "{name:?}");
            names.insert(name, id as u32);
        }
        for (id, name) in all.iter().enumerate() {
            assert_eq!(names.get(name), Some(id as u32), "{name:?}");
        }
        assert_eq!(names.get("su"), None);
        assert_eq!(names.get("f"), None);
    }

    #[test]
    fn a_copy_of_fields_adds_to_each_and_reads_back_as_the_map_it_was_made_from() {
        let mut map = std::collections::BTreeMap::new();
        for i in 0..SHORT_NAMES + 3 {
            map.insert(format!("f{i}"), i as f64);
        }
        map.insert("a field name of more than sixteen bytes".to_owned(), 0.5);
        let mut copy: FieldCopy = map.iter().map(|(f, v)| (f.clone(), *v)).collect();
        assert_eq!(copy.to_map(), map);
        for (name, value) in map.iter_mut() {
            copy.add(name, 2.0);
            *value += 2.0;
        }
        copy.add("new", -1.0);
        map.insert("new".to_owned(), -1.0);
        assert_eq!(copy.to_map(), map);
        assert_eq!(copy.get("f0"), Some(2.0));
        assert_eq!(copy.get("f10"), Some(12.0));
        assert_eq!(copy.get("f"), None);
    }

    #[test]
    fn a_name_is_padded_to_sixteen_bytes_at_every_length() {
        let name = "abcdefghijklmnopq";
        for len in 0..=name.len() {
            let cut = &name[..len];
            let mut expected = [0; 16];
            if len <= 16 {
                expected[..len].copy_from_slice(cut.as_bytes());
                assert_eq!(padded(cut), Some(expected), "{cut:?}");
            } else {
                assert_eq!(padded(cut), None);
            }
        }
    }
}
