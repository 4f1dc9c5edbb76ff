//! Per-plugin call statistics, kept with atomics so that recording never takes a lock.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::Duration;

use serde::Serialize;

/// Counter shards per plugin. Each of the first `OWNED` belongs to one thread at a time, which
/// updates it with plain loads and stores: no locked instruction on the call path. Threads
/// beyond that share the last shard and update it with atomic read-modify-writes.
pub(crate) const SHARDS: usize = 16;
const OWNED: usize = SHARDS - 1;
const SHARED: usize = SHARDS - 1;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    calls: AtomicU64,
    errors: AtomicU64,
    panics: AtomicU64,
    total_ticks: AtomicU64,
    max_ticks: AtomicU64,
}

/// Counters of one plugin, summed over all its generations since it was first loaded, and its
/// health (breaker, calls in flight), kept the same way. Latency is kept in clock ticks and
/// converted when read.
#[derive(Debug, Default)]
pub(crate) struct StatsCell {
    shards: [Shard; SHARDS],
    pub(crate) health: crate::health::Health,
    /// Latency histograms per method and per hook point, made at load (never on the call
    /// path) and kept across reloads.
    latencies: std::sync::Mutex<Vec<Keyed>>,
}

/// A latency histogram and what it times.
type Keyed = (CallKind, Box<str>, Arc<Latency>);

/// What a latency histogram times: calls of one method, or deliveries of one hook point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallKind {
    /// Method calls.
    Method,
    /// Hook deliveries.
    Hook,
}

impl CallKind {
    /// `method` or `hook`.
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Method => "method",
            CallKind::Hook => "hook",
        }
    }
}

/// Finite buckets of a latency histogram. Bucket `i` holds calls of at most `2^(10 + i)` ns
/// (1.024 us, 2.048 us, ... 2^33 ns = 8.6 s); one more bucket holds longer calls. Powers of two
/// so that the bucket is found from the leading zeros of the time, without a search.
pub const LATENCY_BUCKETS: usize = 24;
const FIRST_BUCKET_BITS: u32 = 10;

/// The upper bound of finite bucket `i`, in seconds.
pub fn latency_bucket_bound(i: usize) -> f64 {
    (1u64 << (FIRST_BUCKET_BITS as usize + i)) as f64 * 1e-9
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct LatencyShard {
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_nanos: AtomicU64,
}

/// A latency histogram with fixed log-scale buckets, kept in per-thread shards like the
/// counters: recording is a few plain loads and stores, no lock and no locked instruction.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    shards: [LatencyShard; SHARDS],
}

impl Latency {
    /// Counts one call of `nanos` in shard `index` ([`thread_shard`]).
    #[inline]
    pub(crate) fn record_at(&self, index: usize, nanos: u64) {
        let owned = index != SHARED;
        let shard = &self.shards[index];
        let bits = u64::BITS - ((nanos.saturating_sub(1)) >> FIRST_BUCKET_BITS).leading_zeros();
        let bucket = (bits as usize).min(LATENCY_BUCKETS);
        add(&shard.buckets[bucket], 1, owned);
        add(&shard.sum_nanos, nanos, owned);
    }

    fn snapshot(&self) -> ([u64; LATENCY_BUCKETS + 1], u64) {
        let mut buckets = [0u64; LATENCY_BUCKETS + 1];
        let mut sum = 0u64;
        for shard in &self.shards {
            for (total, bucket) in buckets.iter_mut().zip(&shard.buckets) {
                *total += bucket.load(Relaxed);
            }
            sum = sum.wrapping_add(shard.sum_nanos.load(Relaxed));
        }
        (buckets, sum)
    }
}

/// The latency histogram of one method or hook point of one plugin, since it was first loaded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyHistogram {
    /// Method calls or hook deliveries.
    pub kind: CallKind,
    /// The method's or the hook point's name.
    pub name: String,
    /// Calls per bucket (not cumulative): bucket `i < LATENCY_BUCKETS` holds calls of at most
    /// [`latency_bucket_bound(i)`](latency_bucket_bound) seconds, the last one longer calls.
    pub buckets: Vec<u64>,
    /// Time spent in those calls, in seconds.
    pub sum_seconds: f64,
}

impl LatencyHistogram {
    /// Calls counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// How a call ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Error,
    Panic,
}

/// Which shards are owned by a live thread: bit `i` for shard `i < OWNED`.
static CLAIMED: AtomicU64 = AtomicU64::new(0);

