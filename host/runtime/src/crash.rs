//! Crash records: which plugin a thread was running when the process died.
//!
//! Every call into plugin code leaves a site in its thread (a thread-local cell: a pointer to
//! the plugin's health record (`Health`), which holds its name and the call's method, or for a lifecycle
//! entry the plugin's name and the entry as bytes). When the process receives a fatal signal
//! (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT: a null write, a stack overflow, `abort`, a double
//! panic, a failed allocation) or plugin code calls `exit`, a handler reads the crashing
//! thread's site and appends one line to the crash-record file opened at start-up:
//! `plugin<TAB>method<TAB>cause<TAB>unix-seconds<LF>`. The next start quarantines that plugin
//! (see [`crate::quarantine`]).
//!
//! The handler uses async-signal-safe calls only: relaxed atomic loads, a thread-local read,
//! `write(2)`, `clock_gettime`, `sigaction`, `raise`, `_exit`. It runs on the thread's
//! alternate signal stack (`SA_ONSTACK`): Rust's runtime gives the main thread and every thread
//! it spawns one, which is what makes a stack overflow reportable at all. Then it chains to the
//! handler that was there before (Rust's own, which prints "has overflowed its stack" for a
//! guard-page hit), and finally restores the default action and raises the signal again, so the
//! process dies of the same signal, with the same exit status and core dump as without it.
//!
//! An `exit` is caught by an `atexit` handler: on a thread with a site (plugin code called
//! `exit`), it writes the record and ends the process at once with status
//! [`EXIT_PLUGIN_EXITED`], so that a plugin's `exit(0)` never looks like a clean stop.

use std::cell::Cell;
use std::os::fd::IntoRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use crate::health::Health;

/// The crash-record file in a state directory.
pub const CRASH_RECORDS_FILE: &str = "crash-records";

/// The exit status of a process whose plugin code called `exit`.
pub const EXIT_PLUGIN_EXITED: i32 = 70;

/// The fatal signals recorded, with the name written for each.
const SIGNALS: [(libc::c_int, &[u8]); 5] = [
    (libc::SIGSEGV, b"SIGSEGV"),
    (libc::SIGBUS, b"SIGBUS"),
    (libc::SIGILL, b"SIGILL"),
    (libc::SIGFPE, b"SIGFPE"),
    (libc::SIGABRT, b"SIGABRT"),
];

/// Bytes of a lifecycle entry's plugin name kept (names are at most 64 bytes).
const NAME_BYTES: usize = 64;
/// Bytes of an entry's name kept.
const ENTRY_BYTES: usize = 16;

/// A call in progress on this thread: the plugin's health and the marker holding its method.
#[derive(Debug, Clone, Copy)]
struct CallSite {
    health: *const Health,
    marker: u8,
}

impl CallSite {
    const NONE: CallSite = CallSite {
        health: std::ptr::null(),
        marker: u8::MAX,
    };
}

/// A lifecycle entry in progress on this thread (`create`, `save_state`, ...).
#[derive(Clone, Copy)]
struct EntrySite {
    plugin: [u8; NAME_BYTES],
    entry: [u8; ENTRY_BYTES],
}

thread_local! {
    // Const-initialized, without destructors: read from a signal handler without allocating
    // or registering anything.
    static CALL: Cell<CallSite> = const { Cell::new(CallSite::NONE) };
    static ENTRY: Cell<Option<EntrySite>> = const { Cell::new(None) };
}

/// A call of a plugin running on this thread, until dropped: the thread's site points at the
/// plugin's health (its name) and the marker holding the method; dropping restores the site
/// the call replaced (a call made from inside another plugin's call).
#[derive(Debug)]
pub(crate) struct CallSiteGuard {
    previous: CallSite,
}

impl CallSiteGuard {
    /// Marks a call of the plugin whose health is `health`, its method in marker `marker`.
    #[inline]
    pub(crate) fn enter(health: &Health, marker: u8) -> Self {
        CallSiteGuard {
            previous: CALL.replace(CallSite {
                health: std::ptr::from_ref(health),
                marker,
            }),
        }
    }
}

impl Drop for CallSiteGuard {
    #[inline]
    fn drop(&mut self) {
        CALL.set(self.previous);
    }
}

