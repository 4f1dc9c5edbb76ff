//! Hot reload, measured: `cargo bench -p tests --bench reload`.
//!
//! 1. Rename to serving: a new build is renamed into the watched plugins directory; the time
//!    until calls answer from it.
//! 2. Calls during swaps: two threads call without pause, first with no reloads (steady), then
//!    while the plugin is reloaded every 5 ms; failed calls and the latency percentiles of each.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plugin_host::watch::{WatchOptions, Watcher};
use serde_json::json;
use tests::{PluginDir, built_plugin, drop_in, fixture_build};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn rename_to_serving() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let host = dir.host();
    host.scan().unwrap();
    let _watcher = Watcher::start(host.clone(), WatchOptions::default()).unwrap();
    let builds = [
        (fixture_build("table-v1"), json!(1)),
        (built_plugin("fixture"), json!(plugin_api::TABLE_VERSION)),
    ];
    let mut times = Vec::new();
    for i in 0..20 {
        let (build, expected) = &builds[i % 2];
        let started = Instant::now();
        drop_in(build, &dir.path(), "libfixture.so");
        while host.execute("fixture", "table", &json!(null)).as_ref() != Some(expected) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the new build never served"
            );
            std::hint::spin_loop();
        }
        times.push(started.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    times.sort();
    println!(
        "rename to serving (20 swaps, settle 50 ms): median {:.1} ms, max {:.1} ms (goal: under 300 ms)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
}

/// Calls from two threads for `run`, reloading every `reload_every` if given; returns the
/// sorted latencies and the number of failed calls.
fn calls(
    host: &plugin_host::PluginHost,
    run: Duration,
    reload_every: Option<Duration>,
) -> (Vec<Duration>, usize, usize) {
    let stop = AtomicBool::new(false);
    let mut swaps = 0;
    let results: Vec<(Vec<Duration>, usize)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    let mut latencies = Vec::with_capacity(1 << 20);
                    let mut failed = 0;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let params = json!({"t": t, "i": i});
                        let started = Instant::now();
                        let answer = host.execute("echo", "echo", &params);
                        latencies.push(started.elapsed());
                        if answer.as_ref() != Some(&params) {
                            failed += 1;
                        }
                        i += 1;
                    }
                    (latencies, failed)
                })
            })
            .collect();
        let started = Instant::now();
        while started.elapsed() < run {
            match reload_every {
                Some(every) => {
                    std::thread::sleep(every);
                    host.reload("echo").unwrap();
                    swaps += 1;
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut all: Vec<Duration> = results
        .iter()
        .flat_map(|(l, _)| l.iter().copied())
        .collect();
    all.sort();
    (all, results.iter().map(|(_, f)| f).sum(), swaps)
}

fn calls_during_swaps() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let host = dir.host();
    host.scan().unwrap();
    let run = Duration::from_secs(2);
    let (steady, steady_failed, _) = calls(&host, run, None);
    let (swapping, swap_failed, swaps) = calls(&host, run, Some(Duration::from_millis(5)));
    let row = |name: &str, l: &[Duration], failed: usize| {
        println!(
            "{name:<22} {:>9} calls  {:>6} failed  p50 {:>7.2} µs  p99 {:>7.2} µs  max {:>8.1} µs",
            l.len(),
            failed,
            percentile(l, 0.5).as_secs_f64() * 1e6,
            percentile(l, 0.99).as_secs_f64() * 1e6,
            l[l.len() - 1].as_secs_f64() * 1e6
        );
    };
    println!("calls from 2 threads, 2 s each:");
    row("steady", &steady, steady_failed);
    row(&format!("during {swaps} reloads"), &swapping, swap_failed);
    println!(
        "p99 during swaps / steady: {:.2}x (goal: no failed call, at most 2x)",
        percentile(&swapping, 0.99).as_secs_f64() / percentile(&steady, 0.99).as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing: run either way.
    rename_to_serving();
    calls_during_swaps();
}
