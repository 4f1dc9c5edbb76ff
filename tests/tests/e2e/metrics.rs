//! `GET /metrics` of a real `worker serve`, read with a parser of the Prometheus text format.

use prometheus_parse::{Sample, Scrape, Value as Metric};
use serde_json::json;
use tests::PluginDir;

use crate::serve::Worker;

/// The scrape of `/metrics`, parsed.
fn scrape(worker: &Worker) -> Scrape {
    let answer = worker.http("GET", "/metrics", b"");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        answer.header("content-type")
    );
    assert!(answer.body.ends_with("# EOF\n"), "{}", answer.body);
    Scrape::parse(answer.body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The one sample named `name` whose labels include `labels`.
fn sample<'s>(scrape: &'s Scrape, name: &str, labels: &[(&str, &str)]) -> &'s Sample {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{name} {labels:?} in {:#?}",
        scrape
            .samples
            .iter()
            .map(|s| (&s.metric, &s.labels))
            .collect::<Vec<_>>()
    );
    found[0]
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match &sample(scrape, name, labels).value {
        Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => *v,
        other => panic!("{name}: not a number: {other:?}"),
    }
}

/// The count of a histogram: its `+Inf` bucket, checked to be the largest.
fn histogram_count(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Metric::Histogram(buckets) = &sample(scrape, name, labels).value else {
        panic!("{name} {labels:?} is not a histogram");
    };
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    let last = buckets.last().unwrap();
    assert!(last.less_than.is_infinite(), "{buckets:?}");
    last.count
}

#[test]
fn metrics_are_prometheus_families_with_histograms_info_and_task_figures() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    dir.add("faulty", "libfaulty.so");
    dir.add("profiler", "libprofiler.so");
    let state = dir.shadow().join("state");
    // Every call timed: the figures below come from two calls.
    let worker = Worker::start(&dir, &state, &["--no-watch", "--call-timing-sample", "1"]);

    for _ in 0..2 {
        assert_eq!(
            worker.http("POST", "/v1/plugins/echo/echo", b"{}").status,
            200
        );
    }
    assert_eq!(
        worker.http("POST", "/v1/plugins/faulty/panic", b"").status,
        200
    );
    let tasks = json!([
        {"id": "a", "type": "summarize", "input": {"text": "One. Two."}, "reference": "One."},
        {"id": "b", "type": "summarize"},
    ]);
    let answer = worker.http("POST", "/v1/tasks", tasks.to_string().as_bytes());
    assert_eq!(answer.status, 200, "{}", answer.body);
    let handler = answer.json()[0]["handler"].as_str().unwrap().to_owned();

    // The same figures in JSON name their unit.
    let plugins = worker.http("GET", "/v1/plugins", b"").json();
    let echo_stats = &plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "echo")
        .unwrap()["stats"];
    assert!(
        echo_stats["max_latency_us"].as_f64().unwrap() > 0.0,
        "{plugins}"
    );
    assert!(
        echo_stats["mean_latency_us"].as_f64().unwrap() > 0.0,
        "{plugins}"
    );

    let metrics = scrape(&worker);
    assert_eq!(
        value(&metrics, "worker_plugin_calls_total", &[("plugin", "echo")]),
        2.0
    );
    let panic = &[("plugin", "faulty"), ("kind", "method"), ("name", "panic")];
    assert_eq!(
        histogram_count(&metrics, "worker_plugin_call_duration_seconds", panic),
        1.0
    );
    // The method's panic, and its `task.received` subscriber's on each of the two tasks.
    assert!(
        value(
            &metrics,
            "worker_plugin_panics_total",
            &[("plugin", "faulty")]
        ) >= 1.0
    );
    let echo = &[("plugin", "echo"), ("kind", "method"), ("name", "echo")];
    assert_eq!(
        histogram_count(&metrics, "worker_plugin_call_duration_seconds", echo),
        2.0
    );
    let hook = &[
        ("plugin", "profiler"),
        ("kind", "hook"),
        ("name", "task.scored"),
    ];
    assert_eq!(
        histogram_count(&metrics, "worker_plugin_call_duration_seconds", hook),
        1.0
    );
    let echo_info = sample(&metrics, "worker_plugin_info", &[("plugin", "echo")]);
    assert!(
        echo_info
            .labels
            .get("version")
            .is_some_and(|v| !v.is_empty())
    );
    assert_eq!(echo_info.labels.get("generation"), Some("1"));
    assert_eq!(
        value(
            &metrics,
            "worker_plugin_breaker_state",
            &[("plugin", "echo")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &metrics,
            "worker_plugin_timeouts_total",
            &[("plugin", "echo")]
        ),
        0.0
    );
    let completed = &[
        ("type", "summarize"),
        ("handler", handler.as_str()),
        ("variant", "-"),
    ];
    assert_eq!(
        value(
            &metrics,
            "worker_tasks_total",
            &[&completed[..], &[("outcome", "completed")]].concat()
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "worker_tasks_total",
            &[("type", "summarize"), ("outcome", "bad_line")]
        ),
        1.0
    );
    assert_eq!(
        histogram_count(&metrics, "worker_task_duration_seconds", completed),
        1.0
    );
    assert_eq!(
        histogram_count(&metrics, "worker_task_score", completed),
        1.0
    );
    assert_eq!(value(&metrics, "worker_config_reload_failed", &[]), 0.0);
    assert_eq!(value(&metrics, "worker_plugin_refused_files", &[]), 0.0);

    // A configuration that does not parse: the reload fails, and the metric says so.
    std::fs::write(dir.path().join("plugins.json"), "{ not json").unwrap();
    assert_eq!(worker.http("POST", "/v1/reload", b"").status, 422);
    assert_eq!(
        value(&scrape(&worker), "worker_config_reload_failed", &[]),
        1.0
    );
    worker.stop();
}

