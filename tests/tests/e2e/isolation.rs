//! Process isolation, end to end: a plugin configured `"isolation": "process"` runs in a child
//! process of the worker's own executable; whatever it does (a segfault, `abort`, `exit`, a
//! stack overflow, a double panic, memory beyond its limit, a call that never returns), the
//! worker survives, the call answers `null` with the reason, and the plugin serves again with
//! its last saved state while other plugins answer throughout.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tests::{PluginDir, eventually, sleeping_threads};

use crate::serve::Worker;
use crate::worker;

const PATIENCE: Duration = Duration::from_secs(30);

/// `plugin`'s entry in `GET /v1/plugins`; it must be loaded.
fn listed(worker: &Worker, plugin: &str) -> Value {
    worker
        .listed(plugin)
        .unwrap_or_else(|| panic!("{plugin} is not loaded"))
}

/// Calls `plugin.method` over the control API: the answer and the no-op reason, if any.
fn call(worker: &Worker, plugin: &str, method: &str, params: &Value) -> (Value, String) {
    let answer = worker.http(
        "POST",
        &format!("/v1/plugins/{plugin}/{method}"),
        params.to_string().as_bytes(),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let reason = answer.header("x-noop-reason").unwrap_or("").to_owned();
    (answer.json(), reason)
}

fn echo_answers(worker: &Worker) {
    assert_eq!(
        call(worker, "echo", "echo", &json!({"still": "here"})).0,
        json!({"still": "here"})
    );
}

/// The isolated plugin's process id, once it answers.
fn child_pid(worker: &Worker, plugin: &str) -> u32 {
    let mut pid = 0;
    assert!(
        eventually(PATIENCE, || {
            pid = call(worker, plugin, "pid", &Value::Null)
                .0
                .as_u64()
                .unwrap_or(0) as u32;
            pid != 0
        }),
        "{plugin} never answered"
    );
    pid
}

/// Whether process `pid` has `needle` in one of its mappings.
fn maps_contain(pid: u32, needle: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| maps.contains(needle))
}

fn start(dir: &PluginDir, crashy: Value, extra: &[&str]) -> Worker {
    dir.configure(&json!({ "crashy": crashy }));
    dir.add("crashy", "libcrashy.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    Worker::start(dir, &state, extra)
}

/// Every fault row of a method: the worker survives, the call answers `null` with the reason
/// ("crashed", or "timed out" for a call that never returns), echo answers throughout, and the
/// plugin serves again after the restart with the state of the last checkpoint. The worker
/// never maps the isolated plugin's library; the child does.
#[test]
fn every_fault_in_a_method_is_contained_and_the_plugin_comes_back_with_its_state() {
    let dir = PluginDir::new();
    let worker = start(
        &dir,
        json!({
            "isolation": "process",
            "timeoutMs": 2000,
            "memoryLimitMb": 256,
            "breaker": false,
            "restarts": {"max": 100, "windowSec": 300}
        }),
        &["--no-watch", "--checkpoint-interval", "1"],
    );
    let mut pid = child_pid(&worker, "crashy");
    assert_ne!(pid, worker.pid());
    assert!(
        maps_contain(pid, "libcrashy"),
        "the child does not map the plugin"
    );
    assert!(
        !maps_contain(worker.pid(), "libcrashy"),
        "the worker mapped the isolated plugin's library"
    );
    assert!(
        maps_contain(worker.pid(), "libecho"),
        "echo runs in-process"
    );
    assert_eq!(call(&worker, "crashy", "add", &json!({"n": 5})).0, json!(5));
    // The checkpoint keeps the state the child is restarted with.
    let saved = dir.shadow().join("state").join("crashy.json");
    assert!(
        eventually(PATIENCE, || std::fs::read_to_string(&saved)
            .is_ok_and(|s| s.trim() == "5")),
        "no checkpoint of crashy's state"
    );

    let rows: [(&str, Value, &str); 8] = [
        ("segfault", Value::Null, "crashed"),
        ("abort", Value::Null, "crashed"),
        ("exit", Value::Null, "crashed"),
        ("stack_overflow", Value::Null, "crashed"),
        ("double_panic", Value::Null, "crashed"),
        ("alloc", json!({"mb": 2048}), "crashed"),
        ("spin", Value::Null, "timed out"),
        ("sleep", json!({"ms": 600_000}), "timed out"),
    ];
    for (method, params, reason) in &rows {
        let (answer, why) = call(&worker, "crashy", method, params);
        assert_eq!(answer, Value::Null, "{method}");
        assert!(why.contains(reason), "{method}: {why}");
        echo_answers(&worker);
        assert!(
            eventually(PATIENCE, || call(&worker, "crashy", "total", &Value::Null)
                .0
                == json!(5)),
            "{method}: crashy did not come back with its state"
        );
        let next = child_pid(&worker, "crashy");
        assert_ne!(next, pid, "{method}: the same process answers");
        pid = next;
    }
    let crashy = listed(&worker, "crashy");
    let isolation = &crashy["isolation"];
    assert_eq!(isolation["mode"], "process", "{crashy}");
    assert_eq!(isolation["pid"], pid, "{crashy}");
    assert_eq!(isolation["crashes"], 6, "{crashy}");
    assert_eq!(isolation["timeouts"], 2, "{crashy}");
    assert_eq!(isolation["restarts"], 8, "{crashy}");
    assert_eq!(isolation["memory_limit_mb"], 256, "{crashy}");
    assert_eq!(listed(&worker, "echo")["isolation"]["mode"], "in-process");
    assert_eq!(worker.metric("worker_plugin_isolated", "crashy"), 1.0);
    assert_eq!(worker.metric("worker_plugin_isolated", "echo"), 0.0);
    assert_eq!(worker.metric("worker_plugin_crashes_total", "crashy"), 6.0);
    assert_eq!(worker.metric("worker_plugin_restarts_total", "crashy"), 8.0);
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("isolated plugin restarted"), "{log}");
}

