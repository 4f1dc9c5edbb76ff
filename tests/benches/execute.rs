//! Host overhead, measured in one run against baselines:
//!
//! - `json_work/direct`: the `echo` plugin's `summarize` called in-process, with the same JSON
//!   steps the host path takes (params serialized to text and parsed, the answer serialized and
//!   parsed back).
//! - `json_work/host_execute`: the same work through `PluginHost::execute` on the loaded `.so`.
//! - `empty/direct_fn`: a plain function answering `None`; `empty/host_execute`: the plugin's
//!   `noop` through the host (no JSON either way); `empty/host_execute_untimed`: the same with
//!   `with_call_timing(false)`.
//! - `missing_plugin/host_execute`: a call to a plugin that is not loaded.
//!
//! Run: `cargo bench -p tests --bench execute`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use tests::PluginDir;

fn readings() -> Value {
    let values: Vec<f64> = (0..64).map(|i| f64::from(i) * 1.5 - 20.0).collect();
    json!({"source": "sensor-7", "values": values})
}

/// The JSON steps of a host call, done in-process.
fn direct_summarize(params: &Value) -> Option<Value> {
    let text = params.to_string();
    let readings: echo::Readings = serde_json::from_str(&text).ok()?;
    let answer = serde_json::to_string(&echo::summarize(&readings)).ok()?;
    serde_json::from_str(&answer).ok()
}

#[inline(never)]
fn direct_noop(_params: &Value) -> Option<Value> {
    None
}

/// The machine is shared and its speed drifts between criterion's sequential measurements, so
/// this also measures the two JSON paths interleaved: 301 rounds, each timing 200 direct calls
/// then 200 host calls, and prints the median of the per-round ratios.
fn paired_ratio(host: &plugin_host::PluginHost, params: &Value) {
    use std::time::Instant;
    let mut ratios = Vec::with_capacity(301);
    for _ in 0..301 {
        let started = Instant::now();
        for _ in 0..200 {
            black_box(direct_summarize(black_box(params)));
        }
        let direct = started.elapsed();
        let started = Instant::now();
        for _ in 0..200 {
            black_box(host.execute(black_box("echo"), "summarize", black_box(params)));
        }
        ratios.push(started.elapsed().as_secs_f64() / direct.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "json_work paired: host.execute / direct, median of 301 interleaved rounds: {:.3} (quartiles {:.3} .. {:.3})",
        ratios[150], ratios[75], ratios[225]
    );
}

fn bench(c: &mut Criterion) {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let host = dir.host();
    host.scan().unwrap();
    let untimed_dir = PluginDir::new();
    untimed_dir.add("echo", "libecho.so");
    let untimed = plugin_host::PluginHost::builder(untimed_dir.path())
        .with_shadow_dir(untimed_dir.shadow())
        .with_call_timing(false)
        .build()
        .unwrap();
    untimed.scan().unwrap();
    let params = readings();
    assert_eq!(
        direct_summarize(&params),
        host.execute("echo", "summarize", &params)
    );

    paired_ratio(&host, &params);

    let mut group = c.benchmark_group("json_work");
    group.bench_function("direct", |b| {
        b.iter(|| direct_summarize(black_box(&params)))
    });
    group.bench_function("host_execute", |b| {
        b.iter(|| host.execute(black_box("echo"), "summarize", black_box(&params)))
    });
    group.finish();

    let null = Value::Null;
    let mut group = c.benchmark_group("empty");
    group.bench_function("direct_fn", |b| b.iter(|| direct_noop(black_box(&null))));
    group.bench_function("host_execute", |b| {
        b.iter(|| host.execute(black_box("echo"), black_box("noop"), black_box(&null)))
    });
    group.bench_function("host_execute_untimed", |b| {
        b.iter(|| untimed.execute(black_box("echo"), black_box("noop"), black_box(&null)))
    });
    group.finish();

    let mut group = c.benchmark_group("missing_plugin");
    group.bench_function("host_execute", |b| {
        b.iter(|| host.execute(black_box("nobody"), black_box("noop"), black_box(&null)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
