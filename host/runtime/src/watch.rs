//! Watching the plugins directory: a new file loads, a removed file unloads, a changed file
//! reloads, a changed configuration file applies.
//!
//! Filesystem events (through `notify`) wake the watcher up; what it does is decided by
//! comparing each file's stamp (length, modification time, inode) with the stamp it last acted
//! on. A file is acted on only once its stamp has stayed the same for the settle time *and* its
//! ELF headers say it is complete *and*, where the OS reports it (inotify's `IN_CLOSE_WRITE`
//! and `IN_MOVED_TO`), its writer has closed it: a file written to since its last
//! close-after-write is still being written, even if it is stable and looks complete (a writer
//! that preallocates the full size and fills the code last). A file renamed into place is
//! complete. If notify cannot watch the directory, the watcher polls it, and only the settle
//! time and the ELF check apply.

use crate::text::EscapePath;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher as _};

use crate::PluginHost;
use crate::error::LoadErrorKind;
use crate::loader::{self, FileStamp};

/// How the watcher paces itself.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// How long a file must stay unchanged before it is acted on.
    pub settle: Duration,
    /// How often the directory is checked without any event (a safety net with events; the
    /// only way to notice changes when notify is unavailable).
    pub poll_interval: Duration,
    /// Use polling only, even when notify is available.
    pub force_polling: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            settle: Duration::from_millis(50),
            poll_interval: Duration::from_millis(500),
            force_polling: false,
        }
    }
}

/// How often pending files are looked at again while they settle.
const TICK: Duration = Duration::from_millis(20);

/// A file stable but still incomplete for this long is tried anyway, so that a file that will
/// never be complete gets a refusal with its reason instead of silence.
const GIVE_UP_WAITING: Duration = Duration::from_secs(10);

/// A writer that keeps a file open, unchanged, for this long gets the file refused (it is tried
/// again when it changes, or at a rescan): a wait for a writer must end.
const OPEN_WRITER_LIMIT: Duration = Duration::from_secs(30);

enum Message {
    Changed,
    /// Files written to: their writer may still hold them open.
    Written(Vec<PathBuf>),
    /// Files closed after writing, or renamed into place: their writer is done.
    Closed(Vec<PathBuf>),
    /// Events were lost (the event queue overflowed): what is open is unknown.
    Overflow,
    Rescan,
    Stop,
}

/// Whether an event on `path` can matter to the watcher: a `*.so` file, or the configuration
/// file. Events on the directory itself (the watcher's own listing opens it) and on other files
/// are dropped, or every scan would wake the watcher for the next one.
fn is_relevant(path: &Path, config_name: Option<&OsStr>) -> bool {
    match path.file_name() {
        Some(name) => Some(name) == config_name || path.extension().is_some_and(|ext| ext == "so"),
        None => false,
    }
}

/// What a filesystem event says about the writers of the files it names; `None` for an event
/// that cannot change what the watcher does (opening or reading a file, an event on the
/// directory itself or on a file that is neither a plugin nor the configuration file).
fn message_for(
    event: notify::Result<notify::Event>,
    config_name: Option<&OsStr>,
) -> Option<Message> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
    let Ok(event) = event else {
        return Some(Message::Overflow);
    };
    if event.need_rescan() {
        return Some(Message::Overflow);
    }
    if !event.paths.iter().any(|p| is_relevant(p, config_name)) {
        return None;
    }
    Some(match event.kind {
        // Opening, reading and closing after reading change nothing (the watcher's own checks
        // and the loader's copy do all three).
        EventKind::Access(
            AccessKind::Open(_)
            | AccessKind::Read
            | AccessKind::Close(AccessMode::Read | AccessMode::Execute)
            | AccessKind::Any,
        ) => return None,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => Message::Written(event.paths),
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => {
            Message::Closed(event.paths)
        }
        _ => Message::Changed,
    })
}

