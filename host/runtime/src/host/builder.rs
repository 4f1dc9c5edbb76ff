//! [`PluginHostBuilder`]: the options of a host, and the private shadow directory it prepares.

use super::*;
use crate::text::EscapePath;
use std::os::unix::fs::OpenOptionsExt as _;

/// Builds a [`PluginHost`].
///
/// # Examples
///
/// ```no_run
/// use plugin_host::PluginHost;
/// use serde_json::json;
///
/// let host = PluginHost::builder("plugins")
///     .with_plugin_config("experiment", json!({"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}}))
///     .build()?;
/// let report = host.scan()?;
/// for refusal in &report.refused {
///     eprintln!("{}: {:?}", refusal.file.display(), refusal.kind);
/// }
/// let variant = host.execute_or("experiment", "pickVariant", &json!({"experiment": "tone"}), "A".to_owned());
/// # let _ = variant;
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PluginHostBuilder {
    pub(super) plugins_dir: PathBuf,
    pub(super) shadow_dir: Option<PathBuf>,
    pub(super) config_file: Option<PathBuf>,
    pub(super) overrides: BTreeMap<String, PluginSettings>,
    pub(super) call_timing: bool,
    /// One call in this many is timed; `None`: the configuration file's, else the default.
    pub(super) call_timing_sample: Option<u32>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) quarantine_dir: Option<PathBuf>,
    pub(super) store: Option<crate::store::Store>,
    /// Whether an unusable state directory leaves the host without one instead of failing.
    pub(super) state_dir_best_effort: bool,
    pub(super) fire_and_forget_capacity: usize,
    pub(super) hook_points: &'static [HookSpec],
    pub(super) file_policy: loader::FilePolicy,
    pub(super) call_timeout_ms: u64,
    pub(super) isolation: crate::Isolation,
    pub(super) child_program: Option<PathBuf>,
}

impl PluginHostBuilder {
    /// Where plugins whose configuration sets no `isolation` run (default
    /// [`Isolation::InProcess`](crate::Isolation::InProcess)).
    pub fn with_isolation(mut self, isolation: crate::Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// The program started as an isolated plugin's child process (default: this process's own
    /// executable). Its `main` must call
    /// [`run_child_if_requested`](crate::isolation::run_child_if_requested) first.
    pub fn with_child_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.child_program = Some(program.into());
        self
    }
    /// Whether calls are timed for the latency statistics (the default). Timing reads the
    /// CPU's cycle counter at both ends of one call in
    /// [`with_call_timing_sample`](Self::with_call_timing_sample) (about 20 ns for each call
    /// timed); switch it off where every nanosecond of the host's overhead counts. Call, error
    /// and panic counts are kept either way.
    pub fn with_call_timing(mut self, enabled: bool) -> Self {
        self.call_timing = enabled;
        self
    }

    /// Times one call in `sample` of each method and hook point on each thread (a power of
    /// two from 1 to [`MAX_TIMING_SAMPLE`](crate::MAX_TIMING_SAMPLE); default: the
    /// configuration file's `callTimingSample`, else
    /// [`DEFAULT_TIMING_SAMPLE`](crate::DEFAULT_TIMING_SAMPLE), 16). Counts stay exact; the
    /// latency histograms and totals are estimated from the calls timed, scaled to every
    /// call; the maximum takes every call timed, and any call not timed that saw two ticks of
    /// the watchdog's clock (50 ms apart), as a lower bound. `1` times every call, exactly,
    /// as before sampling existed. [`build`](Self::build) refuses another value.
    pub fn with_call_timing_sample(mut self, sample: u32) -> Self {
        self.call_timing_sample = Some(sample);
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

    /// Declares the embedder's hook points, in the order `worker hooks`-style listings show
    /// them; the runtime adds its own (`plugin.loaded`, `plugin.unloaded`) after them. Fire
    /// them with the handles [`HookPoint::declared`] makes from this same list.
    pub fn with_hook_points(mut self, points: &'static [HookSpec]) -> Self {
        self.hook_points = points;
        self
    }

    /// The deadline of one call (method or hook delivery) for plugins whose configuration sets
    /// no `timeoutMs` (default 10 s). An in-process call cannot be interrupted: a call past its
    /// deadline is logged and counted once by the host's watchdog, and opens the plugin's
    /// circuit breaker so that no new call enters the plugin. The watchdog looks every 50 ms.
    pub fn with_call_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.call_timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self
    }