/// Calls from several threads at once run at the same time in the child: four slow calls are
/// all asleep in the child together.
#[test]
fn calls_from_many_threads_run_concurrently_in_the_child() {
    let dir = PluginDir::new();
    let worker = start(&dir, json!({"isolation": "process"}), &["--no-watch"]);
    let pid = child_pid(&worker, "crashy");
    let api = worker.api();
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let api = api.clone();
            std::thread::spawn(move || {
                api.http("POST", "/v1/plugins/crashy/sleep", br#"{"ms": 4000}"#)
                    .json()
            })
        })
        .collect();
    assert!(
        eventually(PATIENCE, || sleeping_threads(pid) >= 4),
        "the calls did not run concurrently in the child"
    );
    for caller in callers {
        assert_eq!(caller.join().unwrap(), json!("slept"));
    }
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
}

/// After `restarts.max` crashes within the window the plugin is not restarted: its calls answer
/// `null`, `/v1/plugins` and `/metrics` say so; `POST /v1/plugins/crashy/reset` starts it again
/// with its state.
#[test]
fn the_crash_loop_limit_stops_restarts_until_a_reset() {
    let dir = PluginDir::new();
    let worker = start(
        &dir,
        json!({"isolation": "process", "breaker": false, "restarts": {"max": 2, "windowSec": 300}}),
        &["--no-watch"],
    );
    assert_eq!(call(&worker, "crashy", "add", &json!({"n": 3})).0, json!(3));
    // Reload: the state is kept by the new child (the reload saves it).
    let reloaded = worker.http("POST", "/v1/plugins/crashy/reload", b"");
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    child_pid(&worker, "crashy");
    let (_, why) = call(&worker, "crashy", "segfault", &Value::Null);
    assert!(why.contains("crashed"), "{why}");
    assert!(eventually(PATIENCE, || call(
        &worker,
        "crashy",
        "total",
        &Value::Null
    )
    .0 == json!(3)));
    let (_, why) = call(&worker, "crashy", "abort", &Value::Null);
    assert!(why.contains("crashed"), "{why}");
    assert!(
        eventually(
            PATIENCE,
            || listed(&worker, "crashy")["isolation"]["restarts_suspended"] == true
        ),
        "{}",
        listed(&worker, "crashy")
    );
    std::thread::sleep(Duration::from_millis(300));
    let (answer, why) = call(&worker, "crashy", "total", &Value::Null);
    assert_eq!(answer, Value::Null);
    assert!(
        why.contains("crashed too often") && why.contains("not restarted"),
        "{why}"
    );
    assert_eq!(
        worker.metric("worker_plugin_restarts_suspended", "crashy"),
        1.0
    );
    assert_eq!(
        worker.http("GET", "/healthz", b"").json()["degraded"],
        json!(["crashy"])
    );
    echo_answers(&worker);

    let reset = worker.http("POST", "/v1/plugins/crashy/reset", b"");
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert!(
        eventually(PATIENCE, || call(&worker, "crashy", "total", &Value::Null)
            .0
            == json!(3)),
        "crashy did not come back after the reset"
    );
    assert_eq!(
        listed(&worker, "crashy")["isolation"]["restarts_suspended"],
        false
    );
    let missing = worker.http("POST", "/v1/plugins/nothing/reset", b"");
    assert_eq!(missing.status, 404, "{}", missing.body);
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
}

