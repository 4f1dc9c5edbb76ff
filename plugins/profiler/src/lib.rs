//! `profiler`: latency histograms per task type, per handler and per plugin, with percentiles on
//! request.
//!
//! Every histogram has the same fixed log-scale buckets: 10 per decade from 1 µs to 100 s
//! (values in milliseconds), plus one bucket for everything at or below 1 µs and one for
//! everything above 100 s. Each keeps its count, sum, minimum and maximum, so memory per
//! histogram is constant. The `p`th percentile of `n` values is the value of nearest rank
//! `ceil(p/100 · n)` (1-based, computed in integers with `p` to millionths); the histogram
//! reports the upper bound of the bucket holding that rank, clamped to the observed
//! `[min, max]`.
//!
//! Error bound: for a true percentile value `v` in (1 µs, 100 s] the report `r` satisfies
//! `v <= r < v · 10^0.1`, an overestimate of less than 25.9 %. It stops holding outside that
//! range: at or below 1 µs the report is at most 1 µs (an absolute error below 1 µs, no
//! relative bound), and above 100 s the last bucket is open, so the report is the largest value
//! seen, with no bound relative to the true percentile.
//!
//! # Configuration
//!
//! `null`, or:
//!
//! ```json
//! { "percentiles": [50, 95, 99] }
//! ```
//!
//! - `percentiles` (optional): the percentiles `percentiles` reports when the call names none;
//!   numbers in `0..=100`, at least one. Default `[50, 95, 99]`.
//!
//! # Methods
//!
//! - `observeLatency {"kind": "type" | "handler" | "plugin", "key", "ms"}` → nothing; records one
//!   latency (`ms` finite and `>= 0`).
//! - `percentiles {"kind"?, "key"?, "p"?: [50, 95, 99]}` →
//!   `{"type": {"chat": {"count", "meanMs", "maxMs", "p50", "p95", "p99"}}, "handler": {..},
//!   "plugin": {..}}`, only the kind and key asked for when given. Percentile fields are named
//!   `"p"` and the number: `99.9` gives `"p99.9"`.
//!
//! # Hooks
//!
//! - `task.scored` (audit, priority 90): records `latency_ms` under the task's `type` and its
//!   `handler`, and each entry of `plugins_ms` under the plugin's name. Missing or `null` fields
//!   are skipped.
//!
//! Histograms survive hot reloads (`save_state` / `restore_state`; saved as bucket counts).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, Value, export_plugin,
};
use serde::{Deserialize, Serialize};

/// Upper bound of the lowest bucket, in milliseconds (1 µs).
const LOW_MS: f64 = 1e-3;
/// Buckets per decade.
const PER_DECADE: usize = 10;
/// Decades between 1 µs and 100 s.
const DECADES: usize = 8;
/// Log-scale buckets between 1 µs and 100 s.
const RANGE_BUCKETS: usize = PER_DECADE * DECADES;
/// All buckets: `[0, 1 µs]`, the log-scale range, and `(100 s, ∞)`.
const BUCKETS: usize = RANGE_BUCKETS + 2;

const DEFAULT_PERCENTILES: [f64; 3] = [50.0, 95.0, 99.0];

/// The upper bound of bucket `i`, in milliseconds (infinite for the last).
fn upper_bound(i: usize) -> f64 {
    if i > RANGE_BUCKETS {
        f64::INFINITY
    } else {
        LOW_MS * 10f64.powf(i as f64 / PER_DECADE as f64)
    }
}

/// The bucket a value (finite, `>= 0`) falls into: the first whose upper bound is `>=` it.
fn bucket_of(ms: f64) -> usize {
    static BOUNDS: OnceLock<Vec<f64>> = OnceLock::new();
    // The upper bounds of the log-scale buckets 1..=RANGE_BUCKETS, computed once.
    let bounds = BOUNDS.get_or_init(|| (1..=RANGE_BUCKETS).map(upper_bound).collect());
    if ms <= LOW_MS {
        return 0;
    }
    1 + bounds.partition_point(|&bound| bound < ms)
}

/// The 1-based nearest rank of the `p`th percentile of `n` values, `ceil(p/100 · n)` and at
/// least 1, in integers: `p` is taken to millionths (float products such as `0.07 · 100 =
/// 7.000000000000001` would move the rank up by one).
fn nearest_rank(p: f64, n: u64) -> u64 {
    let micro = (p.clamp(0.0, 100.0) * 1e6).round() as u128;
    let scale = 100_000_000u128;
    let rank = (micro * u128::from(n)).div_ceil(scale);
    u64::try_from(rank).unwrap_or(u64::MAX).clamp(1, n.max(1))
}

