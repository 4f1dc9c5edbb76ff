//! Method handles: a plugin's method resolved once, then called without looking up either name.
//!
//! A handle keeps where its method was found in one registry: the slot's index in the
//! registry's fixed order and the method's index in the manifest (the index the plugin's
//! `execute_at` takes), tagged with the registry's epoch. A call whose registry has that epoch
//! goes straight to the slot, its histogram and its marker name; any other registry (a load,
//! unload, reload or configuration change published a new one, or the handle came from
//! another host) makes the call resolve again by name and keep the new answer.

use super::calls::{Answer, Failure, log_failure, name};
use super::registry::{EPOCH_BITS, MethodEntry};
use super::*;

/// What a call is addressed to: names looked up on every call ([`Named`]), or a handle. A
/// trait rather than an enum so that each kind of call compiles to its own path, with no branch
/// on the kind.
pub(super) trait Target: Copy {
    /// The plugin's and the method's names.
    fn names(&self) -> (&str, &str);

    /// The plugin's slot in `registry`, with the method's index and entry when they are known
    /// (`None`: called by name).
    fn find<'r>(
        &self,
        registry: &'r Registry,
    ) -> Option<(&'r Slot, Option<(u32, &'r MethodEntry)>)>;
}

/// A call by name: `(plugin, method)`.
#[derive(Clone, Copy)]
pub(super) struct Named<'a>(pub(super) &'a str, pub(super) &'a str);

impl Target for Named<'_> {
    #[inline]
    fn names(&self) -> (&str, &str) {
        (self.0, self.1)
    }

    #[inline]
    fn find<'r>(
        &self,
        registry: &'r Registry,
    ) -> Option<(&'r Slot, Option<(u32, &'r MethodEntry)>)> {
        Some((registry.get(self.0)?, None))
    }
}

impl Target for &MethodHandle {
    #[inline]
    fn names(&self) -> (&str, &str) {
        (&self.plugin, &self.method)
    }

    #[inline]
    fn find<'r>(
        &self,
        registry: &'r Registry,
    ) -> Option<(&'r Slot, Option<(u32, &'r MethodEntry)>)> {
        self.slot_in(registry)
    }
}

/// Bits of a slot's and of a method's index in a resolution.
const INDEX_BITS: u32 = 12;
/// The index that says "not there" (and the largest an index kept in a resolution can be).
const NONE_INDEX: u64 = (1 << INDEX_BITS) - 1;

// The epoch and both indexes fit in one word.
const _: () = assert!(EPOCH_BITS + 2 * INDEX_BITS <= 64);

/// A plugin's method resolved once, for callers that call it again and again (a pipeline's
/// stage, a request handler): a call through it skips the name filter's hash, the registry's
/// map lookup and the plugin's lookup of the method by name.
///
/// Made by [`PluginHost::method`]; called with the host it came from, in the same forms as the
/// host's own calls (`handle.execute(&host, &params)` is `host.execute(plugin, method,
/// &params)`), with the same answers, errors, statistics, breaker and deadlines.
///
/// A handle never holds a plugin loaded: it stays valid across loads, unloads and reloads. A
/// call after a reload finds the new generation (and the method's place in it) by name once,
/// then goes straight again; a call while the plugin is not loaded answers
/// [`PluginCallError::PluginNotFound`], as a call by name does. An isolated plugin is called by
/// name over its pipe (the round trip dwarfs the lookup), and a plugin built before
/// `plugin-api` offered calls by index (table version 5 and older) by name too.
///
/// ```no_run
/// # fn demo(host: &plugin_host::PluginHost) {
/// let summarize = host.method("echo", "summarize");
/// for values in [[1.0, 2.0], [3.0, 4.0]] {
///     let answer = summarize.execute(host, &serde_json::json!({ "values": values }));
///     println!("{answer:?}");
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct MethodHandle {
    plugin: Box<str>,
    method: Box<str>,
    /// The plugin name's bit in the host's name filter.
    name_bit: u64,
    /// `epoch << 24 | slot << 12 | method`: where the method was found in the registry of that
    /// epoch ([`NONE_INDEX`] for "not there").
    resolved: AtomicU64,
}

impl Clone for MethodHandle {
    fn clone(&self) -> Self {
        MethodHandle {
            plugin: self.plugin.clone(),
            method: self.method.clone(),
            name_bit: self.name_bit,
            resolved: AtomicU64::new(self.resolved.load(Ordering::Relaxed)),
        }
    }
}

/// An index kept in a resolution, `None` for [`NONE_INDEX`].
#[inline]
fn unpack(bits: u64) -> Option<usize> {
    let index = bits & NONE_INDEX;
    (index != NONE_INDEX).then(|| usize::try_from(index).unwrap_or(usize::MAX))
}

impl MethodHandle {
    fn new(plugin: &str, method: &str) -> Self {
        MethodHandle {
            plugin: Box::from(plugin),
            method: Box::from(method),
            name_bit: registry::name_bit(plugin),
            resolved: AtomicU64::new(0),
        }
    }