/// A thread's shard, released when the thread exits so that another thread can own it.
struct Claim(usize);

impl Claim {
    fn take() -> Claim {
        let mut claimed = CLAIMED.load(Relaxed);
        loop {
            let free = !claimed & ((1u64 << OWNED) - 1);
            if free == 0 {
                return Claim(SHARED);
            }
            let index = free.trailing_zeros() as usize;
            // Acquire: the thread that owned this shard before released it (below) after its
            // last update, so this thread's plain loads see those updates.
            match CLAIMED.compare_exchange_weak(claimed, claimed | 1 << index, Acquire, Relaxed) {
                Ok(_) => return Claim(index),
                Err(now) => claimed = now,
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.0 != SHARED {
            CLAIMED.fetch_and(!(1u64 << self.0), Release);
        }
    }
}

thread_local! {
    static CLAIM: Claim = Claim::take();
}

/// Adds to a counter of the calling thread's shard.
#[inline]
fn add(counter: &AtomicU64, n: u64, owned: bool) {
    if owned {
        // Only this thread writes this shard (see `Claim`); readers may see either value.
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    } else {
        counter.fetch_add(n, Relaxed);
    }
}

/// The calling thread's shard (and in-flight marker) index.
#[inline]
pub(crate) fn thread_shard() -> usize {
    // A thread whose thread-locals are already destroyed counts in the shared shard.
    CLAIM.try_with(|claim| claim.0).unwrap_or(SHARED)
}

impl StatsCell {
    /// Counts one call that took `ticks` of the host's clock (0 when calls are not timed), in
    /// shard `index` ([`thread_shard`]).
    #[inline]
    pub(crate) fn record_at(&self, index: usize, ticks: u64, outcome: Outcome) {
        let owned = index != SHARED;
        let shard = &self.shards[index];
        add(&shard.calls, 1, owned);
        if ticks != 0 {
            add(&shard.total_ticks, ticks, owned);
            if ticks > shard.max_ticks.load(Relaxed) {
                if owned {
                    shard.max_ticks.store(ticks, Relaxed);
                } else {
                    shard.max_ticks.fetch_max(ticks, Relaxed);
                }
            }
        }
        match outcome {
            Outcome::Ok => {}
            Outcome::Error => add(&shard.errors, 1, owned),
            Outcome::Panic => add(&shard.panics, 1, owned),
        }
    }

    /// The histogram of `kind` `name`, made on first use (at load, not on the call path).
    pub(crate) fn latency(&self, kind: CallKind, name: &str) -> Arc<Latency> {
        let mut latencies = self
            .latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, latency)) = latencies
            .iter()
            .find(|(k, n, _)| *k == kind && **n == *name)
        {
            return Arc::clone(latency);
        }
        let latency = Arc::new(Latency::default());
        latencies.push((kind, name.into(), Arc::clone(&latency)));
        latency
    }

    /// Every histogram with at least one call, by kind and name.
    pub(crate) fn latencies(&self) -> Vec<LatencyHistogram> {
        let latencies = self
            .latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut out: Vec<LatencyHistogram> = latencies
            .iter()
            .filter_map(|(kind, name, latency)| {
                let (buckets, sum) = latency.snapshot();
                (buckets.iter().any(|b| *b != 0)).then(|| LatencyHistogram {
                    kind: *kind,
                    name: name.to_string(),
                    buckets: buckets.to_vec(),
                    sum_seconds: sum as f64 * 1e-9,
                })
            })
            .collect();
        out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        out
    }

    pub(crate) fn snapshot(&self, clock: Option<&quanta::Clock>) -> PluginStats {
        let sum = |f: fn(&Shard) -> &AtomicU64| {
            self.shards.iter().map(|s| f(s).load(Relaxed)).sum::<u64>()
        };
        let max_ticks = self
            .shards
            .iter()
            .map(|s| s.max_ticks.load(Relaxed))
            .max()
            .unwrap_or(0);
        let to_duration = |ticks: u64| clock.map_or(Duration::ZERO, |c| c.delta(0, ticks));
        PluginStats {
            calls: sum(|s| &s.calls),
            errors: sum(|s| &s.errors),
            panics: sum(|s| &s.panics),
            total_latency: to_duration(sum(|s| &s.total_ticks)),
            max_latency: to_duration(max_ticks),
        }
    }
}

