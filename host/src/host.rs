//! [`PluginHost`]: loads plugins, keeps the registry, dispatches calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context as _, anyhow};
use arc_swap::ArcSwap;
use plugin_api::Manifest;
use plugin_api::abi::ErrorKind;
use rustc_hash::FxHashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::{CONFIG_FILE_NAME, PluginSettings, PluginsConfig};
use crate::dylib::{PluginFailure, PluginLibrary};
use crate::error::{CallError, LoadError};
use crate::hooks::HookPoint;
use crate::loader;
use crate::state::StateStore;
use crate::stats::{Outcome, PluginStats, StatsCell};
use crate::text::EscapeControl;

mod dispatch;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use dispatch::apply_patch;

pub use dispatch::HookSession;

/// One loaded generation of a plugin.
#[derive(Debug)]
struct Generation {
    manifest: Manifest,
    file: PathBuf,
    /// The file as it was when this generation was copied from it.
    stamp: Option<loader::FileStamp>,
    number: u64,
    /// Dropped last of all: destroying the instance and closing the library.
    library: PluginLibrary,
}

/// A generation opened and checked, its manifest read; not created yet.
#[derive(Debug)]
struct Opened {
    manifest: Manifest,
    file: PathBuf,
    stamp: Option<loader::FileStamp>,
    number: u64,
    library: PluginLibrary,
}

/// Longest plugin name accepted.
const MAX_NAME_LEN: usize = 64;

/// Checks a plugin's name: 1-64 characters of `a-z`, `0-9`, `-`, `_`, `.`, not starting with
/// `.`. Names become file names (state files), log fields and URL path segments, so nothing
/// else is accepted.
fn validate_name(name: &str) -> Result<(), LoadError> {
    let reason = if name.is_empty() {
        Some("it is empty".to_owned())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "it is {} bytes long, the limit is {MAX_NAME_LEN}",
            name.len()
        ))
    } else if name.starts_with('.') {
        Some("it starts with `.`".to_owned())
    } else {
        name.chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
            .map(|c| format!("it contains {:?}", c))
    };
    match reason {
        None => Ok(()),
        Some(reason) => {
            // Shown escaped and shortened: the name is the plugin's, and may hold anything.
            let mut shown: String = name.chars().take(MAX_NAME_LEN).collect();
            if shown.len() < name.len() {
                shown.push_str("...");
            }
            Err(LoadError::InvalidName {
                name: format!("{shown:?}"),
                reason,
            })
        }
    }
}

/// A plugin name's place in the registry: a reload replaces the generation, the statistics stay.
#[derive(Debug, Clone)]
struct Slot {
    generation: Arc<Generation>,
    stats: Arc<StatsCell>,
    load_order: u64,
}

/// Plugins by name.
type Plugins = FxHashMap<Box<str>, Slot>;

/// The plugins and the hook subscribers built from them. Replaced as a whole (copy on write) by
/// load, unload, reload and hook registration, so a call or a hook dispatch needs one atomic load
/// to reach everything it runs, and holding that snapshot holds those generations alive.
#[derive(Debug, Default)]
struct Registry {
    plugins: Plugins,
    hooks: dispatch::HookTable,
}

impl std::ops::Deref for Registry {
    type Target = Plugins;

    fn deref(&self) -> &Plugins {
        &self.plugins
    }
}

#[derive(Debug)]
struct Inner {
    plugins_dir: PathBuf,
    shadow_dir: PathBuf,
    remove_shadow_dir: bool,
    config_file: PathBuf,
    file_policy: loader::FilePolicy,
    config: ArcSwap<PluginsConfig>,
    state: Option<StateStore>,
    overrides: BTreeMap<String, PluginSettings>,
    registry: ArcSwap<Registry>,
    /// One bit per loaded plugin name (a 64-bit Bloom filter): a call to a plugin whose bit is
    /// clear answers "missing" without touching the registry. Calls to optional plugins that
    /// are not installed are the common case this makes nearly free.
    names: AtomicU64,
    /// Hooks registered from Rust, by id.
    host_hooks: Mutex<BTreeMap<u64, dispatch::HostHook>>,
    next_hook_id: AtomicU64,
    fire_queue: dispatch::FireQueue,
    /// `None` when calls are not timed.
    clock: Option<quanta::Clock>,
    refused: Mutex<Vec<Refusal>>,
    next_generation: AtomicU64,
    /// Serializes load, unload, reload and scan. Never held during a plugin call other than
    /// the create/destroy/state calls those operations make.
    admin: Mutex<()>,
}

/// Builds a [`PluginHost`].
///
/// # Examples
///
/// ```no_run
/// use host::PluginHost;
/// use serde_json::json;
///
/// let host = PluginHost::builder("plugins")
///     .with_plugin_config("experiment", json!({"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}}))
///     .build()?;
/// let report = host.scan()?;
/// for refusal in &report.refused {
///     eprintln!("{}: {}", refusal.file.display(), refusal.reason);
/// }
/// let variant = host.execute_or("experiment", "pickVariant", &json!({"experiment": "tone"}), "A".to_owned());
/// # let _ = variant;
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PluginHostBuilder {
    plugins_dir: PathBuf,
    shadow_dir: Option<PathBuf>,
    config_file: Option<PathBuf>,
    overrides: BTreeMap<String, PluginSettings>,
    call_timing: bool,
    state_dir: Option<PathBuf>,
    fire_and_forget_capacity: usize,
    file_policy: loader::FilePolicy,
}

impl PluginHostBuilder {
    /// Whether every call is timed for the latency statistics (the default). Timing reads the
    /// CPU's cycle counter twice per call (about 20 ns); switch it off where every nanosecond of
    /// the host's overhead counts. Call, error and panic counts are kept either way.
    pub fn with_call_timing(mut self, enabled: bool) -> Self {
        self.call_timing = enabled;
        self
    }