/// A reload of an isolated plugin starts a new child, gives it the old one's state, swaps it in
/// and stops the old child.
#[test]
fn a_reload_carries_the_state_to_a_new_child() {
    let dir = PluginDir::new();
    let worker = start(&dir, json!({"isolation": "process"}), &["--no-watch"]);
    let old = child_pid(&worker, "crashy");
    assert_eq!(call(&worker, "crashy", "add", &json!({"n": 7})).0, json!(7));
    let reloaded = worker.http("POST", "/v1/plugins/crashy/reload", b"");
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    let new = child_pid(&worker, "crashy");
    assert_ne!(old, new);
    assert_eq!(call(&worker, "crashy", "total", &Value::Null).0, json!(7));
    assert!(
        eventually(PATIENCE, || !Path::new(&format!("/proc/{old}")).exists()
            || std::fs::read_to_string(format!("/proc/{old}/stat"))
                .is_ok_and(|s| s.contains(") Z "))),
        "the old child still runs"
    );
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
}

/// Faults in `create`, `save_state`, `restore_state`, `destroy` and a hook: the worker goes on,
/// other plugins answer, and the plugin is refused (create) or serves again.
#[test]
fn faults_in_create_state_destroy_and_hooks_are_contained() {
    // create: the load is refused with the reason; a sleeping create overruns its deadline.
    for (fault, reason) in [
        ("segfault", "crashed in create"),
        ("sleep", "did not finish starting"),
    ] {
        let dir = PluginDir::new();
        let worker = start(
            &dir,
            json!({"isolation": "process", "timeoutMs": 1500, "config": {"in": {"create": fault}}}),
            &["--no-watch"],
        );
        let plugins = worker.http("GET", "/v1/plugins", b"").json();
        let refused = plugins["refused"].to_string();
        assert!(refused.contains(reason), "{fault}: {refused}");
        echo_answers(&worker);
        let (status, log) = worker.stop();
        assert!(status.success(), "{log}");
    }

    // save_state, restore_state and destroy, reached by reloads.
    for entry in ["save_state", "restore_state", "destroy"] {
        let dir = PluginDir::new();
        let worker = start(
            &dir,
            json!({
                "isolation": "process",
                "breaker": false,
                "timeoutMs": 1500,
                "config": {"in": {entry: "abort"}}
            }),
            &["--no-watch"],
        );
        assert_eq!(call(&worker, "crashy", "add", &json!({"n": 2})).0, json!(2));
        for _ in 0..2 {
            let reloaded = worker.http("POST", "/v1/plugins/crashy/reload", b"");
            assert_eq!(reloaded.status, 200, "{entry}: {}", reloaded.body);
            assert!(
                eventually(PATIENCE, || call(&worker, "crashy", "ok", &Value::Null).0
                    == json!("fine")),
                "{entry}: crashy does not serve after the reload"
            );
            echo_answers(&worker);
        }
        let (status, log) = worker.stop();
        assert!(status.success(), "{entry}: {log}");
    }
}

