//! Every `dlopen`, `dlsym`, pointer cast and FFI call of the host lives here; the rest of the
//! host is safe code.
//!
//! A [`PluginLibrary`] is one generation of a plugin: its shadow copy, opened, checked and (after
//! [`PluginLibrary::create`]) holding the plugin's instance. Dropping it destroys the instance,
//! closes the library and deletes the shadow copy, in that order.

use crate::text::EscapePath;
use std::borrow::Cow;
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::Utf8Error;

use abi_stable::library::AbiHeader;
use abi_stable::prefix_type::{PrefixRef, WithMetadata};
use abi_stable::std_types::{RErr, RNone, ROk, RSlice, RSome, RStr, RString};
use abi_stable::type_layout::TypeLayout;
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use plugin_api::abi::{
    self, CallError, ErrorKind, HEADER_VERSION, HostApi, HostApiRef, HostContext, InstanceHandle,
    JsonResult, MAGIC, PluginHeader, PluginTable, PluginTableRef,
};

use crate::error::{LoadErrorKind, PluginError};
use crate::loader::HeaderLocation;
use crate::text::EscapeControl;

/// The process's effective user id: whose files the worker trusts.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: `geteuid` takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() }
}

/// The readable loaded segments of one library in this process, as absolute address ranges.
#[derive(Debug)]
struct Segments {
    /// The library's load address (what its virtual addresses are relative to).
    base: usize,
    /// `[start, end)` of each readable `PT_LOAD` segment.
    readable: Vec<(usize, usize)>,
}

impl Segments {
    /// Whether `len` bytes at `address` lie inside one readable segment of the library.
    fn contains(&self, address: usize, len: usize) -> bool {
        let Some(end) = address.checked_add(len) else {
            return false;
        };
        self.readable
            .iter()
            .any(|&(start, stop)| address >= start && end <= stop)
    }

    /// The segments of the library loaded from `path`, found by its name in the dynamic loader's
    /// list of loaded objects (`dl_iterate_phdr`). `None` when no such library is loaded.
    fn of_library(path: &Path) -> Option<Segments> {
        use std::os::unix::ffi::OsStrExt as _;
        struct Search<'a> {
            name: &'a [u8],
            found: Option<Segments>,
        }
        /// Called by `dl_iterate_phdr` for every loaded object; stops (returns 1) at ours.
        ///
        /// # Safety
        ///
        /// `info` must point to a valid `dl_phdr_info` and `data` to the `Search` passed to
        /// `dl_iterate_phdr`, as `dl_iterate_phdr` guarantees.
        unsafe extern "C" fn visit(
            info: *mut libc::dl_phdr_info,
            _size: usize,
            data: *mut c_void,
        ) -> libc::c_int {
            // SAFETY: `data` is the `&mut Search` given to `dl_iterate_phdr` below, alive and
            // not otherwise borrowed during the iteration.
            let search = unsafe { &mut *data.cast::<Search<'_>>() };
            // SAFETY: the dynamic loader passes a valid `dl_phdr_info` for the duration of
            // this call.
            let info = unsafe { &*info };
            if info.dlpi_name.is_null() || info.dlpi_phdr.is_null() {
                return 0;
            }
            // SAFETY: a non-null `dlpi_name` is the loaded object's NUL-terminated name, alive
            // during this call.
            let name = unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) };
            if name.to_bytes() != search.name {
                return 0;
            }
            // SAFETY: `dlpi_phdr` points to the object's `dlpi_phnum` program headers, mapped
            // with the object.
            let headers =
                unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
            let base = info.dlpi_addr as usize;
            let readable = headers
                .iter()
                .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_R != 0)
                .filter_map(|h| {
                    let start = base.checked_add(usize::try_from(h.p_vaddr).ok()?)?;
                    let end = start.checked_add(usize::try_from(h.p_memsz).ok()?)?;
                    Some((start, end))
                })
                .collect();
            search.found = Some(Segments { base, readable });
            1
        }
        let mut search = Search {
            name: path.as_os_str().as_bytes(),
            found: None,
        };
        // SAFETY: `visit` matches the callback type `dl_iterate_phdr` expects, never unwinds
        // (nothing in it can panic) and only reads what the loader hands it; `search` outlives
        // the call.
        unsafe {
            libc::dl_iterate_phdr(
                Some(visit),
                std::ptr::from_mut(&mut search).cast::<c_void>(),
            );
        }
        search.found
    }
}