    /// Uses `dir` as the private directory for shadow copies instead of a fresh one under the
    /// system's temporary directory (`plugin-host-<pid>-<random>`, created new with mode 0700,
    /// removed when the host is dropped). The host writes `<stem>.<pid>.<generation>.so` files
    /// there (each created new, never through a symlink) and deletes each when its generation
    /// is unloaded. `dir` is created if missing; it must be a directory (not a symlink) owned by
    /// the worker's user, and writable by nobody else.
    pub fn with_shadow_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shadow_dir = Some(dir.into());
        self
    }

    /// Largest plugin file accepted, in bytes (default 256 MiB). A bigger file is refused
    /// without being read or copied.
    pub fn with_max_plugin_size(mut self, bytes: u64) -> Self {
        self.file_policy.max_size = bytes;
        self
    }

    /// Whether plugin files and the plugins directory may be writable by group or others, or
    /// owned by a user other than the worker's or root (default `false`: such files are
    /// refused, as sshd's StrictModes refuses keys). `true` turns each refusal into a warning;
    /// for development setups only, since any user who can write a plugin runs code as the
    /// worker.
    pub fn with_insecure_permissions(mut self, allowed: bool) -> Self {
        self.file_policy.insecure_permissions = allowed;
        self
    }

    /// Capacity of the queue of `fire_and_forget` hook events (default 1024). When it is full,
    /// new events are dropped for those subscribers, with a counted warning.
    pub fn with_fire_and_forget_capacity(mut self, capacity: usize) -> Self {
        self.fire_and_forget_capacity = capacity.max(1);
        self
    }

    /// Keeps plugin state in `dir` (created if missing): a plugin's state is saved there when it
    /// is unloaded (including [`PluginHost::shutdown`]) and restored into it when it is loaded
    /// again, in this process or the next. One `<plugin>.json` per plugin, written atomically;
    /// an unreadable file is moved aside and the plugin starts fresh.
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Reads the plugin configuration from `file` instead of `plugins.json` in the plugins
    /// directory.
    pub fn with_config_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.config_file = Some(file.into());
        self
    }

    /// Gives `plugin` this configuration, over whatever the file says.
    pub fn with_plugin_config(mut self, plugin: impl Into<String>, config: Value) -> Self {
        self.overrides.entry(plugin.into()).or_default().config = config;
        self
    }

    /// Enables or disables `plugin`, over whatever the file says.
    pub fn with_plugin_enabled(mut self, plugin: impl Into<String>, enabled: bool) -> Self {
        self.overrides.entry(plugin.into()).or_default().enabled = enabled;
        self
    }

    /// Reads the configuration file and prepares the shadow directory. Loads nothing yet: call
    /// [`PluginHost::scan`] or [`PluginHost::load`].
    ///
    /// # Errors
    ///
    /// The configuration file is invalid, or the shadow directory cannot be created.
    pub fn build(self) -> anyhow::Result<PluginHost> {
        let config_file = self
            .config_file
            .unwrap_or_else(|| self.plugins_dir.join(CONFIG_FILE_NAME));
        let config = PluginsConfig::read(&config_file)?;
        let state = self.state_dir.map(StateStore::new).transpose()?;
        let (shadow_dir, remove_shadow_dir) = match self.shadow_dir {
            Some(dir) => {
                use_given_shadow_dir(&dir)
                    .with_context(|| format!("preparing the shadow directory {}", dir.display()))?;
                (dir, false)
            }
            None => {
                let temp = std::env::temp_dir();
                remove_stale_shadow_dirs(&temp);
                let dir = create_shadow_dir(&temp).with_context(|| {
                    format!("creating a shadow directory in {}", temp.display())
                })?;
                (dir, true)
            }
        };
        Ok(PluginHost {
            inner: Arc::new(Inner {
                plugins_dir: self.plugins_dir,
                shadow_dir,
                remove_shadow_dir,
                config_file,
                file_policy: self.file_policy,
                config: ArcSwap::from_pointee(config),
                state,
                overrides: self.overrides,
                registry: ArcSwap::from_pointee(Registry::default()),
                names: AtomicU64::new(0),
                host_hooks: Mutex::new(BTreeMap::new()),
                next_hook_id: AtomicU64::new(1),
                fire_queue: dispatch::FireQueue::start(self.fire_and_forget_capacity)?,
                clock: self.call_timing.then(clock),
                refused: Mutex::new(Vec::new()),
                next_generation: AtomicU64::new(1),
                admin: Mutex::new(()),
            }),
        })
    }
}

/// Prefix of the default shadow directories: `plugin-host-<pid>-<random>`.
const SHADOW_DIR_PREFIX: &str = "plugin-host-";
/// Length of the random part of a default shadow directory's name.
const SHADOW_DIR_RANDOM: usize = 12;

/// Creates a new shadow directory in `temp` as `mkdtemp` does: a name nobody can guess
/// (`plugin-host-<pid>-<12 random characters>`), created with mode 0700 and failing if anything
/// of that name exists, so another user can neither prepare it nor plant links in it. Owner and
/// mode are checked again after creating.
fn create_shadow_dir(temp: &Path) -> anyhow::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{SHADOW_DIR_PREFIX}{}-", std::process::id()))
        .rand_bytes(SHADOW_DIR_RANDOM)
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in(temp)?
        // Removed by the host when it drops (only when empty: a library still mapped keeps
        // its copy).
        .keep();
    check_private_dir(&dir, true)?;
    Ok(dir)
}

/// Checks that `dir` is a real directory (not a symlink) owned by the worker's user and
/// writable by nobody else; with `exact`, that its mode is exactly 0700.
fn check_private_dir(dir: &Path, exact: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::symlink_metadata(dir)?;
    let euid = crate::dylib::effective_uid();
    if !metadata.file_type().is_dir() {
        anyhow::bail!(
            "{} is not a directory (a symlink is not accepted)",
            dir.display()
        );
    }
    if metadata.uid() != euid {
        anyhow::bail!(
            "{} is owned by uid {}, not by the worker's user (uid {euid}); use a directory of your own",
            dir.display(),
            metadata.uid()
        );
    }
    let mode = metadata.mode() & 0o7777;
    if (exact && mode != 0o700) || mode & 0o022 != 0 {
        anyhow::bail!(
            "{} has mode {mode:04o}; a shadow directory must be writable by its owner only (run `chmod 700 {}`)",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Prepares a shadow directory the embedder chose: created (mode 0700) if missing, then
/// checked as [`check_private_dir`] does.
fn use_given_shadow_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Err(e) => return Err(e.into()),
    }
    check_private_dir(dir, false)
}

/// Whether `name` is exactly a default shadow directory's name; returns the pid it encodes.
fn shadow_dir_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(SHADOW_DIR_PREFIX)?;
    let (pid, random) = rest.split_once('-')?;
    let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    let random_ok =
        random.len() == SHADOW_DIR_RANDOM && random.bytes().all(|b| b.is_ascii_alphanumeric());
    if !(digits && random_ok) {
        return None;
    }
    pid.parse().ok()
}

