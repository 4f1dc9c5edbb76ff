//! Containment of in-process plugins, end to end with the `crashy` fixture: lifecycle entries
//! past their deadline, hook deliveries past theirs, bounded joins, and crash records with
//! quarantine.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{PluginDir, eventually};

use crate::serve::Worker;

const PATIENCE: Duration = Duration::from_secs(30);
/// What an abandoned entry would take if it were waited for: far beyond any bound a test waits.
const ASLEEP_MS: u64 = 120_000;

/// Runs `request` and asserts it answered well before the entry it waited on would have.
fn promptly<T>(what: &str, request: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let answer = request();
    assert!(
        started.elapsed() < Duration::from_millis(ASLEEP_MS / 2),
        "{what} waited for the sleeping entry: {:?}",
        started.elapsed()
    );
    answer
}

fn crashy_in(entry: &str, fault: &str) -> Value {
    json!({
        "config": {"in": {entry: fault}, "sleepMs": ASLEEP_MS},
        "timeoutMs": 300,
        "breaker": false,
    })
}

/// A reload whose `save_state` overruns is refused and the old generation keeps serving with
/// its state; the overrun is logged, counted, and reported by `/healthz`; an unload whose
/// `save_state` overruns completes; other plugins reload and load meanwhile; shutdown ends.
#[test]
fn a_save_state_past_its_deadline_is_abandoned_and_the_worker_goes_on() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": crashy_in("save_state", "sleep")}));
    dir.add("crashy", "libcrashy.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let args = ["--checkpoint-interval", "0", "--shutdown-timeout", "3"];
    let worker = Worker::start(&dir, &state, &args);
    let added = worker.http("POST", "/v1/plugins/crashy/add", br#"{"n": 5}"#);
    assert_eq!(added.json(), json!(5), "{}", added.body);
    let generation = worker.listed("crashy").unwrap()["generation"].clone();

    let reload = promptly("the reload", || {
        worker.http("POST", "/v1/plugins/crashy/reload", b"")
    });
    assert_ne!(reload.status, 200, "{}", reload.body);
    assert!(
        reload.body.contains("save_state") && reload.body.contains("keeps serving"),
        "{}",
        reload.body
    );
    let crashy = worker.listed("crashy").unwrap();
    assert_eq!(crashy["generation"], generation);
    assert_eq!(crashy["health"]["timeouts"], 1, "{crashy}");
    assert_eq!(crashy["health"]["stuck_entries"], 1, "{crashy}");
    // The old generation serves, with what it learned.
    let total = worker.http("POST", "/v1/plugins/crashy/total", b"");
    assert_eq!(total.json(), json!(5), "{}", total.body);
    let healthz = worker.http("GET", "/healthz", b"").json();
    assert_eq!(healthz["status"], "degraded");
    assert_eq!(healthz["degraded"], json!(["crashy"]));

    let echo = worker.http("POST", "/v1/plugins/echo/reload", b"");
    assert_eq!(echo.status, 200, "{}", echo.body);
    let unload = promptly("the unload", || {
        worker.http("DELETE", "/v1/plugins/crashy", b"")
    });
    assert_eq!(unload.status, 200, "{}", unload.body);
    assert!(worker.listed("crashy").is_none());
    dir.add("experiment", "libexperiment.so");
    assert!(
        eventually(PATIENCE, || worker.listed("experiment").is_some()),
        "the watcher did not load a new plugin"
    );
    let (_, log) = worker
        .stop_within(PATIENCE)
        .expect("shutdown waited for the sleeping save_state");
    assert!(
        log.lines()
            .any(|l| l.contains("plugin entry overran its deadline")
                && l.contains("plugin=\"crashy\"")
                && l.contains("entry=\"save_state\"")
                && l.contains("elapsed_ms=")),
        "{log}"
    );
    // Never saved: what the worker had on disk stays (here, nothing).
    assert!(!state.join("crashy.json").exists());
}

/// A `restore_state` past its deadline at load refuses the plugin and keeps its state file;
/// the other plugins load and serve.
#[test]
fn a_restore_state_past_its_deadline_refuses_the_load_and_keeps_the_state() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": crashy_in("restore_state", "sleep")}));
    dir.add("crashy", "libcrashy.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("crashy.json"), "7").unwrap();
    let args = ["--checkpoint-interval", "0", "--shutdown-timeout", "3"];
    let worker = promptly("the start", || Worker::start(&dir, &state, &args));
    assert!(worker.listed("crashy").is_none());
    let echoed = worker.http("POST", "/v1/plugins/echo/echo", br#"{"x": 1}"#);
    assert_eq!(echoed.json(), json!({"x": 1}));
    let (_, log) = worker
        .stop_within(PATIENCE)
        .expect("shutdown waited for the sleeping restore_state");
    assert!(
        log.lines().any(|l| l.contains("plugin file refused")
            && l.contains("restore_state")
            && l.contains("did not return within 300 ms")),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("crashy.json"))
            .unwrap()
            .trim(),
        "7"
    );
}

/// A `destroy` past its deadline: the unload completes, and so do later reloads and shutdown.
#[test]
fn a_destroy_past_its_deadline_is_abandoned() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": crashy_in("destroy", "sleep")}));
    dir.add("crashy", "libcrashy.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let args = ["--checkpoint-interval", "0", "--shutdown-timeout", "3"];
    let worker = Worker::start(&dir, &state, &args);
    let unload = promptly("the unload", || {
        worker.http("DELETE", "/v1/plugins/crashy", b"")
    });
    assert_eq!(unload.status, 200, "{}", unload.body);
    let echo = promptly("the next reload", || {
        worker.http("POST", "/v1/plugins/echo/reload", b"")
    });
    assert_eq!(echo.status, 200, "{}", echo.body);
    let (_, log) = worker
        .stop_within(PATIENCE)
        .expect("shutdown waited for the sleeping destroy");
    assert!(
        log.lines()
            .any(|l| l.contains("plugin entry overran its deadline")
                && l.contains("plugin=\"crashy\"")
                && l.contains("entry=\"destroy\"")),
        "{log}"
    );
}

/// SIGTERM while a plugin's `save_state` sleeps: the worker ends within its shutdown timeout,
/// with status 1 and the plugin named as abandoned; the others are saved.
#[test]
fn shutdown_with_a_sleeping_save_state_is_bounded() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": crashy_in("save_state", "sleep")}));
    dir.add("crashy", "libcrashy.so");
    dir.add("experiment", "libexperiment.so");
    let state = dir.shadow().join("state");
    let args = ["--checkpoint-interval", "0", "--shutdown-timeout", "3"];
    let worker = Worker::start(&dir, &state, &args);
    let (status, log) = promptly("the shutdown", || {
        worker
            .stop_within(PATIENCE)
            .expect("shutdown waited for the sleeping save_state")
    });
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("plugin abandoned") && l.contains("plugin=\"crashy\"")),
        "{log}"
    );
    assert!(!state.join("crashy.json").exists(), "{log}");
}

