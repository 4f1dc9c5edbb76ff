//! Getting a file ready to open: the shadow copy and the ELF completeness check.
//!
//! The plugin file itself is never opened by the dynamic loader: a file overwritten while mapped
//! crashes the process, and `dlopen` of a path it has seen returns the old library. Each
//! generation is copied to a unique path in a private directory, and that copy is checked and
//! opened.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;

use crate::dylib::ShadowFile;
use crate::error::LoadError;

/// Copies `file` to `<shadow_dir>/<stem>.<pid>.<generation>.so`.
pub(crate) fn shadow_copy(
    file: &Path,
    shadow_dir: &Path,
    generation: u64,
) -> Result<ShadowFile, LoadError> {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".to_owned());
    let shadow = shadow_dir.join(format!(
        "{stem}.{}.{generation}.{}",
        std::process::id(),
        std::env::consts::DLL_EXTENSION
    ));
    match std::fs::copy(file, &shadow) {
        Ok(_) => Ok(ShadowFile(shadow)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !file.exists() => {
            Err(LoadError::NotFound)
        }
        Err(e) => Err(LoadError::NotLoadable {
            reason: format!("copying it to {} failed: {e}", shadow.display()),
        }),
    }
}

/// Checks that `path` is a complete ELF shared object: a half-written file would crash the
/// process when opened. Complete means the section header table, which linkers write last,
/// ends exactly where the file does.
pub(crate) fn check_elf(path: &Path) -> Result<(), LoadError> {
    let not_so = |reason: &str| LoadError::NotSharedLibrary {
        reason: reason.to_owned(),
    };
    let io = |e: std::io::Error| LoadError::NotLoadable {
        reason: format!("reading {}: {e}", path.display()),
    };
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(LoadError::Empty);
    }
    let mut header = Vec::with_capacity(64);
    file.by_ref()
        .take(64)
        .read_to_end(&mut header)
        .map_err(io)?;
    if header.len() < 4 || header[..4] != *b"\x7fELF" {
        return Err(not_so("no ELF magic bytes"));
    }
    let is_64 = match header.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(not_so("unknown ELF class")),
    };
    let little = match header.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err(not_so("unknown ELF byte order")),
    };
    let header_len = if is_64 { 64 } else { 52 };
    if header.len() < header_len {
        return Err(LoadError::Truncated {
            expected: header_len as u64,
            actual: len,
        });
    }
    let u16_at = |at: usize| {
        let b = [header[at], header[at + 1]];
        u64::from(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let word_at = |at: usize, wide: bool| {
        if wide {
            let mut b = [0; 8];
            b.copy_from_slice(&header[at..at + 8]);
            if little {
                u64::from_le_bytes(b)
            } else {
                u64::from_be_bytes(b)
            }
        } else {
            let mut b = [0; 4];
            b.copy_from_slice(&header[at..at + 4]);
            u64::from(if little {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            })
        }
    };
    const ET_DYN: u64 = 3;
    let e_type = u16_at(16);
    if e_type != ET_DYN {
        return Err(not_so(&format!(
            "ELF type {e_type}, not a shared object (type {ET_DYN})"
        )));
    }
    let (shoff, shentsize, shnum) = if is_64 {
        (word_at(0x28, true), u16_at(0x3a), u16_at(0x3c))
    } else {
        (word_at(0x20, false), u16_at(0x2e), u16_at(0x30))
    };
    let expected = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if expected > len {
        return Err(LoadError::Truncated {
            expected,
            actual: len,
        });
    }
    Ok(())
}

/// What identifies one version of a file: length, modification time and inode. A rename into
/// place changes the inode; a write in place changes the length or the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub(crate) len: u64,
    pub(crate) modified: Option<std::time::SystemTime>,
    pub(crate) inode: u64,
}

/// The stamp of `path`, or `None` when it cannot be read.
pub(crate) fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        len: metadata.len(),
        modified: metadata.modified().ok(),
        inode: metadata.ino(),
    })
}

/// The plugin files in `dir`: shared libraries (by suffix), not hidden, in name order, with
/// their stamps. Hidden files are left alone so that a copy in progress can be written under a
/// hidden name and renamed into place.
pub(crate) fn plugin_files(dir: &Path) -> Vec<(std::path::PathBuf, Option<FileStamp>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == std::env::consts::DLL_EXTENSION)
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && path.is_file()
        })
        .map(|path| {
            let stamp = stamp(&path);
            (path, stamp)
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}
