//! Per-plugin call statistics, kept with atomics so that recording never takes a lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Counters of one plugin, summed over all its generations since it was first loaded.
#[derive(Debug, Default)]
pub(crate) struct StatsCell {
    calls: AtomicU64,
    errors: AtomicU64,
    panics: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// How a call ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Error,
    Panic,
}

impl StatsCell {
    #[inline]
    pub(crate) fn record(&self, elapsed: Duration, outcome: Outcome) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.calls.fetch_add(1, Relaxed);
        self.total_ns.fetch_add(ns, Relaxed);
        if ns > self.max_ns.load(Relaxed) {
            self.max_ns.fetch_max(ns, Relaxed);
        }
        match outcome {
            Outcome::Ok => {}
            Outcome::Error => {
                self.errors.fetch_add(1, Relaxed);
            }
            Outcome::Panic => {
                self.panics.fetch_add(1, Relaxed);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> PluginStats {
        PluginStats {
            calls: self.calls.load(Relaxed),
            errors: self.errors.load(Relaxed),
            panics: self.panics.load(Relaxed),
            total_latency: Duration::from_nanos(self.total_ns.load(Relaxed)),
            max_latency: Duration::from_nanos(self.max_ns.load(Relaxed)),
        }
    }
}

/// Call statistics of one plugin since it was first loaded (they survive reloads).
///
/// `errors` counts calls that failed in the plugin (an error, invalid params, invalid JSON
/// back); `panics` counts caught panics. A call to a method the plugin does not have counts as
/// a call only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PluginStats {
    /// Calls that reached the plugin.
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
