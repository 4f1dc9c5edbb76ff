//! End-to-end tests: the real plugins, built by cargo as cdylibs, loaded through the real loader.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure should stop the test with its message"
)]

mod abi;
mod calls;
mod cli;
mod experiment;
mod hardening_http;
mod hardening_inputs;
mod hardening_loader;
mod hardening_review;
mod hooks;
mod lifecycle;
mod pipeline;
mod recovery;
mod refusals;
mod serve;
mod statistics;
mod tuning;
mod watch;
mod worker_lifecycle;
