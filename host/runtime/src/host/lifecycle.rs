//! Loading, unloading, reloading, scanning and shutting down: everything that changes which
//! generations are in the registry. Serialized by the admin lock; `plugin.loaded` and
//! `plugin.unloaded` fire after it is released.

use super::*;
use crate::text::{EscapeControl, EscapePath};

/// Longest plugin name accepted.
pub(super) const MAX_NAME_LEN: usize = 64;

/// Checks a plugin's name: 1-64 characters of `a-z`, `0-9`, `-`, `_`, `.`, not starting with
/// `.`. Names become file names (state files), log fields and URL path segments, so nothing
/// else is accepted.
pub(super) fn validate_name(name: &str) -> Result<(), LoadErrorKind> {
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
            Err(LoadErrorKind::InvalidName {
                name: format!("{shown:?}"),
                reason,
            })
        }
    }
}

/// Longest plugin version accepted, in characters.
pub(super) const MAX_VERSION_LEN: usize = 64;

/// Checks a plugin's version: at most 64 characters, none of them a control or formatting
/// character. The version is shown in logs and listings next to the name.
pub(super) fn validate_version(version: &str) -> Result<(), LoadErrorKind> {
    let count = version.chars().count();
    let reason = if count > MAX_VERSION_LEN {
        format!("it is {count} characters long, the limit is {MAX_VERSION_LEN}")
    } else if let Some(c) = version.chars().find(|&c| crate::text::needs_escape(c)) {
        format!("it contains the control character {c:?}")
    } else {
        return Ok(());
    };
    let shown: String = version.chars().take(MAX_VERSION_LEN).collect();
    Err(LoadErrorKind::BadManifest {
        reason: format!(
            "invalid version {shown:?}: {reason}; a version is at most {MAX_VERSION_LEN} printable characters"
        ),
    })
}

/// A reload of a plugin that is not loaded.
fn not_loaded(plugin: &str) -> LoadError {
    LoadError::new(
        PathBuf::new(),
        LoadErrorKind::NotLoaded {
            plugin: plugin.to_owned(),
        },
    )
}

/// Moves the state of `old` into `new`. Failures are logged; `new` then starts fresh.
pub(super) fn carry_state(plugin: &str, old: &Generation, new: &Generation) {
    let state = match old.library.save_state() {
        None | Some(Ok(None)) => return,
        Some(Ok(Some(state))) => state,
        Some(Err(PluginError { message, .. })) => {
            tracing::warn!(plugin, error = %EscapeControl(&message), "saving state for the reload failed; the new generation starts fresh");
            return;
        }
    };
    match new.library.restore_state(&state) {
        Some(Ok(())) => tracing::debug!(plugin, bytes = state.len(), "state carried over"),
        Some(Err(PluginError { message, .. })) => {
            tracing::warn!(plugin, error = %EscapeControl(&message), "restoring state into the new generation failed; it starts fresh");
        }
        None => tracing::warn!(
            plugin,
            "the new generation was built without state support; its state starts fresh"
        ),
    }
}

impl PluginHost {
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
    pub fn scan(&self) -> Result<ScanReport, LoadError> {
        let dir = &self.inner.plugins_dir;
        std::fs::read_dir(dir).map_err(|e| {
            LoadError::new(
                dir,
                LoadErrorKind::DirectoryUnreadable {
                    message: e.to_string(),
                },
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
                        report.refused.push(e);
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
                    Err(LoadError::new(
                        &file,
                        LoadErrorKind::NameConflict {
                            plugin: name,
                            others,
                        },
                    ))
                } else {
                    self.install(generation, started)
                };
                self.note_result(&file, result.as_ref().err());
                match result {
                    Ok(plugin) => {
                        report.loaded.push(plugin.name.clone());
                        loaded.push(plugin);
                    }
                    Err(e) => report.refused.push(e),
                }
            }
        }
        for plugin in &loaded {
            self.fire_lifecycle(HookPoint::PLUGIN_LOADED, plugin);
        }
        Ok(report)
    }

    /// Loads one plugin file.
    ///
    /// # Errors
    ///
    /// The file is refused: the [`LoadError`] names the file and carries the reason as a
    /// [`LoadErrorKind`]. The refusal is also listed by [`refused`](Self::refused) until the
    /// file loads.
    pub fn load(&self, file: impl AsRef<Path>) -> Result<LoadedPlugin, LoadError> {
        let file = file.as_ref();
        let result = {
            let _admin = self.admin();
            let result = self.load_locked(file);
            self.note_result(file, result.as_ref().err());
            result
        };
        if let Ok(plugin) = &result {
            self.fire_lifecycle(HookPoint::PLUGIN_LOADED, plugin);
        }
        result
    }

