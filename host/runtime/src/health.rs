//! Per-plugin health: the circuit breaker, and the in-flight markers the watchdog scans for
//! overdue calls.
//!
//! The call path pays, when the breaker is closed: one relaxed load of the breaker's state, one
//! relaxed load of the coarse clock and five relaxed stores to mark the call in flight (start
//! time and method name, in the calling thread's own marker), one store to clear the marker, and
//! one relaxed load of the failure count after a success; a call the statistics do not time
//! loads the coarse clock once more at its end ([`Entry::untimed_lower_bound_nanos`]). No lock,
//! no allocation, no read-modify-write except on a failure or on a thread past the first
//! [`MARKERS`] - 1.

use std::sync::LazyLock;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Consecutive failures that open a breaker, by default.
pub const DEFAULT_FAILURES: u32 = 5;
/// How long a breaker stays open before a trial call, by default (milliseconds).
pub const DEFAULT_COOLDOWN_MS: u64 = 30_000;
/// How long a call may run before the watchdog reports it, by default (milliseconds).
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// In-flight markers per plugin: one per statistics shard, so a thread that owns a shard owns
/// the marker of the same index and writes it with plain stores; threads sharing the last shard
/// take the last marker with a compare-and-swap when it is free (and go unmarked when not).
pub(crate) const MARKERS: usize = crate::stats::SHARDS;
const SHARED_MARKER: usize = MARKERS - 1;
/// No marker taken.
const NO_MARKER: u8 = u8::MAX;
/// Bytes of the method name a marker keeps (longer names are cut).
pub(crate) const METHOD_BYTES: usize = 32;
/// Set in a marker's start once the watchdog has reported the call.
const REPORTED: u64 = 1 << 63;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// The process's millisecond clock: a precise reading for the breaker's cold paths, and a coarse
/// one (kept by the watchdogs, read with one relaxed load) that stamps calls in flight.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
static COARSE_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the process's epoch, read now.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX >> 2)
}

/// The coarse clock's ticks, kept so that a call the statistics did not time can tell, from
/// the ticks it saw, how long it ran at least. Each tick is kept with the time by which it was
/// published (the clock read again after the publish, rounded up): a call that began before a
/// tick was published began before that time, so the bound is the call's last reading minus
/// it, never more than the call took, however late the watchdog published its reading.
///
/// Three rings of 64: every tick (about 3 s of a watchdog's ticks), the first tick of every
/// 2.048 s (about 2 minutes) and of every 131 s (about 2.3 hours), so that a call of any length
/// gets a bound (within about 2 s of its length up to 2 minutes, 2 minutes up to 2 hours, and
/// at least 2 hours beyond), with any number of hosts' watchdogs ticking the one clock.
struct Ticks {
    rings: [[AtomicU64; TICKS_KEPT]; TICK_LEVELS],
    next: [AtomicUsize; TICK_LEVELS],
}

const TICKS_KEPT: usize = 64;
const TICK_LEVELS: usize = 3;
/// A ring above the first keeps the first tick after each multiple of its span (ms, shifts).
const LEVEL_SHIFTS: [u32; TICK_LEVELS] = [0, 11, 17];
/// A kept tick: its reading in the high bits, the milliseconds from it to its publish (rounded
/// up) in the low [`DELAY_BITS`] (all ones: too late to use, skipped).
const DELAY_BITS: u32 = 24;
const DELAY_MASK: u64 = (1 << DELAY_BITS) - 1;

static TICKS: Ticks = Ticks::new();

impl Ticks {
    const fn new() -> Self {
        Ticks {
            rings: [const { [const { AtomicU64::new(0) }; TICKS_KEPT] }; TICK_LEVELS],
            next: [const { AtomicUsize::new(0) }; TICK_LEVELS],
        }
    }

