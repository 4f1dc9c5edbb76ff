//! Reading files the worker is handed (its configuration, saved plugin state) without letting
//! the file decide how much is read or whether the read ever ends: only a regular file of
//! bounded size is read. A FIFO would block the open and the read forever, a device such as
//! `/dev/zero` would be read until memory runs out.

use std::fmt;
use std::fs::{File, FileType, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Whether the last component of a path may be a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Symlinks {
    /// Follow it; the file it ends at must pass the checks.
    Follow,
    /// Refuse it ([`FileError::Symlink`]), without reading what it points to.
    Refuse,
}

/// Why a file was not read.
#[derive(Debug)]
pub(crate) enum FileError {
    /// Nothing exists at the path.
    NotFound,
    /// The path is a symbolic link, and links are refused here.
    Symlink,
    /// The path is not a regular file.
    NotRegular(&'static str),
    /// The file is bigger than the limit.
    TooBig {
        /// Its size, or at least how much was there to read.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The file is owned by another user (neither this process's user nor root).
    Foreign {
        /// Its owner's user id.
        owner: u32,
    },
    /// Opening or reading failed.
    Io(std::io::Error),
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::NotFound => write!(f, "it does not exist"),
            FileError::Symlink => write!(
                f,
                "it is a symbolic link, which is not followed here; replace it with a regular file"
            ),
            FileError::NotRegular(kind) => {
                write!(f, "it is {kind}, not a regular file; use a regular file")
            }
            FileError::TooBig { size, limit } => write!(
                f,
                "it is too big ({size} bytes or more; the limit is {limit} bytes)"
            ),
            FileError::Foreign { owner } => write!(
                f,
                "it is owned by another user (uid {owner}), whose files are not trusted here"
            ),
            FileError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FileError {}

fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file of at most `limit` bytes.
///
/// The open never blocks (`O_NONBLOCK`: a FIFO opens at once instead of waiting for a writer)
/// and, with [`Symlinks::Refuse`], never follows a link (`O_NOFOLLOW`). What was opened is then
/// checked on the descriptor itself (`fstat`), so a file swapped after a check is still caught.
pub(crate) fn open_regular(
    path: &Path,
    limit: u64,
    symlinks: Symlinks,
) -> Result<(File, u64), FileError> {
    // A first look without opening: a device or a FIFO is refused before it is even opened
    // (opening some devices has effects of its own).
    let looked = match symlinks {
        Symlinks::Follow => std::fs::metadata(path),
        Symlinks::Refuse => std::fs::symlink_metadata(path),
    };
    match looked {
        Ok(meta) if meta.file_type().is_symlink() => return Err(FileError::Symlink),
        Ok(meta) if !meta.is_file() => {
            return Err(FileError::NotRegular(kind_of(meta.file_type())));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FileError::NotFound),
        Err(e) => return Err(FileError::Io(e)),
    }
    let mut flags = libc::O_NONBLOCK;
    if symlinks == Symlinks::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FileError::NotFound),
        Err(e) if symlinks == Symlinks::Refuse && e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(FileError::Symlink);
        }
        Err(e) => return Err(FileError::Io(e)),
    };
    let meta = file.metadata().map_err(FileError::Io)?;
    if !meta.is_file() {
        return Err(FileError::NotRegular(kind_of(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(FileError::TooBig {
            size: meta.len(),
            limit,
        });
    }
    Ok((file, meta.len()))
}

/// Reads `path` whole if it is a regular file of at most `limit` bytes (see
/// [`open_regular`]). Reads at most `limit + 1` bytes even if the file grows meanwhile.
pub(crate) fn read_regular(
    path: &Path,
    limit: u64,
    symlinks: Symlinks,
) -> Result<Vec<u8>, FileError> {
    let (file, len) = open_regular(path, limit, symlinks)?;
    read_opened(file, len, limit)
}

/// Reads a file opened by [`open_regular`] (of length `len`) whole, at most `limit` bytes.
pub(crate) fn read_opened(file: File, len: u64, limit: u64) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(FileError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooBig {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_regular(&file, 5, Symlinks::Refuse).unwrap(), b"12345");
        assert!(matches!(
            read_regular(&file, 4, Symlinks::Refuse),
            Err(FileError::TooBig { size: 5, limit: 4 })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            read_regular(&link, 5, Symlinks::Refuse),
            Err(FileError::Symlink)
        ));
        assert_eq!(read_regular(&link, 5, Symlinks::Follow).unwrap(), b"12345");
        assert!(matches!(
            read_regular(dir.path(), 5, Symlinks::Follow),
            Err(FileError::NotRegular("a directory"))
        ));
        assert!(matches!(
            read_regular(Path::new("/dev/zero"), 5, Symlinks::Follow),
            Err(FileError::NotRegular("a character device"))
        ));
        assert!(matches!(
            read_regular(&dir.path().join("none"), 5, Symlinks::Follow),
            Err(FileError::NotFound)
        ));
    }
}
