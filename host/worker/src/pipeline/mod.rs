//! The worker's main job: tasks in, scored results out, made measurable, experimental and
//! self-tuning by plugins without any change here.
//!
//! For each task (one JSON object: `id`, `type`, `input`, optional `reference` and `meta`):
//!
//! 1. `task.received` fires (subscribers may rewrite `input`/`meta`, or block: the task is
//!    skipped and its record says why).
//! 2. The candidates are the built-in handlers of the type plus `plugin:<name>` for every loaded
//!    plugin with a method `handle.<type>`. `task-policy.selectProfile` may narrow them
//!    (`handlers`) and set `maxWords`.
//! 3. The handler: the first of `model-router.chooseModel`, `champion.route`, `bandit.choose`
//!    that answers a candidate; else the experiment's variant when it names a candidate; else the
//!    type's default. `experiment.pickVariant {"experiment": <type>, "optional": true}` is asked
//!    for every task;
//!    its variant is recorded and handed to the handler (the summarize handlers know `short`).
//!    Every plugin that is missing or misbehaves simply has no say.
//! 4. `task.before_handle` fires (may change `handler`, `variant`, `input`, `meta`, or block).
//! 5. The handler runs; multi-step handlers fire `task.after_step` between steps.
//! 6. `task.after_handle` fires (may change `output`); the output is cut to `maxWords`.
//! 7. The built-in scorer compares the output with the reference ([`score`]) and
//!    `task.scored` fires: that is where plugins learn (the bandit, the champion, the
//!    experiment's outcomes, the profiler, attribution).
//!
//! A failure anywhere gives the task an error record and `task.error`; the next task goes on.

mod example;
mod handlers;
mod summary;

use std::io::{BufRead, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use example::generate as example_tasks;
pub use summary::{ExperimentSummary, SampleRatio, Summary, VariantSummary, VsControl};

use plugin_host::{MethodHandle, PluginCallError, PluginHost};

use crate::hooks;

/// One task.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Identifies the task in results; also the key for sticky assignments.
    pub id: String,
    /// The task type, e.g. `summarize` or `chat`.
    #[serde(rename = "type")]
    pub task_type: String,
    /// The input, whose shape depends on the type.
    pub input: Value,
    /// The answer the scorer compares the output with.
    #[serde(default)]
    pub reference: Option<String>,
    /// Free-form data for plugins.
    #[serde(default)]
    pub meta: Value,
}

/// The result of one task, written as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task's id.
    pub id: String,
    /// The task's type.
    #[serde(rename = "type")]
    pub task_type: String,
    /// The handler that ran.
    pub handler: String,
    /// The experiment that applied, if any.
    pub experiment: Option<String>,
    /// The experiment's variant, if any.
    pub variant: Option<String>,
    /// `champion` or `challenger` when the champion plugin routed the task.
    pub role: Option<String>,
    /// The score (0..1), when the task had a reference.
    pub score: Option<f64>,
    /// Time the handler took, in milliseconds.
    pub latency_ms: f64,
    /// Time the whole task took, plugins and hooks included, in milliseconds.
    pub total_ms: f64,
    /// The output.
    pub output: String,
}

/// A task that produced no result, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskError {
    /// The line of the input (from 1), when the task came from a stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The task's id, when it could be read.
    pub id: Option<String>,
    /// The task's type, when it could be read.
    #[serde(rename = "type")]
    pub task_type: Option<String>,
    /// What went wrong, and what to do.
    pub error: String,
    /// The subscriber that blocked the task, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    /// The line was not a task (not JSON, not UTF-8, too long, or fields missing or of the
    /// wrong type); counted as a bad line in the summary.
    #[serde(skip)]
    pub not_a_task: bool,
}

