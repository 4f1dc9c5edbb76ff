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
    /// Calls timed (one in [`Timing`]'s sample of each method and hook point; all of them
    /// with a sample of 1), and their time summed.
    timed: AtomicU64,
    timed_nanos: AtomicU64,
    /// The longest call timed, or the lower bound of a longer one that was not.
    max_nanos: AtomicU64,
}

/// The default call timing sample
/// ([`with_call_timing_sample`](crate::PluginHostBuilder::with_call_timing_sample)): one call
/// in 16 of each method and hook point is timed on each thread.
pub const DEFAULT_TIMING_SAMPLE: u32 = 16;
/// The largest call timing sample accepted.
pub const MAX_TIMING_SAMPLE: u32 = 1 << 16;

/// How a host times calls: the cycle-counter clock read at both ends of about one call in
/// `sample` of each method and hook point on each thread (each histogram counts its calls and
/// picks the next one to time at a random gap, see [`Latency::count_at`]), every call when
/// `sample` is 1.
#[derive(Debug, Clone)]
pub(crate) struct Timing {
    clock: quanta::Clock,
    /// The sample N: each call timed stands for N calls.
    pub(crate) sample: u64,
}

impl Timing {
    /// `sample` is a power of two up to [`MAX_TIMING_SAMPLE`] (checked where it is
    /// configured); another is rounded up to one, and a larger one taken as the largest (no
    /// overflow, whatever the value).
    pub(crate) fn new(clock: quanta::Clock, sample: u32) -> Self {
        Timing {
            clock,
            sample: u64::from(sample)
                .max(1)
                .next_power_of_two()
                .min(u64::from(MAX_TIMING_SAMPLE)),
        }
    }

    /// How many calls each call timed stands for: the sample.
    pub(crate) fn weight(&self) -> u64 {
        self.sample
    }

    /// A reading of the cycle counter, for [`nanos_since`](Self::nanos_since).
    #[inline]
    pub(crate) fn start(&self) -> u64 {
        self.clock.raw()
    }

    /// A reading now, and the nanoseconds since `started` (at least 1).
    #[inline]
    pub(crate) fn stop(&self, started: u64) -> (u64, u64) {
        let now = self.clock.raw();
        (now, self.clock.delta_as_nanos(started, now).max(1))
    }
}

/// Whether `sample` is a call timing sample the host takes
/// ([`with_call_timing_sample`](crate::PluginHostBuilder::with_call_timing_sample)): a power
/// of two from 1 to [`MAX_TIMING_SAMPLE`].
pub fn valid_timing_sample(sample: u32) -> bool {
    sample.is_power_of_two() && sample <= MAX_TIMING_SAMPLE
}

/// Counters of one plugin, summed over all its generations since it was first loaded, and its
/// health (breaker, calls in flight), kept the same way. Latency is kept in nanoseconds.
#[derive(Debug, Default)]
pub(crate) struct StatsCell {
    shards: [Shard; SHARDS],
    /// Counts calls of methods the plugin does not declare, to pick those to time (it has no
    /// histogram of its own: these calls count in the plugin's figures only).
    undeclared: Latency,
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
    /// Calls counted, timed or not (exact); the calls timed are picked from it.
    count: AtomicU64,
    /// The count at which the next call is timed, plus one (0 before the first is drawn).
    next: AtomicU64,
    /// The state of this shard's pseudo-random gaps (xorshift; 0 before it is seeded).
    random: AtomicU64,
    /// Calls by bucket, and their time summed, as far as the last call timed: each call
    /// timed stands for the calls counted since the one timed before it (the first, for the
    /// calls before it), which go into its bucket with its time.
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_nanos: AtomicU64,
    /// Calls timed.
    timed: AtomicU64,
    /// The count when the last call was timed (the calls the buckets hold), that call's
    /// bucket plus one (0: none yet) and its time: the calls counted since stand for now in
    /// its bucket, with its time, and go there when the next call is timed.
    covered: AtomicU64,
    last_bucket: AtomicU64,
    last_nanos: AtomicU64,
}

/// A latency histogram with fixed log-scale buckets, kept in per-thread shards like the
/// counters: recording is a few plain loads and stores, no lock and no locked instruction.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    shards: [LatencyShard; SHARDS],
}

