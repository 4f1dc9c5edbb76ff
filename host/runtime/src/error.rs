//! Errors callers branch on: why a file was refused, why a call answered nothing.

use crate::text::EscapePath;
use std::fmt;
use std::path::PathBuf;

use plugin_api::abi::ErrorKind;
pub use smol_str::SmolStr;

use crate::text::EscapeControl;

/// Why a plugin file was refused, as data a caller can match on. Every message says what to do
/// about it. Carried by a [`LoadError`], which names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadErrorKind {
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
    /// The plugin's `create` did not return within the plugin's deadline (`timeoutMs`); it was
    /// abandoned (it goes on in the background, and its instance is dropped if it returns).
    CreateTimedOut {
        /// The plugin's name.
        plugin: String,
        /// The deadline, in milliseconds.
        timeout_ms: u64,
    },
    /// The plugin's `save_state` or `restore_state` did not return within its deadline
    /// (`timeoutMs`) during a load or reload; it was abandoned, and nothing was replaced: on a
    /// reload the old generation keeps serving with its state, on a load the saved state file
    /// stays for the next try.
    StateTimedOut {
        /// The plugin's name.
        plugin: String,
        /// `save_state` or `restore_state`.
        entry: &'static str,
        /// The deadline, in milliseconds.
        timeout_ms: u64,
    },
    /// The plugin is quarantined: a crash record names it as having brought the worker down
    /// (see [`crate::quarantine`]). It stays refused until its records are cleared.
    Quarantined {
        /// The plugin's name.
        plugin: String,
        /// The latest crash, in words (signal or `exit`, and the method).
        reason: String,
        /// The crash-record file: removing the plugin's lines from it clears the quarantine.
        records: PathBuf,
    },
    /// An isolated plugin's process could not be started, refused the file, or ended while
    /// loading it.
    Isolation {
        /// What happened, with the loader's reason when the child refused the file.
        reason: String,
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
    /// Reading the plugins directory failed (a [`PluginHost::scan`](crate::PluginHost::scan)
    /// of a directory that is missing or unreadable).
    DirectoryUnreadable {
        /// The system's message.
        message: String,
    },
    /// No plugin of that name is loaded (a reload of a plugin that is not there).
    NotLoaded {
        /// The plugin name.
        plugin: String,
    },
}

