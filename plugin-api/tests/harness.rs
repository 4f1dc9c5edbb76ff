//! The in-process harness runs a plugin through the same shims the host calls, and leaves the
//! calling process's own panic reporting alone.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::panic::catch_unwind;
use std::sync::{Arc, Mutex};

use plugin_api::abi::ErrorKind;
use plugin_api::{
    Harness, HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, Value,
};

#[derive(Debug)]
struct Counter {
    start: u64,
}

impl Plugin for Counter {
    fn info() -> PluginInfo {
        PluginInfo::new("counter", "0.1.0", "test plugin")
    }

    fn create(config: Value) -> Result<Self, PluginError> {
        match config.get("start") {
            Some(start) => Ok(Counter {
                start: start
                    .as_u64()
                    .ok_or_else(|| PluginError::new("start: not a number"))?,
            }),
            None if config.get("explode").is_some() => panic!("exploded in create"),
            None => Ok(Counter { start: 0 }),
        }
    }

    fn methods(methods: &mut Methods<Self>) {
        methods.method("next", "start + n", |plugin: &Counter, n: u64| {
            Ok(plugin.start + n)
        });
        methods.method("boom", "panics", |_, _: Value| -> Result<(), PluginError> {
            panic!("boom inside the plugin")
        });
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on("task.scored", 0, HookMode::Sequential, |_, task: Value| {
            Ok(match task.get("score").and_then(Value::as_f64) {
                Some(score) if score < 0.0 => HookResult::block("negative score", "bad-score"),
                _ => HookResult::Continue,
            })
        });
    }
}

#[test]
fn the_harness_answers_as_the_host_would_and_keeps_outside_panics_loud() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorder = Arc::clone(&seen);
    std::panic::set_hook(Box::new(move |info| {
        recorder.lock().unwrap().push(info.to_string());
    }));

    let counter = Harness::<Counter>::new(serde_json::json!({"start": 40})).unwrap();
    assert_eq!(counter.plugin().start, 40);
    assert_eq!(counter.call("next", "2").unwrap().as_deref(), Some("42"));

    let missing = counter.call("nothing", "").unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::UnknownMethod);
    let bad = counter.call("next", "\"two\"").unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidParams, "{bad}");
    let panicked = counter.call("boom", "").unwrap_err();
    assert_eq!(panicked.kind(), ErrorKind::Panicked);
    assert!(
        panicked.message().contains("boom inside the plugin"),
        "{panicked}"
    );

    assert_eq!(
        counter.hook("task.scored", r#"{"score": 0.5}"#).unwrap(),
        None
    );
    let blocked = counter
        .hook("task.scored", r#"{"score": -1}"#)
        .unwrap()
        .unwrap();
    assert!(blocked.contains("negative score"), "{blocked}");
    assert!(counter.hook("task.received", "{}").is_err());

    let refused = Harness::<Counter>::new(serde_json::json!({"start": "x"})).unwrap_err();
    assert_eq!(refused.message(), "start: not a number");
    let exploded = Harness::<Counter>::new(serde_json::json!({"explode": true})).unwrap_err();
    assert_eq!(exploded.kind(), ErrorKind::Panicked);

    // The plugin's panics were quiet; a panic of the test's own code still reaches its hook.
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    let _ = catch_unwind(|| panic!("the test's own panic"));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains("the test's own panic"), "{seen:?}");
}
