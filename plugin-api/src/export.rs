//! The shims [`export_plugin!`](crate::export_plugin) exports: every function the host can call,
//! each catching panics so that none unwinds into the host (which would abort the process).

use std::any::Any;
use std::cell::Cell;
use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use abi_stable::StableAbi;
use abi_stable::library::AbiHeader;
use abi_stable::prefix_type::WithMetadata;
use abi_stable::std_types::{RErr, RNone, ROk, ROption, RResult, RSome, RStr, RString};

use crate::abi::{
    CallError, ErrorKind, HEADER_VERSION, HostApiRef, HostContext, InstanceHandle, JsonResult,
    MAGIC, PluginHeader, PluginTable, PluginTableRef,
};
use crate::{Hooks, Manifest, Methods, Plugin, PluginError, TABLE_VERSION, Value};

/// What an [`InstanceHandle`] points to.
struct Instance<P> {
    plugin: P,
    methods: Methods<P>,
    #[cfg_attr(
        feature = "__fixture_table_v1",
        expect(dead_code, reason = "the version 1 table has no hook entry point")
    )]
    hooks: Hooks<P>,
}

struct Exports<P>(PhantomData<P>);

impl<P: Plugin> Exports<P> {
    const TABLE: &'static WithMetadata<PluginTable> = &WithMetadata::new(PluginTable {
        manifest: manifest::<P>,
        create: create::<P>,
        destroy: destroy::<P>,
        #[cfg(not(feature = "__fixture_table_incompatible"))]
        execute: execute::<P>,
        #[cfg(feature = "__fixture_table_incompatible")]
        execute: execute_incompatible,
        #[cfg(not(feature = "__fixture_table_v1"))]
        save_state: save_state::<P>,
        #[cfg(not(feature = "__fixture_table_v1"))]
        restore_state: restore_state::<P>,
        #[cfg(not(feature = "__fixture_table_v1"))]
        on_hook: on_hook::<P>,
    });
}

/// The header for plugin type `P`; `panic_unwind` is `cfg!(panic = "unwind")` as seen by the
/// plugin crate.
pub const fn header<P: Plugin>(panic_unwind: bool) -> PluginHeader {
    PluginHeader {
        magic: MAGIC,
        header_version: HEADER_VERSION,
        panic_unwind,
        abi: AbiHeader::VALUE,
        table_layout: <PluginTableRef as StableAbi>::LAYOUT,
        table: Exports::<P>::TABLE as *const WithMetadata<PluginTable> as *const c_void,
    }
}

static QUIET_PANICS: Once = Once::new();