/// A latency histogram in milliseconds with fixed log-scale buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Count per bucket; `BUCKETS` entries.
    pub counts: Vec<u64>,
    /// Values recorded.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// The smallest (0 while empty).
    pub min: f64,
    /// The largest (0 while empty).
    pub max: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0.0,
            min: 0.0,
            max: 0.0,
        }
    }
}

impl Histogram {
    /// Records one value (the caller checked it is finite and `>= 0`).
    fn record(&mut self, ms: f64) {
        if let Some(c) = self.counts.get_mut(bucket_of(ms)) {
            *c += 1;
        }
        if self.count == 0 {
            self.min = ms;
            self.max = ms;
        } else {
            self.min = self.min.min(ms);
            self.max = self.max.max(ms);
        }
        self.count += 1;
        self.sum += ms;
    }

    /// The `p`th percentile (`p` in `0..=100`), or `None` while empty.
    fn percentile(&self, p: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let target = nearest_rank(p, self.count);
        let mut cumulative = 0u64;
        let mut bound = self.max;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            if cumulative >= target {
                bound = upper_bound(i);
                break;
            }
        }
        Some(bound.min(self.max).max(self.min))
    }

    /// Adds another histogram's counts (from a saved state).
    fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        if self.count == 0 {
            self.min = other.min;
            self.max = other.max;
        } else {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
        self.count += other.count;
        self.sum += other.sum;
    }

    /// Checks a histogram read from a saved state.
    fn check(&self, at: &str) -> Result<(), PluginError> {
        if self.counts.len() != BUCKETS {
            return Err(PluginError::new(format!(
                "saved state {at}: {} buckets, expected {BUCKETS}",
                self.counts.len()
            )));
        }
        if self.counts.iter().sum::<u64>() != self.count {
            return Err(PluginError::new(format!(
                "saved state {at}: bucket counts do not add up to count {}",
                self.count
            )));
        }
        if ![self.sum, self.min, self.max]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0)
        {
            return Err(PluginError::new(format!(
                "saved state {at}: sum, min and max must be finite numbers >= 0"
            )));
        }
        Ok(())
    }
}

/// What a latency is recorded under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Type,
    Handler,
    Plugin,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Type, Kind::Handler, Kind::Plugin];

    fn name(self) -> &'static str {
        match self {
            Kind::Type => "type",
            Kind::Handler => "handler",
            Kind::Plugin => "plugin",
        }
    }
}

/// All histograms, by kind and key.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tables {
    /// Per task type.
    #[serde(rename = "type", default)]
    pub task_type: BTreeMap<String, Histogram>,
    /// Per handler.
    #[serde(default)]
    pub handler: BTreeMap<String, Histogram>,
    /// Per plugin.
    #[serde(default)]
    pub plugin: BTreeMap<String, Histogram>,
}

impl Tables {
    fn of(&self, kind: Kind) -> &BTreeMap<String, Histogram> {
        match kind {
            Kind::Type => &self.task_type,
            Kind::Handler => &self.handler,
            Kind::Plugin => &self.plugin,
        }
    }

    fn of_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, Histogram> {
        match kind {
            Kind::Type => &mut self.task_type,
            Kind::Handler => &mut self.handler,
            Kind::Plugin => &mut self.plugin,
        }
    }

    fn record(&mut self, kind: Kind, key: &str, ms: f64) {
        let table = self.of_mut(kind);
        match table.get_mut(key) {
            Some(h) => h.record(ms),
            None => {
                let mut h = Histogram::default();
                h.record(ms);
                table.insert(key.to_owned(), h);
            }
        }
    }
}

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The percentiles reported when a call names none (default `[50, 95, 99]`).
    pub percentiles: Option<Vec<f64>>,
}