/// A hook subscription's own `timeoutMs` (in the plugin's hook override): a delivery past it is
/// reported by the watchdog like a call (logged with the hook, counted, breaker opened), while
/// the plugin's own deadline is far longer.
#[test]
fn a_hook_delivery_past_its_subscription_deadline_is_reported() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": {
        "config": {"in": {"hook": "sleep"}, "sleepMs": 3000},
        "hooks": {"task.scored": {"timeoutMs": 100}},
    }}));
    dir.add("crashy", "libcrashy.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--checkpoint-interval", "0"]);
    let tasks: Vec<Value> = worker::pipeline::example_tasks(1, 1);
    let done = worker.http("POST", "/v1/tasks", tasks[0].to_string().as_bytes());
    assert_eq!(done.status, 200, "{}", done.body);
    let health = worker.listed("crashy").unwrap()["health"].clone();
    assert_eq!(health["timeouts"], 1, "{health}");
    assert_eq!(health["timeout_ms"], 10_000, "{health}");
    assert_eq!(health["breaker"], "open", "{health}");
    let (_, log) = worker.stop();
    assert!(
        log.lines().any(|l| l.contains("plugin call overdue")
            && l.contains("plugin=\"crashy\"")
            && l.contains("method=task.scored")
            && l.contains("timeout_ms=100")),
        "{log}"
    );
}

/// A fire-and-forget subscriber that sleeps does not hold the worker at exit: `worker run`
/// waits for the queue at most the call deadline, then abandons it and ends.
#[test]
fn a_sleeping_fire_and_forget_subscriber_does_not_hold_the_exit() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": {
        "config": {"in": {"hook": "sleep"}, "sleepMs": ASLEEP_MS},
        "hooks": {"task.scored": {"mode": "fire_and_forget"}},
    }}));
    dir.add("crashy", "libcrashy.so");
    let tasks = dir.shadow().join("tasks.jsonl");
    let task = &worker::pipeline::example_tasks(1, 1)[0];
    std::fs::write(&tasks, format!("{task}\n")).unwrap();
    let output = promptly("worker run", || {
        crate::worker(
            &dir,
            &[
                "--call-timeout-ms",
                "500",
                "--log",
                "warn",
                "run",
                "--tasks",
                tasks.to_str().unwrap(),
            ],
            &[],
        )
    });
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    assert!(
        log.contains("hook-fire-and-forget") && log.contains("abandoned"),
        "{log}"
    );
}

