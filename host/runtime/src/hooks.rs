//! The hook pipeline: named hook points (the runtime's own and those its embedder declares),
//! their payloads and write policies, and the subscribers of each in execution order.
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

/// One field of a hook point's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PayloadField {
    /// The field's name in the payload object.
    pub name: &'static str,
    /// What it holds, in one line.
    pub description: &'static str,
}

/// A hook point as its embedder declares it: plain data, listed by
/// [`PluginHost::hook_points`](crate::PluginHost::hook_points).
///
/// The runtime declares its own two points ([`HookPoint::BUILT_IN`]); an application declares
/// its points as one `const` list and gives it to
/// [`PluginHostBuilder::with_hook_points`](crate::PluginHostBuilder::with_hook_points).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HookSpec {
    /// The name plugins subscribe with, e.g. `task.received`.
    pub name: &'static str,
    /// When it fires, in one line.
    pub description: &'static str,
    /// The fields of its payload object.
    pub payload: &'static [PayloadField],
    /// The payload fields a sequential subscriber may change (none: read-only).
    pub writable: &'static [&'static str],
}

/// The payload of `plugin.loaded` and `plugin.unloaded`.
const PLUGIN_PAYLOAD: &[PayloadField] = &[
    PayloadField {
        name: "plugin",
        description: "the plugin's name",
    },
    PayloadField {
        name: "version",
        description: "its version",
    },
    PayloadField {
        name: "generation",
        description: "the generation number",
    },
    PayloadField {
        name: "file",
        description: "the file it was loaded from",
    },
];

/// A hook point of a host: a small handle, copied into every `fire`, that indexes the host's
/// table of points (no name is looked up on that path).
///
/// The runtime's own points are [`HookPoint::PLUGIN_LOADED`] and
/// [`HookPoint::PLUGIN_UNLOADED`]. An application's points are constants made from its one
/// declaration with [`HookPoint::declared`]:
///
/// ```
/// use plugin_host::{HookPoint, HookSpec, PayloadField};
///
/// pub const POINTS: &[HookSpec] = &[HookSpec {
///     name: "job.done",
///     description: "a job finished",
///     payload: &[PayloadField { name: "id", description: "the job's id" }],
///     writable: &[],
/// }];
/// pub const JOB_DONE: HookPoint = HookPoint::declared(POINTS, "job.done");
///
/// let host = plugin_host::PluginHost::builder("plugins").with_hook_points(POINTS).build()?;
/// assert_eq!(host.hook_point("job.done"), Some(JOB_DONE));
/// # Ok::<(), anyhow::Error>(())
/// ```
///
/// A handle means the point of that place in the host's table: use an application's handles
/// with hosts built with that application's list. Firing a handle a host does not have is a
/// no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookPoint(u16);

impl HookPoint {
    /// A plugin was loaded or reloaded. Read-only.
    pub const PLUGIN_LOADED: HookPoint = HookPoint(0);
    /// A plugin was unloaded. Read-only.
    pub const PLUGIN_UNLOADED: HookPoint = HookPoint(1);

    /// The runtime's own hook points, in the order of their handles.
    pub const BUILT_IN: &'static [HookSpec] = &[
        HookSpec {
            name: "plugin.loaded",
            description: "a plugin loaded or reloaded",
            payload: PLUGIN_PAYLOAD,
            writable: &[],
        },
        HookSpec {
            name: "plugin.unloaded",
            description: "a plugin unloaded",
            payload: PLUGIN_PAYLOAD,
            writable: &[],
        },
    ];

    /// The handle of the point named `name` in `points`, the list given to
    /// [`with_hook_points`](crate::PluginHostBuilder::with_hook_points). Meant for constants:
    /// a name that is not in the list fails to compile.
    ///
    /// # Panics
    ///
    /// `name` is not in `points` (at compile time in a `const`).
    pub const fn declared(points: &[HookSpec], name: &str) -> HookPoint {
        let mut i = 0;
        while i < points.len() {
            if str_eq(points[i].name, name) {
                return HookPoint((HookPoint::BUILT_IN.len() + i) as u16);
            }
            i += 1;
        }
        panic!("no hook point of that name in the list");
    }

    /// Its place in the host's table of points.
    pub(crate) fn index(self) -> usize {
        usize::from(self.0)
    }

    /// The handle of the point at `index` of the host's table.
    pub(crate) fn from_index(index: usize) -> HookPoint {
        HookPoint(u16::try_from(index).unwrap_or(u16::MAX))
    }
}

/// `a == b`, in a `const fn`.
const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
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
    /// Its name.
    pub name: &'static str,
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
    /// When it fires.
    pub description: &'static str,
    /// The fields of its payload.
    pub payload: &'static [PayloadField],
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
#[inline]
pub(crate) fn parse_answer(json: Option<&str>) -> Result<HookResult, String> {
    match json {
        // "Continue", by far the most common answer.
        None => Ok(HookResult::Continue),
        Some(json) => parse_answer_text(json),
    }
}

#[inline(never)]
fn parse_answer_text(json: &str) -> Result<HookResult, String> {
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
    fn declared_points_follow_the_built_in_ones() {
        const POINTS: &[HookSpec] = &[
            HookSpec {
                name: "a",
                description: "",
                payload: &[],
                writable: &[],
            },
            HookSpec {
                name: "b",
                description: "",
                payload: &[],
                writable: &[],
            },
        ];
        assert_eq!(HookPoint::declared(POINTS, "a").index(), 2);
        assert_eq!(HookPoint::declared(POINTS, "b").index(), 3);
        assert_eq!(
            HookPoint::BUILT_IN[HookPoint::PLUGIN_LOADED.index()].name,
            "plugin.loaded"
        );
        assert_eq!(
            HookPoint::BUILT_IN[HookPoint::PLUGIN_UNLOADED.index()].name,
            "plugin.unloaded"
        );
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
