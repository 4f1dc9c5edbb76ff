//! Log lines: a plugin's events filtered per plugin from `--log`, `--log-format json`, and the
//! version on every load, reload and unload line.

use serde_json::Value;
use tests::PluginDir;

use crate::serve::Worker;

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A plugin's own `tracing` events have the plugin's name as their target: `NAME=LEVEL` in
/// `--log` raises or silences that plugin alone.
#[test]
fn plugin_events_are_filtered_per_plugin() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    dir.add("echo", "libecho.so");
    let hello = |log: &str| {
        let output = crate::worker(&dir, &["--log", log, "call", "fixture", "log"], &[]);
        assert!(output.status.success(), "{log}: {}", stderr(&output));
        stderr(&output).contains("fixture says hello")
    };
    assert!(hello("warn"));
    assert!(
        !hello("warn,fixture=off"),
        "fixture=off silences the fixture"
    );
    assert!(hello("warn,echo=off"), "echo=off leaves the fixture alone");
    assert!(
        hello("off,fixture=warn"),
        "fixture=warn raises it above the rest"
    );
    assert!(!hello("error"));
}

/// `--log-format json`: one JSON object per line, the plugin's event with its name as target.
#[test]
fn json_log_lines_are_one_object_per_event() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let output = crate::worker(
        &dir,
        &[
            "--log",
            "info",
            "--log-format",
            "json",
            "call",
            "fixture",
            "log",
        ],
        &[],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let events: Vec<Value> = stderr(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let loaded = events
        .iter()
        .find(|e| e["fields"]["message"] == "plugin loaded")
        .expect("a plugin loaded event");
    assert_eq!(loaded["level"], "INFO");
    assert_eq!(loaded["fields"]["plugin"], "fixture");
    assert_eq!(loaded["fields"]["version"], "0.1.0");
    assert!(loaded["fields"]["took_us"].is_u64(), "{loaded}");
    let hello = events
        .iter()
        .find(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("fixture says hello"))
        })
        .expect("the plugin's event");
    assert_eq!(hello["target"], "fixture");
    assert_eq!(hello["level"], "WARN");
}

/// Load, reload and unload lines name the plugin and its version, fields written the same way.
#[test]
fn lifecycle_lines_carry_the_version() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    assert_eq!(
        worker
            .http("POST", "/v1/plugins/fixture/reload", b"")
            .status,
        200
    );
    assert_eq!(
        worker.http("DELETE", "/v1/plugins/fixture", b"").status,
        200
    );
    let (_, log) = worker.stop();
    for message in ["plugin loaded", "plugin reloaded", "plugin unloaded"] {
        let line = log
            .lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("no `{message}` in\n{log}"));
        assert!(
            line.contains("plugin=fixture") && line.contains("version=0.1.0"),
            "{line}"
        );
    }
}