/// A hook subscriber that crashes during a `POST /v1/tasks` batch: the batch completes, the
/// plugin's deliveries are skipped, and it serves again afterwards.
#[test]
fn a_crash_in_a_hook_during_a_task_batch_degrades_only_that_plugin() {
    let dir = PluginDir::new();
    let worker = start(
        &dir,
        json!({"isolation": "process", "breaker": false, "config": {"in": {"hook": "segfault"}}}),
        &["--no-watch"],
    );
    let tasks = worker_tasks(&dir, 4);
    let answer = worker.http("POST", "/v1/tasks", tasks.to_string().as_bytes());
    assert_eq!(answer.status, 200, "{}", answer.body);
    let results = answer.json();
    assert_eq!(results.as_array().map(Vec::len), Some(4), "{results}");
    assert!(
        eventually(
            PATIENCE,
            || listed(&worker, "crashy")["isolation"]["crashes"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        ),
        "{}",
        listed(&worker, "crashy")
    );
    echo_answers(&worker);
    assert!(
        eventually(PATIENCE, || call(&worker, "crashy", "ok", &Value::Null).0
            == json!("fine")),
        "crashy does not serve after the batch"
    );
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
}

/// `n` example tasks, as `worker example-tasks` prints them.
fn worker_tasks(dir: &PluginDir, n: usize) -> Value {
    let output = worker(dir, &["example-tasks", "--count", &n.to_string()], &[]);
    assert!(output.status.success());
    Value::Array(
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect(),
    )
}

/// What an isolated plugin prints is logged as its own (under its name as log target, so
/// `--log warn,crashy=info` shows it), never written to `worker call`'s stdout, which holds
/// the answer alone; `worker list` shows the isolation.
#[test]
fn an_isolated_plugins_output_is_logged_not_printed() {
    let dir = PluginDir::new();
    dir.add("crashy", "libcrashy.so");
    let output = worker(
        &dir,
        &[
            "--isolation",
            "process",
            "--log",
            "warn,crashy=info",
            "call",
            "crashy",
            "print",
            r#"{"text": "hello from the plugin"}"#,
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "\"printed\"", "{stderr}");
    assert!(
        stderr.contains("hello from the plugin") && stderr.contains("crashy"),
        "{stderr}"
    );
    let list = worker(&dir, &["--isolation", "process", "list"], &[]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("isolation process (pid "), "{text}");
    let list = worker(&dir, &["list"], &[]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("isolation in-process"), "{text}");
}

/// Plugin-to-plugin calls in both directions: an isolated plugin calls an in-process one
/// through the host, an in-process one calls the isolated one, and a cycle through the child is
/// cut. The isolated plugin's log events are the worker's, with its name.
#[test]
fn plugin_calls_cross_the_process_boundary_both_ways() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"isolation": "process"}}));
    dir.add("fixture", "libfixture.so");
    dir.add("faulty", "libfaulty.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    assert_eq!(listed(&worker, "fixture")["isolation"]["mode"], "process");
    let out = call(
        &worker,
        "fixture",
        "call",
        &json!({"plugin": "echo", "method": "echo", "params": {"via": "child"}}),
    );
    assert_eq!(out.0, json!({"via": "child"}), "{}", out.1);
    let into = call(
        &worker,
        "faulty",
        "call",
        &json!({"plugin": "fixture", "method": "call", "params": {"plugin": "echo", "method": "echo", "params": [1]}}),
    );
    assert_eq!(into.0, json!([1]), "{}", into.1);
    let cycle = call(
        &worker,
        "fixture",
        "call",
        &json!({"plugin": "faulty", "method": "call", "params": {"plugin": "fixture", "method": "call", "params": {}}}),
    );
    assert_eq!(cycle.0, Value::Null);
    // The plugin's `tracing` events, emitted in its process, reach the worker's log with its
    // name.
    assert_eq!(call(&worker, "fixture", "log", &Value::Null).0, Value::Null);
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("call cycle cut"), "{log}");
    assert!(
        log.lines().any(|line| line.contains("fixture says hello")
            && line.contains("WARN")
            && line.contains("plugin=fixture")),
        "{log}"
    );
}

/// Configuration errors name the field.
#[test]
fn bad_isolation_settings_are_refused_naming_the_field() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    for (settings, field) in [
        (json!({"isolation": "sandbox"}), "isolation"),
        (json!({"memoryLimitMb": 1}), "memoryLimitMb"),
        (json!({"restarts": {"max": 1, "windw": 3}}), "windw"),
    ] {
        dir.configure(&json!({ "echo": settings }));
        let output = worker(&dir, &["list"], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{settings}: {stderr}");
        assert!(stderr.contains(field), "{settings}: {stderr}");
    }
    let output = worker(&dir, &["--isolation", "sandbox", "list"], &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("isolation"));
}