impl fmt::Display for LoadErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadErrorKind::NotFound => f.write_str("no such file"),
            LoadErrorKind::Empty => f.write_str("the file is empty; rebuild the plugin and copy it again"),
            LoadErrorKind::NotSharedLibrary { reason } => write!(
                f,
                "not a shared library ({reason}); only plugin builds (`cargo build` of a cdylib crate) belong in the plugins directory"
            ),
            LoadErrorKind::Truncated { expected, actual } => write!(
                f,
                "truncated: {actual} of {expected} bytes; the file is still being written or was cut off, copy it again"
            ),
            LoadErrorKind::NotLoadable { reason } => write!(f, "the dynamic loader refused it: {reason}"),
            LoadErrorKind::NoHeader => f.write_str(
                "no plugin header symbol `PLUGIN_HOST_HEADER`; build the plugin with `plugin_api::export_plugin!`",
            ),
            LoadErrorKind::BadMagic => f.write_str(
                "the plugin header has the wrong magic bytes; this library was not built with plugin-api",
            ),
            LoadErrorKind::HeaderVersion { found, supported } => write!(
                f,
                "plugin header version {found}, this host reads version {supported}; rebuild the plugin against this host's plugin-api"
            ),
            LoadErrorKind::PanicAbort => f.write_str(
                "built with panic = \"abort\", so any panic would kill the worker; rebuild it with the default panic = \"unwind\"",
            ),
            LoadErrorKind::AbiStableMismatch { plugin, host } => write!(
                f,
                "built with abi_stable ABI {plugin}, the host uses {host}; rebuild the plugin against this host's plugin-api"
            ),
            LoadErrorKind::LayoutMismatch { details } => write!(
                f,
                "its function table does not match this host's; rebuild the plugin against this host's plugin-api. What differs:\n{}",
                details.trim_end()
            ),
            LoadErrorKind::BadManifest { reason } => {
                write!(f, "unreadable plugin manifest: {}", EscapeControl(reason))
            }
            LoadErrorKind::Disabled { plugin } => write!(
                f,
                "plugin `{plugin}` is disabled in the configuration file (set \"enabled\": true to load it)"
            ),
            LoadErrorKind::DuplicateName { plugin, loaded_from } => write!(
                f,
                "plugin `{plugin}` is already loaded from {}; remove one of the two files",
                EscapePath(loaded_from)
            ),
            LoadErrorKind::CreateFailed { plugin, message } => write!(
                f,
                "plugin `{}` refused to start: {}",
                EscapeControl(plugin.as_str()),
                EscapeControl(message)
            ),
            LoadErrorKind::CreatePanicked { plugin, message } => write!(
                f,
                "plugin `{}` panicked while starting: {}",
                EscapeControl(plugin.as_str()),
                EscapeControl(message)
            ),
            LoadErrorKind::Isolation { reason } => write!(
                f,
                "in the plugin's own process (isolation \"process\"): {}",
                EscapeControl(reason)
            ),
            LoadErrorKind::CreateTimedOut { plugin, timeout_ms } => write!(
                f,
                "plugin `{}` did not finish starting within {timeout_ms} ms (its timeoutMs); abandoned: its `create` goes on in the background and the instance is dropped if it ever returns",
                EscapeControl(plugin.as_str())
            ),
            LoadErrorKind::StateTimedOut {
                plugin,
                entry,
                timeout_ms,
            } => write!(
                f,
                "plugin `{}`: its `{entry}` did not return within {timeout_ms} ms (its timeoutMs) and was abandoned; nothing was replaced, so no state is lost (a reload keeps the old generation serving; a load leaves the saved state for the next try)",
                EscapeControl(plugin.as_str())
            ),
            LoadErrorKind::Quarantined {
                plugin,
                reason,
                records,
            } => write!(
                f,
                "plugin `{}` is quarantined: {}; it is not loaded again until its crash records are cleared: `worker quarantine clear {}`, or remove its lines from {}",
                EscapeControl(plugin.as_str()),
                EscapeControl(reason),
                EscapeControl(plugin.as_str()),
                EscapePath(records)
            ),
            LoadErrorKind::NotRegularFile { kind } => write!(
                f,
                "not a regular file but {kind}; only plugin builds (regular files) belong in the plugins directory"
            ),
            LoadErrorKind::InsecurePermissions { reason } => write!(
                f,
                "{reason} (or start the worker with --insecure-permissions, for development only)"
            ),
            LoadErrorKind::TooLarge { size, max } => write!(
                f,
                "{size} bytes, more than the maximum plugin size of {max} bytes; it was not read (raise the limit with --max-plugin-size-mb)"
            ),
            LoadErrorKind::BadHeaderSymbol { reason } => write!(
                f,
                "its `PLUGIN_HOST_HEADER` symbol is not a plugin header ({reason}); it was checked before loading and none of its code ran; build the plugin with `plugin_api::export_plugin!`"
            ),
            LoadErrorKind::BadHeaderPointer { field, address } => write!(
                f,
                "the plugin header's `{field}` pointer ({address:#x}) does not point into the library itself; the file is corrupt or not built with plugin-api"
            ),
            LoadErrorKind::InvalidName { name, reason } => write!(
                f,
                "invalid plugin name {name}: {reason}; a name is 1-64 characters of a-z, 0-9, `-`, `_` and `.`, not starting with `.`"
            ),
            LoadErrorKind::NameConflict { plugin, others } => {
                let others: Vec<String> =
                    others.iter().map(|p| EscapePath(p).to_string()).collect();
                write!(
                    f,
                    "plugin `{plugin}` is also claimed by {}; neither loads: remove all but one of these files, or pin the name to one file in the configuration (\"plugins\": {{\"{plugin}\": {{\"file\": \"<file name>\"}}}})",
                    others.join(", ")
                )
            }
            LoadErrorKind::StillOpenForWriting { seconds } => write!(
                f,
                "written to and still not closed after {seconds} s; it is loaded once its writer closes it (write plugins under a hidden name and rename them into place)"
            ),
            LoadErrorKind::NamePinned { plugin, pinned } => write!(
                f,
                "plugin `{plugin}` is pinned to the file {pinned} in the configuration; this file may not provide it (remove it, or change the pin)"
            ),
            LoadErrorKind::DirectoryUnreadable { message } => write!(
                f,
                "{message}; create it or point to another with --plugins DIR"
            ),
            LoadErrorKind::NotLoaded { plugin } => {
                write!(f, "no plugin `{}` is loaded", EscapeControl(plugin.as_str()))
            }
        }
    }
}

