//! Per-plugin call statistics, kept with atomics so that recording never takes a lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Counter shards per plugin: threads spread over them so that calls from many threads do not
/// all bounce one cache line.
const SHARDS: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    calls: AtomicU64,
    errors: AtomicU64,
    panics: AtomicU64,
    total_ticks: AtomicU64,
    max_ticks: AtomicU64,
}

/// Counters of one plugin, summed over all its generations since it was first loaded. Latency
/// is kept in clock ticks and converted when read.
#[derive(Debug, Default)]
pub(crate) struct StatsCell {
    shards: [Shard; SHARDS],
}

/// How a call ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Error,
    Panic,
}

fn shard_index() -> usize {
    use std::cell::Cell;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|index| {
        let mut i = index.get();
        if i == usize::MAX {
            i = (NEXT.fetch_add(1, Relaxed) % SHARDS as u64) as usize;
            index.set(i);
        }
        i
    })
}

impl StatsCell {
    /// Counts one call that took `ticks` of the host's clock (0 when calls are not timed).
    #[inline]
    pub(crate) fn record(&self, ticks: u64, outcome: Outcome) {
        let shard = &self.shards[shard_index()];
        shard.calls.fetch_add(1, Relaxed);
        if ticks != 0 {
            shard.total_ticks.fetch_add(ticks, Relaxed);
            if ticks > shard.max_ticks.load(Relaxed) {
                shard.max_ticks.fetch_max(ticks, Relaxed);
            }
        }
        match outcome {
            Outcome::Ok => {}
            Outcome::Error => {
                shard.errors.fetch_add(1, Relaxed);
            }
            Outcome::Panic => {
                shard.panics.fetch_add(1, Relaxed);
            }
        }
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PluginStats {
    /// Calls that reached the plugin, hook invocations included.
    pub calls: u64,
    /// Calls that ended in an error.
    pub errors: u64,
    /// Calls that panicked.
    pub panics: u64,
    /// Time spent in the plugin, summed.
    #[serde(serialize_with = "as_micros")]
    pub total_latency: Duration,
    /// The longest call.
    #[serde(serialize_with = "as_micros")]
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

fn as_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e6)
}
