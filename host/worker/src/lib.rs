//! The worker application over the plugin runtime ([`plugin_host`]): the `worker` command line
//! ([`cli`]), the HTTP control API ([`http`]) and the task pipeline with its handlers, example
//! tasks and summary ([`pipeline`]), the worker's hook points ([`hooks`]) and the [`Worker`]
//! that owns its lifecycle.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

/// Entry points of the fuzz targets in `tests/fuzz`; not an API (feature `fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;
pub mod cli;
pub mod config_check;
pub mod fleet;
pub mod hooks;
pub mod http;
mod lifecycle;
pub mod metrics;
pub mod pipeline;
mod remote;
mod scaffold;
pub mod state_lock;

pub use lifecycle::Worker;

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
mod readme {}