/// The plugin instance.
#[derive(Debug)]
pub struct Profiler {
    percentiles: Vec<f64>,
    tables: Mutex<Tables>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ObserveParams {
    kind: Kind,
    key: String,
    ms: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PercentilesParams {
    kind: Option<Kind>,
    key: Option<String>,
    p: Option<Vec<f64>>,
}

/// The fields of the `task.scored` payload the profiler reads; any may be missing or `null`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ScoredTask {
    #[serde(rename = "type")]
    task_type: Option<String>,
    handler: Option<String>,
    latency_ms: Option<f64>,
    plugins_ms: Option<BTreeMap<String, Option<f64>>>,
}

/// Checks a list of percentiles; `what` names it in errors.
fn check_percentiles(list: &[f64], what: &str) -> Result<(), String> {
    if list.is_empty() {
        return Err(format!("{what}: needs at least one percentile"));
    }
    for (i, p) in list.iter().enumerate() {
        if !p.is_finite() || !(0.0..=100.0).contains(p) {
            return Err(format!(
                "{what}[{i}]: a percentile must be a number in 0..=100, found {p}"
            ));
        }
    }
    Ok(())
}

fn valid_latency(ms: f64) -> bool {
    ms.is_finite() && ms >= 0.0
}

impl Profiler {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn observe(&self, p: ObserveParams) -> Result<(), PluginError> {
        if !valid_latency(p.ms) {
            return Err(PluginError::invalid_params(format!(
                "ms must be a finite number >= 0, found {}",
                p.ms
            )));
        }
        self.lock().record(p.kind, &p.key, p.ms);
        Ok(())
    }

    fn on_scored(&self, task: Option<ScoredTask>) -> Result<HookResult, PluginError> {
        let task = task.unwrap_or_default();
        let mut tables = self.lock();
        match task.latency_ms {
            Some(ms) if valid_latency(ms) => {
                if let Some(t) = &task.task_type {
                    tables.record(Kind::Type, t, ms);
                }
                if let Some(h) = &task.handler {
                    tables.record(Kind::Handler, h, ms);
                }
            }
            Some(ms) => tracing::debug!(ms, "task.scored: latency_ms is not a latency; skipped"),
            None => {}
        }
        for (plugin, ms) in task.plugins_ms.iter().flatten() {
            match ms {
                Some(ms) if valid_latency(*ms) => tables.record(Kind::Plugin, plugin, *ms),
                _ => tracing::debug!(%plugin, "task.scored: plugins_ms entry is not a latency"),
            }
        }
        Ok(HookResult::Continue)
    }

    fn summary(h: &Histogram, percentiles: &[f64]) -> Value {
        let mut out = serde_json::Map::new();
        out.insert("count".into(), Value::from(h.count));
        let mean = (h.count > 0).then(|| h.sum / h.count as f64);
        out.insert("meanMs".into(), serde_json::json!(mean));
        out.insert("maxMs".into(), Value::from(h.max));
        for &p in percentiles {
            // `+ 0.0` turns -0 into 0, so the name is never "p-0".
            out.insert(format!("p{}", p + 0.0), serde_json::json!(h.percentile(p)));
        }
        Value::Object(out)
    }

    fn percentiles(&self, p: Option<PercentilesParams>) -> Result<Value, PluginError> {
        let p = p.unwrap_or_default();
        let percentiles = match &p.p {
            Some(list) => {
                check_percentiles(list, "p").map_err(PluginError::invalid_params)?;
                list.as_slice()
            }
            None => self.percentiles.as_slice(),
        };
        let tables = self.lock();
        let mut report = serde_json::Map::new();
        for kind in Kind::ALL {
            if p.kind.is_some_and(|k| k != kind) {
                continue;
            }
            let mut entries = serde_json::Map::new();
            for (key, h) in tables.of(kind) {
                if p.key.as_ref().is_some_and(|k| k != key) {
                    continue;
                }
                entries.insert(key.clone(), Self::summary(h, percentiles));
            }
            report.insert(kind.name().to_owned(), Value::Object(entries));
        }
        Ok(Value::Object(report))
    }
}

impl Plugin for Profiler {
    type Config = Config;
    type State = Tables;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "profiler",
            env!("CARGO_PKG_VERSION"),
            "Latency histograms per task type, handler and plugin; percentiles on request",
        )
    }

    fn create(config: Config) -> Result<Self, PluginError> {
        let percentiles = match config.percentiles {
            Some(list) => {
                check_percentiles(&list, "percentiles").map_err(PluginError::new)?;
                list
            }
            None => DEFAULT_PERCENTILES.to_vec(),
        };
        Ok(Self {
            percentiles,
            tables: Mutex::new(Tables::default()),
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "observeLatency",
                "Records a latency: {\"kind\": \"type\"|\"handler\"|\"plugin\", \"key\", \"ms\"}",
                Self::observe,
            )
            .method(
                "percentiles",
                "Count, mean, max and percentiles: {\"kind\"?, \"key\"?, \"p\"?: [50, 95, 99]}",
                Self::percentiles,
            );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on(
            "task.scored",
            90,
            HookMode::Audit,
            |this: &Self, task: Option<ScoredTask>| this.on_scored(task),
        );
    }

    fn save_state(&self) -> Result<Option<Tables>, PluginError> {
        Ok(Some(self.lock().clone()))
    }

    fn restore_state(&self, saved: Tables) -> Result<(), PluginError> {
        for kind in Kind::ALL {
            for (key, h) in saved.of(kind) {
                h.check(&format!("{}.{key}", kind.name()))?;
            }
        }
        let mut tables = self.lock();
        for kind in Kind::ALL {
            let table = tables.of_mut(kind);
            for (key, h) in saved.of(kind) {
                table.entry(key.clone()).or_default().merge(h);
            }
        }
        Ok(())
    }
}