    /// The plugin's name.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The method's name.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The slot of the handle's plugin in `registry`, with the method's index and entry when
    /// the generation declares it (`None`: called by name, as an undeclared method is).
    #[inline]
    pub(super) fn slot_in<'r>(
        &self,
        registry: &'r Registry,
    ) -> Option<(&'r Slot, Option<(u32, &'r MethodEntry)>)> {
        let resolved = self.resolved.load(Ordering::Relaxed);
        let (slot, method) = if resolved >> (2 * INDEX_BITS) == registry.epoch {
            (unpack(resolved >> INDEX_BITS), unpack(resolved))
        } else {
            self.resolve(registry)
        };
        let (_, slot) = registry.slots.get(slot?)?;
        let at = method.and_then(|i| Some((u32::try_from(i).ok()?, slot.methods.get(i)?)));
        Some((slot, at))
    }

    /// Finds the plugin and the method in `registry` by name, and keeps where (unless an index
    /// is too large to keep: then every call finds it again).
    #[cold]
    #[inline(never)]
    fn resolve(&self, registry: &Registry) -> (Option<usize>, Option<usize>) {
        let slot = registry.slot_index(&self.plugin);
        let method = slot.and_then(|i| {
            registry.slots[i]
                .1
                .methods
                .iter()
                .position(|m| *m.name == *self.method)
        });
        let keep = |index: Option<usize>| match index {
            None => Some(NONE_INDEX),
            Some(i) => u64::try_from(i).ok().filter(|&i| i < NONE_INDEX),
        };
        if let (Some(s), Some(m)) = (keep(slot), keep(method)) {
            self.resolved.store(
                registry.epoch << (2 * INDEX_BITS) | s << INDEX_BITS | m,
                Ordering::Relaxed,
            );
        }
        (slot, method)
    }

    /// Whether the plugin may be loaded in `host` (the name filter, with the bit kept).
    #[inline]
    fn may_be_loaded(&self, host: &PluginHost) -> bool {
        host.inner.names.load(Ordering::Acquire) & self.name_bit != 0
    }

    fn not_found(&self) -> PluginCallError {
        PluginCallError::PluginNotFound {
            plugin: name(&self.plugin),
        }
    }

    /// [`PluginHost::call`] through the handle.
    ///
    /// # Errors
    ///
    /// As [`PluginHost::call`].
    pub fn call(
        &self,
        host: &PluginHost,
        params: &Value,
    ) -> Result<Option<Value>, PluginCallError> {
        if !self.may_be_loaded(host) {
            return Err(self.not_found());
        }
        host.dispatch_value_loaded(self, params)
            .map_err(|failure| failure.into_error(&self.plugin, &self.method))
    }

    /// [`PluginHost::call_with`] through the handle.
    ///
    /// # Errors
    ///
    /// As [`PluginHost::call_with`].
    pub fn call_with<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        host: &PluginHost,
        params: &P,
    ) -> Result<Option<T>, PluginCallError> {
        if !self.may_be_loaded(host) {
            return Err(self.not_found());
        }
        host.dispatch_loaded(self, params, Answer::NullIsNone)
            .map_err(|failure| failure.into_error(&self.plugin, &self.method))
    }

    /// [`PluginHost::call_text`] through the handle.
    ///
    /// # Errors
    ///
    /// As [`PluginHost::call_text`].
    pub fn call_text(
        &self,
        host: &PluginHost,
        params: &str,
    ) -> Result<Option<String>, PluginCallError> {
        if !self.may_be_loaded(host) {
            return Err(self.not_found());
        }
        host.dispatch_json_text_loaded(self, params)
            .map_err(|failure| failure.into_error(&self.plugin, &self.method))
    }

    /// [`PluginHost::call_text_with`] through the handle: the answer's text lent to `read`.
    ///
    /// # Errors
    ///
    /// As [`PluginHost::call_text`].
    pub fn call_text_with<R>(
        &self,
        host: &PluginHost,
        params: &str,
        read: impl FnOnce(&str) -> R,
    ) -> Result<Option<R>, PluginCallError> {
        if !self.may_be_loaded(host) {
            return Err(self.not_found());
        }
        host.dispatch_json_text_with(self, params, read)
            .map_err(|failure| failure.into_error(&self.plugin, &self.method))
    }

    /// [`PluginHost::execute`] through the handle.
    #[inline]
    pub fn execute(&self, host: &PluginHost, params: &Value) -> Option<Value> {
        let result = if self.may_be_loaded(host) {
            host.dispatch_value_loaded(self, params)
        } else {
            Err(Failure::PluginNotFound)
        };
        self.answer_or_log(result)
    }

    /// [`PluginHost::execute_with`] through the handle.
    pub fn execute_with<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        host: &PluginHost,
        params: &P,
    ) -> Option<T> {
        let result = if self.may_be_loaded(host) {
            host.dispatch_loaded(self, params, Answer::NullIsNone)
        } else {
            Err(Failure::PluginNotFound)
        };
        self.answer_or_log(result)
    }

    /// [`PluginHost::execute_text`] through the handle.
    pub fn execute_text(&self, host: &PluginHost, params: &str) -> Option<String> {
        let result = if self.may_be_loaded(host) {
            host.dispatch_json_text_loaded(self, params)
        } else {
            Err(Failure::PluginNotFound)
        };
        self.answer_or_log(result)
    }

    #[inline]
    fn answer_or_log<T>(&self, result: Result<Option<T>, Failure>) -> Option<T> {
        match result {
            Ok(answer) => answer,
            Err(failure) => {
                log_failure(&self.plugin, &self.method, failure);
                None
            }
        }
    }
}

impl PluginHost {
    /// A handle to `plugin.method`, resolved now: calls through it skip looking up either
    /// name (see [`MethodHandle`]). Never fails: a handle to a plugin that is not loaded (or a
    /// method it does not declare) answers as a call by name would, until it is.
    pub fn method(&self, plugin: &str, method: &str) -> MethodHandle {
        let handle = MethodHandle::new(plugin, method);
        handle.resolve(&self.inner.registry.load());
        handle
    }
}
