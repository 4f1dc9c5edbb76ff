//! `experiment`: A/B tests with weighted variants.
//!
//! The pattern it serves: `variant = execute("experiment", "pickVariant", {...}) or "A"`.
//!
//! # Configuration
//!
//! ```json
//! {
//!   "experiments": {
//!     "tone": { "variants": { "A": 1, "B": 3 }, "control": "A" },
//!     "summary-length": { "variants": { "short": 1, "long": 1 }, "taskTypes": ["summarize"] }
//!   },
//!   "seed": 7
//! }
//! ```
//!
//! - `variants`: name → weight (a non-negative number; at least one above zero). A variant's share
//!   of traffic is its weight over the sum.
//! - `taskTypes` (optional): the task types the experiment applies to; for others `pickVariant`
//!   answers `null` and the caller keeps its default.
//! - `control` (optional): the variant the others are compared with; default the first variant
//!   in name order.
//! - `seed` (optional): seeds the random picks of calls without a key, for reproducible runs.
//!
//! # Methods
//!
//! - `pickVariant {"experiment", "key"?, "taskType"?, "optional"?}` → the variant name. The same
//!   key always gets the same variant (sticky); without a key the pick is weighted-random. An
//!   experiment that is not configured is an error, or `null` with `"optional": true` (what the
//!   worker's pipeline sends: it asks about an experiment named after each task type).
//! - `recordOutcome {"experiment", "variant", "score"}` → nothing; counts the score.
//! - `stats {"experiment"?}` → per experiment: `{"control", "sampleRatio": {"pValue",
//!   "mismatch"}, "variants": {variant: {"assigned", "uniqueKeys", "outcomes", "meanScore",
//!   "ciLow", "ciHigh", "vsControl": {"diff", "ciLow", "ciHigh", "pValue"} | null}}}`.
//!
//! # Reading the statistics
//!
//! - Per variant the plugin keeps count, sum and sum of squares of the scores.
//!   `meanScore` comes with a 95 % Student-t interval `[ciLow, ciHigh]` (`null` below two
//!   outcomes).
//! - `vsControl` compares the variant with the control: `diff` is its mean minus the control's,
//!   `[ciLow, ciHigh]` the 95 % interval of the difference and `pValue` the two-sided p-value of
//!   "no difference", both from Welch's unequal-variance t-test (`null` while either arm has
//!   fewer than two outcomes, and for the control itself). An interval that excludes 0 is a
//!   difference at the 5 % level; looking again and again at a running experiment inflates that
//!   rate, so fix the sample size first and read the result once.
//! - `sampleRatio` is the sample-ratio-mismatch guard: `pValue` of Pearson's chi-square test of
//!   the `assigned` counts against the configured weights, and `mismatch` when it is below 0.001
//!   (a warning is logged too). A mismatch means the assignment or the logging is broken (or the
//!   weights changed mid-experiment): do not trust the comparison. It counts calls; a caller
//!   that asks many times for some keys and once for others can trip it too.
//! - `assigned` counts calls of `pickVariant`; `uniqueKeys` estimates the distinct keys among
//!   them with a HyperLogLog (standard error about 3.3 %, near exact below about 2,500 keys).
//!
//! # Hooks
//!
//! `task.scored` (audit, priority 30): when the payload names an `experiment` and a `variant`
//! this plugin knows, the `score` is recorded as an outcome, as `recordOutcome` would.
//!
//! Outcome statistics survive hot reloads (`save_state` / `restore_state`).
//!
//! # A fleet
//!
//! When the host offers a store (`plugin_api::store`), the statistics are the fleet's: per
//! experiment and variant the key `exp/<experiment>/<variant>` holds `assigned`, `units`,
//! `n`, `sum` and `sumsq`, and `stats` reports them. A scored task counts once fleet-wide
//! (mark `scored/<experiment>/<task id>`), a unit once (mark `unit/<experiment>/<key>`: exact
//! unique units, where the local figure is a HyperLogLog estimate). Assignment stays a local
//! hash. Without a store the plugin keeps its own counts, as above.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use plugin_api::assign::{Random, stable_hash, unit};
use plugin_api::stats::{Moments, UniqueCount, chi_square_fit, welch};
use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, Value, export_plugin,
};
use serde::{Deserialize, Serialize};

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The experiments by name.
    #[serde(default)]
    pub experiments: BTreeMap<String, ExperimentConfig>,
    /// Seeds the random picks of calls without a key.
    pub seed: Option<u64>,
}

