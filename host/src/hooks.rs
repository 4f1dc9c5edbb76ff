//! The hook pipeline: named hook points in the worker, their payloads and write policies, and
//! the subscribers of each in execution order.
//!
//! For one hook point the host runs, in this order:
//!
//! 1. `sequential` subscribers, one after the other: each sees the payload as the previous ones
//!    left it, may change the point's writable fields, or block;
//! 2. `concurrent` subscribers, in parallel, on the payload the sequential ones produced: each
//!    may block; a modification is refused with a warning;
//! 3. `audit` subscribers, read-only: what they answer is only logged;
//! 4. `fire_and_forget` subscribers, queued to a background thread (a bounded queue: when it is
//!    full the event is dropped for them, with a counted warning).
//!
//! Within a mode, lower priority runs first; ties are broken by subscriber name, so the order is
//! always the same. A block stops the hook: the caller gets a [`Violation`] naming the
//! subscriber and the reason. An error or a panic in a subscriber is a no-op for that subscriber
//! (logged, and counted in its plugin's statistics) and the chain goes on.

use std::fmt;
use std::sync::Arc;

use plugin_api::{HookMode, HookResult};
use serde::Serialize;
use serde_json::Value;

use crate::text::EscapeControl;

/// The hook points of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[non_exhaustive]
pub enum HookPoint {
    /// The worker started (after plugins loaded). Payload `{"plugins": [names]}`; read-only.
    WorkerStart,
    /// The worker is stopping (before plugins unload). Payload `{"reason"}`; read-only.
    WorkerStop,
    /// A task arrived. Payload `{"id", "type", "input", "meta"}`; writable: `input`, `meta`. A
    /// block skips the task.
    TaskReceived,
    /// A handler was chosen and is about to run. Payload `{"id", "type", "handler", "variant",
    /// "experiment", "input", "meta"}`; writable: `handler`, `variant`, `input`, `meta`.
    TaskBeforeHandle,
    /// Between two steps of a multi-step handler. Payload `{"id", "type", "handler", "step",
    /// "messages": [{"role", "content"}]}`; writable: `messages` (the next step sees them).
    TaskAfterStep,
    /// The handler finished. Payload `{"id", "type", "handler", "variant", "output",
    /// "latency_ms"}`; writable: `output`.
    TaskAfterHandle,
    /// A task failed or was blocked. Payload `{"id", "type", "error"}`; read-only.
    TaskError,
    /// A task was scored. Payload `{"id", "type", "handler", "variant", "experiment", "score",
    /// "latency_ms", "output_len"}`; read-only.
    TaskScored,
    /// A plugin was loaded or reloaded. Payload `{"plugin", "version", "generation", "file"}`;
    /// read-only.
    PluginLoaded,
    /// A plugin was unloaded. Payload `{"plugin", "version", "generation", "file"}`; read-only.
    PluginUnloaded,
}

impl HookPoint {
    /// Every hook point, in documentation order.
    pub const ALL: [HookPoint; 10] = [
        HookPoint::WorkerStart,
        HookPoint::WorkerStop,
        HookPoint::TaskReceived,
        HookPoint::TaskBeforeHandle,
        HookPoint::TaskAfterStep,
        HookPoint::TaskAfterHandle,
        HookPoint::TaskError,
        HookPoint::TaskScored,
        HookPoint::PluginLoaded,
        HookPoint::PluginUnloaded,
    ];

