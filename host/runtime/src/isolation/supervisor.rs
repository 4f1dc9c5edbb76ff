//! The host side of an isolated plugin: starts its child process, routes answers to the
//! threads waiting for them, forwards the plugin's calls to other plugins, logs what the child
//! prints, and restarts the child (with the plugin's last saved state) when it crashes or
//! overruns a deadline, within the crash-loop limit.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Read};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;

use super::child::{CHILD_ENV, ChildSpec};
use super::protocol::{Frame, FrameReader, FrameWriter, Tag, code};
use super::shm::{self, Region};
use super::{HostLink, IsolationReport, Lost, RestartPolicy};
use crate::error::PluginError;
use crate::text::EscapeControl;

/// How a child is started: everything but the plugin's configuration.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) program: PathBuf,
    pub(crate) spec: ChildSpec,
    /// The deadline of a call, and of `create`, `save_state`, `restore_state` and `destroy`.
    pub(crate) timeout_ms: u64,
    pub(crate) restarts: RestartPolicy,
}

enum Reply {
    Frame(Frame),
    Lost(Lost),
}

/// The longest a caller reading the answers waits in one `poll` before it looks at its
/// deadline again (and whether the child was seen to end).
const READ_TICK: Duration = Duration::from_secs(1);

/// A caller waiting for its answer.
struct Waiter {
    thread: std::thread::Thread,
    reply: Option<Reply>,
    /// Its request went through the call region (not the control socket).
    on_calls: bool,
}

/// The callers of one child, and which of them reads the call socket.
#[derive(Default)]
struct Waits {
    /// The child ended: no new request is sent.
    dead: bool,
    /// A caller reads the answer pipe for everyone (it leads); the others sleep until their
    /// answer is handed to them or the reading is handed over.
    reading: bool,
    /// By request id. The ids are the host's own (sequential), so a hash without a random
    /// key serves: a child can only look ids up, never add them.
    pending: FxHashMap<u64, Waiter>,
    /// The last answer read from the answer pipe that no caller waited for: the call in the
    /// call region waits there (unregistered) until the child says its answer is on the pipe,
    /// and a reader may have taken it by then. One frame, so a child sending answers nobody
    /// asked for holds no more.
    stray: Option<Frame>,
}

/// The answer pipe's reading side, used by the caller that leads.
struct Reading {
    pipe: std::io::PipeReader,
    frames: FrameReader,
}

/// Why a leading caller stopped reading without its answer.
enum Unanswered {
    /// Its deadline passed.
    Overdue,
    /// The answer pipe ended or carried something that is not a frame.
    Ended,
}

/// One child process and the channels to it (see [`super::child`]): a request goes through
/// the call region ([`shm`]) when no other request is there and it fits, and its caller sleeps
/// on the region until the answer is put there; a futex wakes either side only when it sleeps,
/// so a call costs a wake and a wait on each side, and no thread in between wakes. Other
/// requests go over the control socket, and their answers (and an answer that does not fit the
/// region) come back on the answer pipe, which the waiting callers read themselves, one at a
/// time (leader and followers): the one reading hands each other caller its answer, and the
/// reading to one of them when its own answer is in. What the child starts on its own (log
/// events outside requests, its calls to other plugins and to the store) comes over the control
/// socket, which a thread of its own reads; that thread also sees the child end, and wakes
/// every caller.
struct Conn {
    /// The plugin (its file, for a first child that has not read the manifest yet).
    plugin: String,
    pid: u32,
    process: Mutex<Option<std::process::Child>>,
    control: Mutex<FrameWriter<UnixStream>>,
    /// A handle on the control socket to hang it up when the child is killed.
    hangup: Option<UnixStream>,
    /// The call region, shared with the child: everything read there is the child's to spoil.
    region: Region,
    /// The last request's sequence number in the call region (1 to `i32::MAX`, then 1
    /// again), changed only by the caller that set `calls_busy`.
    calls_seq: AtomicU32,
    /// A request is in the call region and not answered yet: the caller that sets it owns the
    /// region's request slot (and `calls_seq`) until its answer is in.
    calls_busy: AtomicBool,
    waits: Mutex<Waits>,
    reading: Mutex<Reading>,
    next_id: AtomicU64,
    /// The child's plugin calls and slow store operations being answered, each on a thread of
    /// its own: at most [`MAX_FORWARDED`].
    forwarded: AtomicU32,
    /// Refusing forwarded operations (at the limit) since the last one taken: warned once.
    refusing: AtomicBool,
    dead: AtomicBool,
    /// Set when the host killed the child for a deadline: the calls it takes down with it
    /// answer "timed out" too.
    timed_out: AtomicBool,
    /// Set when the host stopped the child on purpose: not a crash.
    stopping: AtomicBool,
    shadow: Mutex<Option<PathBuf>>,
    owner: Owner,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("pid", &self.pid).finish()
    }
}