/// One experiment of the [`Config`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExperimentConfig {
    /// Variant name → weight.
    pub variants: BTreeMap<String, f64>,
    /// The task types it applies to; all when absent.
    pub task_types: Option<Vec<String>>,
    /// The variant the others are compared with; the first in name order when absent.
    pub control: Option<String>,
}

#[derive(Debug)]
struct Experiment {
    /// Variants with their cumulative weight, in name order.
    cumulative: Vec<(String, f64)>,
    total: f64,
    task_types: Option<Vec<String>>,
    control: String,
    /// The store key of each variant's statistics, in the order of `cumulative`: made once, so
    /// an addition neither builds nor looks up the name.
    keys: Vec<plugin_api::store::Key>,
}

impl Experiment {
    fn from_config(name: &str, config: ExperimentConfig) -> Result<Self, PluginError> {
        let mut cumulative = Vec::with_capacity(config.variants.len());
        let mut total = 0.0;
        for (variant, weight) in config.variants {
            if !weight.is_finite() || weight < 0.0 {
                return Err(PluginError::new(format!(
                    "experiments.{name}.variants.{variant}: weight must be a number >= 0, found {weight}"
                )));
            }
            total += weight;
            cumulative.push((variant, total));
        }
        if total <= 0.0 {
            return Err(PluginError::new(format!(
                "experiments.{name}.variants: needs at least one variant with a weight above 0"
            )));
        }
        let control = match config.control {
            Some(control) if cumulative.iter().any(|(v, _)| *v == control) => control,
            Some(control) => {
                return Err(PluginError::new(format!(
                    "experiments.{name}.control: `{control}` is not one of the variants"
                )));
            }
            None => cumulative
                .first()
                .map(|(v, _)| v.clone())
                .unwrap_or_default(),
        };
        let keys = cumulative
            .iter()
            .map(|(variant, _)| plugin_api::store::Key::new(store_key(name, variant)))
            .collect();
        Ok(Self {
            cumulative,
            total,
            task_types: config.task_types,
            control,
            keys,
        })
    }

    /// The store key of `variant`'s statistics, if it is one of the variants.
    fn key_of(&self, variant: &str) -> Option<&plugin_api::store::Key> {
        let at = self.cumulative.iter().position(|(v, _)| v == variant)?;
        self.keys.get(at)
    }

    /// The variant at `fraction` (in 0..1) of the weighted range.
    fn at(&self, fraction: f64) -> &str {
        let point = fraction * self.total;
        self.cumulative
            .iter()
            .find(|(_, upto)| point < *upto)
            .or(self.cumulative.last())
            .map_or("", |(name, _)| name.as_str())
    }
}

/// Counts of one variant. `scoreSumSq` and `keys` are absent in states of older versions: such
/// a variant's outcomes restart on restore (its `assigned` count is kept).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VariantStats {
    /// Times `pickVariant` chose it.
    pub assigned: u64,
    /// Outcomes recorded for it.
    pub outcomes: u64,
    /// Sum of their scores.
    pub score_sum: f64,
    /// Sum of their squares.
    pub score_sum_sq: Option<f64>,
    /// The distinct keys it was picked for.
    #[serde(default)]
    pub keys: UniqueCount,
}

impl VariantStats {
    fn moments(&self) -> Moments {
        Moments {
            count: self.outcomes,
            sum: self.score_sum,
            sum_sq: self.score_sum_sq.unwrap_or(0.0),
        }
    }
}

/// Below this p-value the assignments are reported as not fitting the weights.
const SRM_LEVEL: f64 = 0.001;

/// Counts per experiment and variant: the state carried over a reload.
pub type Stats = BTreeMap<String, BTreeMap<String, VariantStats>>;

/// The plugin instance.
#[derive(Debug)]
pub struct ExperimentPlugin {
    experiments: BTreeMap<String, Experiment>,
    stats: Mutex<Stats>,
    rng: Random,
    /// Whether the host offers a store: the statistics are then the fleet's.
    shared: bool,
}