    /// Keeps the tick `reading`, published by `published` (both ms), that followed `before`.
    fn keep(&self, before: u64, reading: u64, published: u64) {
        let delay = published.saturating_sub(reading).min(DELAY_MASK);
        let Some(kept) = reading
            .checked_shl(DELAY_BITS)
            .filter(|k| k >> DELAY_BITS == reading)
        else {
            return;
        };
        for ((shift, next), ring) in LEVEL_SHIFTS.iter().zip(&self.next).zip(&self.rings) {
            // The first ring keeps every tick (shift 0: the reading moved).
            if before >> shift == reading >> shift {
                break;
            }
            let at = next.fetch_add(1, Relaxed) % TICKS_KEPT;
            ring[at].store(kept | delay, Relaxed);
        }
    }

    /// A lower bound (ms) of the length of a call that read the coarse clock `began` at its
    /// start and `ended` (later) at its end: `ended` minus the earliest publish time of a tick
    /// after `began`; 0 when none is kept (or it is not below `ended`).
    fn bound(&self, began: u64, ended: u64) -> u64 {
        self.rings
            .iter()
            .flatten()
            .map(|tick| tick.load(Relaxed))
            .filter(|&tick| {
                let (reading, delay) = (tick >> DELAY_BITS, tick & DELAY_MASK);
                reading > began && reading <= ended && delay != DELAY_MASK
            })
            .map(|tick| (tick >> DELAY_BITS) + (tick & DELAY_MASK))
            .min()
            .map_or(0, |published| ended.saturating_sub(published))
    }
}

/// Brings the coarse clock forward (the watchdog's tick).
pub(crate) fn tick() -> u64 {
    let now = now_ms();
    let before = COARSE_MS.fetch_max(now, Relaxed);
    if before < now {
        // Read after the publish (and rounded up): a call that saw an older reading began
        // before this.
        TICKS.keep(before, now, now_ms() + 1);
    }
    now
}

/// [`Ticks::bound`] over the process's ticks.
#[cold]
fn ticks_seen_ms(began: u64, ended: u64) -> u64 {
    TICKS.bound(began, ended)
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Marker {
    /// 0 when free; else the coarse start time + 1, with [`REPORTED`] once reported.
    started: AtomicU64,
    /// The call's own deadline (a hook subscription's `timeoutMs`); 0 = the plugin's.
    timeout_ms: AtomicU64,
    method: [AtomicU64; METHOD_BYTES / 8],
}

impl Marker {
    /// The deadline of the call in this marker.
    fn timeout(&self, plugin_timeout: u64) -> u64 {
        match self.timeout_ms.load(Relaxed) {
            0 => plugin_timeout,
            own => own,
        }
    }
}

/// A method's name as an in-flight marker holds it: its first [`METHOD_BYTES`] bytes,
/// zero-padded, in words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MarkerName([u64; METHOD_BYTES / 8]);

impl MarkerName {
    /// The marker's form of `method` (cut to [`METHOD_BYTES`]).
    #[inline]
    pub(crate) fn new(method: &str) -> Self {
        let mut bytes = [0u8; METHOD_BYTES];
        let n = method.len().min(METHOD_BYTES);
        bytes[..n].copy_from_slice(&method.as_bytes()[..n]);
        let mut words = [0u64; METHOD_BYTES / 8];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(chunk);
            *word = u64::from_ne_bytes(eight);
        }
        MarkerName(words)
    }
}

/// A call admitted by [`Health::begin`]; hand it back to [`Health::end`].
#[derive(Debug)]
pub(crate) struct Entry {
    marker: u8,
    /// The thread's crash site, pointing at this call until dropped (also when a panic
    /// unwinds past the call, so the site never outlives the call).
    _site: crate::crash::CallSiteGuard,
    trial: bool,
    /// The marker holds a deadline of its own, cleared at the end.
    own_timeout: bool,
    /// The coarse clock when the call began (also when no marker was taken).
    began_ms: u64,
}

impl Entry {
    /// For a call the statistics did not time: a lower bound of its length in nanoseconds
    /// from the watchdog's coarse clock, 0 unless the call saw at least two of its ticks
    /// (one relaxed load and a comparison while the clock has not moved).
    #[inline]
    pub(crate) fn untimed_lower_bound_nanos(&self) -> u64 {
        let now = COARSE_MS.load(Relaxed);
        if now == self.began_ms {
            return 0;
        }
        ticks_seen_ms(self.began_ms, now).saturating_mul(1_000_000)
    }
}

/// A call the breaker refused.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused;