/// The `id` and `type` of a JSON object that is not a valid task, as far as they parsed.
fn parsed_fields(value: Option<&Value>) -> (Option<String>, Option<String>) {
    let field = |name: &str| {
        value
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    (field("id"), field("type"))
}

/// Milliseconds with three decimals (whole microseconds), so that results carry no
/// binary-fraction noise (`0.014953000000000001`).
pub(crate) fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// `x` rounded to `decimals` decimal places, for figures written to JSON.
pub(crate) fn rounded(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// The pipeline over a plugin host.
#[derive(Debug, Clone)]
pub struct Pipeline {
    host: PluginHost,
    /// The methods asked on every task, resolved once (shared by the clones, which run on
    /// other threads, so that a reload is resolved again once for all).
    asks: std::sync::Arc<Asks>,
    max_line_bytes: usize,
    metrics: Option<std::sync::Arc<crate::metrics::TaskMetrics>>,
}

/// The plugin methods the pipeline asks on every task, as handles: a call through one skips
/// looking up the plugin and the method by name.
#[derive(Debug)]
struct Asks {
    select_profile: MethodHandle,
    choose_model: MethodHandle,
    route: MethodHandle,
    choose: MethodHandle,
    pick_variant: MethodHandle,
}

impl Asks {
    fn new(host: &PluginHost) -> Self {
        Asks {
            select_profile: host.method("task-policy", "selectProfile"),
            choose_model: host.method("model-router", "chooseModel"),
            route: host.method("champion", "route"),
            choose: host.method("bandit", "choose"),
            pick_variant: host.method("experiment", "pickVariant"),
        }
    }
}

/// The longest task line [`Pipeline::run_stream`] reads by default (16 MiB); a longer one gets an
/// error record.
pub const DEFAULT_MAX_LINE_BYTES: usize = 16 << 20;

/// Plugin calls made for one task, with their time.
#[derive(Default)]
struct PluginCalls {
    /// Milliseconds per plugin asked, in the order first asked.
    ms: Vec<(&'static str, f64)>,
}

impl Serialize for PluginCalls {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.ms.iter().map(|(plugin, ms)| (*plugin, *ms)))
    }
}

impl PluginCalls {
    /// Asks `plugin.method(params)` for an answer of type `T`; `None` when the plugin is not
    /// loaded, has no say, or failed (logged).
    fn ask<P: Serialize, T: serde::de::DeserializeOwned>(
        &mut self,
        host: &PluginHost,
        plugin: &'static str,
        method: &MethodHandle,
        params: &P,
    ) -> Option<T> {
        debug_assert_eq!(method.plugin(), plugin);
        let started = Instant::now();
        let answer = method.call_with(host, params);
        match answer {
            Err(PluginCallError::PluginNotFound { .. }) => None,
            answer => {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                match self.ms.iter_mut().find(|(p, _)| *p == plugin) {
                    Some((_, total)) => *total += ms,
                    None => self.ms.push((plugin, ms)),
                }
                match answer {
                    Ok(value) => value,
                    Err(e) => {
                        if !e.is_missing() {
                            tracing::warn!(plugin, method = method.method(), error = %e, "plugin call failed; it has no say for this task");
                        }
                        None
                    }
                }
            }
        }
    }
}

/// Params of the pipeline's plugin calls, written straight to JSON text.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct AskParams<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    task_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    experiment: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_words: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    handlers: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arms: Option<&'a [String]>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    optional: bool,
}

/// The `task.scored` payload.
#[derive(Serialize)]
struct ScoredEvent<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    task_type: &'a str,
    handler: &'a str,
    chooser: &'a str,
    variant: Option<&'a str>,
    experiment: Option<&'a str>,
    role: Option<&'a str>,
    score: f64,
    latency_ms: f64,
    output_len: usize,
    plugins_ms: &'a PluginCalls,
}

/// The handler of a task, who chose it, and the champion's role when the champion routed it.
#[derive(Clone, Copy)]
struct Chosen<'a> {
    handler: &'a str,
    chooser: &'a str,
    role: Option<&'a str>,
}

/// What the `task-policy` plugin answers: a profile for the task's type.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Profile {
    handlers: Option<Vec<String>>,
    max_words: Option<u64>,
}

/// What the `champion` plugin answers: the handler for this task and its role.
#[derive(Deserialize)]
struct Route {
    handler: Option<String>,
    role: Option<String>,
}

