//! Recovery from misbehaving plugins, end to end: the circuit breaker, call deadlines,
//! checkpoints of plugin state, and a bounded shutdown.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{PluginDir, eventually};

use crate::serve::Worker;

const PATIENCE: Duration = Duration::from_secs(20);

/// The `health` of `plugin` in `GET /v1/plugins`.
fn health(worker: &Worker, plugin: &str) -> Value {
    worker
        .listed(plugin)
        .unwrap_or_else(|| panic!("{plugin} is not loaded"))["health"]
        .clone()
}

/// Calls `fixture.method` over the control API: the answer and the no-op reason, if any.
fn call(worker: &Worker, method: &str, params: &[u8]) -> (Value, String) {
    let answer = worker.http("POST", &format!("/v1/plugins/fixture/{method}"), params);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let reason = answer.header("x-noop-reason").unwrap_or("").to_owned();
    (answer.json(), reason)
}

/// Five failures in a row open the breaker; calls are then refused at once and counted (in
/// `/v1/plugins`, `/metrics` and `/healthz`); after the cool-down a trial call goes through: a
/// failure opens the breaker again, a success closes it.
#[test]
fn the_breaker_opens_after_five_failures_and_a_trial_success_closes_it() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"breaker": {"failures": 5, "cooldownMs": 3000}}}));
    dir.add("fixture", "libfixture.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);

    for _ in 0..5 {
        let (answer, reason) = call(&worker, "control_error", b"");
        assert_eq!(answer, Value::Null);
        assert!(reason.contains("failed"), "{reason}");
    }
    let open = health(&worker, "fixture");
    assert_eq!(open["breaker"], "open", "{open}");
    assert_eq!(open["consecutive_failures"], 5, "{open}");
    assert_eq!(open["times_opened"], 1, "{open}");

    for _ in 0..10 {
        let (answer, reason) = call(&worker, "total", b"");
        assert_eq!(answer, Value::Null);
        assert!(reason.contains("circuit open"), "{reason}");
    }
    // Refused without reaching the plugin (ten round trips over loopback fit in the 3 s
    // cool-down on a loaded machine too; after it the breaker would let a trial through).
    assert_eq!(health(&worker, "fixture")["calls_refused"], 10);
    assert_eq!(worker.metric("worker_plugin_breaker_state", "fixture"), 1.0);
    assert_eq!(
        worker.metric("worker_plugin_breaker_refused_total", "fixture"),
        10.0
    );
    assert_eq!(
        worker.metric("worker_plugin_breaker_opened_total", "fixture"),
        1.0
    );
    let healthz = worker.http("GET", "/healthz", b"");
    assert_eq!(healthz.status, 200);
    assert_eq!(
        healthz.json(),
        json!({"status": "degraded", "plugins": 2, "degraded": ["fixture"]})
    );
    // Other plugins answer throughout.
    assert_eq!(
        worker
            .http("POST", "/v1/plugins/echo/echo", br#"{"x": 1}"#)
            .json(),
        json!({"x": 1})
    );

    // After the cool-down, a failing trial opens it again...
    std::thread::sleep(Duration::from_millis(3050));
    let (_, reason) = call(&worker, "control_error", b"");
    assert!(
        reason.contains("failed"),
        "the trial did not reach the plugin: {reason}"
    );
    let reopened = health(&worker, "fixture");
    assert_eq!(reopened["breaker"], "open", "{reopened}");
    assert_eq!(reopened["times_opened"], 2, "{reopened}");
    let (_, reason) = call(&worker, "total", b"");
    assert!(reason.contains("circuit open"), "{reason}");

    // ... and a successful one closes it.
    assert!(
        eventually(PATIENCE, || call(&worker, "total", b"").0 == json!(0)),
        "no trial call went through"
    );
    let closed = health(&worker, "fixture");
    assert_eq!(closed["breaker"], "closed", "{closed}");
    assert_eq!(closed["consecutive_failures"], 0, "{closed}");
    assert_eq!(worker.metric("worker_plugin_breaker_state", "fixture"), 0.0);
    assert_eq!(
        worker.http("GET", "/healthz", b"").json(),
        json!({"status": "ok", "plugins": 2})
    );
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("circuit breaker open") && log.contains("circuit breaker closed"),
        "{log}"
    );
}

