//! Calls a loaded plugin library's entry points directly, without the host: the baseline of
//! the hook benchmarks (`hooks`, `instructions`), which share this file through `#[path]`.
#![allow(
    unsafe_code,
    reason = "the benchmark's baseline calls the plugin's C ABI itself"
)]

use std::path::Path;

use abi_stable::prefix_type::{PrefixRef, WithMetadata};
use abi_stable::std_types::{ROk, RSlice, RStr};
use plugin_api::abi::{
    HEADER_SYMBOL_NUL, HostApi, HostApiRef, HostContext, InstanceHandle, JsonResult, PluginHeader,
    PluginTable, PluginTableRef, level,
};

extern "C" fn no_log(_: HostContext, _: u8, _: RStr<'_>, _: RStr<'_>) {}

extern "C" fn no_call(_: HostContext, _: RStr<'_>, _: RStr<'_>, _: RStr<'_>) -> JsonResult {
    ROk(abi_stable::std_types::RNone)
}

extern "C" fn no_store(_: HostContext, _: RStr<'_>, _: RStr<'_>) -> JsonResult {
    ROk(abi_stable::std_types::RNone)
}

extern "C" fn no_store_generation(_: HostContext) -> u64 {
    0
}

extern "C" fn no_store_batch(_: HostContext, _: RSlice<'_, u8>) -> JsonResult {
    ROk(abi_stable::std_types::RNone)
}

extern "C" fn no_store_hold(_: HostContext) -> bool {
    false
}

static HOST_API: WithMetadata<HostApi> = WithMetadata::new(HostApi {
    log: no_log,
    call: no_call,
    store: no_store,
    store_generation: no_store_generation,
    store_batch: no_store_batch,
    store_hold: no_store_hold,
});

/// A second instance of a plugin, created in the library the host already loaded.
pub struct Library {
    table: PluginTableRef,
    instance: InstanceHandle,
    _library: libloading::Library,
}

impl Library {
    /// Opens the host's shadow copy again (the loader hands back the same mapping) and
    /// creates an instance in it.
    pub fn open(shadow: &Path) -> Library {
        // SAFETY: the host loaded and checked this very file (header, layout, panic
        // strategy); opening it again only adds a reference to the same mapping.
        let library = unsafe { libloading::Library::new(shadow) }.unwrap();
        // SAFETY: the host checked the header symbol has this type.
        let header: &PluginHeader = unsafe {
            &**library
                .get::<*const PluginHeader>(HEADER_SYMBOL_NUL)
                .unwrap()
        };
        // SAFETY: the host checked the table's layout against this one.
        let table = PluginTableRef(unsafe {
            PrefixRef::from_raw(header.table.cast::<WithMetadata<PluginTable>>())
        });
        let api = HostApiRef(HOST_API.static_as_prefix());
        let created = (table.create())(
            RStr::from_str(""),
            level::OFF,
            api,
            HostContext(std::ptr::null()),
        );
        let instance = created.into_result().map_err(|e| e.message).unwrap();
        Library {
            table,
            instance,
            _library: library,
        }
    }

    /// Runs the plugin's hook handler; whether it answered "continue".
    #[inline]
    pub fn on_hook(&self, hook: &str, payload: &str) -> bool {
        let on_hook = self.table.on_hook().unwrap();
        let answer = on_hook(self.instance, RStr::from_str(hook), RStr::from_str(payload));
        matches!(answer, ROk(abi_stable::std_types::RNone))
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        (self.table.destroy())(self.instance);
    }
}
