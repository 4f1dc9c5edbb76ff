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

/// Runs the plugin's `create` on a thread of its own and waits at most `timeout_ms` for it. An
/// overrun is abandoned: the thread keeps the library (and drops the instance if `create` ever
/// returns), and the caller (holding the admin lock) goes on, so the watcher, the control API
/// and other loads are not held up by one plugin's `create`.
fn create_within(
    mut library: PluginLibrary,
    name: &str,
    config: String,
    call_back: crate::dylib::CallBack,
    store: Option<crate::store::StoreAccess>,
    timeout_ms: u64,
) -> Result<(PluginLibrary, Result<(), PluginError>), LoadErrorKind> {
    let (sender, created) = std::sync::mpsc::sync_channel(1);
    let plugin = name.to_owned();
    let spawned = std::thread::Builder::new()
        .name("plugin-create".into())
        .spawn(move || {
            let site = crate::crash::EntryGuard::new(&plugin, "create");
            let result = library.create(&plugin, &config, call_back, store);
            drop(site);
            // Nobody waits any more when the deadline passed: the library is dropped here.
            let _ = sender.send((library, result));
        });
    if let Err(e) = spawned {
        return Err(LoadErrorKind::CreateFailed {
            plugin: name.to_owned(),
            message: format!("no thread to run create on: {e}"),
        });
    }
    match created.recv_timeout(std::time::Duration::from_millis(timeout_ms)) {
        Ok(created) => Ok(created),
        Err(_) => {
            tracing::warn!(
                plugin = name,
                timeout_ms,
                "plugin create overran its deadline; abandoned, the load goes on without it"
            );
            Err(LoadErrorKind::CreateTimedOut {
                plugin: name.to_owned(),
                timeout_ms,
            })
        }
    }
}

