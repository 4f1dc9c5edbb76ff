//! The worker's lifecycle hooks: `worker.start` and `worker.stop` fire exactly once each, in
//! `worker run` and in `worker serve`, counted through the fixture plugin subscribed to both
//! (configured to fail each, so every firing leaves one warning in the worker's log).

use std::process::Command;

use serde_json::json;
use tests::PluginDir;

use crate::serve::Worker;

/// A plugin directory with the fixture failing `worker.start` and `worker.stop`.
fn fixture_dir() -> PluginDir {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    dir.configure(&json!({"fixture": {"config": {"on": {
        "worker.start": "error",
        "worker.stop": "error",
    }}}}));
    dir
}

/// How many times `hook` reached the fixture, by the warnings its failures left in `log`, and
/// where the first one is.
fn fired(log: &str, hook: &str) -> (usize, Option<usize>) {
    let line = format!("fixture hook {hook} failed on purpose");
    (log.matches(&line).count(), log.find(&line))
}

#[test]
fn worker_run_fires_start_and_stop_once_each() {
    let dir = fixture_dir();
    let tasks = dir.shadow().join("tasks.jsonl");
    let lines: String = worker::pipeline::example_tasks(3, 1)
        .iter()
        .map(|t| format!("{t}\n"))
        .collect();
    std::fs::write(&tasks, lines).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.shadow().join("state"))
        .args(["--log", "warn", "run", "--tasks"])
        .arg(&tasks)
        .env_remove("WORKER_LOG")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let (starts, start_at) = fired(&log, "worker.start");
    let (stops, stop_at) = fired(&log, "worker.stop");
    assert_eq!(
        (starts, stops),
        (1, 1),
        "worker.start and worker.stop fired:\n{log}"
    );
    assert!(
        start_at < stop_at,
        "worker.stop fired before worker.start:\n{log}"
    );
}

#[test]
fn worker_serve_fires_start_and_stop_once_each_when_stopped_by_sigterm() {
    let dir = fixture_dir();
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
    let (starts, start_at) = fired(&log, "worker.start");
    let (stops, stop_at) = fired(&log, "worker.stop");
    assert_eq!(
        (starts, stops),
        (1, 1),
        "worker.start and worker.stop fired:\n{log}"
    );
    assert!(
        start_at < stop_at,
        "worker.stop fired before worker.start:\n{log}"
    );
}
