//! The child side: the embedder's own executable, started again with [`CHILD_ENV`] set, loads
//! one plugin through the same loader and checks as the host, and serves the host's requests.
//!
//! A Unix socket, a shared memory region and a pipe join it to the host. The *control* socket,
//! its standard input, carries what either side starts on its own: the load's outcome, log
//! events, the plugin's calls and store operations through the host and their answers, and
//! requests that arrive while another runs (or do not fit the region). The *call region*
//! ([`super::shm`]), passed over the control socket at start with the *answer pipe*, carries
//! one request at a time: the main thread sleeps on it (a futex, with no timer: it has nothing
//! else to do, and the process ends with the host), runs the request itself and
//! puts the answer back, waking the host only if it sleeps, so a call costs a wait and a wake
//! here and no hand-off between threads. Every other answer, an answer that does not fit the
//! region, and every log event of a thread serving a request go on the answer pipe; for the
//! region's request the host is told first (so that it reads the pipe while it fills), and the
//! answer then follows the events there.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::protocol::{Frame, FrameReader, FrameWriter, Tag, code};
use super::shm::Region;
use crate::dylib::{PluginFailure, PluginLibrary};
use crate::error::PluginError;

/// The environment variable that turns a process into an isolated plugin's child: its value is
/// the [`ChildSpec`] as JSON.
pub(crate) const CHILD_ENV: &str = "PLUGIN_HOST_ISOLATED_CHILD";

/// What a child needs to know, from its parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChildSpec {
    /// The parent's process id: the child exits if its parent is another one.
    pub(crate) parent: u32,
    /// The plugin file.
    pub(crate) file: PathBuf,
    /// The host's private shadow directory, with its device and inode.
    pub(crate) shadow_dir: PathBuf,
    pub(crate) shadow_id: (u64, u64),
    pub(crate) generation: u64,
    pub(crate) max_size: u64,
    pub(crate) insecure_permissions: bool,
    /// `RLIMIT_DATA`, in MiB.
    pub(crate) memory_limit_mb: Option<u64>,
    /// The parent's most verbose log level (`abi::level`).
    pub(crate) log_level: u8,
}

/// A socket's writing side, shared by every thread of the child.
struct Out(Mutex<FrameWriter<Box<dyn std::io::Write + Send>>>);

impl Out {
    fn new(out: impl std::io::Write + Send + 'static) -> Self {
        Self(Mutex::new(FrameWriter::new(Box::new(out))))
    }

    fn send(&self, tag: Tag, id: u64, code: u8, fields: &[&str]) {
        let mut socket = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A write that fails means the parent is gone: the death signal ends us soon.
        let _ = socket.send(tag, id, code, fields);
    }
}

/// Answers to the plugin's own calls through the host, by request id.
type Waiting = Mutex<HashMap<u64, SyncSender<Frame>>>;

struct Child {
    /// The control socket (see the module's documentation).
    control: Out,
    /// The answer pipe: answers, and log events of threads serving a request.
    calls: Out,
    /// The call region (see the module's documentation).
    region: Region,
    library: RwLock<Option<PluginLibrary>>,
    plugin: Mutex<String>,
    waiting: Waiting,
    next_id: AtomicU64,
    pool: Pool,
}