impl Conn {
    fn kill(&self) {
        if let Some(child) = self
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            let _ = child.kill();
        }
        // The control socket is hung up on our side too: a process the plugin forked may
        // hold the child's end open, and the reader must see the end to reap and restart.
        if let Some(hangup) = &self.hangup {
            let _ = hangup.shutdown(std::net::Shutdown::Both);
        }
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, Waits> {
        self.waits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plugin's name, for its log events.
    fn name(&self) -> String {
        self.owner
            .get()
            .and_then(Weak::upgrade)
            .map_or_else(|| self.plugin.clone(), |s| s.name())
    }

    /// Sends a request and waits for its answer at most `timeout`; an overrun kills the child
    /// (and is counted in `overruns`; calls the kill takes down with it are not).
    fn request(
        &self,
        tag: Tag,
        fields: &[&str],
        timeout: Duration,
        overruns: Option<&AtomicU64>,
    ) -> Result<Frame, Lost> {
        if self.dead.load(Ordering::Acquire) {
            return Err(Lost::Crashed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let on_calls = super::protocol::frame_len(fields) <= shm::SLOT
            && !self.calls_busy.swap(true, Ordering::Acquire);
        if on_calls {
            // Putting the request in the region never blocks; a child that does not take it
            // overruns the deadline as one that takes too long. The caller is not registered
            // among those the answer pipe's readers serve unless its answer goes there.
            let last = self.calls_seq.load(Ordering::Relaxed);
            let seq = last % (i32::MAX as u32) + 1;
            self.calls_seq.store(seq, Ordering::Relaxed);
            self.region.request(seq, tag, id, fields);
            return match self.wait_region(id, [last, seq], Instant::now() + timeout, timeout) {
                Ok(Reply::Frame(frame)) => Ok(frame),
                Ok(Reply::Lost(lost)) => Err(lost),
                Err(Unanswered::Ended) => Err(self.lost()),
                Err(Unanswered::Overdue) => Err(self.overran(timeout, overruns, "overran")),
            };
        }
        let deadline = Instant::now() + timeout;
        {
            let mut waits = self.waits();
            if waits.dead {
                return Err(Lost::Crashed);
            }
            let waiter = Waiter {
                thread: std::thread::current(),
                reply: None,
                on_calls,
            };
            waits.pending.insert(id, waiter);
        }
        // The write is bounded by the call's deadline (the socket has a send timeout): a
        // child that stops reading cannot hold the caller.
        let written = {
            let mut socket = self.control.lock().unwrap_or_else(|p| p.into_inner());
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = socket
                .get_ref()
                .set_write_timeout(Some(left.max(Duration::from_millis(1))));
            socket.send(tag, id, 0, fields)
        };
        if let Err(e) = written {
            self.waits().pending.remove(&id);
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) {
                // The child took no request within the deadline: an overrun, as a call that
                // took too long.
                return Err(self.overran(timeout, overruns, "took no request within"));
            }
            return Err(Lost::Crashed);
        }
        match self.wait(id, on_calls, deadline) {
            Ok(Reply::Frame(frame)) => Ok(frame),
            Ok(Reply::Lost(lost)) => Err(lost),
            Err(Unanswered::Ended) => Err(self.lost()),
            Err(Unanswered::Overdue) => Err(self.overran(timeout, overruns, "overran")),
        }
    }

    /// A request past its deadline (`what` the child did: `overran`, `took no request
    /// within`): the child is killed (and restarted), the overrun counted and logged where
    /// `overruns` counts them (not for a stop).
    fn overran(&self, timeout: Duration, overruns: Option<&AtomicU64>, what: &str) -> Lost {
        self.timed_out.store(true, Ordering::Release);
        self.kill();
        if let Some(overruns) = overruns {
            overruns.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                plugin = %self.plugin,
                pid = self.pid,
                timeout_ms = timeout.as_millis(),
                "isolated plugin's process {what} its deadline; it is killed and restarted"
            );
        }
        Lost::TimedOut
    }

    /// Why calls in flight get no answer once the child ended.
    fn lost(&self) -> Lost {
        if self.timed_out.load(Ordering::Acquire) {
            Lost::TimedOut
        } else {
            Lost::Crashed
        }
    }

    /// Waits for the answer to request `id`, number `seq` in the call region (`last` is the
    /// number of the region's previous request, answered), at most `timeout`: put there by
    /// the child (read out, then checked: it must be one frame, the answer to `id`), or on the
    /// answer pipe when the child says so. A child that ends wakes the caller (see
    /// [`Conn::end_calls`]); a child that writes what is not an answer there, or an answer
    /// number that is neither, is ended (a child changing the number on and on would
    /// otherwise keep the caller looping, a system call a turn, until the deadline).
    fn wait_region(
        &self,
        id: u64,
        [last, seq]: [u32; 2],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Reply, Unanswered> {
        let mut first = true;
        let mut frame = Frame {
            tag: Tag::Answer,
            id: 0,
            code: 0,
            fields: Vec::new(),
        };
        loop {
            // Read before the looks below: any change after them wakes the wait at once.
            let seen = self.region.answered();
            if self.dead.load(Ordering::SeqCst) {
                return Err(Unanswered::Ended);
            }
            // The host's own wake-up at the child's end is seen as `dead` above.
            if seen != seq && seen != last {
                return Ok(self.garbled());
            }
            match self.region.answer(seq, &mut frame) {
                shm::Answer::NotYet => {}
                shm::Answer::Here if frame.tag == Tag::Answer && frame.id == id => {
                    self.calls_busy.store(false, Ordering::Release);
                    return Ok(Reply::Frame(frame));
                }
                shm::Answer::Here | shm::Answer::Invalid => return Ok(self.garbled()),
                shm::Answer::OnThePipe => {
                    {
                        let mut waits = self.waits();
                        if let Some(frame) = waits.stray.take_if(|frame| frame.id == id) {
                            self.calls_busy.store(false, Ordering::Release);
                            return Ok(Reply::Frame(frame));
                        }
                        if waits.dead {
                            return Err(Unanswered::Ended);
                        }
                        let waiter = Waiter {
                            thread: std::thread::current(),
                            reply: None,
                            on_calls: true,
                        };
                        waits.pending.insert(id, waiter);
                    }
                    return self.wait(id, true, deadline);
                }
            }
            // The first wait is not preceded by a clock read (the common call's only wait): it
            // lasts at most the call's whole timeout from now, which overshoots the deadline
            // by the time since the call started (microseconds), once. (Its timer is best
            // far away, too: a wait of a millisecond, shorter than the scheduler's tick,
            // made every call 1.4 µs slower on a virtual machine, whose idle CPU then has to
            // program its timer.)
            let wait = if first {
                first = false;
                timeout
            } else {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Unanswered::Overdue);
                }
                deadline - now
            };
            self.region.wait_answer(seen, wait.min(shm::TICK));
        }
    }