/// Health of one plugin name, kept across its generations like its statistics.
#[derive(Debug)]
pub(crate) struct Health {
    state: AtomicU8,
    /// Consecutive failures.
    failures: AtomicU32,
    /// Failures that open the breaker; 0 = breaker off.
    threshold: AtomicU32,
    cooldown_ms: AtomicU64,
    timeout_ms: AtomicU64,
    opened_at: AtomicU64,
    times_opened: AtomicU64,
    refused: AtomicU64,
    timeouts: AtomicU64,
    /// Lifecycle entries (`create`, `destroy`, `save_state`, `restore_state`) abandoned past
    /// their deadline and still running.
    stuck: AtomicU32,
    /// The plugin's name, zero-padded, for the crash handler (which cannot allocate).
    name: [AtomicU64; 8],
    /// The plugin runs isolated: a call past its deadline is ended by killing its process, not
    /// reported by the watchdog.
    preemptive: std::sync::atomic::AtomicBool,
    markers: [Marker; MARKERS],
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            threshold: AtomicU32::new(DEFAULT_FAILURES),
            cooldown_ms: AtomicU64::new(DEFAULT_COOLDOWN_MS),
            timeout_ms: AtomicU64::new(DEFAULT_TIMEOUT_MS),
            opened_at: AtomicU64::new(0),
            times_opened: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            stuck: AtomicU32::new(0),
            name: Default::default(),
            preemptive: std::sync::atomic::AtomicBool::new(false),
            markers: Default::default(),
        }
    }
}

/// A plugin's breaker and deadline state, as [`LoadedPlugin`](crate::LoadedPlugin) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginHealth {
    /// `closed`, `open`, `half-open`, or `off` (no breaker configured).
    pub breaker: &'static str,
    /// Failures in a row since the last success.
    pub consecutive_failures: u32,
    /// How many times the breaker opened.
    pub times_opened: u64,
    /// Calls and hook deliveries refused while it was open.
    pub calls_refused: u64,
    /// Calls the watchdog found past their deadline.
    pub timeouts: u64,
    /// Calls in flight now past their deadline.
    pub overdue_calls: u32,
    /// The deadline of a call, in milliseconds.
    pub timeout_ms: u64,
    /// Lifecycle entries (`destroy`, `save_state`, `restore_state`) abandoned past their
    /// deadline that have not returned yet.
    pub stuck_entries: u32,
}

/// A call in flight, as the watchdog or a shutdown sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallInFlight {
    /// The plugin.
    pub plugin: String,
    /// The method or hook (cut to 32 bytes).
    pub method: String,
    /// How long it has been running.
    pub elapsed: Duration,
    /// Whether it is past its deadline.
    pub overdue: bool,
}

impl Health {
    /// Applies a plugin's configuration: `None` switches the breaker off.
    pub(crate) fn configure(&self, name: &str, breaker: Option<(u32, u64)>, timeout_ms: u64) {
        let mut bytes = [0u8; 64];
        let n = name.len().min(bytes.len());
        bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        for (word, chunk) in self.name.iter().zip(bytes.chunks_exact(8)) {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(chunk);
            word.store(u64::from_ne_bytes(eight), Relaxed);
        }
        let (threshold, cooldown) = breaker.unwrap_or((0, DEFAULT_COOLDOWN_MS));
        self.threshold.store(threshold, Relaxed);
        self.cooldown_ms.store(cooldown, Relaxed);
        self.timeout_ms.store(timeout_ms.max(1), Relaxed);
        if threshold == 0 {
            self.state.store(CLOSED, Release);
        }
    }

    /// Whether calls past their deadline are ended by the host (an isolated plugin) rather than
    /// reported by the watchdog.
    pub(crate) fn set_preemptive(&self, preemptive: bool) {
        self.preemptive.store(preemptive, Relaxed);
    }

    /// Admits a call of `method` from the thread of statistics shard `shard`, or refuses it
    /// when the breaker is open.
    #[inline]
    pub(crate) fn begin(&self, method: &str, shard: usize) -> Result<Entry, Refused> {
        self.begin_named(&MarkerName::new(method), shard)
    }