thread_local! {
    /// The chain of plugin calls the request this thread serves came with.
    static CHAIN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    /// This thread serves a request: its log events go on the answer pipe, before the answer.
    static SERVING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The call region's request this thread serves, while its answer may still go into the
    /// region: taken (and the host told to read the answer pipe) by the first log event.
    static REGION_CALL: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Runs the child: never returns.
pub(crate) fn run(spec: &str) -> ! {
    let code = match serde_json::from_str::<ChildSpec>(spec) {
        Ok(spec) => serve(&spec),
        Err(e) => {
            eprintln!("plugin child: invalid {CHILD_ENV}: {e}");
            2
        }
    };
    std::process::exit(code)
}

fn serve(spec: &ChildSpec) -> i32 {
    // Dies with the parent; checked after setting it, in case the parent died before.
    if let Err(e) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
    {
        eprintln!("plugin child: cannot set the parent death signal: {e}");
        return 3;
    }
    let parent = rustix::process::getppid().map_or(0, |pid| pid.as_raw_nonzero().get());
    if u32::try_from(parent).ok() != Some(spec.parent) {
        return 4;
    }
    let socket = match std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(UnixStream::from)
    {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("plugin child: no socket on standard input: {e}");
            return 5;
        }
    };
    // Standard input becomes /dev/null: a process the plugin starts inherits it, and a copy
    // of the control socket there would keep the host from seeing this process end. (The
    // socket's own copy is close-on-exec.)
    if let Err(e) = std::fs::File::open("/dev/null")
        .and_then(|null| rustix::stdio::dup2_stdin(&null).map_err(std::io::Error::from))
    {
        eprintln!("plugin child: cannot detach standard input: {e}");
        return 5;
    }
    let (region, answers) = match receive_channels(&socket) {
        Ok(channels) => channels,
        Err(e) => {
            eprintln!("plugin child: no call region and answer pipe from the host: {e}");
            return 5;
        }
    };
    let Ok(writer) = socket.try_clone() else {
        return 5;
    };
    let child = Arc::new(Child {
        control: Out::new(writer),
        calls: Out::new(answers),
        region,
        library: RwLock::new(None),
        plugin: Mutex::new(String::new()),
        waiting: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        pool: Pool::default(),
    });
    let _ = tracing::subscriber::set_global_default(Bridge {
        child: Arc::clone(&child),
        max: spec.log_level,
    });
    if let Some(mb) = spec.memory_limit_mb {
        limit_memory(mb);
    }
    match load(spec) {
        Ok((library, manifest)) => {
            let shadow = library.shadow_path().to_string_lossy().into_owned();
            let hooks = u8::from(library.supports_hooks());
            *child.library.write().unwrap_or_else(|p| p.into_inner()) = Some(library);
            child
                .control
                .send(Tag::Loaded, 0, hooks, &[&manifest, &shadow]);
        }
        Err(reason) => {
            child.control.send(Tag::Refused, 0, 0, &[&reason]);
            return 0;
        }
    }
    let control = Arc::clone(&child);
    let spawned = std::thread::Builder::new()
        .name("plugin-control".into())
        .spawn(move || read_control(&control, socket));
    if spawned.is_err() {
        return 5;
    }
    serve_calls(&child)
}

/// Receives the call region (mapped) and the answer pipe's writing end, which the host sends
/// first thing over the control socket.
fn receive_channels(control: &UnixStream) -> std::io::Result<(Region, std::io::PipeWriter)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let received = rustix::net::recvmsg(
        control,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(region), Some(answers)) if received.bytes == 1 => {
            Ok((Region::open(&region)?, std::io::PipeWriter::from(answers)))
        }
        _ => Err(std::io::Error::other(
            "the first message carried no call region and answer pipe",
        )),
    }
}

/// Serves the call region: each request runs on this thread, which then puts its answer
/// there (or on the answer pipe, see the module's documentation). The host puts a request
/// there only when the one before is answered; others come over the control socket. The host
/// going away ends the process (the control socket's reader exits, or the death signal).
fn serve_calls(child: &Arc<Child>) -> ! {
    let region = &child.region;
    let mut last = 0u32;
    // One frame, its buffers used again from request to request.
    let mut frame = Frame {
        tag: Tag::Call,
        id: 0,
        code: 0,
        fields: Vec::new(),
    };
    loop {
        let Some((seq, whole)) = region.next_request(last, &mut frame, None) else {
            continue;
        };
        last = seq;
        if !whole {
            continue;
        }
        match frame.tag {
            Tag::Stop => {
                stop(child, frame.id);
                region.answer_on_the_pipe(seq);
            }
            Tag::Create | Tag::Call | Tag::Hook | Tag::Save | Tag::Restore => {
                SERVING.with(|serving| serving.set(true));
                REGION_CALL.with(|call| call.set(Some(seq)));
                let served = child.serve(&mut frame);
                SERVING.with(|serving| serving.set(false));
                // Still ours unless a log event sent the host to the answer pipe.
                let in_region = REGION_CALL.with(std::cell::Cell::take).is_some();
                let Some((id, code, fields)) = served else {
                    continue;
                };
                if in_region && region.answer_here(seq, id, code, &fields) {
                    continue;
                }
                // The host is told first, then reads the pipe while the answer is written: an
                // answer larger than the pipe holds does not wait for it.
                if in_region {
                    region.answer_on_the_pipe(seq);
                }
                let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
                child.calls.send(Tag::Answer, id, code, &fields);
            }
            _ => {}
        }
    }
}

