//! `attribution`: how a task's score goes with its latency and with the size of its output, per
//! experiment variant or handler.
//!
//! Each scored task counts under its key, `"<experiment>:<variant>"` when the task ran in an
//! experiment, else `"handler:<handler>"`, and under `"all"`. Per key the plugin keeps online
//! sums (`n`, `Σx`, `Σy`, `Σx²`, `Σy²`, `Σxy`) for the pairs (score, latency) and (score, output
//! length); memory per key is constant. The sums are of values shifted by the first value seen,
//! so that nearly constant data keeps its precision.
//!
//! # Configuration
//!
//! None (`null`).
//!
//! # Methods
//!
//! - `report {"key"?}` → per key: `{"n", "meanScore", "scoreVsLatency", "scoreVsOutputLen"}`,
//!   where the last two are Pearson's correlation coefficient, or `null` with fewer than 3
//!   observations or when either side does not vary. With `key`, only that key (an unseen key
//!   answers `n: 0`).
//! - `observe {"key"?, "score", "latencyMs", "outputSize"}` → nothing; records one observation
//!   under `key` (default `"manual"`) and under `"all"`.
//!
//! # Hooks
//!
//! - `task.scored` (audit, priority 91): records `score` with `latency_ms` and with
//!   `output_len`. A task without a score is skipped; a missing latency or output length leaves
//!   that pair out. A task with neither experiment and variant nor handler counts only under
//!   `"all"`.
//!
//! The sums survive hot reloads (`save_state` / `restore_state`).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, Value, export_plugin,
};
use serde::{Deserialize, Serialize};

/// The key every observation also counts under.
const ALL: &str = "all";
/// The key of `observe` calls that name none.
const MANUAL: &str = "manual";

/// Online sums of a pair `(x, y)`, shifted by the first pair seen (`kx`, `ky`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairSums {
    /// Pairs recorded.
    pub n: u64,
    /// Shift of `x`.
    pub kx: f64,
    /// Shift of `y`.
    pub ky: f64,
    /// `Σ(x - kx)`.
    pub sx: f64,
    /// `Σ(y - ky)`.
    pub sy: f64,
    /// `Σ(x - kx)²`.
    pub sxx: f64,
    /// `Σ(y - ky)²`.
    pub syy: f64,
    /// `Σ(x - kx)(y - ky)`.
    pub sxy: f64,
}

impl PairSums {
    fn add(&mut self, x: f64, y: f64) {
        if self.n == 0 {
            self.kx = x;
            self.ky = y;
        }
        let (dx, dy) = (x - self.kx, y - self.ky);
        self.n += 1;
        self.sx += dx;
        self.sy += dy;
        self.sxx += dx * dx;
        self.syy += dy * dy;
        self.sxy += dx * dy;
    }

    /// The same sums shifted by `(kx, ky)` instead.
    fn reshifted(&self, kx: f64, ky: f64) -> Self {
        let n = self.n as f64;
        let (a, b) = (self.kx - kx, self.ky - ky);
        Self {
            n: self.n,
            kx,
            ky,
            sx: self.sx + n * a,
            sy: self.sy + n * b,
            sxx: self.sxx + 2.0 * a * self.sx + n * a * a,
            syy: self.syy + 2.0 * b * self.sy + n * b * b,
            sxy: self.sxy + a * self.sy + b * self.sx + n * a * b,
        }
    }

    fn merge(&mut self, other: &PairSums) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = other.clone();
            return;
        }
        let other = other.reshifted(self.kx, self.ky);
        self.n += other.n;
        self.sx += other.sx;
        self.sy += other.sy;
        self.sxx += other.sxx;
        self.syy += other.syy;
        self.sxy += other.sxy;
    }

    /// Pearson's r, or `None` with fewer than 3 pairs or when x or y does not vary.
    fn pearson(&self) -> Option<f64> {
        if self.n < 3 {
            return None;
        }
        let n = self.n as f64;
        let var_x = n * self.sxx - self.sx * self.sx;
        let var_y = n * self.syy - self.sy * self.sy;
        // What is left of a zero variance after rounding is within a few ulps of n·Σd².
        let zero = |var: f64, sdd: f64| var <= 16.0 * f64::EPSILON * n * sdd;
        if zero(var_x, self.sxx) || zero(var_y, self.syy) {
            return None;
        }
        let r = (n * self.sxy - self.sx * self.sy) / (var_x * var_y).sqrt();
        r.is_finite().then(|| r.clamp(-1.0, 1.0))
    }

    fn is_valid(&self) -> bool {
        [
            self.kx, self.ky, self.sx, self.sy, self.sxx, self.syy, self.sxy,
        ]
        .iter()
        .all(|v| v.is_finite())
            && self.sxx >= 0.0
            && self.syy >= 0.0
    }
}

/// What one key has seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyStats {
    /// Scores recorded.
    pub n: u64,
    /// Their sum.
    pub score_sum: f64,
    /// (score, latency in ms).
    pub latency: PairSums,
    /// (score, output length).
    pub output_len: PairSums,
}