/// Limits that only an isolated plugin can have are said to be ignored for one in-process,
/// naming the plugin and the field; with isolation they apply and nothing is said.
#[test]
fn isolation_limits_on_an_in_process_plugin_are_said_to_be_ignored() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    dir.configure(&json!({ "echo": {"memoryLimitMb": 256, "restarts": {"max": 2}} }));
    let output = worker(&dir, &["--log", "warn", "list"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for field in ["memoryLimitMb", "restarts"] {
        assert!(
            stderr.lines().any(|l| l.contains("WARN")
                && l.contains("plugin=echo")
                && l.contains(&format!("{field} applies only to an isolated plugin"))),
            "{field}: {stderr}"
        );
    }
    let output = worker(
        &dir,
        &["--log", "warn", "--isolation", "process", "list"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("applies only to an isolated plugin"),
        "{stderr}"
    );
}

/// `worker run` with every plugin isolated: `worker run`'s records as JSON values.
fn run_isolated(dir: &PluginDir, tasks: &[Value]) -> Vec<Value> {
    let file = dir.shadow().join("tasks.jsonl");
    let lines: Vec<String> = tasks.iter().map(Value::to_string).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let output = worker(
        dir,
        &[
            "--isolation",
            "process",
            "--log",
            "warn",
            "run",
            "--tasks",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|record| record.get("id").is_some())
        .collect()
}

/// Hooks work isolated: a sequential subscriber's modification reaches the next step, and a
/// block stops the task, both from plugins in their own processes.
#[test]
fn isolated_hooks_modify_and_block() {
    let dir = PluginDir::new();
    dir.configure(&json!({
        "experiment": {"config": {"experiments": {"chat": {"variants": {"recall": 1}}}}},
        "fixture": {"config": {"on": {"task.after_step": {"modify": {"messages": [
            {"role": "user", "content": "My city is Quito."},
            {"role": "assistant", "content": "Looking for: city"}
        ]}}}}}
    }));
    dir.add("fixture", "libfixture.so");
    dir.add("experiment", "libexperiment.so");
    let task = json!({"id": "c1", "type": "chat", "input": {"messages": [{"role": "user", "content": "My city is Lima."}, {"role": "user", "content": "What is my order number?"}]}, "reference": "Quito"});
    let records = run_isolated(&dir, std::slice::from_ref(&task));
    assert_eq!(records[0]["handler"], "recall", "{records:?}");
    assert_eq!(records[0]["output"], "Quito", "{records:?}");

    dir.configure(&json!({"fixture": {"config": {"on": {"task.received": {"block": {"reason": "not today", "code": "closed"}}}}}}));
    let records = run_isolated(&dir, &[task]);
    assert_eq!(records[0]["blocked_by"], "fixture", "{records:?}");
    assert!(
        records[0]["error"].as_str().unwrap().contains("not today"),
        "{records:?}"
    );
}

/// A hook subscription's own `timeoutMs` bounds an isolated delivery too: a `task.scored`
/// subscriber that sleeps a minute, with a 300 ms subscription deadline under a ten-minute
/// plugin deadline, is killed at the subscription's, and the run goes on (with the plugin's
/// deadline it would outlast the test's two-minute bound).
#[test]
fn an_isolated_hook_delivery_keeps_its_subscription_deadline() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": {
        "timeoutMs": 600_000,
        "breaker": false,
        "hooks": {"task.scored": {"timeoutMs": 300}},
        "config": {"in": {"hook": "sleep"}, "sleepMs": 60_000}
    }}));
    dir.add("crashy", "libcrashy.so");
    let tasks = worker::pipeline::example_tasks(2, 3);
    let records = run_isolated(&dir, &tasks);
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(
        records.iter().all(|r| r["score"].is_number()),
        "{records:?}"
    );
}

/// An embedder isolates plugins through the library: `with_isolation` and, since a test
/// binary's `main` is not its own, `with_child_program` naming a program whose `main` calls
/// `run_child_if_requested`. A crash is `PluginCallError::Crashed`, an overrun `TimedOut`.
#[test]
fn an_embedder_isolates_through_the_builder() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": {"timeoutMs": 1500, "breaker": false}}));
    dir.add("crashy", "libcrashy.so");
    let host = plugin_host::PluginHost::builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_isolation(plugin_host::Isolation::Process)
        .with_child_program(env!("CARGO_BIN_EXE_worker-under-test"))
        .build()
        .unwrap();
    let report = host.scan().unwrap();
    assert_eq!(report.loaded, ["crashy"], "{report:?}");
    let pid = host.execute("crashy", "pid", &Value::Null).unwrap();
    assert_ne!(pid, json!(std::process::id()));
    let crashed = host.call("crashy", "segfault", &Value::Null).unwrap_err();
    assert!(
        matches!(crashed, plugin_host::PluginCallError::Crashed { .. }),
        "{crashed}"
    );
    assert!(eventually(PATIENCE, || host
        .execute("crashy", "ok", &Value::Null)
        .is_some()));
    let timed_out = host.call("crashy", "spin", &Value::Null).unwrap_err();
    assert!(
        matches!(timed_out, plugin_host::PluginCallError::TimedOut { .. }),
        "{timed_out}"
    );
    serves_again(&host);
    let isolation = host.plugin("crashy").unwrap().isolation;
    assert_eq!(
        (isolation.crashes, isolation.timeouts),
        (1, 1),
        "{isolation:?}"
    );
    assert!(!maps_contain(std::process::id(), "libcrashy"));
}