impl LatencyShard {
    /// The call counted `before` reached the count due to be timed (or none is drawn yet,
    /// `due` 0): whether to time it, and the next count to time.
    #[cold]
    #[inline(never)]
    fn pick(&self, index: usize, before: u64, due: u64, sample: u64) -> bool {
        let sample = sample.max(1);
        let random = self.draw(index);
        let (timed, next) = if due == 0 {
            // The first: one of the first `sample` calls.
            let first = before + random % sample;
            (
                first == before,
                if first == before {
                    before + 1 + random % (sample.saturating_mul(2) - 1)
                } else {
                    first
                },
            )
        } else {
            (true, before + 1 + random % (sample.saturating_mul(2) - 1))
        };
        // `next` holds the count due plus one, so never 0 once drawn.
        let next = next.wrapping_add(1).max(1);
        if index != SHARED {
            self.next.store(next, Relaxed);
            timed
        } else {
            // Threads sharing this shard race for the pick: one wins it.
            self.next
                .compare_exchange(due, next, Relaxed, Relaxed)
                .is_ok()
                && timed
        }
    }

    /// A pseudo-random number from this shard's xorshift state, seeded per process and shard.
    fn draw(&self, index: usize) -> u64 {
        let mut x = self.random.load(Relaxed);
        if x == 0 {
            use std::hash::{BuildHasher as _, Hasher as _};
            let mut hasher = std::hash::RandomState::new().build_hasher();
            hasher.write_usize(std::ptr::from_ref(self) as usize);
            hasher.write_usize(index);
            x = hasher.finish() | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        // A lost update in the shared shard only repeats a gap.
        self.random.store(x, Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11
    }
}

impl Latency {
    /// Counts one call in shard `index` ([`thread_shard`]), and says whether to time it. Each
    /// shard times at random gaps of 1 to `2 * sample - 1` calls (`sample` on average), the
    /// first among its first `sample` calls: no call is timed for where it falls in a pattern
    /// that repeats (a slow call then a fast one, or the first call of each thread), so each
    /// call timed stands for `sample` calls in expectation. `sample` 1 times every call.
    #[inline]
    pub(crate) fn count_at(&self, index: usize, sample: u64) -> bool {
        let shard = &self.shards[index];
        let before = if index == SHARED {
            shard.count.fetch_add(1, Relaxed)
        } else {
            // Only this thread writes this shard (see `Claim`).
            let before = shard.count.load(Relaxed);
            shard.count.store(before.wrapping_add(1), Relaxed);
            before
        };
        if sample <= 1 {
            // Every call timed: no gap to draw.
            return true;
        }
        let due = shard.next.load(Relaxed);
        if before.wrapping_add(1) < due {
            return false;
        }
        shard.pick(index, before, due, sample)
    }

    /// Records the time of one call counted and picked by [`count_at`](Self::count_at), in
    /// shard `index`.
    ///
    /// The call stands for the calls this shard counted since the one timed before it (that
    /// one's bucket and time take them: they were counted while it was the last one timed),
    /// or, the first timed, for the calls before it. So every bucket and the sum only grow,
    /// and whatever the gaps (each drawn at random), the buckets add up to the calls counted.
    #[inline]
    pub(crate) fn record_at(&self, index: usize, nanos: u64) {
        let owned = index != SHARED;
        let shard = &self.shards[index];
        let bits = u64::BITS - ((nanos.saturating_sub(1)) >> FIRST_BUCKET_BITS).leading_zeros();
        let bucket = (bits as usize).min(LATENCY_BUCKETS);
        // Counted with this call already.
        let count = shard.count.load(Relaxed);
        let gap = count
            .saturating_sub(shard.covered.load(Relaxed))
            .saturating_sub(1);
        let (before, before_nanos) = match shard.last_bucket.load(Relaxed).checked_sub(1) {
            Some(last) => (
                usize::try_from(last).map_or(LATENCY_BUCKETS, |b| b.min(LATENCY_BUCKETS)),
                shard.last_nanos.load(Relaxed),
            ),
            None => (bucket, nanos),
        };
        add(&shard.buckets[before], gap, owned);
        add(&shard.sum_nanos, before_nanos.saturating_mul(gap), owned);
        add(&shard.buckets[bucket], 1, owned);
        add(&shard.sum_nanos, nanos, owned);
        add(&shard.timed, 1, owned);
        shard.last_nanos.store(nanos, Relaxed);
        shard.last_bucket.store(bucket as u64 + 1, Relaxed);
        shard.covered.store(count, Relaxed);
    }

    /// The calls counted, by bucket (each call timed standing for those counted since the one
    /// timed before it, the calls since the last one in its bucket, those before any timed
    /// beyond the last bucket), their time summed the same way, and the calls timed.
    fn snapshot(&self) -> ([u64; LATENCY_BUCKETS + 1], u64, u64) {
        let mut buckets = [0u64; LATENCY_BUCKETS + 1];
        let mut sum = 0u64;
        let mut timed = 0u64;
        for shard in &self.shards {
            let covered = shard.covered.load(Relaxed);
            let last = shard.last_bucket.load(Relaxed);
            let last_nanos = shard.last_nanos.load(Relaxed);
            for (total, bucket) in buckets.iter_mut().zip(&shard.buckets) {
                *total = total.wrapping_add(bucket.load(Relaxed));
            }
            sum = sum.wrapping_add(shard.sum_nanos.load(Relaxed));
            timed = timed.wrapping_add(shard.timed.load(Relaxed));
            let since = shard.count.load(Relaxed).saturating_sub(covered);
            let at = match last.checked_sub(1) {
                Some(last) => {
                    usize::try_from(last).map_or(LATENCY_BUCKETS, |b| b.min(LATENCY_BUCKETS))
                }
                None => LATENCY_BUCKETS,
            };
            buckets[at] = buckets[at].wrapping_add(since);
            sum = sum.wrapping_add(last_nanos.saturating_mul(since));
        }
        (buckets, sum, timed)
    }
}

/// `value * weight`, saturating: a figure of the calls timed scaled to all of them.
fn weigh(value: u64, weight: u64) -> u64 {
    value.saturating_mul(weight)
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
    /// They add up to every call counted (exact); how the calls spread over them is estimated
    /// from the calls timed, each standing for the calls its thread counted since the one
    /// timed before it (so no bucket ever goes down; exact when every call is timed). Calls
    /// a thread counted before it timed any are in the last bucket until it does.
    pub buckets: Vec<u64>,
    /// Time spent in those calls, in seconds, estimated the same way (exact when every call
    /// is timed).
    pub sum_seconds: f64,
    /// Calls timed, from which the buckets and the sum are estimated.
    pub timed: u64,
}

impl LatencyHistogram {
    /// Calls counted (exact).
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
    /// Counts one call in shard `index` ([`thread_shard`]), with its time in nanoseconds when
    /// it was timed (`None` when it was not, or calls are not timed).
    #[inline]
    pub(crate) fn record_at(&self, index: usize, timed: Option<u64>, outcome: Outcome) {
        let owned = index != SHARED;
        let shard = &self.shards[index];
        add(&shard.calls, 1, owned);
        if let Some(nanos) = timed {
            add(&shard.timed, 1, owned);
            add(&shard.timed_nanos, nanos, owned);
            self.at_least_at(index, nanos);
        }
        match outcome {
            Outcome::Ok => {}
            Outcome::Error => add(&shard.errors, 1, owned),
            Outcome::Panic => add(&shard.panics, 1, owned),
        }
    }

    /// A call in shard `index` took at least `nanos`: the maximum takes it if it is longer.
    #[inline]
    pub(crate) fn at_least_at(&self, index: usize, nanos: u64) {
        let max = &self.shards[index].max_nanos;
        if nanos > max.load(Relaxed) {
            if index != SHARED {
                max.store(nanos, Relaxed);
            } else {
                max.fetch_max(nanos, Relaxed);
            }
        }
    }

    /// Whether to time a call that no histogram counts (a method the plugin does not
    /// declare), picked like a histogram's ([`Latency::count_at`]) from a count of its own.
    #[inline]
    pub(crate) fn picks_at(&self, index: usize, sample: u64) -> bool {
        self.undeclared.count_at(index, sample)
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

    /// Every histogram with at least one call (its count exact from the first), by kind and
    /// name.
    pub(crate) fn latencies(&self) -> Vec<LatencyHistogram> {
        let latencies = self
            .latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut out: Vec<LatencyHistogram> = latencies
            .iter()
            .filter_map(|(kind, name, latency)| {
                let (buckets, sum, timed) = latency.snapshot();
                (buckets.iter().any(|b| *b != 0)).then(|| LatencyHistogram {
                    kind: *kind,
                    name: name.to_string(),
                    buckets: buckets.to_vec(),
                    sum_seconds: sum as f64 * 1e-9,
                    timed,
                })
            })
            .collect();
        out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        out
    }

    /// The counters; each call timed stands for `weight` calls (the host's timing sample).
    pub(crate) fn snapshot(&self, weight: u64) -> PluginStats {
        let sum = |f: fn(&Shard) -> &AtomicU64| {
            self.shards
                .iter()
                .map(|s| f(s).load(Relaxed))
                .fold(0u64, u64::wrapping_add)
        };
        let max_nanos = self
            .shards
            .iter()
            .map(|s| s.max_nanos.load(Relaxed))
            .max()
            .unwrap_or(0);
        PluginStats {
            calls: sum(|s| &s.calls),
            errors: sum(|s| &s.errors),
            panics: sum(|s| &s.panics),
            total_latency: Duration::from_nanos(weigh(sum(|s| &s.timed_nanos), weight)),
            max_latency: Duration::from_nanos(max_nanos),
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
/// The host times about one call in N, at random gaps, of each method and hook point
/// ([`with_call_timing_sample`](crate::PluginHostBuilder::with_call_timing_sample), 16 by
/// default; 1 times every call): the counts are exact, `total_latency` is the time of the
/// calls timed times N (an estimate that only grows, and so the mean is one), and
/// `max_latency` is the longest
/// call timed or, for a call that was not, a lower bound from the watchdog's coarse clock
/// whenever the call saw two of its ticks (50 ms apart): any call longer than about 100 ms
/// reaches it, timed or not.
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
    /// Time spent in the plugin, summed (estimated from the calls timed).
    pub total_latency: Duration,
    /// The longest call (see above for calls not timed).
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
            assert!(
                latency.count_at(thread_shard(), 1),
                "a sample of 1 times every call"
            );
            latency.record_at(thread_shard(), nanos);
        }
        let (buckets, _, timed) = latency.snapshot();
        assert_eq!((buckets.iter().sum::<u64>(), timed), (8, 8));
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
                            let nanos = 1 + (i + t + round) % 7;
                            cell.record_at(thread_shard(), Some(nanos), outcome);
                        }
                        if t == 3 && round == 1 {
                            cell.record_at(thread_shard(), Some(1_000_000), Outcome::Ok);
                        }
                        // Not timed, known to have taken at least 2 ms.
                        if t == 5 && round == 2 {
                            cell.record_at(thread_shard(), None, Outcome::Ok);
                            cell.at_least_at(thread_shard(), 2_000_000);
                        }
                    });
                }
            });
        }
        let threads = 3 * (SHARDS as u64 + 9);
        let sum = |f: fn(&Shard) -> &AtomicU64| {
            cell.shards.iter().map(|s| f(s).load(Relaxed)).sum::<u64>()
        };
        assert_eq!(sum(|s| &s.calls), threads * 2_000 + 2);
        assert_eq!(sum(|s| &s.timed), threads * 2_000 + 1);
        assert_eq!(sum(|s| &s.errors), threads * 200);
        assert_eq!(sum(|s| &s.panics), threads * 200);
        let expected_ticks: u64 = (0..3u64)
            .flat_map(|round| {
                (0..(SHARDS as u64 + 9))
                    .flat_map(move |t| (0..2_000u64).map(move |i| 1 + (i + t + round) % 7))
            })
            .sum();
        assert_eq!(sum(|s| &s.timed_nanos), expected_ticks + 1_000_000);
        let stats = cell.snapshot(1);
        assert_eq!(stats.max_latency, Duration::from_millis(2));
        assert_eq!(stats.calls, threads * 2_000 + 2);
    }

    /// One call in 16 timed, in every thread's shard (the shared one too): the count stays
    /// exact, the buckets add up to it, and the buckets and the sum estimate the calls'
    /// spread and time.
    #[test]
    fn a_sampled_histogram_keeps_its_exact_count_and_stays_valid() {
        let latency = Latency::default();
        let sample = u64::from(DEFAULT_TIMING_SAMPLE);
        let calls_per_thread = 1_001u64;
        std::thread::scope(|scope| {
            for t in 0..(SHARDS as u64 + 3) {
                let latency = &latency;
                scope.spawn(move || {
                    for i in 0..calls_per_thread {
                        if latency.count_at(thread_shard(), sample) {
                            // Three speeds, in turn: 1 us, 100 us, 10 ms.
                            let nanos = [1_000, 100_000, 10_000_000][((i + t) % 3) as usize];
                            latency.record_at(thread_shard(), nanos);
                        }
                    }
                });
            }
        });
        let cell = StatsCell::default();
        cell.latencies
            .lock()
            .unwrap()
            .push((CallKind::Method, "m".into(), Arc::new(latency)));
        let histogram = cell.latencies().pop().unwrap();
        let calls = (SHARDS as u64 + 3) * calls_per_thread;
        assert_eq!(histogram.count(), calls, "{histogram:?}");
        assert!(histogram.timed < calls / 8, "{histogram:?}");
        assert!(histogram.timed >= calls / 20, "{histogram:?}");
        let mut running = 0;
        for bucket in &histogram.buckets {
            running += bucket;
            assert!(running <= calls);
        }
        assert_eq!(running, calls);
        // The three speeds are each a third of the calls, within the sampling's error.
        for (nanos, share) in [
            (1_000u64, 1.0 / 3.0),
            (100_000, 1.0 / 3.0),
            (10_000_000, 1.0 / 3.0),
        ] {
            let bits = u64::BITS - ((nanos - 1) >> FIRST_BUCKET_BITS).leading_zeros();
            let got = histogram.buckets[bits as usize] as f64 / calls as f64;
            assert!((got - share).abs() < 0.1, "{nanos} ns: {got} {histogram:?}");
        }
        let mean = histogram.sum_seconds / calls as f64;
        let expected = (1e-6 + 1e-4 + 1e-2) / 3.0;
        assert!(
            (mean - expected).abs() < expected * 0.2,
            "{mean} {expected}"
        );
    }

    /// Each call timed stands for the calls counted since the one timed before it (the first
    /// for those before it); calls counted since the last one timed are in its bucket, and
    /// calls before any timed in the last bucket. Nothing is capped or left over: the buckets
    /// add up to the count, whatever the gaps.
    #[test]
    fn each_call_timed_stands_for_the_calls_since_the_one_before() {
        let latency = Latency::default();
        let shard = 3;
        let count = |n: u64| {
            latency.shards[shard].count.fetch_add(n, Relaxed);
        };
        let bucket = |nanos: u64| {
            let bits = u64::BITS - ((nanos - 1) >> FIRST_BUCKET_BITS).leading_zeros();
            (bits as usize).min(LATENCY_BUCKETS)
        };
        let (fast, slow) = (bucket(1_000), bucket(5_000_000));
        assert_ne!(fast, slow);
        count(3);
        let (buckets, sum, timed) = latency.snapshot();
        assert_eq!(
            (buckets[LATENCY_BUCKETS], sum, timed),
            (3, 0, 0),
            "none timed yet"
        );
        count(1);
        latency.record_at(shard, 1_000);
        let (buckets, sum, timed) = latency.snapshot();
        assert_eq!(
            (buckets[fast], buckets[LATENCY_BUCKETS], sum, timed),
            (4, 0, 4_000, 1)
        );
        count(5);
        let (buckets, sum, _) = latency.snapshot();
        assert_eq!(
            (buckets[fast], sum),
            (9, 9_000),
            "the calls since, in its bucket"
        );
        count(1);
        latency.record_at(shard, 5_000_000);
        let (buckets, sum, timed) = latency.snapshot();
        assert_eq!(
            (buckets[fast], buckets[slow], sum, timed),
            (9, 1, 5_009_000, 2),
            "the gap stays with the call before; the slow call stands for itself so far"
        );
        assert_eq!(buckets.iter().sum::<u64>(), 10);
        count(2);
        let (buckets, sum, _) = latency.snapshot();
        assert_eq!((buckets[slow], sum), (3, 15_009_000));
        assert_eq!(weigh(u64::MAX, 3), u64::MAX, "no overflow");
    }

    /// Prometheus reads a histogram's buckets and sum as counters: from one scrape to the
    /// next, none may go down. The review's case: one thread, a sample of 16, the first call
    /// timed fast, a scrape after 16 calls, then a slow call timed.
    #[test]
    fn exported_series_never_go_down_between_scrapes() {
        let cell = StatsCell::default();
        let latency = cell.latency(CallKind::Method, "m");
        let shard = thread_shard();
        let weight = 16;
        let mut last: Option<(Vec<u64>, f64, u64, Duration)> = None;
        for i in 0..2_000u64 {
            let timed = (i % 16 == 0 || i % 61 == 0).then(|| {
                // Fast, slow and very slow, in a pattern that moves the proportions around.
                [2_000u64, 5_000_000, 3_000, 400_000_000][(i as usize / 16) % 4]
            });
            latency.count_at(shard, 16);
            if let Some(nanos) = timed {
                latency.record_at(shard, nanos);
            }
            cell.record_at(shard, timed, Outcome::Ok);
            if i % 5 != 0 {
                continue;
            }
            let Some(histogram) = cell.latencies().pop() else {
                continue;
            };
            let cumulative: Vec<u64> = histogram
                .buckets
                .iter()
                .scan(0, |running, b| {
                    *running += b;
                    Some(*running)
                })
                .collect();
            let stats = cell.snapshot(weight);
            assert_eq!(histogram.count(), i + 1, "the count is exact");
            if let Some((before, sum, count, total)) = &last {
                for (j, (now, then)) in cumulative.iter().zip(before).enumerate() {
                    assert!(
                        now >= then,
                        "call {i}: bucket {j} went down, {then} -> {now}"
                    );
                }
                assert!(histogram.sum_seconds >= *sum, "call {i}: the sum went down");
                assert!(histogram.count() >= *count);
                assert!(
                    stats.total_latency >= *total,
                    "call {i}: the total went down"
                );
            }
            last = Some((
                cumulative,
                histogram.sum_seconds,
                histogram.count(),
                stats.total_latency,
            ));
        }
    }

    /// A workload whose pattern repeats (a slow call then a fast one) is not always timed at
    /// the same point of it: the estimate of its time is within a sane band of the truth, and
    /// the count stays exact. With a fixed position (every 16th call) only slow calls were
    /// timed and the estimate was twice the truth.
    #[test]
    fn a_repeating_pattern_is_estimated_within_a_band() {
        for sample in [16u64, 64] {
            let cell = StatsCell::default();
            let latency = cell.latency(CallKind::Method, "m");
            let shard = thread_shard();
            let calls = 64_000u64;
            let (slow, fast) = (1_000_000u64, 1_000u64);
            for i in 0..calls {
                let nanos = if i % 2 == 0 { slow } else { fast };
                let timed = latency.count_at(shard, sample).then_some(nanos);
                if let Some(nanos) = timed {
                    latency.record_at(shard, nanos);
                }
                cell.record_at(shard, timed, Outcome::Ok);
            }
            let histogram = cell.latencies().pop().unwrap();
            assert_eq!(histogram.count(), calls);
            let truth = (calls / 2 * (slow + fast)) as f64 * 1e-9;
            let ratio = histogram.sum_seconds / truth;
            assert!(
                (0.8..1.2).contains(&ratio),
                "sample {sample}: {ratio} {histogram:?}"
            );
            let timed = histogram.timed as f64;
            let expected = (calls / sample) as f64;
            assert!(
                (timed - expected).abs() < expected * 0.2,
                "{timed} {expected}"
            );
            let total = cell.snapshot(sample).total_latency.as_secs_f64();
            assert!((0.8..1.2).contains(&(total / truth)), "{total} {truth}");
        }
    }

    /// A sample of 1 times every call; with a larger one the first call of a shard is timed
    /// only now and then (not always, which biased a call made once per thread).
    #[test]
    fn a_sample_of_one_times_every_call_and_the_first_is_not_always_timed() {
        let latency = Latency::default();
        for _ in 0..1_000 {
            assert!(latency.count_at(0, 1));
        }
        let firsts = (0..1_000)
            .filter(|_| Latency::default().count_at(0, 16))
            .count();
        assert!(
            (20..150).contains(&firsts),
            "{firsts} first calls of 1000 timed"
        );
        // Undeclared methods are picked from a count of their own.
        let cell = StatsCell::default();
        let picked = (0..16_000).filter(|_| cell.picks_at(0, 16)).count();
        assert!((700..1_300).contains(&picked), "{picked}");
    }

    /// Any sample is taken without a panic: rounded up to a power of two, at most the largest.
    #[test]
    fn any_timing_sample_is_taken_without_overflow() {
        let clock = quanta::Clock::new;
        for (given, taken) in [
            (0, 1),
            (1, 1),
            (12, 16),
            (MAX_TIMING_SAMPLE, u64::from(MAX_TIMING_SAMPLE)),
            ((1 << 31) + 1, u64::from(MAX_TIMING_SAMPLE)),
            (u32::MAX, u64::from(MAX_TIMING_SAMPLE)),
        ] {
            assert_eq!(Timing::new(clock(), given).sample, taken, "{given}");
        }
    }
}