    /// Capacity of the queue of `fire_and_forget` hook events (default 1024). When it is full,
    /// new events are dropped for those subscribers, with a counted warning.
    pub fn with_fire_and_forget_capacity(mut self, capacity: usize) -> Self {
        self.fire_and_forget_capacity = capacity.max(1);
        self
    }

    /// Offers `store` to the plugins (`plugin_api::store`), each in a namespace of its name.
    /// Without it, plugins are told there is no store and keep their own state.
    pub fn with_store(mut self, store: crate::store::Store) -> Self {
        self.store = Some(store);
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

    /// Quarantines the plugins named by the crash records in `dir` (its `crash-records` file,
    /// see [`crate::quarantine`]): they run isolated. Defaults to the state directory;
    /// this is for a host that keeps no state but should still respect quarantine (`worker
    /// list`).
    pub fn with_quarantine_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.quarantine_dir = Some(dir.into());
        self
    }

    /// As [`with_state_dir`](Self::with_state_dir), but a directory that cannot be used
    /// (cannot be created, not a directory, unsafe permissions) does not fail
    /// [`build`](Self::build): the host keeps no state, and
    /// [`PluginHost::state_dir_error`] says why. For a caller that can do without state for
    /// plugins that keep none ([`PluginHost::keeps_state`]).
    pub fn with_state_dir_best_effort(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self.state_dir_best_effort = true;
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
    /// The configuration file is invalid, the shadow directory cannot be created, or a hook
    /// point is declared twice.
    pub fn build(self) -> anyhow::Result<PluginHost> {
        let mut points: Vec<&'static HookSpec> = HookPoint::BUILT_IN.iter().collect();
        for spec in self.hook_points {
            if points.iter().any(|p| p.name == spec.name) {
                anyhow::bail!(
                    "the hook point `{}` is declared twice; each name may be declared once",
                    spec.name
                );
            }
            points.push(spec);
        }
        if points.len() > usize::from(u16::MAX) {
            anyhow::bail!(
                "{} hook points declared; the limit is {}",
                points.len(),
                u16::MAX
            );
        }
        // Both made absolute once: a plugin that changes the working directory must not make
        // the watcher see every plugin gone, or the configuration file vanish.
        let plugins_dir = std::fs::canonicalize(&self.plugins_dir)
            .or_else(|_| std::path::absolute(&self.plugins_dir))
            .with_context(|| {
                format!(
                    "resolving the plugins directory {}",
                    EscapePath(&self.plugins_dir)
                )
            })?;
        let config_file = match self.config_file {
            Some(file) => std::path::absolute(&file).with_context(|| {
                format!("resolving the configuration file {}", EscapePath(&file))
            })?,
            None => plugins_dir.join(CONFIG_FILE_NAME),
        };
        let config = PluginsConfig::read(&config_file)?;
        let sample = match self.call_timing_sample {
            Some(sample) if !crate::stats::valid_timing_sample(sample) => anyhow::bail!(
                "with_call_timing_sample({sample}): the sample is not a power of two from 1 to {}; give 1 to time every call, or {} (the default) to time one in {}",
                crate::stats::MAX_TIMING_SAMPLE,
                crate::stats::DEFAULT_TIMING_SAMPLE,
                crate::stats::DEFAULT_TIMING_SAMPLE
            ),
            Some(sample) => sample,
            None => config
                .call_timing_sample
                .unwrap_or(crate::stats::DEFAULT_TIMING_SAMPLE),
        };
        let quarantine_dir = self.quarantine_dir.or_else(|| self.state_dir.clone());
        let state = self
            .state_dir
            .map(|dir| StateStore::new(dir, self.file_policy.insecure_permissions))
            .transpose();
        let (state, state_dir_error) = match state {
            Ok(state) => (state, None),
            Err(e) if self.state_dir_best_effort => (None, Some(format!("{e:#}"))),
            Err(e) => return Err(e),
        };
        let (shadow_dir, remove_shadow_dir, shadow_lock) = match self.shadow_dir {
            Some(dir) => {
                check_parent_dir(&dir)?;
                use_given_shadow_dir(&dir).with_context(|| {
                    format!("preparing the shadow directory {}", EscapePath(&dir))
                })?;
                (dir, false, None)
            }
            None => {
                let temp = std::env::temp_dir();
                check_parent_dir(&temp.join("x"))?;
                remove_stale_shadow_dirs(&temp);
                let (dir, lock) = create_shadow_dir(&temp).with_context(|| {
                    format!("creating a shadow directory in {}", EscapePath(&temp))
                })?;
                (dir, true, Some(lock))
            }
        };
        let shadow_id = {
            use std::os::unix::fs::MetadataExt as _;
            let meta = std::fs::symlink_metadata(&shadow_dir).with_context(|| {
                format!("checking the shadow directory {}", EscapePath(&shadow_dir))
            })?;
            (meta.dev(), meta.ino())
        };
        let watched = watchdog::Watched::default();
        let watchdog = watchdog::Watchdog::start(Arc::clone(&watched))?;
        // Fire-and-forget deliveries are timed the same way, on the queue's thread.
        let timing = self
            .call_timing
            .then(|| crate::stats::Timing::new(clock(), sample));
        Ok(PluginHost {
            inner: Arc::new(Inner {
                call_timeout_ms: self.call_timeout_ms,
                isolation: self.isolation,
                child_program: self.child_program,
                watched,
                _watchdog: watchdog,
                plugins_dir,
                shadow_dir,
                shadow_id,
                remove_shadow_dir,
                shadow_lock,
                config_file,
                file_policy: self.file_policy,
                config: ArcSwap::from_pointee(config),
                state,
                quarantine_dir,
                store: self.store,
                overrides: self.overrides,
                registry: ArcSwap::from_pointee(Registry::default()),
                names: AtomicU64::new(0),
                host_hooks: Mutex::new(BTreeMap::new()),
                next_hook_id: AtomicU64::new(1),
                points: points.into(),
                fire_queue: FireQueue::start(self.fire_and_forget_capacity, timing.clone())?,
                timing,
                refused: Mutex::new(Vec::new()),
                next_generation: AtomicU64::new(1),
                config_reload_failed: std::sync::atomic::AtomicBool::new(false),
                state_dir_error,
                saving: Mutex::new(()),
                admin: Mutex::new(()),
            }),
        })
    }
}

/// Prefix of the default shadow directories: `plugin-host-<pid>-<random>`.
pub(super) const SHADOW_DIR_PREFIX: &str = "plugin-host-";
/// Length of the random part of a default shadow directory's name.
pub(super) const SHADOW_DIR_RANDOM: usize = 12;

/// Creates a new shadow directory in `temp` as `mkdtemp` does: a name nobody can guess
/// (`plugin-host-<pid>-<12 random characters>`), created with mode 0700 and failing if anything
/// of that name exists, so another user can neither prepare it nor plant links in it. Owner and
/// mode are checked again after creating.
///
/// Returns the directory and its lock file ([`SHADOW_LOCK_FILE`]), locked (`flock`) for as
/// long as the host keeps it open.
pub(super) fn create_shadow_dir(temp: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{SHADOW_DIR_PREFIX}{}-", std::process::id()))
        .rand_bytes(SHADOW_DIR_RANDOM)
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in(temp)?
        // Removed by the host when it drops (only when empty: a library still mapped keeps
        // its copy).
        .keep();
    check_private_dir(&dir, true)?;
    // Locked under another name, then renamed into place: a host sweeping stale directories
    // at the same moment must never find the lock file unlocked (it would take the lock and
    // remove this directory). Until the rename it sees no lock file and a live process.
    let unlocked = dir.join(".lock.new");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&unlocked)
        .context("creating the shadow directory's lock file")?;
    try_lock(&lock).context("locking the shadow directory's lock file")?;
    std::fs::rename(&unlocked, dir.join(SHADOW_LOCK_FILE))
        .context("putting the shadow directory's lock file in place")?;
    Ok((dir, lock))
}

