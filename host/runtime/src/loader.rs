//! Getting a file ready to open: what a file in the plugins directory must be before any of its
//! code can run, and the shadow copy that is opened instead of it.
//!
//! A file becomes a loaded plugin in these steps, each of which can refuse it with a reason:
//!
//! 1. [`read_plugin_file`]: the name is a regular file (a symlink counts as its target), its
//!    ownership and permissions and those of its directory are safe (as sshd's StrictModes),
//!    it is no bigger than the configured maximum and starts with the ELF magic bytes. The file
//!    is opened once; every check after the open is made on that descriptor (`fstat`), and the
//!    bytes checked below are the bytes read from it.
//! 2. [`check_elf`]: from those bytes, an ELF shared object of the host's class, byte order and
//!    machine, complete, exporting `PLUGIN_HOST_HEADER` as a data object of the header's exact
//!    size inside a loaded segment, with the right magic bytes and header version. A system
//!    library or any other shared object fails here: the dynamic loader never sees it, so none
//!    of its constructors runs.
//! 3. [`shadow_copy`]: the same bytes go to a new file in the host's private shadow directory,
//!    created with `O_CREAT | O_EXCL | O_NOFOLLOW`; that copy is what `dlopen` opens.
//!
//! The plugin file itself is never opened by the dynamic loader: a file overwritten while mapped
//! crashes the process, and `dlopen` of a path it has seen returns the old library.

use crate::text::EscapePath;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use object::Endian as _;
use object::read::elf::{FileHeader as _, ProgramHeader as _, Sym as _};
use plugin_api::abi::{HEADER_SYMBOL, HEADER_VERSION, MAGIC, PluginHeader};

use crate::dylib::{ShadowFile, effective_uid};
use crate::error::LoadErrorKind;

/// Default largest plugin file accepted: 256 MiB.
pub(crate) const DEFAULT_MAX_PLUGIN_SIZE: u64 = 256 << 20;

/// What the host accepts as a plugin file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FilePolicy {
    /// Largest file accepted, in bytes.
    pub(crate) max_size: u64,
    /// Unsafe ownership or permissions are a warning instead of a refusal.
    pub(crate) insecure_permissions: bool,
}

impl Default for FilePolicy {
    fn default() -> Self {
        Self {
            max_size: DEFAULT_MAX_PLUGIN_SIZE,
            insecure_permissions: false,
        }
    }
}

/// Where the plugin header is in a file that passed [`check_elf`]: the header symbol's virtual
/// address relative to the library's load address.
///
/// Only [`check_elf`] makes one, so holding one means the file was checked: it is what
/// `PluginLibrary::open` needs to find the header without `dlsym` (which would run an IFUNC
/// resolver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeaderLocation {
    vaddr: u64,
}

impl HeaderLocation {
    /// The header's address relative to the library's load address.
    pub(crate) fn vaddr(self) -> u64 {
        self.vaddr
    }
}

/// A plugin file that passed every check made before any of its code can run.
#[derive(Debug)]
pub(crate) struct CheckedFile {
    /// The bytes read from the file: what was checked, and what is copied.
    bytes: Vec<u8>,
    /// The plugin header inside them.
    pub(crate) header: HeaderLocation,
    /// The file as it was read.
    pub(crate) stamp: FileStamp,
}

/// Reads `path` and checks it up to the point where it could be opened: [`read_plugin_file`]
/// and [`check_elf`].
pub(crate) fn check_plugin_file(
    path: &Path,
    policy: FilePolicy,
) -> Result<CheckedFile, LoadErrorKind> {
    let (bytes, stamp) = read_plugin_file(path, policy)?;
    let header = check_elf(&bytes)?;
    Ok(CheckedFile {
        bytes,
        header,
        stamp,
    })
}

/// What kind of file system object `file_type` is, for a refusal.
fn kind_of(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a named pipe (FIFO)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Checks who may write `path` (described by `metadata`): its owner must be the worker's
/// effective user or root, and neither group nor others may write it. With
/// `insecure_permissions`, a violation is logged instead.
fn check_ownership(
    path: &Path,
    metadata: &std::fs::Metadata,
    what: &str,
    policy: FilePolicy,
) -> Result<(), LoadErrorKind> {
    let euid = effective_uid();
    let uid = metadata.uid();
    let mode = metadata.mode() & 0o7777;
    let reason = if uid != euid && uid != 0 {
        Some(format!(
            "the {what} {} is owned by uid {uid}, not by the worker's user (uid {euid}) or root: another user could replace the plugin; run `chown {euid} {}`",
            EscapePath(path),
            EscapePath(path)
        ))
    } else if mode & 0o022 != 0 {
        Some(format!(
            "the {what} {} is writable by {} (mode {mode:04o}): another user could replace the plugin; run `chmod go-w {}`",
            EscapePath(path),
            match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "group and others",
                (true, false) => "its group",
                _ => "others",
            },
            EscapePath(path)
        ))
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) if policy.insecure_permissions => {
            tracing::warn!(path = %EscapePath(path), %reason, "insecure permissions allowed by --insecure-permissions");
            Ok(())
        }
        Some(reason) => Err(LoadErrorKind::InsecurePermissions { reason }),
    }
}

