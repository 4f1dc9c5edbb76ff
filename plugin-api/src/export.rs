//! The shims [`export_plugin!`](crate::export_plugin) exports: every function the host can call,
//! each catching panics so that none unwinds into the host (which would abort the process).

use std::any::Any;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

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

/// Runs `f`, turning a panic into an error. Replaces this library's panic hook (each `cdylib`
/// has its own copy of `std`) with one that only reports the location through the log bridge:
/// the default hook prints to stderr and, with `RUST_BACKTRACE=1`, maps this library for
/// symbolization and never lets go of it, which would keep it from unloading.
fn guard<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, CallError> {
    QUIET_PANICS.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            if let Some(location) = info.location() {
                tracing::debug!(target: "plugin_api::panic", %location, "plugin code panicked");
            }
        }));
    });
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => ROk(value),
        Ok(Err(e)) => RErr(call_error(e)),
        Err(payload) => RErr(CallError {
            kind: ErrorKind::Panicked,
            message: RString::from(panic_message(payload.as_ref())),
        }),
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
/// `handle` must come from `create::<P>` of this library and not have been passed to `destroy`.
unsafe fn instance<'a, P>(handle: InstanceHandle) -> &'a Instance<P> {
    // SAFETY: per this function's contract the pointer came from `Box::into_raw` of an
    // `Instance<P>` in `create::<P>` and is still alive.
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

#[cfg_attr(
    feature = "__fixture_table_incompatible",
    expect(dead_code, reason = "replaced in the incompatible test table")
)]
extern "C" fn execute<P: Plugin>(
    handle: InstanceHandle,
    method: RStr<'_>,
    params: RStr<'_>,
) -> JsonResult {
    guard(|| {
        // SAFETY: the host holds the generation that owns `handle` alive for the whole call.
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
