//! The in-process harness runs a plugin through the same shims the host calls, and leaves the
//! calling process's own panic reporting alone.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::panic::catch_unwind;
use std::sync::{Mutex, OnceLock};

use std::sync::atomic::{AtomicU64, Ordering};

use plugin_api::abi::ErrorKind;
use plugin_api::{
    Harness, HookMode, HookResult, Hooks, Methods, NoConfig, NoState, Plugin, PluginError,
    PluginInfo, Value,
};
use serde::{Deserialize, Serialize};

#[derive(Debug)]
struct Counter {
    start: u64,
    added: AtomicU64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CounterConfig {
    start: u64,
    explode: bool,
}

/// What a counter carries over a reload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CounterState {
    added: u64,
    history: Vec<Step>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Step {
    n: u64,
}

impl Plugin for Counter {
    type Config = CounterConfig;
    type State = CounterState;

    fn info() -> PluginInfo {
        PluginInfo::new("counter", "0.1.0", "test plugin")
    }

    fn create(config: CounterConfig) -> Result<Self, PluginError> {
        if config.explode {
            panic!("exploded in create");
        }
        Ok(Counter {
            start: config.start,
            added: AtomicU64::new(0),
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods.method("next", "start + n", |plugin: &Counter, n: u64| {
            Ok(plugin.start + n)
        });
        methods.method("add", "adds n to the total", |plugin: &Counter, n: u64| {
            Ok(plugin.added.fetch_add(n, Ordering::Relaxed) + n)
        });
        methods.method("total", "what was added", |plugin: &Counter, (): ()| {
            Ok(plugin.added.load(Ordering::Relaxed))
        });
        methods.method("boom", "panics", |_, _: Value| -> Result<(), PluginError> {
            panic!("boom inside the plugin")
        });
    }

    fn save_state(&self) -> Result<Option<CounterState>, PluginError> {
        let added = self.added.load(Ordering::Relaxed);
        Ok(Some(CounterState {
            added,
            history: vec![Step { n: added }],
        }))
    }

    fn restore_state(&self, state: CounterState) -> Result<(), PluginError> {
        if state.history.is_empty() {
            return Err(PluginError::new("history: must not be empty"));
        }
        self.added.store(state.added, Ordering::Relaxed);
        Ok(())
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
    let seen = panics_seen_by_the_test_hook();
    let counter = Harness::<Counter>::new(serde_json::json!({"start": 40})).unwrap();
    assert_eq!(counter.plugin().start, 40);
    assert_eq!(
        counter.call_text("next", "2").unwrap().as_deref(),
        Some("42")
    );
    assert_eq!(counter.call::<u64>("next", &3).unwrap(), 43);

    let missing = counter.call_text("nothing", "").unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::UnknownMethod);
    let bad = counter.call::<u64>("next", &"two").unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidParams, "{bad}");
    let panicked = counter.call::<()>("boom", &()).unwrap_err();
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
    assert_eq!(refused.kind(), ErrorKind::Failed);
    assert_eq!(
        refused.message(),
        r#"the configuration does not fit: start: invalid type: string "x", expected u64"#
    );
    let exploded = Harness::<Counter>::new(serde_json::json!({"explode": true})).unwrap_err();
    assert_eq!(exploded.kind(), ErrorKind::Panicked);

    // The plugin's panics were quiet; a panic of the test's own code still reaches its hook.
    let _ = catch_unwind(|| panic!("the test's own panic"));
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen
            .iter()
            .any(|p| p.contains("boom inside the plugin") || p.contains("exploded in create")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|p| p.contains("the test's own panic")),
        "{seen:?}"
    );
}

/// The panics that reached the process's own hook. Every test calls this first, so the hook is
/// in place before any plugin code runs (tests run in parallel, and the harness keeps the hook
/// it finds at its first call).
fn panics_seen_by_the_test_hook() -> &'static Mutex<Vec<String>> {
    static SEEN: OnceLock<&'static Mutex<Vec<String>>> = OnceLock::new();
    SEEN.get_or_init(|| {
        let seen: &'static Mutex<Vec<String>> = Box::leak(Box::default());
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut seen) = seen.lock() {
                seen.push(info.to_string());
            }
            report(info);
        }));
        seen
    })
}

