//! Calls from the embedder: `call`, `execute` and their typed forms, and the one mapping from a
//! failed call to what the caller sees.

use super::handle::{Named, Target};
use super::*;
use crate::error::SmolStr;

/// Why a call failed, before names are attached: kept cheap (no allocation) for the paths that
/// answer nothing, a missing plugin above all.
pub(super) enum Failure {
    PluginNotFound,
    MethodNotFound,
    Plugin(PluginError),
    InvalidJson(String),
    /// The answer is JSON of another shape than asked for (message, expected type).
    WrongType(String, &'static str),
    /// The plugin's circuit breaker is open: the call was refused without reaching it.
    CircuitOpen,
    /// An isolated plugin's process ended or was killed before answering.
    Lost(crate::isolation::Lost),
}

impl Failure {
    /// The one mapping from a failed call to the error its caller sees; the log event, the
    /// answer to a plugin's own call and [`PluginHost::call`] are all made from it.
    pub(super) fn into_error(self, plugin: &str, method: &str) -> PluginCallError {
        // Names up to 23 bytes are held inline: the missing-plugin error allocates nothing.
        if let Failure::PluginNotFound = self {
            return PluginCallError::PluginNotFound {
                plugin: name(plugin),
            };
        }
        let (plugin, method) = (name(plugin), name(method));
        match self {
            Failure::PluginNotFound => PluginCallError::PluginNotFound { plugin },
            Failure::MethodNotFound => PluginCallError::MethodNotFound { plugin, method },
            Failure::CircuitOpen => PluginCallError::CircuitOpen { plugin, method },
            Failure::Lost(crate::isolation::Lost::TimedOut) => {
                PluginCallError::TimedOut { plugin, method }
            }
            // Not "crashed": nothing crashed this time, and nothing is restarted.
            Failure::Lost(crate::isolation::Lost::Suspended) => {
                let message = format!(
                    "its process crashed too often and is not restarted (crash-loop limit); reset it (POST /v1/plugins/{plugin}/reset) or reload it"
                );
                PluginCallError::Failed {
                    plugin,
                    method,
                    message,
                }
            }
            Failure::Lost(_) => PluginCallError::Crashed { plugin, method },
            Failure::InvalidJson(message) => PluginCallError::InvalidJson {
                plugin,
                method,
                message,
            },
            Failure::WrongType(message, expected) => PluginCallError::WrongType {
                plugin,
                method,
                message: format!("{message} (expected {expected})"),
            },
            Failure::Plugin(PluginError { kind, message }) => match kind {
                ErrorKind::Panicked => PluginCallError::Panicked {
                    plugin,
                    method,
                    message,
                },
                ErrorKind::InvalidParams => PluginCallError::InvalidParams {
                    plugin,
                    method,
                    message,
                },
                _ => PluginCallError::Failed {
                    plugin,
                    method,
                    message,
                },
            },
        }
    }
}

/// A plugin or method name for an error: held inline (no allocation) when it fits.
#[inline]
pub(super) fn name(text: &str) -> SmolStr {
    if text.len() <= SmolStr::INLINE_CAP {
        SmolStr::new_inline(text)
    } else {
        SmolStr::new(text)
    }
}

/// Logs a call that answers nothing: at debug level when the plugin or method is missing (no
/// error is made: that path stays free of allocations), at warn for a failure.
#[cold]
pub(super) fn log_failure(plugin: &str, method: &str, failure: Failure) {
    match failure {
        Failure::PluginNotFound => {
            tracing::debug!(plugin, method, "no such plugin; answering nothing");
        }
        Failure::MethodNotFound => {
            tracing::debug!(plugin, method, "no such method; answering nothing");
        }
        // Counted (`calls_refused`); one warning when the breaker opened is enough.
        Failure::CircuitOpen => {
            tracing::debug!(plugin, method, "circuit open; answering nothing");
        }
        Failure::Lost(lost) => {
            tracing::warn!(plugin, method, reason = %lost, "isolated plugin gave no answer; answering nothing");
        }
        failure => match failure.into_error(plugin, method) {
            PluginCallError::Panicked { message, .. } => {
                tracing::warn!(plugin, method, panic = %EscapeControl(&message), "plugin panicked; answering nothing");
            }
            PluginCallError::InvalidJson { message, .. } => {
                tracing::warn!(plugin, method, error = %EscapeControl(&message), "plugin answered invalid JSON; answering nothing");
            }
            PluginCallError::WrongType { message, .. } => {
                tracing::warn!(plugin, method, error = %EscapeControl(&message), "plugin answered an unexpected value; answering nothing");
            }
            PluginCallError::InvalidParams { message, .. }
            | PluginCallError::Failed { message, .. } => {
                tracing::warn!(plugin, method, error = %EscapeControl(&message), "plugin call failed; answering nothing");
            }
            error => tracing::debug!(plugin, method, %error, "answering nothing"),
        },
    }
}

/// Params buffers kept larger than this are not kept for the next call.
const KEPT_BUFFER_BYTES: usize = 64 * 1024;

thread_local! {
    /// This thread's params buffer, reused from call to call (taken out while in use, so a
    /// nested call on the same thread makes its own).
    static PARAMS: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// This thread's params buffer, emptied, while a call uses it; handed back on drop.
struct ParamsBuffer(String);

impl ParamsBuffer {
    #[inline]
    fn take() -> Self {
        let mut buffer = PARAMS.try_with(std::cell::Cell::take).unwrap_or_default();
        buffer.clear();
        ParamsBuffer(buffer)
    }
}

impl Drop for ParamsBuffer {
    #[inline]
    fn drop(&mut self) {
        if self.0.capacity() <= KEPT_BUFFER_BYTES {
            let buffer = std::mem::take(&mut self.0);
            // A thread whose thread-locals are gone drops the buffer.
            let _ = PARAMS.try_with(|kept| kept.set(buffer));
        }
    }
}

/// What a literal JSON `null` answer means: `Some(Value::Null)` for [`PluginHost::execute`] and
/// [`PluginHost::call`] (a `Value` can hold it), no answer for the typed calls.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    NullIsValue,
    NullIsNone,
}

impl PluginHost {
    /// Calls `plugin.method(params)` and says why when it answers nothing.
    ///
    /// `Ok(None)` means the plugin answered nothing; a literal JSON `null` answer is
    /// `Ok(Some(Value::Null))`. Statistics count every call that reached the plugin.
    ///
    /// # Errors
    ///
    /// A [`PluginCallError`]: no such plugin or method, the plugin failed or panicked, or it
    /// answered text that is not JSON.
    pub fn call(
        &self,
        plugin: &str,
        method: &str,
        params: &Value,
    ) -> Result<Option<Value>, PluginCallError> {
        if !self.may_be_loaded(plugin) {
            return Err(PluginCallError::PluginNotFound {
                plugin: name(plugin),
            });
        }
        self.dispatch_value_loaded(Named(plugin, method), params)
            .map_err(|failure| failure.into_error(plugin, method))
    }