/// The `quarantined` reason `worker list --json` shows for `plugin`, if it is loaded and
/// quarantined; and that it then runs isolated.
fn quarantined(dir: &PluginDir, plugin: &str) -> Option<String> {
    let output = crate::worker(dir, &["list", "--json"], &[]);
    assert!(output.status.success(), "{output:?}");
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let entry = listed["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == plugin)?;
    let reason = entry["isolation"]["quarantined"].as_str()?.to_owned();
    assert_eq!(entry["isolation"]["mode"], "process", "{entry}");
    Some(reason)
}

/// What `worker list --json` shows: the loaded plugins' names and the refusals' reasons.
fn list(dir: &PluginDir) -> (Vec<String>, Vec<String>) {
    let output = crate::worker(dir, &["list", "--json"], &[]);
    assert!(output.status.success(), "{output:?}");
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let names = listed["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    let refused = listed["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_owned())
        .collect();
    (names, refused)
}

/// Each way plugin code can take the process down (a null write, `abort`, `exit`, a stack
/// overflow, a double panic) leaves a crash record naming the plugin and the method; from the
/// next start the plugin runs isolated, quarantined (in `worker list`, text and JSON, and
/// `worker quarantine list`), so the same call no longer brings the worker down, until
/// `worker quarantine clear` clears it.
#[test]
fn a_crash_in_plugin_code_quarantines_the_plugin_until_cleared() {
    for (fault, cause) in [
        ("segfault", "SIGSEGV"),
        ("abort", "SIGABRT"),
        ("exit", "exit"),
        ("stack_overflow", "SIGSEGV"),
        ("double_panic", "SIGABRT"),
    ] {
        let dir = PluginDir::new();
        dir.add("crashy", "libcrashy.so");
        dir.add("echo", "libecho.so");
        let crashed = crate::worker(&dir, &["call", "crashy", fault], &[]);
        assert!(!crashed.status.success(), "{fault}: {crashed:?}");
        if fault == "exit" {
            assert_eq!(crashed.status.code(), Some(70), "{crashed:?}");
        }

        let (loaded, refused) = list(&dir);
        assert_eq!(loaded, ["crashy", "echo"], "{fault}: {refused:?}");
        let expected = format!("it brought the worker down ({cause} in `{fault}`)");
        let reason = quarantined(&dir, "crashy").expect("crashy is not quarantined");
        assert!(reason.contains(&expected), "{fault}: {reason}");
        let text = crate::worker(&dir, &["list"], &[]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains(&expected) && text.contains("worker quarantine clear crashy"),
            "{text}"
        );
        // Contained now: the same call answers nothing and the worker exits normally.
        let contained = crate::worker(&dir, &["call", "crashy", fault], &[]);
        assert!(contained.status.success(), "{fault}: {contained:?}");
        assert_eq!(String::from_utf8_lossy(&contained.stdout).trim(), "null");
        let ok = crate::worker(&dir, &["call", "crashy", "ok"], &[]);
        assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "\"fine\"");
        let records = crate::worker(&dir, &["quarantine", "list", "--json"], &[]);
        let records: Value = serde_json::from_slice(&records.stdout).unwrap();
        assert_eq!(records.as_array().unwrap().len(), 1, "{records}");
        assert_eq!(records[0]["plugin"], "crashy");
        assert_eq!(records[0]["method"], fault);
        assert_eq!(records[0]["cause"], cause);

        let cleared = crate::worker(&dir, &["quarantine", "clear", "crashy"], &[]);
        assert!(cleared.status.success(), "{cleared:?}");
        let (loaded, refused) = list(&dir);
        assert_eq!(loaded, ["crashy", "echo"], "{fault}: {refused:?}");
        assert_eq!(quarantined(&dir, "crashy"), None);
        let records = crate::worker(&dir, &["quarantine", "list"], &[]);
        assert_eq!(
            String::from_utf8_lossy(&records.stdout).trim(),
            "no plugin is quarantined"
        );
    }
}

