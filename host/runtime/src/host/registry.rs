//! The registry: generations, the slot each plugin name holds, publishing a new registry
//! (copy on write, with its hook table), and the name filter that answers "missing" without
//! touching it.

use super::*;

/// One loaded generation of a plugin.
#[derive(Debug)]
pub(super) struct Generation {
    pub(super) manifest: Manifest,
    pub(super) file: PathBuf,
    /// The file as it was when this generation was copied from it.
    pub(super) stamp: Option<loader::FileStamp>,
    pub(super) number: u64,
    /// The crash that quarantined the plugin (so it runs isolated), in words.
    pub(super) quarantined: Option<String>,
    /// Dropped last of all: destroying the instance and closing the library (or stopping the
    /// isolated plugin's process).
    pub(super) library: Backend,
}

/// A generation opened and checked, its manifest read; not created yet.
#[derive(Debug)]
pub(super) struct Opened {
    pub(super) manifest: Manifest,
    pub(super) file: PathBuf,
    pub(super) stamp: Option<loader::FileStamp>,
    pub(super) number: u64,
    pub(super) library: Backend,
}

/// A plugin name's place in the registry: a reload replaces the generation, the statistics stay.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) generation: Arc<Generation>,
    pub(super) stats: Arc<StatsCell>,
    pub(super) load_order: u64,
    /// Each method the generation declares, in the manifest's order (a method handle's index
    /// into it is the index the plugin's `execute_at` takes), with its latency histogram,
    /// found on the by-name call path by a scan of this short list (no lock, no hash).
    pub(super) methods: Arc<[MethodEntry]>,
}

/// A method of a generation, as the call path needs it.
#[derive(Debug)]
pub(super) struct MethodEntry {
    pub(super) name: Box<str>,
    pub(super) latency: Arc<Latency>,
    /// The name in the in-flight marker's form, made once.
    pub(super) marker: crate::health::MarkerName,
}

impl Slot {
    /// A slot for `generation` with `stats`, its method histograms taken from `stats`.
    pub(super) fn new(generation: Arc<Generation>, stats: Arc<StatsCell>, load_order: u64) -> Slot {
        let methods = generation
            .manifest
            .methods
            .iter()
            .map(|m| MethodEntry {
                name: m.name.clone().into_boxed_str(),
                latency: stats.latency(CallKind::Method, &m.name),
                marker: crate::health::MarkerName::new(&m.name),
            })
            .collect();
        Slot {
            generation,
            stats,
            load_order,
            methods,
        }
    }

    /// The latency histogram of `method`, `None` for a method the plugin does not declare.
    #[inline]
    pub(super) fn method_latency(&self, method: &str) -> Option<&Latency> {
        let wanted = method.as_bytes();
        let (Some(first), Some(last)) = (wanted.first(), wanted.last()) else {
            return None;
        };
        // Length, first and last byte first: most other names differ there, without a call
        // to `memcmp`.
        self.methods
            .iter()
            .find(|entry| {
                let name = entry.name.as_bytes();
                name.len() == wanted.len()
                    && name.first() == Some(first)
                    && name.last() == Some(last)
                    && name == wanted
            })
            .map(|entry| &*entry.latency)
    }
}

/// Plugins by name.
pub(super) type Plugins = FxHashMap<Box<str>, Slot>;

/// The plugins and the hook subscribers built from them. Replaced as a whole (copy on write) by
/// load, unload, reload and hook registration, so a call or a hook dispatch needs one atomic load
/// to reach everything it runs, and holding that snapshot holds those generations alive.
#[derive(Debug, Default)]
pub(super) struct Registry {
    pub(super) plugins: Plugins,
    pub(super) hooks: dispatch::HookTable,
    /// The plugins that declare each method, by name: what
    /// [`PluginHost::method_providers`] answers (the pipeline asks on every task).
    pub(super) providers: FxHashMap<Box<str>, Vec<Box<str>>>,
    /// This registry's number, unique among every registry of every host in the process (0
    /// for the empty one a host starts with): what a [`MethodHandle`](super::MethodHandle)'s
    /// resolution is valid for.
    pub(super) epoch: u64,
    /// The slots of `plugins` in a fixed order, for method handles: a handle resolved in this
    /// registry keeps its slot's index.
    pub(super) slots: Box<[(Box<str>, Slot)]>,
}

/// The epoch of the next registry published, in any host of the process.
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

/// Epochs fit in this many bits of a method handle's resolution.
pub(super) const EPOCH_BITS: u32 = 40;

