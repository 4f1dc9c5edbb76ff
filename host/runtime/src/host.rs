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
use crate::error::{LoadError, LoadErrorKind, PluginCallError, PluginError};
use crate::hooks::{
    HookEvent, HookPointInfo, HostHookFn, SubscriberInfo, Violation, parse_answer, phase,
};
use crate::hooks::{HookPoint, HookSpec};
use crate::isolation::Backend;
use crate::loader;
use crate::state::StateStore;
use crate::stats::{CallKind, Latency, LatencyHistogram, Outcome, PluginStats, StatsCell};
use crate::text::EscapeControl;
use plugin_api::{HookMode, HookResult};
use serde_json::Map;
use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Weak;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::thread::JoinHandle;

mod builder;
mod calls;
pub(crate) mod deadline;
mod dispatch;
mod handle;
mod host_hooks;
mod lifecycle;
mod plugin_calls;
mod queue;
mod registry;
mod watchdog;

pub use builder::PluginHostBuilder;
pub(crate) use dispatch::At;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use dispatch::apply_patch;
use dispatch::{HookTable, Subscriber, Timer, run_subscriber};
pub use handle::MethodHandle;
pub use host_hooks::HookSession;
use host_hooks::HostHook;
pub(crate) use plugin_calls::call_chain;
use queue::{FireQueue, Job};
use registry::{Generation, Opened, Plugins, Registry, Slot, name_bits};

#[derive(Debug)]
struct Inner {
    plugins_dir: PathBuf,
    shadow_dir: PathBuf,
    /// The shadow directory's device and inode when it was made: checked again before each
    /// copy is written, so a directory swapped in under its name is never written to.
    shadow_id: (u64, u64),
    remove_shadow_dir: bool,
    /// The lock on a default shadow directory's lock file, held while the host lives: stale
    /// cleanup by other workers removes only directories whose lock it can take.
    shadow_lock: Option<std::fs::File>,
    config_file: PathBuf,
    file_policy: loader::FilePolicy,
    config: ArcSwap<PluginsConfig>,
    state: Option<StateStore>,
    /// Where the crash records that quarantine plugins are.
    quarantine_dir: Option<PathBuf>,
    /// The shared store offered to plugins, if any.
    store: Option<crate::store::Store>,
    overrides: BTreeMap<String, PluginSettings>,
    registry: ArcSwap<Registry>,
    /// One bit per loaded plugin name (a 64-bit Bloom filter): a call to a plugin whose bit is
    /// clear answers "missing" without touching the registry. Calls to optional plugins that
    /// are not installed are the common case this makes nearly free.
    names: AtomicU64,
    /// Every hook point of this host, indexed by [`HookPoint`]: the runtime's own, then the
    /// embedder's.
    points: Box<[&'static HookSpec]>,
    /// Hooks registered from Rust, by id.
    host_hooks: Mutex<BTreeMap<u64, HostHook>>,
    next_hook_id: AtomicU64,
    fire_queue: FireQueue,
    /// `None` when calls are not timed.
    timing: Option<crate::stats::Timing>,
    refused: Mutex<Vec<Refusal>>,
    next_generation: AtomicU64,
    /// The deadline of a call for plugins whose configuration sets none (milliseconds).
    call_timeout_ms: u64,
    /// Where plugins whose configuration sets no `isolation` run.
    isolation: crate::Isolation,
    /// The program started for isolated plugins (`None`: this process's executable).
    child_program: Option<PathBuf>,
    /// What the watchdog looks at; the watchdog itself, stopped when the host drops.
    watched: watchdog::Watched,
    _watchdog: watchdog::Watchdog,
    /// Serializes writes to the state directory (checkpoints, unloads, reloads).
    saving: Mutex<()>,
    /// Serializes load, unload, reload and scan. Never held during a plugin call other than
    /// the create/destroy/state calls those operations make.
    admin: Mutex<()>,
    /// Whether the last [`PluginHost::reload_config`] failed (the configuration unreadable).
    config_reload_failed: std::sync::atomic::AtomicBool,
    /// Why the state directory given with `with_state_dir_best_effort` is not used.
    state_dir_error: Option<String>,
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
    /// The hook points it subscribes to, as configured: the priority and mode in force after
    /// `plugins.json` (sets and per-hook overrides), or off (the same as `worker hooks`).
    pub hooks: Vec<ConfiguredHook>,
    /// plugin-api version it was built with.
    pub api_version: String,
    /// Function table version it was built with.
    pub table_version: u32,
    /// Call statistics since it was first loaded.
    pub stats: PluginStats,
    /// Its circuit breaker and deadline.
    pub health: crate::health::PluginHealth,
    /// Where it runs, and (isolated) its process's crashes and restarts.
    pub isolation: crate::IsolationReport,
}

/// One hook subscription of a loaded plugin, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfiguredHook {
    /// The hook point.
    pub hook: String,
    /// The priority in force (lower runs first); the declared one when off.
    pub priority: i32,
    /// The mode in force; the declared one when off.
    pub mode: HookMode,
    /// The subscription does not run: switched off in `plugins.json`, or this host has no such
    /// hook point.
    pub off: bool,
}