/// An embedder's host with `crashy` isolated (deadline `timeout_ms`, no breaker).
/// Waits until `crashy` answers again (after its child was restarted), failing the test if it
/// does not within [`PATIENCE`].
fn serves_again(host: &plugin_host::PluginHost) {
    assert!(
        eventually(PATIENCE, || host.execute("crashy", "ok", &Value::Null)
            == Some(json!("fine"))),
        "crashy does not answer again"
    );
}

fn isolated_crashy(dir: &PluginDir, timeout_ms: u64) -> plugin_host::PluginHost {
    dir.configure(&json!({"crashy": {"timeoutMs": timeout_ms, "breaker": false}}));
    dir.add("crashy", "libcrashy.so");
    let host = plugin_host::PluginHost::builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_isolation(plugin_host::Isolation::Process)
        .with_child_program(env!("CARGO_BIN_EXE_worker-under-test"))
        .build()
        .unwrap();
    let report = host.scan().unwrap();
    assert_eq!(report.loaded, ["crashy"], "{report:?}");
    host
}

/// Many callers at once, whose answers come back in another order than their requests went
/// out (the first sleeps longest): each gets its own answer, whichever caller read it from the
/// child, and quick calls are answered meanwhile.
#[test]
fn concurrent_callers_each_get_their_own_answer_whatever_the_order() {
    let dir = PluginDir::new();
    let host = std::sync::Arc::new(isolated_crashy(&dir, 30_000));
    let start = std::sync::Arc::new(std::sync::Barrier::new(8));
    let callers: Vec<_> = (0..8u64)
        .map(|i| {
            let (host, start) = (std::sync::Arc::clone(&host), std::sync::Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                std::thread::sleep(Duration::from_millis(i * 20));
                let params = json!({"ms": (8 - i) * 60, "answer": format!("caller {i}")});
                let slow = host.call("crashy", "sleep", &params);
                let quick = host.call("crashy", "ok", &Value::Null);
                (slow, quick)
            })
        })
        .collect();
    for (i, caller) in callers.into_iter().enumerate() {
        let (slow, quick) = caller.join().unwrap();
        assert_eq!(slow.unwrap(), Some(json!(format!("caller {i}"))));
        assert_eq!(quick.unwrap(), Some(json!("fine")));
    }
    let isolation = host.plugin("crashy").unwrap().isolation;
    assert_eq!(
        (isolation.crashes, isolation.timeouts),
        (0, 0),
        "{isolation:?}"
    );
}

/// A crash while several calls wait (one reading the child's answers for all, the others
/// asleep): every one of them answers "crashed" (not "timed out" at its deadline), and the plugin
/// serves again after the restart.
#[test]
fn a_crash_answers_every_waiting_caller_crashed() {
    let dir = PluginDir::new();
    let host = std::sync::Arc::new(isolated_crashy(&dir, 60_000));
    let pid = host
        .execute("crashy", "pid", &Value::Null)
        .and_then(|pid| pid.as_u64())
        .unwrap() as u32;
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let host = std::sync::Arc::clone(&host);
            std::thread::spawn(move || host.call("crashy", "sleep", &json!({"ms": 50_000})))
        })
        .collect();
    assert!(
        eventually(PATIENCE, || sleeping_threads(pid) >= 4),
        "the calls did not all reach the child"
    );
    let crashed = host.call("crashy", "segfault", &Value::Null).unwrap_err();
    assert!(
        matches!(crashed, plugin_host::PluginCallError::Crashed { .. }),
        "{crashed}"
    );
    for caller in callers {
        let error = caller.join().unwrap().unwrap_err();
        assert!(
            matches!(error, plugin_host::PluginCallError::Crashed { .. }),
            "{error}"
        );
    }
    serves_again(&host);
    assert_eq!(host.plugin("crashy").unwrap().isolation.crashes, 1);
}