impl std::error::Error for LoadErrorKind {}

/// A plugin file refused by [`PluginHost::load`](crate::PluginHost::load),
/// [`scan`](crate::PluginHost::scan) or [`reload`](crate::PluginHost::reload): the file, why
/// ([`kind`](Self::kind), to match on), and what was being done. A [`Refusal`](crate::Refusal)
/// listed by the host is this same error.
///
/// ```no_run
/// use plugin_host::{LoadErrorKind, PluginHost};
///
/// let host = PluginHost::builder("plugins").build()?;
/// match host.load("plugins/libecho.so") {
///     Ok(plugin) => println!("loaded {}", plugin.name),
///     Err(e) if matches!(e.kind, LoadErrorKind::Disabled { .. }) => println!("disabled"),
///     Err(e) => eprintln!("{} refused: {e}", e.file.display()),
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadError {
    /// The plugin file (the plugins directory for [`LoadErrorKind::DirectoryUnreadable`],
    /// empty for [`LoadErrorKind::NotLoaded`]).
    pub file: PathBuf,
    /// Why it was refused.
    pub kind: LoadErrorKind,
    /// What was being done when it is more than loading the file: a reload names the plugin
    /// and the generation that keeps serving.
    pub during: Option<String>,
}

impl LoadError {
    /// `file` refused for `kind`, while loading it.
    pub(crate) fn new(file: impl Into<PathBuf>, kind: LoadErrorKind) -> Self {
        LoadError {
            file: file.into(),
            kind,
            during: None,
        }
    }

    /// The same error, while doing `during`.
    pub(crate) fn during(mut self, during: String) -> Self {
        self.during = Some(during);
        self
    }

    /// The whole message: the file, what was being done, the reason and what to do.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            LoadErrorKind::NotLoaded { plugin } => {
                return write!(
                    f,
                    "cannot {} `{}`: no plugin of that name is loaded",
                    self.during.as_deref().unwrap_or("reload"),
                    EscapeControl(plugin.as_str())
                );
            }
            LoadErrorKind::DirectoryUnreadable { .. } => {
                return write!(
                    f,
                    "reading the plugins directory {}: {}",
                    EscapePath(&self.file),
                    self.kind
                );
            }
            _ => {}
        }
        if let Some(during) = &self.during {
            write!(f, "{during}: ")?;
        }
        write!(
            f,
            "loading plugin file {}: {}",
            EscapePath(&self.file),
            self.kind
        )
    }
}

impl std::error::Error for LoadError {}

/// Listed as `{"file", "reason"}` (`worker list --json`, the control API).
impl serde::Serialize for LoadError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut refusal = serializer.serialize_struct("Refusal", 2)?;
        refusal.serialize_field("file", &self.file)?;
        refusal.serialize_field("reason", &self.reason())?;
        refusal.end()
    }
}

/// What a plugin reported when one of its functions failed: the error it returned, or a panic
/// caught at the boundary. The plugin-side form of this is the frozen ABI type
/// [`plugin_api::abi::CallError`]; this is the host's owned copy of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The plugin's message (bytes that were not UTF-8 replaced by U+FFFD).
    pub message: String,
}

impl PluginError {
    /// A failure of kind [`ErrorKind::Failed`].
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Failed,
            message: message.into(),
        }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Panicked => write!(f, "panicked: {}", EscapeControl(&self.message)),
            _ => EscapeControl(&self.message).fmt(f),
        }
    }
}

impl std::error::Error for PluginError {}