/// A running watcher; stops when dropped.
#[derive(Debug)]
pub struct Watcher {
    sender: Sender<Message>,
    thread: Option<JoinHandle<()>>,
    /// How long [`stop`](Self::stop) waits for a load or reload in progress: the host's call
    /// deadline (each plugin entry it may be waiting on has a deadline of its own).
    stop_bound: Duration,
    /// Kept alive for as long as the watcher runs; `None` when polling.
    _notify: Option<notify::RecommendedWatcher>,
}

impl Watcher {
    /// Starts watching the host's plugins directory and configuration file.
    ///
    /// # Errors
    ///
    /// The watcher thread cannot be started.
    pub fn start(host: PluginHost, options: WatchOptions) -> anyhow::Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let notify = if options.force_polling {
            None
        } else {
            let events = sender.clone();
            let config_name = host.config_file().file_name().map(OsStr::to_os_string);
            let watched = notify::recommended_watcher(move |event| {
                if let Some(message) = message_for(event, config_name.as_deref()) {
                    let _ = events.send(message);
                }
            })
            .and_then(|mut watcher| {
                watcher.watch(host.plugins_dir(), RecursiveMode::NonRecursive)?;
                if let Some(dir) = host.config_file().parent()
                    && dir != host.plugins_dir()
                    && dir.is_dir()
                {
                    watcher.watch(dir, RecursiveMode::NonRecursive)?;
                }
                Ok(watcher)
            });
            match watched {
                Ok(watcher) => Some(watcher),
                Err(e) => {
                    tracing::warn!(
                        dir = %EscapePath(host.plugins_dir()),
                        error = %e,
                        poll_ms = options.poll_interval.as_millis(),
                        "cannot watch the plugins directory for events; polling it instead"
                    );
                    None
                }
            }
        };
        let poll_interval = if notify.is_some() {
            options.poll_interval
        } else {
            options.poll_interval.min(Duration::from_millis(100))
        };
        let stop_bound = Duration::from_millis(host.call_timeout_ms());
        let mut state = WatchState::new(host, options.settle);
        let thread = std::thread::Builder::new()
            .name("plugin-watcher".into())
            .spawn(move || {
                loop {
                    let wait = if state.is_settling() {
                        TICK
                    } else {
                        poll_interval
                    };
                    let first = match receiver.recv_timeout(wait) {
                        Ok(message) => Some(message),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    // Everything already queued is taken before one tick: a burst of events
                    // (a file written in many chunks) costs one look at the directory.
                    let mut stop = false;
                    for message in first.into_iter().chain(receiver.try_iter()) {
                        stop |= state.apply(message);
                    }
                    if stop {
                        break;
                    }
                    state.tick();
                }
            })?;
        Ok(Self {
            sender,
            thread: Some(thread),
            stop_bound,
            _notify: notify,
        })
    }

    /// Asks for a full rescan: the configuration file is read again and every file not loaded
    /// is tried again, refused ones included (what SIGHUP does).
    pub fn rescan(&self) {
        let _ = self.sender.send(Message::Rescan);
    }