    /// [`begin`](Self::begin) with the method's name already in the marker's form (a method
    /// handle keeps it).
    #[inline]
    pub(crate) fn begin_named(&self, method: &MarkerName, shard: usize) -> Result<Entry, Refused> {
        let trial = if self.state.load(Relaxed) == CLOSED {
            false
        } else {
            self.admit()?
        };
        let began_ms = COARSE_MS.load(Relaxed);
        let marker = self.mark(method, shard, began_ms + 1);
        Ok(Entry {
            marker,
            _site: crate::crash::CallSiteGuard::enter(self, marker),
            trial,
            own_timeout: false,
            began_ms,
        })
    }

    /// [`begin`](Self::begin) for a call with a deadline of its own (`timeout_ms`, not 0), such
    /// as a hook subscription's.
    pub(crate) fn begin_within(
        &self,
        method: &MarkerName,
        shard: usize,
        timeout_ms: u64,
    ) -> Result<Entry, Refused> {
        let mut entry = self.begin_named(method, shard)?;
        if entry.marker != NO_MARKER && timeout_ms != 0 {
            self.markers[usize::from(entry.marker)]
                .timeout_ms
                .store(timeout_ms, Relaxed);
            entry.own_timeout = true;
        }
        Ok(entry)
    }

    /// Ends a call [`begin`](Self::begin) admitted; `failed` for an error, a panic or invalid
    /// JSON back.
    #[inline]
    pub(crate) fn end(&self, entry: Entry, failed: bool, plugin: &str) {
        if entry.marker != NO_MARKER {
            let marker = &self.markers[usize::from(entry.marker)];
            if entry.own_timeout {
                marker.timeout_ms.store(0, Relaxed);
            }
            marker.started.store(0, Release);
        }
        if entry.trial {
            self.end_trial(failed, plugin);
        } else if failed {
            self.failed(plugin);
        } else if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }

