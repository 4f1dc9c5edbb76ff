//! One writer per state directory: `serve`, `run` and `call` hold an exclusive `flock` on
//! `worker.lock` in the state directory for as long as they run. Another command on the same
//! directory is refused with what holds it; a serving worker also writes its control API
//! address there, so `call` can say how to reach it (`worker call --server URL`).

use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plugin_host::text::EscapePath;
use serde::{Deserialize, Serialize};

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "worker.lock";

/// What the holder wrote in the lock file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    control: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_file: Option<String>,
}

/// The held lock on a state directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateLock {
    file: std::fs::File,
    dir: PathBuf,
    command: &'static str,
}

impl StateLock {
    /// Takes the lock of the state directory `dir` (which exists) for `command` without
    /// waiting.
    ///
    /// # Errors
    ///
    /// Another worker holds it (the error says which, and for a serving one how to reach it),
    /// or the lock file cannot be opened.
    pub fn take(dir: &Path, command: &'static str) -> anyhow::Result<StateLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            )
            .open(&path)
            .with_context(|| format!("opening the state lock file {}", EscapePath(&path)))?;
        // A FIFO or a device put there would take the holder's note (or block on it).
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            anyhow::bail!(
                "the state lock file {} is not a regular file; remove it (the worker makes a new one)",
                EscapePath(&path)
            );
        }
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            // The holder writes its note just after it took the lock: a worker started at the
            // same moment may find it empty, and looks again for up to a second.
            let mut holder = Holder::default();
            for attempt in 0..40 {
                if attempt > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                let mut text = String::new();
                let _ = file.rewind();
                let _ = std::io::Read::by_ref(&mut file)
                    .take(4096)
                    .read_to_string(&mut text);
                if let Ok(read) = serde_json::from_str::<Holder>(&text) {
                    holder = read;
                    break;
                }
            }
            anyhow::bail!("{}", busy_message(dir, &holder));
        }
        let mut lock = StateLock {
            file,
            dir: dir.to_path_buf(),
            command,
        };
        lock.write(&Holder {
            pid: std::process::id(),
            command: command.to_owned(),
            ..Holder::default()
        });
        Ok(lock)
    }

    /// Records where the serving worker's control API is, for the commands it refuses.
    pub fn announce(&mut self, control: &str, token_file: &Path) {
        let holder = Holder {
            pid: std::process::id(),
            command: self.command.to_owned(),
            control: Some(control.to_owned()),
            token_file: Some(token_file.display().to_string()),
        };
        self.write(&holder);
    }

    fn write(&mut self, holder: &Holder) {
        let written = (|| -> std::io::Result<()> {
            let text = serde_json::to_string(holder).map_err(std::io::Error::other)?;
            self.file.set_len(0)?;
            self.file.rewind()?;
            self.file.write_all(text.as_bytes())?;
            self.file.write_all(b"\n")
        })();
        if let Err(e) = written {
            tracing::warn!(dir = %EscapePath(&self.dir), error = %e, "could not write the state lock file");
        }
    }
}

/// Why the state directory is busy, and what to do.
fn busy_message(dir: &Path, holder: &Holder) -> String {
    let dir_shown = EscapePath(dir);
    let pid = if holder.pid == 0 {
        String::new()
    } else {
        format!(" (pid {})", holder.pid)
    };
    match (&holder.control, holder.command.as_str()) {
        (Some(control), _) => {
            let token = holder
                .token_file
                .as_deref()
                .map(|t| format!(" --token-file {t}"))
                .unwrap_or_default();
            format!(
                "a worker{pid} is serving from the state directory {dir_shown}, with its control API on {control}: call it there with `worker --state-dir {dir_shown} call --server {control}{token} PLUGIN METHOD [PARAMS_JSON]` (a call here would read stale state and its changes would be lost), or stop it first"
            )
        }
        (None, "") => format!(
            "another worker{pid} is using the state directory {dir_shown}; wait for it to finish, or give another --state-dir"
        ),
        (None, command) => format!(
            "another worker{pid} (`worker {command}`) is using the state directory {dir_shown}; wait for it to finish, or give another --state-dir"
        ),
    }
}