/// Removes the default shadow directories of processes that no longer run: a host killed
/// before it could clean up leaves its copies behind. Only directories whose name matches
/// exactly (`plugin-host-<pid>-<random>`), that are real directories (not symlinks) owned by
/// this user with mode 0700, as this host creates them, and whose process is gone. A pid that
/// was reused by another process keeps its directory, which is the safe mistake.
fn remove_stale_shadow_dirs(temp: &Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(shadow_dir_pid) else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        if let Err(e) = check_private_dir(&path, true) {
            tracing::debug!(dir = %path.display(), reason = %e, "not a shadow directory of ours; left alone");
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed the shadow copies of a process that is gone")
            }
            Err(e) => {
                tracing::debug!(dir = %path.display(), error = %e, "could not remove a stale shadow directory")
            }
        }
    }
}

/// The process's calibrated cycle-counter clock (calibrated once, in well under a millisecond).
fn clock() -> quanta::Clock {
    static CLOCK: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new).clone()
}

/// The plugin host: loads plugins from a directory and calls them.
///
/// Cheap to clone (clones share one host) and safe to use from many threads: calls take no
/// lock; [`load`](Self::load), [`unload`](Self::unload) and [`reload`](Self::reload) may run
/// while other threads call. Every call holds the generation it reached alive until it returns;
/// an unloaded or replaced generation is destroyed, closed and its shadow copy deleted when its
/// last call returns.
///
/// When the last clone is dropped, plugins are unloaded in reverse load order.
#[derive(Debug, Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
}

/// A loaded plugin, as [`PluginHost::plugins`] reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadedPlugin {
    /// The plugin's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its one-line description.
    pub description: String,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// The private copy of the file this generation runs from.
    pub shadow_file: PathBuf,
    /// Generation number: grows with every load and reload in this host.
    pub generation: u64,
    /// Its methods with their descriptions.
    pub methods: Vec<plugin_api::MethodInfo>,
    /// The hook points it subscribes to, as it declares them (`worker hooks` shows them after
    /// configuration).
    pub hooks: Vec<plugin_api::HookSubscription>,
    /// plugin-api version it was built with.
    pub api_version: String,
    /// Function table version it was built with.
    pub table_version: u32,
    /// Call statistics since it was first loaded.
    pub stats: PluginStats,
}

/// A file that could not be loaded, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    /// The file.
    pub file: PathBuf,
    /// The reason, with what to do about it.
    pub reason: String,
    /// The reason as data, when it is one of the [`LoadError`]s.
    #[serde(skip)]
    pub error: Option<LoadError>,
}

/// What a [`PluginHost::scan`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScanReport {
    /// Names of the plugins it loaded.
    pub loaded: Vec<String>,
    /// Files it refused.
    pub refused: Vec<Refusal>,
}

/// Why a call failed, before names are attached (kept cheap for the no-op paths).
enum Failure {
    PluginNotFound,
    MethodNotFound,
    Plugin(ErrorKind, String),
    InvalidJson(String),
    /// The answer is JSON of another shape than asked for (message, expected type).
    WrongType(String, &'static str),
}

impl PluginHost {
    /// Starts building a host for the plugins in `plugins_dir`.
    pub fn builder(plugins_dir: impl Into<PathBuf>) -> PluginHostBuilder {
        PluginHostBuilder {
            plugins_dir: plugins_dir.into(),
            shadow_dir: None,
            config_file: None,
            overrides: BTreeMap::new(),
            call_timing: true,
            state_dir: None,
            fire_and_forget_capacity: 1024,
            file_policy: loader::FilePolicy::default(),
        }
    }

    /// The plugins directory.
    pub fn plugins_dir(&self) -> &Path {
        &self.inner.plugins_dir
    }

    /// The directory of shadow copies.
    pub fn shadow_dir(&self) -> &Path {
        &self.inner.shadow_dir
    }

