//! `experiment`: A/B tests with weighted variants.
//!
//! The pattern it serves: `variant = execute("experiment", "pickVariant", {...}) or "A"`.
//!
//! # Configuration
//!
//! ```json
//! {
//!   "experiments": {
//!     "tone": { "variants": { "A": 1, "B": 3 } },
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
//! - `seed` (optional): seeds the random picks of calls without a key, for reproducible runs.
//!
//! # Methods
//!
//! - `pickVariant {"experiment", "key"?, "taskType"?, "optional"?}` → the variant name. The same
//!   key always gets the same variant (sticky); without a key the pick is weighted-random. An
//!   experiment that is not configured is an error, or `null` with `"optional": true` (what the
//!   worker's pipeline sends: it asks about an experiment named after each task type).
//! - `recordOutcome {"experiment", "variant", "score"}` → nothing; counts the score.
//! - `stats {"experiment"?}` → per experiment and variant: `assigned`, `outcomes`, `meanScore`.
//!
//! # Hooks
//!
//! `task.scored` (audit, priority 30): when the payload names an `experiment` and a `variant`
//! this plugin knows, the `score` is recorded as an outcome, as `recordOutcome` would.
//!
//! Outcome statistics survive hot reloads (`save_state` / `restore_state`).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use plugin_api::assign::{Random, stable_hash, unit};
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
}

#[derive(Debug)]
struct Experiment {
    /// Variants with their cumulative weight, in name order.
    cumulative: Vec<(String, f64)>,
    total: f64,
    task_types: Option<Vec<String>>,
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
        Ok(Self {
            cumulative,
            total,
            task_types: config.task_types,
        })
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

/// Counts of one variant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VariantStats {
    /// Times `pickVariant` chose it.
    pub assigned: u64,
    /// Outcomes recorded for it.
    pub outcomes: u64,
    /// Sum of their scores.
    pub score_sum: f64,
}

/// Counts per experiment and variant: the state carried over a reload.
pub type Stats = BTreeMap<String, BTreeMap<String, VariantStats>>;

/// The plugin instance.
#[derive(Debug)]
pub struct ExperimentPlugin {
    experiments: BTreeMap<String, Experiment>,
    stats: Mutex<Stats>,
    rng: Random,
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
}

/// The fields of a `task.scored` payload this plugin reads.
#[derive(Debug, Deserialize)]
struct Scored {
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
        if let (Some(allowed), Some(task_type)) = (&experiment.task_types, &p.task_type) {
            if !allowed.contains(task_type) {
                return Ok(None);
            }
        }
        let draw = match &p.key {
            // The plugin's name and the experiment's in the key: another plugin that splits the
            // same keys (the champion's routing) draws an independent number.
            Some(key) => stable_hash(&["experiment", &p.experiment, key]),
            None => self.rng.next_u64(),
        };
        let variant = experiment.at(unit(draw)).to_owned();
        self.stats_lock()
            .entry(p.experiment)
            .or_default()
            .entry(variant.clone())
            .or_default()
            .assigned += 1;
        Ok(Some(variant))
    }

    fn record(&self, p: OutcomeParams) -> Result<(), PluginError> {
        let experiment = self.experiment(&p.experiment)?;
        if !experiment
            .cumulative
            .iter()
            .any(|(name, _)| *name == p.variant)
        {
            return Err(PluginError::invalid_params(format!(
                "experiment `{}` has no variant `{}`",
                p.experiment, p.variant
            )));
        }
        if !p.score.is_finite() {
            return Err(PluginError::invalid_params("score must be a finite number"));
        }
        let mut stats = self.stats_lock();
        let entry = stats
            .entry(p.experiment)
            .or_default()
            .entry(p.variant)
            .or_default();
        entry.outcomes += 1;
        entry.score_sum += p.score;
        Ok(())
    }

    fn report(&self, p: Option<StatsParams>) -> Result<Value, PluginError> {
        let only = p.unwrap_or_default().experiment;
        if let Some(name) = &only {
            self.experiment(name)?;
        }
        let stats = self.stats_lock();
        let mut report = serde_json::Map::new();
        for (name, experiment) in &self.experiments {
            if only.as_ref().is_some_and(|o| o != name) {
                continue;
            }
            let mut variants = serde_json::Map::new();
            for (variant, _) in &experiment.cumulative {
                let s = stats
                    .get(name)
                    .and_then(|v| v.get(variant))
                    .cloned()
                    .unwrap_or_default();
                let mean = (s.outcomes > 0).then(|| s.score_sum / s.outcomes as f64);
                variants.insert(
                    variant.clone(),
                    serde_json::json!({
                        "assigned": s.assigned,
                        "outcomes": s.outcomes,
                        "meanScore": mean,
                    }),
                );
            }
            report.insert(name.clone(), Value::Object(variants));
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
                {
                    if this.experiments.contains_key(&experiment) {
                        this.record(OutcomeParams {
                            experiment,
                            variant,
                            score,
                        })?;
                    }
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
                let entry = stats
                    .entry(experiment.clone())
                    .or_default()
                    .entry(variant)
                    .or_default();
                entry.assigned += s.assigned;
                entry.outcomes += s.outcomes;
                entry.score_sum += s.score_sum;
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
}