    /// The name plugins subscribe with, e.g. `task.received`.
    pub fn name(self) -> &'static str {
        match self {
            HookPoint::WorkerStart => "worker.start",
            HookPoint::WorkerStop => "worker.stop",
            HookPoint::TaskReceived => "task.received",
            HookPoint::TaskBeforeHandle => "task.before_handle",
            HookPoint::TaskAfterStep => "task.after_step",
            HookPoint::TaskAfterHandle => "task.after_handle",
            HookPoint::TaskError => "task.error",
            HookPoint::TaskScored => "task.scored",
            HookPoint::PluginLoaded => "plugin.loaded",
            HookPoint::PluginUnloaded => "plugin.unloaded",
        }
    }

    /// The hook point of that name.
    pub fn from_name(name: &str) -> Option<HookPoint> {
        HookPoint::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The payload fields a sequential subscriber may change.
    pub fn writable(self) -> &'static [&'static str] {
        match self {
            HookPoint::TaskReceived => &["input", "meta"],
            HookPoint::TaskBeforeHandle => &["handler", "variant", "input", "meta"],
            HookPoint::TaskAfterStep => &["messages"],
            HookPoint::TaskAfterHandle => &["output"],
            _ => &[],
        }
    }

    /// What the point is and what its payload holds.
    pub fn description(self) -> &'static str {
        match self {
            HookPoint::WorkerStart => "the worker started; {plugins}",
            HookPoint::WorkerStop => "the worker is stopping; {reason}",
            HookPoint::TaskReceived => "a task arrived; {id, type, input, meta}; a block skips it",
            HookPoint::TaskBeforeHandle => {
                "a handler is about to run; {id, type, handler, variant, experiment, input, meta}"
            }
            HookPoint::TaskAfterStep => {
                "between steps of a multi-step task; {id, type, handler, step, messages}"
            }
            HookPoint::TaskAfterHandle => {
                "the handler finished; {id, type, handler, variant, output, latency_ms}"
            }
            HookPoint::TaskError => "a task failed or was blocked; {id, type, error}",
            HookPoint::TaskScored => {
                "a task was scored; {id, type, handler, variant, experiment, score, latency_ms, output_len}"
            }
            HookPoint::PluginLoaded => {
                "a plugin loaded or reloaded; {plugin, version, generation, file}"
            }
            HookPoint::PluginUnloaded => "a plugin unloaded; {plugin, version, generation, file}",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A subscriber blocked a hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The hook point.
    pub hook: String,
    /// The subscriber that blocked (a plugin name, or the name of a host hook).
    pub subscriber: String,
    /// Its reason.
    pub reason: String,
    /// Its code.
    pub code: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} blocked {} ({}): {}",
            EscapeControl(&self.subscriber),
            self.hook,
            EscapeControl(&self.code),
            EscapeControl(&self.reason)
        )
    }
}

impl std::error::Error for Violation {}

/// What a host-side hook receives.
#[derive(Debug)]
pub struct HookEvent<'a> {
    /// The hook point.
    pub point: HookPoint,
    /// The payload as it stands.
    pub payload: &'a Value,
}

/// A hook written in Rust, registered through [`PluginHost::register_hook`](crate::PluginHost::register_hook).
pub type HostHookFn = Arc<dyn Fn(&HookEvent<'_>) -> HookResult + Send + Sync>;

/// One subscriber as listed by [`PluginHost::hook_points`](crate::PluginHost::hook_points).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriberInfo {
    /// Plugin name, or the name a host hook was registered with.
    pub name: String,
    /// `plugin` or `host`.
    pub kind: &'static str,
    /// Priority in force (after configuration).
    pub priority: i32,
    /// Mode in force (after configuration).
    pub mode: HookMode,
}

/// A hook point with its subscribers in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookPointInfo {
    /// The hook point's name.
    pub name: &'static str,
    /// What it is and what its payload holds.
    pub description: &'static str,
    /// The fields sequential subscribers may change.
    pub writable: &'static [&'static str],
    /// Subscribers in the order they run.
    pub subscribers: Vec<SubscriberInfo>,
}

/// Mode order in a dispatch.
pub(crate) fn phase(mode: HookMode) -> u8 {
    match mode {
        HookMode::Sequential => 0,
        HookMode::Concurrent => 1,
        HookMode::Audit => 2,
        HookMode::FireAndForget => 3,
    }
}

/// Reads a plugin's hook answer: `None` (continue) or `{"modify": {...}}` / `{"block": {...}}`.
pub(crate) fn parse_answer(json: Option<&str>) -> Result<HookResult, String> {
    let Some(json) = json else {
        return Ok(HookResult::Continue);
    };
    let value: Value = serde_json::from_str(json).map_err(|e| format!("invalid JSON: {e}"))?;
    if let Some(fields) = value.get("modify") {
        return match fields {
            Value::Object(map) => Ok(HookResult::Modify(map.clone())),
            other => Err(format!("`modify` must be an object, found {other}")),
        };
    }
    if let Some(block) = value.get("block") {
        let text = |key: &str| {
            block
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        return Ok(HookResult::Block {
            reason: text("reason"),
            code: text("code"),
        });
    }
    Err(format!("unknown hook answer {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for point in HookPoint::ALL {
            assert_eq!(HookPoint::from_name(point.name()), Some(point));
            assert_eq!(HookPoint::ALL[point.index()], point);
        }
        assert_eq!(HookPoint::from_name("task.recieved"), None);
    }

    #[test]
    fn answers_parse() {
        assert_eq!(parse_answer(None), Ok(HookResult::Continue));
        assert_eq!(
            parse_answer(Some(r#"{"block": {"reason": "r", "code": "c"}}"#)),
            Ok(HookResult::block("r", "c"))
        );
        assert!(matches!(
            parse_answer(Some(r#"{"modify": {"a": 1}}"#)),
            Ok(HookResult::Modify(_))
        ));
        assert!(parse_answer(Some(r#"{"modify": 1}"#)).is_err());
        assert!(parse_answer(Some("{")).is_err());
    }
}
