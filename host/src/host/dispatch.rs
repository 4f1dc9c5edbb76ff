//! Hook dispatch, host-side hooks, the fire-and-forget queue, and plugin-to-plugin calls.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use plugin_api::abi::ErrorKind;
use plugin_api::{HookMode, HookResult};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Failure, Generation, Inner, PluginHost, Plugins, Registry};
use crate::config::PluginsConfig;
use crate::dylib::PluginFailure;
use crate::hooks::{
    HookEvent, HookPoint, HookPointInfo, HostHookFn, SubscriberInfo, Violation, parse_answer, phase,
};
use crate::stats::{Outcome, StatsCell};
use crate::text::EscapeControl;

/// Who runs when a subscriber's turn comes.
#[derive(Clone)]
enum Target {
    Plugin {
        generation: Arc<Generation>,
        stats: Arc<StatsCell>,
    },
    Host(HostHookFn),
}

/// One subscriber of one hook point, with the priority and mode in force.
#[derive(Clone)]
pub(super) struct Subscriber {
    name: Arc<str>,
    priority: i32,
    mode: HookMode,
    target: Target,
}

/// A hook registered from Rust.
#[derive(Clone)]
pub(super) struct HostHook {
    point: HookPoint,
    name: Arc<str>,
    priority: i32,
    mode: HookMode,
    f: HostHookFn,
}

impl std::fmt::Debug for HostHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostHook")
            .field("point", &self.point)
            .field("name", &self.name)
            .finish()
    }
}

/// The subscribers of every hook point, in execution order.
#[derive(Clone, Default)]
pub(super) struct HookTable {
    points: [Arc<[Subscriber]>; HookPoint::ALL.len()],
    /// Per point, where each mode's subscribers start in `points` (sequential, concurrent,
    /// audit, fire-and-forget), then the end.
    phases: [[usize; 5]; HookPoint::ALL.len()],
}

impl std::fmt::Debug for HookTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts: Vec<usize> = self.points.iter().map(|p| p.len()).collect();
        f.debug_struct("HookTable")
            .field("subscribers", &counts)
            .finish()
    }
}

impl HookTable {
    fn build(plugins: &Plugins, host_hooks: &BTreeMap<u64, HostHook>, host: &PluginHost) -> Self {
        let config: Arc<PluginsConfig> = host.inner.config.load_full();
        let mut points: Vec<Vec<Subscriber>> = vec![Vec::new(); HookPoint::ALL.len()];
        for (name, slot) in plugins {
            let settings = host.settings_in(&config, name);
            for subscription in &slot.generation.manifest.hooks {
                let Some(point) = HookPoint::from_name(&subscription.hook) else {
                    continue;
                };
                let declared = (subscription.priority, subscription.mode);
                let Some((priority, mode)) =
                    config.hook_settings(&settings, name, &subscription.hook, declared)
                else {
                    continue;
                };
                points[point.index()].push(Subscriber {
                    name: Arc::from(&**name),
                    priority,
                    mode,
                    target: Target::Plugin {
                        generation: Arc::clone(&slot.generation),
                        stats: Arc::clone(&slot.stats),
                    },
                });
            }
        }
        for hook in host_hooks.values() {
            points[hook.point.index()].push(Subscriber {
                name: Arc::clone(&hook.name),
                priority: hook.priority,
                mode: hook.mode,
                target: Target::Host(Arc::clone(&hook.f)),
            });
        }
        let mut table = HookTable::default();
        for (i, mut subscribers) in points.into_iter().enumerate() {
            subscribers.sort_by(|a, b| {
                (phase(a.mode), a.priority, &a.name).cmp(&(phase(b.mode), b.priority, &b.name))
            });
            let mut bounds = [0; 5];
            for (phase_index, bound) in bounds.iter_mut().enumerate() {
                *bound = subscribers.partition_point(|s| usize::from(phase(s.mode)) < phase_index);
            }
            table.phases[i] = bounds;
            table.points[i] = subscribers.into();
        }
        table
    }
}

/// Host-side hooks registered through a session; all are unregistered when it is dropped.
///
/// ```no_run
/// use host::{HookPoint, PluginHost};
/// use plugin_api::{HookMode, HookResult};
///
/// let host = PluginHost::builder("plugins").build()?;
/// let session = host.hook_session();
/// session.register(HookPoint::TaskScored, "print-scores", 0, HookMode::Audit, |event| {
///     println!("scored: {}", event.payload["score"]);
///     HookResult::Continue
/// });
/// // ... run tasks ...
/// drop(session); // the hook is gone
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Debug)]
pub struct HookSession {
    host: PluginHost,
    ids: std::sync::Mutex<Vec<u64>>,
}

