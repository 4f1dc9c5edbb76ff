//! `GET /metrics`: the worker's metrics in the OpenMetrics text format, through the Prometheus
//! client crate's registry and encoder. Plugin figures are read from the host at each scrape (a
//! collector: the call path only fills the host's per-thread counters and histograms); the
//! task figures are recorded by the pipeline as tasks end.

use std::fmt;
use std::sync::Arc;

use plugin_host::{LATENCY_BUCKETS, PluginHost, latency_bucket_bound};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Labels of a task counter: its type, handler, experiment variant (`-` for none) and outcome
/// (`completed`, `failed`, `blocked` or `bad_line`).
type TaskLabels = [(&'static str, String); 4];
/// Labels of the task duration and score histograms.
type HandlerLabels = [(&'static str, String); 3];

fn task_duration() -> Histogram {
    // 0.1 ms to about 26 s.
    Histogram::new(exponential_buckets(1e-4, 4.0, 10))
}

fn task_score() -> Histogram {
    // Scores are 0..1: ten buckets of 0.1.
    Histogram::new(linear_buckets(0.1, 0.1, 10))
}

/// The worker's own task figures, shared by every pipeline of a served worker.
#[derive(Debug)]
pub struct TaskMetrics {
    tasks: Family<TaskLabels, Counter>,
    duration: Family<HandlerLabels, Histogram, fn() -> Histogram>,
    score: Family<HandlerLabels, Histogram, fn() -> Histogram>,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        Self {
            tasks: Family::default(),
            duration: Family::new_with_constructor(task_duration),
            score: Family::new_with_constructor(task_score),
        }
    }
}

/// How a task ended, for [`TaskMetrics::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    /// A result was written.
    Completed,
    /// The task failed.
    Failed,
    /// A hook subscriber blocked it.
    Blocked,
    /// The line or value was not a task.
    BadLine,
}

impl TaskOutcome {
    fn as_str(self) -> &'static str {
        match self {
            TaskOutcome::Completed => "completed",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Blocked => "blocked",
            TaskOutcome::BadLine => "bad_line",
        }
    }
}

/// One ended task, as [`TaskMetrics::record`] counts it.
#[derive(Debug, Clone, Copy)]
pub struct TaskEnd<'a> {
    /// The task type (`-` when unknown).
    pub task_type: &'a str,
    /// The handler that ran (`-` when none was chosen).
    pub handler: &'a str,
    /// The experiment variant (`-` for none).
    pub variant: &'a str,
    /// How it ended.
    pub outcome: TaskOutcome,
    /// Its duration in seconds, when it ran.
    pub seconds: Option<f64>,
    /// Its score, when it had a reference.
    pub score: Option<f64>,
}

impl TaskMetrics {
    /// Counts one ended task.
    pub fn record(&self, end: TaskEnd<'_>) {
        self.tasks
            .get_or_create(&[
                ("type", end.task_type.to_owned()),
                ("handler", end.handler.to_owned()),
                ("variant", end.variant.to_owned()),
                ("outcome", end.outcome.as_str().to_owned()),
            ])
            .inc();
        let labels = [
            ("type", end.task_type.to_owned()),
            ("handler", end.handler.to_owned()),
            ("variant", end.variant.to_owned()),
        ];
        if let Some(seconds) = end.seconds {
            self.duration.get_or_create(&labels).observe(seconds);
        }
        if let Some(score) = end.score {
            self.score.get_or_create(&labels).observe(score);
        }
    }
}

/// Everything `/metrics` shows: the host's plugins and the served worker's tasks.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tasks: Arc<TaskMetrics>,
}

impl Metrics {
    /// The metrics of a worker serving `host`.
    pub fn new(host: PluginHost) -> Self {
        let mut registry = Registry::with_prefix("worker");
        let tasks = Arc::new(TaskMetrics::default());
        registry.register(
            "tasks",
            "Tasks ended, by type, handler, experiment variant and outcome.",
            tasks.tasks.clone(),
        );
        registry.register_with_unit(
            "task_duration",
            "Time a task took, hooks and plugins included.",
            Unit::Seconds,
            tasks.duration.clone(),
        );
        registry.register(
            "task_score",
            "Scores (0..1) of tasks with a reference.",
            tasks.score.clone(),
        );
        registry.register_collector(Box::new(HostCollector(host)));
        Self { registry, tasks }
    }

    /// The task figures, for the pipelines that run the tasks.
    pub fn tasks(&self) -> Arc<TaskMetrics> {
        Arc::clone(&self.tasks)
    }

    /// The metrics as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics: encoding failed");
        }
        out
    }
}

/// Reads the plugin figures off the host at each scrape.
#[derive(Debug)]
struct HostCollector(PluginHost);

/// A counter or gauge family per plugin: name, help, unit, type, value.
type PerPlugin = (
    &'static str,
    &'static str,
    Option<Unit>,
    MetricType,
    fn(&plugin_host::LoadedPlugin) -> f64,
);