export_plugin!(Profiler);

#[cfg(test)]
mod tests {
    use plugin_api::Harness;
    use serde_json::json;

    use super::*;

    fn plugin() -> Profiler {
        Profiler::create(Config::default()).unwrap()
    }

    fn observe(p: &Profiler, kind: Kind, key: &str, ms: f64) {
        p.observe(ObserveParams {
            kind,
            key: key.into(),
            ms,
        })
        .unwrap();
    }

    fn query(p: &Profiler, params: Value) -> Value {
        p.percentiles(serde_json::from_value(params).unwrap())
            .unwrap()
    }

    #[test]
    fn buckets_are_log_scale_and_ordered() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(LOW_MS), 0);
        assert_eq!(bucket_of(1.0), 30);
        assert_eq!(bucket_of(1.0001), 31);
        assert_eq!(bucket_of(1e5), RANGE_BUCKETS);
        assert_eq!(bucket_of(1e6), RANGE_BUCKETS + 1);
        for i in 1..=RANGE_BUCKETS {
            assert_eq!(bucket_of(upper_bound(i)), i, "upper bound of {i}");
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution_land_in_the_right_bucket() {
        let p = plugin();
        for ms in 1..=100 {
            observe(&p, Kind::Type, "chat", f64::from(ms));
        }
        let r = query(
            &p,
            json!({"kind": "type", "key": "chat", "p": [50, 90, 99.9]}),
        );
        let chat = &r["type"]["chat"];
        assert_eq!(chat["count"], 100);
        assert!((chat["meanMs"].as_f64().unwrap() - 50.5).abs() < 1e-9);
        assert_eq!(chat["maxMs"], 100.0);
        let step = 10f64.powf(0.1);
        let p50 = chat["p50"].as_f64().unwrap();
        assert!((50.0..=50.0 * step).contains(&p50), "p50 = {p50}");
        let p90 = chat["p90"].as_f64().unwrap();
        assert!((90.0..=90.0 * step).contains(&p90), "p90 = {p90}");
        // Clamped to the largest value seen.
        assert_eq!(chat["p99.9"], 100.0);
    }

    #[test]
    fn a_single_value_is_every_percentile() {
        let p = plugin();
        observe(&p, Kind::Handler, "recall", 0.41);
        let r = query(&p, json!({"kind": "handler"}));
        for name in ["p50", "p95", "p99"] {
            assert_eq!(r["handler"]["recall"][name], 0.41, "{name}");
        }
    }

    #[test]
    fn kinds_and_keys_filter() {
        let p = plugin();
        observe(&p, Kind::Type, "chat", 1.0);
        observe(&p, Kind::Type, "summarize", 2.0);
        observe(&p, Kind::Handler, "chat", 3.0);
        let all = query(&p, Value::Null);
        assert_eq!(all["type"].as_object().unwrap().len(), 2);
        assert_eq!(all["handler"].as_object().unwrap().len(), 1);
        assert!(all["plugin"].as_object().unwrap().is_empty());

        let by_kind = query(&p, json!({"kind": "type"}));
        assert_eq!(by_kind.as_object().unwrap().len(), 1);
        assert_eq!(by_kind["type"].as_object().unwrap().len(), 2);

        let by_key = query(&p, json!({"key": "chat"}));
        assert_eq!(by_key["type"]["chat"]["maxMs"], 1.0);
        assert_eq!(by_key["handler"]["chat"]["maxMs"], 3.0);
        assert!(by_key["type"].get("summarize").is_none());
    }

    #[test]
    fn the_hook_records_all_three_kinds() {
        let p = plugin();
        let payload = json!({
            "id": "t-17", "type": "chat", "handler": "recall", "variant": null,
            "experiment": null, "role": null, "score": 0.83, "latency_ms": 0.41,
            "output_len": 23, "plugins_ms": {"bandit": 0.01, "experiment": 0.02}
        });
        p.on_scored(serde_json::from_value(payload).unwrap())
            .unwrap();
        p.on_scored(serde_json::from_value(json!({"type": "chat"})).unwrap())
            .unwrap();
        p.on_scored(None).unwrap();
        let r = query(&p, Value::Null);
        assert_eq!(r["type"]["chat"]["count"], 1);
        assert_eq!(r["handler"]["recall"]["count"], 1);
        assert_eq!(r["plugin"]["bandit"]["maxMs"], 0.01);
        assert_eq!(r["plugin"]["experiment"]["maxMs"], 0.02);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let p = plugin();
        let err = p
            .observe(ObserveParams {
                kind: Kind::Type,
                key: "chat".into(),
                ms: -1.0,
            })
            .unwrap_err();
        assert!(err.message().contains("ms"), "{err}");
        let err = p
            .percentiles(Some(PercentilesParams {
                p: Some(vec![50.0, 101.0]),
                ..PercentilesParams::default()
            }))
            .unwrap_err();
        assert!(err.message().contains("p[1]"), "{err}");
        let err = Harness::<Profiler>::new(json!({"percentiles": [50, -3]})).unwrap_err();
        assert!(err.message().contains("percentiles[1]"), "{err}");
        let err = Harness::<Profiler>::new(json!({"percentiles": [50, "p99"]})).unwrap_err();
        assert!(
            err.message().contains("percentiles[1]: invalid type"),
            "{err}"
        );
        assert!(Harness::<Profiler>::new(json!({"percentile": [50]})).is_err());
    }

    #[test]
    fn configured_percentiles_are_the_default() {
        let p = Profiler::create(Config {
            percentiles: Some(vec![75.0]),
        })
        .unwrap();
        observe(&p, Kind::Plugin, "bandit", 2.0);
        let r = query(&p, Value::Null);
        let bandit = r["plugin"]["bandit"].as_object().unwrap();
        assert!(bandit.contains_key("p75"));
        assert!(!bandit.contains_key("p50"));
    }

    #[test]
    fn state_survives_a_reload() {
        let p = plugin();
        for ms in [0.5, 1.5, 2.5] {
            observe(&p, Kind::Type, "chat", ms);
        }
        let state = p.save_state().unwrap().unwrap();
        let next = plugin();
        next.restore_state(state.clone()).unwrap();
        assert_eq!(next.save_state().unwrap().unwrap(), state);
        let short: Tables = serde_json::from_value(
            json!({"type": {"x": {"counts": [1], "count": 1, "sum": 1.0, "min": 1.0, "max": 1.0}}}),
        )
        .unwrap();
        assert!(next.restore_state(short).is_err());
        let harness = Harness::<Profiler>::new(()).unwrap();
        let err = harness
            .restore_state(r#"{"type": {"x": {"counts": [1], "count": -1}}}"#)
            .unwrap_err();
        assert!(err.message().contains("type.x.count: "), "{err}");
    }

    #[test]
    fn nearest_rank_is_exact_in_integers() {
        assert_eq!(nearest_rank(7.0, 100), 7);
        assert_eq!(nearest_rank(95.0, 20), 19);
        assert_eq!(nearest_rank(50.0, 1), 1);
        assert_eq!(nearest_rank(0.0, 10), 1);
        assert_eq!(nearest_rank(100.0, 10), 10);
        assert_eq!(nearest_rank(99.9, 1000), 999);
        assert_eq!(nearest_rank(99.9, 1001), 1000);
        for n in 1..300u64 {
            for p in 0..=100u64 {
                assert_eq!(
                    nearest_rank(p as f64, n),
                    (p * n).div_ceil(100).max(1),
                    "p{p} of {n}"
                );
            }
        }
    }
}
