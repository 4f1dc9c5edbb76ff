//! Instruction counts of the call path, for `scripts/instructions` (which runs this under
//! `valgrind --tool=callgrind` and counts only inside the `measure_*` functions).
//!
//! Every path does the same unit of work as the `echo` plugin's `summarize` method on the same
//! params text; the baseline (`direct`) is that work called in-process on the text, with no host
//! in between: parse the params text, summarize, write the answer text.
//!
//! `text` is the same call with the params already held as text (`execute_text`); `text_with`
//! lends the answer to a closure instead of copying it (`call_text_with`); the `_handle`
//! forms go through a method handle (`host.method`), as does `noop_handle`. The timed paths
//! time one call in 16 (the default sample, or `CALL_TIMING_SAMPLE` from the environment);
//! `_untimed` ones none, `_exact` ones every call (`with_call_timing_sample(1)`). The hook
//! paths dispatch one `task.scored` event to ten `hookbench` subscribers, through the host
//! (`hook_fire`) and by calling each library's hook entry directly (`hook_direct`); the
//! difference divided by ten is the host's overhead per subscriber.
//!
//! Run one path: `instructions PATH [CALLS]`; with no path it lists them. Outside valgrind it
//! prints the wall time per call, which is only a rough second figure on a shared machine.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tests::{PluginDir, built_plugin, patched};

#[path = "common/direct.rs"]
mod direct;

/// The params as a caller that builds them would hold them.
#[derive(Serialize)]
struct ReadingsOut<'a> {
    source: &'a str,
    values: &'a [f64],
}

/// The answer as a caller that reads it into its own type would hold it.
#[derive(Deserialize)]
#[expect(dead_code, reason = "read to measure the parse, never used")]
struct SummaryIn {
    source: String,
    count: usize,
    mean: f64,
    range: (f64, f64),
}

const SOURCE: &str = "sensor-7";
const VALUES: [f64; 10] = [1.5, -2.25, 3.0, 4.75, 10.5, -0.5, 7.25, 8.0, 9.5, 12.0];

fn params_text() -> String {
    serde_json::to_string(&ReadingsOut {
        source: SOURCE,
        values: &VALUES,
    })
    .unwrap()
}

/// The plugin's own work on the text: what a call costs with no host at all.
#[inline(never)]
fn direct_work(text: &str) -> Option<String> {
    let readings: echo::Readings = serde_json::from_str(text).ok()?;
    serde_json::to_string(&echo::summarize(&readings)).ok()
}

#[inline(never)]
fn measure_direct(text: &str, calls: u64) {
    for _ in 0..calls {
        black_box(direct_work(black_box(text)));
    }
}

#[inline(never)]
fn measure_execute(host: &plugin_host::PluginHost, params: &Value, calls: u64) {
    for _ in 0..calls {
        black_box(host.execute(black_box("echo"), "summarize", black_box(params)));
    }
}

#[inline(never)]
fn measure_text(host: &plugin_host::PluginHost, text: &str, calls: u64) {
    for _ in 0..calls {
        black_box(host.execute_text(black_box("echo"), "summarize", black_box(text)));
    }
}

#[inline(never)]
fn measure_call_with(host: &plugin_host::PluginHost, calls: u64) {
    let params = ReadingsOut {
        source: SOURCE,
        values: &VALUES,
    };
    for _ in 0..calls {
        let answer: Option<SummaryIn> = host
            .call_with(black_box("echo"), "summarize", black_box(&params))
            .ok()
            .flatten();
        black_box(answer);
    }
}

#[inline(never)]
fn measure_noop(host: &plugin_host::PluginHost, calls: u64) {
    let null = Value::Null;
    for _ in 0..calls {
        black_box(host.execute(black_box("echo"), black_box("noop"), black_box(&null)));
    }
}

#[inline(never)]
fn measure_noop_handle(host: &plugin_host::PluginHost, calls: u64) {
    let null = Value::Null;
    let noop = host.method("echo", "noop");
    for _ in 0..calls {
        black_box(black_box(&noop).execute(host, black_box(&null)));
    }
}

#[inline(never)]
fn measure_text_handle(host: &plugin_host::PluginHost, text: &str, calls: u64) {
    let summarize = host.method("echo", "summarize");
    for _ in 0..calls {
        black_box(black_box(&summarize).execute_text(host, black_box(text)));
    }
}

