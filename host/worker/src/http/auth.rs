//! The control API's bearer token: read from a file the user gives, or generated once into the
//! state directory with a file only this user can read.

use plugin_host::text::EscapePath;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use anyhow::{Context as _, bail};

/// Bytes of randomness in a generated token (written as hex: 64 characters).
const TOKEN_BYTES: usize = 32;

/// A token file bigger than this is not a token file.
const MAX_TOKEN_FILE: u64 = 4096;

/// Shortest token accepted from a user's file.
const MIN_TOKEN_LEN: usize = 16;

/// The secret that every control API request except `GET /healthz` must present as
/// `Authorization: Bearer <token>`. Its `Debug` output never shows the secret.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token with this secret (surrounding whitespace removed).
    ///
    /// # Errors
    ///
    /// The secret is shorter than 16 characters or holds a character that cannot travel in an
    /// HTTP header (anything but visible ASCII).
    pub fn new(secret: &str) -> anyhow::Result<Self> {
        let secret = secret.trim();
        if secret.len() < MIN_TOKEN_LEN {
            bail!(
                "the token is too short ({} characters); use at least {MIN_TOKEN_LEN}, for example 32 random bytes in hex",
                secret.len()
            );
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "the token holds spaces, control characters or non-ASCII; use visible ASCII only, for example hex"
            );
        }
        Ok(Self(secret.to_owned()))
    }

    /// The secret, for a client that presents it (`worker call --server`).
    pub(crate) fn secret(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, compared in constant time (for tokens of equal
    /// length; a length mismatch fails at once, and the length is not the secret).
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq::constant_time_eq(self.0.as_bytes(), presented)
    }

    /// Reads the token from a file the user chose (`--token-file`): its whole content, with
    /// surrounding whitespace removed.
    ///
    /// A file that its group or other users can read still works, with a warning that says
    /// `chmod 600`: the user chose it, and mounted secrets are often mode 0644 inside a
    /// container. A file that is not a regular file is refused.
    ///
    /// # Errors
    ///
    /// The file cannot be opened, is not a regular file, is bigger than 4 KiB, or does not hold
    /// a usable token.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let not_regular = || {
            anyhow::anyhow!(
                "the control API token file {} is not a regular file; give a file that holds the token",
                EscapePath(path)
            )
        };
        // A first look without opening: a FIFO or a device is refused before it is opened.
        let looked = std::fs::metadata(path)
            .with_context(|| format!("opening the control API token file {}", EscapePath(path)))?;
        if !looked.is_file() {
            return Err(not_regular());
        }
        // Never blocks, even if a FIFO was swapped in after the look (it is then refused by
        // the check on the descriptor below, instead of waiting for a writer forever).
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
            .with_context(|| format!("opening the control API token file {}", EscapePath(path)))?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading the metadata of {}", EscapePath(path)))?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        if meta.mode() & 0o044 != 0 {
            tracing::warn!(
                file = %EscapePath(path),
                mode = format!("{:o}", meta.mode() & 0o777),
                "the control API token file can be read by other users; run `chmod 600` on it"
            );
        }
        let token = read_bounded(file, path)?;
        Self::new(&token).with_context(|| format!("the token in {}", EscapePath(path)))
    }

    /// The token kept in `path` (normally `<state-dir>/control-token`): created with a fresh
    /// random token on first use, reused afterwards.
    ///
    /// The file is created with mode 0600 and never through a symbolic link (`O_CREAT |
    /// O_EXCL | O_NOFOLLOW`). An existing file is reused only if it is a regular file (not a
    /// symbolic link) owned by this user with mode 0600; anything else is refused.
    ///
    /// # Errors
    ///
    /// The directory or the file cannot be created or read, no randomness is available, or
    /// the existing file is not one this process would have made.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the directory {}", EscapePath(dir)))?;
        }
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path);
        match created {
            Ok(mut file) => {
                let mut bytes = [0u8; TOKEN_BYTES];
                getrandom::fill(&mut bytes)
                    .map_err(|e| anyhow::anyhow!("no randomness for the control API token: {e}"))?;
                let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                file.write_all(format!("{secret}\n").as_bytes())
                    .and_then(|()| file.sync_all())
                    .with_context(|| {
                        format!("writing the control API token to {}", EscapePath(path))
                    })?;
                tracing::info!(file = %EscapePath(path), "created a new control API token");
                Self::new(&secret)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::reuse(path),
            Err(e) => Err(e).with_context(|| {
                format!("creating the control API token file {}", EscapePath(path))
            }),
        }
    }

    fn reuse(path: &Path) -> anyhow::Result<Self> {
        let refuse = |why: &str| {
            anyhow::anyhow!(
                "refusing the control API token file {}: {why}; remove it (a new token is made at the next start) or give one with --token-file",
                EscapePath(path)
            )
        };
        // Never through a link, and never blocking (a FIFO planted there is refused below).
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            )
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                    refuse("it is a symbolic link")
                } else {
                    anyhow::Error::new(e).context(format!(
                        "opening the control API token file {}",
                        EscapePath(path)
                    ))
                }
            })?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading the metadata of {}", EscapePath(path)))?;
        if !meta.is_file() {
            return Err(refuse("it is not a regular file"));
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(refuse(&format!(
                "it is owned by uid {}, not by this user (uid {me})",
                meta.uid()
            )));
        }
        if meta.mode() & 0o777 != 0o600 {
            return Err(refuse(&format!(
                "its mode is {:o}, not 600",
                meta.mode() & 0o777
            )));
        }
        let token = read_bounded(file, path)?;
        Self::new(&token).with_context(|| format!("the token in {}", EscapePath(path)))
    }
}

fn read_bounded(file: File, path: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the control API token from {}", EscapePath(path)))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        bail!(
            "the control API token file {} is bigger than {MAX_TOKEN_FILE} bytes; it should hold the token alone",
            EscapePath(path)
        );
    }
    Ok(text)
}
