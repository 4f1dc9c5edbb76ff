//! Hook subscriptions inside a plugin.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::PluginError;

/// How the host runs a subscriber.
///
/// For one hook point the host runs, in this order: the `sequential` subscribers one after the
/// other (each sees the payload as the previous ones left it), then the `concurrent` ones in
/// parallel, then the `audit` ones, and finally queues the `fire_and_forget` ones. Within a mode,
/// lower priority runs first and ties are broken by plugin name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookMode {
    /// One at a time, in priority order; may modify the payload's writable fields or block.
    Sequential,
    /// In parallel on the payload the sequential ones produced; may block, may not modify.
    Concurrent,
    /// Read-only; whatever it answers is only logged. Sees the final payload.
    Audit,
    /// Queued and run in the background; never delays the worker. When the queue is full the
    /// event is dropped for this subscriber, with a counted warning.
    FireAndForget,
}

impl fmt::Display for HookMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HookMode::Sequential => "sequential",
            HookMode::Concurrent => "concurrent",
            HookMode::Audit => "audit",
            HookMode::FireAndForget => "fire_and_forget",
        })
    }
}

/// One subscription, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookSubscription {
    /// The hook point, e.g. `task.received`.
    pub hook: String,
    /// Lower runs first.
    pub priority: i32,
    /// How it runs.
    pub mode: HookMode,
}

/// What a hook handler answers.
#[derive(Debug, Clone, PartialEq)]
pub enum HookResult {
    /// Nothing to change.
    Continue,
    /// Set these fields of the payload (only the hook point's writable fields are accepted; the
    /// host refuses others with a warning naming the field).
    Modify(Map<String, Value>),
    /// Stop the hook: the worker skips the work and records why.
    Block {
        /// Why, for people.
        reason: String,
        /// A short machine-readable code.
        code: String,
    },
}

impl HookResult {
    /// A modification from `(field, value)` pairs.
    pub fn modify<K: Into<String>>(fields: impl IntoIterator<Item = (K, Value)>) -> Self {
        HookResult::Modify(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A block with a reason and a code.
    pub fn block(reason: impl Into<String>, code: impl Into<String>) -> Self {
        HookResult::Block {
            reason: reason.into(),
            code: code.into(),
        }
    }

    /// The JSON the host reads: `None` for continue.
    pub(crate) fn to_json(&self) -> Option<String> {
        match self {
            HookResult::Continue => None,
            HookResult::Modify(fields) => Some(serde_json::json!({ "modify": fields }).to_string()),
            HookResult::Block { reason, code } => {
                Some(serde_json::json!({ "block": { "reason": reason, "code": code } }).to_string())
            }
        }
    }
}

type HandlerFn<P> = dyn Fn(&P, &str) -> Result<HookResult, PluginError> + Send + Sync;

struct Handler<P> {
    /// The hook name's tag, compared first (see `methods::tag`).
    tag: u64,
    subscription: HookSubscription,
    handle: Box<HandlerFn<P>>,
}

/// The hook points a plugin subscribes to, registered in
/// [`Plugin::hooks`](crate::Plugin::hooks).
///
/// # Examples
///
/// ```
/// use plugin_api::{HookMode, HookResult, Hooks};
/// use serde::Deserialize;
///
/// struct Guard;
///
/// #[derive(Deserialize)]
/// struct Task {
///     input: String,
/// }
///
/// let mut hooks = Hooks::<Guard>::new();
/// hooks.on("task.received", 10, HookMode::Sequential, |_guard, task: Task| {
///     Ok(if task.input.is_empty() {
///         HookResult::block("empty input", "empty")
///     } else {
///         HookResult::Continue
///     })
/// });
/// assert_eq!(hooks.subscriptions().len(), 1);
/// ```
pub struct Hooks<P> {
    handlers: Vec<Handler<P>>,
}

impl<P> Default for Hooks<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> fmt::Debug for Hooks<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.handlers.iter().map(|h| &h.subscription))
            .finish()
    }
}

impl<P> Hooks<P> {
    /// No subscriptions.
    pub fn new() -> Self {
        Self {
            handlers: Vec::new(),
        }
    }

    /// Subscribes to `hook` with a priority (lower runs first) and a mode. The payload is
    /// deserialized into `A` (take [`Value`] for all of it); a payload that does not fit is an
    /// error for this handler only. Subscribing to the same hook twice replaces the first.
    pub fn on<A, F>(&mut self, hook: &str, priority: i32, mode: HookMode, f: F) -> &mut Self
    where
        A: DeserializeOwned,
        F: Fn(&P, A) -> Result<HookResult, PluginError> + Send + Sync + 'static,
    {
        let name = hook.to_owned();
        let handler = Handler {
            tag: crate::methods::tag(hook),
            subscription: HookSubscription {
                hook: hook.to_owned(),
                priority,
                mode,
            },
            handle: Box::new(move |plugin, payload| {
                let payload = if payload.is_empty() { "null" } else { payload };
                let payload: A = serde_json::from_str(payload).map_err(|e| {
                    PluginError::invalid_params(format!(
                        "hook `{name}`: payload does not match: {e}"
                    ))
                })?;
                f(plugin, payload)
            }),
        };
        match self
            .handlers
            .iter_mut()
            .find(|h| h.subscription.hook == hook)
        {
            Some(existing) => *existing = handler,
            None => self.handlers.push(handler),
        }
        self
    }

    /// The subscriptions, in registration order.
    pub fn subscriptions(&self) -> Vec<HookSubscription> {
        self.handlers
            .iter()
            .map(|h| h.subscription.clone())
            .collect()
    }

    /// Runs the handler for `hook` with the payload (JSON text).
    ///
    /// # Errors
    ///
    /// No handler for `hook`, a payload that does not fit, or the handler's own error.
    pub fn run(&self, plugin: &P, hook: &str, payload: &str) -> Result<HookResult, PluginError> {
        let tag = crate::methods::tag(hook);
        match self
            .handlers
            .iter()
            .find(|h| h.tag == tag && h.subscription.hook == hook)
        {
            Some(handler) => (handler.handle)(plugin, payload),
            None => Err(PluginError::new(format!("not subscribed to hook `{hook}`"))),
        }
    }
}