    #[inline]
    fn mark(&self, method: &MarkerName, shard: usize, start: u64) -> u8 {
        let marker = &self.markers[shard];
        if shard == SHARED_MARKER {
            if marker
                .started
                .compare_exchange(0, start, Acquire, Relaxed)
                .is_err()
            {
                return NO_MARKER;
            }
        } else if marker.started.load(Relaxed) != 0 {
            // A nested call of the same plugin on this thread: the outer call's marker is the
            // older, and stays.
            return NO_MARKER;
        } else {
            marker.started.store(start, Relaxed);
        }
        for (word, value) in marker.method.iter().zip(method.0) {
            word.store(value, Relaxed);
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "shard < MARKERS, which is far below 255"
        )]
        let index = shard as u8;
        index
    }

    /// The breaker is not closed: a trial call after the cool-down, else refused.
    #[cold]
    fn admit(&self) -> Result<bool, Refused> {
        let state = self.state.load(Acquire);
        if state == OPEN
            && now_ms().saturating_sub(self.opened_at.load(Relaxed))
                >= self.cooldown_ms.load(Relaxed)
            // A plugin still stuck in a call gets no trial: it would be stuck too.
            && self.overdue() == 0
            && self.stuck.load(Relaxed) == 0
            && self
                .state
                .compare_exchange(OPEN, HALF_OPEN, AcqRel, Relaxed)
                .is_ok()
        {
            return Ok(true);
        }
        if state == CLOSED {
            return Ok(false);
        }
        self.refused.fetch_add(1, Relaxed);
        Err(Refused)
    }

    #[cold]
    fn failed(&self, plugin: &str) {
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        let threshold = self.threshold.load(Relaxed);
        if threshold != 0 && failures >= threshold && self.open(CLOSED) {
            tracing::warn!(
                plugin,
                failures,
                cooldown_ms = self.cooldown_ms.load(Relaxed),
                "circuit breaker open: calls answer nothing until a trial call after the cool-down"
            );
        }
    }

    #[cold]
    fn end_trial(&self, failed: bool, plugin: &str) {
        if failed {
            self.failures.fetch_add(1, Relaxed);
            if self.open(HALF_OPEN) {
                tracing::warn!(
                    plugin,
                    cooldown_ms = self.cooldown_ms.load(Relaxed),
                    "circuit breaker open again: the trial call failed"
                );
            }
        } else {
            self.failures.store(0, Relaxed);
            if self
                .state
                .compare_exchange(HALF_OPEN, CLOSED, AcqRel, Relaxed)
                .is_ok()
            {
                tracing::info!(plugin, "circuit breaker closed: the trial call succeeded");
            }
        }
    }

    /// Opens the breaker if it is in state `from`; whether it did.
    fn open(&self, from: u8) -> bool {
        if self.threshold.load(Relaxed) == 0 {
            return false;
        }
        self.opened_at.store(now_ms(), Relaxed);
        if self
            .state
            .compare_exchange(from, OPEN, AcqRel, Relaxed)
            .is_ok()
        {
            self.times_opened.fetch_add(1, Relaxed);
            true
        } else {
            false
        }
    }

    /// Calls in flight now past their deadline.
    fn overdue(&self) -> u32 {
        let now = now_ms();
        let timeout = self.timeout_ms.load(Relaxed);
        let count = self
            .markers
            .iter()
            .filter(|m| {
                let started = m.started.load(Acquire);
                started != 0 && now.saturating_sub((started & !REPORTED) - 1) > m.timeout(timeout)
            })
            .count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Whether the breaker is open (or half-open), or a call is overdue.
    pub(crate) fn degraded(&self) -> bool {
        self.state.load(Acquire) != CLOSED || self.overdue() != 0 || self.stuck() != 0
    }

    /// The deadline of a call, in milliseconds.
    pub(crate) fn timeout_ms(&self) -> u64 {
        self.timeout_ms.load(Relaxed)
    }

    /// Lifecycle entries abandoned past their deadline and still running.
    pub(crate) fn stuck(&self) -> u32 {
        self.stuck.load(Acquire)
    }

    /// A lifecycle entry (`destroy`, `save_state`, ...) overran its deadline and was abandoned:
    /// logged, counted as a timeout, and the breaker opened, as for a call.
    #[cold]
    pub(crate) fn entry_overran(
        &self,
        plugin: &str,
        entry: &str,
        elapsed_ms: u64,
        timeout_ms: u64,
    ) {
        self.timeouts.fetch_add(1, Relaxed);
        self.failures.fetch_add(1, Relaxed);
        let state = self.state.load(Acquire);
        let opened = state != OPEN && self.open(state);
        tracing::warn!(
            plugin,
            entry,
            elapsed_ms,
            timeout_ms,
            breaker = if opened {
                "opened"
            } else if self.threshold.load(Relaxed) == 0 {
                "off"
            } else {
                "open"
            },
            "plugin entry overran its deadline; abandoned: it runs on in the background, and the worker goes on without it"
        );
    }

    /// One more entry counts as stuck (before it is known abandoned).
    pub(crate) fn stuck_more(&self) {
        self.stuck.fetch_add(1, AcqRel);
    }

    /// One entry less counts as stuck.
    pub(crate) fn stuck_less(&self) {
        self.stuck.fetch_sub(1, AcqRel);
    }

    /// An abandoned lifecycle entry returned after all.
    #[cold]
    pub(crate) fn entry_returned(&self, plugin: &str, entry: &str, elapsed_ms: u64) {
        self.stuck_less();
        tracing::info!(
            plugin,
            entry,
            elapsed_ms,
            "an abandoned plugin entry returned; its result was dropped"
        );
    }

    /// The calls in flight now.
    pub(crate) fn in_flight(&self, plugin: &str) -> Vec<CallInFlight> {
        let now = now_ms();
        let timeout = self.timeout_ms.load(Relaxed);
        self.markers
            .iter()
            .filter_map(|m| {
                let started = m.started.load(Acquire);
                if started == 0 {
                    return None;
                }
                let method = read_method(m);
                // The call may have ended and another begun while the name was read.
                if m.started.load(Acquire) != started {
                    return None;
                }
                let elapsed = now.saturating_sub((started & !REPORTED) - 1);
                Some(CallInFlight {
                    plugin: plugin.to_owned(),
                    method,
                    elapsed: Duration::from_millis(elapsed),
                    overdue: elapsed > m.timeout(timeout),
                })
            })
            .collect()
    }

    /// The watchdog's look at this plugin: each call past its deadline is reported once (logged,
    /// counted as a timeout) and opens the breaker.
    pub(crate) fn watch(&self, plugin: &str, now: u64) {
        if self.preemptive.load(Relaxed) {
            return;
        }
        let plugin_timeout = self.timeout_ms.load(Relaxed);
        for marker in &self.markers {
            let started = marker.started.load(Acquire);
            if started == 0 || started & REPORTED != 0 {
                continue;
            }
            let timeout = marker.timeout(plugin_timeout);
            let elapsed = now.saturating_sub(started - 1);
            if elapsed <= timeout {
                continue;
            }
            let method = read_method(marker);
            if marker
                .started
                .compare_exchange(started, started | REPORTED, AcqRel, Relaxed)
                .is_err()
            {
                continue;
            }
            self.timeouts.fetch_add(1, Relaxed);
            self.failures.fetch_add(1, Relaxed);
            let state = self.state.load(Acquire);
            let opened = state != OPEN && self.open(state);
            tracing::warn!(
                plugin,
                method = %crate::text::EscapeControl(&method),
                elapsed_ms = elapsed,
                timeout_ms = timeout,
                breaker = if opened { "opened" } else if self.threshold.load(Relaxed) == 0 { "off" } else { "open" },
                "plugin call overdue: it cannot be interrupted in-process; no new call enters the plugin while the breaker is open"
            );
        }
    }

    /// What [`PluginHealth`] reports.
    pub(crate) fn snapshot(&self) -> PluginHealth {
        let breaker = if self.threshold.load(Relaxed) == 0 {
            "off"
        } else {
            match self.state.load(Acquire) {
                OPEN => "open",
                HALF_OPEN => "half-open",
                _ => "closed",
            }
        };
        PluginHealth {
            breaker,
            consecutive_failures: self.failures.load(Relaxed),
            times_opened: self.times_opened.load(Relaxed),
            calls_refused: self.refused.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            overdue_calls: self.overdue(),
            timeout_ms: self.timeout_ms.load(Relaxed),
            stuck_entries: self.stuck(),
        }
    }
}