    /// The child put something in the call region that is not the answer it was asked for:
    /// it is ended, as one that writes what is not a frame on the answer pipe.
    fn garbled(&self) -> Reply {
        tracing::warn!(
            plugin = %self.plugin,
            pid = self.pid,
            "isolated plugin's process put a malformed answer in its call region; it is killed and restarted"
        );
        self.kill();
        self.end_calls();
        Reply::Lost(self.lost())
    }

    /// Waits for the answer to request `id`: handed over by the caller that reads the answer
    /// pipe, or read here once the reading is free.
    fn wait(&self, id: u64, on_calls: bool, deadline: Instant) -> Result<Reply, Unanswered> {
        loop {
            let mut waits = self.waits();
            let Some(waiter) = waits.pending.get_mut(&id) else {
                return Err(Unanswered::Ended);
            };
            if let Some(reply) = waiter.reply.take() {
                waits.pending.remove(&id);
                return Ok(reply);
            }
            if !waits.reading {
                waits.reading = true;
                drop(waits);
                return self.lead(id, on_calls, deadline);
            }
            let now = Instant::now();
            if now >= deadline {
                waits.pending.remove(&id);
                return Err(Unanswered::Overdue);
            }
            drop(waits);
            std::thread::park_timeout(deadline - now);
        }
    }

    /// Reads the answer pipe until the answer to `id` is in (handing the others theirs), the
    /// deadline passes or the pipe ends; then hands the reading to another waiting caller.
    fn lead(&self, id: u64, on_calls: bool, deadline: Instant) -> Result<Reply, Unanswered> {
        let mut reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        // Reads that brought something; from the second on, each is followed by a look at the
        // deadline (the first, the common call's only one, is not: it saves a clock read).
        let mut reads = 0u32;
        let outcome = loop {
            match reading.frames.next() {
                Ok(Some(frame)) if frame.tag == Tag::Answer && frame.id == id => {
                    if on_calls {
                        self.calls_busy.store(false, Ordering::Release);
                    }
                    break Ok(Reply::Frame(frame));
                }
                Ok(Some(frame)) => {
                    self.route(frame);
                    continue;
                }
                Ok(None) => {}
                Err(_) => break Err(Unanswered::Ended),
            }
            // The answer pipe does not block: a read takes what came, and only an empty pipe
            // costs a `poll` (an answer redirected from the call region is often in already).
            let Reading { pipe, frames } = &mut *reading;
            match frames.fill(pipe) {
                Ok(0) => break Err(Unanswered::Ended),
                Ok(_) => {
                    // A child that keeps writing without answering gets no time past the
                    // deadline: the pipe is never empty for it, but the deadline is looked at.
                    reads = reads.saturating_add(1);
                    if reads > 1 && Instant::now() >= deadline {
                        break Err(Unanswered::Overdue);
                    }
                    continue;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break Err(Unanswered::Ended),
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Unanswered::Overdue);
            }
            // A pipe has no read timeout: `poll` bounds the wait, then `read` takes what came.
            let wait = rustix::event::Timespec::try_from((deadline - now).min(READ_TICK))
                .unwrap_or(rustix::event::Timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                });
            let mut fds = [rustix::event::PollFd::new(
                &*pipe,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut fds, Some(&wait)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => {
                    // The child may have been seen to end by the control socket's reader.
                    if self.dead.load(Ordering::Acquire) {
                        break Err(Unanswered::Ended);
                    }
                }
                Ok(_) => {}
                Err(_) => break Err(Unanswered::Ended),
            }
        };
        drop(reading);
        let answered = {
            let mut waits = self.waits();
            waits.reading = false;
            let ours = waits.pending.remove(&id).and_then(|w| w.reply);
            if let Some(next) = waits.pending.values().find(|w| w.reply.is_none()) {
                next.thread.unpark();
            }
            ours
        };
        match outcome {
            Ok(reply) => Ok(reply),
            Err(Unanswered::Ended) => {
                // A child that closed its end, or wrote something that is not a frame, is
                // ended here; its control socket's reader then reports it.
                self.kill();
                self.end_calls();
                Ok(answered.unwrap_or(Reply::Lost(self.lost())))
            }
            Err(Unanswered::Overdue) => answered.ok_or(Unanswered::Overdue),
        }
    }

    /// A frame on the answer pipe that is not the reader's own answer.
    fn route(&self, frame: Frame) {
        match frame.tag {
            Tag::Answer => {
                let mut waits = self.waits();
                match waits.pending.get_mut(&frame.id) {
                    Some(waiter) if waiter.reply.is_none() => {
                        if waiter.on_calls {
                            self.calls_busy.store(false, Ordering::Release);
                        }
                        waiter.reply = Some(Reply::Frame(frame));
                        waiter.thread.unpark();
                    }
                    Some(_) => {}
                    None => waits.stray = Some(frame),
                }
            }
            Tag::Log => emit(&self.name(), frame.code, frame.field(0), frame.field(1)),
            _ => {}
        }
    }

    /// The child ended: every call in flight answers "crashed" (or "timed out", when the host
    /// killed it for a deadline), and no new request is sent.
    fn end_calls(&self) {
        self.dead.store(true, Ordering::SeqCst);
        // A caller asleep on the call region wakes and sees `dead`.
        self.region.wake_host();
        let lost = self.lost();
        let mut waits = self.waits();
        waits.dead = true;
        for waiter in waits.pending.values_mut() {
            if waiter.reply.is_none() {
                waiter.reply = Some(Reply::Lost(lost));
                waiter.thread.unpark();
            }
        }
    }

