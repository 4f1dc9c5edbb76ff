//! Process isolation: a plugin configured `"isolation": "process"` runs in a child process that
//! loads the same `.so` with the same loader and checks, so that whatever its code does (a
//! segfault, `abort`, `exit`, a stack overflow, running out of memory, a call that never
//! returns) ends the child, not the host. The host never opens the library itself: it runs only
//! the ELF pre-check on the file.
//!
//! The child is the embedder's own executable, started again: its `main` must call
//! [`run_child_if_requested`] first (the `worker` binary does), or the embedder names another
//! program that does with [`PluginHostBuilder::with_child_program`](crate::PluginHostBuilder::with_child_program).
//!
//! - `protocol`: the frames between host and child.
//! - `shm`: the memory host and child share to carry one call at a time.
//! - `child`: the child's side: load, create, serve requests on a pool of threads.
//! - `supervisor`: the host's side: start, route answers, forward host calls, restart.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::dylib::{PluginFailure, PluginLibrary};
use crate::error::PluginError;
use plugin_api::abi::ErrorKind;

pub(crate) mod child;
pub(crate) mod protocol;
#[expect(
    unsafe_code,
    reason = "the mapping of the memory shared with the child, seen as atomics"
)]
pub(crate) mod shm;
pub(crate) mod supervisor;

use protocol::{Tag, code};
pub(crate) use supervisor::{CreateError, Launch, Supervisor};

/// Turns this process into an isolated plugin's child when the host started it as one;
/// returns at once otherwise. Call it first thing in `main` of any program that embeds a
/// [`PluginHost`](crate::PluginHost) with isolated plugins:
///
/// ```no_run
/// # #[expect(clippy::needless_doctest_main, reason = "the point is where the call goes")]
/// fn main() {
///     plugin_host::isolation::run_child_if_requested();
///     // ... the program as usual
/// }
/// ```
///
/// In a child it never returns: it serves the host until the host stops it or goes away.
pub fn run_child_if_requested() {
    if let Some(spec) = std::env::var_os(child::CHILD_ENV) {
        let spec = spec.to_string_lossy().into_owned();
        child::run(&spec);
    }
}

/// Where a plugin runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// In the host's process: calls cost nanoseconds; a crash of the plugin is a crash of the
    /// host, and a call that never returns cannot be interrupted.
    #[default]
    InProcess,
    /// In a child process of its own: calls cost a round trip between processes; a crash or an
    /// overrun ends the child, which is restarted with the plugin's last saved state.
    Process,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isolation::InProcess => "in-process",
            Isolation::Process => "process",
        })
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "in-process" => Ok(Isolation::InProcess),
            "process" => Ok(Isolation::Process),
            other => Err(format!(
                "unknown isolation {other:?}: expected \"process\" or \"in-process\""
            )),
        }
    }
}

/// The crash-loop limit of an isolated plugin: after `max` crashes within `window_sec` seconds
/// it is not restarted again until a reload, a changed file or a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RestartPolicy {
    /// Crashes allowed within the window (default 3).
    #[serde(default = "default_max")]
    pub max: u32,
    /// The window, in seconds (default 300).
    #[serde(default = "default_window")]
    pub window_sec: u64,
}

fn default_max() -> u32 {
    3
}

fn default_window() -> u64 {
    300
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max: default_max(),
            window_sec: default_window(),
        }
    }
}

/// How a plugin runs, as [`LoadedPlugin`](crate::LoadedPlugin) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IsolationReport {
    /// `"in-process"` or `"process"`.
    pub mode: &'static str,
    /// The child's process id, while one runs.
    pub pid: Option<u32>,
    /// Times the child crashed (a signal, an `exit`, running out of memory).
    pub crashes: u64,
    /// Times a new child was started after a crash or an overrun.
    pub restarts: u64,
    /// Calls that overran their deadline (the child was killed).
    pub timeouts: u64,
    /// The crash-loop limit was reached: no restart until a reload or a reset.
    pub restarts_suspended: bool,
    /// The child's memory limit, in MiB.
    pub memory_limit_mb: Option<u64>,
    /// Why the plugin runs isolated whatever its configuration says: it is quarantined, a crash
    /// record naming it (the crash, in words); cleared with `worker quarantine clear PLUGIN`.
    pub quarantined: Option<String>,
}