/// The directory that holds `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Opens `path` once and reads it, after checking what it is from the open descriptor: a
/// regular file (a symlink is followed, and its target must pass the same checks), safe
/// ownership and permissions (the file and its directory), no bigger than `policy.max_size`,
/// starting with the ELF magic bytes.
///
/// # Errors
///
/// The refusal, with what to do about it.
pub(crate) fn read_plugin_file(
    path: &Path,
    policy: FilePolicy,
) -> Result<(Vec<u8>, FileStamp), LoadErrorKind> {
    let io = |e: std::io::Error| LoadErrorKind::NotLoadable {
        reason: format!("reading {}: {e}", EscapePath(path)),
    };
    let not_found = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => LoadErrorKind::NotFound,
        _ => io(e),
    };
    // Decided before opening: opening a FIFO blocks, opening a device can act on it.
    let link = std::fs::symlink_metadata(path).map_err(not_found)?;
    let target = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound if link.file_type().is_symlink() => {
            LoadErrorKind::NotRegularFile {
                kind: "a symbolic link whose target does not exist".to_owned(),
            }
        }
        _ => not_found(e),
    })?;
    if !target.file_type().is_file() {
        let kind = kind_of(target.file_type());
        return Err(LoadErrorKind::NotRegularFile {
            kind: if link.file_type().is_symlink() {
                format!("a symbolic link to {kind}")
            } else {
                kind.to_owned()
            },
        });
    }
    let dir = parent_dir(path);
    let dir_metadata = std::fs::metadata(&dir).map_err(io)?;
    check_ownership(&dir, &dir_metadata, "plugins directory", policy)?;
    if link.file_type().is_symlink() {
        // The link's target must be as safe as a file in the directory would be, its own
        // directory included.
        let real = std::fs::canonicalize(path).map_err(not_found)?;
        let real_dir = parent_dir(&real);
        let real_dir_metadata = std::fs::metadata(&real_dir).map_err(io)?;
        check_ownership(
            &real_dir,
            &real_dir_metadata,
            "directory of the symlink's target",
            policy,
        )?;
    }
    // O_NONBLOCK: if the name was replaced by a FIFO since the check above, the open does not
    // hang; the descriptor's own type is checked next. O_NOCTTY: never a controlling terminal.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(not_found)?;
    // Everything from here on is about the file this descriptor reads, whatever the name
    // points to meanwhile.
    let metadata = file.metadata().map_err(io)?;
    if !metadata.file_type().is_file() {
        return Err(LoadErrorKind::NotRegularFile {
            kind: kind_of(metadata.file_type()).to_owned(),
        });
    }
    check_ownership(path, &metadata, "plugin file", policy)?;
    let len = metadata.len();
    if len == 0 {
        return Err(LoadErrorKind::Empty);
    }
    if len > policy.max_size {
        return Err(LoadErrorKind::TooLarge {
            size: len,
            max: policy.max_size,
        });
    }
    let mut magic = [0u8; 4];
    let got = file.by_ref().take(4).read(&mut magic).map_err(io)?;
    if got < 4 || magic != *b"\x7fELF" {
        return Err(LoadErrorKind::NotSharedLibrary {
            reason: "no ELF magic bytes".to_owned(),
        });
    }
    let capacity = usize::try_from(len).map_err(|_| LoadErrorKind::TooLarge {
        size: len,
        max: policy.max_size,
    })?;
    let mut bytes = Vec::with_capacity(capacity);
    bytes.extend_from_slice(&magic);
    // One byte more than the length: a file that grows while it is read is noticed.
    file.by_ref()
        .take(len - 4 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 != len {
        return Err(LoadErrorKind::Truncated {
            expected: len,
            actual: bytes.len() as u64,
        });
    }
    let stamp = FileStamp {
        len,
        modified: metadata.modified().ok(),
        inode: metadata.ino(),
    };
    Ok((bytes, stamp))
}