    /// Answers the child's request `id` (a call to another plugin, a store operation).
    fn answer_child(&self, id: u64, result: Result<Option<String>, PluginError>) {
        let (code, text) = match result {
            Ok(Some(answer)) => (code::SOME, answer),
            Ok(None) => (code::NONE, String::new()),
            Err(e) => (code::ERROR + e.kind as u8, e.message),
        };
        let mut out = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.send(Tag::HostAnswer, id, code, &[&text]);
    }
}

/// What an isolated plugin's generation holds: the current child, and how to start another.
pub(crate) struct Supervisor {
    plugin: String,
    launch: Mutex<Launch>,
    timeout_ms: AtomicU64,
    restarts_policy: Mutex<RestartPolicy>,
    /// The plugin's configuration, for `create` in every child.
    config: Mutex<Option<String>>,
    link: Mutex<Option<HostLink>>,
    /// The host's shared store in the plugin's namespace: the child's store operations are
    /// answered here. `None` when the host has no store.
    store: Mutex<Option<crate::store::PluginStore>>,
    conn: ArcSwap<Conn>,
    /// The last state the plugin saved or was given: a restarted child is given it.
    last_state: Mutex<Option<String>>,
    crashes: AtomicU64,
    restarts: AtomicU64,
    timeouts: AtomicU64,
    crash_times: Mutex<VecDeque<Instant>>,
    /// The crash-loop limit was reached: no restart until [`Supervisor::reset`].
    suspended: AtomicBool,
    restarting: AtomicBool,
    stopped: AtomicBool,
    /// The first child created its instance: from then on, a crash is restarted.
    created: AtomicBool,
    pid: AtomicU32,
    this: Weak<Supervisor>,
    /// What each child's reader reaches the supervisor through (set once it exists).
    owner: Owner,
    /// The plugin's name, once created.
    name: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("plugin", &self.name())
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

/// The supervisor of a child's reader thread.
type Owner = Arc<std::sync::OnceLock<Weak<Supervisor>>>;

impl Supervisor {
    /// Starts the first child of a generation; it loads the plugin file and answers with the
    /// manifest's JSON text.
    pub(crate) fn start(
        plugin_file: String,
        launch: Launch,
    ) -> Result<(Arc<Self>, String, bool), String> {
        let owner = Owner::default();
        let (conn, manifest, hooks) = spawn(&launch, &plugin_file, Arc::clone(&owner))?;
        let pid = conn.pid;
        let supervisor = Arc::new_cyclic(|this| Supervisor {
            plugin: plugin_file,
            timeout_ms: AtomicU64::new(launch.timeout_ms),
            restarts_policy: Mutex::new(launch.restarts),
            launch: Mutex::new(launch),
            config: Mutex::new(None),
            link: Mutex::new(None),
            store: Mutex::new(None),
            conn: ArcSwap::new(Arc::clone(&conn)),
            last_state: Mutex::new(None),
            crashes: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            crash_times: Mutex::new(VecDeque::new()),
            suspended: AtomicBool::new(false),
            restarting: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            created: AtomicBool::new(false),
            pid: AtomicU32::new(pid),
            this: this.clone(),
            owner: Arc::clone(&owner),
            name: std::sync::OnceLock::new(),
        });
        let _ = owner.set(Arc::downgrade(&supervisor));
        Ok((supervisor, manifest, hooks))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn launch(&self) -> Launch {
        self.launch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies the plugin's settings, once its name is known (from the manifest).
    pub(crate) fn configure(
        &self,
        timeout_ms: u64,
        memory_limit_mb: Option<u64>,
        restarts: RestartPolicy,
    ) {
        self.timeout_ms.store(timeout_ms.max(1), Ordering::Relaxed);
        *self
            .restarts_policy
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = restarts;
        let mut launch = self.launch.lock().unwrap_or_else(|p| p.into_inner());
        launch.timeout_ms = timeout_ms.max(1);
        launch.restarts = restarts;
        launch.spec.memory_limit_mb = memory_limit_mb;
    }

    /// Creates the instance in the child (the first one, and each restarted one).
    pub(crate) fn create(
        &self,
        name: &str,
        config: String,
        link: HostLink,
        store: Option<crate::store::PluginStore>,
    ) -> Result<(), CreateError> {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = Some(config.clone());
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(link);
        *self.store.lock().unwrap_or_else(|p| p.into_inner()) = store;
        let _ = self.name.set(name.to_owned());
        let memory = self.launch().spec.memory_limit_mb;
        create_in(
            &self.conn.load(),
            &config,
            memory,
            self.has_store(),
            self.timeout(),
        )?;
        self.created.store(true, Ordering::Release);
        Ok(())
    }

    /// A request to the current child, with the plugin's deadline.
    pub(crate) fn request(&self, tag: Tag, fields: &[&str]) -> Result<Frame, Lost> {
        self.request_within(tag, fields, None)
    }

    /// [`request`](Self::request) with a deadline of its own (a hook subscription's
    /// `timeoutMs`) instead of the plugin's.
    pub(crate) fn request_within(
        &self,
        tag: Tag,
        fields: &[&str],
        timeout: Option<Duration>,
    ) -> Result<Frame, Lost> {
        if self.suspended.load(Ordering::Relaxed) {
            return Err(Lost::Suspended);
        }
        self.conn.load().request(
            tag,
            fields,
            timeout.unwrap_or_else(|| self.timeout()),
            Some(&self.timeouts),
        )
    }

    /// The plugin's name (its file until created).
    fn name(&self) -> String {
        self.name.get().unwrap_or(&self.plugin).clone()
    }

    /// Remembers the state the plugin saved or was given.
    pub(crate) fn keep_state(&self, state: &str) {
        *self.last_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.to_owned());
    }

    /// Whether the crash-loop limit stopped restarts.
    pub(crate) fn suspended(&self) -> bool {
        self.suspended.load(Ordering::Relaxed)
    }

    /// The last state the plugin saved or was given.
    pub(crate) fn last_state(&self) -> Option<String> {
        self.last_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The child's process id now (0 while none runs).
    pub(crate) fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    pub(crate) fn report(&self) -> IsolationReport {
        IsolationReport {
            mode: "process",
            pid: Some(self.pid()).filter(|&p| p != 0),
            crashes: self.crashes.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            restarts_suspended: self.suspended.load(Ordering::Relaxed),
            memory_limit_mb: self.launch().spec.memory_limit_mb,
            quarantined: None,
        }
    }

    /// Lifts a crash-loop suspension and starts a child if none runs.
    pub(crate) fn reset(&self) {
        self.crash_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let was = self.suspended.swap(false, Ordering::AcqRel);
        if was || self.conn.load().dead.load(Ordering::Acquire) {
            self.restart_soon();
        }
    }

    /// The child of `conn` ended: answer its calls, count the crash, restart.
    fn ended(&self, conn: &Conn, status: String) {
        if self.stopped.load(Ordering::Acquire)
            || conn.stopping.load(Ordering::Acquire)
            || !self.created.load(Ordering::Acquire)
        {
            return;
        }
        if !std::ptr::eq(Arc::as_ptr(&self.conn.load()), conn) {
            return;
        }
        self.pid.store(0, Ordering::Relaxed);
        let timed_out = conn.timed_out.load(Ordering::Acquire);
        if !timed_out {
            self.crashes.fetch_add(1, Ordering::Relaxed);
        }
        if self.crash_loop(&status) {
            return;
        }
        tracing::warn!(
            plugin = %self.name(),
            pid = conn.pid,
            %status,
            reason = if timed_out { "timed out" } else { "crashed" },
            "isolated plugin's process ended; restarting it with its last saved state"
        );
        self.restart_soon();
    }

    /// Counts a crash (or a failed restart) in the crash-loop window; at the limit, stops
    /// restarts and says so.
    fn crash_loop(&self, status: &str) -> bool {
        let limit = *self
            .restarts_policy
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let looping = {
            let mut times = self.crash_times.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            times.push_back(now);
            while times
                .front()
                .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(limit.window_sec))
            {
                times.pop_front();
            }
            times.len() >= limit.max as usize
        };
        if looping {
            self.suspended.store(true, Ordering::Release);
            tracing::error!(
                plugin = %self.name(),
                %status,
                max = limit.max,
                window_sec = limit.window_sec,
                "isolated plugin crashed too often; not restarted until it is reloaded, its file changes, or it is reset (POST /v1/plugins/{{plugin}}/reset)"
            );
        }
        looping
    }

    fn restart_soon(&self) {
        if self.restarting.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.this.clone();
        let spawned = std::thread::Builder::new()
            .name("plugin-restart".into())
            .spawn(move || {
                if let Some(this) = this.upgrade() {
                    this.restart();
                    this.restarting.store(false, Ordering::Release);
                }
            });
        if spawned.is_err() {
            self.restarting.store(false, Ordering::Release);
        }
    }

    /// Starts a new child until one serves; a failed start counts toward the crash-loop limit
    /// and is tried again after a pause (0.1 s, doubling up to 5 s).
    fn restart(&self) {
        let mut pause = Duration::from_millis(100);
        loop {
            if self.stopped.load(Ordering::Acquire) || self.suspended.load(Ordering::Acquire) {
                return;
            }
            match self.try_restart() {
                Ok(()) => return,
                Err(why) => {
                    if self.crash_loop(&why) {
                        return;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn try_restart(&self) -> Result<(), String> {
        let Some(config) = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let state = self
            .last_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // A state that takes the plugin down is dropped: the second try starts fresh.
        for state in [state, None] {
            let started = Instant::now();
            let launch = self.launch();
            let (conn, _, _) = match spawn(&launch, &self.name(), Arc::clone(&self.owner)) {
                Ok(spawned) => spawned,
                Err(e) => {
                    tracing::error!(plugin = %self.name(), error = %e, "the isolated plugin's process could not be restarted");
                    return Err(e);
                }
            };
            if let Err(e) = create_in(
                &conn,
                &config,
                launch.spec.memory_limit_mb,
                self.has_store(),
                self.timeout(),
            ) {
                tracing::error!(plugin = %self.name(), error = %e, "the restarted plugin failed to create its instance");
                stop_conn(&conn, Duration::ZERO);
                return Err(e.to_string());
            }
            if let Some(state) = &state {
                match conn.request(Tag::Restore, &[state], self.timeout(), None) {
                    Ok(frame) if frame.code == code::NONE || frame.code == code::UNSUPPORTED => {}
                    Ok(frame) => {
                        tracing::warn!(plugin = %self.name(), error = %EscapeControl(frame.field(0)), "the restarted plugin refused its last state; it starts fresh");
                    }
                    Err(lost) => {
                        tracing::warn!(plugin = %self.name(), reason = %lost, "the restarted plugin's process ended while restoring its last state; starting it again without that state");
                        stop_conn(&conn, Duration::ZERO);
                        *self.last_state.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        continue;
                    }
                }
            }
            if self.stopped.load(Ordering::Acquire) {
                stop_conn(&conn, Duration::ZERO);
                return Ok(());
            }
            self.pid.store(conn.pid, Ordering::Relaxed);
            let old = self.conn.swap(Arc::clone(&conn));
            drop(old);
            self.restarts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                plugin = %self.name(),
                pid = conn.pid,
                state_restored = state.is_some(),
                took_ms = started.elapsed().as_millis(),
                "isolated plugin restarted"
            );
            return Ok(());
        }
        Err("the restarted plugin's process ended while restoring its state, twice".to_owned())
    }

    /// Stops the child: `destroy` within the plugin's deadline (as an in-process generation is
    /// destroyed by whoever drops it last, but bounded), then killed.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let conn = self.conn.load_full();
        let started = Instant::now();
        stop_conn(&conn, self.timeout());
        tracing::debug!(
            plugin = %self.name(),
            pid = conn.pid,
            took_us = started.elapsed().as_micros(),
            "isolated plugin's process stopped"
        );
    }

    fn has_store(&self) -> bool {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The child's operation on the shared store: answered from the host's store. The hot
    /// operations (additions, marks, warm reads) answer from its cache at once, on the reading
    /// thread; one that may wait for the backend (a cold read, a compare-and-set, a scan) gets
    /// its own thread, so the child's other answers are not held up.
    fn forward_store(&self, conn: &Arc<Conn>, frame: Frame) {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let answer = move |conn: &Conn, frame: &Frame| {
            let result = match &store {
                Some(store) => store.op(frame.field(0), frame.field(1)),
                None => Ok(None),
            };
            conn.answer_child(frame.id, result);
        };
        if matches!(frame.field(0), "add" | "mark" | "available") {
            answer(conn, &frame);
            return;
        }
        let Some(slot) = self.forwarding(conn, frame.id) else {
            return;
        };
        let conn = Arc::clone(conn);
        let spawned = std::thread::Builder::new()
            .name("plugin-host-store".into())
            .spawn(move || {
                let _slot = slot;
                answer(&conn, &frame);
            });
        if spawned.is_err() {
            tracing::warn!(plugin = %self.name(), "no thread for a plugin's store operation; it gets no answer until its process is restarted");
        }
    }

    /// A place for one more of the child's operations answered on a thread of its own, or
    /// `None` after answering the child at once with an error when [`MAX_FORWARDED`] are in
    /// flight: a child sending plugin calls or store operations without waiting for their
    /// answers must not make the host start a thread for each.
    fn forwarding(&self, conn: &Arc<Conn>, id: u64) -> Option<Forwarded> {
        let taken = conn.forwarded.fetch_add(1, Ordering::AcqRel);
        let slot = Forwarded(Arc::clone(conn));
        if taken < MAX_FORWARDED {
            conn.refusing.store(false, Ordering::Relaxed);
            return Some(slot);
        }
        drop(slot);
        // Once per run of refusals: a child flooding frames cannot flood the log too.
        if !conn.refusing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                plugin = %self.name(),
                limit = MAX_FORWARDED,
                "the plugin's process has too many calls to other plugins and store operations in flight; they are refused until some answer"
            );
        }
        conn.answer_child(
            id,
            Err(PluginError::failed(format!(
                "too many calls to other plugins and store operations in flight from this plugin's process (at most {MAX_FORWARDED}); wait for some to answer"
            ))),
        );
        None
    }

    fn forward_host_call(&self, conn: &Arc<Conn>, mut frame: Frame) {
        let Some(slot) = self.forwarding(conn, frame.id) else {
            return;
        };
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let conn = Arc::clone(conn);
        let caller = self.name();
        let spawned = std::thread::Builder::new()
            .name("plugin-host-call".into())
            .spawn(move || {
                let _slot = slot;
                let result = match link {
                    Some(link) => {
                        let chain = frame.take(3);
                        link(
                            &caller,
                            &chain,
                            frame.field(0),
                            frame.field(1),
                            frame.field(2),
                        )
                    }
                    None => Err(PluginError::failed("the plugin is not created yet")),
                };
                conn.answer_child(frame.id, result);
            });
        if spawned.is_err() {
            tracing::warn!(plugin = %self.name(), "no thread for a plugin's call to another plugin; it gets no answer until its process is restarted");
        }
    }
}

/// How many of a child's plugin calls and slow store operations the host answers at once, each
/// on a thread of its own. The child makes them from its own threads, each waiting for its
/// answer, so a plugin reaches this only with more than this many threads calling at once:
/// well above what the host's own callers can make it run at once (the control API serves 64
/// connections, and 16 more with `/healthz` only).
const MAX_FORWARDED: u32 = 256;

/// One of a child's operations answered on a thread of its own; dropping it frees its place.
struct Forwarded(Arc<Conn>);

impl Drop for Forwarded {
    fn drop(&mut self) {
        self.0.forwarded.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why `create` failed in a child.
#[derive(Debug)]
pub(crate) enum CreateError {
    Plugin(PluginError),
    Lost(Lost),
}

impl std::fmt::Display for CreateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreateError::Plugin(e) => f.write_str(&e.message),
            CreateError::Lost(lost) => write!(f, "its process {lost}"),
        }
    }
}

fn create_in(
    conn: &Conn,
    config: &str,
    memory_limit_mb: Option<u64>,
    store: bool,
    timeout: Duration,
) -> Result<(), CreateError> {
    let memory = memory_limit_mb.map(|mb| mb.to_string()).unwrap_or_default();
    let store = if store { "store" } else { "" };
    match conn.request(Tag::Create, &[config, &memory, store], timeout, None) {
        Ok(frame) if frame.code == code::NONE => Ok(()),
        Ok(mut frame) => Err(CreateError::Plugin(PluginError {
            kind: super::error_kind(frame.code.saturating_sub(code::ERROR)),
            message: frame.take(0),
        })),
        Err(lost) => Err(CreateError::Lost(lost)),
    }
}

fn stop_conn(conn: &Conn, timeout: Duration) {
    conn.stopping.store(true, Ordering::Release);
    if !timeout.is_zero() && !conn.dead.load(Ordering::Acquire) {
        let _ = conn.request(Tag::Stop, &[], timeout, None);
    }
    conn.kill();
}

/// Starts a child for `launch` and waits (within the deadline) for it to load the plugin.
fn spawn(
    launch: &Launch,
    label: &str,
    supervisor: Owner,
) -> Result<(Arc<Conn>, String, bool), String> {
    let no_socket = |e: std::io::Error| format!("no socket for the plugin's process: {e}");
    let (ours, theirs) = UnixStream::pair().map_err(no_socket)?;
    let (region, region_theirs) = Region::create()
        .map_err(|e| format!("no call region (shared memory) for the plugin's process: {e}"))?;
    let (answers, answers_theirs) = std::io::pipe().map_err(no_socket)?;
    // The host's end of the answer pipe does not block (see `Conn::lead`); the child's does.
    rustix::io::ioctl_fionbio(&answers, true).map_err(|e| no_socket(e.into()))?;
    let spec = serde_json::to_string(&launch.spec)
        .map_err(|e| format!("the plugin's process settings: {e}"))?;
    let mut command = Command::new(&launch.program);
    command
        .env(CHILD_ENV, spec)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_from_lasting_thread(command).map_err(|e| {
        format!(
            "could not start the plugin's process ({}): {e}",
            launch.program.display()
        )
    })?;
    let pid = child.id();
    for (stream, reader) in [
        (
            "stdout",
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        (
            "stderr",
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ] {
        if let Some(reader) = reader {
            log_output(label.to_owned(), Arc::clone(&supervisor), stream, reader);
        }
    }
    let kill = |mut child: std::process::Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        why
    };
    // The region and the pipe go first, before anything the child reads; the host keeps no
    // copy of the child's end of the pipe, so that the answer pipe ends when the child does.
    let sent = send_channels(&ours, region_theirs.as_fd(), answers_theirs.as_fd());
    drop((region_theirs, answers_theirs));
    let (mut reader, control) = match (sent, ours.try_clone()) {
        (Ok(()), Ok(reader)) => (reader, ours),
        (Err(e), _) | (_, Err(e)) => return Err(kill(child, no_socket(e))),
    };
    let mut frames = FrameReader::default();
    let timeout = Duration::from_millis(launch.timeout_ms).max(Duration::from_millis(1));
    // Every write on the control socket is bounded (answers to the child's own calls too).
    let _ = control.set_write_timeout(Some(timeout));
    let deadline = Instant::now() + timeout;
    // The child may log while it loads (the loader's warnings): those come first, and however
    // many it sends, the load ends at the deadline.
    let first = loop {
        match frames.read_by(&mut reader, deadline) {
            Ok(Some(frame)) if frame.tag == Tag::Log => {
                emit(label, frame.code, frame.field(0), frame.field(1));
            }
            other => break other,
        }
    };
    let _ = reader.set_read_timeout(None);
    let (manifest, shadow, hooks) = match first {
        Ok(Some(frame)) if frame.tag == Tag::Loaded => (
            frame.field(0).to_owned(),
            PathBuf::from(frame.field(1)),
            frame.code == 1,
        ),
        Ok(Some(frame)) if frame.tag == Tag::Refused => {
            return Err(kill(child, frame.field(0).to_owned()));
        }
        // Every wait is bounded: whatever the child does next, it is ended first.
        Ok(_) => {
            let _ = child.kill();
            let status = child.wait().map_or_else(|e| e.to_string(), describe_status);
            return Err(format!(
                "the plugin's process ended while loading the plugin ({status})"
            ));
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(kill(
                child,
                format!(
                    "the plugin's process did not load the plugin within {} ms and was killed (does the program's `main` call `plugin_host::isolation::run_child_if_requested()` first?)",
                    launch.timeout_ms
                ),
            ));
        }
        Err(e) => return Err(kill(child, format!("the plugin's process: {e}"))),
    };
    let conn = Arc::new(Conn {
        plugin: label.to_owned(),
        pid,
        process: Mutex::new(Some(child)),
        hangup: control.try_clone().ok(),
        control: Mutex::new(FrameWriter::new(control)),
        region,
        calls_seq: AtomicU32::new(0),
        calls_busy: AtomicBool::new(false),
        waits: Mutex::new(Waits::default()),
        reading: Mutex::new(Reading {
            pipe: answers,
            frames: FrameReader::default(),
        }),
        next_id: AtomicU64::new(1),
        forwarded: AtomicU32::new(0),
        refusing: AtomicBool::new(false),
        dead: AtomicBool::new(false),
        timed_out: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        shadow: Mutex::new(Some(shadow)),
        owner: Arc::clone(&supervisor),
    });
    let read_conn = Arc::clone(&conn);
    let label = label.to_owned();
    let spawned = std::thread::Builder::new()
        .name("plugin-child-reader".into())
        .spawn(move || read_control(&read_conn, reader, frames, &label, &supervisor));
    if let Err(e) = spawned {
        conn.kill();
        return Err(format!("no thread to read the plugin's process: {e}"));
    }
    Ok((conn, manifest, hooks))
}

/// A child's parent-death signal fires when the *thread* that started it ends, not the process:
/// every child is started by one thread that lasts as long as the process.
fn spawn_from_lasting_thread(command: Command) -> std::io::Result<std::process::Child> {
    type Job = (Command, SyncSender<std::io::Result<std::process::Child>>);
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, next) = std::sync::mpsc::channel::<Job>();
        let _ = std::thread::Builder::new()
            .name("plugin-spawner".into())
            .spawn(move || {
                for (mut command, reply) in next {
                    let _ = reply.send(command.spawn());
                }
            });
        Mutex::new(jobs)
    });
    let (reply, spawned) = sync_channel(1);
    let sent = spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply));
    let no_thread = || std::io::Error::other("the thread that starts plugin processes is gone");
    sent.map_err(|_| no_thread())?;
    spawned.recv().map_err(|_| no_thread())?
}

