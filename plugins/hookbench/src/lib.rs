//! `hookbench`: a benchmark fixture. It subscribes to `task.scored` and does the least a real
//! subscriber does: read the payload, answer "continue". The benchmark loads up to 100 copies,
//! each renamed (the name `hb-000` is patched in each copy), to measure hook dispatch.

#![forbid(unsafe_code)]

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, NoConfig, NoState, Plugin, PluginError, PluginInfo,
    export_plugin,
};
use serde::de::IgnoredAny;

/// The plugin's name, patched in each copy the benchmark loads.
static NAME: &str = "hb-000";

/// The plugin instance.
#[derive(Debug)]
pub struct HookBench;

/// What the plugin's hook handler does, public so the benchmark can call it directly.
///
/// # Errors
///
/// The payload is not JSON.
pub fn handle(payload: &str) -> Result<HookResult, PluginError> {
    let _: IgnoredAny = serde_json::from_str(payload)?;
    Ok(HookResult::Continue)
}

impl Plugin for HookBench {
    type Config = NoConfig;
    type State = NoState;

    fn info() -> PluginInfo {
        PluginInfo::new(
            // Read through `black_box` so that the name's bytes stay whole in the library for
            // the benchmark to patch (an optimized build may otherwise write them as immediates).
            std::hint::black_box(NAME),
            env!("CARGO_PKG_VERSION"),
            "Benchmark fixture: a minimal task.scored subscriber",
        )
    }

    fn create(_config: NoConfig) -> Result<Self, PluginError> {
        Ok(HookBench)
    }

    fn methods(_methods: &mut Methods<Self>) {}

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on(
            "task.scored",
            0,
            HookMode::Sequential,
            |_, _: IgnoredAny| Ok(HookResult::Continue),
        );
    }
}

export_plugin!(HookBench);