/// With one call in 16 timed (the default), the exported histograms stay valid: running bucket
/// counts never decrease, the `+Inf` bucket and `_count` are every call (exact), the sum is
/// positive; the plugin's call counter is exact too. For a method (`echo`, through the control
/// API) and a hook point (`profiler`'s `task.scored`, once per scored task).
#[test]
fn sampled_histograms_stay_valid_with_exact_counts() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    dir.add("profiler", "libprofiler.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    for _ in 0..40 {
        assert_eq!(
            worker.http("POST", "/v1/plugins/echo/echo", b"{}").status,
            200
        );
    }
    let tasks: Vec<serde_json::Value> = (0..100)
        .map(|i| json!({"id": format!("t{i}"), "type": "summarize", "input": {"text": "One. Two."}, "reference": "One."}))
        .collect();
    let answer = worker.http("POST", "/v1/tasks", json!(tasks).to_string().as_bytes());
    assert_eq!(answer.status, 200, "{}", answer.body);

    let metrics = scrape(&worker);
    let name = "worker_plugin_call_duration_seconds";
    let echo = &[("plugin", "echo"), ("kind", "method"), ("name", "echo")];
    let scored = &[
        ("plugin", "profiler"),
        ("kind", "hook"),
        ("name", "task.scored"),
    ];
    for (labels, calls) in [(&echo[..], 40.0), (&scored[..], 100.0)] {
        // Monotonic, ending at `+Inf` (checked by `histogram_count`).
        assert_eq!(histogram_count(&metrics, name, labels), calls, "{labels:?}");
        assert_eq!(value(&metrics, &format!("{name}_count"), labels), calls);
        assert!(value(&metrics, &format!("{name}_sum"), labels) > 0.0);
    }
    assert_eq!(
        value(&metrics, "worker_plugin_calls_total", &[("plugin", "echo")]),
        40.0
    );
    worker.stop();
}