/// Sends the call region and the child's end of the answer pipe over `control` (one byte
/// carrying them).
fn send_channels(
    control: &UnixStream,
    region: std::os::fd::BorrowedFd<'_>,
    answers: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    let fds = [region, answers];
    if !ancillary.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room to send the call region"));
    }
    let sent = rustix::net::sendmsg(
        control,
        &[std::io::IoSlice::new(&[0])],
        &mut ancillary,
        SendFlags::NOSIGNAL,
    )?;
    if sent == 1 {
        Ok(())
    } else {
        Err(std::io::Error::other("the call region was not sent"))
    }
}

/// The reader of one child's control socket: forwards the plugin's calls to other plugins and
/// its store operations, emits its log events; at the end, answers every call in flight and
/// reports the exit.
fn read_control(
    conn: &Arc<Conn>,
    mut reader: UnixStream,
    mut frames: FrameReader,
    label: &str,
    owner: &Owner,
) {
    let supervisor = || owner.get().and_then(Weak::upgrade);
    while let Ok(Some(frame)) = frames.read(&mut reader) {
        match frame.tag {
            Tag::HostCall => match supervisor() {
                Some(supervisor) => supervisor.forward_host_call(conn, frame),
                None => conn.answer_child(
                    frame.id,
                    Err(PluginError::failed("the plugin is not created yet")),
                ),
            },
            Tag::HostStore => match supervisor() {
                Some(supervisor) => supervisor.forward_store(conn, frame),
                None => conn.answer_child(frame.id, Ok(None)),
            },
            Tag::Log => {
                let name = supervisor().map_or_else(|| label.to_owned(), |s| s.name());
                emit(&name, frame.code, frame.field(0), frame.field(1));
            }
            _ => {}
        }
    }
    conn.end_calls();
    let child = conn
        .process
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let status = match child {
        Some(mut child) => {
            // The socket closes when the process ends; a child that closed it and lives on is
            // ended here.
            let status = match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                _ => {
                    std::thread::sleep(Duration::from_millis(20));
                    match child.try_wait() {
                        Ok(Some(status)) => Ok(status),
                        _ => {
                            let _ = child.kill();
                            child.wait()
                        }
                    }
                }
            };
            status.map_or_else(|e| e.to_string(), describe_status)
        }
        None => "unknown".to_owned(),
    };
    // A killed child leaves its shadow copy behind.
    if let Some(shadow) = conn.shadow.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = std::fs::remove_file(shadow);
    }
    if let Some(supervisor) = supervisor() {
        supervisor.ended(conn, status);
    }
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The longest line of a child's output logged whole; a longer one is logged in pieces of
/// this size, so that output without newlines cannot grow the worker's memory.
const MAX_OUTPUT_LINE: u64 = 8 << 10;