impl Registry {
    /// The index in [`slots`](Self::slots) of `plugin`'s slot.
    pub(super) fn slot_index(&self, plugin: &str) -> Option<usize> {
        self.slots.iter().position(|(name, _)| &**name == plugin)
    }
}

impl std::ops::Deref for Registry {
    type Target = Plugins;

    fn deref(&self) -> &Plugins {
        &self.plugins
    }
}

/// The bit of `plugin`'s name in [`Inner::names`].
#[inline]
pub(super) fn name_bit(plugin: &str) -> u64 {
    use std::hash::BuildHasher as _;
    1 << (rustc_hash::FxBuildHasher.hash_one(plugin) >> 58)
}

/// The plugins in `plugins` that declare each method, by name.
pub(super) fn providers(plugins: &Plugins) -> FxHashMap<Box<str>, Vec<Box<str>>> {
    let mut providers: FxHashMap<Box<str>, Vec<Box<str>>> = FxHashMap::default();
    for (plugin, slot) in plugins {
        for method in &slot.generation.manifest.methods {
            let names = providers
                .entry(Box::from(method.name.as_str()))
                .or_default();
            if !names.contains(plugin) {
                names.push(plugin.clone());
            }
        }
    }
    for names in providers.values_mut() {
        names.sort();
    }
    providers
}

/// The name bits of every plugin in `plugins`.
pub(super) fn name_bits(plugins: &Plugins) -> u64 {
    plugins.keys().fold(0, |bits, name| bits | name_bit(name))
}

impl PluginHost {
    /// The plugin loaded from `file`, if any.
    pub(super) fn loaded_from(&self, file: &Path) -> Option<String> {
        self.inner
            .registry
            .load()
            .iter()
            .find(|(_, slot)| slot.generation.file == file)
            .map(|(name, _)| name.to_string())
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

    /// Whether a plugin of this name may be loaded: `false` is certain, `true` is checked by the
    /// registry.
    #[inline]
    pub(super) fn may_be_loaded(&self, plugin: &str) -> bool {
        self.inner.names.load(Ordering::Acquire) & name_bit(plugin) != 0
    }

    /// Stores a new registry built from `plugins` (with its hook table). Called with the admin
    /// lock held.
    pub(super) fn publish(&self, plugins: Plugins) {
        let hooks = {
            let host_hooks = self
                .inner
                .host_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            HookTable::build(&plugins, &host_hooks, self)
        };
        // The name filter may only answer "missing" for a name absent from the registry a
        // caller could see: widen it before the new registry is visible, narrow it after.
        self.configure_health(&plugins);
        let bits = super::name_bits(&plugins);
        self.inner.names.fetch_or(bits, Ordering::AcqRel);
        // Epochs past what a handle's resolution holds wrap to 1: a handle resolved 2^40
        // registries ago would take a slot index by mistake (still bounds-checked, and its
        // plugin's name is checked on resolution only), which no process lives to see.
        let epoch = NEXT_EPOCH.fetch_add(1, Ordering::Relaxed) % (1 << super::registry::EPOCH_BITS);
        let slots = plugins
            .iter()
            .map(|(name, slot)| (name.clone(), slot.clone()))
            .collect();
        self.inner.registry.store(Arc::new(super::Registry {
            providers: providers(&plugins),
            plugins,
            hooks,
            epoch: epoch.max(1),
            slots,
        }));
        self.inner.names.store(bits, Ordering::Release);
    }

    /// Applies each plugin's breaker and deadline settings, and shows the watchdog the plugins.
    fn configure_health(&self, plugins: &Plugins) {
        let config = self.inner.config.load();
        let mut watched = Vec::with_capacity(plugins.len());
        for (name, slot) in plugins {
            let settings = self.settings_in(&config, name);
            let breaker = match settings.breaker {
                crate::config::Breaker::Off => None,
                crate::config::Breaker::On {
                    failures,
                    cooldown_ms,
                } => Some((failures, cooldown_ms)),
            };
            slot.stats.health.configure(
                name,
                breaker,
                settings.timeout_ms.unwrap_or(self.inner.call_timeout_ms),
            );
            slot.stats
                .health
                .set_preemptive(slot.generation.library.supervisor().is_some());
            watched.push((name.clone(), Arc::clone(&slot.stats)));
        }
        self.inner.watched.store(Arc::new(watched));
    }

    /// Rebuilds the hook table over the current plugins (hooks or configuration changed).
    pub(super) fn republish(&self) {
        let plugins = self.inner.registry.load().plugins.clone();
        self.publish(plugins);
    }
}