#[inline(never)]
fn measure_text_with(host: &plugin_host::PluginHost, text: &str, calls: u64) {
    for _ in 0..calls {
        black_box(
            host.call_text_with(black_box("echo"), "summarize", black_box(text), |json| {
                black_box(json).len()
            })
            .ok(),
        );
    }
}

#[inline(never)]
fn measure_text_handle_with(host: &plugin_host::PluginHost, text: &str, calls: u64) {
    let summarize = host.method("echo", "summarize");
    for _ in 0..calls {
        black_box(
            black_box(&summarize)
                .call_text_with(host, black_box(text), |json| black_box(json).len())
                .ok(),
        );
    }
}

#[inline(never)]
fn measure_missing_execute(host: &plugin_host::PluginHost, calls: u64) {
    let null = Value::Null;
    for _ in 0..calls {
        black_box(host.execute(black_box("nobody"), black_box("noop"), black_box(&null)));
    }
}

#[inline(never)]
fn measure_missing_call_with(host: &plugin_host::PluginHost, calls: u64) {
    let params = ReadingsOut {
        source: SOURCE,
        values: &VALUES,
    };
    for _ in 0..calls {
        let answer: Option<SummaryIn> = host
            .call_with(black_box("nobody"), "summarize", black_box(&params))
            .ok()
            .flatten();
        black_box(answer);
    }
}

#[inline(never)]
fn measure_missing_call(host: &plugin_host::PluginHost, params: &Value, calls: u64) {
    for _ in 0..calls {
        black_box(
            host.call(black_box("nobody"), "summarize", black_box(params))
                .ok(),
        );
    }
}

#[inline(never)]
fn measure_missing_call_text(host: &plugin_host::PluginHost, text: &str, calls: u64) {
    for _ in 0..calls {
        black_box(
            host.call_text(black_box("nobody"), "summarize", black_box(text))
                .ok(),
        );
    }
}

/// The subscribers of the hook paths: copies of `hookbench`, each renamed.
const SUBSCRIBERS: usize = 10;

/// The hook payload of the hook benchmarks: a scored task.
fn hook_payload() -> Value {
    json!({
        "id": "task-17", "type": "qa", "handler": "retrieval", "variant": "B",
        "experiment": "tone", "score": 0.82, "latency_ms": 12.5, "output_len": 120
    })
}

/// The hook baseline: the payload cloned and written once, then each library's own hook entry
/// point called through its table, as the host would, with no host in between.
#[inline(never)]
fn measure_hook_direct(libraries: &[direct::Library], payload: &Value, calls: u64) {
    for _ in 0..calls {
        let payload = black_box(payload).clone();
        // Written as the host writes a payload, so that both sides pay the same for it.
        let text = plugin_host::to_json_string(&payload).unwrap();
        for library in libraries {
            black_box(library.on_hook(black_box("task.scored"), black_box(&text)));
        }
        black_box(payload);
    }
}

#[inline(never)]
fn measure_hook_fire(host: &plugin_host::PluginHost, payload: &Value, calls: u64) {
    for _ in 0..calls {
        black_box(
            host.fire(worker::hooks::TASK_SCORED, || black_box(payload).clone())
                .unwrap(),
        );
    }
}

/// A host with [`SUBSCRIBERS`] renamed `hookbench` copies, and each copy opened again for the
/// direct baseline.
fn hook_host(dir: &PluginDir) -> (plugin_host::PluginHost, Vec<direct::Library>) {
    let source = built_plugin("hookbench");
    for i in 0..SUBSCRIBERS {
        let name = format!("hb-{i:03}");
        let bytes = patched(&source, b"hb-000", name.as_bytes());
        dir.write(&format!("lib{name}.so"), &bytes);
    }
    let host = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .build()
        .unwrap();
    let report = host.scan().unwrap();
    assert_eq!(report.loaded.len(), SUBSCRIBERS, "{:?}", report.refused);
    let libraries = host
        .plugins()
        .iter()
        .map(|p| direct::Library::open(&p.shadow_file))
        .collect();
    (host, libraries)
}