    fn admin(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock leaves no broken invariant behind (the registry is
        // replaced atomically), so a poisoned lock is simply taken over.
        self.inner
            .admin
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn settings(&self, plugin: &str) -> PluginSettings {
        self.settings_in(&self.inner.config.load(), plugin)
    }

    /// Loads every shared library (`*.so`, hidden files excepted) in the plugins directory that
    /// is not loaded yet, in file-name order. A file that fails is reported in the result and
    /// the others load.
    ///
    /// A plugin name claimed by two or more of these files goes to none of them (each is refused,
    /// naming the others), unless the configuration pins the name to one file (`"file"` in the
    /// plugin's settings); a name already loaded stays with the file that has it.
    ///
    /// # Errors
    ///
    /// Only when the directory itself cannot be read.
    pub fn scan(&self) -> anyhow::Result<ScanReport> {
        let dir = &self.inner.plugins_dir;
        std::fs::read_dir(dir).with_context(|| {
            format!(
                "reading the plugins directory {}; create it or point to another with --plugins DIR",
                dir.display()
            )
        })?;
        let files = loader::plugin_files(dir).into_iter().map(|(path, _)| path);
        let mut report = ScanReport::default();
        let mut loaded = Vec::new();
        {
            let _admin = self.admin();
            let mut opened = Vec::new();
            for file in files {
                if self.loaded_from(&file).is_some() {
                    continue;
                }
                let started = Instant::now();
                match self.open_file(&file) {
                    Ok(generation) => opened.push((generation, started)),
                    Err(e) => {
                        self.note_result(&file, Some(&e));
                        report.refused.push(refusal(&file, &e));
                    }
                }
            }
            let mut claims: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
            for (generation, _) in &opened {
                claims
                    .entry(generation.manifest.name.clone())
                    .or_default()
                    .push(generation.file.clone());
            }
            for (generation, started) in opened {
                let name = generation.manifest.name.clone();
                let file = generation.file.clone();
                let claimants = claims.get(&name).map_or(&[][..], Vec::as_slice);
                // A pin settles the claim: `start` refuses every file but the pinned one.
                let result = if claimants.len() > 1 && self.settings(&name).file.is_none() {
                    let others = claimants.iter().filter(|f| **f != file).cloned().collect();
                    Err(anyhow::Error::new(LoadError::NameConflict {
                        plugin: name,
                        others,
                    })
                    .context(format!("loading plugin file {}", file.display())))
                } else {
                    self.install(generation, started)
                };
                self.note_result(&file, result.as_ref().err());
                match result {
                    Ok(plugin) => {
                        report.loaded.push(plugin.name.clone());
                        loaded.push(plugin);
                    }
                    Err(e) => report.refused.push(refusal(&file, &e)),
                }
            }
        }
        for plugin in &loaded {
            self.fire_lifecycle(HookPoint::PluginLoaded, plugin);
        }
        Ok(report)
    }

    /// The plugin loaded from `file`, if any.
    fn loaded_from(&self, file: &Path) -> Option<String> {
        self.inner
            .registry
            .load()
            .iter()
            .find(|(_, slot)| slot.generation.file == file)
            .map(|(name, _)| name.to_string())
    }

    /// Loads one plugin file.
    ///
    /// # Errors
    ///
    /// The file is refused; the error names the file and the reason, and downcasts to
    /// [`LoadError`]. The refusal is also listed by [`refused`](Self::refused) until the file
    /// loads.
    pub fn load(&self, file: impl AsRef<Path>) -> anyhow::Result<LoadedPlugin> {
        let file = file.as_ref();
        let result = {
            let _admin = self.admin();
            let result = self.load_locked(file);
            self.note_result(file, result.as_ref().err());
            result
        };
        if let Ok(plugin) = &result {
            self.fire_lifecycle(HookPoint::PluginLoaded, plugin);
        }
        result
    }

    /// Fires `plugin.loaded` or `plugin.unloaded` (informational: a block is logged, not
    /// obeyed). Never called with the admin lock held, so subscribers may load and unload.
    fn fire_lifecycle(&self, point: HookPoint, plugin: &LoadedPlugin) {
        let fired = self.fire(point, || {
            serde_json::json!({
                "plugin": plugin.name,
                "version": plugin.version,
                "generation": plugin.generation,
                "file": plugin.file,
            })
        });
        if let Err(violation) = fired {
            tracing::warn!(%violation, "{point} cannot be blocked; ignored");
        }
    }

    fn load_locked(&self, file: &Path) -> anyhow::Result<LoadedPlugin> {
        let started = Instant::now();
        let opened = self.open_file(file)?;
        self.install(opened, started)
    }

    /// Creates an opened generation as a newly loaded plugin and publishes it.
    fn install(&self, opened: Opened, started: Instant) -> anyhow::Result<LoadedPlugin> {
        let file = opened.file.clone();
        let generation = self
            .start(opened, None)
            .with_context(|| format!("loading plugin file {}", file.display()))?;
        let file = file.as_path();
        let name = generation.manifest.name.clone();
        self.restore_saved_state(&name, &generation);
        let registry = self.inner.registry.load();
        let load_order = registry
            .values()
            .map(|slot| slot.load_order + 1)
            .max()
            .unwrap_or(0);
        let slot = Slot {
            generation: Arc::new(generation),
            stats: Arc::default(),
            load_order,
        };
        let mut next = registry.plugins.clone();
        next.insert(name.clone().into_boxed_str(), slot.clone());
        self.publish(next);
        tracing::info!(
            plugin = %name,
            version = %slot.generation.manifest.version,
            generation = slot.generation.number,
            file = %file.display(),
            took_us = started.elapsed().as_micros(),
            "plugin loaded"
        );
        Ok(self.describe(&name, &slot))
    }

    /// Copies, checks, opens and creates one generation of `file`. `replacing` is the name the
    /// file must provide on a reload.
    fn open_generation(&self, file: &Path, replacing: Option<&str>) -> anyhow::Result<Generation> {
        let opened = self.open_file(file)?;
        self.start(opened, replacing)
    }

    /// Checks `file`, copies it to the shadow directory, opens the copy and reads its manifest:
    /// everything up to creating the instance.
    fn open_file(&self, file: &Path) -> anyhow::Result<Opened> {
        self.open_file_inner(file)
            .with_context(|| format!("loading plugin file {}", file.display()))
    }

    fn open_file_inner(&self, file: &Path) -> anyhow::Result<Opened> {
        let number = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        // The checks and the copy see the same bytes, read once from one open descriptor.
        let checked = loader::check_plugin_file(file, self.inner.file_policy)?;
        let stamp = Some(checked.stamp);
        let shadow = loader::shadow_copy(file, &checked, &self.inner.shadow_dir, number)?;
        let header = checked.header;
        drop(checked);
        let library = PluginLibrary::open(shadow, header)?;
        let manifest_json =
            library
                .manifest_json()
                .map_err(|(kind, message)| LoadError::BadManifest {
                    reason: match kind {
                        ErrorKind::Panicked => format!("reading it panicked: {message}"),
                        _ => message,
                    },
                })?;
        let mut manifest: Manifest =
            serde_json::from_str(&manifest_json).map_err(|e| LoadError::BadManifest {
                reason: e.to_string(),
            })?;
        if !manifest.hooks.is_empty() && !library.supports_hooks() {
            tracing::warn!(
                plugin = %manifest.name,
                table_version = manifest.table_version,
                "the plugin lists hook subscriptions but its function table predates hooks; they are ignored (rebuild it against this plugin-api)"
            );
            manifest.hooks.clear();
        }
        validate_name(&manifest.name)?;
        let name = manifest.name.clone();
        for subscription in &manifest.hooks {
            if HookPoint::from_name(&subscription.hook).is_none() {
                let known: Vec<&str> = HookPoint::ALL.iter().map(|p| p.name()).collect();
                tracing::warn!(
                    plugin = %name,
                    hook = %subscription.hook,
                    known = %known.join(", "),
                    "the plugin subscribes to a hook point that does not exist; that subscription will never fire"
                );
            }
        }
        Ok(Opened {
            manifest,
            file: file.to_path_buf(),
            stamp,
            number,
            library,
        })
    }

    /// Creates the instance of an opened generation, once its name may be used: `replacing` is
    /// the name it must provide on a reload; otherwise the name must be free, and the file the
    /// configuration pins it to, if any.
    fn start(&self, opened: Opened, replacing: Option<&str>) -> anyhow::Result<Generation> {
        let Opened {
            manifest,
            file,
            stamp,
            number,
            mut library,
        } = opened;
        let file = file.as_path();
        let name = manifest.name.clone();
        match replacing {
            Some(expected) if expected != name => {
                return Err(LoadError::BadManifest {
                    reason: format!(
                        "the file now provides plugin `{name}`, not `{expected}`; unload `{expected}` first"
                    ),
                }
                .into());
            }
            Some(_) => {}
            None => {
                if let Some(slot) = self.inner.registry.load().get(name.as_str()) {
                    return Err(LoadError::DuplicateName {
                        plugin: name,
                        loaded_from: slot.generation.file.clone(),
                    }
                    .into());
                }
            }
        }
        let settings = self.settings(&name);
        if let Some(pinned) = &settings.file {
            if file.file_name().is_none_or(|n| n != pinned.as_str()) {
                return Err(LoadError::NamePinned {
                    plugin: name,
                    pinned: pinned.clone(),
                }
                .into());
            }
        }
        if !settings.enabled {
            return Err(LoadError::Disabled { plugin: name }.into());
        }
        let config = match &settings.config {
            Value::Null => String::new(),
            config => config.to_string(),
        };
        let call_back = PluginHost::plugin_call_back(Arc::downgrade(&self.inner), name.clone());
        library
            .create(&name, &config, call_back)
            .map_err(|(kind, message)| match kind {
                ErrorKind::Panicked => LoadError::CreatePanicked {
                    plugin: name.clone(),
                    message,
                },
                _ => LoadError::CreateFailed {
                    plugin: name.clone(),
                    message,
                },
            })?;
        Ok(Generation {
            manifest,
            file: file.to_path_buf(),
            stamp,
            number,
            library,
        })
    }

    /// Lists `file` as refused for `error` without trying to load it.
    pub(crate) fn note_refused(&self, file: &Path, error: LoadError) {
        let error =
            anyhow::Error::new(error).context(format!("loading plugin file {}", file.display()));
        self.note_result(file, Some(&error));
    }

    fn note_result(&self, file: &Path, error: Option<&anyhow::Error>) {
        let mut refused = self
            .inner
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        refused.retain(|r| r.file != file);
        if let Some(e) = error {
            let refusal = refusal(file, e);
            tracing::warn!(file = %file.display(), reason = %EscapeControl(&refusal.reason), "plugin file refused");
            refused.push(refusal);
        }
    }

    /// Unloads `plugin`. Calls already in flight finish on it; its generation is destroyed when
    /// the last of them returns.
    ///
    /// # Errors
    ///
    /// No plugin of that name is loaded.
    pub fn unload(&self, plugin: &str) -> anyhow::Result<()> {
        let info = {
            let _admin = self.admin();
            let registry = self.inner.registry.load();
            let Some(slot) = registry.get(plugin).cloned() else {
                return Err(anyhow!(
                    "cannot unload `{plugin}`: no plugin of that name is loaded"
                ));
            };
            let mut next = registry.plugins.clone();
            next.remove(plugin);
            self.publish(next);
            drop(registry);
            let info = self.describe(plugin, &slot);
            self.retire(plugin, slot);
            info
        };
        self.fire_lifecycle(HookPoint::PluginUnloaded, &info);
        Ok(())
    }

    /// Loads `plugin`'s file again as a new generation, carries its state over
    /// ([`plugin_api::Plugin::save_state`] → [`plugin_api::Plugin::restore_state`]), and swaps
    /// it in. Calls never see a gap: they reach the old generation until the swap, the new one
    /// after.
    ///
    /// # Errors
    ///
    /// The plugin is not loaded, or the new file is refused; the old generation keeps serving.
    pub fn reload(&self, plugin: &str) -> anyhow::Result<LoadedPlugin> {
        let reloaded = self.reload_locked(plugin)?;
        self.fire_lifecycle(HookPoint::PluginLoaded, &reloaded);
        Ok(reloaded)
    }

    fn reload_locked(&self, plugin: &str) -> anyhow::Result<LoadedPlugin> {
        let _admin = self.admin();
        let old = self
            .inner
            .registry
            .load()
            .get(plugin)
            .map(|slot| Arc::clone(&slot.generation))
            .ok_or_else(|| anyhow!("cannot reload `{plugin}`: no plugin of that name is loaded"))?;
        let started = Instant::now();
        let result = self
            .open_generation(&old.file, Some(plugin))
            .with_context(|| {
                format!(
                    "reloading plugin `{plugin}` from {}; generation {} keeps serving",
                    old.file.display(),
                    old.number
                )
            });
        self.note_result(&old.file, result.as_ref().err());
        let new = Arc::new(result?);
        carry_state(plugin, &old, &new);
        let registry = self.inner.registry.load();
        let mut next = registry.plugins.clone();
        let slot = next
            .get_mut(plugin)
            .ok_or_else(|| anyhow!("plugin `{plugin}` disappeared during its reload"))?;
        slot.generation = Arc::clone(&new);
        let slot = slot.clone();
        self.publish(next);
        drop(registry);
        tracing::info!(
            plugin,
            from_generation = old.number,
            generation = new.number,
            file = %old.file.display(),
            took_us = started.elapsed().as_micros(),
            "plugin reloaded"
        );
        Ok(self.describe(plugin, &slot))
    }

    /// Saves the state of a plugin just taken out of the registry (when there is a state
    /// directory) and logs the unload. The generation itself is destroyed when its last call
    /// returns.
    fn retire(&self, plugin: &str, slot: Slot) {
        let started = Instant::now();
        let generation = &slot.generation;
        if let Some(store) = &self.inner.state {
            match generation.library.save_state() {
                None | Some(Ok(None)) => {}
                Some(Ok(Some(state))) => match store.save(plugin, &state) {
                    Ok(path) => tracing::debug!(plugin, file = %path.display(), "state saved"),
                    Err(e) => tracing::warn!(plugin, error = %format!("{e:#}"), "state not saved"),
                },
                Some(Err((_, message))) => {
                    tracing::warn!(plugin, error = %EscapeControl(&message), "the plugin failed to save its state");
                }
            }
        }
        tracing::info!(
            plugin,
            version = %generation.manifest.version,
            generation = generation.number,
            file = %generation.file.display(),
            took_us = started.elapsed().as_micros(),
            "plugin unloaded"
        );
    }

    /// Gives a newly loaded plugin the state saved in the state directory, if any.
    fn restore_saved_state(&self, plugin: &str, generation: &Generation) {
        let Some(store) = &self.inner.state else {
            return;
        };
        let Some(state) = store.load(plugin) else {
            return;
        };
        match generation.library.restore_state(&state) {
            Some(Ok(())) => tracing::info!(plugin, bytes = state.len(), "saved state restored"),
            Some(Err((_, message))) => store.reject(plugin, &message),
            None => tracing::warn!(
                plugin,
                "a saved state exists but the plugin was built without state support; it starts fresh"
            ),
        }
    }

    /// Unloads every plugin in reverse load order, saving each one's state first when the host
    /// has a state directory. Calls in flight finish on their generation; calls after this answer
    /// nothing. Dropping the last clone of the host unloads too, but saves no state.
    pub fn shutdown(&self) {
        let _admin = self.admin();
        let registry = self.inner.registry.swap(Arc::new(Registry::default()));
        let mut slots: Vec<(Box<str>, Slot)> = registry
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        drop(registry);
        slots.sort_by_key(|(_, slot)| std::cmp::Reverse(slot.load_order));
        for (name, slot) in slots {
            self.retire(&name, slot);
        }
    }

    /// Reads the configuration file again and applies what changed: a plugin now disabled is
    /// unloaded, one whose `config` changed is reloaded with it (state carried over), and files
    /// not loaded yet (for example, plugins now enabled) are loaded.
    ///
    /// # Errors
    ///
    /// The file is invalid; the configuration in force stays.
    pub fn reload_config(&self) -> anyhow::Result<ScanReport> {
        let config = PluginsConfig::read(&self.inner.config_file)?;
        let old = self.inner.config.swap(Arc::new(config));
        let mut report = ScanReport::default();
        for plugin in self.plugins() {
            let before = self.settings_in(&old, &plugin.name);
            let now = self.settings(&plugin.name);
            if before.enabled == now.enabled && before.config == now.config {
                continue;
            }
            if !now.enabled {
                self.unload(&plugin.name)?;
                tracing::info!(plugin = %plugin.name, "unloaded: disabled in the configuration");
            } else if let Err(e) = self.reload(&plugin.name) {
                report.refused.push(refusal(&plugin.file, &e));
            } else {
                report.loaded.push(plugin.name);
            }
        }
        // Hook overrides and sets may have changed without any reload.
        {
            let _admin = self.admin();
            self.republish();
        }
        let scanned = self.scan()?;
        report.loaded.extend(scanned.loaded);
        report.refused.extend(scanned.refused);
        Ok(report)
    }

    fn settings_in(&self, config: &PluginsConfig, plugin: &str) -> PluginSettings {
        match self.inner.overrides.get(plugin) {
            Some(settings) => settings.clone(),
            None => config.settings(plugin),
        }
    }

    /// The configuration file this host reads.
    pub fn config_file(&self) -> &Path {
        &self.inner.config_file
    }

    /// Loaded plugins with the file each came from and the file's stamp at load time.
    pub(crate) fn loaded_files(&self) -> Vec<(String, PathBuf, Option<loader::FileStamp>)> {
        self.inner
            .registry
            .load()
            .iter()
            .map(|(name, slot)| {
                (
                    name.to_string(),
                    slot.generation.file.clone(),
                    slot.generation.stamp,
                )
            })
            .collect()
    }

    /// Names of the loaded plugins that have a method called `method`, by name.
    pub fn method_providers(&self, method: &str) -> Vec<String> {
        let registry = self.inner.registry.load();
        let mut names: Vec<String> = registry
            .iter()
            .filter(|(_, slot)| {
                slot.generation
                    .manifest
                    .methods
                    .iter()
                    .any(|m| m.name == method)
            })
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    }

    /// Loaded plugins, by name.
    pub fn plugins(&self) -> Vec<LoadedPlugin> {
        let registry = self.inner.registry.load();
        let mut plugins: Vec<LoadedPlugin> = registry
            .iter()
            .map(|(name, slot)| self.describe(name, slot))
            .collect();
        plugins.sort_by(|a, b| a.name.cmp(&b.name));
        plugins
    }

    /// One loaded plugin.
    pub fn plugin(&self, name: &str) -> Option<LoadedPlugin> {
        self.inner
            .registry
            .load()
            .get(name)
            .map(|slot| self.describe(name, slot))
    }

    /// Files refused so far (and not loaded since), by file name.
    pub fn refused(&self) -> Vec<Refusal> {
        let mut refused = self
            .inner
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        refused.sort_by(|a, b| a.file.cmp(&b.file));
        refused
    }

    /// Calls `plugin.method(params)` and says why when it answers nothing.
    ///
    /// `Ok(None)` means the plugin answered nothing (JSON `null`). Statistics count every call
    /// that reached the plugin.
    ///
    /// # Errors
    ///
    /// A [`CallError`]: no such plugin or method, the plugin failed or panicked, or it answered
    /// text that is not JSON.
    pub fn call(
        &self,
        plugin: &str,
        method: &str,
        params: &Value,
    ) -> Result<Option<Value>, CallError> {
        self.dispatch(plugin, method, params)
            .map_err(|failure| call_error(plugin, method, failure))
    }

    /// Like [`call`](Self::call), typed both ways: `params` (any `Serialize` value) is written
    /// straight to JSON text and the answer read straight into `T`, with no [`Value`] in
    /// between; a call to a plugin that is not loaded serializes nothing. A JSON `null` answer
    /// is `Ok(None)`.
    ///
    /// ```no_run
    /// # fn demo(host: &host::PluginHost) {
    /// #[derive(serde::Serialize)]
    /// struct Pick<'a> {
    ///     experiment: &'a str,
    ///     key: &'a str,
    /// }
    /// let variant: String = host
    ///     .call_with("experiment", "pickVariant", &Pick { experiment: "tone", key: "user-7" })
    ///     .ok()
    ///     .flatten()
    ///     .unwrap_or_else(|| "A".to_owned());
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call), plus [`CallError::WrongType`] when the answer does not fit `T`
    /// and [`CallError::InvalidParams`] when `params` cannot be written as JSON.
    pub fn call_with<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        plugin: &str,
        method: &str,
        params: &P,
    ) -> Result<Option<T>, CallError> {
        self.dispatch_with(plugin, method, params)
            .map_err(|failure| call_error(plugin, method, failure))
    }