/// Takes an exclusive `flock` on `file` without waiting; held until the file is closed.
fn try_lock(file: &std::fs::File) -> std::io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(std::io::Error::from)
}

/// The lock file in a default shadow directory.
pub(super) const SHADOW_LOCK_FILE: &str = ".lock";

/// Whether the stale-looking shadow directory `dir` may be removed: if it has a lock file,
/// when its lock can be taken (no live host holds it, whatever pid namespace it runs in);
/// the lock is returned, to be held while removing. A directory without a lock file (made
/// before there were lock files) may be removed when the process its name names is gone.
fn stale_dir_lock(dir: &Path, pid: u32) -> Result<Option<std::fs::File>, &'static str> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir.join(SHADOW_LOCK_FILE));
    match opened {
        Ok(lock) => {
            if !lock.metadata().is_ok_and(|m| m.is_file()) {
                return Err("its lock file is not a regular file");
            }
            match try_lock(&lock) {
                Ok(()) => Ok(Some(lock)),
                Err(_) => Err("a live host holds its lock"),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A host being created (its lock file not yet in place) may run in another pid
            // namespace: a directory this young is left alone whatever its pid says.
            let young = std::fs::symlink_metadata(dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < std::time::Duration::from_secs(60));
            if young {
                Err("it was made less than a minute ago")
            } else if Path::new("/proc").join(pid.to_string()).exists() {
                Err("its process still runs")
            } else {
                Ok(None)
            }
        }
        Err(_) => Err("its lock file cannot be opened"),
    }
}

