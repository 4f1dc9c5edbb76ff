//! Quarantine: a plugin that brought the process down (a crash record names it, see
//! [`crate::crash`]) is not loaded in-process again until an operator clears its records.
//!
//! The records are the lines of `crash-records` in the state directory,
//! `plugin<TAB>method<TAB>cause<TAB>unix-seconds`, one per crash. Clearing a plugin removes
//! its lines ([`clear`]); removing them by hand, or the whole file, is the same.

use std::io::{Seek as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;

use crate::crash::CRASH_RECORDS_FILE;
use crate::files::{FileError, Symlinks, read_regular};
use crate::text::EscapePath;

/// The largest crash-record file read.
const MAX_RECORDS_BYTES: u64 = 1 << 20;

/// One crash: the plugin whose code the crashing thread ran, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrashRecord {
    /// The plugin.
    pub plugin: String,
    /// The method, hook or lifecycle entry (`create`, `save_state`, ...) it was running (cut to
    /// 32 bytes; `?` when not known).
    pub method: String,
    /// `SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`, `SIGABRT` (an `abort`, a double panic, a stack
    /// overflow, a failed allocation) or `exit`.
    pub cause: String,
    /// When, in seconds since the Unix epoch.
    pub time: u64,
}

impl CrashRecord {
    /// The reason in words: `SIGSEGV in `segfault``.
    pub fn reason(&self) -> String {
        format!(
            "it brought the worker down ({} in `{}`)",
            self.cause, self.method
        )
    }
}

/// The crash-record file of a state directory.
pub fn records_file(dir: &Path) -> PathBuf {
    dir.join(CRASH_RECORDS_FILE)
}

/// The crash records in `dir`, oldest first; none when there is no file. A line that is not a
/// record is skipped with a warning.
///
/// # Errors
///
/// The file exists but cannot be read, is not a regular file, or is over 1 MiB.
pub fn records(dir: &Path) -> anyhow::Result<Vec<CrashRecord>> {
    let path = records_file(dir);
    let bytes = match read_regular(&path, MAX_RECORDS_BYTES, Symlinks::Refuse) {
        Ok(bytes) => bytes,
        Err(FileError::NotFound) => return Ok(Vec::new()),
        Err(e) => {
            return Err(anyhow::anyhow!(
                "reading the crash records {}: {e}",
                EscapePath(&path)
            ));
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut records = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        match fields[..] {
            [plugin, method, cause, time] if !plugin.is_empty() => records.push(CrashRecord {
                plugin: plugin.to_owned(),
                method: method.to_owned(),
                cause: cause.to_owned(),
                time: time.parse().unwrap_or(0),
            }),
            _ => tracing::warn!(
                file = %EscapePath(&path),
                line = number + 1,
                "not a crash record (plugin, method, cause and time, tab-separated); skipped"
            ),
        }
    }
    Ok(records)
}

/// Removes `plugin`'s records from `dir`'s crash-record file (in place, so a running worker's
/// open descriptor still reaches it); how many were removed.
///
/// # Errors
///
/// The file cannot be read or written.
pub fn clear(dir: &Path, plugin: &str) -> anyhow::Result<usize> {
    let path = records_file(dir);
    let all = records(dir)?;
    let kept: Vec<&CrashRecord> = all.iter().filter(|r| r.plugin != plugin).collect();
    let removed = all.len() - kept.len();
    if removed == 0 {
        return Ok(0);
    }
    let mut text = String::new();
    for r in kept {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            r.plugin, r.method, r.cause, r.time
        ));
    }
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    };
    write().with_context(|| format!("rewriting the crash records {}", EscapePath(&path)))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_and_cleared_per_plugin_and_junk_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        assert!(records(dir.path()).unwrap().is_empty());
        std::fs::write(
            records_file(dir.path()),
            "a\tm\tSIGSEGV\t17\nnot a record\nb\tcreate\texit\t18\na\t?\tSIGABRT\t19\n",
        )
        .unwrap();
        let all = records(dir.path()).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(
            all[1].reason(),
            "it brought the worker down (exit in `create`)"
        );
        assert_eq!(clear(dir.path(), "a").unwrap(), 2);
        assert_eq!(clear(dir.path(), "a").unwrap(), 0);
        let left = records(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].plugin.as_str(), left[0].time), ("b", 18));
    }
}