/// `"breaker": false` switches it off: failures never refuse a call. `worker list` shows each
/// plugin's breaker, in text and JSON.
#[test]
fn a_breaker_switched_off_never_opens_and_list_shows_breakers() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"breaker": false, "timeoutMs": 1234}}));
    dir.add("fixture", "libfixture.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    for _ in 0..8 {
        let (_, reason) = call(&worker, "control_error", b"");
        assert!(reason.contains("failed"), "{reason}");
    }
    let off = health(&worker, "fixture");
    assert_eq!(off["breaker"], "off", "{off}");
    assert_eq!(off["consecutive_failures"], 8, "{off}");
    assert_eq!(call(&worker, "total", b"").0, json!(0));
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");

    let list = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
            .arg("--plugins")
            .arg(dir.path())
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .env_remove("WORKER_LOG")
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let json: Value = serde_json::from_str(&list(&["list", "--json"])).unwrap();
    let by_name = |name: &str| {
        json["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["health"]
            .clone()
    };
    assert_eq!(by_name("fixture")["breaker"], "off");
    assert_eq!(by_name("fixture")["timeout_ms"], 1234);
    assert_eq!(by_name("echo")["breaker"], "closed");
    assert_eq!(by_name("echo")["timeout_ms"], 10_000);
    let text = list(&["--call-timeout-ms", "2500", "list"]);
    assert!(text.contains("breaker off (0 failure(s) in a row, opened 0 time(s), 0 call(s) refused), 0 timeout(s), deadline 1234 ms"), "{text}");
    assert!(text.contains("breaker closed (0 failure(s) in a row, opened 0 time(s), 0 call(s) refused), 0 timeout(s), deadline 2500 ms"), "{text}");
}

/// A call past its deadline (the fixture's `sleep` with `timeoutMs` 200): the watchdog logs
/// it once with plugin, method and elapsed time, counts a timeout and opens the breaker;
/// `/healthz` says degraded and names the plugin; other plugins answer throughout; the call
/// itself, which cannot be interrupted in-process, still finishes.
#[test]
fn a_call_past_its_deadline_is_reported_once_and_opens_the_breaker() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"timeoutMs": 200}}));
    dir.add("fixture", "libfixture.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    let api = worker.api();
    let slow = std::thread::spawn(move || {
        api.http("POST", "/v1/plugins/fixture/sleep", br#"{"ms": 1500}"#)
    });
    assert!(
        eventually(PATIENCE, || health(&worker, "fixture")["timeouts"] == 1),
        "no timeout counted: {}",
        health(&worker, "fixture")
    );
    let stuck = health(&worker, "fixture");
    assert_eq!(stuck["breaker"], "open", "{stuck}");
    assert_eq!(stuck["overdue_calls"], 1, "{stuck}");
    assert_eq!(
        worker.metric("worker_plugin_timeouts_total", "fixture"),
        1.0
    );
    let healthz = worker.http("GET", "/healthz", b"");
    assert_eq!(healthz.status, 200);
    assert_eq!(healthz.json()["status"], "degraded");
    assert_eq!(healthz.json()["degraded"], json!(["fixture"]));
    // No new call enters the stuck plugin; the others answer.
    let (answer, reason) = call(&worker, "total", b"");
    assert_eq!(answer, Value::Null);
    assert!(reason.contains("circuit open"), "{reason}");
    assert_eq!(
        worker.http("POST", "/v1/plugins/echo/echo", b"[1]").json(),
        json!([1])
    );
    assert_eq!(health(&worker, "echo")["breaker"], "closed");

    let answer = slow.join().unwrap();
    assert_eq!((answer.status, answer.json()), (200, json!("done")));
    let after = health(&worker, "fixture");
    assert_eq!(after["overdue_calls"], 0, "{after}");
    assert_eq!(after["timeouts"], 1, "reported more than once: {after}");
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
    let reports: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("plugin call overdue"))
        .collect();
    assert_eq!(reports.len(), 1, "{log}");
    let report = reports[0];
    assert!(
        report.contains("plugin=\"fixture\"")
            && report.contains("method=sleep")
            && report.contains("elapsed_ms=")
            && report.contains("timeout_ms=200"),
        "{report}"
    );
}