/// Why a call into a plugin gave no usable answer.
#[derive(Debug)]
pub(crate) enum PluginFailure<'a> {
    /// The plugin's side reported a failure: its kind and message (bytes that are not UTF-8
    /// replaced by U+FFFD).
    Reported(ErrorKind, &'a str),
    /// The plugin answered bytes that are not UTF-8 text.
    NotUtf8(Utf8Error),
    /// An isolated plugin's process ended or was killed before it answered.
    Lost(crate::isolation::Lost),
}

/// The text of a string a plugin handed over, checked: abi_stable's string types promise
/// UTF-8, but a plugin's `unsafe` code can break that promise, and the host must never pass
/// such bytes on as text (to stdout, an HTTP body, a log). One pass over the bytes.
#[inline]
fn plugin_text(text: RStr<'_>) -> Result<&str, Utf8Error> {
    std::str::from_utf8(text.as_rslice().as_slice())
}

/// A plugin's message for people: the bytes that are not UTF-8 replaced (no copy when all are).
fn plugin_message(text: RStr<'_>) -> Cow<'_, str> {
    String::from_utf8_lossy(text.as_rslice().as_slice())
}

/// An owned string from a plugin, checked as [`plugin_text`]; `what` names it in the error.
fn plugin_string(text: RString, what: &str) -> Result<String, PluginError> {
    String::from_utf8(text.into_bytes().into_vec())
        .map_err(|e| PluginError::failed(format!("{what} is not UTF-8 text ({})", e.utf8_error())))
}

/// The shadow copy of a plugin file; deleted when dropped.
#[derive(Debug)]
pub(crate) struct ShadowFile(pub(crate) PathBuf);

impl Drop for ShadowFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(file = %EscapePath(&self.0), error = %e, "could not delete a shadow copy");
        }
    }
}

/// Answers a plugin's call to another plugin: (plugin, method, params JSON text) to the answer's
/// JSON text, or the failure.
pub(crate) type CallBack =
    Box<dyn Fn(&str, &str, &str) -> Result<Option<String>, PluginError> + Send + Sync>;

/// What the host's callbacks need: the plugin's name for its log events, and how to reach the
/// other plugins.
struct LogContext {
    plugin: String,
    call: CallBack,
    /// The shared store in the plugin's namespace; `None` when the host has none.
    store: Option<crate::store::StoreAccess>,
}

static HOST_API: WithMetadata<HostApi> = WithMetadata::new(HostApi {
    log: host_log,
    call: host_call,
    store: host_store,
    store_generation: host_store_generation,
    store_batch: host_store_batch,
    store_hold: host_store_hold,
});

/// A plugin keeps its additions past the end of its call: whether the host will ask for them.
extern "C" fn host_store_hold(context: HostContext) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`: the context outlives every call the plugin can make.
        let context = unsafe { &*context.0.cast::<LogContext>() };
        context
            .store
            .as_ref()
            .is_some_and(crate::store::StoreAccess::hold)
    }))
    .unwrap_or(false)
}

/// A plugin's additions to the store, handed over in one batch (`plugin_api::store`).
extern "C" fn host_store_batch(context: HostContext, batch: RSlice<'_, u8>) -> JsonResult {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`: the context outlives every call the plugin can make.
        let context = unsafe { &*context.0.cast::<LogContext>() };
        match &context.store {
            Some(store) => store.batch(batch.as_slice()),
            None => Ok(None),
        }
    }));
    match result {
        Ok(Ok(answer)) => ROk(answer.map(RString::from).into()),
        Ok(Err(PluginError { kind, message })) => RErr(CallError {
            kind,
            message: RString::from(message),
        }),
        Err(_) => RErr(CallError {
            kind: ErrorKind::Panicked,
            message: RString::from("the host panicked in a store operation"),
        }),
    }
}