impl PluginHost {
    /// Moves the state of `old` into `new`, each entry within the plugin's deadline. A failure
    /// is logged and `new` starts fresh; an entry that overruns is abandoned and refuses the
    /// reload, so that the old generation keeps serving with its state: nothing is lost.
    fn carry_state(
        &self,
        plugin: &str,
        old: &Arc<Generation>,
        new: &Arc<Generation>,
        health: &Arc<StatsCell>,
    ) -> Result<(), LoadErrorKind> {
        let timeout_ms = self.timeout_ms(plugin);
        let timed_out = |entry| LoadErrorKind::StateTimedOut {
            plugin: plugin.to_owned(),
            entry,
            timeout_ms,
        };
        let saving = Arc::clone(old);
        let saved = deadline::within(plugin, "save_state", timeout_ms, Some(health), move || {
            saving.library.save_state()
        })
        .map_err(|_| timed_out("save_state"))?;
        let state = match saved {
            None | Some(Ok(None)) => return Ok(()),
            Some(Ok(Some(state))) => state,
            Some(Err(PluginError { message, .. })) => {
                tracing::warn!(plugin, error = %EscapeControl(&message), "saving state for the reload failed; the new generation starts fresh");
                return Ok(());
            }
        };
        let restoring = Arc::clone(new);
        let bytes = state.len();
        let restored = deadline::within(
            plugin,
            "restore_state",
            timeout_ms,
            Some(health),
            move || restoring.library.restore_state(&state),
        )
        .map_err(|_| timed_out("restore_state"))?;
        match restored {
            Some(Ok(())) => tracing::debug!(plugin, bytes, "state carried over"),
            Some(Err(PluginError { message, .. })) => {
                tracing::warn!(plugin, error = %EscapeControl(&message), "restoring state into the new generation failed; it starts fresh");
            }
            None => tracing::warn!(
                plugin,
                "the new generation was built without state support; its state starts fresh"
            ),
        }
        Ok(())
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
        let generation = Arc::new(generation);
        arm_store_hand_over(&generation);
        let stats: Arc<StatsCell> = Arc::default();
        if let Err(kind) = self.restore_saved_state(&name, &generation, &stats) {
            self.release(&name, generation, None);
            return Err(LoadError::new(file, kind));
        }
        let registry = self.inner.registry.load();
        let load_order = registry
            .values()
            .map(|slot| slot.load_order + 1)
            .max()
            .unwrap_or(0);
        let slot = Slot::new(generation, stats, load_order);
        let mut next = registry.plugins.clone();
        next.insert(name.clone().into_boxed_str(), slot.clone());
        self.publish(next);
        tracing::info!(
            plugin = %EscapeControl(&name),
            version = %EscapeControl(&slot.generation.manifest.version),
            generation = slot.generation.number,
            file = %EscapePath(file),
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
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
        // Which plugin a file provides is known from its manifest only: when any plugin may run
        // isolated, a child reads it, and the host opens the file itself only if that plugin
        // runs in-process.
        let isolated = if self.may_isolate() {
            Some(self.start_child(file, number)?)
        } else {
            None
        };
        let (library, manifest_json) = match isolated {
            Some((isolated, json)) if self.isolation_of(&json) == crate::Isolation::Process => {
                (Backend::Isolated(isolated), json)
            }
            _ => {
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
                let json = library
                    .manifest_json()
                    .map_err(|PluginError { kind, message }| LoadErrorKind::BadManifest {
                        reason: match kind {
                            ErrorKind::Panicked => format!("reading it panicked: {message}"),
                            _ => message,
                        },
                    })?;
                (Backend::InProcess(library), json)
            }
        };
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

    /// Whether any plugin may run isolated (the host's default, a plugin's setting, or a crash
    /// record that quarantines a plugin).
    fn may_isolate(&self) -> bool {
        self.inner.isolation == crate::Isolation::Process
            || self.quarantine_record_of(None).is_some()
            || self
                .inner
                .config
                .load()
                .plugins
                .values()
                .chain(self.inner.overrides.values())
                .any(|s| s.isolation == Some(crate::Isolation::Process))
    }

    /// Where the plugin whose manifest is `manifest_json` runs; isolated when the manifest
    /// cannot be read (its load fails anyway, and the host never opens an unknown file).
    fn isolation_of(&self, manifest_json: &str) -> crate::Isolation {
        match serde_json::from_str::<Manifest>(manifest_json) {
            Ok(manifest) if self.quarantine_record_of(Some(&manifest.name)).is_some() => {
                crate::Isolation::Process
            }
            Ok(manifest) => self
                .settings(&manifest.name)
                .isolation
                .unwrap_or(self.inner.isolation),
            Err(_) => crate::Isolation::Process,
        }
    }

    /// Starts a child process that loads `file`; the child and the manifest it read.
    fn start_child(
        &self,
        file: &Path,
        number: u64,
    ) -> Result<(crate::isolation::Isolated, String), LoadErrorKind> {
        // A child whose `main` did not turn it into a runner would start children of its own.
        if std::env::var_os(crate::isolation::child::CHILD_ENV).is_some() {
            return Err(LoadErrorKind::Isolation {
                reason: "this process was started as an isolated plugin's process but runs the program instead: its `main` must call `plugin_host::isolation::run_child_if_requested()` first".to_owned(),
            });
        }
        let program = match &self.inner.child_program {
            Some(program) => program.clone(),
            None => std::env::current_exe().map_err(|e| LoadErrorKind::Isolation {
                reason: format!(
                    "this program's executable cannot be found to start the plugin's process: {e}"
                ),
            })?,
        };
        let launch = crate::isolation::Launch {
            program,
            spec: crate::isolation::child::ChildSpec {
                parent: std::process::id(),
                file: file.to_path_buf(),
                shadow_dir: self.inner.shadow_dir.clone(),
                shadow_id: self.inner.shadow_id,
                generation: number,
                max_size: self.inner.file_policy.max_size,
                insecure_permissions: self.inner.file_policy.insecure_permissions,
                memory_limit_mb: None,
                log_level: crate::dylib::max_log_level(),
            },
            timeout_ms: self.inner.call_timeout_ms,
            restarts: crate::RestartPolicy::default(),
        };
        let label = file.display().to_string();
        let (supervisor, manifest, supports_hooks) =
            crate::isolation::Supervisor::start(label, launch)
                .map_err(|reason| LoadErrorKind::Isolation { reason })?;
        Ok((
            crate::isolation::Isolated {
                supervisor,
                supports_hooks,
            },
            manifest,
        ))
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
            library,
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
        if let Some(pinned) = &settings.file
            && file.file_name().is_none_or(|n| n != pinned.as_str())
        {
            return Err(LoadErrorKind::NamePinned {
                plugin: name,
                pinned: pinned.clone(),
            });
        }
        if !settings.enabled {
            return Err(LoadErrorKind::Disabled { plugin: name });
        }
        let quarantined = self.admit_quarantined(&name, &library)?;
        let config = match &settings.config {
            Value::Null => String::new(),
            config => config.to_string(),
        };
        let timeout_ms = settings.timeout_ms.unwrap_or(self.inner.call_timeout_ms);
        let (library, created) = match library {
            Backend::InProcess(library) => {
                // Said, not silently ignored: these limits need a process of the plugin's own.
                for (field, set) in [
                    ("memoryLimitMb", settings.memory_limit_mb.is_some()),
                    ("restarts", settings.restarts.is_some()),
                ] {
                    if set {
                        tracing::warn!(
                            plugin = %name,
                            field,
                            "{field} applies only to an isolated plugin and this one runs in-process: it is ignored; set \"isolation\": \"process\" in its entry to apply it"
                        );
                    }
                }
                let call_back =
                    PluginHost::plugin_call_back(Arc::downgrade(&self.inner), name.clone());
                let store = self
                    .inner
                    .store
                    .as_ref()
                    .map(|s| crate::store::StoreAccess::Local(s.for_plugin(&name)));
                let (library, created) =
                    create_within(library, &name, config, call_back, store, timeout_ms)?;
                (Backend::InProcess(library), created)
            }
            Backend::Isolated(isolated) => {
                let supervisor = &isolated.supervisor;
                supervisor.configure(
                    timeout_ms,
                    settings.memory_limit_mb,
                    settings.restarts.unwrap_or_default(),
                );
                let link = PluginHost::host_link(Arc::downgrade(&self.inner));
                let store = self.inner.store.as_ref().map(|s| s.for_plugin(&name));
                let created = match supervisor.create(&name, config, link, store) {
                    Ok(()) => Ok(()),
                    Err(crate::isolation::CreateError::Plugin(e)) => Err(e),
                    Err(crate::isolation::CreateError::Lost(crate::isolation::Lost::TimedOut)) => {
                        tracing::warn!(
                            plugin = %name,
                            timeout_ms,
                            "isolated plugin's create overran its deadline; its process was killed"
                        );
                        return Err(LoadErrorKind::CreateTimedOut {
                            plugin: name,
                            timeout_ms,
                        });
                    }
                    Err(crate::isolation::CreateError::Lost(lost)) => {
                        return Err(LoadErrorKind::Isolation {
                            reason: format!("plugin `{name}`: its process {lost} in create"),
                        });
                    }
                };
                (Backend::Isolated(isolated), created)
            }
        };
        created.map_err(|PluginError { kind, message }| match kind {
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
            quarantined,
            library,
        })
    }

    /// The latest crash record naming `plugin` (any plugin for `None`), when the host keeps
    /// crash records; unreadable records quarantine nothing (with a warning).
    fn quarantine_record_of(&self, plugin: Option<&str>) -> Option<crate::quarantine::CrashRecord> {
        let dir = self.inner.quarantine_dir.as_ref()?;
        let records = match crate::quarantine::records(dir) {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "crash records unreadable; no plugin is quarantined");
                return None;
            }
        };
        records
            .into_iter()
            .rev()
            .find(|r| plugin.is_none_or(|plugin| r.plugin == plugin))
    }

