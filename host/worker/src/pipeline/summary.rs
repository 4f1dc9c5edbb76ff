//! The end-of-run summary: per task type, handler and variant, and per plugin.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{TaskError, TaskRecord};
use plugin_host::{PluginHost, PluginStats};

/// One row of the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// Tasks in the row.
    pub count: usize,
    /// Mean score of those that had a reference.
    pub mean_score: Option<f64>,
    /// Median time per task (whole pipeline), in milliseconds.
    pub p50_ms: f64,
    /// 95th percentile of the same.
    pub p95_ms: f64,
    #[serde(skip)]
    scores: Vec<f64>,
    #[serde(skip)]
    total_ms: Vec<f64>,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Rows keyed by `type/handler/variant` (`-` for no variant).
    pub rows: BTreeMap<String, Row>,
    /// Tasks with a result.
    pub completed: usize,
    /// Tasks that failed (bad lines and blocked tasks included).
    pub failed: usize,
    /// Of those, tasks a hook subscriber blocked.
    pub blocked: usize,
    /// Of those, lines that were not tasks.
    pub bad_lines: usize,
    /// Wall time of the run (`elapsed_s` in JSON, seconds to the millisecond).
    #[serde(rename = "elapsed_s", serialize_with = "as_secs")]
    pub elapsed: Duration,
    /// Statistics of every loaded plugin at the end of the run.
    pub plugins: BTreeMap<String, PluginStats>,
    /// Each experiment's variants against its control, from `experiment.stats` at the end of
    /// the run (empty without the plugin).
    pub experiments: BTreeMap<String, ExperimentSummary>,
}

/// One experiment at the end of a run, as `experiment.stats` reported it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentSummary {
    /// The control variant.
    #[serde(default)]
    pub control: Option<String>,
    /// The sample-ratio check of the assignments.
    #[serde(default)]
    pub sample_ratio: SampleRatio,
    /// Each variant (the control included).
    #[serde(default)]
    pub variants: BTreeMap<String, VariantSummary>,
}

/// The sample-ratio check: a mismatch means the comparison is not to be trusted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SampleRatio {
    /// The chi-square test's p-value.
    #[serde(default)]
    pub p_value: Option<f64>,
    /// Whether the p-value is below the plugin's level.
    #[serde(default)]
    pub mismatch: bool,
}

/// One variant of an experiment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VariantSummary {
    /// Scores counted for it.
    #[serde(default)]
    pub outcomes: u64,
    /// Their mean.
    #[serde(default)]
    pub mean_score: Option<f64>,
    /// The difference from the control (null for the control, or too few outcomes).
    #[serde(default)]
    pub vs_control: Option<VsControl>,
}