impl KeyStats {
    fn add(&mut self, score: f64, latency_ms: Option<f64>, output_len: Option<f64>) {
        self.n += 1;
        self.score_sum += score;
        if let Some(ms) = latency_ms {
            self.latency.add(score, ms);
        }
        if let Some(len) = output_len {
            self.output_len.add(score, len);
        }
    }

    fn merge(&mut self, other: &KeyStats) {
        self.n += other.n;
        self.score_sum += other.score_sum;
        self.latency.merge(&other.latency);
        self.output_len.merge(&other.output_len);
    }

    fn report(&self) -> Value {
        let mean = (self.n > 0).then(|| self.score_sum / self.n as f64);
        serde_json::json!({
            "n": self.n,
            "meanScore": mean,
            "scoreVsLatency": self.latency.pearson(),
            "scoreVsOutputLen": self.output_len.pearson(),
        })
    }
}

/// The sums per key: the state carried over a reload.
pub type Stats = BTreeMap<String, KeyStats>;

/// The plugin takes no configuration: `null` or `{}`; any field is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

/// The plugin instance.
#[derive(Debug)]
pub struct Attribution {
    stats: Mutex<Stats>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReportParams {
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ObserveParams {
    key: Option<String>,
    score: f64,
    latency_ms: f64,
    output_size: f64,
}

/// The fields of the `task.scored` payload the plugin reads; any may be missing or `null`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ScoredTask {
    handler: Option<String>,
    variant: Option<String>,
    experiment: Option<String>,
    score: Option<f64>,
    latency_ms: Option<f64>,
    output_len: Option<f64>,
}

impl ScoredTask {
    /// `"<experiment>:<variant>"`, else `"handler:<handler>"`, else none.
    fn key(&self) -> Option<String> {
        match (&self.experiment, &self.variant, &self.handler) {
            (Some(e), Some(v), _) => Some(format!("{e}:{v}")),
            (_, _, Some(h)) => Some(format!("handler:{h}")),
            _ => None,
        }
    }
}

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite())
}

impl Attribution {
    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records under `key` (when given and not `"all"`) and under `"all"`.
    fn record(&self, key: Option<&str>, score: f64, latency_ms: Option<f64>, output: Option<f64>) {
        let mut stats = self.lock();
        let keys = key.filter(|k| *k != ALL).into_iter().chain([ALL]);
        for k in keys {
            match stats.get_mut(k) {
                Some(s) => s.add(score, latency_ms, output),
                None => {
                    let mut s = KeyStats::default();
                    s.add(score, latency_ms, output);
                    stats.insert(k.to_owned(), s);
                }
            }
        }
    }

    fn on_scored(&self, task: Option<ScoredTask>) -> Result<HookResult, PluginError> {
        let task = task.unwrap_or_default();
        let Some(score) = finite(task.score) else {
            tracing::debug!("task.scored without a finite score; skipped");
            return Ok(HookResult::Continue);
        };
        let key = task.key();
        self.record(
            key.as_deref(),
            score,
            finite(task.latency_ms),
            finite(task.output_len),
        );
        Ok(HookResult::Continue)
    }

    fn observe(&self, p: ObserveParams) -> Result<(), PluginError> {
        for (name, v) in [
            ("score", p.score),
            ("latencyMs", p.latency_ms),
            ("outputSize", p.output_size),
        ] {
            if !v.is_finite() {
                return Err(PluginError::invalid_params(format!(
                    "{name} must be a finite number, found {v}"
                )));
            }
        }
        let key = p.key.as_deref().unwrap_or(MANUAL);
        self.record(Some(key), p.score, Some(p.latency_ms), Some(p.output_size));
        Ok(())
    }

    fn report(&self, p: Option<ReportParams>) -> Result<Value, PluginError> {
        let only = p.unwrap_or_default().key;
        let stats = self.lock();
        let mut report = serde_json::Map::new();
        match only {
            Some(key) => {
                let s = stats.get(&key).cloned().unwrap_or_default();
                report.insert(key, s.report());
            }
            None => {
                for (key, s) in stats.iter() {
                    report.insert(key.clone(), s.report());
                }
            }
        }
        Ok(Value::Object(report))
    }
}

impl Plugin for Attribution {
    type Config = Config;
    type State = Stats;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "attribution",
            env!("CARGO_PKG_VERSION"),
            "Correlation of score with latency and with output size, per variant or handler",
        )
    }

    fn create(Config {}: Config) -> Result<Self, PluginError> {
        Ok(Self {
            stats: Mutex::new(Stats::new()),
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "report",
                "n, mean score and Pearson's r of score vs latency and output size: {\"key\"?}",
                Self::report,
            )
            .method(
                "observe",
                "Records one observation: {\"key\"?, \"score\", \"latencyMs\", \"outputSize\"}",
                Self::observe,
            );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on(
            "task.scored",
            91,
            HookMode::Audit,
            |this: &Self, task: Option<ScoredTask>| this.on_scored(task),
        );
    }

    fn save_state(&self) -> Result<Option<Stats>, PluginError> {
        Ok(Some(self.lock().clone()))
    }

    fn restore_state(&self, saved: Stats) -> Result<(), PluginError> {
        for (key, s) in &saved {
            if !(s.score_sum.is_finite() && s.latency.is_valid() && s.output_len.is_valid()) {
                return Err(PluginError::new(format!(
                    "saved state {key}: sums must be finite numbers"
                )));
            }
        }
        let mut stats = self.lock();
        for (key, s) in saved {
            stats.entry(key).or_default().merge(&s);
        }
        Ok(())
    }
}