/// Set once a [`Harness`] exists: the plugin runs inside the caller's own process (a test),
/// whose panics outside plugin calls must still reach the hook that was there before.
static IN_PROCESS: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// How many shims this thread is inside.
    static IN_SHIM: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f`, turning a panic into an error. Replaces this library's panic hook (each `cdylib`
/// has its own copy of `std`) with one that only reports the location through the log bridge:
/// the default hook prints to stderr and, with `RUST_BACKTRACE=1`, maps this library for
/// symbolization and never lets go of it, which would keep it from unloading.
fn guard<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, CallError> {
    QUIET_PANICS.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_PROCESS.load(Ordering::Relaxed) && IN_SHIM.try_with(Cell::get).unwrap_or(0) == 0 {
                previous(info);
            } else if let Some(location) = info.location() {
                tracing::debug!(target: "plugin_api::panic", %location, "plugin code panicked");
            }
        }));
    });
    let _inside = ShimDepth::enter();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => ROk(value),
        Ok(Err(e)) => RErr(call_error(e)),
        Err(payload) => RErr(CallError {
            kind: ErrorKind::Panicked,
            message: RString::from(panic_message(payload.as_ref())),
        }),
    }
}

/// Counts this thread as inside a shim until dropped (after the panic, if any, was caught).
struct ShimDepth;

impl ShimDepth {
    /// Counted only in-process: in a plugin library nothing reads the count, and a
    /// thread-local there costs a call into the dynamic linker.
    fn enter() -> Option<Self> {
        IN_PROCESS.load(Ordering::Relaxed).then(|| {
            IN_SHIM.with(|depth| depth.set(depth.get() + 1));
            ShimDepth
        })
    }
}

impl Drop for ShimDepth {
    fn drop(&mut self) {
        let _ = IN_SHIM.try_with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

fn call_error(e: PluginError) -> CallError {
    CallError {
        kind: e.kind,
        message: RString::from(e.message),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked with a payload that is not a string".to_owned()
    }
}

fn json_option(json: Option<String>) -> ROption<RString> {
    match json {
        Some(s) => RSome(RString::from(s)),
        None => RNone,
    }
}

/// Recovers the instance behind a handle.
///
/// # Safety
///
/// `handle` must point to an `Instance<P>` that outlives the returned reference: one made by
/// `create::<P>` of this library and not yet passed to `destroy` (the host keeps it alive for
/// the whole call), or one a [`Harness`] owns and lends for the call.
unsafe fn instance<'a, P>(handle: InstanceHandle) -> &'a Instance<P> {
    // SAFETY: per this function's contract the pointer is to a live `Instance<P>` (from
    // `Box::into_raw` in `create::<P>`, or borrowed from a `Harness`).
    unsafe { &*handle.0.cast::<Instance<P>>() }
}

pub(crate) fn manifest_of<P: Plugin>() -> Manifest {
    let info = P::info();
    let mut methods = Methods::new();
    P::methods(&mut methods);
    let mut hooks = Hooks::new();
    P::hooks(&mut hooks);
    Manifest {
        name: info.name,
        version: info.version,
        description: info.description,
        methods: methods.describe(),
        api_version: env!("CARGO_PKG_VERSION").to_owned(),
        table_version: TABLE_VERSION,
        hooks: hooks.subscriptions(),
    }
}

extern "C" fn manifest<P: Plugin>() -> RResult<RString, CallError> {
    guard(|| {
        let json = serde_json::to_string(&manifest_of::<P>())?;
        Ok(RString::from(json))
    })
}

extern "C" fn create<P: Plugin>(
    config: RStr<'_>,
    max_log_level: u8,
    host: HostApiRef,
    context: HostContext,
) -> RResult<InstanceHandle, CallError> {
    guard(|| {
        crate::log::install(host, context, max_log_level);
        let config: Value = match config.as_str() {
            "" => Value::Null,
            text => serde_json::from_str(text).map_err(|e| {
                PluginError::new(format!("the configuration is not valid JSON: {e}"))
            })?,
        };
        let plugin = P::create(config)?;
        let mut methods = Methods::new();
        P::methods(&mut methods);
        let mut hooks = Hooks::new();
        P::hooks(&mut hooks);
        let instance = Box::new(Instance {
            plugin,
            methods,
            hooks,
        });
        Ok(InstanceHandle(
            Box::into_raw(instance).cast::<c_void>().cast_const(),
        ))
    })
}

extern "C" fn destroy<P: Plugin>(handle: InstanceHandle) {
    let result = guard(|| {
        // SAFETY: the host calls `destroy` once per handle from `create::<P>`, after every call
        // on it has returned, so this is the last use of the box.
        drop(unsafe { Box::from_raw(handle.0.cast::<Instance<P>>().cast_mut()) });
        Ok(())
    });
    if let RErr(e) = result {
        tracing::warn!(error = %e.message, "dropping the plugin panicked");
    }
}

// Also what `Harness::call` runs, so it stays in use in the incompatible test table too.
extern "C" fn execute<P: Plugin>(
    handle: InstanceHandle,
    method: RStr<'_>,
    params: RStr<'_>,
) -> JsonResult {
    guard(|| {
        // SAFETY: the host holds the generation that owns `handle` alive for the whole call
        // (a `Harness` lends its own instance for the call).
        let instance = unsafe { instance::<P>(handle) };
        let json = instance
            .methods
            .call(&instance.plugin, method.as_str(), params.as_str())?;
        Ok(json_option(json))
    })
}

/// The `execute` of the deliberately incompatible test table; no host ever calls it.
#[cfg(feature = "__fixture_table_incompatible")]
extern "C" fn execute_incompatible(_: InstanceHandle, _: RStr<'_>, _: u64) -> JsonResult {
    RErr(CallError {
        kind: ErrorKind::Failed,
        message: RString::from("incompatible test table"),
    })
}

#[cfg(not(feature = "__fixture_table_v1"))]
extern "C" fn save_state<P: Plugin>(handle: InstanceHandle) -> JsonResult {
    guard(|| {
        // SAFETY: as in `execute`.
        let instance = unsafe { instance::<P>(handle) };
        let state = instance.plugin.save_state()?;
        let json = state.map(|s| serde_json::to_string(&s)).transpose()?;
        Ok(json_option(json))
    })
}

#[cfg(not(feature = "__fixture_table_v1"))]
extern "C" fn restore_state<P: Plugin>(
    handle: InstanceHandle,
    state: RStr<'_>,
) -> RResult<(), CallError> {
    guard(|| {
        // SAFETY: as in `execute`.
        let instance = unsafe { instance::<P>(handle) };
        let state: Value = serde_json::from_str(state.as_str())
            .map_err(|e| PluginError::new(format!("saved state is not valid JSON: {e}")))?;
        instance.plugin.restore_state(state)
    })
}

#[cfg(not(feature = "__fixture_table_v1"))]
extern "C" fn on_hook<P: Plugin>(
    handle: InstanceHandle,
    hook: RStr<'_>,
    payload: RStr<'_>,
) -> JsonResult {
    guard(|| {
        // SAFETY: as in `execute`.
        let instance = unsafe { instance::<P>(handle) };
        let result = instance
            .hooks
            .run(&instance.plugin, hook.as_str(), payload.as_str())?;
        Ok(json_option(result.to_json()))
    })
}

/// A plugin instance driven in-process through the very entry points the host calls: the same
/// panic-catching shims, method and hook lookup and JSON handling, without a library or a host.
///
/// For unit tests of a plugin (a panic comes back as an error of kind
/// [`Panicked`](ErrorKind::Panicked), as the host would see it) and for benchmarks that need the
/// plugin's own cost as a baseline. The plugin's `tracing` events go to the process's own
/// subscriber, since no host bridge is installed. Plugin-to-plugin calls
/// ([`call_plugin`](crate::call_plugin)) fail: there is no host to route them.
///
/// # Examples
///
/// ```
/// use plugin_api::{Harness, Methods, Plugin, PluginError, PluginInfo, Value};
///
/// struct Doubler;
///
/// impl Plugin for Doubler {
///     fn info() -> PluginInfo {
///         PluginInfo::new("doubler", "0.1.0", "Doubles a number")
///     }
///     fn create(_config: Value) -> Result<Self, PluginError> {
///         Ok(Doubler)
///     }
///     fn methods(methods: &mut Methods<Self>) {
///         methods.method("double", "Doubles n", |_, n: f64| Ok(n * 2.0));
///         methods.method("boom", "Panics", |_, _: Value| -> Result<(), PluginError> {
///             panic!("boom")
///         });
///     }
/// }
///
/// let doubler = Harness::<Doubler>::new(Value::Null)?;
/// assert_eq!(doubler.call("double", "21")?.as_deref(), Some("42.0"));
/// assert!(doubler.call("boom", "null").is_err());
/// assert!(doubler.call("triple", "1").is_err());
/// # Ok::<(), PluginError>(())
/// ```
pub struct Harness<P: Plugin> {
    instance: Instance<P>,
}