/// A variant's mean minus the control's, with Welch's 95 % interval and two-sided p-value.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsControl {
    /// The difference of the means.
    pub diff: f64,
    /// The interval's lower end.
    pub ci_low: f64,
    /// The interval's upper end.
    pub ci_high: f64,
    /// The p-value of "no difference".
    pub p_value: f64,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_millis() as f64 / 1e3)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Summary {
    pub(crate) fn add(&mut self, record: &TaskRecord) {
        self.completed += 1;
        let key = format!(
            "{}/{}/{}",
            record.task_type,
            record.handler,
            record.variant.as_deref().unwrap_or("-")
        );
        let row = self.rows.entry(key).or_default();
        row.count += 1;
        if let Some(score) = record.score {
            row.scores.push(score);
        }
        row.total_ms.push(record.total_ms);
    }

    pub(crate) fn add_error(&mut self, error: &TaskError) {
        self.failed += 1;
        if error.blocked_by.is_some() {
            self.blocked += 1;
        }
        if error.not_a_task {
            self.bad_lines += 1;
        }
    }

    pub(crate) fn finish(&mut self, elapsed: Duration, host: &PluginHost) {
        self.elapsed = elapsed;
        for row in self.rows.values_mut() {
            row.total_ms.sort_by(f64::total_cmp);
            row.p50_ms = percentile(&row.total_ms, 0.5);
            row.p95_ms = percentile(&row.total_ms, 0.95);
            // Four decimals: the scores themselves are ratios of small counts.
            row.mean_score = (!row.scores.is_empty()).then(|| {
                super::rounded(row.scores.iter().sum::<f64>() / row.scores.len() as f64, 4)
            });
        }
        self.plugins = host
            .plugins()
            .into_iter()
            .map(|p| (p.name, p.stats))
            .collect();
        self.experiments = experiments(host);
    }

    /// Tasks (completed or failed) per second.
    pub fn tasks_per_second(&self) -> f64 {
        (self.completed + self.failed) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Mean score of the rows whose key starts with `prefix` (e.g. `chat/` or `chat/recall/`).
    pub fn mean_score(&self, prefix: &str) -> Option<f64> {
        let (sum, n) = self
            .rows
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .flat_map(|(_, r)| r.scores.iter())
            .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        (n > 0).then(|| sum / n as f64)
    }
}

/// `experiment.stats`, read leniently: nothing when the plugin is missing or answers another
/// shape (logged).
fn experiments(host: &PluginHost) -> BTreeMap<String, ExperimentSummary> {
    match host.call_with::<_, BTreeMap<String, ExperimentSummary>>(
        "experiment",
        "stats",
        &serde_json::json!({}),
    ) {
        Ok(stats) => stats.unwrap_or_default(),
        Err(e) => {
            if !e.is_missing() {
                tracing::warn!(error = %e, "experiment.stats failed; the summary shows no experiment");
            }
            BTreeMap::new()
        }
    }
}

/// A signed number with 3 decimals.
fn signed(x: f64) -> String {
    format!("{x:+.3}")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:<20} {:<8} {:>6} {:>10} {:>9} {:>9}",
            "type", "handler", "variant", "count", "mean score", "p50 ms", "p95 ms"
        )?;
        for (key, row) in &self.rows {
            let mut parts = key.splitn(3, '/');
            // Task types come from the input, variants from plugins: no control characters.
            let mut part = || plugin_host::text::escape_control(parts.next().unwrap_or(""));
            let (t, h, v) = (part(), part(), part());
            let score = row
                .mean_score
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.3}"));
            writeln!(
                f,
                "{t:<10} {h:<20} {v:<8} {:>6} {score:>10} {:>9.3} {:>9.3}",
                row.count, row.p50_ms, row.p95_ms
            )?;
        }
        if self
            .experiments
            .values()
            .any(|e| e.variants.len() > 1 || e.sample_ratio.mismatch)
        {
            writeln!(f)?;
            writeln!(
                f,
                "{:<10} {:<20} {:<8} {:>8} {:>10} {:>20} {:>9}",
                "experiment",
                "variant",
                "control",
                "outcomes",
                "vs control",
                "95% interval",
                "p-value"
            )?;
            for (name, experiment) in &self.experiments {
                let name = plugin_host::text::escape_control(name);
                let control = experiment.control.as_deref().unwrap_or("");
                for (variant, v) in &experiment.variants {
                    if variant == control {
                        continue;
                    }
                    let (diff, interval, p) = match v.vs_control {
                        Some(d) => (
                            signed(d.diff),
                            format!("[{}, {}]", signed(d.ci_low), signed(d.ci_high)),
                            if d.p_value < 0.001 {
                                "<0.001".to_owned()
                            } else {
                                format!("{:.3}", d.p_value)
                            },
                        ),
                        None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
                    };
                    writeln!(
                        f,
                        "{name:<10} {:<20} {:<8} {:>8} {diff:>10} {interval:>20} {p:>9}",
                        plugin_host::text::escape_control(variant),
                        plugin_host::text::escape_control(control),
                        v.outcomes,
                    )?;
                }
                if experiment.sample_ratio.mismatch {
                    writeln!(
                        f,
                        "{name}: SAMPLE-RATIO MISMATCH (p = {:.2e}): the assignments do not fit the weights; do not trust this comparison",
                        experiment.sample_ratio.p_value.unwrap_or(0.0)
                    )?;
                }
            }
        }
        if !self.plugins.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "{:<14} {:>8} {:>7} {:>7} {:>10} {:>10}",
                "plugin", "calls", "errors", "panics", "mean µs", "max µs"
            )?;
            for (name, s) in &self.plugins {
                let name = plugin_host::text::escape_control(name);
                writeln!(
                    f,
                    "{name:<14} {:>8} {:>7} {:>7} {:>10.1} {:>10.1}",
                    s.calls,
                    s.errors,
                    s.panics,
                    s.mean_latency().as_secs_f64() * 1e6,
                    s.max_latency.as_secs_f64() * 1e6
                )?;
            }
        }
        writeln!(f)?;
        write!(
            f,
            "{} {} done, {} failed ({} blocked, {} bad {}) in {:.2} s: {:.0} tasks/s",
            self.completed,
            if self.completed == 1 { "task" } else { "tasks" },
            self.failed,
            self.blocked,
            self.bad_lines,
            if self.bad_lines == 1 { "line" } else { "lines" },
            self.elapsed.as_secs_f64(),
            self.tasks_per_second()
        )
    }
}