/// Call statistics of one plugin since it was first loaded (they survive reloads).
///
/// `errors` counts calls that failed in the plugin (an error, invalid params, invalid JSON
/// back); `panics` counts caught panics. A call to a method the plugin does not have counts as
/// a call only. Latencies stay zero when the host was built with
/// [`with_call_timing(false)`](crate::PluginHostBuilder::with_call_timing).
///
/// In JSON the latencies name their unit: `total_latency_us`, `mean_latency_us` and
/// `max_latency_us`, in microseconds rounded to the nanosecond.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginStats {
    /// Calls that reached the plugin, hook invocations included.
    pub calls: u64,
    /// Calls that ended in an error.
    pub errors: u64,
    /// Calls that panicked.
    pub panics: u64,
    /// Time spent in the plugin, summed.
    pub total_latency: Duration,
    /// The longest call.
    pub max_latency: Duration,
}

impl PluginStats {
    /// Mean time per call, zero before the first call.
    pub fn mean_latency(&self) -> Duration {
        match u32::try_from(self.calls) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.total_latency / n,
            Err(_) => Duration::from_nanos(
                u64::try_from(self.total_latency.as_nanos() / u128::from(self.calls)).unwrap_or(0),
            ),
        }
    }
}

impl Serialize for PluginStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut out = s.serialize_struct("PluginStats", 6)?;
        out.serialize_field("calls", &self.calls)?;
        out.serialize_field("errors", &self.errors)?;
        out.serialize_field("panics", &self.panics)?;
        out.serialize_field("total_latency_us", &micros(self.total_latency))?;
        out.serialize_field("mean_latency_us", &micros(self.mean_latency()))?;
        out.serialize_field("max_latency_us", &micros(self.max_latency))?;
        out.end()
    }
}

/// Microseconds with three decimals (whole nanoseconds): no binary-fraction noise in JSON.
fn micros(d: Duration) -> f64 {
    // Exact: nanoseconds below 2^53 are exact in f64, and one division by 1000 rounds once.
    d.as_nanos() as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two_of_nanoseconds() {
        let latency = Latency::default();
        for nanos in [1, 1024, 1025, 2048, 2049, 1 << 33, (1 << 33) + 1, u64::MAX] {
            latency.record_at(thread_shard(), nanos);
        }
        let (buckets, _) = latency.snapshot();
        assert_eq!(buckets[0], 2, "1 ns and 1024 ns are in the first bucket");
        assert_eq!(buckets[1], 2, "1025 and 2048 ns");
        assert_eq!(buckets[2], 1, "2049 ns");
        assert_eq!(buckets[LATENCY_BUCKETS - 1], 1, "2^33 ns");
        assert_eq!(buckets[LATENCY_BUCKETS], 2, "longer");
        assert!((latency_bucket_bound(0) - 1.024e-6).abs() < 1e-15);
    }

    /// More threads than owned shards, some alive at once and some after others exited (their
    /// shards reused): every count lands, none twice.
    #[test]
    fn counts_from_many_threads_are_exact() {
        let cell = StatsCell::default();
        for round in 0..3u64 {
            std::thread::scope(|scope| {
                for t in 0..(SHARDS as u64 + 9) {
                    let cell = &cell;
                    scope.spawn(move || {
                        for i in 0..2_000u64 {
                            let outcome = match i % 10 {
                                0 => Outcome::Error,
                                1 => Outcome::Panic,
                                _ => Outcome::Ok,
                            };
                            cell.record_at(thread_shard(), 1 + (i + t + round) % 7, outcome);
                        }
                        if t == 3 && round == 1 {
                            cell.record_at(thread_shard(), 1_000_000, Outcome::Ok);
                        }
                    });
                }
            });
        }
        let threads = 3 * (SHARDS as u64 + 9);
        let sum = |f: fn(&Shard) -> &AtomicU64| {
            cell.shards.iter().map(|s| f(s).load(Relaxed)).sum::<u64>()
        };
        assert_eq!(sum(|s| &s.calls), threads * 2_000 + 1);
        assert_eq!(sum(|s| &s.errors), threads * 200);
        assert_eq!(sum(|s| &s.panics), threads * 200);
        let expected_ticks: u64 = (0..3u64)
            .flat_map(|round| {
                (0..(SHARDS as u64 + 9))
                    .flat_map(move |t| (0..2_000u64).map(move |i| 1 + (i + t + round) % 7))
            })
            .sum();
        assert_eq!(sum(|s| &s.total_ticks), expected_ticks + 1_000_000);
        let max = cell.shards.iter().map(|s| s.max_ticks.load(Relaxed)).max();
        assert_eq!(max, Some(1_000_000));
    }
}
