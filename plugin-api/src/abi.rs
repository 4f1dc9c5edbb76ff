//! The binary interface between the host and a plugin library.
//!
//! Plugin authors never touch this module: [`export_plugin!`](crate::export_plugin) fills it in.
//! It is public because the host reads it, and because it is the contract: a plugin built
//! against one version of this crate keeps loading in hosts built against later ones.
//!
//! # How a host reads a plugin
//!
//! 1. It looks up the symbol [`HEADER_SYMBOL`], a [`PluginHeader`]. The header's layout is frozen
//!    forever: magic bytes, header version, the plugin's panic strategy, abi_stable's own header,
//!    the layout of the function table and a pointer to it.
//! 2. It checks, in that order: [`MAGIC`], [`HEADER_VERSION`], `panic_unwind`, the abi_stable
//!    header, and finally the table's layout against its own [`PluginTableRef`] layout.
//! 3. Only then it reads the table.
//!
//! # Evolving the table
//!
//! [`PluginTable`] is an abi_stable *prefix type*: fields up to `execute` exist in every plugin;
//! fields after it were added later and are read through accessors that return `None` when the
//! plugin was built before they existed. New capabilities are appended at the end, never
//! inserted, and the host treats a missing one as "the plugin does not do this".

use std::ffi::c_void;

use abi_stable::StableAbi;
use abi_stable::library::AbiHeader;
// `RSlice` only in the tables of version 6 and later.
#[cfg_attr(feature = "__fixture_table_v1", allow(unused_imports))]
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString};
use abi_stable::type_layout::TypeLayout;

/// Name of the exported symbol that holds the [`PluginHeader`].
pub const HEADER_SYMBOL: &str = "PLUGIN_HOST_HEADER";

/// The same name, NUL-terminated, for `dlsym`.
pub const HEADER_SYMBOL_NUL: &[u8] = b"PLUGIN_HOST_HEADER\0";

/// First bytes of every plugin header.
pub const MAGIC: [u8; 8] = *b"PlgHost\x01";

/// Version of the [`PluginHeader`] layout. The header is frozen: this never changes in practice;
/// it exists so that a future, different header can be told apart from this one.
pub const HEADER_VERSION: u32 = 1;

/// The frozen bootstrap header every plugin exports under [`HEADER_SYMBOL`].
///
/// Never change this struct. Evolve [`PluginTable`] instead.
#[repr(C)]
#[derive(Debug)]
pub struct PluginHeader {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// Always [`HEADER_VERSION`] for this layout.
    pub header_version: u32,
    /// `cfg!(panic = "unwind")` in the plugin crate. A plugin built with `panic = "abort"`
    /// would take the whole process down on its first panic, so hosts refuse it.
    pub panic_unwind: bool,
    /// abi_stable's header: its magic string and ABI version.
    pub abi: AbiHeader,
    /// Layout of the plugin's [`PluginTableRef`], checked against the host's before the table is
    /// read.
    pub table_layout: &'static TypeLayout,
    /// Points to the plugin's table (a `WithMetadata<PluginTable>`). Read only after every check
    /// above passed.
    pub table: *const c_void,
}

// `PluginHeader` is `Sync` (it is exported as a `static`): see the crate's `export` module.

/// An opaque pointer to a plugin instance, made by `create` and released by `destroy`.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct InstanceHandle(pub *const c_void);

/// An opaque pointer the host passes to `create` and receives back in every host callback.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct HostContext(pub *const c_void);

/// What kind of failure a [`CallError`] reports.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The plugin's code returned an error.
    Failed = 0,
    /// The plugin has no method of that name.
    UnknownMethod = 1,
    /// The params did not match what the method expects.
    InvalidParams = 2,
    /// The plugin's code panicked; the panic was caught at the boundary.
    Panicked = 3,
}

/// An error crossing the boundary: plain data, owned by the plugin that made it.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct CallError {
    /// What kind of failure this is.
    pub kind: ErrorKind,
    /// A message for people.
    pub message: RString,
}

/// Log levels as they cross the boundary (the numbering of `tracing::Level`, 1 = error).
pub mod level {
    /// Nothing is logged.
    pub const OFF: u8 = 0;
    /// `tracing::Level::ERROR`.
    pub const ERROR: u8 = 1;
    /// `tracing::Level::WARN`.
    pub const WARN: u8 = 2;
    /// `tracing::Level::INFO`.
    pub const INFO: u8 = 3;
    /// `tracing::Level::DEBUG`.
    pub const DEBUG: u8 = 4;
    /// `tracing::Level::TRACE`.
    pub const TRACE: u8 = 5;
}

