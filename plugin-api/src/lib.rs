//! Write plugins for the plugin host: plain `cdylib` crates, loaded, unloaded and hot-reloaded
//! by a running worker. A panicking or failing plugin never takes the worker down.
//!
//! A complete plugin:
//!
//! ```
//! use plugin_api::{Methods, NoState, Plugin, PluginError, PluginInfo, export_plugin};
//! use serde::{Deserialize, Serialize};
//!
//! /// Greets people.
//! pub struct Greeter {
//!     greeting: String,
//! }
//!
//! /// The configuration, e.g. `{"greeting": "Hi"}`. No configuration gives the default; a
//! /// field of the wrong type refuses the load, naming the field (`greeting: invalid type: …`).
//! #[derive(Deserialize)]
//! #[serde(default, deny_unknown_fields)]
//! pub struct Config {
//!     greeting: String,
//! }
//!
//! impl Default for Config {
//!     fn default() -> Self {
//!         Config { greeting: "Hello".to_owned() }
//!     }
//! }
//!
//! #[derive(Deserialize)]
//! struct GreetParams {
//!     name: String,
//! }
//!
//! #[derive(Serialize)]
//! struct Greeting {
//!     text: String,
//! }
//!
//! impl Plugin for Greeter {
//!     type Config = Config;
//!     type State = NoState;
//!
//!     fn info() -> PluginInfo {
//!         PluginInfo::new("greeter", env!("CARGO_PKG_VERSION"), "Greets people by name")
//!     }
//!
//!     fn create(config: Config) -> Result<Self, PluginError> {
//!         if config.greeting.is_empty() {
//!             return Err(PluginError::new("greeting: must not be empty"));
//!         }
//!         Ok(Greeter { greeting: config.greeting })
//!     }
//!
//!     fn methods(methods: &mut Methods<Self>) {
//!         methods.method("greet", "Greets {\"name\"}", |this: &Self, p: GreetParams| {
//!             tracing::debug!(name = %p.name, "greeting");
//!             Ok(Greeting { text: format!("{}, {}!", this.greeting, p.name) })
//!         });
//!     }
//! }
//!
//! export_plugin!(Greeter);
//! ```
//!
//! Its `Cargo.toml` says `crate-type = ["cdylib"]` and depends on `plugin-api`, `serde` and
//! `serde_json` (and `tracing` for logging). `cargo build --release` writes `libgreeter.so`; drop
//! it into the worker's `plugins/` directory. The host then answers
//! `execute("greeter", "greet", {"name": "Ada"})` with `{"text": "Hello, Ada!"}`.
//!
//! # What the host guarantees, and what it asks of you
//!
//! - Methods take `&self` and the host calls one plugin from many threads at once: keep mutable
//!   state behind a `Mutex` or atomics. [`Plugin`] requires `Send + Sync`.
//! - A panic in your code is caught at the boundary and reported as an error; the call that
//!   reached it answers "nothing". Build with the default `panic = "unwind"`: a plugin built with
//!   `panic = "abort"` is refused at load, since its first panic would kill the worker.
//! - `tracing` events inside the plugin reach the host's log, tagged with the plugin's name.
//! - [`Plugin::save_state`] and [`Plugin::restore_state`] carry what the plugin learned across a
//!   hot reload, as the plugin's own [`Plugin::State`] type; a state that no longer fits a newer
//!   build is refused naming the field, and the new generation starts fresh.
//! - A plugin that spawns threads or uses `thread_local!` values with destructors keeps its
//!   library mapped after unload (the C library keeps it until those destructors run). Reloads
//!   still work; each such generation stays in memory. Join your threads in `Drop`.
//!
//! Plugins write no `unsafe` code: [`export_plugin!`] generates the exported header and the
//! FFI shims.

#![deny(missing_docs)]
// Every `unsafe` of this crate is in `export`; the rest may not have any.
#![deny(unsafe_code)]

#[expect(
    unsafe_code,
    reason = "abi_stable's `StableAbi` derive writes the accessors of the prefix types' later \
              fields with `unsafe`; this module writes none by hand"
)]
pub mod abi;
pub mod assign;
#[expect(
    unsafe_code,
    reason = "the one module that turns the host's handles back into plugin instances"
)]
mod export;
mod harness;
mod hooks;
pub mod lenient;
mod log;
mod methods;
pub mod stats;
pub mod store;
mod typed;

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use harness::Harness;
pub use hooks::{HookMode, HookResult, HookSubscription, Hooks};
pub use methods::Methods;
pub use serde_json::Value;
pub use typed::{NoConfig, NoState};

