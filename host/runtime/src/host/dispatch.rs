//! Hook dispatch: the subscribers of each point in execution order, the payload made as each
//! subscriber needs it, and the phases of a dispatch (sequential, concurrent, audit,
//! fire-and-forget).

use super::*;

/// Who runs when a subscriber's turn comes.
#[derive(Clone)]
pub(super) enum Target {
    Plugin {
        generation: Arc<Generation>,
        stats: Arc<StatsCell>,
        /// This plugin's latency histogram of this hook point.
        latency: Arc<Latency>,
        /// The hook point's name in the in-flight marker's form, made once.
        marker: crate::health::MarkerName,
    },
    Host(HostHookFn),
}

/// One subscriber of one hook point, with the priority and mode in force.
#[derive(Clone)]
pub(super) struct Subscriber {
    pub(super) name: Arc<str>,
    pub(super) priority: i32,
    pub(super) mode: HookMode,
    /// The subscription's own deadline (`timeoutMs` in its hook override); 0 = the plugin's.
    pub(super) timeout_ms: u64,
    pub(super) target: Target,
}

/// A hook point being dispatched: its handle and its declaration.
#[derive(Clone, Copy)]
pub(crate) struct At {
    pub(crate) point: HookPoint,
    pub(crate) spec: &'static HookSpec,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.spec.name)
    }
}

/// The subscribers of one hook point, in execution order.
#[derive(Clone)]
pub(super) struct PointTable {
    pub(super) spec: &'static HookSpec,
    pub(super) subscribers: Arc<[Subscriber]>,
    /// Where each mode's subscribers start in `subscribers` (sequential, concurrent, audit,
    /// fire-and-forget), then the end.
    pub(super) phases: [usize; 5],
}

/// The subscribers of every hook point of the host, indexed by [`HookPoint`].
#[derive(Clone, Default)]
pub(super) struct HookTable {
    pub(super) points: Box<[PointTable]>,
}

impl std::fmt::Debug for HookTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts: Vec<(&str, usize)> = self
            .points
            .iter()
            .map(|p| (p.spec.name, p.subscribers.len()))
            .collect();
        f.debug_struct("HookTable")
            .field("subscribers", &counts)
            .finish()
    }
}

impl HookTable {
    pub(super) fn build(
        plugins: &Plugins,
        host_hooks: &BTreeMap<u64, HostHook>,
        host: &PluginHost,
    ) -> Self {
        let specs = &host.inner.points;
        let config: Arc<PluginsConfig> = host.inner.config.load_full();
        let mut points: Vec<Vec<Subscriber>> = vec![Vec::new(); specs.len()];
        for (name, slot) in plugins {
            let settings = host.settings_in(&config, name);
            for subscription in &slot.generation.manifest.hooks {
                let Some(point) = host.hook_point(&subscription.hook) else {
                    continue;
                };
                let declared = (subscription.priority, subscription.mode);
                let Some((priority, mode)) =
                    config.hook_settings(&settings, name, &subscription.hook, declared)
                else {
                    continue;
                };
                let timeout_ms = settings
                    .hooks
                    .get(&subscription.hook)
                    .and_then(|o| o.timeout_ms)
                    .unwrap_or(0);
                points[point.index()].push(Subscriber {
                    name: Arc::from(&**name),
                    priority,
                    mode,
                    timeout_ms,
                    target: Target::Plugin {
                        generation: Arc::clone(&slot.generation),
                        latency: slot.stats.latency(CallKind::Hook, &subscription.hook),
                        stats: Arc::clone(&slot.stats),
                        marker: crate::health::MarkerName::new(&subscription.hook),
                    },
                });
            }
        }
        for hook in host_hooks.values() {
            // A handle this host does not have was refused at registration.
            if let Some(subscribers) = points.get_mut(hook.point.index()) {
                subscribers.push(Subscriber {
                    name: Arc::clone(&hook.name),
                    priority: hook.priority,
                    mode: hook.mode,
                    timeout_ms: 0,
                    target: Target::Host(Arc::clone(&hook.f)),
                });
            }
        }
        let points = points
            .into_iter()
            .zip(specs.iter())
            .map(|(mut subscribers, spec)| {
                subscribers.sort_by(|a, b| {
                    (phase(a.mode), a.priority, &a.name).cmp(&(phase(b.mode), b.priority, &b.name))
                });
                let mut phases = [0; 5];
                for (phase_index, bound) in phases.iter_mut().enumerate() {
                    *bound =
                        subscribers.partition_point(|s| usize::from(phase(s.mode)) < phase_index);
                }
                PointTable {
                    spec,
                    subscribers: subscribers.into(),
                    phases,
                }
            })
            .collect();
        HookTable { points }
    }
}