#[test]
fn typed_configuration_defaults_when_absent_and_names_a_bad_field() {
    panics_seen_by_the_test_hook();
    assert_eq!(Harness::<Counter>::new(()).unwrap().plugin().start, 0);
    assert_eq!(
        Harness::<Counter>::new(Value::Null).unwrap().plugin().start,
        0
    );
    let typed = CounterConfig {
        start: 7,
        explode: false,
    };
    assert_eq!(Harness::<Counter>::new(&typed).unwrap().plugin().start, 7);

    let unknown = Harness::<Counter>::new(serde_json::json!({"begin": 1})).unwrap_err();
    assert!(
        unknown.message().contains("unknown field `begin`"),
        "{unknown}"
    );
    let not_an_object = Harness::<Counter>::new("start at 1").unwrap_err();
    assert!(
        not_an_object
            .message()
            .starts_with("the configuration does not fit: invalid type: string"),
        "{not_an_object}"
    );
}

#[test]
fn a_reload_carries_typed_state_through_the_shims() {
    panics_seen_by_the_test_hook();
    let counter = Harness::<Counter>::new(serde_json::json!({"start": 1})).unwrap();
    assert_eq!(counter.call::<u64>("add", &5).unwrap(), 5);
    assert_eq!(counter.call::<u64>("add", &2).unwrap(), 7);
    assert_eq!(
        counter.save_state().unwrap().as_deref(),
        Some(r#"{"added":7,"history":[{"n":7}]}"#)
    );

    let reloaded = counter.reload().unwrap();
    assert_eq!(reloaded.plugin().start, 1, "the configuration is kept");
    assert_eq!(reloaded.call::<u64>("total", &()).unwrap(), 7);

    // A state that does not fit is refused naming the field, and the plugin keeps its own.
    let misfit = reloaded
        .restore_state(r#"{"added": 3, "history": [{"n": "three"}]}"#)
        .unwrap_err();
    assert_eq!(misfit.kind(), ErrorKind::Failed);
    assert_eq!(
        misfit.message(),
        r#"the saved state does not fit: history[0].n: invalid type: string "three", expected u64"#
    );
    let refused = reloaded
        .restore_state(r#"{"added": 3, "history": []}"#)
        .unwrap_err();
    assert_eq!(refused.message(), "history: must not be empty");
    assert!(reloaded.restore_state("not json").is_err());
    assert_eq!(reloaded.call::<u64>("total", &()).unwrap(), 7);

    // The answer's type is checked too.
    let wrong = reloaded.call::<String>("total", &()).unwrap_err();
    assert!(
        wrong
            .message()
            .starts_with("the answer of `total` does not fit"),
        "{wrong}"
    );
}

/// A plugin that keeps no state and takes no configuration.
struct Stateless;

impl Plugin for Stateless {
    type Config = NoConfig;
    type State = NoState;

    fn info() -> PluginInfo {
        PluginInfo::new("stateless", "0.1.0", "test plugin")
    }

    fn create(NoConfig: NoConfig) -> Result<Self, PluginError> {
        Ok(Stateless)
    }

    fn methods(methods: &mut Methods<Self>) {
        methods.method("ping", "answers nothing", |_, (): ()| Ok(()));
    }
}

#[test]
fn a_plugin_without_config_or_state_ignores_both() {
    panics_seen_by_the_test_hook();
    let plugin = Harness::<Stateless>::new(serde_json::json!({"left": "over"})).unwrap();
    assert_eq!(plugin.save_state().unwrap(), None);
    plugin
        .restore_state(r#"{"from": "an older build"}"#)
        .unwrap();
    plugin.call::<()>("ping", &()).unwrap();
    let reloaded = plugin.reload().unwrap();
    assert_eq!(reloaded.call::<Option<u8>>("ping", &()).unwrap(), None);
}
