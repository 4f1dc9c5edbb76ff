//! The shims [`export_plugin!`](crate::export_plugin) exports: every function the host can call,
//! each catching panics so that none unwinds into the host (which would abort the process).
//!
//! All of this crate's `unsafe` is here: turning an [`InstanceHandle`] back into the instance
//! it points to, and the `Send`/`Sync` promises of the types that hold raw pointers.

use std::any::Any;
use std::cell::Cell;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use abi_stable::StableAbi;
use abi_stable::library::AbiHeader;
use abi_stable::prefix_type::WithMetadata;
use abi_stable::std_types::{RErr, RNone, ROk, ROption, RResult, RSome, RStr, RString};
use serde::Serialize;

use crate::abi::{
    CallError, ErrorKind, HEADER_VERSION, HostApiRef, HostContext, InstanceHandle, JsonResult,
    MAGIC, PluginHeader, PluginTable, PluginTableRef,
};
use crate::log::HostLink;
use crate::{Hooks, Manifest, Methods, Plugin, PluginError, TABLE_VERSION, typed};

// SAFETY: every field is immutable `'static` data: `table` points to a `static`-promoted
// constant that nothing ever writes through, so sharing the header between threads is sound.
unsafe impl Sync for PluginHeader {}

// SAFETY: a `HostLink`'s `context` is an opaque pointer that the plugin never dereferences; it
// only hands it back to the host's functions, which the host guarantees may be called from any
// thread for as long as the plugin is loaded. `api` points to the host's immutable table.
unsafe impl Send for HostLink {}
// SAFETY: as for `Send`: nothing behind a `HostLink` is ever mutated or dereferenced here.
unsafe impl Sync for HostLink {}

/// What an [`InstanceHandle`] points to.
pub(crate) struct Instance<P> {
    pub(crate) plugin: P,
    methods: Methods<P>,
    hooks: Hooks<P>,
}

impl<P: Plugin> Instance<P> {
    /// The plugin made from its configuration's JSON text (empty for none), with its methods
    /// and hooks registered: all that the `create` shim does besides installing the log bridge.
    pub(crate) fn create(config: &str) -> Result<Self, PluginError> {
        let plugin = P::create(typed::config(config)?)?;
        let mut methods = Methods::new();
        P::methods(&mut methods);
        let mut hooks = Hooks::new();
        P::hooks(&mut hooks);
        Ok(Instance {
            plugin,
            methods,
            hooks,
        })
    }

    /// A handle to this instance, for the shims. Valid as long as `self` is borrowed.
    pub(crate) fn handle(&self) -> InstanceHandle {
        InstanceHandle(std::ptr::from_ref(self).cast::<c_void>())
    }
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
        #[cfg(not(feature = "__fixture_table_v1"))]
        execute_at: execute_at::<P>,
        #[cfg(not(any(feature = "__fixture_table_v1", feature = "__fixture_table_v6")))]
        store_hand_over,
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

/// Set once a [`Harness`](crate::Harness) exists: the plugin runs inside the caller's own
/// process (a test), whose panics outside plugin calls must still reach the hook that was there
/// before.
pub(crate) static IN_PROCESS: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// How many shims this thread is inside.
    static IN_SHIM: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f`, turning a panic into an error. Replaces this library's panic hook (each `cdylib`
/// has its own copy of `std`) with one that only reports the location through the log bridge:
/// the default hook prints to stderr and, with `RUST_BACKTRACE=1`, maps this library for
/// symbolization and never lets go of it, which would keep it from unloading.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, CallError> {
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
    let counted = crate::store::begin_call();
    let result = catch_unwind(AssertUnwindSafe(f));
    // The call's additions to the store go to the host in one crossing (or are held, when the
    // host will ask for them).
    crate::store::end_call(counted);
    match result {
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

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
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
/// the whole call), or one a [`Harness`](crate::Harness) owns and lends for the call.
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
        let instance = Box::new(Instance::<P>::create(config.as_str())?);
        Ok(InstanceHandle(
            Box::into_raw(instance).cast::<c_void>().cast_const(),
        ))
    })
}

extern "C" fn destroy<P: Plugin>(handle: InstanceHandle) {
    // What the instance holds goes to the host before its `Drop` runs (which may panic or
    // hang), and what `Drop` adds after it: the host asks no more once this began.
    let result = guard(|| {
        crate::store::closing();
        // SAFETY: the host calls `destroy` once per handle from `create::<P>`, after every call
        // on it has returned, so this is the last use of the box.
        drop(unsafe { Box::from_raw(handle.0.cast::<Instance<P>>().cast_mut()) });
        Ok(())
    });
    if let RErr(e) = result {
        tracing::warn!(error = %e.message, "dropping the plugin panicked");
    }
    let _ = guard(|| {
        crate::store::hand_over_held();
        Ok(())
    });
}

/// Hands the store additions this plugin holds to the host (see `HostApi::store_hold`).
#[cfg(not(any(feature = "__fixture_table_v1", feature = "__fixture_table_v6")))]
extern "C" fn store_hand_over(_: InstanceHandle) -> RResult<(), CallError> {
    guard(|| {
        crate::store::hand_over_held();
        Ok(())
    })
}

// Also what `Harness::call_text` runs, so it stays in use in the incompatible test table too (and
// likewise the state and hook shims in the version 1 table).
pub(crate) extern "C" fn execute<P: Plugin>(
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

/// `execute` of the method at `index` in the manifest's list, checked against `method` (the
/// lookup by name when they differ).
#[cfg(not(feature = "__fixture_table_v1"))]
extern "C" fn execute_at<P: Plugin>(
    handle: InstanceHandle,
    index: u32,
    method: RStr<'_>,
    params: RStr<'_>,
) -> JsonResult {
    guard(|| {
        // SAFETY: as in `execute`.
        let instance = unsafe { instance::<P>(handle) };
        let json =
            instance
                .methods
                .call_at(&instance.plugin, index, method.as_str(), params.as_str())?;
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

pub(crate) extern "C" fn save_state<P: Plugin>(handle: InstanceHandle) -> JsonResult {
    guard(|| {
        // SAFETY: as in `execute`.
        let instance = unsafe { instance::<P>(handle) };
        // A reload's new instance reads the store: nothing stays held in this one (handed
        // over before the plugin's code, which may panic, and after it).
        crate::store::hand_over_held();
        let saved = instance.plugin.save_state();
        crate::store::hand_over_held();
        let json = match saved? {
            Some(state) => Some(to_json(&state, "the state to save")?),
            None => None,
        };
        Ok(json_option(json))
    })
}

pub(crate) extern "C" fn restore_state<P: Plugin>(
    handle: InstanceHandle,
    state: RStr<'_>,
) -> RResult<(), CallError> {
    guard(|| {
        // SAFETY: as in `execute`.
        let instance = unsafe { instance::<P>(handle) };
        instance.plugin.restore_state(typed::state(state.as_str())?)
    })
}

pub(crate) extern "C" fn on_hook<P: Plugin>(
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

fn to_json(value: &impl Serialize, what: &str) -> Result<String, PluginError> {
    serde_json::to_string(value).map_err(|e| PluginError::new(format!("{what} is not JSON: {e}")))
}

/// The answer of a shim as std types.
pub(crate) fn owned<T>(result: RResult<T, CallError>) -> Result<T, PluginError> {
    match result {
        ROk(value) => Ok(value),
        RErr(e) => Err(PluginError {
            kind: e.kind,
            message: e.message.into_string(),
        }),
    }
}