/// The generation of the store cache the plugin reads (0 without a store): a plugin keeps its
/// reads while it is unchanged.
extern "C" fn host_store_generation(context: HostContext) -> u64 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`: the context outlives every call the plugin can make.
        let context = unsafe { &*context.0.cast::<LogContext>() };
        context
            .store
            .as_ref()
            .map_or(0, crate::store::StoreAccess::generation)
    }))
    .unwrap_or(0)
}

/// A plugin's operation on the shared store (`plugin_api::store`).
extern "C" fn host_store(context: HostContext, op: RStr<'_>, args: RStr<'_>) -> JsonResult {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`: the context outlives every call the plugin can make.
        let context = unsafe { &*context.0.cast::<LogContext>() };
        let Some(store) = &context.store else {
            return Ok(None);
        };
        let (Ok(op), Ok(args)) = (plugin_text(op), plugin_text(args)) else {
            return Err(PluginError {
                kind: ErrorKind::InvalidParams,
                message: "the operation or arguments of a store call are not UTF-8 text".to_owned(),
            });
        };
        store.op(op, args)
    }));
    match result {
        Ok(Ok(answer)) => ROk(answer.map(RString::from).into()),
        Ok(Err(PluginError { kind, message })) => RErr(CallError {
            kind,
            message: RString::from(message),
        }),
        Err(_) => RErr(CallError {
            kind: ErrorKind::Panicked,
            message: RString::from("the host panicked in a store operation"),
        }),
    }
}