export_plugin!(Attribution);

#[cfg(test)]
mod tests {
    use plugin_api::Harness;
    use serde_json::json;

    use super::*;

    fn plugin() -> Attribution {
        Attribution::create(Config {}).unwrap()
    }

    fn observe(p: &Attribution, key: &str, score: f64, latency_ms: f64, output_size: f64) {
        p.observe(ObserveParams {
            key: Some(key.into()),
            score,
            latency_ms,
            output_size,
        })
        .unwrap();
    }

    fn report(p: &Attribution, key: &str) -> Value {
        p.report(Some(ReportParams {
            key: Some(key.into()),
        }))
        .unwrap()[key]
            .clone()
    }

    fn r(v: &Value) -> f64 {
        v.as_f64().unwrap()
    }

    #[test]
    fn perfectly_correlated_data_gives_one() {
        let p = plugin();
        for i in 0..10 {
            let x = f64::from(i);
            observe(&p, "k", 0.1 * x, 2.0 * x + 1.0, 1000.0 - 3.0 * x);
        }
        let k = report(&p, "k");
        assert_eq!(k["n"], 10);
        assert!((r(&k["meanScore"]) - 0.45).abs() < 1e-9);
        assert!((r(&k["scoreVsLatency"]) - 1.0).abs() < 1e-9, "{k}");
        assert!((r(&k["scoreVsOutputLen"]) + 1.0).abs() < 1e-9, "{k}");
        assert_eq!(report(&p, "all"), k);
    }

    #[test]
    fn constant_data_and_few_points_give_null() {
        let p = plugin();
        for i in 0..20 {
            observe(&p, "k", 0.83, 0.1 + f64::from(i), 23.0);
        }
        let k = report(&p, "k");
        assert!(k["scoreVsLatency"].is_null(), "{k}");
        assert!(k["scoreVsOutputLen"].is_null(), "{k}");

        let q = plugin();
        observe(&q, "two", 0.1, 1.0, 1.0);
        observe(&q, "two", 0.2, 2.0, 2.0);
        assert!(report(&q, "two")["scoreVsLatency"].is_null());
        let unseen = report(&q, "nothing");
        assert_eq!(unseen["n"], 0);
        assert!(unseen["meanScore"].is_null());
    }

    #[test]
    fn the_hook_keys_by_variant_or_handler() {
        let p = plugin();
        let tasks = [
            json!({"id": "t-1", "type": "chat", "handler": "recall", "variant": "full",
                   "experiment": "verbosity", "role": null, "score": 0.8, "latency_ms": 0.4,
                   "output_len": 23, "plugins_ms": {"bandit": 0.01}}),
            json!({"handler": "recall", "variant": null, "score": 0.5, "latency_ms": 0.2}),
            json!({"handler": "lead", "score": null, "latency_ms": 0.2}),
            json!({"score": 0.1}),
        ];
        for task in tasks {
            p.on_scored(serde_json::from_value(task).unwrap()).unwrap();
        }
        p.on_scored(None).unwrap();
        let all = p.report(None).unwrap();
        assert_eq!(all["verbosity:full"]["n"], 1);
        assert_eq!(all["handler:recall"]["n"], 1);
        assert!(all.get("handler:lead").is_none());
        assert_eq!(all["all"]["n"], 3);
    }

    #[test]
    fn state_survives_a_reload_and_merges() {
        let p = plugin();
        for i in 0..5 {
            let x = f64::from(i);
            observe(&p, "k", x, 10.0 + x, 50.0 - x);
        }
        let other = plugin();
        for i in 5..10 {
            let x = f64::from(i);
            observe(&other, "k", x, 10.0 + x, 50.0 - x);
        }
        other
            .restore_state(p.save_state().unwrap().unwrap())
            .unwrap();
        let k = report(&other, "k");
        assert_eq!(k["n"], 10);
        assert!((r(&k["scoreVsLatency"]) - 1.0).abs() < 1e-9, "{k}");
        assert!((r(&k["scoreVsOutputLen"]) + 1.0).abs() < 1e-9, "{k}");
        let harness = Harness::<Attribution>::new(()).unwrap();
        let err = harness.restore_state(r#"{"k": 3}"#).unwrap_err();
        assert!(
            err.message()
                .starts_with("the saved state does not fit: k: "),
            "{err}"
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        let p = plugin();
        let err = p
            .observe(ObserveParams {
                key: None,
                score: f64::NAN,
                latency_ms: 1.0,
                output_size: 1.0,
            })
            .unwrap_err();
        assert!(err.message().contains("score"), "{err}");
        let err = Harness::<Attribution>::new(json!({"window": 10})).unwrap_err();
        assert!(err.message().contains("unknown field `window`"), "{err}");
        Harness::<Attribution>::new(json!({})).unwrap();
    }
}