impl Health {
    /// The plugin's name, zero-padded (async-signal-safe: relaxed loads only).
    pub(crate) fn name_bytes(&self, out: &mut [u8; 64]) {
        for (word, chunk) in self.name.iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&word.load(Relaxed).to_ne_bytes());
        }
    }

    /// The method in marker `marker`, zero-padded; `false` for no marker (async-signal-safe).
    pub(crate) fn method_bytes(&self, marker: u8, out: &mut [u8; METHOD_BYTES]) -> bool {
        let Some(marker) = self.markers.get(usize::from(marker)) else {
            return false;
        };
        for (word, chunk) in marker.method.iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&word.load(Relaxed).to_ne_bytes());
        }
        true
    }
}

fn read_method(marker: &Marker) -> String {
    let mut bytes = Vec::with_capacity(METHOD_BYTES);
    for word in &marker.method {
        bytes.extend_from_slice(&word.load(Relaxed).to_ne_bytes());
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_a_trial_success_closes() {
        let health = Health::default();
        health.configure("p", Some((3, 0)), 1_000);
        for _ in 0..3 {
            let entry = health.begin("m", 0).unwrap();
            health.end(entry, true, "p");
        }
        assert_eq!(health.snapshot().breaker, "open");
        // Cool-down 0: the next call is the trial; others are refused meanwhile.
        let trial = health.begin("m", 0).unwrap();
        assert!(trial.trial);
        assert!(health.begin("m", 1).is_err());
        health.end(trial, true, "p");
        assert_eq!(health.snapshot().breaker, "open");
        assert_eq!(health.snapshot().times_opened, 2);
        let trial = health.begin("m", 0).unwrap();
        health.end(trial, false, "p");
        let snapshot = health.snapshot();
        assert_eq!(snapshot.breaker, "closed");
        assert_eq!(snapshot.calls_refused, 1);
        assert_eq!(snapshot.consecutive_failures, 0);
    }

    #[test]
    fn a_success_resets_the_count_and_off_never_opens() {
        let health = Health::default();
        health.configure("p", Some((2, 60_000)), 1_000);
        for failed in [true, false, true, false] {
            let entry = health.begin("m", 0).unwrap();
            health.end(entry, failed, "p");
        }
        assert_eq!(health.snapshot().breaker, "closed");
        health.configure("p", None, 1_000);
        for _ in 0..10 {
            let entry = health.begin("m", 0).unwrap();
            health.end(entry, true, "p");
        }
        assert_eq!(health.snapshot().breaker, "off");
        assert!(health.begin("m", 0).is_ok());
    }

    /// A call that saw two ticks of the coarse clock gets a lower bound of its length from
    /// them; one that saw one tick or none, none (it may have been short).
    #[test]
    fn an_untimed_call_is_bounded_by_the_ticks_it_saw() {
        let ticks = Ticks::new();
        for (before, reading) in [(0, 100), (100, 150), (150, 200), (200, 250)] {
            ticks.keep(before, reading, reading + 1);
        }
        assert_eq!(ticks.bound(120, 250), 99);
        assert_eq!(ticks.bound(99, 150), 49);
        assert_eq!(ticks.bound(220, 250), 0, "one tick");
        assert_eq!(ticks.bound(250, 250), 0, "none");
        assert_eq!(ticks.bound(10, 250), 149);

        // Through the real clock (other hosts' watchdogs may tick too, in a test run that
        // shares the process: only what holds whatever they do is asserted).
        let health = Health::default();
        tick();
        let long = health.begin("m", 0).unwrap();
        let began = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        let first = tick();
        std::thread::sleep(Duration::from_millis(60));
        let last = tick();
        let bound = long.untimed_lower_bound_nanos();
        // From the first tick's publish (its reading rounded up, read again after it).
        assert!(
            bound >= (last - first).saturating_sub(2) * 1_000_000,
            "{bound}"
        );
        assert!(bound >= 57_000_000, "{bound}");
        // A lower bound: never more than the call took (to the millisecond of the clock).
        assert!(
            u128::from(bound) <= began.elapsed().as_nanos() + 1_000_000,
            "{bound}"
        );
        health.end(long, false, "p");
    }

    #[test]
    fn markers_name_the_method_and_clear() {
        let health = Health::default();
        let entry = health
            .begin("a_rather_long_method_name_over_32_bytes", 3)
            .unwrap();
        let calls = health.in_flight("p");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].method, "a_rather_long_method_name_over_3");
        health.end(entry, false, "p");
        assert!(health.in_flight("p").is_empty());
    }

    /// A watchdog that read the clock at 100 and published only at 400 (descheduled in
    /// between): a call that began at 350, while the clock still read 50, and ended at 450
    /// took 100 ms; its bound is at most that (the old bound, from the reading, was 350).
    #[test]
    fn a_late_publish_never_makes_the_bound_too_high() {
        let ticks = Ticks::new();
        ticks.keep(0, 50, 51);
        ticks.keep(50, 100, 401);
        ticks.keep(100, 450, 451);
        let bound = ticks.bound(50, 450);
        assert!(bound <= 100, "{bound}");
        assert_eq!(bound, 49);
    }

    /// A call of 30 s (600 ticks, far more than one ring keeps) is bounded within about 2 s
    /// of its length; one of 3 hours, by more than 2 hours.
    #[test]
    fn a_call_longer_than_a_ring_is_still_bounded() {
        let ticks = Ticks::new();
        let mut before = 1_000;
        for reading in (1_050..=31_000).step_by(50) {
            ticks.keep(before, reading, reading + 1);
            before = reading;
        }
        let bound = ticks.bound(1_000, 31_000);
        assert!((27_500..=30_000).contains(&bound), "{bound}");
        let ticks = Ticks::new();
        let mut before = 0;
        for reading in (50..=3 * 3_600_000).step_by(50) {
            ticks.keep(before, reading, reading + 1);
            before = reading;
        }
        let bound = ticks.bound(0, 3 * 3_600_000);
        assert!(bound > 2 * 3_600_000 && bound <= 3 * 3_600_000, "{bound}");
    }
}
