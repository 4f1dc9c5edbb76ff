//! Plugin state on disk: one JSON file per plugin in a state directory, written atomically
//! (temporary file, fsync, rename, fsync of the directory). A file that cannot be read or is not
//! JSON is never deleted: it is moved aside under a new name and the plugin starts fresh.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

/// The state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateStore {
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
    pub(crate) fn new(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
        Ok(Self { dir })
    }

    pub(crate) fn path(&self, plugin: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_stem(plugin)))
    }

    /// Writes `state` (JSON text) for `plugin`, replacing the previous file atomically.
    pub(crate) fn save(&self, plugin: &str, state: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(plugin);
        let temp = self.dir.join(format!(".{}.json.tmp", file_stem(plugin)));
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temp)?;
            file.write_all(state.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().with_context(|| format!("saving the state of `{plugin}` to {}", path.display()))?;
        Ok(path)
    }

    /// The saved state of `plugin`, if there is a readable one. A file that cannot be read or is
    /// not JSON is moved aside with a warning, and `None` is returned.
    pub(crate) fn load(&self, plugin: &str) -> Option<String> {
        let path = self.path(plugin);
        let problem = match std::fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(_) => return Some(text),
                Err(e) => format!("it is not valid JSON ({e})"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => format!("it cannot be read ({e})"),
        };
        let aside = self.set_aside(&path, "corrupt");
        tracing::warn!(
            plugin,
            file = %path.display(),
            kept_as = %aside.as_ref().map_or_else(|e| format!("(could not move it: {e})"), |p| p.display().to_string()),
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
            file = %path.display(),
            kept_as = %aside.as_ref().map_or_else(|e| format!("(could not move it: {e})"), |p| p.display().to_string()),
            "`{plugin}` refused its saved state: {reason}; it starts fresh"
        );
    }

    /// Renames `path` to `<path>.<why>-<unix seconds>[-n]`, never overwriting anything.
    fn set_aside(&self, path: &Path, why: &str) -> std::io::Result<PathBuf> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let base = format!("{}.{why}-{secs}", path.display());
        let mut candidate = PathBuf::from(&base);
        let mut n = 1;
        while candidate.exists() {
            candidate = PathBuf::from(format!("{base}-{n}"));
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
        let store = StateStore::new(dir.path().join("state")).unwrap();
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
        let store = StateStore::new(dir.path().to_path_buf()).unwrap();
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