/// A lifecycle entry of a plugin running on this thread, until dropped.
pub(crate) struct EntryGuard {
    previous: Option<EntrySite>,
}

impl EntryGuard {
    /// Marks `plugin`'s `entry` as running on this thread.
    pub(crate) fn new(plugin: &str, entry: &str) -> Self {
        let mut site = EntrySite {
            plugin: [0; NAME_BYTES],
            entry: [0; ENTRY_BYTES],
        };
        let n = plugin.len().min(NAME_BYTES);
        site.plugin[..n].copy_from_slice(&plugin.as_bytes()[..n]);
        let n = entry.len().min(ENTRY_BYTES);
        site.entry[..n].copy_from_slice(&entry.as_bytes()[..n]);
        EntryGuard {
            previous: ENTRY.replace(Some(site)),
        }
    }
}

impl Drop for EntryGuard {
    fn drop(&mut self) {
        ENTRY.set(self.previous);
    }
}

/// The crash-record file's descriptor; -1 until [`record_crashes_in`].
static FD: AtomicI32 = AtomicI32::new(-1);
/// Set by the first record: a crash that raises another signal (Rust's stack-overflow handler
/// aborts) is recorded once.
static RECORDED: AtomicBool = AtomicBool::new(false);
/// The handlers replaced, by index in [`SIGNALS`]: the function's address (0 for none: the
/// default action or ignored).
static PREVIOUS: [AtomicUsize; SIGNALS.len()] = [const { AtomicUsize::new(0) }; SIGNALS.len()];
/// Whether the replaced handler takes three arguments (`SA_SIGINFO`).
static PREVIOUS_SIGINFO: [AtomicBool; SIGNALS.len()] =
    [const { AtomicBool::new(false) }; SIGNALS.len()];

/// From now on, a crash in plugin code (a fatal signal, or `exit`) on any thread appends a
/// record naming the plugin and the method to `dir`/[`CRASH_RECORDS_FILE`], which a host
/// built with that directory as its state (or quarantine) directory reads at its next start,
/// quarantining the plugin. Process-wide; a second call changes nothing and returns the file
/// of the first.
///
/// Call it once at start-up, after the Rust runtime has set up (any time in `main`). The
/// `worker` binary does for `run`, `serve` and `call`.
///
/// # Errors
///
/// The file cannot be opened (created with mode 0600, never through a symbolic link) or the
/// handlers cannot be installed.
pub fn record_crashes_in(dir: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    static INSTALLED: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut installed = INSTALLED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = &*installed {
        return Ok(path.clone());
    }
    let path = dir.join(CRASH_RECORDS_FILE);
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        // Non-blocking: a FIFO planted in its place must not hang the start (it is refused
        // below, or the open fails at once when nothing reads it).
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| {
            format!(
                "opening the crash-record file {} (remove it if it is not a regular file)",
                path.display()
            )
        })?;
    let kind = file
        .metadata()
        .with_context(|| format!("reading the crash-record file {}", path.display()))?
        .file_type();
    if !kind.is_file() {
        anyhow::bail!(
            "the crash-record file {} is not a regular file; remove it (the worker creates it)",
            path.display()
        );
    }
    // Kept open for the life of the process: the handler writes to it.
    FD.store(file.into_raw_fd(), Ordering::Release);
    for (index, &(signal, name)) in SIGNALS.iter().enumerate() {
        install(index, signal).with_context(|| {
            format!(
                "installing the crash handler for {}",
                String::from_utf8_lossy(name)
            )
        })?;
    }
    // SAFETY: `on_exit` is an `extern "C" fn()` that lives as long as the process (it is in
    // this binary), which is all `atexit` asks.
    if unsafe { libc::atexit(on_exit) } != 0 {
        anyhow::bail!("registering the crash handler for exit: atexit failed");
    }
    *installed = Some(path.clone());
    Ok(path)
}

