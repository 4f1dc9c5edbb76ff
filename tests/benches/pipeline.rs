//! Throughput of the task pipeline on the bundled example set (1200 tasks), with no plugins
//! against all the example plugins loaded with the bundled configuration:
//! `cargo bench -p tests --bench pipeline`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::io::Cursor;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tests::PluginDir;
use worker::pipeline::{Pipeline, example_tasks};

const PLUGINS: &[&str] = &[
    "echo",
    "experiment",
    "bandit",
    "champion",
    "profiler",
    "attribution",
    "task-policy",
    "model-router",
];

fn bench(c: &mut Criterion) {
    let tasks: String = example_tasks(1200, 42)
        .iter()
        .map(|t| format!("{t}\n"))
        .collect();

    let empty = PluginDir::new();
    let bare = empty.host();

    let full = PluginDir::new();
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/plugins.json");
    std::fs::copy(bundled, full.path().join("plugins.json")).unwrap();
    for name in PLUGINS {
        full.add(name, &format!("lib{}.so", name.replace('-', "_")));
    }
    let loaded = full.host();
    let report = loaded.scan().unwrap();
    assert_eq!(report.loaded.len(), PLUGINS.len(), "{:?}", report.refused);

    // The machine's speed drifts between criterion's back-to-back measurements: also time the two
    // interleaved, 21 rounds of one run each, and print the median ratio.
    let run = |host: &plugin_host::PluginHost| {
        let started = std::time::Instant::now();
        let mut out = Vec::with_capacity(1 << 20);
        let summary = Pipeline::new(host.clone())
            .run_stream(Cursor::new(tasks.as_bytes()), &mut out, |_| {})
            .unwrap();
        assert_eq!(summary.completed, 1200);
        started.elapsed().as_secs_f64()
    };
    let mut ratios: Vec<f64> = (0..21).map(|_| run(&loaded) / run(&bare)).collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "paired: all plugins / no plugins, median of 21 interleaved runs: {:.2} (throughput {:.0}% of the bare worker's)",
        ratios[10],
        100.0 / ratios[10]
    );

    let mut group = c.benchmark_group("worker_run_1200_tasks");
    group.sample_size(20);
    group.throughput(Throughput::Elements(1200));
    for (name, host) in [("no_plugins", &bare), ("all_plugins", &loaded)] {
        let pipeline = Pipeline::new(host.clone());
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut out = Vec::with_capacity(1 << 20);
                let summary = pipeline
                    .run_stream(Cursor::new(tasks.as_bytes()), &mut out, |_| {})
                    .unwrap();
                assert_eq!(summary.completed, 1200);
                out
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
