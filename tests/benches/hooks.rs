//! Hook dispatch to 1, 10 and 100 subscribed plugins, against calling the same handler
//! directly: `cargo bench -p tests --bench hooks`.
//!
//! Each subscriber is a copy of the `hookbench` plugin, renamed by patching its name in the
//! file. The baseline, "direct", does the same work without the host: the payload cloned and
//! serialized once, then each loaded library's own hook entry point (the shim the host calls:
//! panic guard, hook lookup, parse the payload, answer continue) called through its function
//! table, on an instance the benchmark created in that same library. The same functions in the
//! same libraries, so what differs is the host's dispatch alone. The difference divided by the
//! number of subscribers is the host's overhead per subscriber; the bench also prints it from
//! interleaved rounds, which the machine's drift between criterion's sequential measurements
//! does not skew.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::json;
use tests::{PluginDir, built_plugin, patched};
use worker::hooks;

/// Calls a loaded plugin library's entry points directly, without the host.
#[path = "common/direct.rs"]
mod direct;

/// 201 rounds, each timing `rounds` direct dispatches then as many host dispatches; prints the
/// median and quartiles of the per-round host overhead per subscriber.
fn paired_overhead<A, B>(n: usize, label: &str, direct: impl Fn() -> A, fire: impl Fn() -> B) {
    use std::time::Instant;
    let reps = 2_000 / n.min(100) as u32;
    let mut overheads = Vec::with_capacity(201);
    for _ in 0..201 {
        let started = Instant::now();
        for _ in 0..reps {
            black_box(direct());
        }
        let direct = started.elapsed();
        let started = Instant::now();
        for _ in 0..reps {
            black_box(fire());
        }
        let host = started.elapsed();
        let per = (host.as_secs_f64() - direct.as_secs_f64()) / f64::from(reps) / n as f64;
        overheads.push(per * 1e9);
    }
    overheads.sort_by(f64::total_cmp);
    println!(
        "hook_dispatch paired, {n} subscriber(s), {label}: host overhead per subscriber, median of 201 interleaved rounds: {:.1} ns (quartiles {:.1} .. {:.1})",
        overheads[100], overheads[50], overheads[150]
    );
}

fn bench(c: &mut Criterion) {
    let payload = json!({
        "id": "task-17", "type": "qa", "handler": "retrieval", "variant": "B",
        "experiment": "tone", "score": 0.82, "latency_ms": 12.5, "output_len": 120
    });
    let mut group = c.benchmark_group("hook_dispatch");
    for n in [1usize, 10, 100] {
        let dir = PluginDir::new();
        let source = built_plugin("hookbench");
        for i in 0..n {
            let name = format!("hb-{i:03}");
            let bytes = patched(&source, b"hb-000", name.as_bytes());
            dir.write(&format!("lib{name}.so"), &bytes);
        }
        let untimed = worker::hooks::host_builder(dir.path())
            .with_shadow_dir(dir.shadow().join("untimed"))
            .with_call_timing(false)
            .build()
            .unwrap();
        let host = dir.host();
        for host in [&host, &untimed] {
            let report = host.scan().unwrap();
            assert_eq!(report.loaded.len(), n, "{:?}", report.refused);
            assert_eq!(
                host.hook_points()
                    .iter()
                    .find(|p| p.name == "task.scored")
                    .unwrap()
                    .subscribers
                    .len(),
                n
            );
        }
        let libraries = |host: &plugin_host::PluginHost| -> Vec<direct::Library> {
            host.plugins()
                .iter()
                .map(|p| direct::Library::open(&p.shadow_file))
                .collect()
        };
        let (timed_libraries, untimed_libraries) = (libraries(&host), libraries(&untimed));
        let direct = |libraries: &[direct::Library]| {
            let payload = payload.clone();
            // Written as the host writes it for plugin subscribers.
            let text = serde_json::to_string(&payload).unwrap();
            for library in libraries {
                assert!(library.on_hook(black_box("task.scored"), black_box(&text)));
            }
            payload
        };
        let fire = |host: &plugin_host::PluginHost| {
            host.fire(hooks::TASK_SCORED, || payload.clone()).unwrap()
        };
        paired_overhead(n, "timed", || direct(&timed_libraries), || fire(&host));
        paired_overhead(
            n,
            "untimed",
            || direct(&untimed_libraries),
            || fire(&untimed),
        );
        let direct = || direct(&timed_libraries);
        let fire = || fire(&host);
        group.bench_with_input(BenchmarkId::new("direct", n), &n, |b, _| b.iter(direct));
        group.bench_with_input(BenchmarkId::new("host_fire", n), &n, |b, _| b.iter(fire));
    }
    group.finish();

    // The same handler registered as host-side (Rust) hooks: the dispatch machinery alone,
    // without crossing into a library. Host hooks receive the payload as a value, so the handler
    // is given its text to parse, as a plugin would.
    let mut group = c.benchmark_group("host_hook_dispatch");
    for n in [1usize, 10, 100] {
        let dir = PluginDir::new();
        let host = dir.host();
        for i in 0..n {
            host.register_hook(
                hooks::TASK_SCORED,
                &format!("h-{i:03}"),
                0,
                plugin_host::HookMode::Sequential,
                |event| {
                    let text = event.payload.to_string();
                    black_box(hookbench::handle(&text).unwrap())
                },
            );
        }
        group.bench_with_input(BenchmarkId::new("direct", n), &n, |b, &n| {
            b.iter(|| {
                let payload = payload.clone();
                for _ in 0..n {
                    let text = payload.to_string();
                    black_box(hookbench::handle(black_box(&text)).unwrap());
                }
                payload
            })
        });
        group.bench_with_input(BenchmarkId::new("host_fire", n), &n, |b, _| {
            b.iter(|| host.fire(hooks::TASK_SCORED, || payload.clone()).unwrap())
        });
    }
    group.finish();

    let dir = PluginDir::new();
    let host = dir.host();
    let mut group = c.benchmark_group("hook_unsubscribed");
    group.bench_function("host_fire", |b| {
        b.iter(|| {
            host.fire(black_box(hooks::TASK_SCORED), || payload.clone())
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
