//! End-to-end tests: the real plugins, built by cargo as cdylibs, loaded through the real loader.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure should stop the test with its message"
)]

mod abi;
mod bandit;
mod calls;
mod cli;
mod containment;
mod experiment;
mod fleet;
mod handles;
mod hardening_http;
mod hardening_inputs;
mod hardening_loader;
mod hardening_review;
mod hooks;
mod isolation;
mod lifecycle;
mod logs;
mod metrics;
mod new_plugin;
mod pipeline;
mod recovery;
mod refusals;
mod serve;
mod state_lock;
mod statistics;
mod store;
mod timing;
mod tuning;
mod watch;
mod worker_lifecycle;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tests::PluginDir;

/// Runs the worker CLI on `dir` with `args` (and `env`), killed if it takes over two minutes.
pub(crate) fn worker(dir: &PluginDir, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker-under-test"));
    command
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.shadow().join("state"))
        .args(args)
        .env_remove("WORKER_LOG")
        .env_remove("WORKER_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    bounded(command)
}

/// Runs `command` with its output captured, killed if it takes over two minutes.
pub(crate) fn bounded(mut command: Command) -> Output {
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(child.wait_with_output());
    });
    match receive.recv_timeout(Duration::from_secs(120)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("the worker did not finish within two minutes: {args:?}");
        }
    }
}