impl HookSession {
    /// Registers a hook for as long as this session lives. See
    /// [`PluginHost::register_hook`].
    pub fn register(
        &self,
        point: HookPoint,
        name: &str,
        priority: i32,
        mode: HookMode,
        f: impl Fn(&HookEvent<'_>) -> HookResult + Send + Sync + 'static,
    ) {
        let id = self.host.register_hook(point, name, priority, mode, f);
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).push(id);
    }
}

impl Drop for HookSession {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|p| p.into_inner()));
        for id in ids {
            self.host.unregister_hook(id);
        }
    }
}

/// A queued fire-and-forget event: the payload as a value for a host hook, as text for a plugin.
struct Job {
    subscriber: Subscriber,
    point: HookPoint,
    value: Option<Arc<Value>>,
    text: Option<Arc<str>>,
}

/// The bounded queue of fire-and-forget events and the thread that runs them.
#[derive(Debug)]
pub(super) struct FireQueue {
    sender: Option<SyncSender<Job>>,
    dropped: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl FireQueue {
    pub(super) fn start(capacity: usize) -> anyhow::Result<Self> {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Job>(capacity);
        let thread = std::thread::Builder::new()
            .name("hook-fire-and-forget".into())
            .spawn(move || {
                while let Ok(job) = receiver.recv() {
                    run_subscriber(
                        &job.subscriber,
                        job.point,
                        job.value.as_deref(),
                        job.text.as_deref(),
                        &mut Timer::new(None),
                    );
                }
            })?;
        Ok(Self {
            sender: Some(sender),
            dropped: AtomicU64::new(0),
            thread: Some(thread),
        })
    }

    fn push(&self, job: Job) {
        let Some(sender) = &self.sender else {
            return;
        };
        if let Err(TrySendError::Full(job)) = sender.try_send(job) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Counted always; logged at 1, 2, 4, 8, ... so a flood does not flood the log too.
            if dropped.is_power_of_two() {
                tracing::warn!(
                    hook = %job.point,
                    subscriber = %job.subscriber.name,
                    dropped_total = dropped,
                    "the fire-and-forget queue is full; event dropped"
                );
            }
        }
    }

    /// Runs what is queued, then stops the thread.
    pub(super) fn stop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Subscriber {
    fn is_plugin(&self) -> bool {
        matches!(self.target, Target::Plugin { .. })
    }
}

/// A payload given as a typed value, written out only as far as the subscribers need it.
trait Source {
    fn to_value(&self) -> Value;
    fn to_text(&self) -> String;
}

impl<T: Serialize> Source for T {
    fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a hook payload cannot be written as JSON; subscribers get null");
            Value::Null
        })
    }

    fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a hook payload cannot be written as JSON; subscribers get null");
            "null".to_owned()
        })
    }
}

/// A dispatch's payload: the value (for host hooks and modifications) and the JSON text (for
/// plugins), each made the first time a subscriber needs it, from the value once there is one,
/// else from the typed source.
struct Payload<'s> {
    value: Option<Value>,
    text: Option<String>,
    source: Option<&'s dyn Source>,
}

impl Payload<'_> {
    fn value(&mut self) -> &mut Value {
        let (source, text) = (self.source, &self.text);
        self.value.get_or_insert_with(|| match (source, text) {
            (Some(source), _) => source.to_value(),
            (None, Some(text)) => serde_json::from_str(text).unwrap_or(Value::Null),
            (None, None) => Value::Null,
        })
    }

    /// The text, and whether it was made just now.
    fn text(&mut self) -> (&str, bool) {
        let made = self.text.is_none();
        let (source, value) = (self.source, &self.value);
        let text = self.text.get_or_insert_with(|| match (value, source) {
            (Some(value), _) => value.to_string(),
            (None, Some(source)) => source.to_text(),
            (None, None) => "null".to_owned(),
        });
        (text, made)
    }

    /// Makes now what the subscribers of a phase running elsewhere (other threads, the queue)
    /// will need.
    fn prepare(&mut self, subscribers: &[Subscriber]) {
        if subscribers.iter().any(Subscriber::is_plugin) {
            self.text();
        }
        if subscribers.iter().any(|s| !s.is_plugin()) {
            self.value();
        }
    }

    /// Applies a modification within the write policy; the value is the payload from then on.
    fn modify(&mut self, point: HookPoint, subscriber: &str, fields: Map<String, Value>) {
        if apply_patch(point, subscriber, self.value(), fields) {
            self.text = None;
            self.source = None;
        }
    }
}