impl<P: Plugin> Harness<P> {
    /// Creates the plugin with `config`, as the host's load would (without the log bridge).
    ///
    /// # Errors
    ///
    /// The plugin's `create` failed or panicked.
    pub fn new(config: Value) -> Result<Self, PluginError> {
        IN_PROCESS.store(true, Ordering::Relaxed);
        let _inside = ShimDepth::enter();
        let instance = catch_unwind(|| -> Result<Instance<P>, PluginError> {
            let plugin = P::create(config)?;
            let mut methods = Methods::new();
            P::methods(&mut methods);
            let mut hooks = Hooks::new();
            P::hooks(&mut hooks);
            Ok(Instance {
                plugin,
                methods,
                hooks,
            })
        })
        .map_err(|payload| PluginError {
            kind: ErrorKind::Panicked,
            message: panic_message(payload.as_ref()),
        })??;
        Ok(Self { instance })
    }

    /// The plugin itself.
    pub fn plugin(&self) -> &P {
        &self.instance.plugin
    }

    fn handle(&self) -> InstanceHandle {
        // Valid while `&self` is borrowed, which spans each call that uses it.
        InstanceHandle(std::ptr::from_ref(&self.instance).cast::<c_void>())
    }

    /// Calls `method` with params as JSON text (empty for none), through the entry point the
    /// host calls; the answer is JSON text, `None` for no answer.
    ///
    /// # Errors
    ///
    /// What the host would see as a failed call: no such method, invalid params, an error, or
    /// a panic (kind [`Panicked`](ErrorKind::Panicked)).
    pub fn call(&self, method: &str, params: &str) -> Result<Option<String>, PluginError> {
        owned(execute::<P>(
            self.handle(),
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
    #[cfg(not(feature = "__fixture_table_v1"))]
    pub fn hook(&self, hook: &str, payload: &str) -> Result<Option<String>, PluginError> {
        owned(on_hook::<P>(
            self.handle(),
            RStr::from_str(hook),
            RStr::from_str(payload),
        ))
    }
}

impl<P: Plugin + fmt::Debug> fmt::Debug for Harness<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("plugin", &self.instance.plugin)
            .finish_non_exhaustive()
    }
}

fn owned(result: JsonResult) -> Result<Option<String>, PluginError> {
    match result {
        ROk(json) => Ok(json.into_option().map(RString::into_string)),
        RErr(e) => Err(PluginError {
            kind: e.kind,
            message: e.message.into_string(),
        }),
    }
}