/// What [`PluginHost::shutdown_within`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShutdownReport {
    /// Plugins whose state was saved.
    pub saved: Vec<String>,
    /// Plugins left behind, and why.
    pub abandoned: Vec<Abandoned>,
}

/// A plugin a bounded shutdown left behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Abandoned {
    /// The plugin.
    pub plugin: String,
    /// Why, in words.
    pub reason: String,
}

/// A file that could not be loaded, and why: the [`LoadError`] that refused it.
pub type Refusal = LoadError;

/// What a [`PluginHost::scan`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScanReport {
    /// Names of the plugins it loaded.
    pub loaded: Vec<String>,
    /// Files it refused.
    pub refused: Vec<Refusal>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Queued fire-and-forget events run first: they hold generations.
        self.fire_queue
            .stop(std::time::Duration::from_millis(self.call_timeout_ms));
        let registry = self.registry.swap(Arc::new(Registry::default()));
        let mut slots: Vec<(Box<str>, Slot)> = match Arc::try_unwrap(registry) {
            Ok(Registry { plugins, hooks, .. }) => {
                drop(hooks);
                plugins.into_iter().collect()
            }
            Err(shared) => shared.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        slots.sort_by_key(|(_, slot)| std::cmp::Reverse(slot.load_order));
        for (name, slot) in slots {
            let generation = slot.generation.number;
            let version = slot.generation.manifest.version.clone();
            drop(slot);
            tracing::debug!(
                plugin = %EscapeControl(&name),
                version = %EscapeControl(&version),
                generation,
                "plugin unloaded at shutdown"
            );
        }
        if self.remove_shadow_dir {
            // Only succeeds when empty: a plugin still mapped keeps its copy (and then the
            // lock file goes too: a later cleanup takes such a directory for a dead one's).
            let _ = std::fs::remove_file(self.shadow_dir.join(builder::SHADOW_LOCK_FILE));
            self.shadow_lock.take();
            let _ = std::fs::remove_dir(&self.shadow_dir);
        }
    }
}

impl PluginHost {
    /// The plugins directory.
    pub fn plugins_dir(&self) -> &Path {
        &self.inner.plugins_dir
    }

    /// The directory of shadow copies.
    pub fn shadow_dir(&self) -> &Path {
        &self.inner.shadow_dir
    }