const PATHS: [&str; 19] = [
    "direct",
    "text",
    "text_with",
    "text_handle",
    "text_handle_with",
    "execute",
    "call_with",
    "noop",
    "noop_untimed",
    "noop_handle",
    "noop_handle_untimed",
    "noop_exact",
    "noop_handle_exact",
    "missing_execute",
    "missing_call_with",
    "missing_call",
    "missing_call_text",
    "hook_direct",
    "hook_fire",
];

fn host(dir: &PluginDir, timing: bool, sample: u32) -> plugin_host::PluginHost {
    dir.add("echo", "libecho.so");
    let host = plugin_host::PluginHost::builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_call_timing(timing)
        .with_call_timing_sample(sample)
        .build()
        .unwrap();
    host.scan().unwrap();
    host
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--subscribers") {
        println!("{SUBSCRIBERS}");
        return;
    }
    if args.iter().any(|a| a == "--list-paths") {
        println!("paths: {}", PATHS.join(" "));
        return;
    }
    // `cargo bench` passes `--bench`: run every path briefly, as a smoke run.
    let Some(path) = args.first().filter(|a| !a.starts_with("--")) else {
        println!("paths: {}", PATHS.join(" "));
        for path in PATHS {
            run(path, 20_000);
        }
        return;
    };
    let calls = args.get(1).map_or(20_000, |n| n.parse().unwrap());
    run(path, calls);
}

fn run(path: &str, calls: u64) {
    if path.starts_with("hook_") {
        return run_hooks(path, calls);
    }
    let dir = PluginDir::new();
    let text = params_text();
    let params: Value = serde_json::from_str(&text).unwrap();
    let sample = if path.ends_with("_exact") {
        1
    } else {
        std::env::var("CALL_TIMING_SAMPLE").map_or(plugin_host::DEFAULT_TIMING_SAMPLE, |n| {
            n.parse().expect("CALL_TIMING_SAMPLE is a number")
        })
    };
    let host = host(&dir, !path.ends_with("_untimed"), sample);
    // The host answers what the plugin's work answers: the same unit on both sides.
    let expected: Value = serde_json::from_str(&direct_work(&text).unwrap()).unwrap();
    assert_eq!(host.execute("echo", "summarize", &params), Some(expected));
    let started = Instant::now();
    match path {
        "direct" => measure_direct(&text, calls),
        "text" => measure_text(&host, &text, calls),
        "execute" => measure_execute(&host, &params, calls),
        "call_with" => measure_call_with(&host, calls),
        "text_with" => measure_text_with(&host, &text, calls),
        "text_handle" => measure_text_handle(&host, &text, calls),
        "text_handle_with" => measure_text_handle_with(&host, &text, calls),
        "noop" | "noop_untimed" | "noop_exact" => measure_noop(&host, calls),
        "noop_handle" | "noop_handle_untimed" | "noop_handle_exact" => {
            measure_noop_handle(&host, calls)
        }
        "missing_execute" => measure_missing_execute(&host, calls),
        "missing_call_with" => measure_missing_call_with(&host, calls),
        "missing_call" => measure_missing_call(&host, &params, calls),
        "missing_call_text" => measure_missing_call_text(&host, &text, calls),
        other => panic!("unknown path {other}; paths: {}", PATHS.join(" ")),
    }
    let elapsed = started.elapsed();
    println!(
        "{path}: {calls} calls, {:.1} ns a call (params {} bytes)",
        elapsed.as_secs_f64() * 1e9 / calls as f64,
        text.len()
    );
}

/// The hook paths: one dispatch to [`SUBSCRIBERS`] plugins, through the host and directly.
/// The difference divided by the subscribers is the host's overhead per subscriber.
fn run_hooks(path: &str, calls: u64) {
    let dir = PluginDir::new();
    let (host, libraries) = hook_host(&dir);
    let payload = hook_payload();
    let started = Instant::now();
    match path {
        "hook_direct" => measure_hook_direct(&libraries, &payload, calls),
        "hook_fire" => measure_hook_fire(&host, &payload, calls),
        other => panic!("unknown path {other}; paths: {}", PATHS.join(" ")),
    }
    let elapsed = started.elapsed();
    println!(
        "{path}: {calls} dispatches to {SUBSCRIBERS} subscribers, {:.1} ns a dispatch",
        elapsed.as_secs_f64() * 1e9 / calls as f64,
    );
}