/// The store key of a variant's statistics.
fn store_key(experiment: &str, variant: &str) -> String {
    plugin_api::store::join(&["exp", experiment, variant])
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PickParams {
    experiment: String,
    key: Option<String>,
    task_type: Option<String>,
    #[serde(default)]
    optional: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeParams {
    experiment: String,
    variant: String,
    score: f64,
    /// The task's id: with a store, a task counts once fleet-wide.
    #[serde(default)]
    id: Option<String>,
}

/// The fields of a `task.scored` payload this plugin reads.
#[derive(Debug, Deserialize)]
struct Scored {
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    id: Option<String>,
    experiment: Option<String>,
    variant: Option<String>,
    score: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsParams {
    experiment: Option<String>,
}

impl ExperimentPlugin {
    fn experiment(&self, name: &str) -> Result<&Experiment, PluginError> {
        self.experiments.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.experiments.keys().map(String::as_str).collect();
            PluginError::new(format!(
                "no experiment `{name}` in the configuration (configured: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    fn stats_lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pick(&self, p: PickParams) -> Result<Option<String>, PluginError> {
        if p.optional && !self.experiments.contains_key(&p.experiment) {
            return Ok(None);
        }
        let experiment = self.experiment(&p.experiment)?;
        if let (Some(allowed), Some(task_type)) = (&experiment.task_types, &p.task_type)
            && !allowed.contains(task_type)
        {
            return Ok(None);
        }
        let draw = match &p.key {
            // The plugin's name and the experiment's in the key: another plugin that splits the
            // same keys (the champion's routing) draws an independent number.
            Some(key) => stable_hash(&["experiment", &p.experiment, key]),
            None => self.rng.next_u64(),
        };
        let variant = experiment.at(unit(draw)).to_owned();
        let mut stats = self.stats_lock();
        let entry = stats
            .entry(p.experiment.clone())
            .or_default()
            .entry(variant.clone())
            .or_default();
        entry.assigned += 1;
        if self.shared
            && let Some(k) = experiment.key_of(&variant)
        {
            plugin_api::store::add(k, &[("assigned", 1.0)]);
            if let Some(key) = &p.key {
                plugin_api::store::add_once_joined(
                    &["unit", &p.experiment, key],
                    &[(k, &[("units", 1.0)])],
                );
            }
        }
        if let Some(key) = &p.key {
            // A hash of its own: the assignment's would crowd the variant's keys into a few
            // registers.
            entry
                .keys
                .add(stable_hash(&["experiment-unique-keys", key]));
        }
        Ok(Some(variant))
    }

    fn record(&self, p: OutcomeParams) -> Result<(), PluginError> {
        let experiment = self.experiment(&p.experiment)?;
        let Some(key) = experiment.key_of(&p.variant) else {
            return Err(PluginError::invalid_params(format!(
                "experiment `{}` has no variant `{}`",
                p.experiment, p.variant
            )));
        };
        if !p.score.is_finite() {
            return Err(PluginError::invalid_params("score must be a finite number"));
        }
        if self.shared {
            let fields = [("n", 1.0), ("sum", p.score), ("sumsq", p.score * p.score)];
            match &p.id {
                Some(id) => {
                    if plugin_api::store::add_once_joined(
                        &["scored", &p.experiment, id],
                        &[(key, &fields)],
                    ) == Some(false)
                    {
                        // Scored before in this process: counted once.
                        return Ok(());
                    }
                }
                None => {
                    plugin_api::store::add(key, &fields);
                }
            }
        }
        let mut stats = self.stats_lock();
        let entry = stats
            .entry(p.experiment)
            .or_default()
            .entry(p.variant)
            .or_default();
        entry.outcomes += 1;
        entry.score_sum += p.score;
        entry.score_sum_sq = Some(entry.score_sum_sq.unwrap_or(0.0) + p.score * p.score);
        Ok(())
    }

    fn report(&self, p: Option<StatsParams>) -> Result<Value, PluginError> {
        let only = p.unwrap_or_default().experiment;
        if let Some(name) = &only {
            self.experiment(name)?;
        }
        // Without a store the report is one look at the statistics, taken under one lock.
        let held = (!self.shared).then(|| self.stats_lock());
        let mut report = serde_json::Map::new();
        for (name, experiment) in &self.experiments {
            if only.as_ref().is_some_and(|o| o != name) {
                continue;
            }
            // The store is read with the statistics' lock let go: a read of a key the store
            // has not cached yet may wait for the store, and every task takes that lock.
            let of = |variant: &str| -> (VariantStats, u64) {
                if self.shared
                    && let Some(f) = plugin_api::store::read(&store_key(name, variant))
                {
                    let get = |field: &str| f.get(field).copied().unwrap_or(0.0);
                    let whole = |field: &str| get(field).max(0.0).round() as u64;
                    let s = VariantStats {
                        assigned: whole("assigned"),
                        outcomes: whole("n"),
                        score_sum: get("sum"),
                        score_sum_sq: Some(get("sumsq")),
                        keys: UniqueCount::default(),
                    };
                    return (s, whole("units"));
                }
                let local = |stats: &Stats| {
                    stats
                        .get(name)
                        .and_then(|v| v.get(variant))
                        .cloned()
                        .unwrap_or_default()
                };
                let s = match &held {
                    Some(stats) => local(stats),
                    None => local(&self.stats_lock()),
                };
                let units = s.keys.estimate();
                (s, units)
            };
            let control = of(&experiment.control).0.moments();
            let mut variants = serde_json::Map::new();
            let mut assigned = Vec::new();
            let mut weights = Vec::new();
            let mut previous = 0.0;
            for (variant, upto) in &experiment.cumulative {
                let (s, units) = of(variant);
                assigned.push(s.assigned);
                weights.push(upto - previous);
                previous = *upto;
                let m = s.moments();
                let interval = m.interval(0.95);
                let vs_control = (*variant != experiment.control)
                    .then(|| welch(&control, &m, 0.95))
                    .flatten()
                    .map(|w| {
                        serde_json::json!({
                            "diff": w.diff, "ciLow": w.low, "ciHigh": w.high, "pValue": w.p_value,
                        })
                    });
                variants.insert(
                    variant.clone(),
                    serde_json::json!({
                        "assigned": s.assigned,
                        "uniqueKeys": units,
                        "outcomes": s.outcomes,
                        "meanScore": m.mean(),
                        "ciLow": interval.map(|i| i.low),
                        "ciHigh": interval.map(|i| i.high),
                        "vsControl": vs_control,
                    }),
                );
            }
            let ratio_p = chi_square_fit(&assigned, &weights);
            let mismatch = ratio_p.is_some_and(|p| p < SRM_LEVEL);
            if mismatch {
                tracing::warn!(
                    experiment = %name,
                    p_value = ratio_p,
                    ?assigned,
                    ?weights,
                    "sample-ratio mismatch: the assignments do not fit the configured weights; the comparison is not to be trusted"
                );
            }
            report.insert(
                name.clone(),
                serde_json::json!({
                    "control": experiment.control,
                    "sampleRatio": {"pValue": ratio_p, "mismatch": mismatch},
                    "variants": variants,
                    "fleet": self.shared,
                }),
            );
        }
        Ok(Value::Object(report))
    }
}

impl Plugin for ExperimentPlugin {
    type Config = Config;
    type State = Stats;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "experiment",
            env!("CARGO_PKG_VERSION"),
            "A/B tests: weighted, sticky variant picks and per-variant outcome statistics",
        )
    }

    fn create(config: Config) -> Result<Self, PluginError> {
        let mut experiments = BTreeMap::new();
        for (name, experiment) in config.experiments {
            let experiment = Experiment::from_config(&name, experiment)?;
            experiments.insert(name, experiment);
        }
        if experiments.is_empty() {
            tracing::warn!("no experiments configured; pickVariant will answer nothing");
        }
        Ok(Self {
            experiments,
            stats: Mutex::new(Stats::new()),
            rng: Random::seeded(config.seed),
            shared: plugin_api::store::available(),
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "pickVariant",
                "Picks a variant: {\"experiment\", \"key\"?, \"taskType\"?} -> \"B\"",
                Self::pick,
            )
            .method(
                "recordOutcome",
                "Records a score: {\"experiment\", \"variant\", \"score\"}",
                Self::record,
            )
            .method(
                "stats",
                "Per-variant counts and mean scores: {\"experiment\"?}",
                Self::report,
            );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on(
            "task.scored",
            30,
            HookMode::Audit,
            |this: &Self, scored: Scored| {
                if let (Some(experiment), Some(variant), Some(score)) =
                    (scored.experiment, scored.variant, scored.score)
                    && this.experiments.contains_key(&experiment)
                {
                    this.record(OutcomeParams {
                        experiment,
                        variant,
                        score,
                        id: scored.id,
                    })?;
                }
                Ok(HookResult::Continue)
            },
        );
    }

    fn save_state(&self) -> Result<Option<Stats>, PluginError> {
        Ok(Some(self.stats_lock().clone()))
    }

    fn restore_state(&self, saved: Stats) -> Result<(), PluginError> {
        let mut stats = self.stats_lock();
        for (experiment, variants) in saved {
            for (variant, s) in variants {
                let consistent = s.score_sum.is_finite()
                    && s.score_sum_sq.is_none_or(|q| q.is_finite() && q >= 0.0)
                    && s.keys.is_consistent();
                if !consistent {
                    tracing::warn!(%experiment, %variant, "saved variant statistics are inconsistent; dropped");
                    continue;
                }
                let entry = stats
                    .entry(experiment.clone())
                    .or_default()
                    .entry(variant.clone())
                    .or_default();
                entry.assigned += s.assigned;
                entry.keys.merge(&s.keys);
                match s.score_sum_sq {
                    Some(sum_sq) => {
                        entry.outcomes += s.outcomes;
                        entry.score_sum += s.score_sum;
                        entry.score_sum_sq = Some(entry.score_sum_sq.unwrap_or(0.0) + sum_sq);
                    }
                    None if s.outcomes > 0 => {
                        tracing::warn!(%experiment, %variant, "saved outcomes lack the sum of squares (an older version); they restart");
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

export_plugin!(ExperimentPlugin);

#[cfg(test)]
mod tests {
    use plugin_api::Harness;
    use serde_json::json;

    use super::*;

    fn plugin(config: Value) -> Harness<ExperimentPlugin> {
        Harness::new(config).unwrap()
    }

    #[test]
    fn weights_shape_the_split() {
        let p = plugin(json!({"experiments": {"e": {"variants": {"A": 1, "B": 3}}}, "seed": 1}));
        let mut b = 0;
        for i in 0..4000 {
            let v = p
                .plugin()
                .pick(PickParams {
                    experiment: "e".into(),
                    key: Some(format!("user-{i}")),
                    task_type: None,
                    optional: false,
                })
                .unwrap()
                .unwrap();
            b += usize::from(v == "B");
        }
        assert!((2800..3200).contains(&b), "B got {b} of 4000");
    }

    #[test]
    fn zero_total_weight_is_refused_with_the_field() {
        let err =
            Harness::<ExperimentPlugin>::new(json!({"experiments": {"e": {"variants": {"A": 0}}}}))
                .unwrap_err();
        assert!(err.message().contains("experiments.e.variants"), "{err}");
        let err = Harness::<ExperimentPlugin>::new(
            json!({"experiments": {"tone": {"variants": {"A": "x"}}}}),
        )
        .unwrap_err();
        assert!(
            err.message()
                .contains("experiments.tone.variants.A: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn outcomes_survive_a_reload_and_a_misfit_state_is_refused() {
        let p = plugin(json!({"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}}));
        let outcome = json!({"experiment": "tone", "variant": "B", "score": 0.5});
        p.call::<()>("recordOutcome", &outcome).unwrap();
        let before: Value = p.call("stats", &()).unwrap();
        let p = p.reload().unwrap();
        assert_eq!(p.call::<Value>("stats", &()).unwrap(), before);
        let err = p
            .restore_state(r#"{"tone": {"B": {"assigned": "many"}}}"#)
            .unwrap_err();
        assert!(err.message().contains("tone.B.assigned"), "{err}");
    }

    #[test]
    fn a_state_of_the_older_shape_keeps_assignments_and_restarts_outcomes() {
        let p = plugin(json!({"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}}));
        p.restore_state(r#"{"tone": {"A": {"assigned": 7, "outcomes": 2, "scoreSum": 1.0}}}"#)
            .unwrap();
        let stats: Value = p.call("stats", &()).unwrap();
        let a = &stats["tone"]["variants"]["A"];
        assert_eq!(
            (a["assigned"].as_u64(), a["outcomes"].as_u64()),
            (Some(7), Some(0))
        );
    }

    #[test]
    fn a_control_that_is_not_a_variant_is_refused() {
        let err = Harness::<ExperimentPlugin>::new(
            json!({"experiments": {"tone": {"variants": {"A": 1}, "control": "Z"}}}),
        )
        .unwrap_err();
        assert!(err.message().contains("experiments.tone.control"), "{err}");
    }
}
