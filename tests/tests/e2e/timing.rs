//! Call timing with a sample (`with_call_timing_sample`, `callTimingSample`,
//! `--call-timing-sample`): counts stay exact while one call in N is timed, a slow call that
//! was not timed still reaches the maximum, and a sample that is not a power of two is refused
//! with the field named. The exported histogram's validity is in `metrics.rs`.

use std::time::{Duration, Instant};

use plugin_host::{CallKind, LatencyHistogram, PluginHost};
use serde_json::json;
use tests::PluginDir;

fn histogram(host: &PluginHost, plugin: &str, kind: CallKind, name: &str) -> LatencyHistogram {
    host.latencies()
        .into_iter()
        .filter(|(p, _)| p == plugin)
        .flat_map(|(_, histograms)| histograms)
        .find(|h| h.kind == kind && h.name == name)
        .unwrap_or_else(|| panic!("no histogram of {plugin} {name}"))
}

fn host(dir: &PluginDir, plugins: &[&str], sample: Option<u32>) -> PluginHost {
    for name in plugins {
        dir.add(name, &format!("lib{name}.so"));
    }
    let mut builder = worker::hooks::host_builder(dir.path()).with_shadow_dir(dir.shadow());
    if let Some(sample) = sample {
        builder = builder.with_call_timing_sample(sample);
    }
    let host = builder.build().unwrap();
    let report = host.scan().unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    host
}

/// Three threads call by name and through a handle, and a failing method: every count is
/// exact, and about one call in 16 of each method on each thread is timed.
#[test]
fn counts_stay_exact_while_one_call_in_16_is_timed() {
    let dir = PluginDir::new();
    // No breaker: every failing call reaches the plugin.
    dir.configure(&json!({"faulty": {"breaker": false}}));
    let host = host(&dir, &["echo", "faulty"], None);
    let echo = host.method("echo", "echo");
    let params = json!({"n": 1});
    std::thread::scope(|scope| {
        for _ in 0..3 {
            let (host, echo, params) = (&host, &echo, &params);
            scope.spawn(move || {
                for _ in 0..500 {
                    assert!(host.execute("echo", "echo", params).is_some());
                    assert!(echo.execute(host, params).is_some());
                }
                for _ in 0..37 {
                    assert!(host.execute("faulty", "error", &json!(null)).is_none());
                }
            });
        }
    });
    let stats = host.plugin("echo").unwrap().stats;
    assert_eq!(stats.calls, 3_000);
    assert_eq!((stats.errors, stats.panics), (0, 0));
    let echoed = histogram(&host, "echo", CallKind::Method, "echo");
    assert_eq!(echoed.count(), 3_000, "{echoed:?}");
    // About one in 16 on each thread's shard, at random gaps: 187 on average (the band is
    // some ten standard deviations wide).
    assert!(
        (3_000 / 24..=3_000 / 10).contains(&echoed.timed),
        "{echoed:?}"
    );
    assert!(echoed.sum_seconds > 0.0);
    assert!(stats.total_latency > Duration::ZERO);
    // (The mean is an estimate, so it is not compared with the maximum.)
    assert!(stats.max_latency > Duration::ZERO);

    let faulty = host.plugin("faulty").unwrap().stats;
    assert_eq!((faulty.calls, faulty.errors), (111, 111));
    let failed = histogram(&host, "faulty", CallKind::Method, "error");
    assert_eq!(failed.count(), 111);
    assert!(failed.timed < 111, "{failed:?}");
}

/// With a sample of 1 every call is timed, as before sampling existed: the histogram's calls
/// are all timed and its sum is the plugin's total.
#[test]
fn a_sample_of_1_times_every_call() {
    let dir = PluginDir::new();
    let host = host(&dir, &["echo"], Some(1));
    for _ in 0..50 {
        assert!(host.execute("echo", "echo", &json!([1])).is_some());
    }
    let echoed = histogram(&host, "echo", CallKind::Method, "echo");
    assert_eq!((echoed.count(), echoed.timed), (50, 50));
    let stats = host.plugin("echo").unwrap().stats;
    let total = stats.total_latency.as_secs_f64();
    assert!(
        (echoed.sum_seconds - total).abs() < 1e-6,
        "{echoed:?} {stats:?}"
    );
}