/// One HTTP request that makes a plugin segfault kills `worker serve`; the restarted worker
/// runs that plugin isolated, quarantined (in `GET /v1/plugins`): the same request now answers
/// nothing, and the worker and the other plugins go on.
#[test]
fn serve_killed_by_a_plugin_restarts_with_the_plugin_quarantined() {
    let dir = PluginDir::new();
    dir.add("crashy", "libcrashy.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let args = ["--checkpoint-interval", "0"];
    let worker = Worker::start(&dir, &state, &args);
    let api = worker.api();
    let _ = std::panic::catch_unwind(|| api.http("POST", "/v1/plugins/crashy/segfault", b""));
    let (status, log) = worker
        .stop_within(PATIENCE)
        .expect("the worker survived a segfault in-process");
    assert!(!status.success(), "{log}");

    let worker = Worker::start(&dir, &state, &args);
    let crashy = worker.listed("crashy").expect("crashy is not loaded");
    assert_eq!(crashy["isolation"]["mode"], "process", "{crashy}");
    let reason = crashy["isolation"]["quarantined"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("SIGSEGV in `segfault`"), "{crashy}");
    let answer = worker.http("POST", "/v1/plugins/crashy/segfault", b"");
    assert_eq!(answer.json(), Value::Null);
    assert!(
        answer
            .header("x-noop-reason")
            .unwrap_or("")
            .contains("crashed"),
        "{:?}",
        answer.header("x-noop-reason")
    );
    let echoed = worker.http("POST", "/v1/plugins/echo/echo", br#"{"x": 1}"#);
    assert_eq!(echoed.json(), json!({"x": 1}));
    let (_, log) = worker.stop();
    assert!(
        log.lines()
            .any(|l| l.contains("plugin quarantined") && l.contains("plugin=\"crashy\"")),
        "{log}"
    );
}

/// A crash in a lifecycle entry or a hook is recorded under that entry's or hook's name:
/// `create` (while the worker loads), `save_state` and `destroy` (while `worker call` saves and
/// unloads at its end), and a `task.scored` delivery (during `worker run`).
#[test]
fn a_crash_in_an_entry_or_a_hook_names_it() {
    for (entry, fault, cause, command) in [
        ("create", "abort", "SIGABRT", "call"),
        ("save_state", "segfault", "SIGSEGV", "call"),
        ("destroy", "exit", "exit", "call"),
        ("hook", "segfault", "SIGSEGV", "run"),
    ] {
        let dir = PluginDir::new();
        dir.configure(&json!({"crashy": {"config": {"in": {entry: fault}}}}));
        dir.add("crashy", "libcrashy.so");
        dir.add("echo", "libecho.so");
        let tasks = dir.shadow().join("tasks.jsonl");
        let task = &worker::pipeline::example_tasks(1, 1)[0];
        std::fs::write(&tasks, format!("{task}\n")).unwrap();
        let args: Vec<&str> = match command {
            "call" => vec!["call", "crashy", "ok"],
            _ => vec!["run", "--tasks", tasks.to_str().unwrap()],
        };
        let crashed = crate::worker(&dir, &args, &[]);
        assert!(!crashed.status.success(), "{entry}: {crashed:?}");
        let method = if entry == "hook" {
            "task.scored"
        } else {
            entry
        };
        let expected = format!("({cause} in `{method}`)");
        // A crash in `create` keeps an isolated plugin from loading at all: refused, with
        // the isolated process's reason; the others load quarantined.
        if entry == "create" {
            let (loaded, refused) = list(&dir);
            assert_eq!(loaded, ["echo"], "{entry}: {refused:?}");
        } else {
            let reason = quarantined(&dir, "crashy").expect("crashy is not quarantined");
            assert!(reason.contains(&expected), "{entry}: {reason}");
        }
        let records = crate::worker(&dir, &["quarantine", "list"], &[]);
        assert!(
            String::from_utf8_lossy(&records.stdout).contains(&format!("`{method}`")),
            "{entry}: {records:?}"
        );
    }
}

/// A method that never returns (`spin`): the watchdog logs it with the plugin, method and
/// elapsed time, counts a timeout and opens the breaker; `/healthz` is degraded naming the
/// plugin; other plugins answer; SIGTERM still ends the worker within its shutdown timeout,
/// with status 1 and the stuck plugin named.
#[test]
fn a_spinning_method_is_reported_and_shutdown_stays_bounded() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": {"timeoutMs": 300}}));
    dir.add("crashy", "libcrashy.so");
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let args = ["--checkpoint-interval", "0", "--shutdown-timeout", "2"];
    let worker = Worker::start(&dir, &state, &args);
    let api = worker.api();
    std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| api.http("POST", "/v1/plugins/crashy/spin", b""));
    });
    assert!(
        eventually(
            PATIENCE,
            || worker.listed("crashy").unwrap()["health"]["timeouts"] == 1
        ),
        "the spinning call was never reported"
    );
    let health = worker.listed("crashy").unwrap()["health"].clone();
    assert_eq!(health["breaker"], "open", "{health}");
    assert_eq!(health["overdue_calls"], 1, "{health}");
    let healthz = worker.http("GET", "/healthz", b"").json();
    assert_eq!(healthz["status"], "degraded");
    assert_eq!(healthz["degraded"], json!(["crashy"]));
    let refused = worker.http("POST", "/v1/plugins/crashy/ok", b"");
    let reason = refused.header("x-noop-reason").unwrap_or_default();
    assert!(reason.contains("circuit open"), "{reason}");
    let echoed = worker.http("POST", "/v1/plugins/echo/echo", br#"{"x": 1}"#);
    assert_eq!(echoed.json(), json!({"x": 1}));
    let (status, log) = worker
        .stop_within(PATIENCE)
        .expect("SIGTERM did not end a worker with a spinning plugin");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.lines().any(|l| l.contains("plugin call overdue")
            && l.contains("plugin=\"crashy\"")
            && l.contains("method=spin")
            && l.contains("elapsed_ms=")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("plugin abandoned")
            && l.contains("plugin=\"crashy\"")
            && l.contains("stuck in `spin`")),
        "{log}"
    );
}