    /// The shared store offered to the plugins, if any.
    pub fn store(&self) -> Option<&crate::store::Store> {
        self.inner.store.as_ref()
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

    /// Names of the loaded plugins that have a method called `method`, by name.
    pub fn method_providers(&self, method: &str) -> Vec<String> {
        self.inner
            .registry
            .load()
            .providers
            .get(method)
            .map_or_else(Vec::new, |names| {
                names.iter().map(|name| name.to_string()).collect()
            })
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

    /// How many calls each call timed stands for in the estimates (the timing sample).
    fn weight(&self) -> u64 {
        self.inner
            .timing
            .as_ref()
            .map_or(1, crate::stats::Timing::weight)
    }

    /// The latency histograms of each loaded plugin (by name), one per method and hook point
    /// with at least one call since the plugin was first loaded. Empty when calls are not
    /// timed ([`with_call_timing(false)`](PluginHostBuilder::with_call_timing)).
    pub fn latencies(&self) -> Vec<(String, Vec<LatencyHistogram>)> {
        let registry = self.inner.registry.load();
        let mut out: Vec<(String, Vec<LatencyHistogram>)> = registry
            .iter()
            .map(|(name, slot)| (name.to_string(), slot.stats.latencies()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Whether the last [`reload_config`](Self::reload_config) failed (by the watcher, a
    /// rescan or an embedder's call); false before the first.
    pub fn config_reload_failed(&self) -> bool {
        self.inner
            .config_reload_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the state directory given with
    /// [`with_state_dir_best_effort`](PluginHostBuilder::with_state_dir_best_effort) could not
    /// be used; `None` when it is used (or none was given).
    pub fn state_dir_error(&self) -> Option<&str> {
        self.inner.state_dir_error.as_deref()
    }

    /// Whether loaded `plugin` keeps state: its `save_state` answers some state now (or fails,
    /// which counts as keeping state). False for a plugin that is not loaded.
    pub fn keeps_state(&self, plugin: &str) -> bool {
        let registry = self.inner.registry.load();
        let Some(slot) = registry.get(plugin) else {
            return false;
        };
        !matches!(slot.generation.library.save_state(), None | Some(Ok(None)))
    }

    /// One loaded plugin.
    pub fn plugin(&self, name: &str) -> Option<LoadedPlugin> {
        self.inner
            .registry
            .load()
            .get(name)
            .map(|slot| self.describe(name, slot))
    }

    /// Names of the plugins that are not healthy: their circuit breaker is open or half-open, a
    /// call is running past its deadline, or (isolated) restarts are stopped by the crash-loop
    /// limit. By name.
    pub fn degraded(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .registry
            .load()
            .iter()
            .filter(|(_, slot)| {
                slot.stats.health.degraded()
                    || slot
                        .generation
                        .library
                        .supervisor()
                        .is_some_and(crate::isolation::Supervisor::suspended)
            })
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    }

    /// Lifts an isolated plugin's crash-loop suspension (it crashed more often than its
    /// `restarts` limit allows) and starts its process again, with its last saved state. Does
    /// nothing more for a plugin that runs in-process.
    ///
    /// # Errors
    ///
    /// No plugin of that name is loaded.
    pub fn reset(&self, plugin: &str) -> anyhow::Result<()> {
        let registry = self.inner.registry.load();
        let slot = registry
            .get(plugin)
            .ok_or_else(|| anyhow!("cannot reset `{plugin}`: no plugin of that name is loaded"))?;
        if let Some(supervisor) = slot.generation.library.supervisor() {
            supervisor.reset();
            tracing::info!(plugin, "isolated plugin reset: restarts allowed again");
        }
        Ok(())
    }

    /// The plugin calls (methods and hook deliveries) running now, longest first.
    pub fn calls_in_flight(&self) -> Vec<crate::health::CallInFlight> {
        let mut calls: Vec<_> = self
            .inner
            .watched
            .load()
            .iter()
            .flat_map(|(name, cell)| cell.health.in_flight(name))
            .collect();
        calls.sort_by_key(|call| std::cmp::Reverse(call.elapsed));
        calls
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

    /// `manifest`'s subscriptions with the configuration in force applied.
    fn configured_hooks(&self, name: &str, manifest: &Manifest) -> Vec<ConfiguredHook> {
        let config = self.inner.config.load_full();
        let settings = self.settings_in(&config, name);
        manifest
            .hooks
            .iter()
            .map(|s| {
                let declared = (s.priority, s.mode);
                let configured = self
                    .hook_point(&s.hook)
                    .and_then(|_| config.hook_settings(&settings, name, &s.hook, declared));
                let ((priority, mode), off) = match configured {
                    Some(in_force) => (in_force, false),
                    None => (declared, true),
                };
                ConfiguredHook {
                    hook: s.hook.clone(),
                    priority,
                    mode,
                    off,
                }
            })
            .collect()
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
            hooks: self.configured_hooks(name, manifest),
            api_version: manifest.api_version.clone(),
            table_version: manifest.table_version,
            stats: slot.stats.snapshot(self.weight()),
            health: slot.stats.health.snapshot(),
            isolation: crate::IsolationReport {
                quarantined: generation.quarantined.clone(),
                ..generation.library.report()
            },
        }
    }
}
