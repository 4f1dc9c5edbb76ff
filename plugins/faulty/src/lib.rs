//! `faulty`: a test fixture whose methods misbehave as named. The host must answer each with
//! nothing and go on.
//!
//! - `panic`: panics.
//! - `error`: returns an error.
//! - `bad_json`: answers text that is not JSON.
//! - `ok`: answers `"fine"`, to show the plugin still works after the others.

#![forbid(unsafe_code)]

use plugin_api::{Methods, Plugin, PluginError, PluginInfo, Value, export_plugin};
use serde::de::IgnoredAny;

/// The plugin instance.
#[derive(Debug)]
pub struct Faulty;

impl Plugin for Faulty {
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
            .method("ok", "Answers \"fine\"", |_, _: IgnoredAny| Ok("fine"));
    }
}

export_plugin!(Faulty);