/// A concurrent hook subscriber that sleeps (on a thread of its own, another subscriber runs
/// first) holds the dispatch no longer than its deadline: the task completes, and the
/// subscriber is logged as abandoned.
#[test]
fn a_sleeping_concurrent_subscriber_does_not_hold_the_dispatch() {
    let dir = PluginDir::new();
    let tone = json!({"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}});
    dir.configure(&json!({
        "crashy": {
            "config": {"in": {"hook": "sleep"}, "sleepMs": ASLEEP_MS},
            "hooks": {"task.scored": {"mode": "concurrent", "priority": 1000, "timeoutMs": 300}},
        },
        "experiment": {
            "config": tone,
            "hooks": {"task.scored": {"mode": "concurrent", "priority": 0}},
        },
    }));
    dir.add("crashy", "libcrashy.so");
    dir.add("experiment", "libexperiment.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--checkpoint-interval", "0"]);
    let task = &worker::pipeline::example_tasks(1, 1)[0];
    let done = promptly("the task", || {
        worker.http("POST", "/v1/tasks", task.to_string().as_bytes())
    });
    assert_eq!(done.status, 200, "{}", done.body);
    let (_, log) = worker
        .stop_within(PATIENCE)
        .expect("shutdown waited for the sleeping subscriber");
    assert!(
        log.lines()
            .any(|l| l.contains("concurrent hook subscriber did not answer")
                && l.contains("subscriber=crashy")),
        "{log}"
    );
}

/// A FIFO planted as the crash-record file neither hangs the start nor is written through: the
/// worker says what it is (crash records off) and answers.
#[test]
fn a_fifo_planted_as_the_crash_record_file_does_not_hang_the_worker() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let fifo = state.join("crash-records");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let output = crate::worker(&dir, &["call", "echo", "echo", "1"], &[]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("crash records off"), "{log}");
}

/// `worker new` refuses names that cannot name a crate instead of writing one that does not
/// compile, and any other name gets a type that is never a keyword.
#[test]
fn worker_new_refuses_reserved_names() {
    let dir = PluginDir::new();
    for name in ["self", "fn", "std", "test", "plugin-api"] {
        let target = dir.shadow().join(format!("new-{name}"));
        let output = crate::worker(
            &dir,
            &["new", name, "--path", target.to_str().unwrap()],
            &[],
        );
        assert_eq!(output.status.code(), Some(1), "{name}: {output:?}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains("cannot name a crate"), "{name}: {err}");
        assert!(!target.exists(), "{name}");
    }
    let target = dir.shadow().join("new-plugin");
    let output = crate::worker(
        &dir,
        &["new", "plugin", "--path", target.to_str().unwrap()],
        &[],
    );
    assert!(output.status.success(), "{output:?}");
    let lib = std::fs::read_to_string(target.join("src/lib.rs")).unwrap();
    assert!(lib.contains("pub struct PluginPlugin"), "{lib}");
}
