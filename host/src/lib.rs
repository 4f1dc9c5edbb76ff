//! The plugin host: loads native plugins (`cdylib` crates built against `plugin-api`) from a
//! directory, calls them safely, and loads, unloads and reloads them while other threads call.
//!
//! ```no_run
//! use host::PluginHost;
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
//! All unsafe code is in one private module (`dylib`); see the repository's DESIGN notes for why
//! each step of loading is done the way it is.

#![deny(missing_docs)]
// Every `unsafe` of the host is in `dylib`; the rest may not have any.
#![deny(unsafe_code)]

/// Entry points of the fuzz targets in `tests/fuzz`; not an API (feature `fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;
pub mod cli;
pub mod config;
#[expect(
    unsafe_code,
    reason = "the one module that loads libraries and calls through their tables"
)]
mod dylib;
mod error;
mod files;
pub mod hooks;
mod host;
pub mod http;
mod loader;
pub mod pipeline;
mod state;
mod stats;
pub mod text;
pub mod watch;

pub use config::{PluginSettings, PluginsConfig};
pub use error::{CallError, LoadError};
pub use hooks::{HookEvent, HookPoint, HookPointInfo, SubscriberInfo, Violation};
pub use host::{HookSession, LoadedPlugin, PluginHost, PluginHostBuilder, Refusal, ScanReport};
pub use plugin_api::{HookMode, HookResult};
pub use stats::PluginStats;

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme {}