/// Destroys the instance and exits, on a thread of its own: destroying waits for calls in
/// flight, and the parent kills the process past its deadline.
fn stop(child: &Arc<Child>, id: u64) {
    let child = Arc::clone(child);
    let spawned = std::thread::Builder::new()
        .name("plugin-stop".into())
        .spawn(move || {
            let library = child
                .library
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(library);
            child.calls.send(Tag::Answer, id, code::NONE, &[]);
            std::process::exit(0);
        });
    if spawned.is_err() {
        std::process::exit(0);
    }
}

/// Reads the control socket: answers to the plugin's calls through the host go to the threads
/// waiting for them; requests (sent here while the call socket's one runs) start on a thread of
/// the pool, so that a slow call never holds up another.
fn read_control(child: &Arc<Child>, socket: UnixStream) {
    let mut reader = FrameReader::default();
    loop {
        let frame = match reader.read(&mut &socket) {
            Ok(Some(frame)) => frame,
            // The parent closed the socket or is gone: nothing more to do.
            Ok(None) | Err(_) => std::process::exit(0),
        };
        match frame.tag {
            Tag::HostAnswer => {
                let waiter = child
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&frame.id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(frame);
                }
            }
            Tag::Stop => stop(child, frame.id),
            Tag::Create | Tag::Call | Tag::Hook | Tag::Save | Tag::Restore => {
                let serving = Arc::clone(child);
                child.pool.submit(Box::new(move || serving.handle(frame)));
            }
            _ => {}
        }
    }
}

/// Limits the process's data (heap and private mappings) to `mb` MiB: an allocation beyond it
/// fails, and the plugin's process ends, not the host.
fn limit_memory(mb: u64) {
    let bytes = mb.saturating_mul(1 << 20);
    let limit = rustix::process::Rlimit {
        current: Some(bytes),
        maximum: Some(bytes),
    };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Data, limit) {
        tracing::warn!(error = %e, memory_limit_mb = mb, "the memory limit could not be set");
    }
}

/// Checks, copies and opens the plugin file as the host does in-process; the manifest's JSON.
fn load(spec: &ChildSpec) -> Result<(PluginLibrary, String), String> {
    let policy = crate::loader::FilePolicy {
        max_size: spec.max_size,
        insecure_permissions: spec.insecure_permissions,
    };
    let checked =
        crate::loader::check_plugin_file(&spec.file, policy).map_err(|e| e.to_string())?;
    let shadow = crate::loader::shadow_copy(
        &spec.file,
        &checked,
        &spec.shadow_dir,
        spec.shadow_id,
        spec.generation,
    )
    .map_err(|e| e.to_string())?;
    let header = checked.header;
    drop(checked);
    let library = PluginLibrary::open(shadow, header).map_err(|e| e.to_string())?;
    let manifest = library
        .manifest_json()
        .map_err(|e| format!("the manifest could not be read: {}", e.message))?;
    Ok((library, manifest))
}

/// The answer frame's code and fields for a plugin's answer.
fn answer_of(answer: Result<Option<&str>, PluginFailure<'_>>) -> (u8, Vec<String>) {
    match answer {
        Ok(Some(json)) => (code::SOME, vec![json.to_owned()]),
        Ok(None) => (code::NONE, Vec::new()),
        Err(PluginFailure::Reported(kind, message)) => {
            (code::ERROR + kind as u8, vec![message.to_owned()])
        }
        Err(PluginFailure::NotUtf8(e)) => (code::NOT_UTF8, vec![e.to_string()]),
        Err(PluginFailure::Lost(lost)) => (code::ERROR, vec![lost.to_string()]),
    }
}

