//! `faulty`: a test fixture whose methods misbehave as named. The host must answer each with
//! nothing and go on.
//!
//! - `panic`: panics.
//! - `error`: returns an error.
//! - `bad_json`: answers text that is not JSON.
//! - `ok`: answers `"fine"`, to show the plugin still works after the others.
//! - `call {"plugin", "method", "params"}`: calls another plugin through the host (used to
//!   build call cycles).
//!
//! Hooks: `task.received` panics (sequential, priority 50), to show a panicking subscriber is
//! skipped and the chain goes on.

#![forbid(unsafe_code)]

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, Value, export_plugin,
};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The plugin instance.
#[derive(Debug)]
pub struct Faulty;

#[derive(Debug, Deserialize)]
struct Call {
    plugin: String,
    method: String,
    #[serde(default)]
    params: Value,
}

impl Plugin for Faulty {
    type Config = Value;
    type State = plugin_api::NoState;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "faulty",
            env!("CARGO_PKG_VERSION"),
            "Test fixture: methods that panic, fail, and answer invalid JSON",
        )
    }

    fn create(_config: Value) -> Result<Self, PluginError> {
        Ok(Faulty)
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "panic",
                "Panics",
                |_, _: IgnoredAny| -> Result<(), PluginError> {
                    panic!("faulty plugin panicked on purpose")
                },
            )
            .method(
                "error",
                "Returns an error",
                |_, _: IgnoredAny| -> Result<(), PluginError> {
                    Err(PluginError::new("faulty plugin failed on purpose"))
                },
            )
            .raw_method("bad_json", "Answers text that is not JSON", |_, _| {
                Ok(Some("{not json".to_owned()))
            })
            .method("ok", "Answers \"fine\"", |_, _: IgnoredAny| Ok("fine"))
            .method(
                "call",
                "Calls {\"plugin\", \"method\", \"params\"} through the host",
                |_, c: Call| plugin_api::call_plugin(&c.plugin, &c.method, &c.params),
            );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on(
            "task.received",
            50,
            HookMode::Sequential,
            |_, _: IgnoredAny| -> Result<HookResult, PluginError> {
                panic!("faulty hook panicked on purpose")
            },
        );
    }
}

export_plugin!(Faulty);
