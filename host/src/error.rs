//! Errors callers branch on: why a file was refused, why a call answered nothing.

use std::fmt;
use std::path::PathBuf;

use crate::text::EscapeControl;

/// Why a plugin file was refused. Every message says what to do about it.
///
/// Load functions return `anyhow::Error` whose context names the file; reach this with
/// `err.downcast_ref::<LoadError>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    /// The file does not exist (any more).
    NotFound,
    /// The file is empty.
    Empty,
    /// The file is not an ELF shared object.
    NotSharedLibrary {
        /// What was found instead.
        reason: String,
    },
    /// The file is shorter than its ELF headers say: still being written, or cut off.
    Truncated {
        /// Length the headers promise.
        expected: u64,
        /// Length on disk.
        actual: u64,
    },
    /// The dynamic loader refused the file.
    NotLoadable {
        /// The loader's message.
        reason: String,
    },
    /// The library does not export the plugin header: it was not built with
    /// `plugin_api::export_plugin!`.
    NoHeader,
    /// The header symbol exists but does not start with the plugin magic bytes.
    BadMagic,
    /// The header is of a version this host does not read.
    HeaderVersion {
        /// The plugin's header version.
        found: u32,
        /// The one this host reads.
        supported: u32,
    },
    /// The plugin was built with `panic = "abort"`: its first panic would kill the worker.
    PanicAbort,
    /// The plugin was built with an incompatible version of abi_stable.
    AbiStableMismatch {
        /// The plugin's abi_stable ABI version.
        plugin: String,
        /// The host's.
        host: String,
    },
    /// The plugin's function table does not match the host's.
    LayoutMismatch {
        /// What differs, as abi_stable reports it.
        details: String,
    },
    /// The plugin's manifest could not be read.
    BadManifest {
        /// Why.
        reason: String,
    },
    /// The plugin is switched off in the configuration file.
    Disabled {
        /// The plugin's name.
        plugin: String,
    },
    /// Another file already provides a plugin of this name.
    DuplicateName {
        /// The plugin's name.
        plugin: String,
        /// The file that provides it.
        loaded_from: PathBuf,
    },
    /// The plugin's `create` returned an error.
    CreateFailed {
        /// The plugin's name.
        plugin: String,
        /// Its message.
        message: String,
    },
    /// The plugin's `create` panicked.
    CreatePanicked {
        /// The plugin's name.
        plugin: String,
        /// The panic message.
        message: String,
    },
    /// The name is not a regular file (a directory, FIFO, socket, device, or a symlink to one).
    NotRegularFile {
        /// What it is.
        kind: String,
    },
    /// The file or its directory can be written by another user (group/other-writable, or
    /// owned by someone other than the worker's user or root).
    InsecurePermissions {
        /// Which path, what is wrong, and the command that fixes it.
        reason: String,
    },
    /// The file is bigger than the configured maximum plugin size.
    TooLarge {
        /// Its size in bytes.
        size: u64,
        /// The maximum in bytes.
        max: u64,
    },
    /// The file exports `PLUGIN_HOST_HEADER`, but not as a plugin header: checked from the
    /// file's bytes, before any of its code ran.
    BadHeaderSymbol {
        /// What is wrong with the symbol.
        reason: String,
    },
    /// A pointer in the plugin header does not point into the library's own mapped segments.
    BadHeaderPointer {
        /// The header field.
        field: &'static str,
        /// The pointer's value.
        address: usize,
    },
    /// The plugin's name is not a valid plugin name.
    InvalidName {
        /// The name, escaped and shortened for display.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Other files in the plugins directory claim the same plugin name; none of them loads.
    NameConflict {
        /// The plugin name.
        plugin: String,
        /// The other files claiming it.
        others: Vec<PathBuf>,
    },
    /// The watcher saw the file written to and not closed since, for longer than it waits.
    StillOpenForWriting {
        /// Seconds since the last write.
        seconds: u64,
    },
    /// The configuration pins the plugin name to another file.
    NamePinned {
        /// The plugin name.
        plugin: String,
        /// The file name the configuration pins it to.
        pinned: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotFound => f.write_str("no such file"),
            LoadError::Empty => f.write_str("the file is empty; rebuild the plugin and copy it again"),
            LoadError::NotSharedLibrary { reason } => write!(
                f,
                "not a shared library ({reason}); only plugin builds (`cargo build` of a cdylib crate) belong in the plugins directory"
            ),
            LoadError::Truncated { expected, actual } => write!(
                f,
                "truncated: {actual} of {expected} bytes; the file is still being written or was cut off, copy it again"
            ),
            LoadError::NotLoadable { reason } => write!(f, "the dynamic loader refused it: {reason}"),
            LoadError::NoHeader => f.write_str(
                "no plugin header symbol `PLUGIN_HOST_HEADER`; build the plugin with `plugin_api::export_plugin!`",
            ),
            LoadError::BadMagic => f.write_str(
                "the plugin header has the wrong magic bytes; this library was not built with plugin-api",
            ),
            LoadError::HeaderVersion { found, supported } => write!(
                f,
                "plugin header version {found}, this host reads version {supported}; rebuild the plugin against this host's plugin-api"
            ),
            LoadError::PanicAbort => f.write_str(
                "built with panic = \"abort\", so any panic would kill the worker; rebuild it with the default panic = \"unwind\"",
            ),
            LoadError::AbiStableMismatch { plugin, host } => write!(
                f,
                "built with abi_stable ABI {plugin}, the host uses {host}; rebuild the plugin against this host's plugin-api"
            ),
            LoadError::LayoutMismatch { details } => write!(
                f,
                "its function table does not match this host's; rebuild the plugin against this host's plugin-api. What differs:\n{}",
                details.trim_end()
            ),
            LoadError::BadManifest { reason } => {
                write!(f, "unreadable plugin manifest: {}", EscapeControl(reason))
            }
            LoadError::Disabled { plugin } => write!(
                f,
                "plugin `{plugin}` is disabled in the configuration file (set \"enabled\": true to load it)"
            ),
            LoadError::DuplicateName { plugin, loaded_from } => write!(
                f,
                "plugin `{plugin}` is already loaded from {}; remove one of the two files",
                loaded_from.display()
            ),
            LoadError::CreateFailed { plugin, message } => write!(
                f,
                "plugin `{}` refused to start: {}",
                EscapeControl(plugin),
                EscapeControl(message)
            ),
            LoadError::CreatePanicked { plugin, message } => write!(
                f,
                "plugin `{}` panicked while starting: {}",
                EscapeControl(plugin),
                EscapeControl(message)
            ),
            LoadError::NotRegularFile { kind } => write!(
                f,
                "not a regular file but {kind}; only plugin builds (regular files) belong in the plugins directory"
            ),
            LoadError::InsecurePermissions { reason } => write!(
                f,
                "{reason} (or start the worker with --insecure-permissions, for development only)"
            ),
            LoadError::TooLarge { size, max } => write!(
                f,
                "{size} bytes, more than the maximum plugin size of {max} bytes; it was not read (raise the limit with --max-plugin-size-mb)"
            ),
            LoadError::BadHeaderSymbol { reason } => write!(
                f,
                "its `PLUGIN_HOST_HEADER` symbol is not a plugin header ({reason}); it was checked before loading and none of its code ran; build the plugin with `plugin_api::export_plugin!`"
            ),
            LoadError::BadHeaderPointer { field, address } => write!(
                f,
                "the plugin header's `{field}` pointer ({address:#x}) does not point into the library itself; the file is corrupt or not built with plugin-api"
            ),
            LoadError::InvalidName { name, reason } => write!(
                f,
                "invalid plugin name {name}: {reason}; a name is 1-64 characters of a-z, 0-9, `-`, `_` and `.`, not starting with `.`"
            ),
            LoadError::NameConflict { plugin, others } => {
                let others: Vec<String> =
                    others.iter().map(|p| p.display().to_string()).collect();
                write!(
                    f,
                    "plugin `{plugin}` is also claimed by {}; neither loads: remove all but one of these files, or pin the name to one file in the configuration (\"plugins\": {{\"{plugin}\": {{\"file\": \"<file name>\"}}}})",
                    others.join(", ")
                )
            }
            LoadError::StillOpenForWriting { seconds } => write!(
                f,
                "written to and still not closed after {seconds} s; it is loaded once its writer closes it (write plugins under a hidden name and rename them into place)"
            ),
            LoadError::NamePinned { plugin, pinned } => write!(
                f,
                "plugin `{plugin}` is pinned to the file {pinned} in the configuration; this file may not provide it (remove it, or change the pin)"
            ),
        }
    }
}