/// Calls a method of another plugin through the host, with the same safety as the host's own
/// calls: a missing plugin or method, a failure or a panic in the other plugin comes back as an
/// error, never as a crash. A cycle (a plugin calling, through others, a plugin already waiting
/// on this thread) is cut with an error.
///
/// # Errors
///
/// The other plugin is missing or failed, the call would close a cycle, or the host is older
/// than plugin-to-plugin calls.
pub fn call_plugin(
    plugin: &str,
    method: &str,
    params: &Value,
) -> Result<Option<Value>, PluginError> {
    log::call_plugin(plugin, method, params)
}

#[doc(hidden)]
pub mod __private {
    pub use crate::export::header;
}

/// Version of the function table this crate builds (see [`abi::PluginTable`]).
#[cfg(not(any(feature = "__fixture_table_v1", feature = "__fixture_table_v6")))]
pub const TABLE_VERSION: u32 = 7;
/// Version of the function table this crate builds (see [`abi::PluginTable`]).
#[cfg(all(feature = "__fixture_table_v6", not(feature = "__fixture_table_v1")))]
pub const TABLE_VERSION: u32 = 6;
/// Version of the function table this crate builds (see [`abi::PluginTable`]).
#[cfg(feature = "__fixture_table_v1")]
pub const TABLE_VERSION: u32 = 1;

/// A plugin: implement this, then invoke [`export_plugin!`] with the type.
///
/// The host creates one instance per loaded generation of the library and calls it from many
/// threads at once.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// The plugin's configuration, read from its entry in the host's configuration file.
    ///
    /// No configuration (absent or `null`) gives `Config::default()`; anything else is
    /// deserialized, and a value that does not fit refuses the load with the path of the bad
    /// field (`experiments.tone.variants.A: invalid type: string "x", expected f64`). A struct
    /// with `#[serde(default)]` takes any subset of its fields. Use [`NoConfig`] for a plugin
    /// that takes none, and `Option<T>` for one that needs a configuration to start (refuse
    /// `None` in [`Plugin::create`]).
    type Config: DeserializeOwned + Default;

    /// What the plugin carries over a hot reload (see [`Plugin::save_state`]). Use [`NoState`]
    /// for a plugin that keeps none.
    ///
    /// The next generation may be a newer build of the plugin: a saved state that no longer
    /// fits is not restored, and the host logs the path of the field that did not fit.
    type State: Serialize + DeserializeOwned;

    /// Name, version and description. The name is how callers reach the plugin; two files that
    /// claim one name cannot both be loaded.
    fn info() -> PluginInfo;

    /// Makes the instance from the plugin's configuration.
    ///
    /// # Errors
    ///
    /// Return an error that says which field of the configuration is wrong and why; the host
    /// refuses to load the plugin and shows the message.
    fn create(config: Self::Config) -> Result<Self, PluginError>;

    /// Registers the plugin's methods.
    fn methods(methods: &mut Methods<Self>);

    /// Subscribes the plugin to hook points of the worker (none by default). See [`Hooks`].
    fn hooks(hooks: &mut Hooks<Self>) {
        let _ = hooks;
    }

    /// The state to carry over to the next generation on a hot reload. `None` (the default)
    /// means the plugin keeps no state.
    ///
    /// # Errors
    ///
    /// An error is logged and the new generation starts fresh.
    fn save_state(&self) -> Result<Option<Self::State>, PluginError> {
        Ok(None)
    }

    /// Takes over the state a previous generation saved. Called after [`Plugin::create`] and
    /// before the first call reaches the new instance; not called when nothing was saved.
    ///
    /// # Errors
    ///
    /// An error is logged and the plugin goes on with the state it has.
    fn restore_state(&self, state: Self::State) -> Result<(), PluginError> {
        let _ = state;
        Ok(())
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// The name callers use to reach the plugin.
    pub name: String,
    /// The plugin's version; pass `env!("CARGO_PKG_VERSION")`.
    pub version: String,
    /// One line saying what the plugin does.
    pub description: String,
}

impl PluginInfo {
    /// Name, version and one-line description.
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            description: description.into(),
        }
    }
}