/// The ELF machine of the host.
fn host_machine() -> Option<object::elf::Machine> {
    use object::elf;
    Some(match std::env::consts::ARCH {
        "x86_64" => elf::EM_X86_64,
        "x86" => elf::EM_386,
        "aarch64" => elf::EM_AARCH64,
        "arm" => elf::EM_ARM,
        "riscv64" | "riscv32" => elf::EM_RISCV,
        "powerpc64" => elf::EM_PPC64,
        "powerpc" => elf::EM_PPC,
        "s390x" => elf::EM_S390,
        "loongarch64" => elf::EM_LOONGARCH,
        "mips" | "mips64" => elf::EM_MIPS,
        "sparc64" => elf::EM_SPARCV9,
        _ => return None,
    })
}

#[cfg(target_pointer_width = "64")]
type HostElf = object::elf::FileHeader64<object::Endianness>;
#[cfg(target_pointer_width = "32")]
type HostElf = object::elf::FileHeader32<object::Endianness>;

/// Checks, from the file's bytes alone, that it is a plugin this host can open; returns where
/// its header is.
///
/// An ELF shared object of the host's class, byte order and machine; complete (the section
/// header table, which linkers write last, ends within the file); with a defined dynamic symbol
/// `PLUGIN_HOST_HEADER` that is a data object (`STT_OBJECT`, so not a function and not an IFUNC
/// whose resolver would run) of exactly the header's size, not absolute, inside a loaded
/// segment's file contents; and whose magic bytes and version, read at that symbol's file
/// offset, are this host's.
///
/// # Errors
///
/// The reason the file is refused.
#[cfg_attr(
    target_pointer_width = "64",
    expect(
        clippy::useless_conversion,
        reason = "ELF words are u64 here but u32 on 32-bit hosts"
    )
)]
pub(crate) fn check_elf(bytes: &[u8]) -> Result<HeaderLocation, LoadErrorKind> {
    use object::elf;
    let not_so = |reason: String| LoadErrorKind::NotSharedLibrary { reason };
    let malformed = |what: &str, e: object::read::Error| not_so(format!("{what}: {e}"));
    let len = bytes.len() as u64;
    if bytes.is_empty() {
        return Err(LoadErrorKind::Empty);
    }
    if bytes.len() < 4 || bytes[..4] != *b"\x7fELF" {
        return Err(not_so("no ELF magic bytes".to_owned()));
    }
    let host_class = if cfg!(target_pointer_width = "64") {
        elf::ELFCLASS64
    } else {
        elf::ELFCLASS32
    };
    // Byte 4 of the identification is the class.
    match bytes.get(4) {
        Some(&class) if class == host_class.0 => {}
        Some(&class) => {
            return Err(not_so(format!(
                "ELF class {class}, the host's is {} ({}-bit)",
                host_class.0,
                usize::BITS
            )));
        }
        None => {
            return Err(LoadErrorKind::Truncated {
                expected: 64,
                actual: len,
            });
        }
    }
    let header_len = std::mem::size_of::<HostElf>() as u64;
    if len < header_len {
        return Err(LoadErrorKind::Truncated {
            expected: header_len,
            actual: len,
        });
    }
    let header = HostElf::parse(bytes).map_err(|e| malformed("unreadable ELF header", e))?;
    let endian = header
        .endian()
        .map_err(|e| malformed("unknown ELF byte order", e))?;
    let host_little = cfg!(target_endian = "little");
    if endian.is_little_endian() != host_little {
        return Err(not_so("ELF byte order differs from the host's".to_owned()));
    }
    let e_type = header.e_type(endian);
    if e_type != elf::ET_DYN {
        return Err(not_so(format!(
            "ELF type {}, not a shared object (type {})",
            e_type.0,
            elf::ET_DYN.0
        )));
    }
    let machine = header.e_machine(endian);
    if host_machine().is_some_and(|host| host != machine) {
        return Err(not_so(format!(
            "built for ELF machine {}, not for this host's {} ({})",
            machine.0,
            host_machine().unwrap_or_default().0,
            std::env::consts::ARCH
        )));
    }
    let shoff: u64 = header.e_shoff(endian).into();
    let shentsize = u64::from(header.e_shentsize(endian));
    let shnum = u64::from(header.e_shnum(endian));
    let expected = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if expected > len {
        return Err(LoadErrorKind::Truncated {
            expected,
            actual: len,
        });
    }
    let segments = header
        .program_headers(endian, bytes)
        .map_err(|e| malformed("unreadable program headers", e))?;
    let sections = header
        .sections(endian, bytes)
        .map_err(|e| malformed("unreadable section headers", e))?;
    let symbols = sections
        .symbols(endian, bytes, elf::SHT_DYNSYM)
        .map_err(|e| malformed("unreadable dynamic symbol table", e))?;
    let mut found = None;
    for symbol in symbols.iter() {
        let name = symbols
            .symbol_name(endian, symbol)
            .map_err(|e| malformed("unreadable dynamic symbol name", e))?;
        if name == HEADER_SYMBOL.as_bytes() && symbol.st_shndx(endian) != elf::SHN_UNDEF {
            found = Some(symbol);
            break;
        }
    }
    let Some(symbol) = found else {
        return Err(LoadErrorKind::NoHeader);
    };
    let bad = |reason: String| LoadErrorKind::BadHeaderSymbol { reason };
    let st_type = symbol.st_type();
    if st_type != elf::STT_OBJECT {
        let what = match st_type {
            elf::STT_FUNC => "a function".to_owned(),
            elf::STT_GNU_IFUNC => "an IFUNC (its resolver would run code)".to_owned(),
            elf::STT_NOTYPE => "of no type".to_owned(),
            other => format!("of symbol type {}", other.0),
        };
        return Err(bad(format!("it is {what}, not a data object")));
    }
    if symbol.st_shndx(endian) == elf::SHN_ABS {
        return Err(bad(
            "it is an absolute symbol, not data in the library".to_owned()
        ));
    }
    let size: u64 = symbol.st_size(endian).into();
    let want = std::mem::size_of::<PluginHeader>() as u64;
    if size != want {
        return Err(bad(format!(
            "it is {size} bytes, a plugin header is {want}"
        )));
    }
    let vaddr: u64 = symbol.st_value(endian).into();
    let align = std::mem::align_of::<PluginHeader>() as u64;
    if !vaddr.is_multiple_of(align) {
        return Err(bad(format!(
            "its address {vaddr:#x} is not aligned to {align} bytes"
        )));
    }
    let end = vaddr
        .checked_add(size)
        .ok_or_else(|| bad(format!("its address {vaddr:#x} is out of range")))?;
    // The header must be initialized data the loader maps from the file: inside the file
    // contents (p_filesz) of a PT_LOAD segment.
    let offset = segments
        .iter()
        .filter(|s| s.p_type(endian) == elf::PT_LOAD)
        .find_map(|s| {
            let start: u64 = s.p_vaddr(endian).into();
            let file_size: u64 = s.p_filesz(endian).into();
            let offset: u64 = s.p_offset(endian).into();
            (vaddr >= start && end <= start.saturating_add(file_size))
                .then(|| offset.saturating_add(vaddr - start))
        })
        .ok_or_else(|| {
            bad(format!(
                "its address {vaddr:#x} is not inside a loaded segment of the file"
            ))
        })?;
    let at = usize::try_from(offset).unwrap_or(usize::MAX);
    let header_bytes = at
        .checked_add(want as usize)
        .and_then(|end| bytes.get(at..end))
        .ok_or_else(|| {
            bad(format!(
                "its file offset {offset:#x} is past the end of the file"
            ))
        })?;
    if header_bytes[..MAGIC.len()] != MAGIC {
        return Err(LoadErrorKind::BadMagic);
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&header_bytes[8..12]);
    let version = if host_little {
        u32::from_le_bytes(version)
    } else {
        u32::from_be_bytes(version)
    };
    if version != HEADER_VERSION {
        return Err(LoadErrorKind::HeaderVersion {
            found: version,
            supported: HEADER_VERSION,
        });
    }
    Ok(HeaderLocation { vaddr })
}