/// With the largest sample (one call in 65536 timed, at random) the slow call is almost surely
/// not timed, yet it reaches the maximum: it saw several ticks of the watchdog's coarse clock,
/// which give a lower bound of its length (and were it timed, its time would).
#[test]
fn a_slow_call_that_was_not_timed_reaches_the_maximum() {
    let dir = PluginDir::new();
    let host = host(&dir, &["crashy"], Some(65_536));
    assert_eq!(
        host.execute("crashy", "sleep", &json!({"ms": 0})),
        Some(json!("slept"))
    );
    let fast = host.plugin("crashy").unwrap().stats.max_latency;
    assert!(fast < Duration::from_millis(50), "{fast:?}");
    let started = Instant::now();
    assert_eq!(
        host.execute("crashy", "sleep", &json!({"ms": 400})),
        Some(json!("slept"))
    );
    let took = started.elapsed();
    let slept = histogram(&host, "crashy", CallKind::Method, "sleep");
    assert_eq!(slept.count(), 2, "{slept:?}");
    let max = host.plugin("crashy").unwrap().stats.max_latency;
    // At least the ticks it saw (50 ms apart: at least 300 ms of its 400 on an idle machine;
    // less asked here, for a watchdog held up on a loaded one), never more than it took.
    assert!(max >= Duration::from_millis(100), "{max:?}");
    // (To the millisecond of the coarse clock.)
    assert!(max <= took + Duration::from_millis(1), "{max:?} > {took:?}");
}

/// A sample that is not a power of two from 1 to 65536 is refused where it is given: the
/// builder, `plugins.json` (`callTimingSample`) and the command line.
#[test]
fn a_sample_that_is_not_a_power_of_two_is_refused() {
    let dir = PluginDir::new();
    let error = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_call_timing_sample(12)
        .build()
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("12") && message.contains("power of two"),
        "{message}"
    );

    dir.configure_file(&json!({"callTimingSample": 3}));
    let error = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .build()
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("callTimingSample") && message.contains("power of two"),
        "{message}"
    );
    // The builder's sample wins over the file's (and a valid one in the file is taken).
    dir.configure_file(&json!({"callTimingSample": 1}));
    let host = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .build()
        .unwrap();
    dir.add("echo", "libecho.so");
    host.scan().unwrap();
    for _ in 0..5 {
        host.execute("echo", "echo", &json!(1));
    }
    assert_eq!(histogram(&host, "echo", CallKind::Method, "echo").timed, 5);

    let refused = crate::worker(&dir, &["--call-timing-sample", "3", "list"], &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("--call-timing-sample") && stderr.contains("power of two"),
        "{stderr}"
    );
}

/// Fire-and-forget deliveries are timed like the others: counted in their hook point's
/// histogram (exact), timed when picked (every one with a sample of 1), in the plugin's mean
/// and maximum.
#[test]
fn fire_and_forget_deliveries_are_counted_and_timed() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": {
        "config": {"in": {"hook": "sleep"}, "sleepMs": 2},
        "hooks": {"task.scored": {"mode": "fire_and_forget"}},
    }}));
    let host = host(&dir, &["crashy"], Some(1));
    for n in 0..5 {
        assert!(
            host.fire(worker::hooks::TASK_SCORED, || json!({"n": n}))
                .is_ok()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.plugin("crashy").unwrap().stats.calls < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let delivered = histogram(&host, "crashy", CallKind::Hook, "task.scored");
    assert_eq!(
        (delivered.count(), delivered.timed),
        (5, 5),
        "{delivered:?}"
    );
    assert!(delivered.sum_seconds >= 5.0 * 0.002, "{delivered:?}");
    let stats = host.plugin("crashy").unwrap().stats;
    assert!(stats.max_latency >= Duration::from_millis(2), "{stats:?}");
}
