//! `echo`: the minimal plugin. Method `echo` returns its params unchanged.
//!
//! Also used by the benchmarks: `noop` answers nothing (the cheapest call through the host), and
//! `summarize` does a fixed piece of JSON work, the same work the benchmark calls directly.
//!
//! It also provides a handler to the worker's task pipeline: `handle.summarize` answers a
//! summarize task with its title (the handler `plugin:echo`, a third, naive strategy that
//! routing can choose among the built-in ones).

#![forbid(unsafe_code)]

use plugin_api::{
    Methods, NoConfig, NoState, Plugin, PluginError, PluginInfo, Value, export_plugin,
};
use serde::{Deserialize, Serialize};

/// The plugin instance. It keeps no state.
#[derive(Debug)]
pub struct Echo;

/// Params of `summarize`: a list of numbered readings.
#[derive(Debug, Deserialize)]
pub struct Readings {
    /// Where the readings come from.
    pub source: String,
    /// The values.
    pub values: Vec<f64>,
}

/// What `summarize` answers.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `Readings::source`, upper-cased.
    pub source: String,
    /// How many values.
    pub count: usize,
    /// Their mean (0 when there are none).
    pub mean: f64,
    /// The smallest and the largest value.
    pub range: (f64, f64),
}

/// The work of `summarize`, public so that benchmarks can call it without the host.
pub fn summarize(readings: &Readings) -> Summary {
    let count = readings.values.len();
    let sum: f64 = readings.values.iter().sum();
    let min = readings
        .values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let max = readings
        .values
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    Summary {
        source: readings.source.to_uppercase(),
        count,
        mean: if count == 0 { 0.0 } else { sum / count as f64 },
        range: if count == 0 { (0.0, 0.0) } else { (min, max) },
    }
}

impl Plugin for Echo {
    type Config = NoConfig;
    type State = NoState;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "echo",
            env!("CARGO_PKG_VERSION"),
            "Returns its params unchanged",
        )
    }

    fn create(_config: NoConfig) -> Result<Self, PluginError> {
        Ok(Echo)
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "echo",
                "Returns its params unchanged",
                |_, params: Value| Ok(params),
            )
            .raw_method("noop", "Answers nothing, does nothing", |_, _| Ok(None))
            .method(
                "handle.summarize",
                "Task handler: answers a summarize task {\"input\": {\"title\"}} with its title",
                |_, task: Value| {
                    task.pointer("/input/title")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| PluginError::invalid_params("input.title is missing"))
                },
            )
            .method(
                "summarize",
                "Count, mean and range of {\"source\", \"values\": [numbers]}",
                |_, readings: Readings| Ok(summarize(&readings)),
            );
    }
}

export_plugin!(Echo);