impl std::error::Error for LoadError {}

/// Why a call answered nothing. [`PluginHost::execute`](crate::PluginHost::execute) turns every
/// one of these into `None` plus a log event; [`PluginHost::call`](crate::PluginHost::call)
/// returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// No plugin of that name is loaded.
    PluginNotFound {
        /// The name asked for.
        plugin: String,
    },
    /// The plugin has no such method.
    MethodNotFound {
        /// The plugin.
        plugin: String,
        /// The method asked for.
        method: String,
    },
    /// The params did not fit the method.
    InvalidParams {
        /// The plugin.
        plugin: String,
        /// The method.
        method: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin returned an error.
    Failed {
        /// The plugin.
        plugin: String,
        /// The method.
        method: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin panicked (the panic was caught).
    Panicked {
        /// The plugin.
        plugin: String,
        /// The method.
        method: String,
        /// The panic message.
        message: String,
    },
    /// The plugin answered text that is not JSON.
    InvalidJson {
        /// The plugin.
        plugin: String,
        /// The method.
        method: String,
        /// The parser's message.
        message: String,
    },
    /// The answer is JSON but not of the type the caller asked for.
    WrongType {
        /// The plugin.
        plugin: String,
        /// The method.
        method: String,
        /// The deserializer's message.
        message: String,
    },
}

impl CallError {
    /// True when the call never reached plugin code that misbehaved: the plugin or method does
    /// not exist. These are logged at debug level, the others at warn.
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            CallError::PluginNotFound { .. } | CallError::MethodNotFound { .. }
        )
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::PluginNotFound { plugin } => {
                write!(f, "no plugin `{}` is loaded", EscapeControl(plugin))
            }
            CallError::MethodNotFound { plugin, method } => write!(
                f,
                "plugin `{}` has no method `{}`",
                EscapeControl(plugin),
                EscapeControl(method)
            ),
            CallError::InvalidParams {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{}: invalid params: {}",
                EscapeControl(plugin),
                EscapeControl(method),
                EscapeControl(message)
            ),
            CallError::Failed {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{} failed: {}",
                EscapeControl(plugin),
                EscapeControl(method),
                EscapeControl(message)
            ),
            CallError::Panicked {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{} panicked: {}",
                EscapeControl(plugin),
                EscapeControl(method),
                EscapeControl(message)
            ),
            CallError::InvalidJson {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{} answered invalid JSON: {}",
                EscapeControl(plugin),
                EscapeControl(method),
                EscapeControl(message)
            ),
            CallError::WrongType {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{} answered an unexpected value: {}",
                EscapeControl(plugin),
                EscapeControl(method),
                EscapeControl(message)
            ),
        }
    }
}

impl std::error::Error for CallError {}
