//! `crashy`: a test fixture that misbehaves in every way a native plugin can, on request, for
//! the host's crash-containment tests. In-process, most of these end the process; isolated, the
//! host must contain each of them.
//!
//! Methods, each a way to go wrong (named as in the configuration below):
//! - `segfault`: writes through a null pointer (SIGSEGV).
//! - `abort`: calls `std::process::abort()` (SIGABRT).
//! - `exit`: calls `std::process::exit(0)` from plugin code.
//! - `stack_overflow`: recurses until the stack is exhausted.
//! - `spin`: loops forever, never returning.
//! - `sleep {"ms", "answer"?}`: sleeps, then answers `answer`, or `"slept"` (a slow call).
//! - `alloc {"mb"}`: allocates and touches `mb` MiB, then answers the size (beyond a memory
//!   limit, the allocation fails and the process aborts).
//! - `double_panic`: panics with a payload whose `Drop` panics again.
//!
//! And the well-behaved ones: `ok` answers `"fine"`; `add {"n"}` and `total` keep a counter
//! that is carried across reloads and restarts through `save_state`/`restore_state`;
//! `pid` answers the process id the plugin runs in (isolated: the child's); `print {"text"}`
//! writes the text to stdout and stderr with `println!`/`eprintln!` and answers `"printed"`.
//!
//! Configuration `{"in": {"create" | "destroy" | "save_state" | "restore_state" | "hook": FAULT}}`
//! makes that entry misbehave, where FAULT is one of the method names above (`sleep` sleeps
//! `sleepMs`, default 60 000). The hook is a sequential subscription to `task.scored`.

// Denied, not forbidden: `segfault` writes through a null pointer on purpose, and nothing else
// may use unsafe code.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, export_plugin,
};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The plugin instance.
#[derive(Debug)]
pub struct Crashy {
    total: AtomicI64,
    config: Config,
}

/// Where to misbehave, and how long `sleep` sleeps there.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Entry (`create`, `destroy`, `save_state`, `restore_state`, `hook`) → fault name.
    #[serde(default, rename = "in")]
    faults: BTreeMap<String, String>,
    /// How long a configured `sleep` fault sleeps, in milliseconds.
    #[serde(default)]
    sleep_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Ms {
    ms: u64,
    #[serde(default)]
    answer: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Mb {
    mb: usize,
}

#[derive(Debug, Deserialize)]
struct Repeat {
    n: usize,
}

#[derive(Debug, Deserialize)]
struct Text {
    text: String,
}

#[derive(Debug, Deserialize)]
struct N {
    n: i64,
}

/// A panic payload whose `Drop` panics: dropping it while the first panic is handled ends the
/// process.
struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("crashy: the panic payload panicked while being dropped");
    }
}

/// Goes wrong as `fault` names; returns for `sleep` (after sleeping) and for an unknown name.
fn misbehave(fault: &str, sleep_ms: u64) {
    match fault {
        "segfault" => segfault(),
        "abort" => std::process::abort(),
        "exit" => std::process::exit(0),
        "stack_overflow" => {
            recurse(0);
        }
        "spin" => loop {
            std::hint::spin_loop();
        },
        "sleep" => std::thread::sleep(std::time::Duration::from_millis(sleep_ms)),
        "alloc" => {
            let _ = touch(1 << 20);
        }
        "double_panic" => std::panic::panic_any(PanicOnDrop),
        _ => {}
    }
}

#[derive(Debug, Deserialize)]
struct FanOut {
    plugin: String,
    method: String,
    params: serde_json::Value,
    n: usize,
}

fn fan_out(p: &FanOut) -> serde_json::Value {
    let outcomes: Vec<Result<Option<serde_json::Value>, PluginError>> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..p.n.min(1000))
            .map(|_| s.spawn(|| plugin_api::call_plugin(&p.plugin, &p.method, &p.params)))
            .collect();
        calls
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap_or_else(|_| Err(PluginError::new("the calling thread panicked")))
            })
            .collect()
    });
    let answered = outcomes.iter().filter(|o| matches!(o, Ok(Some(_)))).count();
    let errors: Vec<&PluginError> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    serde_json::json!({
        "answered": answered,
        "failed": errors.len(),
        "error": errors.first().map(|e| e.to_string()),
    })
}

/// With `CRASHY_TRICKLE_AT_LOAD` in its environment, the library's constructor (run as the
/// library is loaded, before any plugin code) starts a frame of a MiB on every socket of its
/// process (in a plugin's child process, the channel to the worker) and sends its bytes one at
/// a time, half a millisecond apart, without end: as hostile code could, to hold a reader that
/// waits for whole frames.
#[expect(
    unsafe_code,
    reason = "a constructor is a link section the loader runs"
)]
#[unsafe(link_section = ".init_array")]
#[used]
static TRICKLE_AT_LOAD: extern "C" fn() = trickle_at_load;