/// Runs one subscriber; `None` when it failed (logged, and counted for plugins).
///
/// `text` caches the payload as JSON text: made the first time a plugin subscriber needs it
/// (host hooks take the value itself), and reset by the caller when the payload changes.
/// Times subscribers run one after another. Reading the clock costs about as much as a small
/// subscriber, so when nothing happens between two subscribers, the reading that ends one call
/// starts the next.
pub(super) struct Timer<'c> {
    clock: Option<&'c quanta::Clock>,
    /// The reading that ended the previous call, when nothing has happened since; else 0.
    last: u64,
}

impl<'c> Timer<'c> {
    pub(super) fn new(clock: Option<&'c quanta::Clock>) -> Self {
        Timer { clock, last: 0 }
    }

    fn start(&mut self) -> u64 {
        match self.clock {
            None => 0,
            Some(_) if self.last != 0 => self.last,
            Some(clock) => clock.raw(),
        }
    }

    /// Ticks since `started`, at least 1 (0 means untimed); the reading may start the next call.
    fn stop(&mut self, started: u64) -> u64 {
        self.clock.map_or(0, |clock| {
            self.last = clock.raw();
            self.last.saturating_sub(started).max(1)
        })
    }

    /// Something ran since the last call ended: the next call reads the clock afresh.
    fn interrupt(&mut self) {
        self.last = 0;
    }
}

/// Runs one subscriber on the payload as a value (host hooks) or as text (plugins), whichever
/// its kind takes; the caller made that one. `None` when it failed (logged, and counted for
/// plugins).
fn run_subscriber(
    subscriber: &Subscriber,
    point: HookPoint,
    value: Option<&Value>,
    text: Option<&str>,
    timer: &mut Timer<'_>,
) -> Option<HookResult> {
    match &subscriber.target {
        Target::Plugin { generation, stats } => {
            let text = text.unwrap_or("null");
            let started = timer.start();
            let result = generation
                .library
                .on_hook(point.name(), text, |answer| match answer {
                    Ok(json) => parse_answer(json).map_err(|e| (ErrorKind::Failed, e)),
                    Err(PluginFailure::Reported(kind, message)) => Err((kind, message.to_owned())),
                    Err(PluginFailure::NotUtf8(e)) => Err((
                        ErrorKind::Failed,
                        format!("the hook answer is not UTF-8 text ({e})"),
                    )),
                });
            let ticks = timer.stop(started);
            match result {
                None => None,
                Some(Ok(answer)) => {
                    stats.record(ticks, Outcome::Ok);
                    Some(answer)
                }
                Some(Err((kind, message))) => {
                    let panicked = kind == ErrorKind::Panicked;
                    stats.record(
                        ticks,
                        if panicked {
                            Outcome::Panic
                        } else {
                            Outcome::Error
                        },
                    );
                    timer.interrupt();
                    tracing::warn!(
                        plugin = %subscriber.name,
                        hook = %point,
                        error = %EscapeControl(&message),
                        "hook subscriber {}; skipped, the chain goes on",
                        if panicked { "panicked" } else { "failed" }
                    );
                    None
                }
            }
        }
        Target::Host(f) => {
            timer.interrupt();
            let payload = value.unwrap_or(&Value::Null);
            match catch_unwind(AssertUnwindSafe(|| f(&HookEvent { point, payload }))) {
                Ok(answer) => Some(answer),
                Err(_) => {
                    tracing::warn!(subscriber = %subscriber.name, hook = %point, "host hook panicked; skipped, the chain goes on");
                    None
                }
            }
        }
    }
}

/// Runs a subscriber on this thread, making the form of the payload it takes first.
fn run_in_turn(
    subscriber: &Subscriber,
    point: HookPoint,
    payload: &mut Payload<'_>,
    timer: &mut Timer<'_>,
) -> Option<HookResult> {
    if subscriber.is_plugin() {
        let (text, made) = payload.text();
        if made {
            timer.interrupt();
        }
        run_subscriber(subscriber, point, None, Some(text), timer)
    } else {
        let value = payload.value();
        run_subscriber(subscriber, point, Some(value), None, timer)
    }
}

