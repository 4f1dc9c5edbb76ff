//! Quarantine: a plugin that brought the process down (a crash record names it, see
//! [`crate::crash`]) is not loaded in-process again until an operator clears its records.
//!
//! The records are the lines of `crash-records` in the state directory,
//! `plugin<TAB>method<TAB>cause<TAB>unix-seconds`, one per crash. Clearing a plugin removes
//! its lines ([`clear`]); removing them by hand, or the whole file, is the same.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;

use crate::crash::CRASH_RECORDS_FILE;
use crate::files::{FileError, Symlinks, open_regular};
use crate::text::EscapePath;

/// The most of a crash-record file read: its last MiB (records are appended, so the latest
/// are at the end). A bigger file is read from there, with a warning, never ignored: a
/// quarantine must not lift because the file grew.
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
/// The file exists but cannot be read or is not a regular file. Of a file over 1 MiB, the
/// last MiB is read (from its first whole line), with a warning.
pub fn records(dir: &Path) -> anyhow::Result<Vec<CrashRecord>> {
    let path = records_file(dir);
    let Some(bytes) = read_records(&path)? else {
        return Ok(Vec::new());
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

/// The crash-record file's bytes (its last [`MAX_RECORDS_BYTES`], from a line start); `None`
/// when there is no file.
fn read_records(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let unreadable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "reading the crash records {}: {e} (remove the file if it is not the worker's)",
            EscapePath(path)
        )
    };
    let (mut file, len) = match open_regular(path, u64::MAX, Symlinks::Refuse) {
        Ok(opened) => opened,
        Err(FileError::NotFound) => return Ok(None),
        Err(e) => return Err(unreadable(&e)),
    };
    let skip = len.saturating_sub(MAX_RECORDS_BYTES);
    if skip > 0 {
        tracing::warn!(
            file = %EscapePath(path),
            bytes = len,
            "the crash-record file is over 1 MiB: only its last MiB is read; clear old records (worker quarantine clear PLUGIN)"
        );
        file.seek(SeekFrom::Start(skip))
            .map_err(|e| unreadable(&e))?;
    }
    let mut bytes = Vec::new();
    file.take(MAX_RECORDS_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(&e))?;
    if skip > 0 {
        // From the first whole line.
        let start = bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        bytes.drain(..start);
    }
    Ok(Some(bytes))
}

/// Removes `plugin`'s records from `dir`'s crash-record file (in place, so a running worker's
/// open descriptor still reaches it); how many were removed.
///
/// # Errors
///
/// The file cannot be read or written.
pub fn clear(dir: &Path, plugin: &str) -> anyhow::Result<usize> {
    let path = records_file(dir);
    let Some(bytes) = read_records(&path)? else {
        return Ok(0);
    };
    // Every other line is kept byte for byte (the records of other plugins, and lines this
    // version does not read); only the plugin's records go.
    let mut removed = 0;
    let mut text = Vec::with_capacity(bytes.len());
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        if line.split(|&b| b == b'\t').next() == Some(plugin.as_bytes())
            && line.iter().filter(|&&b| b == b'\t').count() == 3
        {
            removed += 1;
        } else {
            text.extend_from_slice(line);
        }
    }
    if removed == 0 {
        return Ok(0);
    }
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(&text)?;
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
        // The line that is not a record is kept as it was.
        let text = std::fs::read_to_string(records_file(dir.path())).unwrap();
        assert_eq!(text, "not a record\nb\tcreate\texit\t18\n");
    }

    /// A file over 1 MiB is read from its last MiB, never ignored: the latest records (at the
    /// end) still quarantine.
    #[test]
    fn an_oversized_file_is_read_from_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = "old\tm\tSIGSEGV\t1\n".repeat(100_000);
        text.push_str("crashy\tsegfault\tSIGSEGV\t2\n");
        assert!(text.len() as u64 > MAX_RECORDS_BYTES);
        std::fs::write(records_file(dir.path()), &text).unwrap();
        let all = records(dir.path()).unwrap();
        assert_eq!(all.last().unwrap().plugin, "crashy");
        assert!(
            all.iter()
                .all(|r| r.plugin == "old" || r.plugin == "crashy")
        );
        assert_eq!(clear(dir.path(), "crashy").unwrap(), 1);
        assert!(
            records(dir.path())
                .unwrap()
                .iter()
                .all(|r| r.plugin == "old")
        );
    }
}