extern "C" fn trickle_at_load() {
    if std::env::var_os("CRASHY_TRICKLE_AT_LOAD").is_none() {
        return;
    }
    let mut sockets: Vec<std::mem::ManuallyDrop<std::fs::File>> =
        std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let link = std::fs::read_link(entry.path()).ok()?;
                link.to_str()?.starts_with("socket:").then_some(())?;
                let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
                Some(borrow_fd(fd))
            })
            .collect();
    for socket in &mut sockets {
        let _ = std::io::Write::write_all(&mut **socket, &(1u32 << 20).to_le_bytes());
    }
    loop {
        for socket in &mut sockets {
            let _ = std::io::Write::write_all(&mut **socket, b"x");
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}

/// A `File` over a descriptor this library does not own, never closed.
#[expect(
    unsafe_code,
    reason = "writing to a descriptor the fixture does not own, on purpose"
)]
fn borrow_fd(fd: i32) -> std::mem::ManuallyDrop<std::fs::File> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `fd` is open (just listed in /proc/self/fd) and stays open: the `File` is never
    // dropped, so it never closes a descriptor that belongs to someone else.
    std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) })
}

#[expect(unsafe_code, reason = "the fixture crashes on purpose")]
fn segfault() {
    let null = std::hint::black_box(std::ptr::null_mut::<u8>());
    // SAFETY: none, on purpose: this write through a null pointer raises SIGSEGV.
    unsafe { null.write_volatile(1) };
}

/// Recursion the optimizer cannot turn into a loop: each frame keeps a buffer alive.
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 512]);
    if std::hint::black_box(depth) == u64::MAX {
        return frame[0];
    }
    recurse(depth + 1) + frame[(depth % 512) as usize]
}

/// Allocates `mb` MiB and writes to every page, so the memory is really used.
fn touch(mb: usize) -> usize {
    let mut block = vec![0u8; mb << 20];
    for page in block.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&block).len()
}

/// The host's call region, as the host lays it out: `u32` words, the request's sequence number
/// at byte 0, the answer's at 64 and its length at 72.
const REQ_SEQ: u64 = 0;
const ANS_SEQ: u64 = 64;
const ANS_LEN: u64 = 72;

/// What a hostile plugin can do to the memory its process shares with the host, with no
/// unsafe code (through `/proc/self/mem`): forge an answer there. See the `scribble` method.
fn scribble() -> Result<&'static str, PluginError> {
    use std::os::unix::fs::FileExt as _;
    let (memory, start) = region()?;
    // This call's own answer is forged: its number, and a length beyond the slot. The host,
    // woken by nothing, finds it when its wait ends (at most a second); the real answer comes
    // later.
    let mut word = [0u8; 4];
    memory
        .read_exact_at(&mut word, start + REQ_SEQ)
        .map_err(|e| PluginError::new(e.to_string()))?;
    memory
        .write_all_at(&u32::MAX.wrapping_sub(7).to_ne_bytes(), start + ANS_LEN)
        .and_then(|()| memory.write_all_at(&word, start + ANS_SEQ))
        .map_err(|e| PluginError::new(e.to_string()))?;
    std::thread::sleep(std::time::Duration::from_secs(3));
    Ok("unseen")
}

/// Another abuse of the shared memory: for 2.5 s (longer than the host's longest single wait),
/// keeps changing the answer's sequence number to numbers no request has, then answers
/// "churned". A host that took any change there for news would loop on it, a system call a
/// turn, until the real answer came. See the `churn` method.
fn churn() -> Result<&'static str, PluginError> {
    use std::os::unix::fs::FileExt as _;
    let (memory, start) = region()?;
    let mut word = [0u8; 4];
    memory
        .read_exact_at(&mut word, start + REQ_SEQ)
        .map_err(|e| PluginError::new(e.to_string()))?;
    let seq = u32::from_ne_bytes(word);
    let until = std::time::Instant::now() + std::time::Duration::from_millis(2500);
    let mut forged = seq;
    while std::time::Instant::now() < until {
        // Numbers no request of a fresh child has (they count up from 1).
        forged = forged.wrapping_add(1) | 1 << 30;
        memory
            .write_all_at(&forged.to_ne_bytes(), start + ANS_SEQ)
            .map_err(|e| PluginError::new(e.to_string()))?;
    }
    Ok("churned")
}

/// The call region's start in this process, with `/proc/self/mem` open to reach it.
fn region() -> Result<(std::fs::File, u64), PluginError> {
    let maps =
        std::fs::read_to_string("/proc/self/maps").map_err(|e| PluginError::new(e.to_string()))?;
    let start = maps
        .lines()
        .find(|line| line.contains("memfd:plugin-calls"))
        .and_then(|line| line.split('-').next())
        .and_then(|start| u64::from_str_radix(start, 16).ok())
        .ok_or_else(|| PluginError::new("no call region: is the plugin isolated?"))?;
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .map_err(|e| PluginError::new(e.to_string()))?;
    Ok((memory, start))
}