/// Applies a modification within the hook point's write policy; returns whether anything
/// changed. Fields outside the policy are refused, each with a warning.
pub(crate) fn apply_patch(
    point: HookPoint,
    subscriber: &str,
    payload: &mut Value,
    fields: Map<String, Value>,
) -> bool {
    let writable = point.writable();
    let Some(object) = payload.as_object_mut() else {
        return false;
    };
    let mut changed = false;
    for (field, value) in fields {
        if writable.contains(&field.as_str()) {
            object.insert(field, value);
            changed = true;
        } else {
            tracing::warn!(
                plugin = %subscriber,
                hook = %point,
                field = %field,
                writable = ?writable,
                "modification refused: the field is not writable at this hook point"
            );
        }
    }
    changed
}

thread_local! {
    /// The plugins waiting on this thread for a plugin-to-plugin call to return.
    static CALL_CHAIN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Deepest chain of plugin-to-plugin calls allowed.
const MAX_CALL_DEPTH: usize = 16;

impl PluginHost {
    /// Runs the subscribers of `point`; see [the module docs](crate::hooks) for the order.
    ///
    /// `payload` is only called when the point has subscribers: a hook nobody subscribes to
    /// costs one atomic load and no allocation. Returns `Ok(None)` then, and otherwise
    /// `Ok(Some(payload))` with the payload as the sequential subscribers left it.
    ///
    /// # Errors
    ///
    /// A subscriber blocked: the [`Violation`] names it and gives its reason and code.
    pub fn fire(
        &self,
        point: HookPoint,
        payload: impl FnOnce() -> Value,
    ) -> Result<Option<Value>, Violation> {
        let registry = self.inner.registry.load();
        if registry.hooks.points[point.index()].is_empty() {
            return Ok(None);
        }
        let mut payload = Payload {
            value: Some(payload()),
            text: None,
            source: None,
        };
        self.dispatch_hook(&registry, point, &mut payload, true)?;
        Ok(payload.value)
    }

    /// Runs the subscribers of `point` on a payload of any `Serialize` type, for events whose
    /// payload the caller does not read back (as `task.scored`): the payload is written
    /// straight to JSON text for plugin subscribers, and turned into a [`Value`] only if a
    /// host-side hook subscribes. Nothing is written when nobody subscribes. Modifications are
    /// refused, each with a warning (use [`fire`](Self::fire) to get them).
    ///
    /// # Errors
    ///
    /// A subscriber blocked, as for [`fire`](Self::fire).
    pub fn notify<P: Serialize>(
        &self,
        point: HookPoint,
        payload: impl FnOnce() -> P,
    ) -> Result<(), Violation> {
        let registry = self.inner.registry.load();
        if registry.hooks.points[point.index()].is_empty() {
            return Ok(());
        }
        let source = payload();
        let mut payload = Payload {
            value: None,
            text: None,
            source: Some(&source),
        };
        self.dispatch_hook(&registry, point, &mut payload, false)
    }

    /// The phases of a dispatch; `take_changes` says whether sequential subscribers may modify.
    fn dispatch_hook(
        &self,
        registry: &Registry,
        point: HookPoint,
        payload: &mut Payload<'_>,
        take_changes: bool,
    ) -> Result<(), Violation> {
        let subscribers = &registry.hooks.points[point.index()];
        let clock = self.inner.clock.as_ref();
        // The table is sorted by mode first, so each mode's subscribers are one slice.
        let [seq, conc, aud, det, end] = registry.hooks.phases[point.index()];
        let (sequential, concurrent, audit, detached) = (
            &subscribers[seq..conc],
            &subscribers[conc..aud],
            &subscribers[aud..det],
            &subscribers[det..end],
        );

        let mut timer = Timer::new(clock);
        for subscriber in sequential {
            match run_in_turn(subscriber, point, payload, &mut timer) {
                None | Some(HookResult::Continue) => {}
                Some(HookResult::Modify(fields)) => {
                    timer.interrupt();
                    if take_changes {
                        payload.modify(point, &subscriber.name, fields);
                    } else {
                        tracing::warn!(
                            plugin = %subscriber.name,
                            hook = %point,
                            fields = ?fields.keys().collect::<Vec<_>>(),
                            "modification refused: this event's payload is not read back"
                        );
                    }
                }
                Some(HookResult::Block { reason, code }) => {
                    return Err(self.blocked(point, subscriber, reason, code));
                }
            }
        }

        if !concurrent.is_empty() {
            payload.prepare(concurrent);
            let (value, text) = (payload.value.as_ref(), payload.text.as_deref());
            let answers: Vec<Option<HookResult>> = if concurrent.len() == 1 {
                vec![run_subscriber(
                    &concurrent[0],
                    point,
                    value,
                    text,
                    &mut Timer::new(clock),
                )]
            } else {
                std::thread::scope(|scope| {
                    let others: Vec<_> = concurrent[1..]
                        .iter()
                        .map(|s| {
                            scope.spawn(move || {
                                run_subscriber(s, point, value, text, &mut Timer::new(clock))
                            })
                        })
                        .collect();
                    let mut answers = vec![run_subscriber(
                        &concurrent[0],
                        point,
                        value,
                        text,
                        &mut Timer::new(clock),
                    )];
                    answers.extend(others.into_iter().map(|h| h.join().unwrap_or(None)));
                    answers
                })
            };
            for (subscriber, answer) in concurrent.iter().zip(answers) {
                match answer {
                    Some(HookResult::Block { reason, code }) => {
                        return Err(self.blocked(point, subscriber, reason, code));
                    }
                    Some(HookResult::Modify(_)) => tracing::warn!(
                        plugin = %subscriber.name,
                        hook = %point,
                        "modification refused: concurrent subscribers may block but not modify"
                    ),
                    None | Some(HookResult::Continue) => {}
                }
            }
        }

        // The concurrent phase ran since the last sequential call ended.
        timer.interrupt();
        for subscriber in audit {
            match run_in_turn(subscriber, point, payload, &mut timer) {
                Some(HookResult::Continue) | None => {}
                Some(other) => {
                    timer.interrupt();
                    tracing::info!(
                        subscriber = %subscriber.name,
                        hook = %point,
                        answer = ?other,
                        "audit subscriber answered; ignored (audit is read-only)"
                    );
                }
            }
        }

        if !detached.is_empty() {
            payload.prepare(detached);
            let value: Option<Arc<Value>> = payload.value.clone().map(Arc::new);
            let text: Option<Arc<str>> = payload.text.as_deref().map(Arc::from);
            for subscriber in detached {
                self.inner.fire_queue.push(Job {
                    subscriber: subscriber.clone(),
                    point,
                    value: value.clone(),
                    text: text.clone(),
                });
            }
        }
        Ok(())
    }

    /// Whether anyone subscribes to `point`.
    pub fn has_subscribers(&self, point: HookPoint) -> bool {
        !self.inner.registry.load().hooks.points[point.index()].is_empty()
    }

    fn blocked(
        &self,
        point: HookPoint,
        subscriber: &Subscriber,
        reason: String,
        code: String,
    ) -> Violation {
        let violation = Violation {
            hook: point.name().to_owned(),
            subscriber: subscriber.name.to_string(),
            reason,
            code,
        };
        tracing::info!(hook = %point, subscriber = %EscapeControl(&violation.subscriber), code = %EscapeControl(&violation.code), reason = %EscapeControl(&violation.reason), "hook blocked");
        violation
    }

    /// Registers a hook written in Rust, for the life of the host (see
    /// [`hook_session`](Self::hook_session) for a scoped one). It runs like a plugin
    /// subscriber of that priority and mode; `name` identifies it in listings, logs and
    /// violations. Returns an id for [`unregister_hook`](Self::unregister_hook).
    pub fn register_hook(
        &self,
        point: HookPoint,
        name: &str,
        priority: i32,
        mode: HookMode,
        f: impl Fn(&HookEvent<'_>) -> HookResult + Send + Sync + 'static,
    ) -> u64 {
        let _admin = self.admin();
        let id = self.inner.next_hook_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .host_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                HostHook {
                    point,
                    name: Arc::from(name),
                    priority,
                    mode,
                    f: Arc::new(f),
                },
            );
        self.republish();
        id
    }

    /// Removes a hook registered with [`register_hook`](Self::register_hook).
    pub fn unregister_hook(&self, id: u64) {
        let _admin = self.admin();
        let removed = self
            .inner
            .host_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if removed.is_some() {
            self.republish();
        }
    }

    /// A session: hooks registered through it are unregistered when it is dropped.
    pub fn hook_session(&self) -> HookSession {
        HookSession {
            host: self.clone(),
            ids: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Every hook point with its subscribers in execution order.
    pub fn hook_points(&self) -> Vec<HookPointInfo> {
        let registry = self.inner.registry.load();
        HookPoint::ALL
            .into_iter()
            .map(|point| HookPointInfo {
                name: point.name(),
                description: point.description(),
                writable: point.writable(),
                subscribers: registry.hooks.points[point.index()]
                    .iter()
                    .map(|s| SubscriberInfo {
                        name: s.name.to_string(),
                        kind: match s.target {
                            Target::Plugin { .. } => "plugin",
                            Target::Host(_) => "host",
                        },
                        priority: s.priority,
                        mode: s.mode,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Fire-and-forget events dropped because the queue was full, since the host started.
    pub fn dropped_hook_events(&self) -> u64 {
        self.inner.fire_queue.dropped.load(Ordering::Relaxed)
    }

    /// Stores a new registry built from `plugins` (with its hook table). Called with the admin
    /// lock held.
    pub(super) fn publish(&self, plugins: Plugins) {
        let hooks = {
            let host_hooks = self
                .inner
                .host_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            HookTable::build(&plugins, &host_hooks, self)
        };
        // The name filter may only answer "missing" for a name absent from the registry a
        // caller could see: widen it before the new registry is visible, narrow it after.
        let bits = super::name_bits(&plugins);
        self.inner.names.fetch_or(bits, Ordering::AcqRel);
        self.inner
            .registry
            .store(Arc::new(super::Registry { plugins, hooks }));
        self.inner.names.store(bits, Ordering::Release);
    }

    /// Rebuilds the hook table over the current plugins (hooks or configuration changed).
    pub(super) fn republish(&self) {
        let plugins = self.inner.registry.load().plugins.clone();
        self.publish(plugins);
    }

    /// The function a plugin's `call_plugin` reaches: the same no-op safety as `execute`, plus
    /// cycle detection. `caller` is the plugin making the call.
    pub(super) fn plugin_call_back(inner: Weak<Inner>, caller: String) -> crate::dylib::CallBack {
        Box::new(move |plugin, method, params| {
            let inner = inner
                .upgrade()
                .ok_or_else(|| (ErrorKind::Failed, "the host is shutting down".to_owned()))?;
            let host = PluginHost { inner };
            host.call_from_plugin(&caller, plugin, method, params)
        })
    }

    fn call_from_plugin(
        &self,
        caller: &str,
        plugin: &str,
        method: &str,
        params: &str,
    ) -> Result<Option<String>, (ErrorKind, String)> {
        let cycle = CALL_CHAIN.with(|chain| {
            let chain = chain.borrow();
            if chain.iter().any(|p| p == plugin) || caller == plugin {
                let mut path: Vec<&str> = chain.iter().map(String::as_str).collect();
                path.push(caller);
                path.push(plugin);
                Some(format!("call cycle cut: {}", path.join(" -> ")))
            } else if chain.len() >= MAX_CALL_DEPTH {
                Some(format!("plugin calls nested deeper than {MAX_CALL_DEPTH}"))
            } else {
                None
            }
        });
        if let Some(message) = cycle {
            tracing::warn!(caller, plugin = %EscapeControl(plugin), method = %EscapeControl(method), "{}", EscapeControl(&message));
            return Err((ErrorKind::Failed, message));
        }
        CALL_CHAIN.with(|chain| chain.borrow_mut().push(caller.to_owned()));
        let result = self.dispatch_text(plugin, method, params, |answer| {
            Ok(answer.map(str::to_owned))
        });
        CALL_CHAIN.with(|chain| chain.borrow_mut().pop());
        result.map_err(|failure| match failure {
            Failure::PluginNotFound => {
                (ErrorKind::Failed, format!("no plugin `{plugin}` is loaded"))
            }
            Failure::MethodNotFound => (
                ErrorKind::UnknownMethod,
                format!("plugin `{plugin}` has no method `{method}`"),
            ),
            Failure::InvalidJson(e) => (
                ErrorKind::Failed,
                format!("{plugin}.{method} answered invalid JSON: {e}"),
            ),
            Failure::WrongType(e, expected) => (
                ErrorKind::Failed,
                format!(
                    "{plugin}.{method} answered an unexpected value: {e} (expected {expected})"
                ),
            ),
            Failure::Plugin(ErrorKind::Panicked, message) => (
                ErrorKind::Failed,
                format!("{plugin}.{method} panicked: {message}"),
            ),
            Failure::Plugin(kind, message) => (kind, format!("{plugin}.{method}: {message}")),
        })
    }
}
