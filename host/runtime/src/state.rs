//! Plugin state on disk: one JSON file per plugin in a state directory, written atomically
//! (temporary file, fsync, rename, fsync of the directory). A file that cannot be read or is not
//! JSON is never deleted: it is moved aside under a new name and the plugin starts fresh.
//!
//! The directory may be shared with, or reachable by, other local users, so nothing in it is
//! trusted to be what its name says:
//! - the temporary file has a random name and is created with `O_CREAT | O_EXCL` and mode 0600
//!   (`O_EXCL` refuses an existing name, a symbolic link planted there included), so a planted
//!   link can never make the worker write through it;
//! - a state file is read only if it is a regular file (opened with `O_NOFOLLOW | O_NONBLOCK`,
//!   checked with `fstat`) of at most [`MAX_STATE_BYTES`]; a symbolic link is refused with a
//!   warning, never followed;
//! - the directory's path is made absolute once, when the store is made: a plugin that changes
//!   the process's working directory cannot redirect it;
//! - the directory itself must be owned by the worker's user (or root) and writable by no one
//!   else, as sshd's StrictModes (unless `insecure_permissions`, then with a warning): in a
//!   directory others can write, they could plant a state file for a plugin;
//! - a state file owned by another user (but root) is never read.

use crate::text::EscapePath;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use crate::files::{FileError, Symlinks};

/// The largest state file read back (64 MiB); a bigger one is set aside.
pub(crate) const MAX_STATE_BYTES: u64 = 64 << 20;

/// The state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateStore {
    /// Absolute, resolved once in [`StateStore::new`].
    dir: PathBuf,
}