    /// Stops the watcher and waits for it to finish what it was doing, at most the host's call
    /// deadline (`--call-timeout-ms`); a watcher still busy then is abandoned with a warning.
    pub fn stop(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        let _ = self.sender.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            crate::host::deadline::join_within(thread, self.stop_bound, "plugin-watcher");
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// A file that changed and is settling.
#[derive(Debug)]
struct Pending {
    stamp: Option<FileStamp>,
    since: Instant,
}

struct WatchState {
    host: PluginHost,
    settle: Duration,
    /// The stamp each file had when the watcher last acted on it (or found it at start).
    handled: HashMap<PathBuf, FileStamp>,
    pending: HashMap<PathBuf, Pending>,
    config_stamp: Option<FileStamp>,
    /// Files written to since their last close-after-write (only known from events), with the
    /// time of the last write.
    open_for_writing: HashMap<PathBuf, Instant>,
}

impl WatchState {
    fn new(host: PluginHost, settle: Duration) -> Self {
        let mut handled = HashMap::new();
        for (_, file, stamp) in host.loaded_files() {
            if let Some(stamp) = stamp {
                handled.insert(file, stamp);
            }
        }
        // Files refused before the watcher started are retried only when they change.
        for refusal in host.refused() {
            if let Some(stamp) = loader::stamp(&refusal.file) {
                handled.insert(refusal.file, stamp);
            }
        }
        let config_stamp = loader::stamp(host.config_file());
        Self {
            host,
            settle,
            handled,
            pending: HashMap::new(),
            config_stamp,
            open_for_writing: HashMap::new(),
        }
    }

    /// Takes in one message; `true` for [`Message::Stop`].
    fn apply(&mut self, message: Message) -> bool {
        match message {
            Message::Stop => return true,
            Message::Rescan => self.rescan(),
            Message::Written(paths) => self.written(paths),
            Message::Closed(paths) => self.closed(paths),
            // Events were lost, a close among them perhaps, but so perhaps were writes: a file
            // known to be open for writing stays so until an event says its writer is done (or
            // the wait for it runs out). Forgetting them would load a file still being written.
            Message::Overflow => {
                tracing::warn!(
                    open_for_writing = self.open_for_writing.len(),
                    "filesystem events were lost; files being written are still waited for"
                );
            }
            Message::Changed => {}
        }
        false
    }

    fn written(&mut self, paths: Vec<PathBuf>) {
        let now = Instant::now();
        for path in paths {
            self.open_for_writing.insert(path, now);
        }
    }

    fn closed(&mut self, paths: Vec<PathBuf>) {
        for path in paths {
            self.open_for_writing.remove(&path);
        }
    }

    fn is_settling(&self) -> bool {
        !self.pending.is_empty()
    }

    fn rescan(&mut self) {
        tracing::info!("rescanning the plugins directory");
        self.handled.clear();
        for (_, file, stamp) in self.host.loaded_files() {
            if let Some(stamp) = stamp {
                self.handled.insert(file, stamp);
            }
        }
        self.config_stamp = loader::stamp(self.host.config_file());
        if let Err(e) = self.host.reload_config() {
            tracing::warn!(error = %format!("{e:#}"), "the configuration was not applied");
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        self.forget_removed();
        let files = loader::plugin_files(self.host.plugins_dir());
        let config_file = self.host.config_file().to_path_buf();

        // What changed since the watcher last acted on it.
        let mut seen: Vec<(PathBuf, Option<FileStamp>)> = files
            .into_iter()
            .filter(|(path, stamp)| self.handled.get(path) != stamp.as_ref())
            .collect();
        let loaded = self.host.loaded_files();
        for (_, file, _) in &loaded {
            if !file.exists() {
                seen.push((file.clone(), None));
            }
        }
        let config_stamp = loader::stamp(&config_file);
        if config_stamp != self.config_stamp {
            seen.push((config_file.clone(), config_stamp));
        }

        let mut ready = Vec::new();
        let changed: Vec<PathBuf> = seen.iter().map(|(p, _)| p.clone()).collect();
        for (path, stamp) in seen {
            match self.pending.get(&path) {
                Some(p) if p.stamp == stamp => {
                    if now.duration_since(p.since) >= self.settle {
                        ready.push((path, stamp, now.duration_since(p.since)));
                    }
                }
                _ => {
                    self.pending.insert(path, Pending { stamp, since: now });
                }
            }
        }
        // Files that went back to what was handled (or vanished unloaded) need nothing.
        self.pending.retain(|path, _| changed.contains(path));
        self.open_for_writing.retain(|path, _| path.exists());

        for (path, stamp, waited) in ready {
            if path == config_file {
                self.pending.remove(&path);
                self.config_stamp = stamp;
                self.apply_config();
                continue;
            }
            let plugin = loaded
                .iter()
                .find(|(_, file, _)| *file == path)
                .map(|(name, _, _)| name.clone());
            let Some(stamp) = stamp else {
                self.pending.remove(&path);
                self.handled.remove(&path);
                if let Some(plugin) = plugin {
                    tracing::info!(plugin = %plugin, file = %EscapePath(&path), "plugin file removed");
                    if let Err(e) = self.host.unload(&plugin) {
                        tracing::warn!(error = %format!("{e:#}"), "unload failed");
                    }
                }
                continue;
            };
            if let Some(&last_write) = self.open_for_writing.get(&path) {
                let idle = now.duration_since(last_write);
                if idle < OPEN_WRITER_LIMIT {
                    tracing::debug!(file = %EscapePath(&path), "waiting for the writer to close the file");
                    continue;
                }
                tracing::warn!(
                    file = %EscapePath(&path),
                    idle_s = idle.as_secs(),
                    "the file is still open for writing; refused until it changes"
                );
                self.pending.remove(&path);
                self.open_for_writing.remove(&path);
                self.handled.insert(path.clone(), stamp);
                self.host.note_refused(
                    &path,
                    LoadErrorKind::StillOpenForWriting {
                        seconds: idle.as_secs(),
                    },
                );
                continue;
            }
            match loader::check_complete(&path) {
                Err(LoadErrorKind::Truncated { .. } | LoadErrorKind::Empty)
                    if waited < GIVE_UP_WAITING =>
                {
                    tracing::debug!(file = %EscapePath(&path), "waiting for the file to be complete");
                    continue;
                }
                _ => {}
            }
            self.pending.remove(&path);
            self.handled.insert(path.clone(), stamp);
            let result = match &plugin {
                Some(plugin) => self.host.reload(plugin).map(|_| ()),
                None => self.host.load(&path).map(|_| ()),
            };
            if let Err(e) = result {
                // The host logged the refusal and, on a failed reload, kept the old generation.
                tracing::debug!(file = %EscapePath(&path), error = %format!("{e:#}"), "change not applied");
            }
        }
    }

    /// Forgets handled files that are gone; a file refused because a file now gone claimed the
    /// same plugin name is tried again.
    fn forget_removed(&mut self) {
        let gone: Vec<PathBuf> = self
            .handled
            .keys()
            .filter(|path| std::fs::symlink_metadata(path).is_err())
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        for refusal in self.host.refused() {
            if let LoadErrorKind::NameConflict { others, .. } = &refusal.kind
                && others.iter().any(|other| gone.contains(other))
            {
                self.handled.remove(&refusal.file);
            }
        }
        for path in gone {
            self.handled.remove(&path);
        }
    }

    fn apply_config(&mut self) {
        tracing::info!(file = %EscapePath(self.host.config_file()), "configuration changed");
        match self.host.reload_config() {
            Ok(report) => {
                for (_, file, stamp) in self.host.loaded_files() {
                    if let Some(stamp) = stamp {
                        self.handled.insert(file, stamp);
                    }
                }
                for refusal in report.refused {
                    if let Some(stamp) = loader::stamp(&refusal.file) {
                        self.handled.insert(refusal.file, stamp);
                    }
                }
            }
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "the new configuration was not applied; the previous one stays in force"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_events_do_not_forget_a_file_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let host = PluginHost::builder(&plugins)
            .with_shadow_dir(dir.path().join("shadow"))
            .build()
            .unwrap();
        let mut state = WatchState::new(host, Duration::from_millis(50));
        let file = plugins.join("libslow.so");
        assert!(!state.apply(Message::Written(vec![file.clone()])));
        assert!(!state.apply(Message::Overflow));
        assert!(
            state.open_for_writing.contains_key(&file),
            "an overflow forgot the writer"
        );
        assert!(!state.apply(Message::Closed(vec![file.clone()])));
        assert!(!state.open_for_writing.contains_key(&file));
        assert!(state.apply(Message::Stop));
    }
}