/// Requests and answers of every size get through, on either side of the call region's slot
/// (32,640 bytes): what fits goes through the shared memory, the rest over the socket and the
/// answer pipe, with the same answers.
#[test]
fn frames_of_every_size_cross_the_region_or_the_pipes() {
    let dir = PluginDir::new();
    let host = isolated_crashy(&dir, 30_000);
    for n in [0, 1_000, 32_590, 32_620, 32_621, 32_700, 100_000, 1 << 20] {
        let answer = host.execute("crashy", "repeat", &json!({"n": n}));
        assert_eq!(answer, Some(json!("x".repeat(n))), "answer of {n} bytes");
        let pad = "y".repeat(n);
        let answer = host.execute("crashy", "repeat", &json!({"n": 3, "pad": pad}));
        assert_eq!(answer, Some(json!("xxx")), "request of {n} bytes");
    }
    assert_eq!(host.plugin("crashy").unwrap().isolation.crashes, 0);
}

/// A call whose log events fill the answer pipe many times over (300 KiB of warnings, the
/// pipe holds 64) is answered, after its events, well within its deadline: the host reads the
/// pipe while the child writes.
#[test]
fn a_call_that_logs_more_than_the_pipe_holds_is_answered() {
    let dir = PluginDir::new();
    let worker = start(
        &dir,
        json!({"isolation": "process", "timeoutMs": 20_000}),
        &["--no-watch"],
    );
    let started = std::time::Instant::now();
    let (answer, reason) = call(&worker, "crashy", "chatter", &json!({"n": 300}));
    assert_eq!((answer, reason.as_str()), (json!("said"), ""));
    assert!(started.elapsed() < Duration::from_secs(15));
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("i=299"), "the last event is missing");
}

/// A plugin that writes into the memory its process shares with the host (here: a forged
/// answer to its own call, with a length beyond the slot) cannot make the host read beyond the
/// slot or wait without bound: the call answers "crashed" (not the plugin's later answer), the
/// child is ended and started again, and the plugin serves again.
#[test]
fn a_child_that_forges_an_answer_in_the_shared_memory_is_ended_and_restarted() {
    let dir = PluginDir::new();
    let host = isolated_crashy(&dir, 30_000);
    let forged = host.call("crashy", "scribble", &Value::Null).unwrap_err();
    assert!(
        matches!(forged, plugin_host::PluginCallError::Crashed { .. }),
        "{forged}"
    );
    serves_again(&host);
    assert_eq!(host.plugin("crashy").unwrap().isolation.crashes, 1);
}

/// A plugin that keeps changing the answer's number in the shared memory to numbers no request
/// has is ended at the first change the caller sees (its wait ends at least once a second), not
/// served until it stops: the call answers "crashed" instead of the plugin's later "churned",
/// and the plugin serves again.
#[test]
fn a_child_that_churns_the_answer_number_is_ended_at_once() {
    let dir = PluginDir::new();
    let host = isolated_crashy(&dir, 30_000);
    let churned = host.call("crashy", "churn", &Value::Null);
    assert!(
        matches!(churned, Err(plugin_host::PluginCallError::Crashed { .. })),
        "{churned:?}"
    );
    serves_again(&host);
    assert_eq!(host.plugin("crashy").unwrap().isolation.crashes, 1);
}

/// What the child logs while it loads the plugin (here the loader's warning about a file others
/// may write, allowed by `--insecure-permissions`) reaches the worker's log, and the load goes
/// on.
#[test]
fn warnings_of_the_child_while_loading_are_logged_and_the_load_goes_on() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = PluginDir::new();
    let file = dir.add("echo", "libecho.so");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = worker(
        &dir,
        &[
            "--isolation",
            "process",
            "--insecure-permissions",
            "call",
            "echo",
            "echo",
            r#"{"loaded": true}"#,
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        r#"{"loaded":true}"#,
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("insecure permissions allowed")
                && l.contains("isolation::supervisor")),
        "{stderr}"
    );
}

/// A plugin that started a helper process and then crashed is restarted: the helper holds
/// nothing that hides the crash from the host (its standard input is not the control socket).
#[test]
fn a_crash_after_starting_a_helper_process_still_restarts_the_plugin() {
    let dir = PluginDir::new();
    let host = isolated_crashy(&dir, 60_000);
    let before = host
        .execute("crashy", "pid", &Value::Null)
        .and_then(|pid| pid.as_u64())
        .unwrap();
    let crashed = host
        .call("crashy", "spawn_then_segfault", &Value::Null)
        .unwrap_err();
    assert!(
        matches!(crashed, plugin_host::PluginCallError::Crashed { .. }),
        "{crashed}"
    );
    assert!(
        eventually(PATIENCE, || host.execute("crashy", "ok", &Value::Null)
            == Some(json!("fine"))),
        "the plugin was not restarted"
    );
    let after = host
        .execute("crashy", "pid", &Value::Null)
        .and_then(|pid| pid.as_u64())
        .unwrap();
    assert_ne!(before, after);
    assert_eq!(host.plugin("crashy").unwrap().isolation.crashes, 1);
}