    /// Like [`call`](Self::call), typed both ways: `params` (any `Serialize` value) is written
    /// straight to JSON text and the answer read straight into `T`, with no [`Value`] in
    /// between; a call to a plugin that is not loaded serializes nothing. A JSON `null` answer
    /// is `Ok(None)`.
    ///
    /// ```no_run
    /// # fn demo(host: &plugin_host::PluginHost) {
    /// #[derive(serde::Serialize)]
    /// struct Pick<'a> {
    ///     experiment: &'a str,
    ///     key: &'a str,
    /// }
    /// let variant: String = host
    ///     .call_with("experiment", "pickVariant", &Pick { experiment: "tone", key: "user-7" })
    ///     .ok()
    ///     .flatten()
    ///     .unwrap_or_else(|| "A".to_owned());
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call), plus [`PluginCallError::WrongType`] when the answer does not
    /// fit `T` and [`PluginCallError::InvalidParams`] when `params` cannot be written as JSON.
    pub fn call_with<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        plugin: &str,
        method: &str,
        params: &P,
    ) -> Result<Option<T>, PluginCallError> {
        if !self.may_be_loaded(plugin) {
            return Err(PluginCallError::PluginNotFound {
                plugin: name(plugin),
            });
        }
        self.dispatch_loaded(Named(plugin, method), params, Answer::NullIsNone)
            .map_err(|failure| failure.into_error(plugin, method))
    }

    /// Calls `plugin.method(params)`; `None` when the plugin answered nothing or the call could
    /// not be made.
    ///
    /// Never fails and never panics because of a plugin: a missing plugin or method, an error,
    /// a panic, or invalid JSON coming back all answer `None` and emit a `tracing` event with the
    /// plugin, the method and the reason (at debug level for missing plugins and methods, at
    /// warn for failures). A literal JSON `null` answer is `Some(Value::Null)`.
    #[inline]
    pub fn execute(&self, plugin: &str, method: &str, params: &Value) -> Option<Value> {
        if !self.may_be_loaded(plugin) {
            log_failure(plugin, method, Failure::PluginNotFound);
            return None;
        }
        match self.dispatch_value_loaded(Named(plugin, method), params) {
            Ok(value) => value,
            Err(failure) => {
                log_failure(plugin, method, failure);
                None
            }
        }
    }

    /// Like [`execute`](Self::execute), typed both ways as [`call_with`](Self::call_with):
    /// `params` of any `Serialize` type (a [`Value`] too), the answer deserialized into `T`.
    /// `None` (with a log event) for every failure, an answer of another shape included, and
    /// for a JSON `null` answer.
    pub fn execute_with<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        plugin: &str,
        method: &str,
        params: &P,
    ) -> Option<T> {
        // A plugin that is not loaded costs no serialization.
        if !self.may_be_loaded(plugin) {
            log_failure(plugin, method, Failure::PluginNotFound);
            return None;
        }
        match self.dispatch_loaded(Named(plugin, method), params, Answer::NullIsNone) {
            Ok(value) => value,
            Err(failure) => {
                log_failure(plugin, method, failure);
                None
            }
        }
    }

    /// The common pattern `execute(...) or default`:
    /// `host.execute_or("experiment", "pickVariant", &params, "A".to_owned())`.
    pub fn execute_or<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        plugin: &str,
        method: &str,
        params: &P,
        default: T,
    ) -> T {
        self.execute_with(plugin, method, params).unwrap_or(default)
    }

    /// Calls `plugin.method` with params the caller already holds as JSON text, and answers
    /// the plugin's JSON text: no [`Value`] is built on either side. For callers that hold text
    /// (a request body, a task line) this is the cheapest path.
    ///
    /// `params` is handed to the plugin as it is (empty text or `null` for no params); a plugin
    /// given text that is not JSON fails with [`PluginCallError::InvalidParams`]. The answer is
    /// checked to be one JSON value (without building it) before it is handed on; `Ok(None)`
    /// means the plugin answered nothing, a literal `null` answer is `Ok(Some("null"))`.
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call).
    pub fn call_text(
        &self,
        plugin: &str,
        method: &str,
        params: &str,
    ) -> Result<Option<String>, PluginCallError> {
        if !self.may_be_loaded(plugin) {
            return Err(PluginCallError::PluginNotFound {
                plugin: name(plugin),
            });
        }
        self.dispatch_json_text_loaded(Named(plugin, method), params)
            .map_err(|failure| failure.into_error(plugin, method))
    }

    /// Like [`call_text`](Self::call_text), lending the answer's text to `read` instead of
    /// copying it out; what `read` returns is the answer. For callers that pass the text on
    /// (into a response body, an output line) or parse it themselves, this saves a copy of
    /// each answer. `read` runs inside the call, while the plugin's string is alive: for a
    /// plugin in the worker's process its time counts in the call's latency and toward the
    /// plugin's deadline, and a crash in it is recorded as the plugin's, so keep it short and
    /// plain. Should `read` panic, the call ends (as answered: the plugin did its part) and the
    /// panic goes on to the caller.
    ///
    /// ```no_run
    /// # fn demo(host: &plugin_host::PluginHost, out: &mut Vec<u8>) {
    /// let written = host.call_text_with("echo", "echo", r#"{"a": 1}"#, |json| {
    ///     out.extend_from_slice(json.as_bytes());
    ///     json.len()
    /// });
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`call_text`](Self::call_text).
    pub fn call_text_with<R>(
        &self,
        plugin: &str,
        method: &str,
        params: &str,
        read: impl FnOnce(&str) -> R,
    ) -> Result<Option<R>, PluginCallError> {
        if !self.may_be_loaded(plugin) {
            return Err(PluginCallError::PluginNotFound {
                plugin: name(plugin),
            });
        }
        self.dispatch_json_text_with(Named(plugin, method), params, read)
            .map_err(|failure| failure.into_error(plugin, method))
    }

    /// Like [`call_text`](Self::call_text), answering `None` (with a log event, as
    /// [`execute`](Self::execute)) for every failure.
    pub fn execute_text(&self, plugin: &str, method: &str, params: &str) -> Option<String> {
        if !self.may_be_loaded(plugin) {
            log_failure(plugin, method, Failure::PluginNotFound);
            return None;
        }
        match self.dispatch_json_text_loaded(Named(plugin, method), params) {
            Ok(answer) => answer,
            Err(failure) => {
                log_failure(plugin, method, failure);
                None
            }
        }
    }

    /// The text path: params text as is (`null` as empty text), the answer checked to be JSON
    /// and copied out while the plugin's string is alive.
    pub(super) fn dispatch_json_text_loaded(
        &self,
        target: impl Target,
        params: &str,
    ) -> Result<Option<String>, Failure> {
        self.dispatch_json_text_with(target, params, str::to_owned)
    }

    /// The text path with the answer lent to `read` (no copy): params text as is (`null` as
    /// empty text), the answer checked to be JSON while the plugin's string is alive.
    #[inline]
    pub(super) fn dispatch_json_text_with<R>(
        &self,
        target: impl Target,
        params: &str,
        read: impl FnOnce(&str) -> R,
    ) -> Result<Option<R>, Failure> {
        let params = if params == "null" { "" } else { params };
        self.dispatch_text(target, params, |answer| match answer {
            None => Ok(None),
            Some(json) if crate::json::is_json(json) => Ok(Some(read(json))),
            // The rare failure pays for serde_json's message saying where the text went wrong.
            Some(json) => Err(Failure::InvalidJson(
                serde_json::from_str::<serde::de::IgnoredAny>(json)
                    .err()
                    .map_or_else(|| "not one JSON value".to_owned(), |e| e.to_string()),
            )),
        })
    }

    /// The one call path: params written straight to JSON text (none for `null`) into this
    /// thread's reused buffer (no allocation once it has grown to the params' size, handed
    /// back when the call returns), the answer read straight into `T` while the plugin's
    /// string is alive. Callers have asked the name filter (a plugin that is not loaded costs
    /// no serialization).
    pub(super) fn dispatch_loaded<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        target: impl Target,
        params: &P,
        null: Answer,
    ) -> Result<Option<T>, Failure> {
        let mut buffer = ParamsBuffer::take();
        // Text as serde_json writes it, made as a `String`: no UTF-8 check of it afterwards.
        crate::write_json::write(&mut buffer.0, params).map_err(|e| {
            Failure::Plugin(PluginError {
                kind: ErrorKind::InvalidParams,
                message: format!("the params cannot be written as JSON: {e}"),
            })
        })?;
        // No params reach the plugin as empty text.
        let text = if buffer.0 == "null" { "" } else { &buffer.0 };
        self.dispatch_answer(target, text, null)
    }

    /// [`dispatch_loaded`](Self::dispatch_loaded) of `Value` params, with a literal `null`
    /// answer kept as `Some(Null)`. Absent params (`null`) go out as empty text without being
    /// written, so an empty call allocates nothing.
    #[inline]
    pub(super) fn dispatch_value_loaded(
        &self,
        target: impl Target,
        params: &Value,
    ) -> Result<Option<Value>, Failure> {
        if params.is_null() {
            return self.dispatch_answer(target, "", Answer::NullIsValue);
        }
        self.dispatch_loaded(target, params, Answer::NullIsValue)
    }

    /// Calls `plugin.method` with params text and reads the answer into `T`.
    fn dispatch_answer<T: DeserializeOwned>(
        &self,
        target: impl Target,
        text: &str,
        null: Answer,
    ) -> Result<Option<T>, Failure> {
        self.dispatch_text(target, text, |answer| match answer {
            None => Ok(None),
            Some("null") if null == Answer::NullIsNone => Ok(None),
            Some(json) => serde_json::from_str(json).map(Some).map_err(|e| {
                if e.is_syntax() || e.is_eof() {
                    Failure::InvalidJson(e.to_string())
                } else {
                    Failure::WrongType(e.to_string(), std::any::type_name::<T>())
                }
            }),
        })
    }

    /// Calls the target method with params as JSON text; `on_answer` reads the answer while
    /// the plugin's string is alive.
    #[inline]
    pub(super) fn dispatch_text<R>(
        &self,
        target: impl Target,
        params: &str,
        on_answer: impl FnOnce(Option<&str>) -> Result<Option<R>, Failure>,
    ) -> Result<Option<R>, Failure> {
        // Callers have asked the name filter already (where it pays); the registry answers
        // for certain. This snapshot of the registry holds the generation alive until the call returns,
        // whatever reload or unload does meanwhile.
        let registry = self.inner.registry.load();
        let (plugin, method) = target.names();
        let (slot, at) = target.find(&registry).ok_or(Failure::PluginNotFound)?;
        let shard = crate::stats::thread_shard();
        let entry = match at {
            Some((_, declared)) => slot.stats.health.begin_named(&declared.marker, shard),
            None => slot.stats.health.begin(method, shard),
        }
        .map_err(|_| Failure::CircuitOpen)?;
        // A panic of the caller's code reading the answer (a closure, a `Deserialize`) is
        // held until the call has ended (its in-flight marker cleared), then goes on.
        let mut unwound = None;
        // Counted by its histogram, which picks one call in the sample to time.
        let timing = self.inner.timing.as_ref();
        let latency = match (timing, at) {
            (None, _) => None,
            (Some(_), Some((_, declared))) => Some(&*declared.latency),
            (Some(_), None) => slot.method_latency(method),
        };
        let started = match timing {
            Some(timing)
                if latency.map_or_else(
                    || slot.stats.picks_at(shard, timing.sample),
                    |latency| latency.count_at(shard, timing.sample),
                ) =>
            {
                Some(timing.start())
            }
            _ => None,
        };
        let read = |answer: Result<Option<&str>, PluginFailure<'_>>| match answer {
            Ok(json) => {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_answer(json))) {
                    Ok(read) => read,
                    Err(payload) => {
                        unwound = Some(payload);
                        Ok(None)
                    }
                }
            }
            Err(PluginFailure::Reported(ErrorKind::UnknownMethod, _)) => {
                Err(Failure::MethodNotFound)
            }
            Err(PluginFailure::Reported(kind, message)) => Err(Failure::Plugin(PluginError {
                kind,
                message: message.to_owned(),
            })),
            Err(PluginFailure::NotUtf8(e)) => Err(Failure::InvalidJson(format!(
                "the answer is not UTF-8 text ({e})"
            ))),
            Err(PluginFailure::Lost(lost)) => Err(Failure::Lost(lost)),
        };
        let library = &slot.generation.library;
        let result = match at {
            Some((index, _)) => library.call_at(index, method, params, read),
            None => library.call(method, params, read),
        }
        .unwrap_or(Err(Failure::PluginNotFound));
        let timed = match (timing, started) {
            (Some(timing), Some(started)) => {
                let (_, nanos) = timing.stop(started);
                if let Some(latency) = latency {
                    latency.record_at(shard, nanos);
                }
                Some(nanos)
            }
            (Some(_), None) => {
                // Not timed: a call that saw the watchdog's clock move twice still reaches
                // the maximum.
                let at_least = entry.untimed_lower_bound_nanos();
                if at_least != 0 {
                    slot.stats.at_least_at(shard, at_least);
                }
                None
            }
            (None, _) => None,
        };
        let outcome = match &result {
            Ok(_) | Err(Failure::MethodNotFound | Failure::PluginNotFound) => Outcome::Ok,
            Err(Failure::Plugin(PluginError {
                kind: ErrorKind::Panicked,
                ..
            })) => Outcome::Panic,
            Err(_) => Outcome::Error,
        };
        slot.stats.record_at(shard, timed, outcome);
        slot.stats.health.end(entry, outcome != Outcome::Ok, plugin);
        if let Some(payload) = unwound {
            std::panic::resume_unwind(payload);
        }
        result
    }
}