/// Token F1 between `output` and `reference`: the words (lower-case, alphanumeric) they share,
/// counted with multiplicity, as the harmonic mean of precision (shared / output words) and
/// recall (shared / reference words). 1 for an exact answer, 0 for nothing in common; both empty
/// is 1.
pub fn score(output: &str, reference: &str) -> f64 {
    let out = handlers::words(output);
    let mut reference = handlers::words(reference);
    if out.is_empty() && reference.is_empty() {
        return 1.0;
    }
    let (out_len, ref_len) = (out.len(), reference.len());
    let mut shared = 0usize;
    for word in out {
        if let Some(i) = reference.iter().position(|r| *r == word) {
            reference.swap_remove(i);
            shared += 1;
        }
    }
    if shared == 0 {
        return 0.0;
    }
    let precision = shared as f64 / out_len as f64;
    let recall = shared as f64 / ref_len as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Words in every string of a JSON value.
fn count_words(value: &Value) -> usize {
    match value {
        Value::String(s) => s.split_whitespace().count(),
        Value::Array(items) => items.iter().map(count_words).sum(),
        Value::Object(fields) => fields.values().map(count_words).sum(),
        _ => 0,
    }
}

fn truncate_words(text: &str, max: usize) -> String {
    if text.split_whitespace().count() <= max {
        return text.to_owned();
    }
    text.split_whitespace()
        .take(max)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Pipeline {
    /// A pipeline calling the plugins of `host`, which is built with the worker's hook points
    /// ([`hooks::host_builder`]); on a host without them, the task hooks never fire (logged).
    pub fn new(host: PluginHost) -> Self {
        if !hooks::has_worker_points(&host) {
            tracing::warn!(
                "the host was built without the worker's hook points; the task hooks will not fire (build it with worker::hooks::host_builder)"
            );
        }
        Self {
            asks: std::sync::Arc::new(Asks::new(&host)),
            host,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            metrics: None,
        }
    }

    /// Counts each task that ends in `metrics` (what `/metrics` shows of tasks).
    #[must_use]
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::TaskMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts a task that ended (when the pipeline has metrics).
    fn count(&self, result: Result<&TaskRecord, &TaskError>, seconds: Option<f64>) {
        use crate::metrics::{TaskEnd, TaskOutcome};
        let Some(metrics) = &self.metrics else {
            return;
        };
        let end = match result {
            Ok(record) => TaskEnd {
                task_type: &record.task_type,
                handler: &record.handler,
                variant: record.variant.as_deref().unwrap_or("-"),
                outcome: TaskOutcome::Completed,
                seconds,
                score: record.score,
            },
            Err(error) => TaskEnd {
                task_type: error.task_type.as_deref().unwrap_or("-"),
                handler: "-",
                variant: "-",
                outcome: if error.not_a_task {
                    TaskOutcome::BadLine
                } else if error.blocked_by.is_some() {
                    TaskOutcome::Blocked
                } else {
                    TaskOutcome::Failed
                },
                seconds: (!error.not_a_task).then_some(seconds).flatten(),
                score: None,
            },
        };
        metrics.record(end);
    }

    /// Sets the longest task line [`run_stream`](Self::run_stream) reads (default
    /// [`DEFAULT_MAX_LINE_BYTES`]). A longer line gets an error record and is skipped without
    /// being held in memory whole.
    #[must_use]
    pub fn with_max_line_bytes(mut self, max: usize) -> Self {
        self.max_line_bytes = max;
        self
    }

    /// The host.
    pub fn host(&self) -> &PluginHost {
        &self.host
    }

    /// The error record of `task`, after firing `task.error`; `chosen` is the handler, who chose
    /// it and the champion's role, once they are known.
    fn failure(
        &self,
        task: &Task,
        error: String,
        blocked_by: Option<String>,
        chosen: Option<Chosen<'_>>,
    ) -> TaskError {
        let fired = self.host.fire(hooks::TASK_ERROR, || {
            json!({
                "id": task.id, "type": task.task_type, "error": error,
                "handler": chosen.map(|c| c.handler), "chooser": chosen.map(|c| c.chooser),
                "role": chosen.and_then(|c| c.role),
            })
        });
        if let Err(v) = fired {
            tracing::warn!(violation = %v, "task.error cannot be blocked; ignored");
        }
        TaskError {
            line: None,
            id: Some(task.id.clone()),
            task_type: Some(task.task_type.clone()),
            error,
            blocked_by,
            not_a_task: false,
        }
    }

    /// Runs one task through the whole pipeline.
    ///
    /// # Errors
    ///
    /// The task failed or was blocked; the error says why.
    pub fn run_task(&self, task: Task) -> Result<TaskRecord, TaskError> {
        let started = Instant::now();
        let result = self.run_task_unmeasured(task);
        self.count(result.as_ref(), Some(started.elapsed().as_secs_f64()));
        result
    }

    fn run_task_unmeasured(&self, task: Task) -> Result<TaskRecord, TaskError> {
        let started = Instant::now();
        let host = &self.host;
        let mut calls = PluginCalls::default();
        let mut task = task;

        match host.fire(hooks::TASK_RECEIVED, || {
            json!({"id": task.id, "type": task.task_type, "input": task.input, "meta": task.meta})
        }) {
            Err(v) => return Err(self.failure(&task, format!("blocked: {v}"), Some(v.subscriber), None)),
            Ok(Some(payload)) => {
                task.input = payload["input"].clone();
                task.meta = payload["meta"].clone();
            }
            Ok(None) => {}
        }

        let mut candidates: Vec<String> = handlers::built_in(&task.task_type)
            .iter()
            .map(|h| (*h).to_owned())
            .collect();
        let provider_method = format!("handle.{}", task.task_type);
        candidates.extend(
            host.method_providers(&provider_method)
                .into_iter()
                .map(|p| format!("plugin:{p}")),
        );
        if candidates.is_empty() {
            let known: Vec<&str> = handlers::BUILT_IN.iter().map(|(t, _)| *t).collect();
            return Err(self.failure(
                &task,
                format!(
                    "unknown task type `{}`: the built-in types are {}, and no plugin has a method `{provider_method}`",
                    task.task_type,
                    known.join(", ")
                ),
                None,
                None,
            ));
        }

        let profile: Profile = calls
            .ask(
                host,
                "task-policy",
                &self.asks.select_profile,
                &AskParams {
                    task_type: Some(&task.task_type),
                    ..AskParams::default()
                },
            )
            .unwrap_or_default();
        let mut narrowed_by_policy = false;
        if let Some(allowed) = &profile.handlers {
            let narrowed: Vec<String> = candidates
                .iter()
                .filter(|c| allowed.contains(c))
                .cloned()
                .collect();
            if narrowed.is_empty() {
                tracing::warn!(task = %task.id, ?allowed, ?candidates, "the task policy allows none of the handlers; ignoring it");
            } else {
                narrowed_by_policy = narrowed.len() < candidates.len();
                candidates = narrowed;
            }
        }
        let max_words = profile.max_words.map(|n| n as usize);
        let is_candidate = |h: &str| candidates.iter().any(|c| c == h);
        let input_words = count_words(&task.input);

        let mut role = None;
        let mut chooser = "model-router";
        let mut handler = calls
            .ask::<_, String>(
                host,
                "model-router",
                &self.asks.choose_model,
                &AskParams {
                    task_type: Some(&task.task_type),
                    input_words: Some(input_words),
                    handlers: Some(&candidates),
                    ..AskParams::default()
                },
            )
            .filter(|h| is_candidate(h));
        if handler.is_none() {
            chooser = "champion";
            if let Some(route) = calls.ask::<_, Route>(
                host,
                "champion",
                &self.asks.route,
                &AskParams {
                    task_type: Some(&task.task_type),
                    key: Some(&task.id),
                    ..AskParams::default()
                },
            ) && let Some(chosen) = route.handler.filter(|h| is_candidate(h))
            {
                handler = Some(chosen);
                role = route.role;
            }
        }
        if handler.is_none() {
            chooser = "bandit";
            handler = calls
                .ask::<_, String>(
                    host,
                    "bandit",
                    &self.asks.choose,
                    &AskParams {
                        context: Some(&task.task_type),
                        key: Some(&task.id),
                        arms: Some(&candidates),
                        ..AskParams::default()
                    },
                )
                .filter(|h| is_candidate(h));
        }
        let variant: Option<String> = calls.ask(
            host,
            "experiment",
            &self.asks.pick_variant,
            &AskParams {
                experiment: Some(&task.task_type),
                key: Some(&task.id),
                task_type: Some(&task.task_type),
                optional: true,
                ..AskParams::default()
            },
        );
        let experiment = variant.as_ref().map(|_| task.task_type.clone());
        let mut handler = match (handler, &variant) {
            (Some(h), _) => h,
            (None, Some(v)) if is_candidate(v) => {
                chooser = "experiment";
                v.clone()
            }
            _ => {
                chooser = if narrowed_by_policy {
                    "task-policy"
                } else {
                    "default"
                };
                candidates[0].clone()
            }
        };
        let mut variant = variant;

        match host.fire(hooks::TASK_BEFORE_HANDLE, || {
            json!({
                "id": task.id, "type": task.task_type, "handler": handler, "variant": variant,
                "experiment": experiment, "input": task.input, "meta": task.meta,
            })
        }) {
            Err(v) => {
                let chosen = Chosen {
                    handler: &handler,
                    chooser,
                    role: role.as_deref(),
                };
                return Err(self.failure(
                    &task,
                    format!("blocked: {v}"),
                    Some(v.subscriber),
                    Some(chosen),
                ));
            }
            Ok(Some(payload)) => {
                if let Some(h) = payload["handler"].as_str() {
                    if is_candidate(h) {
                        if h != handler {
                            chooser = "task.before_handle";
                            role = None;
                        }
                        handler = h.to_owned();
                    } else {
                        tracing::warn!(task = %task.id, handler = h, "task.before_handle chose a handler that is not a candidate; ignored");
                    }
                }
                variant = payload["variant"].as_str().map(str::to_owned);
                task.input = payload["input"].clone();
                task.meta = payload["meta"].clone();
            }
            Ok(None) => {}
        }

        let handler_started = Instant::now();
        let output = if let Some(plugin) = handler.strip_prefix("plugin:") {
            let params = json!({"id": task.id, "input": task.input, "variant": variant, "maxWords": max_words});
            match host.call(plugin, &provider_method, &params) {
                Ok(Some(Value::String(output))) => Ok(output),
                Ok(Some(other)) => Err(format!("handler {handler} answered {other}, not a string")),
                Ok(None) => Err(format!("handler {handler} answered nothing")),
                Err(e) => Err(format!("handler {handler} failed: {e}")),
            }
        } else {
            let context = handlers::Context {
                variant: variant.as_deref(),
                max_words,
            };
            let mut after_step = |step: usize,
                                  messages: Vec<Value>|
             -> Result<Vec<Value>, String> {
                let fired = host.fire(hooks::TASK_AFTER_STEP, || {
                    json!({"id": task.id, "type": task.task_type, "handler": handler, "step": step, "messages": messages})
                });
                match fired {
                    Err(v) => Err(format!("blocked: {v}")),
                    Ok(None) => Ok(messages),
                    Ok(Some(payload)) => match payload.get("messages") {
                        Some(Value::Array(messages)) => Ok(messages.clone()),
                        _ => Err("task.after_step left `messages` that is not an array".to_owned()),
                    },
                }
            };
            handlers::run(
                &task.task_type,
                &handler,
                &task.input,
                &context,
                &mut after_step,
            )
        };
        let latency_ms = millis(handler_started.elapsed());
        let mut output = match output {
            Ok(output) => output,
            Err(error) => {
                let chosen = Chosen {
                    handler: &handler,
                    chooser,
                    role: role.as_deref(),
                };
                return Err(self.failure(&task, error, None, Some(chosen)));
            }
        };

        match host.fire(hooks::TASK_AFTER_HANDLE, || {
            json!({
                "id": task.id, "type": task.task_type, "handler": handler, "variant": variant,
                "output": output, "latency_ms": latency_ms,
            })
        }) {
            Err(v) => {
                let chosen = Chosen {
                    handler: &handler,
                    chooser,
                    role: role.as_deref(),
                };
                return Err(self.failure(
                    &task,
                    format!("blocked: {v}"),
                    Some(v.subscriber),
                    Some(chosen),
                ));
            }
            Ok(Some(payload)) => {
                if let Some(o) = payload["output"].as_str() {
                    output = o.to_owned();
                }
            }
            Ok(None) => {}
        }
        if let Some(max) = max_words {
            output = truncate_words(&output, max);
        }

        let score = task.reference.as_deref().map(|r| score(&output, r));
        if let Some(score) = score {
            // Nobody reads this payload back: written straight to JSON for the plugins.
            let fired = host.notify(hooks::TASK_SCORED, || ScoredEvent {
                id: &task.id,
                task_type: &task.task_type,
                handler: &handler,
                chooser,
                variant: variant.as_deref(),
                experiment: experiment.as_deref(),
                role: role.as_deref(),
                score,
                latency_ms,
                output_len: output.chars().count(),
                plugins_ms: &calls,
            });
            if let Err(v) = fired {
                tracing::warn!(violation = %v, "task.scored cannot be blocked; ignored");
            }
        }
        Ok(TaskRecord {
            id: task.id,
            task_type: task.task_type,
            handler,
            experiment,
            variant,
            role,
            score,
            latency_ms,
            total_ms: millis(started.elapsed()),
            output,
        })
    }

    /// Runs one JSON value (a task) and answers its record or error as JSON.
    pub fn run_value(&self, value: Value) -> Value {
        let (id, task_type) = parsed_fields(Some(&value));
        match serde_json::from_value::<Task>(value) {
            Ok(task) => match self.run_task(task) {
                Ok(record) => json!(record),
                Err(error) => json!(error),
            },
            Err(e) => {
                let error = TaskError {
                    line: None,
                    id,
                    task_type,
                    error: format!(
                        "not a task: {e}; expected {{\"id\", \"type\", \"input\", \"reference\"?, \"meta\"?}}"
                    ),
                    blocked_by: None,
                    not_a_task: true,
                };
                self.count(Err(&error), None);
                json!(error)
            }
        }
    }

    /// Runs JSON-lines tasks from `input`, writing one JSON line per task to `out` (a result or
    /// an error record naming the line), and returns the summary. Blank lines are skipped.
    /// `progress` is told the bytes read after each line.
    ///
    /// # Errors
    ///
    /// Reading the input or writing the output failed (bad tasks are records, not errors).
    pub fn run_stream(
        &self,
        mut input: impl BufRead,
        out: &mut dyn Write,
        mut progress: impl FnMut(u64),
    ) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let mut summary = Summary::default();
        let mut bytes = 0u64;
        let mut number = 0usize;
        let mut buffer = Vec::new();
        let max = self.max_line_bytes;
        while let Some(read) = read_line(&mut input, &mut buffer, max)? {
            number += 1;
            bytes += read.bytes;
            let result = if read.too_long {
                Err(TaskError {
                    line: Some(number),
                    id: None,
                    task_type: None,
                    error: format!(
                        "line {number} is longer than the limit of {max} bytes ({} bytes); it was skipped. Split the task, or raise --max-line-bytes",
                        read.bytes - 1
                    ),
                    blocked_by: None,
                    not_a_task: true,
                })
            } else {
                match std::str::from_utf8(&buffer) {
                    Ok(line) if line.trim().is_empty() => continue,
                    Ok(line) => self.run_line(line, number),
                    Err(e) => Err(TaskError {
                        line: Some(number),
                        id: None,
                        task_type: None,
                        error: format!(
                            "line {number} is not valid UTF-8 (invalid bytes after byte {}); tasks are JSON text in UTF-8",
                            e.valid_up_to()
                        ),
                        blocked_by: None,
                        not_a_task: true,
                    }),
                }
            };
            match result {
                Ok(record) => {
                    serde_json::to_writer(&mut *out, &record)?;
                    summary.add(&record);
                }
                Err(mut error) => {
                    error.line = Some(number);
                    serde_json::to_writer(&mut *out, &error)?;
                    summary.add_error(&error);
                }
            }
            out.write_all(b"\n")?;
            progress(bytes);
        }
        out.flush()?;
        summary.finish(started.elapsed(), &self.host);
        Ok(summary)
    }

    /// Runs the task on line `number` of a stream.
    fn run_line(&self, line: &str, number: usize) -> Result<TaskRecord, TaskError> {
        match serde_json::from_str::<Task>(line) {
            Ok(task) => self.run_task(task),
            Err(e) => {
                let (id, task_type) =
                    parsed_fields(serde_json::from_str::<Value>(line).ok().as_ref());
                Err(TaskError {
                    line: Some(number),
                    id,
                    task_type,
                    error: format!(
                        "line {number} is not a task: {e}; expected {{\"id\", \"type\", \"input\", \"reference\"?, \"meta\"?}}"
                    ),
                    blocked_by: None,
                    not_a_task: true,
                })
            }
        }
    }
}

/// What [`read_line`] read.
struct LineRead {
    /// Bytes taken from the input, the newline included.
    bytes: u64,
    /// The line was longer than the limit: the buffer is empty, the rest of the line skipped.
    too_long: bool,
}

/// Reads the next line of `input` into `buffer` (without its `\n` or `\r\n`), holding at most
/// `max` bytes of it: the rest of a longer line is read and dropped up to its newline. `None` at
/// the end of the input.
fn read_line(
    input: &mut impl BufRead,
    buffer: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<LineRead>> {
    buffer.clear();
    let mut read = LineRead {
        bytes: 0,
        too_long: false,
    };
    loop {
        let available = match input.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            if read.bytes == 0 {
                return Ok(None);
            }
            // The last line, without a newline: counted as if it had one.
            read.bytes += 1;
            break;
        }
        let (chunk, ends) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], true),
            None => (available, false),
        };
        if !read.too_long {
            if buffer.len() + chunk.len() > max {
                read.too_long = true;
                *buffer = Vec::new();
            } else {
                buffer.extend_from_slice(chunk);
            }
        }
        let used = chunk.len() + usize::from(ends);
        read.bytes += used as u64;
        input.consume(used);
        if ends {
            break;
        }
    }
    if buffer.last() == Some(&b'\r') {
        buffer.pop();
    }
    Ok(Some(read))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The params and payloads the pipeline hands the host come out of the host's JSON writer
    /// (`plugin_host::to_json_string`, the writer of every call's params and hook payload) as
    /// serde_json writes them, with text that needs escaping in every string.
    #[test]
    fn the_host_writes_the_pipeline_s_params_and_payloads_as_serde_json_does() {
        let texts = [
            "",
            "plain",
            "quote \" backslash \\ slash /",
            "control \u{0} \u{1f} \n \t \r",
            "unicode é 漢 😀 \u{2028}",
        ];
        let lists: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
        for text in texts {
            same(&AskParams::default());
            same(&AskParams {
                task_type: Some(text),
                experiment: Some(text),
                context: Some(text),
                key: Some(text),
                input_words: Some(text.len()),
                handlers: Some(&lists),
                arms: Some(&lists),
                optional: text.is_empty(),
            });
            let calls = PluginCalls {
                ms: vec![("echo", 0.25), ("model-router", 1e-7), ("x", 12_345.5)],
            };
            same(&ScoredEvent {
                id: text,
                task_type: text,
                handler: text,
                chooser: text,
                variant: Some(text),
                experiment: None,
                role: Some(text),
                score: 0.1 + 0.2,
                latency_ms: f64::MIN_POSITIVE,
                output_len: usize::MAX,
                plugins_ms: &calls,
            });
        }
    }

    /// Asserts that the host's writer writes `value` as serde_json does.
    fn same<T: Serialize>(value: &T) {
        let host = plugin_host::to_json_string(value).unwrap();
        assert_eq!(host, serde_json::to_string(value).unwrap(), "{host}");
    }

    #[test]
    fn score_is_token_f1() {
        assert_eq!(score("4821", "4821"), 1.0);
        assert_eq!(score("Lisbon", "4821"), 0.0);
        assert_eq!(score("", ""), 1.0);
        let half = score("the zephyr", "the zephyr battery lasts");
        assert!((half - 2.0 * 1.0 * 0.5 / 1.5).abs() < 1e-9, "{half}");
        assert_eq!(score("A a", "a"), 2.0 * 0.5 * 1.0 / 1.5);
    }

    #[test]
    fn truncation_keeps_short_text() {
        assert_eq!(truncate_words("a b c", 5), "a b c");
        assert_eq!(truncate_words("a b c", 2), "a b");
    }

    #[test]
    fn lines_are_read_with_a_bound() {
        // A tiny buffer, so lines span several reads.
        let data: &[u8] = b"ab\r\n0123456789\n\xff\nlast";
        let mut input = std::io::BufReader::with_capacity(3, data);
        let mut buffer = Vec::new();
        let mut lines = Vec::new();
        while let Some(read) = read_line(&mut input, &mut buffer, 5).unwrap() {
            lines.push((buffer.clone(), read.bytes, read.too_long));
            assert!(buffer.capacity() <= 8, "held {}", buffer.capacity());
        }
        assert_eq!(
            lines,
            [
                (b"ab".to_vec(), 4, false),
                (Vec::new(), 11, true),
                (b"\xff".to_vec(), 2, false),
                (b"last".to_vec(), 5, false),
            ]
        );
    }
}