    /// The one place that decides what a quarantined plugin (one a crash record names) does at
    /// load: it runs isolated, in a process of its own, with a warning, whatever its
    /// configuration says; a backend that is not isolated (which `open_file` never gives a
    /// quarantined plugin) is refused, naming the crash and how to clear it.
    fn admit_quarantined(
        &self,
        plugin: &str,
        backend: &Backend,
    ) -> Result<Option<String>, LoadErrorKind> {
        let Some(record) = self.quarantine_record_of(Some(plugin)) else {
            return Ok(None);
        };
        if matches!(backend, Backend::Isolated(_)) {
            tracing::warn!(
                plugin,
                method = %EscapeControl(&record.method),
                cause = %EscapeControl(&record.cause),
                "plugin quarantined: it brought the worker down, so it runs isolated in a process of its own until its crash records are cleared (worker quarantine clear PLUGIN)"
            );
            return Ok(Some(record.reason()));
        }
        let dir = self
            .inner
            .quarantine_dir
            .as_deref()
            .unwrap_or(Path::new("."));
        Err(LoadErrorKind::Quarantined {
            plugin: plugin.to_owned(),
            reason: record.reason(),
            records: crate::quarantine::records_file(dir),
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
            Ok(generation) => {
                let generation = Arc::new(generation);
                arm_store_hand_over(&generation);
                generation
            }
            Err(e) => {
                self.note_result(&old.file, Some(&e));
                return Err(e);
            }
        };
        let stats = self
            .inner
            .registry
            .load()
            .get(plugin)
            .map(|slot| Arc::clone(&slot.stats))
            .ok_or_else(|| not_loaded(plugin))?;
        if let Err(kind) = self.carry_state(plugin, &old, &new, &stats) {
            let e = LoadError::new(&old.file, kind).during(format!(
                "reloading plugin `{plugin}` from {}; generation {} keeps serving",
                EscapePath(&old.file),
                old.number
            ));
            self.note_result(&old.file, Some(&e));
            self.release(plugin, new, None);
            return Err(e);
        }
        let registry = self.inner.registry.load();
        let mut next = registry.plugins.clone();
        let slot = next
            .get_mut(plugin)
            // Cannot happen under the admin lock; answered as the unload it would have been.
            .ok_or_else(|| not_loaded(plugin))?;
        *slot = Slot::new(Arc::clone(&new), Arc::clone(&slot.stats), slot.load_order);
        let slot = slot.clone();
        self.publish(next);
        drop(registry);
        // Cleared once the new generation serves: whoever sees the refusal gone sees it.
        self.note_result(&old.file, None);
        // A checkpoint of the new generation: what it was given survives a crash from now on.
        self.save_state(plugin, &new, Some(&slot.stats));
        tracing::info!(
            plugin = %EscapeControl(plugin),
            version = %EscapeControl(&new.manifest.version),
            from_version = %EscapeControl(&old.manifest.version),
            from_generation = old.number,
            generation = new.number,
            file = %EscapePath(&old.file),
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "plugin reloaded"
        );
        self.release(plugin, old, Some(&slot.stats));
        Ok(self.describe(plugin, &slot))
    }

    /// Saves the state of a plugin just taken out of the registry (when there is a state
    /// directory) and logs the unload. The generation itself is destroyed when its last call
    /// returns.
    pub(super) fn retire(&self, plugin: &str, slot: Slot) {
        self.save_state(plugin, &slot.generation, Some(&slot.stats));
        self.retire_saved(plugin, slot);
    }

    /// Logs the unload of a plugin taken out of the registry, its state saved.
    pub(super) fn retire_saved(&self, plugin: &str, slot: Slot) {
        let started = Instant::now();
        let generation = &slot.generation;
        tracing::info!(
            plugin = %EscapeControl(plugin),
            version = %EscapeControl(&generation.manifest.version),
            generation = generation.number,
            file = %EscapePath(&generation.file),
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "plugin unloaded"
        );
        let Slot {
            generation, stats, ..
        } = slot;
        self.release(plugin, generation, Some(&stats));
    }

    /// Writes the state of `generation` to the state directory (when the host has one and the
    /// plugin keeps state); whether it was written. Saves are serialized, so a checkpoint taken
    /// earlier never replaces a later save.
    pub(super) fn save_state(
        &self,
        plugin: &str,
        generation: &Arc<Generation>,
        health: Option<&Arc<StatsCell>>,
    ) -> bool {
        let Some(store) = &self.inner.state else {
            return false;
        };
        let _saving = self
            .inner
            .saving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let saving = Arc::clone(generation);
        let saved = deadline::within(
            plugin,
            "save_state",
            self.timeout_ms(plugin),
            health,
            move || saving.library.save_state(),
        );
        let Ok(saved) = saved else {
            tracing::warn!(
                plugin,
                "state not saved: save_state overran its deadline; the last saved state stays"
            );
            return false;
        };
        match saved {
            None | Some(Ok(None)) => false,
            Some(Ok(Some(state))) => match store.save(plugin, &state) {
                Ok(path) => {
                    tracing::debug!(plugin, file = %EscapePath(&path), "state saved");
                    true
                }
                Err(e) => {
                    tracing::warn!(plugin, error = %format!("{e:#}"), "state not saved");
                    false
                }
            },
            Some(Err(PluginError { message, .. })) => {
                tracing::warn!(plugin, error = %EscapeControl(&message), "the plugin failed to save its state");
                false
            }
        }
    }

    /// Saves every loaded plugin's state to the state directory now (a checkpoint), without
    /// unloading anything; returns the names of the plugins whose state was written. A plugin
    /// whose breaker is open or that has a call past its deadline is skipped (it may be stuck:
    /// its last saved state stays). Does nothing without a state directory.
    ///
    /// `worker serve` calls it every `--checkpoint-interval` seconds, so that a worker killed
    /// outright (`kill -9`, a crash) restarts with the state of the last checkpoint.
    pub fn checkpoint(&self) -> Vec<String> {
        if self.inner.state.is_none() {
            return Vec::new();
        }
        let registry = self.inner.registry.load_full();
        let mut slots: Vec<(&Box<str>, &Slot)> = registry.iter().collect();
        slots.sort_by_key(|(_, slot)| slot.load_order);
        let mut saved = Vec::new();
        for (name, slot) in slots {
            if slot.stats.health.degraded() {
                tracing::warn!(plugin = %name, "checkpoint skipped: the plugin's breaker is open or a call is past its deadline; its last saved state stays");
                continue;
            }
            if self.save_state(name, &slot.generation, Some(&slot.stats)) {
                saved.push(name.to_string());
            }
        }
        if !saved.is_empty() {
            tracing::debug!(plugins = ?saved, "checkpoint");
        }
        saved
    }

    /// Gives a newly loaded plugin the state saved in the state directory, if any, within the
    /// plugin's deadline.
    ///
    /// # Errors
    ///
    /// `restore_state` overran and was abandoned: the load is refused, and the state file stays
    /// for the next try (loading the plugin fresh would overwrite it at the next save).
    pub(super) fn restore_saved_state(
        &self,
        plugin: &str,
        generation: &Arc<Generation>,
        health: &Arc<StatsCell>,
    ) -> Result<(), LoadErrorKind> {
        let Some(store) = &self.inner.state else {
            return Ok(());
        };
        let Some(state) = store.load(plugin) else {
            return Ok(());
        };
        let timeout_ms = self.timeout_ms(plugin);
        let restoring = Arc::clone(generation);
        let bytes = state.len();
        let given = state.clone();
        let restored = deadline::within(
            plugin,
            "restore_state",
            timeout_ms,
            Some(health),
            move || restoring.library.restore_state(&given),
        )
        .map_err(|_| LoadErrorKind::StateTimedOut {
            plugin: plugin.to_owned(),
            entry: "restore_state",
            timeout_ms,
        })?;
        match restored {
            Some(Ok(())) => tracing::info!(plugin, bytes, "saved state restored"),
            Some(Err(PluginError { message, .. })) => store.reject(plugin, &message),
            None => tracing::warn!(
                plugin,
                "a saved state exists but the plugin was built without state support; it starts fresh"
            ),
        }
        Ok(())
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

    /// [`shutdown`](Self::shutdown) within `timeout`, whatever the plugins do: plugins that
    /// answer are saved and unloaded in reverse load order; a plugin with a call past its
    /// deadline is neither saved (its last checkpoint stays) nor destroyed (its library stays
    /// mapped: code is still running in it); plugins whose `save_state` had not returned by the
    /// deadline are left behind the same way. The report names what was left behind; an
    /// embedder that gets a non-empty one should exit soon.
    pub fn shutdown_within(&self, timeout: std::time::Duration) -> ShutdownReport {
        let deadline = Instant::now() + timeout;
        // A load or reload stuck in a plugin's `create` holds the admin lock: go on without it.
        let admin = loop {
            match self.inner.admin.try_lock() {
                Ok(guard) => break Some(guard),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                    break Some(poisoned.into_inner());
                }
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    tracing::warn!(
                        "a load or reload is still running; shutting down without waiting for it"
                    );
                    break None;
                }
            }
        };
        let registry = self.inner.registry.swap(Arc::new(Registry::default()));
        let mut slots: Vec<(Box<str>, Slot)> = registry
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        drop(registry);
        slots.sort_by_key(|(_, slot)| std::cmp::Reverse(slot.load_order));
        let mut report = ShutdownReport::default();
        let mut retiring = Vec::with_capacity(slots.len());
        for (name, slot) in slots {
            let overdue: Vec<_> = slot
                .stats
                .health
                .in_flight(&name)
                .into_iter()
                .filter(|call| call.overdue)
                .collect();
            if slot.stats.health.stuck() != 0 {
                report.abandoned.push(Abandoned {
                    plugin: name.to_string(),
                    reason: "an entry abandoned past its deadline is still running in it; not saved (its last checkpoint stays) and not unloaded".to_owned(),
                });
                std::mem::forget(slot);
            } else if let Some(call) = overdue.first() {
                report.abandoned.push(Abandoned {
                    plugin: name.to_string(),
                    reason: format!(
                        "stuck in `{}` for {} ms; not saved (its last checkpoint stays) and not unloaded",
                        EscapeControl(&call.method),
                        call.elapsed.as_millis()
                    ),
                });
                // Code is running in it: its library must stay mapped until the process ends.
                std::mem::forget(slot);
            } else {
                retiring.push((name, slot));
            }
        }
        let (done, finished) = std::sync::mpsc::channel::<(String, bool, bool)>();
        let names: Vec<String> = retiring.iter().map(|(n, _)| n.to_string()).collect();
        let host = self.clone();
        let retired = std::thread::Builder::new()
            .name("plugin-shutdown".into())
            .spawn(move || {
                for (name, slot) in retiring {
                    let saved = host.save_state(&name, &slot.generation, Some(&slot.stats));
                    // Its `save_state` overran: code still runs in it, so its library stays.
                    let stuck = slot.stats.health.stuck() != 0;
                    if stuck {
                        std::mem::forget(slot);
                    } else {
                        host.retire_saved(&name, slot);
                    }
                    if done.send((name.to_string(), saved, stuck)).is_err() {
                        return;
                    }
                }
            });
        let mut pending: std::collections::VecDeque<String> = names.into();
        if retired.is_ok() {
            while let Some(next) = pending.front() {
                let left = deadline.saturating_duration_since(Instant::now());
                match finished.recv_timeout(left) {
                    Ok((name, saved, stuck)) => {
                        debug_assert_eq!(&name, next);
                        pending.pop_front();
                        if saved {
                            report.saved.push(name);
                        } else if stuck {
                            report.abandoned.push(Abandoned {
                                plugin: name,
                                reason: "its save_state overran its deadline and runs on; not saved (its last checkpoint stays) and not unloaded".to_owned(),
                            });
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        for (i, name) in pending.into_iter().enumerate() {
            report.abandoned.push(Abandoned {
                plugin: name,
                reason: if i == 0 {
                    "its state was still being saved at the deadline; its last checkpoint stays"
                } else {
                    "not reached before the deadline; its last checkpoint stays"
                }
                .to_owned(),
            });
        }
        drop(admin);
        report
    }

    /// Reads the configuration file again and applies what changed: a plugin now disabled is
    /// unloaded, one whose `config` changed is reloaded with it (state carried over), and files
    /// not loaded yet (for example, plugins now enabled) are loaded.
    ///
    /// # Errors
    ///
    /// The file is invalid; the configuration in force stays.
    pub fn reload_config(&self) -> anyhow::Result<ScanReport> {
        let result = self.reload_config_now();
        self.inner
            .config_reload_failed
            .store(result.is_err(), std::sync::atomic::Ordering::Relaxed);
        result
    }

    fn reload_config_now(&self) -> anyhow::Result<ScanReport> {
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
                tracing::info!(
                    plugin = %EscapeControl(&plugin.name),
                    version = %EscapeControl(&plugin.version),
                    "unloaded: disabled in the configuration"
                );
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

/// Lets the generation's instance hold its store additions past the end of its calls: the
/// store asks for them after its flushes (see [`crate::store::Holder`]). The store reaches the
/// generation through a weak reference, so that it keeps a retired one alive only while an
/// ask is out, as any call does. A crash while asking is recorded as the plugin's.
fn arm_store_hand_over(generation: &Arc<Generation>) {
    let Backend::InProcess(library) = &generation.library else {
        return;
    };
    let Some(holder) = library.store_holder() else {
        return;
    };
    let weak = Arc::downgrade(generation);
    let plugin = generation.manifest.name.clone();
    holder.set_hand_over(Box::new(move || {
        // A generation gone has handed its additions over when it was destroyed.
        let Some(generation) = weak.upgrade() else {
            return true;
        };
        let site = crate::crash::EntryGuard::new(&plugin, "store_hand_over");
        let handed = match &generation.library {
            Backend::InProcess(library) => library.store_hand_over(),
            Backend::Isolated(_) => None,
        };
        drop(site);
        // The last reference (the generation was retired while this asked): its `destroy`
        // runs on a thread of its own, so that a `Drop` that hangs never keeps this ask out
        // (a flush on request would wait for it), under the plugin's crash mark.
        if let Some(generation) = Arc::into_inner(generation) {
            let name = plugin.clone();
            // Marked here too: a failed spawn drops the generation on this thread.
            let _site = crate::crash::EntryGuard::new(&plugin, "destroy");
            let spawned = std::thread::Builder::new()
                .name("plugin-destroy".into())
                .spawn(move || {
                    let _site = crate::crash::EntryGuard::new(&name, "destroy");
                    drop(generation);
                });
            if let Err(e) = spawned {
                // The generation went with the failed spawn and was dropped here, under the
                // mark above.
                tracing::warn!(plugin = %EscapeControl(&plugin), error = %e, "no thread to destroy a retired generation on; destroyed on the store's asking thread");
            }
        }
        match handed {
            Some(Err(e)) => {
                tracing::warn!(plugin = %EscapeControl(&plugin), error = %EscapeControl(&e.message), "the plugin failed to hand over the store additions it holds; asked again after the next flush");
                false
            }
            Some(Ok(())) | None => true,
        }
    }));
}
