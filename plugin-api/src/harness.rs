//! [`Harness`]: a plugin driven in-process through the entry points the host calls.

use std::fmt;
use std::sync::atomic::Ordering;

use abi_stable::std_types::{RStr, RString};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::JsonResult;
use crate::export::{self, IN_PROCESS, Instance};
use crate::{Plugin, PluginError, Value};

/// A plugin instance driven in-process through the very entry points the host calls: the same
/// panic-catching shims, configuration and state parsing, method and hook lookup and JSON
/// handling, without a library or a host.
///
/// For unit tests of a plugin (a panic comes back as an error of kind
/// [`Panicked`](crate::abi::ErrorKind::Panicked), as the host would see it) and for benchmarks
/// that need the plugin's own cost as a baseline. The plugin's `tracing` events go to the
/// process's own subscriber, since no host bridge is installed. Plugin-to-plugin calls
/// ([`call_plugin`](crate::call_plugin)) fail: there is no host to route them.
///
/// # Examples
///
/// ```
/// use plugin_api::{Harness, Methods, NoState, Plugin, PluginError, PluginInfo, Value};
/// use serde::Deserialize;
///
/// #[derive(Debug)]
/// struct Multiplier {
///     factor: f64,
/// }
///
/// #[derive(Default, Deserialize)]
/// #[serde(default)]
/// struct Config {
///     factor: Option<f64>,
/// }
///
/// impl Plugin for Multiplier {
///     type Config = Config;
///     type State = NoState;
///
///     fn info() -> PluginInfo {
///         PluginInfo::new("multiplier", "0.1.0", "Multiplies a number")
///     }
///     fn create(config: Config) -> Result<Self, PluginError> {
///         Ok(Multiplier { factor: config.factor.unwrap_or(2.0) })
///     }
///     fn methods(methods: &mut Methods<Self>) {
///         methods.method("times", "Multiplies n", |this: &Self, n: f64| Ok(n * this.factor));
///         methods.method("boom", "Panics", |_, _: Value| -> Result<(), PluginError> {
///             panic!("boom")
///         });
///     }
/// }
///
/// let doubler = Harness::<Multiplier>::new(())?;
/// assert_eq!(doubler.call::<f64>("times", &21)?, 42.0);
/// assert_eq!(doubler.call_text("times", "21")?.as_deref(), Some("42.0"));
/// assert!(doubler.call::<()>("boom", &()).is_err());
/// assert!(doubler.call::<f64>("divide", &1).is_err());
///
/// let tripler = Harness::<Multiplier>::new(serde_json::json!({"factor": 3}))?;
/// assert_eq!(tripler.call::<f64>("times", &2)?, 6.0);
///
/// let refused = Harness::<Multiplier>::new(serde_json::json!({"factor": "3"})).unwrap_err();
/// assert!(refused.message().contains("factor: invalid type"), "{refused}");
/// # Ok::<(), PluginError>(())
/// ```
pub struct Harness<P: Plugin> {
    instance: Instance<P>,
    /// The configuration as the host would pass it, kept for [`Harness::reload`].
    config: String,
}

impl<P: Plugin> Harness<P> {
    /// Creates the plugin with `config` (anything that serializes to the plugin's configuration
    /// as JSON: a `serde_json::Value`, the plugin's own `Config`, or `()` for none), through the
    /// host's `create` entry point less its log bridge.
    ///
    /// # Errors
    ///
    /// The configuration does not fit the plugin's `Config` (the message names the field), or
    /// the plugin's `create` failed or panicked.
    pub fn new(config: impl Serialize) -> Result<Self, PluginError> {
        let config = match serde_json::to_value(config)? {
            Value::Null => String::new(),
            config => config.to_string(),
        };
        Self::from_text(config)
    }

    fn from_text(config: String) -> Result<Self, PluginError> {
        IN_PROCESS.store(true, Ordering::Relaxed);
        let instance = export::owned(export::guard(|| Instance::<P>::create(&config)))?;
        Ok(Self { instance, config })
    }