    /// Like [`execute`](Self::execute), typed both ways as [`call_with`](Self::call_with):
    /// `None` (with a log event) for every failure, an answer of another shape included.
    pub fn execute_with<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        plugin: &str,
        method: &str,
        params: &P,
    ) -> Option<T> {
        match self.dispatch_with(plugin, method, params) {
            Ok(value) => value,
            Err(failure) => {
                log_failure(plugin, method, &failure);
                None
            }
        }
    }

    /// Calls `plugin.method(params)`; `None` when the plugin answered nothing or the call could
    /// not be made.
    ///
    /// Never fails and never panics because of a plugin: a missing plugin or method, an error,
    /// a panic, or invalid JSON coming back all answer `None` and emit a `tracing` event with the
    /// plugin, the method and the reason (at debug level for missing plugins and methods, at
    /// warn for failures).
    #[inline]
    pub fn execute(&self, plugin: &str, method: &str, params: &Value) -> Option<Value> {
        match self.dispatch(plugin, method, params) {
            Ok(value) => value,
            Err(failure) => {
                log_failure(plugin, method, &failure);
                None
            }
        }
    }

    /// Like [`execute`](Self::execute), then deserializes the answer into `T`. An answer of
    /// another shape is `None` too, with a warning.
    pub fn execute_as<T: DeserializeOwned>(
        &self,
        plugin: &str,
        method: &str,
        params: &Value,
    ) -> Option<T> {
        self.execute_with(plugin, method, params)
    }