/// Checks that `dir` is a real directory (not a symlink) owned by the worker's user and
/// writable by nobody else; with `exact`, that its mode is exactly 0700.
pub(super) fn check_private_dir(dir: &Path, exact: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::symlink_metadata(dir)?;
    let euid = crate::dylib::effective_uid();
    if !metadata.file_type().is_dir() {
        anyhow::bail!(
            "{} is not a directory (a symlink is not accepted)",
            EscapePath(dir)
        );
    }
    if metadata.uid() != euid {
        anyhow::bail!(
            "{} is owned by uid {}, not by the worker's user (uid {euid}); use a directory of your own",
            EscapePath(dir),
            metadata.uid()
        );
    }
    let mode = metadata.mode() & 0o7777;
    if (exact && mode != 0o700) || mode & 0o022 != 0 {
        anyhow::bail!(
            "{} has mode {mode:04o}; a shadow directory must be writable by its owner only (run `chmod 700 {}`)",
            EscapePath(dir),
            EscapePath(dir)
        );
    }
    Ok(())
}

/// Refuses to make a shadow directory `dir` in a parent that other users can write unless it
/// has the sticky bit (as `/tmp` has): there, another user could rename the shadow directory
/// away and put a directory or link of their own in its place between two copies.
pub(super) fn check_parent_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let Ok(meta) = std::fs::metadata(parent) else {
        // Missing: it is created below, by us.
        return Ok(());
    };
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        anyhow::bail!(
            "the directory {} holding the shadow directory is writable by other users without the sticky bit (mode {mode:04o}): another user could replace the shadow directory; set TMPDIR (or the shadow directory) to a directory of your own, or run `chmod +t {}`",
            EscapePath(parent),
            EscapePath(parent)
        );
    }
    Ok(())
}

/// Prepares a shadow directory the embedder chose: created (mode 0700) if missing, then
/// checked as [`check_private_dir`] does.
pub(super) fn use_given_shadow_dir(dir: &Path) -> anyhow::Result<()> {
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
pub(super) fn shadow_dir_pid(name: &str) -> Option<u32> {
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
pub(super) fn remove_stale_shadow_dirs(temp: &Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(shadow_dir_pid) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let path = entry.path();
        if let Err(e) = check_private_dir(&path, true) {
            tracing::debug!(dir = %EscapePath(&path), reason = %e, "not a shadow directory of ours; left alone");
            continue;
        }
        let _lock = match stale_dir_lock(&path, pid) {
            Ok(lock) => lock,
            Err(reason) => {
                tracing::debug!(dir = %EscapePath(&path), reason, "a shadow directory in use; left alone");
                continue;
            }
        };
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %EscapePath(&path), "removed the shadow copies of a process that is gone")
            }
            Err(e) => {
                tracing::debug!(dir = %EscapePath(&path), error = %e, "could not remove a stale shadow directory")
            }
        }
    }
}

/// The process's calibrated cycle-counter clock (calibrated once, in well under a millisecond).
pub(super) fn clock() -> quanta::Clock {
    static CLOCK: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new).clone()
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
            call_timing_sample: None,
            state_dir: None,
            quarantine_dir: None,
            store: None,
            state_dir_best_effort: false,
            fire_and_forget_capacity: 1024,
            hook_points: &[],
            file_policy: loader::FilePolicy::default(),
            call_timeout_ms: crate::health::DEFAULT_TIMEOUT_MS,
            isolation: crate::Isolation::InProcess,
            child_program: None,
        }
    }
}