impl IsolationReport {
    fn in_process() -> Self {
        Self {
            mode: "in-process",
            pid: None,
            crashes: 0,
            restarts: 0,
            timeouts: 0,
            restarts_suspended: false,
            memory_limit_mb: None,
            quarantined: None,
        }
    }
}

/// Why an isolated call got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// The child ended (a signal, an exit) while the call was in flight, or had ended.
    Crashed,
    /// The call overran its deadline: the child was killed.
    TimedOut,
    /// The child crashed too often and is not restarted until a reset.
    Suspended,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lost::Crashed => "crashed",
            Lost::TimedOut => "timed out",
            Lost::Suspended => "crashed too often",
        })
    }
}

/// How a child's plugin reaches other plugins: (caller, call chain, plugin, method, params).
pub(crate) type HostLink =
    Arc<dyn Fn(&str, &str, &str, &str, &str) -> Result<Option<String>, PluginError> + Send + Sync>;

/// The error kind numbered `n` on the wire.
pub(crate) fn error_kind(n: u8) -> ErrorKind {
    match n {
        1 => ErrorKind::UnknownMethod,
        2 => ErrorKind::InvalidParams,
        3 => ErrorKind::Panicked,
        _ => ErrorKind::Failed,
    }
}

/// An isolated generation: its supervisor, stopped when the generation is dropped.
#[derive(Debug)]
pub(crate) struct Isolated {
    pub(crate) supervisor: Arc<Supervisor>,
    pub(crate) supports_hooks: bool,
}

impl Drop for Isolated {
    fn drop(&mut self) {
        self.supervisor.stop();
    }
}

/// Where a generation's code runs: the one branch of the call path.
#[derive(Debug)]
pub(crate) enum Backend {
    InProcess(PluginLibrary),
    Isolated(Isolated),
}