/// A child that takes no request (stopped here; a plugin could stop reading too) cannot hold
/// the caller: a request larger than the pipe holds waits for room at most the call's deadline,
/// the child is killed as for an overrun, and the plugin serves again after its restart.
#[test]
fn a_child_that_takes_no_request_cannot_hold_the_caller() {
    let dir = PluginDir::new();
    let host = std::sync::Arc::new(isolated_crashy(&dir, 2_000));
    let pid = host
        .execute("crashy", "pid", &Value::Null)
        .and_then(|pid| pid.as_u64())
        .unwrap();
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let big = json!({ "text": "x".repeat(1 << 20) });
    let caller = {
        let host = std::sync::Arc::clone(&host);
        std::thread::spawn(move || host.call("crashy", "ok", &big))
    };
    assert!(
        eventually(Duration::from_secs(60), || caller.is_finished()),
        "the caller is still held by a child that reads nothing"
    );
    let error = caller.join().unwrap().unwrap_err();
    assert!(
        matches!(error, plugin_host::PluginCallError::TimedOut { .. }),
        "{error}"
    );
    serves_again(&host);
}

/// A child that sends more calls to other plugins than the host answers at once (256, each
/// answered on a thread of its own) gets the excess refused at once with an error, instead of
/// making the host start a thread for every frame it sends; the calls within the limit are
/// answered, and the plugin calls out again as soon as they are.
#[test]
fn a_child_cannot_make_the_host_start_a_thread_per_call_it_sends() {
    let dir = PluginDir::new();
    dir.configure(
        &json!({"crashy": {"isolation": "process", "timeoutMs": 60_000, "breaker": false}}),
    );
    dir.add("crashy", "libcrashy.so");
    dir.add("fixture", "libfixture.so");
    let host = plugin_host::PluginHost::builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_child_program(env!("CARGO_BIN_EXE_worker-under-test"))
        .build()
        .unwrap();
    let report = host.scan().unwrap();
    assert_eq!(report.loaded.len(), 2, "{report:?}");
    let fan_out = |n: u64| {
        host.execute(
            "crashy",
            "fan_out",
            &json!({"plugin": "fixture", "method": "sleep", "params": {"ms": 5_000}, "n": n}),
        )
        .unwrap()
    };
    let flood = fan_out(300);
    assert_eq!(
        (flood["answered"].as_u64(), flood["failed"].as_u64()),
        (Some(256), Some(44)),
        "{flood}"
    );
    let error = flood["error"].as_str().unwrap();
    assert!(
        error.contains("too many") && error.contains("at most 256"),
        "{error}"
    );
    let again = fan_out(3);
    assert_eq!(
        (again["answered"].as_u64(), again["failed"].as_u64()),
        (Some(3), Some(0)),
        "{again}"
    );
    let isolation = host.plugin("crashy").unwrap().isolation;
    assert_eq!(
        (isolation.crashes, isolation.timeouts),
        (0, 0),
        "{isolation:?}"
    );
}

/// A plugin whose library, as it is loaded in its child process, sends the worker a frame a
/// byte at a time without end (a constructor trickling onto the child's channel) is given up
/// at the load's deadline: the worker does not wait for a load that never ends.
#[test]
fn a_child_trickling_bytes_while_loading_is_given_up_at_the_deadline() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": {"isolation": "process"}}));
    dir.add("crashy", "libcrashy.so");
    let out = worker(
        &dir,
        &["--call-timeout-ms", "1000", "call", "crashy", "ok"],
        &[("CRASHY_TRICKLE_AT_LOAD", "1")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not load the plugin within 1000 ms"),
        "{}",
        &stderr[stderr.len().saturating_sub(2000)..]
    );
    // Before the fix each read waited up to the whole deadline, so a byte every half
    // millisecond held the load for as long as the frame lasted (500 s for a MiB; `worker`
    // gives up after two minutes and fails the test).
}