/// The manifest a plugin exports: its info, its methods, and the interface it was built with.
///
/// The host reads it before creating the plugin. Fields may be added; readers ignore fields they
/// do not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// See [`PluginInfo::name`].
    pub name: String,
    /// See [`PluginInfo::version`].
    pub version: String,
    /// See [`PluginInfo::description`].
    #[serde(default)]
    pub description: String,
    /// The plugin's methods, in registration order.
    #[serde(default)]
    pub methods: Vec<MethodInfo>,
    /// Version of `plugin-api` the plugin was built with.
    #[serde(default)]
    pub api_version: String,
    /// Version of the function table the plugin was built with.
    #[serde(default)]
    pub table_version: u32,
    /// The hook points the plugin subscribes to.
    #[serde(default)]
    pub hooks: Vec<HookSubscription>,
}

/// One method in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodInfo {
    /// The method's name.
    pub name: String,
    /// One line saying what it does.
    #[serde(default)]
    pub description: String,
}

/// An error a plugin returns. It crosses the boundary as plain data: a kind and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    kind: abi::ErrorKind,
    message: String,
}

impl PluginError {
    /// A failure with a message for people.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            kind: abi::ErrorKind::Failed,
            message: message.into(),
        }
    }

    /// The params did not fit what the method expects.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self {
            kind: abi::ErrorKind::InvalidParams,
            message: message.into(),
        }
    }

    /// There is no method of that name.
    pub fn unknown_method(method: &str) -> Self {
        Self {
            kind: abi::ErrorKind::UnknownMethod,
            message: format!("no method `{method}`"),
        }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> abi::ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

impl From<serde_json::Error> for PluginError {
    fn from(e: serde_json::Error) -> Self {
        Self::new(e.to_string())
    }
}

/// Exports a [`Plugin`] type from a `cdylib`: writes the plugin header symbol and the FFI shims
/// that catch panics, bridge logging and convert JSON. Invoke it once per library.
///
/// # Unloading and thread-locals
///
/// When plugin code stores a value with a destructor in a `thread_local!` (directly or through
/// a dependency) on a thread that lives on, the C library keeps the plugin's library mapped
/// until that thread exits, even after the host unloaded it. Reloads still work (every
/// generation is a separate copy), but each such generation stays in memory. Threads the plugin
/// spawns have the same effect while they run: join them when the plugin is dropped.
///
/// `export_plugin!(MyPlugin, unload_thread_locals)` opts into a mitigation: the library then
/// registers no thread-local destructors, so it unmaps on unload; the price is that those
/// thread-local values are leaked rather than dropped. It needs the link argument
/// `-Wl,-Bsymbolic`; add a `build.rs` to the plugin crate with
/// `println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");`. Never link such a crate as an
/// `rlib` into a program: the program's own thread-local destructors would stop running.
///
/// ```
/// # use plugin_api::{Methods, NoConfig, NoState, Plugin, PluginError, PluginInfo};
/// pub struct Nothing;
/// impl Plugin for Nothing {
///     type Config = NoConfig;
///     type State = NoState;
///     fn info() -> PluginInfo { PluginInfo::new("nothing", "0.1.0", "Does nothing") }
///     fn create(_config: NoConfig) -> Result<Self, PluginError> { Ok(Nothing) }
///     fn methods(_methods: &mut Methods<Self>) {}
/// }
/// plugin_api::export_plugin!(Nothing);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The plugin header read by the host (generated by `plugin_api::export_plugin!`).
        #[unsafe(no_mangle)]
        pub static PLUGIN_HOST_HEADER: $crate::abi::PluginHeader =
            $crate::__private::header::<$plugin>(cfg!(panic = "unwind"));
    };
    ($plugin:ty, unload_thread_locals) => {
        $crate::export_plugin!($plugin);

        /// Replaces the C library's registration of thread-local destructors for this library
        /// only (generated by `plugin_api::export_plugin!(.., unload_thread_locals)`): nothing
        /// is registered, so the library can be unmapped on unload even while threads that used
        /// its thread-locals live on. Those values are leaked instead of dropped. Requires
        /// linking with `-Wl,-Bsymbolic` so the library's own code binds to this definition.
        #[unsafe(no_mangle)]
        pub extern "C" fn __cxa_thread_atexit_impl(
            _destructor: extern "C" fn(*mut u8),
            _object: *mut u8,
            _dso_symbol: *mut u8,
        ) -> i32 {
            0
        }
    };
}