impl Subscriber {
    pub(super) fn is_plugin(&self) -> bool {
        matches!(self.target, Target::Plugin { .. })
    }
}

/// The room made for a typed payload's JSON text before writing it.
const PAYLOAD_TEXT_CAPACITY: usize = 512;

/// A payload given as a typed value, written out only as far as the subscribers need it.
pub(super) trait Source {
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
        // Pre-sized: `to_string` starts at 128 bytes and grows twice on a typical payload
        // (reallocations were ~1,200 of the ~6,300 instructions of writing the pipeline's
        // `task.scored` event). Written as a `String`, the text needs no UTF-8 check.
        let mut text = String::with_capacity(PAYLOAD_TEXT_CAPACITY);
        match crate::write_json::write(&mut text, self) {
            Ok(()) => text,
            Err(e) => {
                tracing::warn!(error = %e, "a hook payload cannot be written as JSON; subscribers get null");
                "null".to_owned()
            }
        }
    }
}

/// A dispatch's payload: the value (for host hooks and modifications) and the JSON text (for
/// plugins), each made the first time a subscriber needs it, from the value once there is one,
/// else from the typed source.
pub(super) struct Payload<'s> {
    pub(super) value: Option<Value>,
    pub(super) text: Option<String>,
    pub(super) source: Option<&'s dyn Source>,
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
    #[inline]
    fn text(&mut self) -> (&str, bool) {
        let made = self.text.is_none();
        let (source, value) = (self.source, &self.value);
        let text = self.text.get_or_insert_with(|| match (value, source) {
            // Written by the serializer straight into bytes (the `Display` form goes through
            // the formatter and grows a `String` piece by piece); the text is the same.
            (Some(value), _) => {
                let mut text = String::with_capacity(PAYLOAD_TEXT_CAPACITY);
                match crate::write_json::write(&mut text, value) {
                    Ok(()) => text,
                    Err(_) => "null".to_owned(),
                }
            }
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
    fn modify(&mut self, point: At, subscriber: &str, fields: Map<String, Value>) {
        if apply_patch(point, subscriber, self.value(), fields) {
            self.text = None;
            self.source = None;
        }
    }
}

/// Times subscribers run one after another (those their histograms pick, one in the host's
/// sample). Reading the clock costs about as much as a small subscriber, so when nothing
/// happens between two timed subscribers, the reading that ends one call starts the next.
pub(super) struct Timer<'c> {
    pub(super) timing: Option<&'c crate::stats::Timing>,
    /// The reading that ended the previous call, when it was timed and nothing has happened
    /// since; else 0.
    pub(super) last: u64,
}

impl<'c> Timer<'c> {
    pub(super) fn new(timing: Option<&'c crate::stats::Timing>) -> Self {
        Timer { timing, last: 0 }
    }

    /// Counts a call in `latency` and, when it picks the call to be timed, a reading to start
    /// it with.
    #[inline]
    fn start(&mut self, latency: &Latency, shard: usize) -> Option<u64> {
        let timing = self.timing?;
        if !latency.count_at(shard, timing.sample) {
            // Nothing reads the clock at this call's end.
            self.last = 0;
            return None;
        }
        Some(match self.last {
            0 => timing.start(),
            last => last,
        })
    }

    /// Nanoseconds since `started` (at least 1); the reading may start the next call.
    #[inline]
    fn stop(&mut self, timing: &crate::stats::Timing, started: u64) -> u64 {
        let (now, nanos) = timing.stop(started);
        self.last = now;
        nanos
    }

    /// Something ran since the last call ended: the next call reads the clock afresh.
    fn interrupt(&mut self) {
        self.last = 0;
    }
}

/// Runs one subscriber on the payload as a value (host hooks) or as text (plugins), whichever
/// its kind takes; the caller made that one. `None` when it failed (logged, and counted for
/// plugins).
pub(super) fn run_subscriber(
    subscriber: &Subscriber,
    point: At,
    value: Option<&Value>,
    text: Option<&str>,
    timer: &mut Timer<'_>,
) -> Option<HookResult> {
    match &subscriber.target {
        Target::Plugin { .. } => {
            let shard = crate::stats::thread_shard();
            let answer = deliver(subscriber, point, text.unwrap_or("null"), shard, timer);
            Some(answer.map_or(HookResult::Continue, |answer| *answer))
        }
        Target::Host(f) => {
            timer.interrupt();
            run_host_hook(f, subscriber, point, value)
        }
    }
}

/// What a plugin subscriber answered, small to move between the layers: `None` for "continue"
/// (and for a delivery that failed or was refused, logged and counted), a modification or a
/// block boxed (the rare answers).
type Answered = Option<Box<HookResult>>;

/// Delivers the payload's text to a plugin subscriber from the thread of statistics shard
/// `shard`; a host hook answers "continue" here (its callers pass plugin subscribers).
#[inline]
fn deliver(
    subscriber: &Subscriber,
    point: At,
    text: &str,
    shard: usize,
    timer: &mut Timer<'_>,
) -> Answered {
    let Target::Plugin {
        generation,
        stats,
        latency,
        marker,
    } = &subscriber.target
    else {
        return None;
    };
    let admitted = if subscriber.timeout_ms == 0 {
        stats.health.begin_named(marker, shard)
    } else {
        stats
            .health
            .begin_within(marker, shard, subscriber.timeout_ms)
    };
    let Ok(entry) = admitted else {
        tracing::debug!(plugin = %subscriber.name, hook = %point, "circuit open; subscriber skipped");
        return None;
    };
    let started = timer.start(latency, shard);
    // "Continue", by far the most common answer, is read inline (the closure stays small
    // enough to inline); every other answer out of line.
    let library = &generation.library;
    let result = library.on_hook(
        point.spec.name,
        text,
        subscriber.timeout_ms,
        |answer| match answer {
            Ok(None) => Ok(None),
            other => read_answer(other),
        },
    );
    let timed = match (timer.timing, started) {
        (Some(timing), Some(started)) => {
            let nanos = timer.stop(timing, started);
            latency.record_at(shard, nanos);
            Some(nanos)
        }
        (Some(_), None) => {
            // Not timed: a delivery that saw the watchdog's clock move twice still reaches
            // the maximum.
            let at_least = entry.untimed_lower_bound_nanos();
            if at_least != 0 {
                stats.at_least_at(shard, at_least);
            }
            None
        }
        (None, _) => None,
    };
    stats
        .health
        .end(entry, matches!(result, Some(Err(_))), &subscriber.name);
    match result {
        None => None,
        Some(Ok(answer)) => {
            stats.record_at(shard, timed, Outcome::Ok);
            answer
        }
        Some(Err(error)) => {
            subscriber_failed(subscriber, point, stats, shard, timed, &error);
            timer.interrupt();
            None
        }
    }
}

/// A plugin's hook answer other than "continue" as text: a modification or a block (boxed),
/// or why it failed.
#[inline(never)]
fn read_answer(
    answer: Result<Option<&str>, PluginFailure<'_>>,
) -> Result<Answered, Box<PluginError>> {
    match answer {
        Ok(json) => match parse_answer(json) {
            Ok(HookResult::Continue) => Ok(None),
            Ok(answer) => Ok(Some(Box::new(answer))),
            Err(message) => Err(Box::new(PluginError::failed(message))),
        },
        Err(PluginFailure::Reported(kind, message)) => Err(Box::new(PluginError {
            kind,
            message: message.to_owned(),
        })),
        Err(PluginFailure::NotUtf8(e)) => Err(Box::new(PluginError::failed(format!(
            "the hook answer is not UTF-8 text ({e})"
        )))),
        Err(PluginFailure::Lost(lost)) => Err(Box::new(PluginError::failed(format!(
            "its process {lost} (reason: {lost})"
        )))),
    }
}

/// A plugin subscriber failed or panicked: counted and logged; the chain goes on.
#[cold]
fn subscriber_failed(
    subscriber: &Subscriber,
    point: At,
    stats: &StatsCell,
    shard: usize,
    timed: Option<u64>,
    error: &PluginError,
) {
    let panicked = error.kind == ErrorKind::Panicked;
    stats.record_at(
        shard,
        timed,
        if panicked {
            Outcome::Panic
        } else {
            Outcome::Error
        },
    );
    tracing::warn!(
        plugin = %subscriber.name,
        hook = %point,
        error = %EscapeControl(&error.message),
        "hook subscriber {}; skipped, the chain goes on",
        if panicked { "panicked" } else { "failed" }
    );
}

/// Runs a hook written in Rust: kept out of line, so that a plugin subscriber's path has a
/// small frame.
#[inline(never)]
fn run_host_hook(
    f: &HostHookFn,
    subscriber: &Subscriber,
    point: At,
    value: Option<&Value>,
) -> Option<HookResult> {
    let payload = value.unwrap_or(&Value::Null);
    match catch_unwind(AssertUnwindSafe(|| {
        f(&HookEvent {
            point: point.point,
            name: point.spec.name,
            payload,
        })
    })) {
        Ok(answer) => Some(answer),
        Err(_) => {
            tracing::warn!(subscriber = %subscriber.name, hook = %point, "host hook panicked; skipped, the chain goes on");
            None
        }
    }
}

/// Runs a subscriber on this thread, making the form of the payload it takes first.
#[inline]
pub(super) fn run_in_turn(
    subscriber: &Subscriber,
    point: At,
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
    point: At,
    subscriber: &str,
    payload: &mut Value,
    fields: Map<String, Value>,
) -> bool {
    let writable = point.spec.writable;
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
        let Some(table) = registry.hooks.points.get(point.index()) else {
            return Ok(None);
        };
        if table.subscribers.is_empty() {
            return Ok(None);
        }
        let at = At {
            point,
            spec: table.spec,
        };
        let mut payload = Payload {
            value: Some(payload()),
            text: None,
            source: None,
        };
        self.dispatch_hook(table, at, &mut payload, true)?;
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
        let Some(table) = registry.hooks.points.get(point.index()) else {
            return Ok(());
        };
        if table.subscribers.is_empty() {
            return Ok(());
        }
        let at = At {
            point,
            spec: table.spec,
        };
        let source = payload();
        let mut payload = Payload {
            value: None,
            text: None,
            source: Some(&source),
        };
        self.dispatch_hook(table, at, &mut payload, false)
    }

    /// The phases of a dispatch; `take_changes` says whether sequential subscribers may modify.
    pub(super) fn dispatch_hook(
        &self,
        table: &PointTable,
        point: At,
        payload: &mut Payload<'_>,
        take_changes: bool,
    ) -> Result<(), Violation> {
        let subscribers = &table.subscribers;
        let clock = self.inner.timing.as_ref();
        // The table is sorted by mode first, so each mode's subscribers are one slice.
        let [seq, conc, aud, det, end] = table.phases;
        let (sequential, concurrent, audit, detached) = (
            &subscribers[seq..conc],
            &subscribers[conc..aud],
            &subscribers[aud..det],
            &subscribers[det..end],
        );

        let mut timer = Timer::new(clock);
        let mut next = 0;
        while let Some(subscriber) = sequential.get(next) {
            let (subscriber, answer) = if subscriber.is_plugin() {
                // The plugin subscribers in a row from here get the one payload text, with
                // the thread's shard read once; only a modification or a block comes back.
                let (text, made) = payload.text();
                if made {
                    timer.interrupt();
                }
                let shard = crate::stats::thread_shard();
                let mut answered = None;
                while let Some(subscriber) = sequential.get(next).filter(|s| s.is_plugin()) {
                    next += 1;
                    if let Some(answer) = deliver(subscriber, point, text, shard, &mut timer) {
                        answered = Some((subscriber, *answer));
                        break;
                    }
                }
                match answered {
                    Some(answered) => answered,
                    None => continue,
                }
            } else {
                next += 1;
                match run_in_turn(subscriber, point, payload, &mut timer) {
                    None | Some(HookResult::Continue) => continue,
                    Some(answer) => (subscriber, answer),
                }
            };
            match answer {
                HookResult::Continue => {}
                HookResult::Modify(fields) => {
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
                HookResult::Block { reason, code } => {
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
                self.run_concurrently(concurrent, point, value, text, clock)
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

    /// Runs concurrent subscribers, the first on this thread and the others on threads of
    /// their own, and waits for the others at most the longest of their deadlines: a
    /// subscriber still running then is abandoned (logged; its answer is ignored if it ever
    /// comes), so a stuck subscriber never holds up the dispatch for good.
    fn run_concurrently(
        &self,
        concurrent: &[Subscriber],
        point: At,
        value: Option<&Value>,
        text: Option<&str>,
        clock: Option<&crate::stats::Timing>,
    ) -> Vec<Option<HookResult>> {
        let started = Instant::now();
        let shared_value: Option<Arc<Value>> = value.cloned().map(Arc::new);
        let shared_text: Option<Arc<str>> = text.map(Arc::from);
        let (sender, answered) = std::sync::mpsc::channel::<(usize, Option<HookResult>)>();
        let mut waiting = vec![false; concurrent.len()];
        let mut bound_ms = 0;
        for (index, subscriber) in concurrent.iter().enumerate().skip(1) {
            let (subscriber, value, text) = (
                subscriber.clone(),
                shared_value.clone(),
                shared_text.clone(),
            );
            let (clock, sender) = (clock.cloned(), sender.clone());
            bound_ms = bound_ms.max(self.deadline_ms(&subscriber));
            let spawned = std::thread::Builder::new()
                .name("hook-concurrent".into())
                .spawn(move || {
                    let answer = run_subscriber(
                        &subscriber,
                        point,
                        value.as_deref(),
                        text.as_deref(),
                        &mut Timer::new(clock.as_ref()),
                    );
                    let _ = sender.send((index, answer));
                });
            match spawned {
                Ok(_) => waiting[index] = true,
                Err(e) => tracing::warn!(
                    subscriber = %concurrent[index].name,
                    hook = %point,
                    error = %e,
                    "no thread for a concurrent subscriber; skipped"
                ),
            }
        }
        drop(sender);
        let mut answers: Vec<Option<HookResult>> = std::iter::repeat_with(|| None)
            .take(concurrent.len())
            .collect();
        answers[0] = run_subscriber(&concurrent[0], point, value, text, &mut Timer::new(clock));
        let deadline = started + std::time::Duration::from_millis(bound_ms);
        while waiting.iter().any(|w| *w) {
            let left = deadline.saturating_duration_since(Instant::now());
            match answered.recv_timeout(left) {
                Ok((index, answer)) => {
                    answers[index] = answer;
                    waiting[index] = false;
                }
                Err(_) => break,
            }
        }
        for (subscriber, _) in concurrent.iter().zip(&waiting).filter(|(_, w)| **w) {
            tracing::warn!(
                subscriber = %subscriber.name,
                hook = %point,
                waited_ms = started.elapsed().as_millis(),
                "concurrent hook subscriber did not answer within its deadline; abandoned, the dispatch goes on without its answer"
            );
        }
        answers
    }

    /// The deadline of one delivery to `subscriber`, in milliseconds.
    fn deadline_ms(&self, subscriber: &Subscriber) -> u64 {
        match &subscriber.target {
            _ if subscriber.timeout_ms != 0 => subscriber.timeout_ms,
            Target::Plugin { stats, .. } => stats.health.timeout_ms(),
            Target::Host(_) => self.inner.call_timeout_ms,
        }
    }

    /// Whether anyone subscribes to `point`.
    pub fn has_subscribers(&self, point: HookPoint) -> bool {
        self.inner
            .registry
            .load()
            .hooks
            .points
            .get(point.index())
            .is_some_and(|table| !table.subscribers.is_empty())
    }

    pub(super) fn blocked(
        &self,
        point: At,
        subscriber: &Subscriber,
        reason: String,
        code: String,
    ) -> Violation {
        let violation = Violation {
            hook: point.spec.name.to_owned(),
            subscriber: subscriber.name.to_string(),
            reason,
            code,
        };
        tracing::info!(hook = %point, subscriber = %EscapeControl(&violation.subscriber), code = %EscapeControl(&violation.code), reason = %EscapeControl(&violation.reason), "hook blocked");
        violation
    }

    /// Every hook point with its subscribers in execution order: the embedder's points in the
    /// order it declared them, then the runtime's own.
    pub fn hook_points(&self) -> Vec<HookPointInfo> {
        let registry = self.inner.registry.load();
        let builtin = HookPoint::BUILT_IN.len();
        let specs = &self.inner.points;
        let order = (builtin..specs.len()).chain(0..builtin.min(specs.len()));
        order
            .map(|index| {
                let spec = specs[index];
                let subscribers = registry
                    .hooks
                    .points
                    .get(index)
                    .map_or(&[][..], |table| &table.subscribers[..]);
                HookPointInfo {
                    name: spec.name,
                    description: spec.description,
                    payload: spec.payload,
                    writable: spec.writable,
                    subscribers: subscribers
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
                }
            })
            .collect()
    }

    /// The handle of the hook point named `name`, if this host has one.
    pub fn hook_point(&self, name: &str) -> Option<HookPoint> {
        self.inner
            .points
            .iter()
            .position(|spec| spec.name == name)
            .map(HookPoint::from_index)
    }

    /// The declaration of a hook point of this host.
    pub fn hook_spec(&self, point: HookPoint) -> Option<&'static HookSpec> {
        self.inner.points.get(point.index()).copied()
    }
}