/// Why a call answered nothing. [`PluginHost::execute`](crate::PluginHost::execute) turns every
/// one of these into `None` plus a log event; [`PluginHost::call`](crate::PluginHost::call)
/// returns them.
///
/// The plugin and method names are [`SmolStr`]s: names up to 23 bytes are held inline, so an
/// error for a plugin that is not loaded (the common case when calling optional plugins) is
/// made and dropped without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PluginCallError {
    /// No plugin of that name is loaded.
    PluginNotFound {
        /// The name asked for.
        plugin: SmolStr,
    },
    /// The plugin has no such method.
    MethodNotFound {
        /// The plugin.
        plugin: SmolStr,
        /// The method asked for.
        method: SmolStr,
    },
    /// The params did not fit the method.
    InvalidParams {
        /// The plugin.
        plugin: SmolStr,
        /// The method.
        method: SmolStr,
        /// The plugin's message.
        message: String,
    },
    /// The plugin returned an error.
    Failed {
        /// The plugin.
        plugin: SmolStr,
        /// The method.
        method: SmolStr,
        /// The plugin's message.
        message: String,
    },
    /// The plugin panicked (the panic was caught).
    Panicked {
        /// The plugin.
        plugin: SmolStr,
        /// The method.
        method: SmolStr,
        /// The panic message.
        message: String,
    },
    /// The plugin answered text that is not JSON.
    InvalidJson {
        /// The plugin.
        plugin: SmolStr,
        /// The method.
        method: SmolStr,
        /// The parser's message.
        message: String,
    },
    /// The answer is JSON but not of the type the caller asked for.
    WrongType {
        /// The plugin.
        plugin: SmolStr,
        /// The method.
        method: SmolStr,
        /// The deserializer's message.
        message: String,
    },
    /// The plugin's circuit breaker is open (too many failures in a row, or a call past its
    /// deadline): the call was refused without reaching the plugin.
    CircuitOpen {
        /// The plugin.
        plugin: SmolStr,
        /// The method.
        method: SmolStr,
    },
    /// An isolated plugin's process ended (a signal, an exit, out of memory) before it
    /// answered; it is restarted with its last saved state.
    Crashed {
        /// The plugin.
        plugin: SmolStr,
        /// The method.
        method: SmolStr,
    },
    /// An isolated plugin's call overran its deadline: its process was killed and is
    /// restarted.
    TimedOut {
        /// The plugin.
        plugin: SmolStr,
        /// The method.
        method: SmolStr,
    },
}

impl PluginCallError {
    /// The error a plugin sees when its own call to another plugin fails this way.
    pub(crate) fn to_plugin_error(&self) -> PluginError {
        PluginError {
            kind: match self {
                PluginCallError::MethodNotFound { .. } => ErrorKind::UnknownMethod,
                PluginCallError::InvalidParams { .. } => ErrorKind::InvalidParams,
                _ => ErrorKind::Failed,
            },
            message: self.to_string(),
        }
    }

    /// True when the call never reached plugin code that misbehaved: the plugin or method does
    /// not exist. These are logged at debug level, the others at warn.
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            PluginCallError::PluginNotFound { .. } | PluginCallError::MethodNotFound { .. }
        )
    }
}

impl fmt::Display for PluginCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginCallError::PluginNotFound { plugin } => {
                write!(
                    f,
                    "no plugin `{}` is loaded",
                    EscapeControl(plugin.as_str())
                )
            }
            PluginCallError::MethodNotFound { plugin, method } => write!(
                f,
                "plugin `{}` has no method `{}`",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str())
            ),
            PluginCallError::InvalidParams {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{}: invalid params: {}",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str()),
                EscapeControl(message)
            ),
            PluginCallError::Failed {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{} failed: {}",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str()),
                EscapeControl(message)
            ),
            PluginCallError::Panicked {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{} panicked: {}",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str()),
                EscapeControl(message)
            ),
            PluginCallError::InvalidJson {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{} answered invalid JSON: {}",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str()),
                EscapeControl(message)
            ),
            PluginCallError::CircuitOpen { plugin, method } => write!(
                f,
                "{}.{}: circuit open; the call was refused",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str())
            ),
            PluginCallError::Crashed { plugin, method } => write!(
                f,
                "{}.{}: crashed; the plugin's process ended before answering and is restarted",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str())
            ),
            PluginCallError::TimedOut { plugin, method } => write!(
                f,
                "{}.{}: timed out; the plugin's process was killed and is restarted",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str())
            ),
            PluginCallError::WrongType {
                plugin,
                method,
                message,
            } => write!(
                f,
                "{}.{} answered an unexpected value: {}",
                EscapeControl(plugin.as_str()),
                EscapeControl(method.as_str()),
                EscapeControl(message)
            ),
        }
    }
}

impl std::error::Error for PluginCallError {}