impl Crashy {
    fn fault_in(&self, entry: &str) {
        if let Some(fault) = self.config.faults.get(entry) {
            misbehave(fault, self.config.sleep_ms.unwrap_or(60_000));
        }
    }
}

impl Drop for Crashy {
    fn drop(&mut self) {
        self.fault_in("destroy");
    }
}

impl Plugin for Crashy {
    type Config = Config;
    type State = i64;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "crashy",
            env!("CARGO_PKG_VERSION"),
            "Test fixture: crashes, aborts, exits, overflows, spins and sleeps on request",
        )
    }

    fn create(config: Config) -> Result<Self, PluginError> {
        let this = Crashy {
            total: AtomicI64::new(0),
            config,
        };
        this.fault_in("create");
        Ok(this)
    }

    fn methods(methods: &mut Methods<Self>) {
        for fault in [
            "segfault",
            "abort",
            "exit",
            "stack_overflow",
            "spin",
            "double_panic",
        ] {
            methods.method(fault, "Misbehaves as named", move |_, _: IgnoredAny| {
                misbehave(fault, 0);
                Ok("survived")
            });
        }
        methods
            .method(
                "sleep",
                "Sleeps {\"ms\"}, then answers {\"answer\"} or \"slept\"",
                |_, p: Ms| {
                    std::thread::sleep(std::time::Duration::from_millis(p.ms));
                    Ok(p.answer.unwrap_or_else(|| "slept".to_owned()))
                },
            )
            .method("alloc", "Allocates and touches {\"mb\"} MiB", |_, p: Mb| {
                Ok(touch(p.mb))
            })
            .method(
                "spawn_then_segfault",
                "Starts a helper process that outlives it (`sleep 30`, standard input inherited), then crashes",
                |_, _: IgnoredAny| {
                    let _helper = std::process::Command::new("sleep")
                        .arg("30")
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn();
                    segfault();
                    Ok("survived")
                },
            )
            .method(
                "fan_out",
                "Calls {\"plugin\", \"method\", \"params\"} through the host from {\"n\"} threads at once; answers how many calls were answered and how many failed, with the first error",
                |_, p: FanOut| Ok(fan_out(&p)),
            )
            .method(
                "scribble",
                "Isolated only: forges its own answer in the memory its process shares with the host, with a length beyond the slot, then sleeps 3 s and answers \"unseen\"",
                |_, _: IgnoredAny| scribble(),
            )
            .method(
                "churn",
                "Isolated only: keeps changing the answer's sequence number in the memory its process shares with the host to numbers no request has, for 2.5 s, then answers \"churned\"",
                |_, _: IgnoredAny| churn(),
            )
            .method(
                "repeat",
                "Answers a text of {\"n\"} bytes (other params ignored: a large request)",
                |_, p: Repeat| Ok("x".repeat(p.n.min(16 << 20))),
            )
            .method(
                "chatter",
                "Logs {\"n\"} warnings of 1 KiB each, then answers \"said\"",
                |_, p: Repeat| {
                    let line = "z".repeat(1024);
                    for i in 0..p.n.min(100_000) {
                        tracing::warn!(i, "{line}");
                    }
                    Ok("said")
                },
            )
            .method("ok", "Answers \"fine\"", |_, _: IgnoredAny| Ok("fine"))
            .method("add", "Adds {\"n\"} to the counter", |this, p: N| {
                Ok(this.total.fetch_add(p.n, Ordering::Relaxed) + p.n)
            })
            .method("total", "The counter", |this, _: IgnoredAny| {
                Ok(this.total.load(Ordering::Relaxed))
            })
            .method(
                "print",
                "Prints {\"text\"} on stdout and stderr",
                |_, p: Text| {
                    println!("{}", p.text);
                    eprintln!("{}", p.text);
                    Ok("printed")
                },
            )
            .method(
                "pid",
                "The process id the plugin runs in",
                |_, _: IgnoredAny| Ok(std::process::id()),
            );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on(
            "task.scored",
            100,
            HookMode::Sequential,
            |this: &Self, _: IgnoredAny| -> Result<HookResult, PluginError> {
                this.fault_in("hook");
                Ok(HookResult::Continue)
            },
        );
    }

    fn save_state(&self) -> Result<Option<i64>, PluginError> {
        self.fault_in("save_state");
        Ok(Some(self.total.load(Ordering::Relaxed)))
    }

    fn restore_state(&self, state: i64) -> Result<(), PluginError> {
        self.fault_in("restore_state");
        self.total.store(state, Ordering::Relaxed);
        Ok(())
    }
}

export_plugin!(Crashy);