/// Functions the host offers to a plugin. A prefix type, so it can grow like [`PluginTable`].
#[repr(C)]
#[derive(StableAbi, Debug)]
#[sabi(kind(Prefix(prefix_ref = HostApiRef)))]
#[sabi(missing_field(option))]
pub struct HostApi {
    /// Emits a log event on the host's side, tagged with the plugin's name.
    /// Arguments: the context given at create, a [`level`], the event's target, its message.
    #[sabi(last_prefix_field)]
    pub log: extern "C" fn(HostContext, u8, RStr<'_>, RStr<'_>),
    /// Added with table version 3: calls another plugin through the host (context, plugin,
    /// method, params as JSON text). The answer's strings are the host's.
    pub call: extern "C" fn(HostContext, RStr<'_>, RStr<'_>, RStr<'_>) -> JsonResult,
    /// Added with table version 4: the shared store (context, operation, arguments as JSON
    /// text); the answer is JSON text, `None` when the host has no store. The operations and
    /// their arguments are those of [`crate::store`]. Absent in a host older than the store,
    /// and in plugins built before it, which never call it.
    #[cfg(not(feature = "__fixture_table_v1"))]
    pub store: extern "C" fn(HostContext, RStr<'_>, RStr<'_>) -> JsonResult,
    /// Added with table version 5: the generation of the host's store cache (context): a
    /// number that changes whenever what the cache read from the store changes, 0 without a
    /// store. A plugin keeps what it read while the number is unchanged.
    #[cfg(not(feature = "__fixture_table_v1"))]
    pub store_generation: extern "C" fn(HostContext) -> u64,
    /// Added with table version 6: additions to the shared store handed over in one batch
    /// (context, the batch's bytes), with keys and fields as ids the host gave at their first
    /// use (the store operation `intern`) and deltas as the bits of an `f64`. Each entry is a
    /// byte, 0 (no mark) or 1 (an idempotency mark follows: its length as a `u32` and its
    /// UTF-8 bytes), then the number of rows as a `u32` and the rows, 16 bytes each: key id
    /// and field id (`u32`), delta (`f64` bits); all little-endian. The host checks the whole
    /// batch before it adds anything. The answer is empty, or `dup` when a mark of the batch
    /// was already pending in the host (its additions were not added again); `None` without a
    /// store.
    #[cfg(not(feature = "__fixture_table_v1"))]
    pub store_batch: extern "C" fn(HostContext, RSlice<'_, u8>) -> JsonResult,
    /// Added with table version 7: the plugin keeps the additions of the call that just ended
    /// instead of handing them over (context). `true`: the host will ask for them through
    /// [`PluginTable::store_hand_over`] after its next flush (so they reach the store about two
    /// flush intervals after they were made) and when it flushes on request or closes; the
    /// plugin then holds them until asked, until they reach 16 kB, until it reads a key it has
    /// no copy of, or until its state is saved or it is destroyed. `false`: hand them over now.
    #[cfg(not(any(feature = "__fixture_table_v1", feature = "__fixture_table_v6")))]
    pub store_hold: extern "C" fn(HostContext) -> bool,
}

/// What `execute` and `save_state` answer: an optional JSON text, or an error.
pub type JsonResult = RResult<ROption<RString>, CallError>;

/// The plugin's function table.
#[repr(C)]
#[derive(StableAbi, Debug)]
#[sabi(kind(Prefix(prefix_ref = PluginTableRef)))]
#[sabi(missing_field(option))]
pub struct PluginTable {
    /// The plugin's manifest as JSON (see `Manifest`). Callable before `create`.
    pub manifest: extern "C" fn() -> RResult<RString, CallError>,
    /// Makes the instance. Arguments: the plugin's configuration as JSON text (empty for none),
    /// the host's maximum log level, the host's functions and the context to pass back to them.
    pub create:
        extern "C" fn(RStr<'_>, u8, HostApiRef, HostContext) -> RResult<InstanceHandle, CallError>,
    /// Releases the instance. The host calls it once, when no call is in flight.
    pub destroy: extern "C" fn(InstanceHandle),
    /// Calls a method: instance, method name, params as JSON text (empty for none).
    #[cfg(not(feature = "__fixture_table_incompatible"))]
    #[sabi(last_prefix_field)]
    pub execute: extern "C" fn(InstanceHandle, RStr<'_>, RStr<'_>) -> JsonResult,
    /// Test-only: an `execute` whose params changed type, which no host accepts.
    #[cfg(feature = "__fixture_table_incompatible")]
    #[sabi(last_prefix_field)]
    pub execute: extern "C" fn(InstanceHandle, RStr<'_>, u64) -> JsonResult,
    /// Added in table version 2: the instance's state as JSON, to carry across a reload.
    #[cfg(not(feature = "__fixture_table_v1"))]
    pub save_state: extern "C" fn(InstanceHandle) -> JsonResult,
    /// Added in table version 2: gives a new instance the state its predecessor saved.
    #[cfg(not(feature = "__fixture_table_v1"))]
    pub restore_state: extern "C" fn(InstanceHandle, RStr<'_>) -> RResult<(), CallError>,
    /// Added in table version 3: runs the plugin's handler for a hook point (instance, hook
    /// name, payload as JSON text). `None` means "continue"; otherwise a JSON object
    /// `{"modify": {...}}` or `{"block": {"reason": "...", "code": "..."}}`.
    #[cfg(not(feature = "__fixture_table_v1"))]
    pub on_hook: extern "C" fn(InstanceHandle, RStr<'_>, RStr<'_>) -> JsonResult,
    /// Added in table version 6: calls the method at `index` in the manifest's list of
    /// methods (instance, index, method name, params as JSON text), skipping the lookup by
    /// name. The name is checked against the entry at `index`; when they differ (or the index
    /// is past the end) the method is found by name, as [`execute`](Self::execute) does.
    #[cfg(not(feature = "__fixture_table_v1"))]
    pub execute_at: extern "C" fn(InstanceHandle, u32, RStr<'_>, RStr<'_>) -> JsonResult,
    /// Added in table version 7: hands the store additions the plugin holds (see
    /// [`HostApi::store_hold`]) to the host now (instance). The host calls it from a thread of
    /// its own, at most once at a time, while the instance is alive.
    #[cfg(not(any(feature = "__fixture_table_v1", feature = "__fixture_table_v6")))]
    pub store_hand_over: extern "C" fn(InstanceHandle) -> RResult<(), CallError>,
}
