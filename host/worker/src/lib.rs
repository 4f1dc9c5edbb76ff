//! The worker application over the plugin runtime ([`plugin_host`]): the `worker` command line
//! ([`cli`]), the HTTP control API ([`http`]) and the task pipeline with its handlers, example
//! tasks and summary ([`pipeline`]).

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod cli;
pub mod http;
pub mod pipeline;

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
mod readme {}