/// Whether the file at `path` looks complete from its ELF header alone: the section header
/// table ends within the file. `Err` with [`LoadErrorKind::Truncated`] or [`LoadErrorKind::Empty`]
/// while it is still being written; every other state is `Ok` (the load reports it). Never
/// blocks: anything but a regular file is not opened.
#[cfg_attr(
    target_pointer_width = "64",
    expect(
        clippy::useless_conversion,
        reason = "ELF words are u64 here but u32 on 32-bit hosts"
    )
)]
pub(crate) fn check_complete(path: &Path) -> Result<(), LoadErrorKind> {
    let Ok(metadata) = std::fs::metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_file() {
        return Ok(());
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    else {
        return Ok(());
    };
    let len = file.metadata().map_or(0, |m| m.len());
    if len == 0 {
        return Err(LoadErrorKind::Empty);
    }
    let mut head = Vec::with_capacity(64);
    if file.take(64).read_to_end(&mut head).is_err() {
        return Ok(());
    }
    let header_len = std::mem::size_of::<HostElf>();
    if head.len() < header_len {
        return if head.starts_with(b"\x7fELF") {
            Err(LoadErrorKind::Truncated {
                expected: header_len as u64,
                actual: len,
            })
        } else {
            Ok(())
        };
    }
    let Ok(header) = HostElf::parse(head.as_slice()) else {
        return Ok(());
    };
    let Ok(endian) = header.endian() else {
        return Ok(());
    };
    let shoff: u64 = header.e_shoff(endian).into();
    let expected = shoff.saturating_add(
        u64::from(header.e_shentsize(endian)).saturating_mul(u64::from(header.e_shnum(endian))),
    );
    if expected > len {
        return Err(LoadErrorKind::Truncated {
            expected,
            actual: len,
        });
    }
    Ok(())
}

/// Writes the checked bytes of `file` to `<shadow_dir>/<stem>.<pid>.<generation>.so`.
///
/// The copy is created with `O_CREAT | O_EXCL | O_NOFOLLOW`: it is always a new file, never an
/// existing one and never through a symlink, even if something appeared in the shadow directory
/// (which is ours alone, mode 0700). A file is used rather than a `memfd` loaded through
/// `/proc/self/fd/N`, because the path stays meaningful to people (in `/proc/<pid>/maps`, in
/// `worker list --json`'s `shadow_file`, in crash reports) and needs no mounted `/proc`.
pub(crate) fn shadow_copy(
    file: &Path,
    checked: &CheckedFile,
    shadow_dir: &Path,
    shadow_id: (u64, u64),
    generation: u64,
) -> Result<ShadowFile, LoadErrorKind> {
    use std::io::Write as _;
    verify_shadow_dir(shadow_dir, shadow_id)?;
    let stem: String = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".to_owned())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let shadow = shadow_dir.join(format!(
        "{stem}.{}.{generation}.{}",
        std::process::id(),
        std::env::consts::DLL_EXTENSION
    ));
    let failed = |shadow: &Path, e: std::io::Error| LoadErrorKind::NotLoadable {
        reason: format!("writing its shadow copy {} failed: {e}", EscapePath(shadow)),
    };
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&shadow)
        .map_err(|e| failed(&shadow, e))?;
    // From here on the file is ours, and deleted if anything fails.
    let shadow = ShadowFile(shadow);
    out.write_all(&checked.bytes)
        .map_err(|e| failed(&shadow.0, e))?;
    Ok(shadow)
}