fn error_of(error: PluginError) -> (u8, Vec<String>) {
    (code::ERROR + error.kind as u8, vec![error.message])
}

impl Child {
    /// Serves a request and writes its answer on the answer pipe.
    fn handle(self: &Arc<Self>, mut frame: Frame) {
        SERVING.with(|serving| serving.set(true));
        if let Some((id, code, fields)) = self.serve(&mut frame) {
            let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
            self.calls.send(Tag::Answer, id, code, &fields);
        }
        SERVING.with(|serving| serving.set(false));
    }

    /// Runs a request: its id, and the answer's code and fields.
    fn serve(self: &Arc<Self>, frame: &mut Frame) -> Option<(u64, u8, Vec<String>)> {
        let id = frame.id;
        let (code, fields) = match frame.tag {
            Tag::Create => {
                if let Ok(mb) = frame.field(1).parse::<u64>() {
                    limit_memory(mb);
                }
                let store = frame.field(2) == "store";
                self.create(frame.take(0), store)
            }
            Tag::Call | Tag::Hook => {
                CHAIN.with(|chain| frame.field(2).clone_into(&mut chain.borrow_mut()));
                let library = self.library.read().unwrap_or_else(|p| p.into_inner());
                let (name, input) = (frame.field(0), frame.field(1));
                let answer = library.as_ref().and_then(|library| {
                    if frame.tag == Tag::Call {
                        library.call(name, input, answer_of)
                    } else {
                        library.on_hook(name, input, answer_of)
                    }
                });
                answer.unwrap_or((code::UNSUPPORTED, Vec::new()))
            }
            Tag::Save => {
                let library = self.library.read().unwrap_or_else(|p| p.into_inner());
                match library.as_ref().and_then(PluginLibrary::save_state) {
                    None => (code::UNSUPPORTED, Vec::new()),
                    Some(Ok(Some(state))) => (code::SOME, vec![state]),
                    Some(Ok(None)) => (code::NONE, Vec::new()),
                    Some(Err(e)) => error_of(e),
                }
            }
            Tag::Restore => {
                let library = self.library.read().unwrap_or_else(|p| p.into_inner());
                match library
                    .as_ref()
                    .and_then(|library| library.restore_state(frame.field(0)))
                {
                    None => (code::UNSUPPORTED, Vec::new()),
                    Some(Ok(())) => (code::NONE, Vec::new()),
                    Some(Err(e)) => error_of(e),
                }
            }
            _ => return None,
        };
        Some((id, code, fields))
    }

    fn create(self: &Arc<Self>, config: String, store: bool) -> (u8, Vec<String>) {
        let mut library = self.library.write().unwrap_or_else(|p| p.into_inner());
        let Some(library) = library.as_mut() else {
            return (code::UNSUPPORTED, Vec::new());
        };
        let name = serde_json::from_str::<plugin_api::Manifest>(
            &library.manifest_json().unwrap_or_default(),
        )
        .map(|m| m.name)
        .unwrap_or_default();
        name.clone_into(&mut self.plugin.lock().unwrap_or_else(|p| p.into_inner()));
        let child = Arc::downgrade(self);
        let call_back: crate::dylib::CallBack = Box::new(move |plugin, method, params| {
            let child = child
                .upgrade()
                .ok_or_else(|| PluginError::failed("the plugin's process is stopping"))?;
            child.call_host(plugin, method, params)
        });
        // The host's shared store, when it has one: each operation goes to the host process
        // (`Tag::HostStore`), which answers from its store in the plugin's namespace.
        let store = store.then(|| {
            let child = Arc::downgrade(self);
            let forward: crate::store::StoreForward = Box::new(move |op, args| {
                let child = child
                    .upgrade()
                    .ok_or_else(|| PluginError::failed("the plugin's process is stopping"))?;
                child.ask_host(Tag::HostStore, &[op, args])
            });
            crate::store::StoreAccess::Forward(forward)
        });
        match library.create(&name, &config, call_back, store) {
            Ok(()) => (code::NONE, Vec::new()),
            Err(e) => error_of(e),
        }
    }