/// Plugin names come from plugins; keep only characters that are safe in a file name.
fn file_stem(plugin: &str) -> String {
    plugin
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl StateStore {
    /// The store in `dir`, created (mode 0700) if missing. The path is resolved to an absolute
    /// one now and kept. A directory owned by another user (but root), or writable by its group
    /// or others, is refused, or only warned about with `insecure_permissions`.
    pub(crate) fn new(dir: PathBuf, insecure_permissions: bool) -> anyhow::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating the state directory {}", EscapePath(&dir)))?;
        let dir = std::fs::canonicalize(&dir)
            .with_context(|| format!("resolving the state directory {}", EscapePath(&dir)))?;
        if !dir.is_dir() {
            anyhow::bail!(
                "the state directory {} is not a directory; pass another --state-dir",
                EscapePath(&dir)
            );
        }
        let meta = std::fs::metadata(&dir)
            .with_context(|| format!("checking the state directory {}", EscapePath(&dir)))?;
        let euid = crate::dylib::effective_uid();
        let mode = meta.mode() & 0o7777;
        let problem = if meta.uid() != euid && meta.uid() != 0 {
            Some(format!(
                "it is owned by uid {}, not by the worker's user (uid {euid}) or root; run `chown {euid} {}`",
                meta.uid(),
                EscapePath(&dir)
            ))
        } else if mode & 0o022 != 0 {
            Some(format!(
                "it is writable by other users (mode {mode:04o}), who could plant saved state for a plugin; run `chmod go-w {}`",
                EscapePath(&dir)
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            if !insecure_permissions {
                anyhow::bail!(
                    "refusing the state directory {}: {problem} (or start the worker with --insecure-permissions, for development only)",
                    EscapePath(&dir)
                );
            }
            tracing::warn!(
                dir = %EscapePath(&dir),
                reason = %problem,
                "insecure state directory allowed by --insecure-permissions"
            );
        }
        Ok(Self { dir })
    }

    pub(crate) fn path(&self, plugin: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_stem(plugin)))
    }

    /// Writes `state` (JSON text) for `plugin`, replacing the previous file atomically.
    ///
    /// If the state file's name is taken by a symbolic link, the link itself is replaced (the
    /// rename does not follow it), with a warning; its target is never written.
    pub(crate) fn save(&self, plugin: &str, state: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(plugin);
        let write = || -> std::io::Result<()> {
            let mut temp = tempfile::Builder::new()
                .prefix(&format!(".{}.json.", file_stem(plugin)))
                .suffix(".tmp")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .tempfile_in(&self.dir)?;
            temp.write_all(state.as_bytes())?;
            temp.as_file().sync_all()?;
            if let Ok(meta) = std::fs::symlink_metadata(&path)
                && meta.file_type().is_symlink()
            {
                tracing::warn!(
                    plugin,
                    file = %EscapePath(&path),
                    "the state file is a symbolic link; replacing the link itself, its target is left alone"
                );
            }
            temp.persist(&path).map_err(|e| e.error)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write()
            .with_context(|| format!("saving the state of `{plugin}` to {}", EscapePath(&path)))?;
        Ok(path)
    }

    /// The saved state of `plugin`, if there is a readable one. A file that cannot be read or is
    /// not JSON is moved aside with a warning, and `None` is returned. A symbolic link is not
    /// followed (a warning names it; the next save replaces the link).
    pub(crate) fn load(&self, plugin: &str) -> Option<String> {
        let path = self.path(plugin);
        let read = crate::files::open_regular(&path, MAX_STATE_BYTES, Symlinks::Refuse).and_then(
            |(file, len)| {
                let owner = file.metadata().map_err(FileError::Io)?.uid();
                let euid = crate::dylib::effective_uid();
                if owner != euid && owner != 0 {
                    return Err(FileError::Foreign { owner });
                }
                crate::files::read_opened(file, len, MAX_STATE_BYTES)
            },
        );
        let problem = match read {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(_) => return Some(text),
                    Err(e) => format!("it is not valid JSON ({e})"),
                },
                Err(e) => format!("it is not UTF-8 text ({})", e.utf8_error()),
            },
            Err(FileError::NotFound) => return None,
            Err(
                e @ (FileError::Symlink | FileError::NotRegular(_) | FileError::Foreign { .. }),
            ) => {
                tracing::warn!(
                    plugin,
                    file = %EscapePath(&path),
                    "the saved state of `{plugin}` is not read: {e}; the plugin starts fresh"
                );
                return None;
            }
            Err(e) => format!("it cannot be read ({e})"),
        };
        let aside = self.set_aside(&path, "corrupt");
        tracing::warn!(
            plugin,
            file = %EscapePath(&path),
            kept_as = %aside.as_ref().map_or_else(|e| format!("(could not move it: {e})"), |p| EscapePath(p).to_string()),
            "the saved state of `{plugin}` is unusable: {problem}; the plugin starts fresh"
        );
        None
    }

    /// Moves the state file of `plugin` aside (the plugin refused it).
    pub(crate) fn reject(&self, plugin: &str, reason: &str) {
        let path = self.path(plugin);
        let aside = self.set_aside(&path, "rejected");
        tracing::warn!(
            plugin,
            file = %EscapePath(&path),
            kept_as = %aside.as_ref().map_or_else(|e| format!("(could not move it: {e})"), |p| EscapePath(p).to_string()),
            "`{plugin}` refused its saved state: {}; it starts fresh",
            crate::text::EscapeControl(reason)
        );
    }

    /// Renames `path` to `<path>.<why>-<unix seconds>[-n]`, never overwriting anything (a
    /// symbolic link counts as taken).
    fn set_aside(&self, path: &Path, why: &str) -> std::io::Result<PathBuf> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut base = path.as_os_str().to_os_string();
        base.push(format!(".{why}-{secs}"));
        let mut candidate = PathBuf::from(&base);
        let mut n = 1;
        while std::fs::symlink_metadata(&candidate).is_ok() {
            let mut numbered = base.clone();
            numbered.push(format!("-{n}"));
            candidate = PathBuf::from(numbered);
            n += 1;
        }
        std::fs::rename(path, &candidate)?;
        Ok(candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"), false).unwrap();
        assert_eq!(store.load("a/b"), None);
        let path = store.save("a/b", r#"{"n": 1}"#).unwrap();
        assert_eq!(path.file_name().unwrap(), "a_b.json");
        assert_eq!(store.load("a/b").as_deref(), Some(r#"{"n": 1}"#));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn corrupt_file_is_kept_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().to_path_buf(), false).unwrap();
        std::fs::write(store.path("p"), "{ half a file").unwrap();
        assert_eq!(store.load("p"), None);
        assert!(!store.path("p").exists());
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(kept.len(), 1);
        assert!(kept[0].starts_with("p.json.corrupt-"), "{kept:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(&kept[0])).unwrap(),
            "{ half a file"
        );
    }
}