/// `--checkpoint-interval 1`: the state reaches the state directory while the worker runs, so
/// after `kill -9` a restart has it. A reload writes a checkpoint too.
#[test]
fn checkpoints_survive_kill_9() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let saved = state.join("fixture.json");
    let worker = Worker::start(&dir, &state, &["--no-watch", "--checkpoint-interval", "1"]);
    assert_eq!(call(&worker, "add", br#"{"n": 7}"#).0, json!(7));
    assert!(
        eventually(PATIENCE, || std::fs::read_to_string(&saved)
            .is_ok_and(|text| text.trim() == "7")),
        "no checkpoint in {}",
        state.display()
    );
    worker.signal("KILL");
    drop(worker);

    let worker = Worker::start(&dir, &state, &["--no-watch", "--checkpoint-interval", "0"]);
    assert_eq!(call(&worker, "total", b"").0, json!(7));
    assert_eq!(call(&worker, "add", br#"{"n": 3}"#).0, json!(10));
    // No periodic checkpoint now; the reload writes one before it answers.
    let reload = worker.http("POST", "/v1/plugins/fixture/reload", b"");
    assert_eq!(reload.status, 200, "{}", reload.body);
    assert_eq!(std::fs::read_to_string(&saved).unwrap().trim(), "10");
    worker.signal("KILL");
    drop(worker);

    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    assert_eq!(call(&worker, "total", b"").0, json!(10));
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
}

/// Starts a call to the fixture's `sleep` for a minute over the control API, in the
/// background (the answer never comes: the worker exits first).
fn stuck_call(worker: &Worker) {
    let api = worker.api();
    std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| {
            api.http("POST", "/v1/plugins/fixture/sleep", br#"{"ms": 60000}"#)
        });
    });
}

/// SIGTERM with a plugin stuck in a call ends the worker within `--shutdown-timeout` (plus
/// slack): plugins that answer are saved, a plugin past its deadline is not (its last
/// checkpoint stays), the exit status is 1 and the log names the plugin.
#[test]
fn shutdown_is_bounded_when_a_plugin_is_stuck() {
    let dir = PluginDir::new();
    let tone = json!({"config": {"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}}});
    dir.configure(&json!({"fixture": {"timeoutMs": 300}, "experiment": tone}));
    dir.add("fixture", "libfixture.so");
    dir.add("experiment", "libexperiment.so");
    let state = dir.shadow().join("state");
    let args = [
        "--no-watch",
        "--checkpoint-interval",
        "0",
        "--shutdown-timeout",
        "2",
    ];
    let worker = Worker::start(&dir, &state, &args);
    let record = json!({"experiment": "tone", "variant": "B", "score": 0.5});
    let recorded = worker.http(
        "POST",
        "/v1/plugins/experiment/recordOutcome",
        record.to_string().as_bytes(),
    );
    assert_eq!(recorded.header("x-noop-reason"), None, "{}", recorded.body);
    assert_eq!(call(&worker, "add", br#"{"n": 5}"#).0, json!(5));
    stuck_call(&worker);
    assert!(
        eventually(PATIENCE, || health(&worker, "fixture")["timeouts"] == 1),
        "the call never went overdue"
    );
    let started = Instant::now();
    let (status, log) = worker
        .stop_within(Duration::from_secs(4))
        .expect("still running 4 s after SIGTERM with --shutdown-timeout 2");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.lines().any(|l| l.contains("plugin abandoned")
            && l.contains("plugin=\"fixture\"")
            && l.contains("stuck in `sleep`")),
        "{log}"
    );
    assert!(state.join("experiment.json").is_file(), "{log}");
    assert!(
        !state.join("fixture.json").exists(),
        "saved while stuck: {log}"
    );

    // Stuck but not yet past its deadline: saved (it answers `save_state`), still abandoned.
    dir.configure(&json!({"experiment": tone}));
    let worker = Worker::start(&dir, &state, &args);
    assert_eq!(call(&worker, "add", br#"{"n": 2}"#).0, json!(2));
    let asleep = tests::sleeping_threads(worker.pid());
    stuck_call(&worker);
    assert!(
        eventually(PATIENCE, || tests::sleeping_threads(worker.pid()) > asleep),
        "the call never reached the plugin"
    );
    let started = Instant::now();
    let (status, log) = worker
        .stop_within(Duration::from_secs(4))
        .expect("still running 4 s after SIGTERM with --shutdown-timeout 2");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("abandoned in a call still running")
                && l.contains("plugin=\"fixture\"")
                && l.contains("method=sleep")),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("fixture.json"))
            .unwrap()
            .trim(),
        "2"
    );
}

/// A `create` that overruns the plugin's deadline is abandoned: the load is refused with the
/// reason, and other plugins' loads, reloads and calls go on without waiting for it.
#[test]
fn a_create_past_its_deadline_is_abandoned_and_other_loads_go_on() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {"createSleepMs": 5000}, "timeoutMs": 300}}));
    dir.add("fixture", "libfixture.so");
    dir.add("echo", "libecho.so");
    let host = dir.host();
    let started = Instant::now();
    let report = host.scan().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the scan waited for the sleeping create: {:?}",
        started.elapsed()
    );
    assert_eq!(report.loaded, vec!["echo".to_owned()]);
    assert_eq!(report.refused.len(), 1, "{:?}", report.refused);
    assert!(
        matches!(
            &report.refused[0].kind,
            plugin_host::LoadErrorKind::CreateTimedOut { plugin, timeout_ms: 300 } if plugin == "fixture"
        ),
        "{:?}",
        report.refused[0]
    );
    assert!(
        report.refused[0]
            .to_string()
            .contains("did not finish starting within 300 ms"),
        "{}",
        report.refused[0]
    );
    assert_eq!(
        host.execute("echo", "echo", &json!({"x": 1})),
        Some(json!({"x": 1}))
    );
    let started = Instant::now();
    host.reload("echo").unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
}