    /// The common pattern `execute(...) or default`:
    /// `host.execute_or("experiment", "pickVariant", &params, "A".to_owned())`.
    pub fn execute_or<T: DeserializeOwned>(
        &self,
        plugin: &str,
        method: &str,
        params: &Value,
        default: T,
    ) -> T {
        self.execute_as(plugin, method, params).unwrap_or(default)
    }

    fn describe(&self, name: &str, slot: &Slot) -> LoadedPlugin {
        let generation = &slot.generation;
        let manifest = &generation.manifest;
        LoadedPlugin {
            name: name.to_owned(),
            version: manifest.version.clone(),
            description: manifest.description.clone(),
            file: generation.file.clone(),
            shadow_file: generation.library.shadow_path().to_path_buf(),
            generation: generation.number,
            methods: manifest.methods.clone(),
            hooks: manifest.hooks.clone(),
            api_version: manifest.api_version.clone(),
            table_version: manifest.table_version,
            stats: slot.stats.snapshot(self.inner.clock.as_ref()),
        }
    }

    #[inline]
    fn dispatch(
        &self,
        plugin: &str,
        method: &str,
        params: &Value,
    ) -> Result<Option<Value>, Failure> {
        // A plugin that is not loaded costs no serialization.
        if !self.may_be_loaded(plugin) {
            return Err(Failure::PluginNotFound);
        }
        let params_text;
        let params = if params.is_null() {
            ""
        } else {
            params_text = params.to_string();
            params_text.as_str()
        };
        self.dispatch_text(plugin, method, params, |answer| match answer {
            None => Ok(None),
            Some(json) => serde_json::from_str(json)
                .map(Some)
                .map_err(|e| Failure::InvalidJson(e.to_string())),
        })
    }