    /// Fires `plugin.loaded` or `plugin.unloaded` (informational: a block is logged, not
    /// obeyed). Never called with the admin lock held, so subscribers may load and unload.
    pub(super) fn fire_lifecycle(&self, point: HookPoint, plugin: &LoadedPlugin) {
        let fired = self.fire(point, || {
            serde_json::json!({
                "plugin": plugin.name,
                "version": plugin.version,
                "generation": plugin.generation,
                "file": plugin.file,
            })
        });
        if let Err(violation) = fired {
            let hook = HookPoint::BUILT_IN[point.index()].name;
            tracing::warn!(%violation, "{hook} cannot be blocked; ignored");
        }
    }

    pub(super) fn load_locked(&self, file: &Path) -> Result<LoadedPlugin, LoadError> {
        let started = Instant::now();
        let opened = self.open_file(file)?;
        self.install(opened, started)
    }

    /// Creates an opened generation as a newly loaded plugin and publishes it.
    pub(super) fn install(
        &self,
        opened: Opened,
        started: Instant,
    ) -> Result<LoadedPlugin, LoadError> {
        let file = opened.file.clone();
        let generation = self
            .start(opened, None)
            .map_err(|kind| LoadError::new(&file, kind))?;
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
            version = %EscapeControl(&slot.generation.manifest.version),
            generation = slot.generation.number,
            file = %EscapePath(file),
            took_us = started.elapsed().as_micros(),
            "plugin loaded"
        );
        Ok(self.describe(&name, &slot))
    }

    /// Copies, checks, opens and creates one generation of `file`. `replacing` is the name the
    /// file must provide on a reload.
    pub(super) fn open_generation(
        &self,
        file: &Path,
        replacing: Option<&str>,
    ) -> Result<Generation, LoadError> {
        let opened = self.open_file(file)?;
        self.start(opened, replacing)
            .map_err(|kind| LoadError::new(file, kind))
    }

    /// Checks `file`, copies it to the shadow directory, opens the copy and reads its manifest:
    /// everything up to creating the instance.
    pub(super) fn open_file(&self, file: &Path) -> Result<Opened, LoadError> {
        self.open_file_inner(file)
            .map_err(|kind| LoadError::new(file, kind))
    }

    fn open_file_inner(&self, file: &Path) -> Result<Opened, LoadErrorKind> {
        let number = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        // The checks and the copy see the same bytes, read once from one open descriptor.
        let checked = loader::check_plugin_file(file, self.inner.file_policy)?;
        let stamp = Some(checked.stamp);
        let shadow = loader::shadow_copy(
            file,
            &checked,
            &self.inner.shadow_dir,
            self.inner.shadow_id,
            number,
        )?;
        let header = checked.header;
        drop(checked);
        let library = PluginLibrary::open(shadow, header)?;
        let manifest_json = library
            .manifest_json()
            .map_err(|PluginError { kind, message }| LoadErrorKind::BadManifest {
                reason: match kind {
                    ErrorKind::Panicked => format!("reading it panicked: {message}"),
                    _ => message,
                },
            })?;
        let mut manifest: Manifest =
            serde_json::from_str(&manifest_json).map_err(|e| LoadErrorKind::BadManifest {
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
        validate_version(&manifest.version)?;
        let name = manifest.name.clone();
        for subscription in &manifest.hooks {
            if self.hook_point(&subscription.hook).is_none() {
                let known: Vec<&str> = self.inner.points.iter().map(|p| p.name).collect();
                tracing::warn!(
                    plugin = %name,
                    hook = %EscapeControl(&subscription.hook),
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
    pub(super) fn start(
        &self,
        opened: Opened,
        replacing: Option<&str>,
    ) -> Result<Generation, LoadErrorKind> {
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
                return Err(LoadErrorKind::BadManifest {
                    reason: format!(
                        "the file now provides plugin `{name}`, not `{expected}`; unload `{expected}` first"
                    ),
                });
            }
            Some(_) => {}
            None => {
                if let Some(slot) = self.inner.registry.load().get(name.as_str()) {
                    return Err(LoadErrorKind::DuplicateName {
                        plugin: name,
                        loaded_from: slot.generation.file.clone(),
                    });
                }
            }
        }
        let settings = self.settings(&name);
        if let Some(pinned) = &settings.file {
            if file.file_name().is_none_or(|n| n != pinned.as_str()) {
                return Err(LoadErrorKind::NamePinned {
                    plugin: name,
                    pinned: pinned.clone(),
                });
            }
        }
        if !settings.enabled {
            return Err(LoadErrorKind::Disabled { plugin: name });
        }
        let config = match &settings.config {
            Value::Null => String::new(),
            config => config.to_string(),
        };
        let call_back = PluginHost::plugin_call_back(Arc::downgrade(&self.inner), name.clone());
        library
            .create(&name, &config, call_back)
            .map_err(|PluginError { kind, message }| match kind {
                ErrorKind::Panicked => LoadErrorKind::CreatePanicked {
                    plugin: name.clone(),
                    message,
                },
                _ => LoadErrorKind::CreateFailed {
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
    pub(crate) fn note_refused(&self, file: &Path, error: LoadErrorKind) {
        self.note_result(file, Some(&LoadError::new(file, error)));
    }

    pub(super) fn note_result(&self, file: &Path, error: Option<&LoadError>) {
        let mut refused = self
            .inner
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        refused.retain(|r| r.file != file);
        if let Some(e) = error {
            tracing::warn!(file = %EscapePath(file), reason = %EscapeControl(&e.reason()), "plugin file refused");
            refused.push(e.clone());
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
        self.fire_lifecycle(HookPoint::PLUGIN_UNLOADED, &info);
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
    pub fn reload(&self, plugin: &str) -> Result<LoadedPlugin, LoadError> {
        let reloaded = self.reload_locked(plugin)?;
        self.fire_lifecycle(HookPoint::PLUGIN_LOADED, &reloaded);
        Ok(reloaded)
    }

    pub(super) fn reload_locked(&self, plugin: &str) -> Result<LoadedPlugin, LoadError> {
        let _admin = self.admin();
        let old = self
            .inner
            .registry
            .load()
            .get(plugin)
            .map(|slot| Arc::clone(&slot.generation))
            .ok_or_else(|| not_loaded(plugin))?;
        let started = Instant::now();
        let result = self.open_generation(&old.file, Some(plugin)).map_err(|e| {
            e.during(format!(
                "reloading plugin `{plugin}` from {}; generation {} keeps serving",
                EscapePath(&old.file),
                old.number
            ))
        });
        let new = match result {
            Ok(generation) => Arc::new(generation),
            Err(e) => {
                self.note_result(&old.file, Some(&e));
                return Err(e);
            }
        };
        carry_state(plugin, &old, &new);
        let registry = self.inner.registry.load();
        let mut next = registry.plugins.clone();
        let slot = next
            .get_mut(plugin)
            // Cannot happen under the admin lock; answered as the unload it would have been.
            .ok_or_else(|| not_loaded(plugin))?;
        slot.generation = Arc::clone(&new);
        let slot = slot.clone();
        self.publish(next);
        drop(registry);
        // Cleared once the new generation serves: whoever sees the refusal gone sees it.
        self.note_result(&old.file, None);
        tracing::info!(
            plugin,
            from_generation = old.number,
            generation = new.number,
            file = %EscapePath(&old.file),
            took_us = started.elapsed().as_micros(),
            "plugin reloaded"
        );
        Ok(self.describe(plugin, &slot))
    }

    /// Saves the state of a plugin just taken out of the registry (when there is a state
    /// directory) and logs the unload. The generation itself is destroyed when its last call
    /// returns.
    pub(super) fn retire(&self, plugin: &str, slot: Slot) {
        let started = Instant::now();
        let generation = &slot.generation;
        if let Some(store) = &self.inner.state {
            match generation.library.save_state() {
                None | Some(Ok(None)) => {}
                Some(Ok(Some(state))) => match store.save(plugin, &state) {
                    Ok(path) => tracing::debug!(plugin, file = %EscapePath(&path), "state saved"),
                    Err(e) => tracing::warn!(plugin, error = %format!("{e:#}"), "state not saved"),
                },
                Some(Err(PluginError { message, .. })) => {
                    tracing::warn!(plugin, error = %EscapeControl(&message), "the plugin failed to save its state");
                }
            }
        }
        tracing::info!(
            plugin,
            version = %EscapeControl(&generation.manifest.version),
            generation = generation.number,
            file = %EscapePath(&generation.file),
            took_us = started.elapsed().as_micros(),
            "plugin unloaded"
        );
    }

    /// Gives a newly loaded plugin the state saved in the state directory, if any.
    pub(super) fn restore_saved_state(&self, plugin: &str, generation: &Generation) {
        let Some(store) = &self.inner.state else {
            return;
        };
        let Some(state) = store.load(plugin) else {
            return;
        };
        match generation.library.restore_state(&state) {
            Some(Ok(())) => tracing::info!(plugin, bytes = state.len(), "saved state restored"),
            Some(Err(PluginError { message, .. })) => store.reject(plugin, &message),
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
                report.refused.push(e);
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
}