/// Checks that `shadow_dir` is still the directory made at build (same device and inode, not a
/// link, ours, writable by nobody else) before a copy is written into it and opened from it.
fn verify_shadow_dir(shadow_dir: &Path, shadow_id: (u64, u64)) -> Result<(), LoadErrorKind> {
    let refuse = |why: String| LoadErrorKind::NotLoadable {
        reason: format!(
            "the shadow directory {} {why}; no copy is written there (restart the worker to make a new one)",
            EscapePath(shadow_dir)
        ),
    };
    let meta = std::fs::symlink_metadata(shadow_dir)
        .map_err(|e| refuse(format!("cannot be checked ({e})")))?;
    if !meta.file_type().is_dir() {
        return Err(refuse(
            "is no longer a directory (a link was put in its place)".to_owned(),
        ));
    }
    if (meta.dev(), meta.ino()) != shadow_id {
        return Err(refuse(
            "was replaced by another directory since the worker made it".to_owned(),
        ));
    }
    let euid = effective_uid();
    if meta.uid() != euid {
        return Err(refuse(format!(
            "is owned by uid {}, not by uid {euid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "became writable by other users (mode {:04o})",
            meta.mode() & 0o7777
        )));
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
    let metadata = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        len: metadata.len(),
        modified: metadata.modified().ok(),
        inode: metadata.ino(),
    })
}

/// The candidate plugin files in `dir`: every entry named `*.so` that is not hidden, whatever
/// it is (a directory, FIFO, socket or device of that name is refused with its reason when
/// loaded, not skipped in silence), in name order, with their stamps. Hidden files are left
/// alone so that a copy in progress can be written under a hidden name and renamed into place.
pub(crate) fn plugin_files(dir: &Path) -> Vec<(PathBuf, Option<FileStamp>)> {
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
        })
        .map(|path| {
            let stamp = stamp(&path);
            (path, stamp)
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}