fn install(index: usize, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: an all-zero `sigaction` is a valid value of the plain C struct (no handler, no
    // flags, empty mask); every field we rely on is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_fatal;
    action.sa_sigaction = handler as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa_mask` is a valid, owned `sigset_t` to initialize.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: as above.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to valid `sigaction` values owned by this frame; `on_fatal`
    // has the three-argument signature SA_SIGINFO requires, and stays valid for the process.
    if unsafe { libc::sigaction(signal, &action, &mut previous) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let handler = previous.sa_sigaction;
    if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
        PREVIOUS_SIGINFO[index].store(previous.sa_flags & libc::SA_SIGINFO != 0, Ordering::Release);
        PREVIOUS[index].store(handler, Ordering::Release);
    }
    Ok(())
}

extern "C" fn on_fatal(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let Some(index) = SIGNALS.iter().position(|&(s, _)| s == signal) else {
        return;
    };
    record(SIGNALS[index].1);
    let previous = PREVIOUS[index].load(Ordering::Acquire);
    if previous != 0 {
        if PREVIOUS_SIGINFO[index].load(Ordering::Acquire) {
            // SAFETY: the address is the handler `sigaction` reported with SA_SIGINFO set: a
            // function of this signature, installed before ours and never unloaded (Rust's).
            let chained: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(previous) };
            chained(signal, info, context);
        } else {
            // SAFETY: as above, for a handler installed without SA_SIGINFO.
            let chained: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous) };
            chained(signal);
        }
    }
    // The default action, raised again: blocked while this handler runs, it is delivered when
    // the handler returns, and the process dies of it.
    // SAFETY: an all-zero `sigaction` with `SIG_DFL` (0) is the default action.
    let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
    default.sa_sigaction = libc::SIG_DFL;
    // SAFETY: a valid `sigaction` owned by this frame; `sigaction` and `raise` are
    // async-signal-safe.
    unsafe {
        libc::sigaction(signal, &default, std::ptr::null_mut());
        libc::raise(signal);
    }
}

extern "C" fn on_exit() {
    let in_plugin = !CALL.get().health.is_null() || ENTRY.get().is_some();
    if in_plugin {
        record(b"exit");
        // SAFETY: `_exit` ends the process at once; nothing of ours runs after it, which is the
        // point (the other exit handlers could wait for threads stuck in the plugin).
        unsafe { libc::_exit(EXIT_PLUGIN_EXITED) };
    }
}

/// Appends this thread's site, if any, to the crash-record file, once per process.
fn record(cause: &[u8]) {
    let fd = FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let mut line = Line::default();
    let call = CALL.get();
    if call.health.is_null() {
        let Some(site) = ENTRY.get() else {
            return;
        };
        line.push_field(&site.plugin);
        line.push(b'\t');
        line.push_field(&site.entry);
    } else {
        // SAFETY: a call's site points at the health of the plugin it runs, which the call
        // keeps alive (through its registry snapshot) for as long as its `CallSiteGuard`
        // lives; the guard restores the previous site when dropped, on return and on unwind.
        let health = unsafe { &*call.health };
        let mut name = [0u8; NAME_BYTES];
        health.name_bytes(&mut name);
        line.push_field(&name);
        line.push(b'\t');
        let mut method = [0u8; crate::health::METHOD_BYTES];
        if !health.method_bytes(call.marker, &mut method) {
            method[0] = b'?';
        }
        line.push_field(&method);
    }
    if RECORDED.swap(true, Ordering::AcqRel) {
        return;
    }
    line.push(b'\t');
    line.push_field(cause);
    line.push(b'\t');
    // SAFETY: an all-zero `timespec` is valid; `clock_gettime` is async-signal-safe and fills
    // it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above: `now` is a valid, owned `timespec`.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    line.push_number(u64::try_from(now.tv_sec).unwrap_or(0));
    line.push(b'\n');
    // SAFETY: `fd` is the file opened in `record_crashes_in` and never closed; the buffer is
    // valid for `len` bytes. One `write` of an O_APPEND file: the line is never interleaved.
    unsafe { libc::write(fd, line.bytes.as_ptr().cast(), line.len) };
}

/// A record being written, on the stack (no allocation in a signal handler).
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, byte: u8) {
        if self.len < self.bytes.len() {
            self.bytes[self.len] = byte;
            self.len += 1;
        }
    }

    /// A field up to its first NUL, with tabs, line breaks and other control bytes as `?`.
    fn push_field(&mut self, field: &[u8]) {
        for &byte in field.iter().take_while(|&&b| b != 0) {
            self.push(if byte < 0x20 || byte == 0x7f {
                b'?'
            } else {
                byte
            });
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &digit in &digits[i..] {
            self.push(digit);
        }
    }
}