/// Logs each line the child writes to `stream` as the plugin's: under the plugin's own log
/// target (so `--log warn,NAME=info` shows it and `NAME=off` hides it), stdout at info and
/// stderr (where a panic message goes) at warn, with the stream as `source`.
fn log_output(label: String, owner: Owner, stream: &'static str, reader: Box<dyn Read + Send>) {
    let level = if stream == "stderr" {
        tracing::Level::WARN
    } else {
        tracing::Level::INFO
    };
    let _ = std::thread::Builder::new()
        .name("plugin-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut reader)
                    .take(MAX_OUTPUT_LINE)
                    .read_until(b'\n', &mut line)
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end_matches(['\n', '\r']);
                        // The plugin's name once it is known (the first child reads it).
                        let plugin = owner
                            .get()
                            .and_then(Weak::upgrade)
                            .map_or_else(|| label.clone(), |s| s.name());
                        crate::plugin_log::emit(
                            &plugin,
                            level,
                            &format_args!("{stream}"),
                            &format_args!("{}", EscapeControl(text)),
                        );
                    }
                }
            }
        });
}

/// Emits a child's log event on the host's subscriber: the plugin's under the plugin's own log
/// target (as an in-process plugin's events are), its own target as `source`; the runtime's
/// (from the child's loader) as the runtime's, naming the plugin.
fn emit(plugin: &str, level: u8, target: &str, message: &str) {
    use plugin_api::abi::level as l;
    // The runtime's own events in the child (its loader's checks, say) stay the runtime's.
    if target.starts_with("plugin_host") {
        let target = EscapeControl(target);
        let message = EscapeControl(message);
        match level {
            l::ERROR => tracing::error!(plugin, %target, "{message}"),
            l::WARN => tracing::warn!(plugin, %target, "{message}"),
            l::INFO => tracing::info!(plugin, %target, "{message}"),
            l::DEBUG => tracing::debug!(plugin, %target, "{message}"),
            _ => tracing::trace!(plugin, %target, "{message}"),
        }
        return;
    }
    let level = match level {
        l::ERROR => tracing::Level::ERROR,
        l::WARN => tracing::Level::WARN,
        l::INFO => tracing::Level::INFO,
        l::DEBUG => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    crate::plugin_log::emit(
        plugin,
        level,
        &format_args!("{}", EscapeControl(target)),
        &format_args!("{}", EscapeControl(message)),
    );
}