impl Collector for HostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let host = &self.0;
        let plugins = host.plugins();
        let families: [PerPlugin; 14] = [
            (
                "plugin_calls",
                "Calls and hook deliveries that reached the plugin.",
                None,
                MetricType::Counter,
                |p| p.stats.calls as f64,
            ),
            (
                "plugin_errors",
                "Calls that ended in an error.",
                None,
                MetricType::Counter,
                |p| p.stats.errors as f64,
            ),
            (
                "plugin_panics",
                "Calls that panicked (caught).",
                None,
                MetricType::Counter,
                |p| p.stats.panics as f64,
            ),
            (
                "plugin_call_duration_max",
                "The longest call since the plugin was first loaded: the longest timed (one call in the timing sample), or a lower bound of a longer one from the watchdog's 50 ms clock.",
                Some(Unit::Seconds),
                MetricType::Gauge,
                |p| p.stats.max_latency.as_secs_f64(),
            ),
            (
                "plugin_breaker_state",
                "Circuit breaker state: 0 closed (or off), 1 open, 2 half-open.",
                None,
                MetricType::Gauge,
                |p| match p.health.breaker {
                    "open" => 1.0,
                    "half-open" => 2.0,
                    _ => 0.0,
                },
            ),
            (
                "plugin_breaker_opened",
                "Times the circuit breaker opened.",
                None,
                MetricType::Counter,
                |p| p.health.times_opened as f64,
            ),
            (
                "plugin_breaker_refused",
                "Calls and hook deliveries refused while the breaker was open.",
                None,
                MetricType::Counter,
                |p| p.health.calls_refused as f64,
            ),
            (
                "plugin_consecutive_failures",
                "Failures in a row since the last success.",
                None,
                MetricType::Gauge,
                |p| f64::from(p.health.consecutive_failures),
            ),
            (
                "plugin_timeouts",
                "Calls found running past their deadline.",
                None,
                MetricType::Counter,
                |p| p.health.timeouts as f64,
            ),
            (
                "plugin_isolated",
                "1 when the plugin runs in a child process of its own (isolation \"process\"), 0 in-process.",
                None,
                MetricType::Gauge,
                |p| f64::from(u8::from(p.isolation.mode == "process")),
            ),
            (
                "plugin_quarantined",
                "1 when a crash record quarantines the plugin (it then runs isolated).",
                None,
                MetricType::Gauge,
                |p| f64::from(u8::from(p.isolation.quarantined.is_some())),
            ),
            (
                "plugin_crashes",
                "Times an isolated plugin's process crashed (a signal, an exit, out of memory).",
                None,
                MetricType::Counter,
                |p| p.isolation.crashes as f64,
            ),
            (
                "plugin_restarts",
                "Times an isolated plugin's process was started again after a crash or an overrun.",
                None,
                MetricType::Counter,
                |p| p.isolation.restarts as f64,
            ),
            (
                "plugin_restarts_suspended",
                "1 when an isolated plugin crashed too often and is not restarted until a reset or reload.",
                None,
                MetricType::Gauge,
                |p| f64::from(u8::from(p.isolation.restarts_suspended)),
            ),
        ];
        for (name, help, unit, kind, value) in families {
            let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), kind)?;
            for plugin in &plugins {
                let labels = [("plugin", plugin.name.as_str())];
                let mut metric = family.encode_family(&labels)?;
                let value = value(plugin);
                if kind == MetricType::Counter {
                    // Every counter here counts events: written as an integer.
                    metric.encode_counter::<NoLabelSet, _, u64>(&(value as u64), None)?;
                } else {
                    metric.encode_gauge(&value)?;
                }
            }
        }

        let mut info = encoder.encode_descriptor(
            "plugin",
            "Each loaded plugin's version and generation (always 1).",
            None,
            MetricType::Info,
        )?;
        for plugin in &plugins {
            let generation = plugin.generation.to_string();
            let labels = [
                ("plugin", plugin.name.as_str()),
                ("version", plugin.version.as_str()),
                ("generation", generation.as_str()),
            ];
            info.encode_info(&labels)?;
        }

        let mut latency = encoder.encode_descriptor(
            "plugin_call_duration",
            "Time in the plugin per call, by method (kind=\"method\") or hook point (kind=\"hook\"). The count is exact; buckets and sum are estimated from the calls timed (about one in the timing sample N, --call-timing-sample), each standing for the calls its thread counted since the one timed before it; every series only grows.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (plugin, histograms) in host.latencies() {
            for histogram in histograms {
                let labels = [
                    ("plugin", plugin.as_str()),
                    ("kind", histogram.kind.as_str()),
                    ("name", histogram.name.as_str()),
                ];
                let buckets: Vec<(f64, u64)> = histogram
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, count)| {
                        let bound = if i < LATENCY_BUCKETS {
                            latency_bucket_bound(i)
                        } else {
                            f64::INFINITY
                        };
                        (bound, *count)
                    })
                    .collect();
                latency
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        histogram.sum_seconds,
                        histogram.count(),
                        &buckets,
                        None,
                    )?;
            }
        }

        let refused = i64::try_from(host.refused().len()).unwrap_or(i64::MAX);
        let gauge = |encoder: &mut DescriptorEncoder, name, help, value: i64| {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)
        };
        gauge(
            &mut encoder,
            "plugin_refused_files",
            "Files in the plugins directory that were refused.",
            refused,
        )?;
        gauge(
            &mut encoder,
            "config_reload_failed",
            "1 when the last reload of the configuration failed (the previous one stays in force).",
            i64::from(host.config_reload_failed()),
        )?;
        Ok(())
    }
}