    /// The typed path: params written and the answer read with no `Value` in between.
    fn dispatch_with<P: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        plugin: &str,
        method: &str,
        params: &P,
    ) -> Result<Option<T>, Failure> {
        if !self.may_be_loaded(plugin) {
            return Err(Failure::PluginNotFound);
        }
        let text = serde_json::to_string(params).map_err(|e| {
            Failure::Plugin(
                ErrorKind::InvalidParams,
                format!("the params cannot be written as JSON: {e}"),
            )
        })?;
        // No params reach the plugin as empty text, as in `execute`.
        let text = if text == "null" { "" } else { text.as_str() };
        self.dispatch_text(plugin, method, text, |answer| match answer {
            None | Some("null") => Ok(None),
            Some(json) => serde_json::from_str(json).map(Some).map_err(|e| {
                if e.is_syntax() || e.is_eof() {
                    Failure::InvalidJson(e.to_string())
                } else {
                    Failure::WrongType(e.to_string(), std::any::type_name::<T>())
                }
            }),
        })
    }

    /// Whether a plugin of this name may be loaded: `false` is certain, `true` is checked by the
    /// registry.
    #[inline]
    fn may_be_loaded(&self, plugin: &str) -> bool {
        self.inner.names.load(Ordering::Acquire) & name_bit(plugin) != 0
    }

    /// Calls `plugin.method` with params as JSON text; `on_answer` reads the answer while the
    /// plugin's string is alive.
    #[inline]
    fn dispatch_text<R>(
        &self,
        plugin: &str,
        method: &str,
        params: &str,
        on_answer: impl FnOnce(Option<&str>) -> Result<Option<R>, Failure>,
    ) -> Result<Option<R>, Failure> {
        if !self.may_be_loaded(plugin) {
            return Err(Failure::PluginNotFound);
        }
        // This snapshot of the registry holds the generation alive until the call returns,
        // whatever reload or unload does meanwhile.
        let registry = self.inner.registry.load();
        let slot = registry.get(plugin).ok_or(Failure::PluginNotFound)?;
        let clock = self.inner.clock.as_ref();
        let started = clock.map_or(0, quanta::Clock::raw);
        let result = slot
            .generation
            .library
            .call(method, params, |answer| match answer {
                Ok(json) => on_answer(json),
                Err(PluginFailure::Reported(ErrorKind::UnknownMethod, _)) => {
                    Err(Failure::MethodNotFound)
                }
                Err(PluginFailure::Reported(kind, message)) => {
                    Err(Failure::Plugin(kind, message.to_owned()))
                }
                Err(PluginFailure::NotUtf8(e)) => Err(Failure::InvalidJson(format!(
                    "the answer is not UTF-8 text ({e})"
                ))),
            })
            .unwrap_or(Err(Failure::PluginNotFound));
        let ticks = clock.map_or(0, |c| c.raw().saturating_sub(started).max(1));
        let outcome = match &result {
            Ok(_) | Err(Failure::MethodNotFound | Failure::PluginNotFound) => Outcome::Ok,
            Err(Failure::Plugin(ErrorKind::Panicked, _)) => Outcome::Panic,
            Err(_) => Outcome::Error,
        };
        slot.stats.record(ticks, outcome);
        result
    }
}