/// A plugin calls another plugin through the host.
extern "C" fn host_call(
    context: HostContext,
    plugin: RStr<'_>,
    method: RStr<'_>,
    params: RStr<'_>,
) -> JsonResult {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`: the context outlives every call the plugin can make.
        let context = unsafe { &*context.0.cast::<LogContext>() };
        let (Ok(plugin), Ok(method), Ok(params)) = (
            plugin_text(plugin),
            plugin_text(method),
            plugin_text(params),
        ) else {
            return Err(PluginError {
                kind: ErrorKind::InvalidParams,
                message: "the plugin, method or params of a plugin call are not UTF-8 text"
                    .to_owned(),
            });
        };
        (context.call)(plugin, method, params)
    }));
    match result {
        Ok(Ok(answer)) => ROk(answer.map(RString::from).into()),
        Ok(Err(PluginError { kind, message })) => RErr(CallError {
            kind,
            message: RString::from(message),
        }),
        Err(_) => RErr(CallError {
            kind: ErrorKind::Panicked,
            message: RString::from("the host panicked while forwarding the call"),
        }),
    }
}

/// Re-emits a plugin's `tracing` event on the host's subscriber, with the plugin's name as its
/// target.
extern "C" fn host_log(context: HostContext, level: u8, target: RStr<'_>, message: RStr<'_>) {
    // Nothing may unwind into the plugin: a panic in a subscriber is dropped here.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `context` is the `LogContext` that `PluginLibrary::create` passed to this
        // plugin. It is freed only after the library is closed, so while plugin code runs (and so
        // can call this function) it is alive.
        let context = unsafe { &*context.0.cast::<LogContext>() };
        let plugin = context.plugin.as_str();
        // The plugin's text goes into the host's log lines: no control characters (a newline
        // would forge a line), nothing that is not UTF-8.
        let target = plugin_message(target);
        let target = EscapeControl(&target);
        let message = plugin_message(message);
        let message = EscapeControl(&message);
        let level = match level {
            abi::level::ERROR => tracing::Level::ERROR,
            abi::level::WARN => tracing::Level::WARN,
            abi::level::INFO => tracing::Level::INFO,
            abi::level::DEBUG => tracing::Level::DEBUG,
            _ => tracing::Level::TRACE,
        };
        // The event's target is the plugin's name (filter with `NAME=LEVEL`); the plugin's own
        // target goes in the field `source`.
        crate::plugin_log::emit(
            plugin,
            level,
            &format_args!("{target}"),
            &format_args!("{message}"),
        );
    }));
}

pub(crate) fn max_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => abi::level::TRACE,
        LevelFilter::DEBUG => abi::level::DEBUG,
        LevelFilter::INFO => abi::level::INFO,
        LevelFilter::WARN => abi::level::WARN,
        LevelFilter::ERROR => abi::level::ERROR,
        _ => abi::level::OFF,
    }
}

/// One opened and checked plugin library (one generation).
pub(crate) struct PluginLibrary {
    table: PluginTableRef,
    instance: Option<InstanceHandle>,
    log_context: Option<Box<LogContext>>,
    library: ManuallyDrop<Library>,
    /// Declared last: deleted after the library is closed.
    shadow: ShadowFile,
}

// SAFETY: the instance behind `instance` is a `plugin_api::Plugin`, which is `Send + Sync`, and
// the table's functions are plain `extern "C"` functions written to be called from any thread
// (the plugin-api shims take `&self` only). `Library` is `Send + Sync` itself.
unsafe impl Send for PluginLibrary {}
// SAFETY: see `Send` above.
unsafe impl Sync for PluginLibrary {}

impl std::fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("shadow", &self.shadow.0)
            .field("created", &self.instance.is_some())
            .finish()
    }
}

impl PluginLibrary {
    /// Opens the shadow copy with `RTLD_NOW | RTLD_LOCAL` and runs every check on the header
    /// and the table layout.
    ///
    /// `header` comes from the ELF pre-check of these very bytes (`loader::check_elf`): the file
    /// is a complete shared object of this host's kind that exports a plugin header, so opening
    /// it runs the initializers of a plugin, not of an arbitrary library.
    pub(crate) fn open(shadow: ShadowFile, header: HeaderLocation) -> Result<Self, LoadErrorKind> {
        // SAFETY: loading a library runs its initializers. The file passed the ELF pre-check
        // (complete, of this host's kind, exporting a plugin header whose magic and version
        // are right) and lies in our private directory, created with O_EXCL from the checked
        // bytes; running a plugin's initializers is what loading a plugin means.
        let library =
            unsafe { Library::open(Some(&shadow.0), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
                LoadErrorKind::NotLoadable {
                    reason: e.to_string(),
                }
            })?;
        let table = match check_header(&library, &shadow.0, header) {
            Ok(table) => table,
            Err(e) => {
                // The error is owned data (no borrow of the library), so closing is safe.
                let _ = library.close();
                return Err(e);
            }
        };
        Ok(PluginLibrary {
            table,
            instance: None,
            log_context: None,
            library: ManuallyDrop::new(library),
            shadow,
        })
    }

    /// The manifest JSON the plugin exports.
    pub(crate) fn manifest_json(&self) -> Result<String, PluginError> {
        // SAFETY: the library is open while `self` lives (it is closed in `Drop`).
        match unsafe { table::manifest(self.table) } {
            ROk(json) => plugin_string(json, "the manifest"),
            RErr(e) => Err(owned(e)),
        }
    }

    /// Creates the plugin's instance with its configuration (JSON text, empty for none).
    pub(crate) fn create(
        &mut self,
        plugin: &str,
        config: &str,
        call: CallBack,
        store: Option<crate::store::StoreAccess>,
    ) -> Result<(), PluginError> {
        let context = Box::new(LogContext {
            plugin: plugin.to_owned(),
            call,
            store,
        });
        let context_ptr = HostContext(std::ptr::from_ref::<LogContext>(&context).cast::<c_void>());
        let host = HostApiRef(HOST_API.static_as_prefix());
        // SAFETY: the library is open while `self` lives; `context` is kept in `self` (below)
        // until after the library is closed, so it outlives the instance.
        let result = unsafe {
            table::create(
                self.table,
                RStr::from_str(config),
                max_log_level(),
                host,
                context_ptr,
            )
        };
        // Kept even when create failed: the plugin may have logged through it and may hold it.
        self.log_context = Some(context);
        match result {
            ROk(instance) => {
                self.instance = Some(instance);
                Ok(())
            }
            RErr(e) => Err(owned(e)),
        }
    }

    /// Calls `method`, handing the plugin's answer to `f` while the plugin's strings are alive.
    ///
    /// Returns `None` when the instance was not created.
    #[inline]
    pub(crate) fn call<R>(
        &self,
        method: &str,
        params: &str,
        f: impl FnOnce(Result<Option<&str>, PluginFailure<'_>>) -> R,
    ) -> Option<R> {
        let instance = self.instance?;
        // SAFETY: the library is open while `self` lives; `instance` came from this table's
        // `create` and is destroyed only in `Drop`, which `&self` excludes.
        let result = unsafe {
            table::execute(
                self.table,
                instance,
                RStr::from_str(method),
                RStr::from_str(params),
            )
        };
        Some(answer(&result, f))
        // `result` drops here, in the plugin's code, while the library is loaded.
    }

    /// [`call`](Self::call) of the method at `index` in the manifest's list, named `method`:
    /// the plugin skips its lookup by name (and falls back to it when the name at `index`
    /// differs). A plugin whose table predates the entry (version 5 and older) is called by
    /// name.
    #[inline]
    pub(crate) fn call_at<R>(
        &self,
        index: u32,
        method: &str,
        params: &str,
        f: impl FnOnce(Result<Option<&str>, PluginFailure<'_>>) -> R,
    ) -> Option<R> {
        let instance = self.instance?;
        // SAFETY: as in `call`: the library is open and `instance` alive while `&self` is held.
        let result = unsafe {
            table::execute_at(
                self.table,
                instance,
                index,
                RStr::from_str(method),
                RStr::from_str(params),
            )
        };
        Some(answer(&result, f))
    }

    /// Runs the plugin's handler for `hook`, handing its answer to `f` while the plugin's
    /// strings are alive. `None` when the plugin predates hooks (table version < 3) or was not
    /// created.
    #[inline]
    pub(crate) fn on_hook<R>(
        &self,
        hook: &str,
        payload: &str,
        f: impl FnOnce(Result<Option<&str>, PluginFailure<'_>>) -> R,
    ) -> Option<R> {
        let instance = self.instance?;
        // SAFETY: as in `call`: the library is open and `instance` alive while `&self` is held.
        let result = unsafe {
            table::on_hook(
                self.table,
                instance,
                RStr::from_str(hook),
                RStr::from_str(payload),
            )
        }?;
        Some(answer(&result, f))
    }

    /// The plugin's saved state: `None` when the plugin predates state (table version 1) or was
    /// not created.
    pub(crate) fn save_state(&self) -> Option<Result<Option<String>, PluginError>> {
        let instance = self.instance?;
        // SAFETY: as in `call`: the library is open and `instance` alive while `&self` is held.
        let saved = unsafe { table::save_state(self.table, instance) }?;
        Some(match saved {
            ROk(RSome(json)) => plugin_string(json, "the saved state").map(Some),
            ROk(RNone) => Ok(None),
            RErr(e) => Err(owned(e)),
        })
    }

    /// Gives the plugin a state saved earlier. `None` when the plugin predates state.
    pub(crate) fn restore_state(&self, state: &str) -> Option<Result<(), PluginError>> {
        let instance = self.instance?;
        // SAFETY: as in `call`: the library is open and `instance` alive while `&self` is held.
        let restored =
            unsafe { table::restore_state(self.table, instance, RStr::from_str(state)) }?;
        Some(match restored {
            ROk(()) => Ok(()),
            RErr(e) => Err(owned(e)),
        })
    }

    /// This instance as one that may hold store additions: `None` without a store, or when the
    /// plugin's table predates the hand-over (version 6 and older), which never holds.
    pub(crate) fn store_holder(&self) -> Option<&std::sync::Arc<crate::store::Holder>> {
        self.instance?;
        self.table.store_hand_over()?;
        self.log_context.as_ref()?.store.as_ref()?.holder()
    }

    /// Asks the plugin for the store additions it holds (see [`crate::store::Holder`]).
    pub(crate) fn store_hand_over(&self) -> Option<Result<(), PluginError>> {
        let instance = self.instance?;
        // SAFETY: as in `call`: the library is open and `instance` alive while `&self` is held.
        let handed = unsafe { table::store_hand_over(self.table, instance) }?;
        Some(match handed {
            ROk(()) => Ok(()),
            RErr(e) => Err(owned(e)),
        })
    }

    /// Whether the plugin's table has the hook entry point (table version 3 and later).
    pub(crate) fn supports_hooks(&self) -> bool {
        self.table.on_hook().is_some()
    }

    /// Path of the shadow copy this generation was loaded from.
    pub(crate) fn shadow_path(&self) -> &Path {
        &self.shadow.0
    }
}

impl Drop for PluginLibrary {
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        if let Some(instance) = self.instance.take() {
            // SAFETY: the library is still open (closed below); `instance` came from `create`
            // and is destroyed once (taken out of `self.instance`); no call is in flight, since
            // every call holds an `Arc` of this generation and we are in its `Drop`.
            unsafe { table::destroy(self.table, instance) };
        }
        // SAFETY: `library` is taken exactly once, here; nothing of the plugin's is alive any
        // more: the instance was destroyed above, every call held an `Arc` of this generation
        // (so none is in flight), and every string the plugin returned was dropped before its
        // call returned.
        let library = unsafe { ManuallyDrop::take(&mut self.library) };
        if let Err(e) = library.close() {
            tracing::warn!(file = %EscapePath(&self.shadow.0), error = %e, "dlclose failed");
        }
        tracing::debug!(
            plugin = self.log_context.as_ref().map_or("", |c| c.plugin.as_str()),
            shadow = %EscapePath(&self.shadow.0),
            took_us = started.elapsed().as_micros(),
            "generation destroyed and closed"
        );
        // `log_context`, then `shadow` (deleting the file) drop after this.
    }
}

/// Hands a method's answer to `f` as text, checked.
#[inline(always)]
fn answer<R>(
    result: &JsonResult,
    f: impl FnOnce(Result<Option<&str>, PluginFailure<'_>>) -> R,
) -> R {
    match result {
        ROk(RSome(json)) => match plugin_text(json.as_rstr()) {
            Ok(json) => f(Ok(Some(json))),
            Err(e) => f(Err(PluginFailure::NotUtf8(e))),
        },
        ROk(RNone) => f(Ok(None)),
        RErr(e) => f(Err(PluginFailure::Reported(
            e.kind,
            &plugin_message(e.message.as_rstr()),
        ))),
    }
}

fn owned(e: CallError) -> PluginError {
    PluginError {
        kind: e.kind,
        message: plugin_message(e.message.as_rstr()).into_owned(),
    }
}

/// Reads the header of an opened library and checks it; returns the function table.
///
/// The header is found at the library's load address plus the symbol's address the pre-check
/// read from the file, not through `dlsym` (which runs an IFUNC resolver, and could find a
/// symbol of that name in another library). Every pointer in it must point into the library's
/// own readable segments before it is followed.
///
/// `_library` is the opened library: its segments exist only while it is open.
fn check_header(
    _library: &Library,
    path: &Path,
    location: HeaderLocation,
) -> Result<PluginTableRef, LoadErrorKind> {
    let segments = Segments::of_library(path).ok_or_else(|| LoadErrorKind::NotLoadable {
        reason: format!(
            "the dynamic loader opened {} but does not list it among the loaded objects",
            EscapePath(path)
        ),
    })?;
    let address = usize::try_from(location.vaddr())
        .ok()
        .and_then(|vaddr| segments.base.checked_add(vaddr))
        .filter(|&a| {
            segments.contains(a, std::mem::size_of::<PluginHeader>())
                && a % std::mem::align_of::<PluginHeader>() == 0
        })
        .ok_or(LoadErrorKind::BadHeaderPointer {
            field: "PLUGIN_HOST_HEADER",
            address: location.vaddr() as usize,
        })?;
    let header = address as *const PluginHeader;
    // SAFETY: `header` is aligned and the whole header lies in a readable segment of the
    // library, which is open; the magic bytes are plain bytes, valid for any content.
    let magic = unsafe { std::ptr::addr_of!((*header).magic).read_unaligned() };
    if magic != MAGIC {
        return Err(LoadErrorKind::BadMagic);
    }
    // SAFETY: the magic matched, so this is a plugin-api header, whose first two fields have
    // been frozen since header version 1.
    let version = unsafe { std::ptr::addr_of!((*header).header_version).read_unaligned() };
    if version != HEADER_VERSION {
        return Err(LoadErrorKind::HeaderVersion {
            found: version,
            supported: HEADER_VERSION,
        });
    }
    // The pointers are read as plain addresses (any value is a valid `usize`) and checked
    // before the header is read as a `PluginHeader`, whose reference field must be valid.
    // SAFETY: the whole header is readable (checked above); the field is read unaligned as an
    // address.
    let layout = unsafe {
        std::ptr::addr_of!((*header).table_layout)
            .cast::<usize>()
            .read_unaligned()
    };
    if layout % std::mem::align_of::<TypeLayout>() != 0
        || !segments.contains(layout, std::mem::size_of::<TypeLayout>())
    {
        return Err(LoadErrorKind::BadHeaderPointer {
            field: "table_layout",
            address: layout,
        });
    }
    // SAFETY: as for `table_layout` above.
    let table = unsafe {
        std::ptr::addr_of!((*header).table)
            .cast::<usize>()
            .read_unaligned()
    };
    // Only the start is checked: the table's size depends on the plugin-api version the plugin
    // was built with, and the prefix-type accessors read only the fields its layout declares.
    if table % std::mem::align_of::<usize>() != 0
        || !segments.contains(table, std::mem::size_of::<usize>())
    {
        return Err(LoadErrorKind::BadHeaderPointer {
            field: "table",
            address: table,
        });
    }
    // SAFETY: magic and version match and both pointers point into the library's own
    // segments, so the symbol is a complete `PluginHeader` of this very layout, a `static`
    // that lives as long as the library.
    let header = unsafe { &*header };
    if !header.panic_unwind {
        return Err(LoadErrorKind::PanicAbort);
    }
    if !header.abi.is_compatible(&AbiHeader::VALUE) {
        return Err(LoadErrorKind::AbiStableMismatch {
            plugin: format!("{}.{}", header.abi.abi_major, header.abi.abi_minor),
            host: format!(
                "{}.{}",
                AbiHeader::VALUE.abi_major,
                AbiHeader::VALUE.abi_minor
            ),
        });
    }
    crate::layout::check_table_layout(header.table_layout)?;
    // SAFETY: every check passed: `table` points to the plugin's `WithMetadata<PluginTable>`
    // whose layout abi_stable just proved compatible with ours; its prefix accessors check at
    // run time which of the later fields it has.
    let prefix = unsafe { PrefixRef::from_raw(header.table.cast::<WithMetadata<PluginTable>>()) };
    Ok(PluginTableRef(prefix))
}

/// The entries of a plugin's function table, reached only through these wrappers. The entries
/// are `extern "C"` function pointers that Rust lets anyone call; what makes a call sound is
/// stated here, once per entry, and promised at each call site.
mod table {
    use abi_stable::std_types::{RResult, RStr, RString};
    use plugin_api::abi::{
        CallError, HostApiRef, HostContext, InstanceHandle, JsonResult, PluginTableRef,
    };

    /// The plugin's manifest as JSON text.
    ///
    /// # Safety
    ///
    /// The library `table` came from is open for the whole call.
    pub(super) unsafe fn manifest(table: PluginTableRef) -> RResult<RString, CallError> {
        (table.manifest())()
    }

    /// Creates the plugin's instance.
    ///
    /// # Safety
    ///
    /// The library `table` came from is open for the whole call, and the object `context`
    /// points to stays alive (and at that address) until the library is closed: the plugin may
    /// keep it and pass it to the host's callbacks from any thread.
    pub(super) unsafe fn create(
        table: PluginTableRef,
        config: RStr<'_>,
        max_log_level: u8,
        host: HostApiRef,
        context: HostContext,
    ) -> RResult<InstanceHandle, CallError> {
        (table.create())(config, max_log_level, host, context)
    }

    /// Calls a method of the instance.
    ///
    /// # Safety
    ///
    /// The library `table` came from is open for the whole call and for as long as the answer
    /// lives (the answer is freed by the plugin's code); `instance` was returned by this
    /// table's `create` and has not been passed to `destroy`.
    pub(super) unsafe fn execute(
        table: PluginTableRef,
        instance: InstanceHandle,
        method: RStr<'_>,
        params: RStr<'_>,
    ) -> JsonResult {
        (table.execute())(instance, method, params)
    }

    /// Calls the method at `index` of the manifest's list, named `method`; by name when the
    /// table predates `execute_at` (version 5 and older).
    ///
    /// # Safety
    ///
    /// As for [`execute`].
    #[inline]
    pub(super) unsafe fn execute_at(
        table: PluginTableRef,
        instance: InstanceHandle,
        index: u32,
        method: RStr<'_>,
        params: RStr<'_>,
    ) -> JsonResult {
        match table.execute_at() {
            Some(execute_at) => execute_at(instance, index, method, params),
            None => (table.execute())(instance, method, params),
        }
    }

    /// Runs the instance's handler for a hook; `None` when the table predates hooks.
    ///
    /// # Safety
    ///
    /// As for [`execute`].
    pub(super) unsafe fn on_hook(
        table: PluginTableRef,
        instance: InstanceHandle,
        hook: RStr<'_>,
        payload: RStr<'_>,
    ) -> Option<JsonResult> {
        table
            .on_hook()
            .map(|on_hook| on_hook(instance, hook, payload))
    }

    /// The instance's saved state; `None` when the table predates state.
    ///
    /// # Safety
    ///
    /// As for [`execute`].
    pub(super) unsafe fn save_state(
        table: PluginTableRef,
        instance: InstanceHandle,
    ) -> Option<JsonResult> {
        table.save_state().map(|save| save(instance))
    }

    /// Gives the instance a saved state; `None` when the table predates state.
    ///
    /// # Safety
    ///
    /// As for [`execute`].
    pub(super) unsafe fn restore_state(
        table: PluginTableRef,
        instance: InstanceHandle,
        state: RStr<'_>,
    ) -> Option<RResult<(), CallError>> {
        table
            .restore_state()
            .map(|restore| restore(instance, state))
    }

    /// Hands over the store additions the instance holds; `None` when the table predates
    /// the entry (version 6 and older).
    ///
    /// # Safety
    ///
    /// As for [`execute`].
    pub(super) unsafe fn store_hand_over(
        table: PluginTableRef,
        instance: InstanceHandle,
    ) -> Option<RResult<(), CallError>> {
        table.store_hand_over().map(|hand_over| hand_over(instance))
    }

    /// Destroys the instance.
    ///
    /// # Safety
    ///
    /// As for [`execute`], and no call on `instance` is in flight or will be made: `instance`
    /// is destroyed exactly once.
    pub(super) unsafe fn destroy(table: PluginTableRef, instance: InstanceHandle) {
        (table.destroy())(instance);
    }
}
