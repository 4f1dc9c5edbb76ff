//! The plugin runtime: loads native plugins (`cdylib` crates built against `plugin-api`) from a
//! directory, calls them safely, dispatches hooks to them, and loads, unloads and reloads them
//! while other threads call. It knows nothing of the application that embeds it: no command
//! line, no HTTP, no task types; the embedder declares its own hook points.
//!
//! ```no_run
//! use plugin_host::PluginHost;
//! use serde_json::json;
//!
//! let host = PluginHost::builder("plugins").build()?;
//! host.scan()?;
//! // `None` when the plugin is missing, fails, or panics: the worker goes on.
//! let echoed = host.execute("echo", "echo", &json!({"hello": "world"}));
//! let variant: String = host.execute_or("experiment", "pickVariant", &json!({"experiment": "tone"}), "A".into());
//! # let _ = (echoed, variant);
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! All unsafe code is in a few private modules (`dylib`, `crash`, `isolation::shm`); the repository's `ARCHITECTURE.md` says
//! where everything lives and which invariants hold, and why each step of loading is done the
//! way it is.

#![deny(missing_docs)]
// Every `unsafe` of the host is in `dylib`, `crash` and `isolation::shm`; the rest may not
// have any.
#![deny(unsafe_code)]

/// Entry points of the fuzz targets in `tests/fuzz`; not an API (feature `fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;
pub mod config;
#[expect(
    unsafe_code,
    reason = "the fatal-signal and exit handlers that leave crash records"
)]
pub mod crash;
#[expect(
    unsafe_code,
    reason = "the one module that loads libraries and calls through their tables"
)]
mod dylib;
mod error;
mod files;
mod health;
pub mod hooks;
mod host;
pub mod isolation;
mod json;
mod layout;
mod loader;
mod plugin_log;
pub mod quarantine;
mod state;
mod stats;
pub mod store;
pub mod text;
pub mod watch;
mod write_json;

pub use config::{PluginSettings, PluginsConfig};
pub use error::{LoadError, LoadErrorKind, PluginCallError, PluginError, SmolStr};
pub use health::{CallInFlight, PluginHealth};
pub use hooks::{
    HookEvent, HookPoint, HookPointInfo, HookSpec, PayloadField, SubscriberInfo, Violation,
};
pub use host::{
    Abandoned, ConfiguredHook, HookSession, LoadedPlugin, MethodHandle, PluginHost,
    PluginHostBuilder, Refusal, ScanReport, ShutdownReport,
};
pub use isolation::{Isolation, IsolationReport, RestartPolicy};
pub use plugin_api::abi::ErrorKind;
pub use plugin_api::{HookMode, HookResult};
pub use stats::{
    CallKind, DEFAULT_TIMING_SAMPLE, LATENCY_BUCKETS, LatencyHistogram, MAX_TIMING_SAMPLE,
    PluginStats, latency_bucket_bound, valid_timing_sample,
};
pub use write_json::to_json_string;
