//! [`Worker`]: the one owner of the worker's lifecycle hooks, for `run` and `serve` alike.

use std::io::{BufRead, Write};

use plugin_host::PluginHost;
use serde_json::json;

use crate::hooks;
use crate::pipeline::{Pipeline, Summary};

/// A started worker over a plugin host. [`start`](Self::start) fires `worker.start` once;
/// [`stop`](Self::stop) fires `worker.stop` once (or dropping it unstopped does, with the
/// reason `failed`). Neither unloads the plugins: the caller shuts the host down after `stop`,
/// so `worker.stop` subscribers still run with every plugin loaded.
#[derive(Debug)]
pub struct Worker {
    host: PluginHost,
    stopped: bool,
}

impl Worker {
    /// Fires `worker.start` with the names of the loaded plugins. `host` is built with the
    /// worker's hook points ([`hooks::host_builder`]) and its plugins are loaded.
    pub fn start(host: PluginHost) -> Self {
        let fired = host.fire(
            hooks::WORKER_START,
            || json!({"plugins": host.plugins().into_iter().map(|p| p.name).collect::<Vec<_>>()}),
        );
        if let Err(v) = fired {
            tracing::warn!(violation = %v, "worker.start cannot be blocked; ignored");
        }
        Worker {
            host,
            stopped: false,
        }
    }

    /// The host it runs on.
    pub fn host(&self) -> &PluginHost {
        &self.host
    }

    /// Runs JSON-lines tasks through a [`Pipeline`] with lines up to `max_line_bytes`, as
    /// [`Pipeline::run_stream`] does.
    ///
    /// # Errors
    ///
    /// As [`Pipeline::run_stream`].
    pub fn run_tasks(
        &self,
        input: impl BufRead,
        out: &mut dyn Write,
        max_line_bytes: usize,
        progress: impl FnMut(u64),
    ) -> anyhow::Result<Summary> {
        Pipeline::new(self.host.clone())
            .with_max_line_bytes(max_line_bytes)
            .run_stream(input, out, progress)
    }

    /// Fires `worker.stop` with `reason` (`tasks done`, or the signal that stopped `serve`).
    pub fn stop(mut self, reason: &str) {
        self.fire_stop(reason);
    }

    fn fire_stop(&mut self, reason: &str) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let fired = self
            .host
            .fire(hooks::WORKER_STOP, || json!({"reason": reason}));
        if let Err(v) = fired {
            tracing::warn!(violation = %v, "worker.stop cannot be blocked; ignored");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // An error ended the run or the serving before `stop`: it stops all the same.
        self.fire_stop("failed");
    }
}