    /// The plugin calls another plugin: the request goes to the host, this thread waits.
    fn call_host(
        &self,
        plugin: &str,
        method: &str,
        params: &str,
    ) -> Result<Option<String>, PluginError> {
        let chain = CHAIN.with(|chain| chain.borrow().clone());
        self.ask_host(Tag::HostCall, &[plugin, method, params, &chain])
    }

    /// Sends a request to the host and waits for its [`Tag::HostAnswer`].
    fn ask_host(&self, tag: Tag, fields: &[&str]) -> Result<Option<String>, PluginError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, answer) = sync_channel(1);
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, sender);
        self.control.send(tag, id, 0, fields);
        // The host answers every call it gets (a failure is an answer); if it is gone, the
        // death signal ends this process.
        let mut frame = answer
            .recv()
            .map_err(|_| PluginError::failed("the host did not answer"))?;
        match frame.code {
            code::SOME => Ok(Some(frame.take(0))),
            code::NONE => Ok(None),
            c => Err(PluginError {
                kind: super::error_kind(c.saturating_sub(code::ERROR)),
                message: frame.take(0),
            }),
        }
    }
}

/// Work for the pool.
type Job = Box<dyn FnOnce() + Send>;

/// The threads that run requests: a request starts at once on an idle thread, or on a new one,
/// so slow calls never queue behind each other. Threads idle for a minute end.
#[derive(Default)]
struct Pool {
    state: Arc<(Mutex<PoolState>, Condvar)>,
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    idle: usize,
}

impl Pool {
    fn submit(&self, job: Job) {
        let (lock, ready) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        state.jobs.push_back(job);
        if state.idle >= state.jobs.len() {
            ready.notify_one();
            return;
        }
        drop(state);
        let shared = Arc::clone(&self.state);
        let spawned = std::thread::Builder::new()
            .name("plugin-call".into())
            .spawn(move || work(&shared));
        if spawned.is_err() {
            // No new thread: an idle one (or the next to finish) takes the job.
            ready.notify_one();
        }
    }
}

fn work(shared: &(Mutex<PoolState>, Condvar)) {
    let (lock, ready) = shared;
    let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            job();
            state = lock.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        state.idle += 1;
        let (next, waited) = ready
            .wait_timeout(state, Duration::from_secs(60))
            .unwrap_or_else(|p| p.into_inner());
        state = next;
        state.idle -= 1;
        if waited.timed_out() && state.jobs.is_empty() {
            return;
        }
    }
}

/// The child's `tracing` subscriber: every event goes to the host as a log frame, where it is
/// emitted again with the plugin's name.
struct Bridge {
    child: Arc<Child>,
    max: u8,
}

fn level_number(level: tracing::Level) -> u8 {
    use plugin_api::abi::level;
    match level {
        tracing::Level::ERROR => level::ERROR,
        tracing::Level::WARN => level::WARN,
        tracing::Level::INFO => level::INFO,
        tracing::Level::DEBUG => level::DEBUG,
        _ => level::TRACE,
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    target: Option<String>,
    rest: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "target" => self.target = Some(value.to_owned()),
            "plugin" => {}
            name => {
                use std::fmt::Write as _;
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "target" => self.target = Some(format!("{value:?}")),
            "plugin" => {}
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

impl tracing::Subscriber for Bridge {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        level_number(*metadata.level()) <= self.max
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let target = fields
            .target
            .unwrap_or_else(|| event.metadata().target().to_owned());
        fields.message.push_str(&fields.rest);
        let out = if SERVING.with(std::cell::Cell::get) {
            // Serving the region's request: the host is sent to the answer pipe before the
            // first event goes there (a pipe full of events must have a reader), and the
            // answer follows them there.
            if let Some(seq) = REGION_CALL.with(std::cell::Cell::take) {
                self.child.region.answer_on_the_pipe(seq);
            }
            &self.child.calls
        } else {
            &self.child.control
        };
        out.send(
            Tag::Log,
            0,
            level_number(*event.metadata().level()),
            &[&target, &fields.message],
        );
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