impl Backend {
    /// Calls `method` (see [`PluginLibrary::call`]); isolated, a round trip to the child.
    #[inline]
    pub(crate) fn call<R>(
        &self,
        method: &str,
        params: &str,
        f: impl FnOnce(Result<Option<&str>, PluginFailure<'_>>) -> R,
    ) -> Option<R> {
        match self {
            Backend::InProcess(library) => library.call(method, params, f),
            Backend::Isolated(isolated) => isolated.exchange(Tag::Call, method, params, 0, f),
        }
    }

    /// Calls the method at `index` of the manifest's list, named `method` (see
    /// [`PluginLibrary::call_at`]); isolated, by name (the round trip dwarfs the lookup).
    #[inline]
    pub(crate) fn call_at<R>(
        &self,
        index: u32,
        method: &str,
        params: &str,
        f: impl FnOnce(Result<Option<&str>, PluginFailure<'_>>) -> R,
    ) -> Option<R> {
        match self {
            Backend::InProcess(library) => library.call_at(index, method, params, f),
            Backend::Isolated(isolated) => isolated.exchange(Tag::Call, method, params, 0, f),
        }
    }

    /// Delivers `hook` (see [`PluginLibrary::on_hook`]); isolated, within `timeout_ms` (the
    /// subscription's own deadline; 0 for the plugin's), past which the child is killed.
    #[inline]
    pub(crate) fn on_hook<R>(
        &self,
        hook: &str,
        payload: &str,
        timeout_ms: u64,
        f: impl FnOnce(Result<Option<&str>, PluginFailure<'_>>) -> R,
    ) -> Option<R> {
        match self {
            Backend::InProcess(library) => library.on_hook(hook, payload, f),
            Backend::Isolated(isolated) => {
                isolated.exchange(Tag::Hook, hook, payload, timeout_ms, f)
            }
        }
    }

    /// The plugin's saved state; isolated, also kept for a restart.
    pub(crate) fn save_state(&self) -> Option<Result<Option<String>, PluginError>> {
        match self {
            Backend::InProcess(library) => library.save_state(),
            Backend::Isolated(isolated) => {
                let saved = match isolated.supervisor.request(Tag::Save, &[]) {
                    Ok(mut frame) => match frame.code {
                        code::UNSUPPORTED => None,
                        code::SOME => Some(Ok(Some(frame.take(0)))),
                        code::NONE => Some(Ok(None)),
                        c => Some(Err(PluginError {
                            kind: error_kind(c.saturating_sub(code::ERROR)),
                            message: frame.take(0),
                        })),
                    },
                    // The process is gone: the last state it saved or was given stands for it.
                    Err(lost) => match isolated.supervisor.last_state() {
                        Some(state) => {
                            tracing::debug!(reason = %lost, "isolated plugin's process is not running; its last saved state is used");
                            return Some(Ok(Some(state)));
                        }
                        None => Some(Err(PluginError::failed(format!(
                            "its process {lost} while saving its state"
                        )))),
                    },
                };
                if let Some(Ok(Some(state))) = &saved {
                    isolated.supervisor.keep_state(state);
                }
                saved
            }
        }
    }

    /// Gives the plugin a state; isolated, also kept for a restart.
    pub(crate) fn restore_state(&self, state: &str) -> Option<Result<(), PluginError>> {
        match self {
            Backend::InProcess(library) => library.restore_state(state),
            Backend::Isolated(isolated) => {
                match isolated.supervisor.request(Tag::Restore, &[state]) {
                    Ok(mut frame) => match frame.code {
                        code::UNSUPPORTED => None,
                        code::NONE | code::SOME => {
                            isolated.supervisor.keep_state(state);
                            Some(Ok(()))
                        }
                        c => Some(Err(PluginError {
                            kind: error_kind(c.saturating_sub(code::ERROR)),
                            message: frame.take(0),
                        })),
                    },
                    Err(lost) => Some(Err(PluginError::failed(format!(
                        "its process {lost} while restoring the state"
                    )))),
                }
            }
        }
    }

    /// Whether the plugin's table has the hook entry point.
    pub(crate) fn supports_hooks(&self) -> bool {
        match self {
            Backend::InProcess(library) => library.supports_hooks(),
            Backend::Isolated(isolated) => isolated.supports_hooks,
        }
    }

    /// The shadow copy the host opened; isolated, none (the child has its own).
    pub(crate) fn shadow_path(&self) -> &Path {
        match self {
            Backend::InProcess(library) => library.shadow_path(),
            Backend::Isolated(_) => Path::new(""),
        }
    }

    /// How the plugin runs.
    pub(crate) fn report(&self) -> IsolationReport {
        match self {
            Backend::InProcess(_) => IsolationReport::in_process(),
            Backend::Isolated(isolated) => isolated.supervisor.report(),
        }
    }

    /// The isolated supervisor, if any.
    pub(crate) fn supervisor(&self) -> Option<&Supervisor> {
        match self {
            Backend::InProcess(_) => None,
            Backend::Isolated(isolated) => Some(&isolated.supervisor),
        }
    }
}

impl Isolated {
    #[inline(never)]
    fn exchange<R>(
        &self,
        tag: Tag,
        name: &str,
        input: &str,
        timeout_ms: u64,
        f: impl FnOnce(Result<Option<&str>, PluginFailure<'_>>) -> R,
    ) -> Option<R> {
        let chain = crate::host::call_chain();
        let timeout = (timeout_ms != 0).then(|| std::time::Duration::from_millis(timeout_ms));
        let frame = match self
            .supervisor
            .request_within(tag, &[name, input, &chain], timeout)
        {
            Ok(frame) => frame,
            Err(lost) => return Some(f(Err(PluginFailure::Lost(lost)))),
        };
        Some(match frame.code {
            code::UNSUPPORTED => return None,
            code::SOME => f(Ok(Some(frame.field(0)))),
            code::NONE => f(Ok(None)),
            code::NOT_UTF8 => f(Err(PluginFailure::Reported(
                ErrorKind::Failed,
                &format!("the answer is not UTF-8 text ({})", frame.field(0)),
            ))),
            c => f(Err(PluginFailure::Reported(
                error_kind(c.saturating_sub(code::ERROR)),
                frame.field(0),
            ))),
        })
    }
}