/// The public error for a failed call.
fn call_error(plugin: &str, method: &str, failure: Failure) -> CallError {
    let (plugin, method) = (plugin.to_owned(), method.to_owned());
    match failure {
        Failure::PluginNotFound => CallError::PluginNotFound { plugin },
        Failure::MethodNotFound => CallError::MethodNotFound { plugin, method },
        Failure::InvalidJson(message) => CallError::InvalidJson {
            plugin,
            method,
            message,
        },
        Failure::WrongType(message, expected) => CallError::WrongType {
            plugin,
            method,
            message: format!("{message} (expected {expected})"),
        },
        Failure::Plugin(kind, message) => match kind {
            ErrorKind::Panicked => CallError::Panicked {
                plugin,
                method,
                message,
            },
            ErrorKind::InvalidParams => CallError::InvalidParams {
                plugin,
                method,
                message,
            },
            _ => CallError::Failed {
                plugin,
                method,
                message,
            },
        },
    }
}

#[cold]
fn log_failure(plugin: &str, method: &str, failure: &Failure) {
    match failure {
        Failure::PluginNotFound => {
            tracing::debug!(plugin, method, "no such plugin; answering nothing");
        }
        Failure::MethodNotFound => {
            tracing::debug!(plugin, method, "no such method; answering nothing");
        }
        Failure::Plugin(ErrorKind::Panicked, message) => {
            tracing::warn!(plugin, method, panic = %EscapeControl(message), "plugin panicked; answering nothing");
        }
        Failure::Plugin(_, message) => {
            tracing::warn!(plugin, method, error = %EscapeControl(message), "plugin call failed; answering nothing");
        }
        Failure::InvalidJson(message) => {
            tracing::warn!(plugin, method, error = %EscapeControl(message), "plugin answered invalid JSON; answering nothing");
        }
        Failure::WrongType(message, expected) => {
            tracing::warn!(plugin, method, error = %EscapeControl(message), expected, "plugin answered an unexpected value; answering nothing");
        }
    }
}

/// The bit of `plugin`'s name in [`Inner::names`].
#[inline]
fn name_bit(plugin: &str) -> u64 {
    use std::hash::BuildHasher as _;
    1 << (rustc_hash::FxBuildHasher.hash_one(plugin) >> 58)
}

/// The name bits of every plugin in `plugins`.
fn name_bits(plugins: &Plugins) -> u64 {
    plugins.keys().fold(0, |bits, name| bits | name_bit(name))
}

fn refusal(file: &Path, error: &anyhow::Error) -> Refusal {
    Refusal {
        file: file.to_path_buf(),
        reason: format!("{error:#}"),
        error: error.downcast_ref::<LoadError>().cloned(),
    }
}

/// Moves the state of `old` into `new`. Failures are logged; `new` then starts fresh.
fn carry_state(plugin: &str, old: &Generation, new: &Generation) {
    let state = match old.library.save_state() {
        None | Some(Ok(None)) => return,
        Some(Ok(Some(state))) => state,
        Some(Err((_, message))) => {
            tracing::warn!(plugin, error = %EscapeControl(&message), "saving state for the reload failed; the new generation starts fresh");
            return;
        }
    };
    match new.library.restore_state(&state) {
        Some(Ok(())) => tracing::debug!(plugin, bytes = state.len(), "state carried over"),
        Some(Err((_, message))) => {
            tracing::warn!(plugin, error = %EscapeControl(&message), "restoring state into the new generation failed; it starts fresh");
        }
        None => tracing::warn!(
            plugin,
            "the new generation was built without state support; its state starts fresh"
        ),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Queued fire-and-forget events run first: they hold generations.
        self.fire_queue.stop();
        let registry = self.registry.swap(Arc::new(Registry::default()));
        let mut slots: Vec<(Box<str>, Slot)> = match Arc::try_unwrap(registry) {
            Ok(Registry { plugins, hooks }) => {
                drop(hooks);
                plugins.into_iter().collect()
            }
            Err(shared) => shared.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        slots.sort_by_key(|(_, slot)| std::cmp::Reverse(slot.load_order));
        for (name, slot) in slots {
            let generation = slot.generation.number;
            drop(slot);
            tracing::debug!(plugin = %name, generation, "plugin unloaded at shutdown");
        }
        if self.remove_shadow_dir {
            // Only succeeds when empty: a plugin still mapped keeps its copy.
            let _ = std::fs::remove_dir(&self.shadow_dir);
        }
    }
}