    /// The plugin itself.
    pub fn plugin(&self) -> &P {
        &self.instance.plugin
    }

    /// Calls `method` with `params` and reads its answer as an `R`, through the entry point the
    /// host calls. A method that answers nothing reads as JSON `null` (use `()` or an `Option`).
    ///
    /// # Errors
    ///
    /// What the host would see as a failed call (no such method, invalid params, an error, or a
    /// panic), or an answer that does not fit `R` (the message names the field).
    pub fn call<R: DeserializeOwned>(
        &self,
        method: &str,
        params: &impl Serialize,
    ) -> Result<R, PluginError> {
        let params = serde_json::to_string(params)?;
        let answer = self.call_text(method, &params)?;
        let answer = match answer.as_deref() {
            Some(text) => serde_json::from_str(text)?,
            None => Value::Null,
        };
        serde_path_to_error::deserialize(answer)
            .map_err(|e| PluginError::new(format!("the answer of `{method}` does not fit: {e}")))
    }

    /// Calls `method` with params as JSON text (empty for none), through the entry point the
    /// host calls; the answer is JSON text, `None` for no answer.
    ///
    /// # Errors
    ///
    /// What the host would see as a failed call: no such method, invalid params, an error, or
    /// a panic (kind [`Panicked`](crate::abi::ErrorKind::Panicked)).
    pub fn call_text(&self, method: &str, params: &str) -> Result<Option<String>, PluginError> {
        owned_text(export::execute::<P>(
            self.instance.handle(),
            RStr::from_str(method),
            RStr::from_str(params),
        ))
    }

    /// Runs the plugin's handler for `hook` with the payload as JSON text, through the entry
    /// point the host calls. The answer is `None` for "continue", else JSON text of
    /// `{"modify": {..}}` or `{"block": {"reason", "code"}}`.
    ///
    /// # Errors
    ///
    /// The plugin does not subscribe to `hook`, or its handler failed or panicked.
    pub fn hook(&self, hook: &str, payload: &str) -> Result<Option<String>, PluginError> {
        owned_text(export::on_hook::<P>(
            self.instance.handle(),
            RStr::from_str(hook),
            RStr::from_str(payload),
        ))
    }

    /// The plugin's saved state as the host would carry it: JSON text, `None` when the plugin
    /// keeps none.
    ///
    /// # Errors
    ///
    /// The plugin's `save_state` failed or panicked.
    pub fn save_state(&self) -> Result<Option<String>, PluginError> {
        owned_text(export::save_state::<P>(self.instance.handle()))
    }

    /// Gives the plugin a saved state as JSON text, through the entry point the host calls.
    ///
    /// # Errors
    ///
    /// The state does not fit the plugin's `State` (the message names the field), or the
    /// plugin's `restore_state` failed or panicked.
    pub fn restore_state(&self, state: &str) -> Result<(), PluginError> {
        export::owned(export::restore_state::<P>(
            self.instance.handle(),
            RStr::from_str(state),
        ))
    }

    /// Does what the host's reload does, through the same entry points: saves this instance's
    /// state, creates a new instance with the same configuration, hands it the state (when
    /// there was one) and drops this one.
    ///
    /// # Errors
    ///
    /// Unlike the host, which logs a failed save or restore and goes on, any failure is
    /// returned, since a test wants to see it: saving, creating or restoring failed or panicked.
    pub fn reload(self) -> Result<Self, PluginError> {
        let state = self.save_state()?;
        let next = Self::from_text(self.config.clone())?;
        if let Some(state) = state {
            next.restore_state(&state)?;
        }
        Ok(next)
    }
}

impl<P: Plugin + fmt::Debug> fmt::Debug for Harness<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("plugin", &self.instance.plugin)
            .finish_non_exhaustive()
    }
}

fn owned_text(result: JsonResult) -> Result<Option<String>, PluginError> {
    export::owned(result).map(|json| json.into_option().map(RString::into_string))
}
