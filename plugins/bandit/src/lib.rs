//! `bandit`: a multi-armed bandit per context that shifts traffic toward the handler that
//! scores best.
//!
//! The pattern it serves: `handler = execute("bandit", "choose", {...}) or "recent"`. A context
//! is a task type; the arms are the handlers that can serve it.
//!
//! # Configuration
//!
//! ```json
//! { "contexts": ["chat"], "algorithm": "ucb1", "exploration": 2.0, "seed": 7 }
//! ```
//!
//! All fields are optional (a `null` configuration takes every default).
//!
//! - `contexts`: the contexts the bandit handles; for others `choose` answers `null` and the
//!   caller keeps its default. Absent: every context is handled.
//! - `algorithm`: `"ucb1"` (default) or `"thompson"`.
//! - `exploration`: the UCB1 constant `c` in `mean + sqrt(c * ln N / n)` (a number >= 0;
//!   default 2.0).
//! - `seed`: seeds the Thompson sampler, for reproducible runs.
//!
//! # Methods
//!
//! - `choose {"context", "arms", "key"?}` → the chosen arm, or `null` when the context is not
//!   handled or `arms` is empty. UCB1 tries the unpulled arms first (a random one of them), then
//!   takes the highest upper confidence bound, ties broken at random. Thompson sampling uses the
//!   Bernoulli trick: each reward `r` in 0..=1 is turned into a success with probability `r`
//!   when it is recorded, so `Beta(1 + successes, 1 + pulls − successes)` is the exact
//!   posterior of the arm's success rate, whose mean is the arm's mean reward; `choose` draws
//!   from each arm's posterior and takes the highest draw. Choosing is not a pull; only updates
//!   count. `key` (the task id) lets the hooks tie the task's outcome to this choice.
//! - `update {"context", "arm", "reward"}` → nothing; `reward` must be a number in 0..=1. Updates
//!   for a context that is not handled are ignored.
//! - `stats {"context"?}` → per context: `{"arms": {arm: {"pulls", "meanReward", "ciLow",
//!   "ciHigh", "successes"}}, "best"}`, where `best` is the arm with the highest mean reward so
//!   far (`null` without data) and `[ciLow, ciHigh]` the 95 % Student-t interval of the mean.
//!
//! # Hooks
//!
//! The bandit learns only from tasks it chose the handler for:
//! - `task.scored` (audit, priority 50): the `score` updates the arm like `update` when the task
//!   is one the bandit chose, by its `id` (when `choose` had a `key`) and its `handler`; without a
//!   key, a scored task of that context and handler counts while choices of that arm await their
//!   outcome (one per choice).
//! - `task.error` (audit, priority 50): a task the bandit chose counts as a reward of 0 for its
//!   arm, unless its error says it was `blocked` by a hook. Without a key, the payload's
//!   `chooser` (`bandit`) and `handler` tie it to an arm.
//!
//! A payload whose `chooser` names someone else (the champion, or a subscriber that changed the
//! handler) is never counted, even for an arm the bandit also chose.
//!
//! # A fleet
//!
//! When the host offers a store (`plugin_api::store`), the arms' statistics are the fleet's:
//! `arm/<context>/<arm>` holds `n`, `sum`, `sumsq` and `succ` (the Bernoulli successes), a task
//! counted once fleet-wide by its id, and `choose` and `stats` read them, so the fleet explores
//! once. Without a store each worker learns alone, as above.
//!
//! Pulls, reward sums and sums of squares and successes survive hot reloads (`save_state` /
//! `restore_state`). A state saved by an older version (no sum of squares, no successes) loads
//! with the successes taken as the rounded reward sum and without intervals.

#![forbid(unsafe_code)]

use plugin_api::assign::{Random, open_unit};
use plugin_api::stats::Moments;
use plugin_api::store::Key;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, Value, export_plugin,
};
use serde::{Deserialize, Serialize};

/// How the bandit picks an arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Upper confidence bound (the default).
    #[default]
    Ucb1,
    /// Thompson sampling.
    Thompson,
}

/// The plugin's configuration (see the crate docs). A field that is absent or `null` takes
/// its default.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The contexts handled; all when absent.
    pub contexts: Option<Vec<String>>,
    /// How arms are picked.
    pub algorithm: Option<Algorithm>,
    /// The UCB1 constant (default 2.0).
    pub exploration: Option<f64>,
    /// Seeds the Thompson sampler.
    pub seed: Option<u64>,
}

impl Config {
    /// What the types alone do not check.
    fn check(&self) -> Result<(), PluginError> {
        if let Some(contexts) = &self.contexts {
            if contexts.is_empty() {
                return Err(PluginError::new(
                    "contexts: must list at least one context (omit it to handle all)",
                ));
            }
            if contexts.iter().any(String::is_empty) {
                return Err(PluginError::new("contexts: must not contain an empty name"));
            }
        }
        if let Some(exploration) = self.exploration
            && (!exploration.is_finite() || exploration < 0.0)
        {
            return Err(PluginError::new(format!(
                "exploration: must be a number >= 0, found {exploration}"
            )));
        }
        Ok(())
    }
}

/// What the bandit knows about one arm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArmStats {
    /// Updates recorded for it.
    pub pulls: u64,
    /// Sum of their rewards (each in 0..=1).
    pub reward_sum: f64,
    /// Sum of their squares (absent in states of older versions).
    #[serde(default)]
    pub reward_sum_sq: Option<f64>,
    /// Bernoulli successes drawn from the rewards (absent in states of older versions).
    #[serde(default)]
    pub successes: Option<u64>,
}

impl ArmStats {
    fn mean(&self) -> Option<f64> {
        (self.pulls > 0).then(|| self.reward_sum / self.pulls as f64)
    }

    fn moments(&self) -> Option<Moments> {
        Some(Moments {
            count: self.pulls,
            sum: self.reward_sum,
            sum_sq: self.reward_sum_sq?,
        })
    }

    fn successes(&self) -> u64 {
        self.successes
            .unwrap_or_else(|| self.reward_sum.round() as u64)
            .min(self.pulls)
    }
}

/// Tasks chosen and not yet back: by id (from `choose`'s key), and per context and arm for
/// choices without a key.
#[derive(Debug, Default)]
struct Pending {
    by_id: HashMap<String, (String, String)>,
    order: VecDeque<String>,
    keyless: HashMap<(String, String), u64>,
}

/// Tasks in flight the bandit remembers by id.
const MAX_PENDING: usize = 100_000;

impl Pending {
    fn insert(&mut self, id: String, context: String, arm: String) {
        if self.by_id.insert(id.clone(), (context, arm)).is_none() {
            self.order.push_back(id);
        }
        while self.by_id.len() > MAX_PENDING {
            match self.order.pop_front() {
                Some(old) => {
                    self.by_id.remove(&old);
                }
                None => break,
            }
        }
        if self.order.len() > 2 * MAX_PENDING {
            let by_id = &self.by_id;
            self.order.retain(|id| by_id.contains_key(id));
        }
    }
}

/// Context → arm → stats: the state carried over a reload.
pub type Stats = BTreeMap<String, BTreeMap<String, ArmStats>>;

/// The plugin instance.
#[derive(Debug)]
pub struct BanditPlugin {
    contexts: Option<Vec<String>>,
    algorithm: Algorithm,
    exploration: f64,
    stats: Mutex<Stats>,
    pending: Mutex<Pending>,
    rng: Random,
    /// Whether the host offers a store: the arms' statistics are then the fleet's.
    shared: bool,
    /// The arms seen per context, with the store key of each (with a store, `stats` reads
    /// these from it; the keys are made once, not for every read and addition).
    seen: Mutex<Seen>,
}

/// Context → arm → the store key of its statistics.
type Seen = BTreeMap<String, BTreeMap<String, Key>>;

/// The store key of an arm's statistics.
fn arm_key(context: &str, arm: &str) -> Key {
    Key::joined(&["arm", context, arm])
}

/// Notes `arms` as seen in `context`, each with its key (names copied only when new), and
/// answers the context's arms (so that a caller looks the context up once).
fn note_arms<'s, 'a>(
    seen: &'s mut Seen,
    context: &str,
    arms: impl IntoIterator<Item = &'a str>,
) -> Option<&'s BTreeMap<String, Key>> {
    if !seen.contains_key(context) {
        seen.insert(context.to_owned(), BTreeMap::new());
    }
    let known = seen.get_mut(context)?;
    for arm in arms {
        if !known.contains_key(arm) {
            known.insert(arm.to_owned(), arm_key(context, arm));
        }
    }
    Some(known)
}

/// An arm's statistics as the fleet knows them.
fn fleet_arm(key: &Key) -> ArmStats {
    let [n, sum, sumsq, succ] =
        plugin_api::store::read_values(key, ["n", "sum", "sumsq", "succ"]).unwrap_or_default();
    let whole = |v: f64| v.max(0.0).round() as u64;
    ArmStats {
        pulls: whole(n),
        reward_sum: sum,
        reward_sum_sq: Some(sumsq),
        successes: Some(whole(succ)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ChooseParams {
    context: String,
    arms: Vec<String>,
    #[serde(default)]
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UpdateParams {
    context: String,
    arm: String,
    reward: f64,
    /// The task's id: with a store, a task counts once fleet-wide.
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StatsParams {
    context: Option<String>,
}

/// The fields of a `task.scored` payload the bandit reads. Any of them may be missing, null or
/// of another type; such a payload is skipped.
#[derive(Debug, Default, PartialEq, Deserialize)]
struct ScoredTask {
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    id: Option<String>,
    #[serde(
        rename = "type",
        default,
        deserialize_with = "plugin_api::lenient::text"
    )]
    task_type: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    handler: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    chooser: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::number")]
    score: Option<f64>,
}

/// The fields of a `task.error` payload the bandit reads.
#[derive(Debug, Default, PartialEq, Deserialize)]
struct FailedTask {
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    id: Option<String>,
    #[serde(
        rename = "type",
        default,
        deserialize_with = "plugin_api::lenient::text"
    )]
    task_type: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    handler: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    chooser: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    error: Option<String>,
}

/// What a payload's `chooser` says about the bandit: `Some(true)` when the bandit chose the
/// handler, `Some(false)` when someone else did, `None` when the payload does not say.
fn chosen_by_bandit(chooser: Option<&str>) -> Option<bool> {
    chooser.map(|c| c == "bandit")
}

impl BanditPlugin {
    fn pending_lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One of `candidates` at random.
    fn pick_random<'a>(&self, candidates: &[&'a String]) -> Option<&'a String> {
        let i = (self.rng.next_unit() * candidates.len() as f64) as usize;
        candidates
            .get(i.min(candidates.len().saturating_sub(1)))
            .copied()
    }

    fn handles(&self, context: &str) -> bool {
        self.contexts
            .as_ref()
            .is_none_or(|c| c.iter().any(|known| known == context))
    }

    fn stats_lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_unit(&self) -> f64 {
        open_unit(self.rng.next_u64())
    }

    /// A standard normal draw (Box–Muller).
    fn normal(&self) -> f64 {
        let (u1, u2) = (self.next_unit(), self.next_unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A `Gamma(shape, 1)` draw (Marsaglia–Tsang; shapes below 1 are boosted).
    fn gamma(&self, shape: f64) -> f64 {
        if shape < 1.0 {
            let boosted = self.gamma(shape + 1.0);
            return boosted * self.next_unit().powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.next_unit();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// A `Beta(a, b)` draw from two gamma draws.
    fn beta(&self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        if x + y > 0.0 { x / (x + y) } else { 0.5 }
    }

    fn choose(&self, p: ChooseParams) -> Result<Option<String>, PluginError> {
        if p.arms.is_empty() || !self.handles(&p.context) {
            return Ok(None);
        }
        // With a store the arms' statistics are the fleet's, read by their keys (the local
        // ones are not needed). The keys (handles: a count each) are taken out of `seen` and
        // its lock let go before they are read: a read of a key not cached yet waits for the
        // store, and every choice and every update takes that lock.
        let keys: Vec<Option<Key>> = if self.shared {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let known = note_arms(&mut seen, &p.context, p.arms.iter().map(String::as_str));
            p.arms
                .iter()
                .map(|arm| known.and_then(|k| k.get(arm)).cloned())
                .collect()
        } else {
            Vec::new()
        };
        let stats = (!self.shared).then(|| self.stats_lock());
        let known = stats.as_deref().and_then(|s| s.get(&p.context));
        // The statistics of `arm`, the `i`th of `p.arms`.
        let arm_stats = |i: usize, arm: &str| {
            if self.shared {
                keys.get(i)
                    .and_then(Option::as_ref)
                    .map(fleet_arm)
                    .unwrap_or_default()
            } else {
                known.and_then(|k| k.get(arm)).cloned().unwrap_or_default()
            }
        };
        let chosen = match self.algorithm {
            Algorithm::Ucb1 => {
                let arms: Vec<(&String, ArmStats)> = p
                    .arms
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (a, arm_stats(i, a)))
                    .collect();
                let unpulled: Vec<&String> = arms
                    .iter()
                    .filter(|(_, s)| s.pulls == 0)
                    .map(|(a, _)| *a)
                    .collect();
                if !unpulled.is_empty() {
                    self.pick_random(&unpulled).cloned().unwrap_or_default()
                } else {
                    let total: u64 = arms.iter().map(|(_, s)| s.pulls).sum();
                    let ln_total = (total as f64).ln();
                    let bounds: Vec<(&String, f64)> = arms
                        .iter()
                        .map(|(arm, s)| {
                            let n = s.pulls as f64;
                            (
                                *arm,
                                s.reward_sum / n + (self.exploration * ln_total / n).sqrt(),
                            )
                        })
                        .collect();
                    let top = bounds.iter().map(|(_, b)| *b).fold(f64::MIN, f64::max);
                    let tied: Vec<&String> = bounds
                        .iter()
                        .filter(|(_, b)| top - b <= 1e-12 * top.abs().max(1.0))
                        .map(|(a, _)| *a)
                        .collect();
                    self.pick_random(&tied).cloned().unwrap_or_default()
                }
            }
            Algorithm::Thompson => {
                let mut best: Option<(&String, f64)> = None;
                for (i, arm) in p.arms.iter().enumerate() {
                    let s = arm_stats(i, arm);
                    let successes = s.successes();
                    let draw =
                        self.beta(1.0 + successes as f64, 1.0 + (s.pulls - successes) as f64);
                    if best.is_none_or(|(_, b)| draw > b) {
                        best = Some((arm, draw));
                    }
                }
                best.map_or_else(String::new, |(arm, _)| arm.clone())
            }
        };
        drop(stats);
        let mut pending = self.pending_lock();
        match p.key {
            Some(key) => pending.insert(key, p.context, chosen.clone()),
            None => {
                *pending
                    .keyless
                    .entry((p.context, chosen.clone()))
                    .or_default() += 1
            }
        }
        Ok(Some(chosen))
    }

    fn update(&self, p: UpdateParams) -> Result<(), PluginError> {
        if p.arm.is_empty() {
            return Err(PluginError::invalid_params("arm must not be empty"));
        }
        if !p.reward.is_finite() || !(0.0..=1.0).contains(&p.reward) {
            return Err(PluginError::invalid_params(format!(
                "reward must be a number in 0..=1, found {}",
                p.reward
            )));
        }
        if !self.handles(&p.context) {
            tracing::debug!(context = %p.context, "update for a context not handled; ignored");
            return Ok(());
        }
        // The Bernoulli trick: a success with probability `reward`.
        let success = self.next_unit() < p.reward;
        if self.shared {
            // The key is copied out (a shared name): the addition below may wait for the store,
            // and `choose` needs the arms seen.
            let key = {
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                note_arms(&mut seen, &p.context, [p.arm.as_str()])
                    .and_then(|arms| arms.get(&p.arm))
                    .cloned()
            };
            let fields = [
                ("n", 1.0),
                ("sum", p.reward),
                ("sumsq", p.reward * p.reward),
                ("succ", f64::from(u8::from(success))),
            ];
            match (&p.id, &key) {
                (Some(id), Some(key)) => {
                    if plugin_api::store::add_once_joined(
                        &["scored", &p.context, id],
                        &[(key, &fields)],
                    ) == Some(false)
                    {
                        return Ok(());
                    }
                }
                (None, Some(key)) => {
                    plugin_api::store::add(key, &fields);
                }
                // Noted just above.
                (_, None) => {}
            }
        }
        let mut stats = self.stats_lock();
        let entry = stats
            .entry(p.context)
            .or_default()
            .entry(p.arm)
            .or_default();
        let successes = entry.successes();
        entry.pulls += 1;
        entry.reward_sum += p.reward;
        entry.reward_sum_sq = match entry.reward_sum_sq {
            Some(q) => Some(q + p.reward * p.reward),
            None if entry.pulls == 1 => Some(p.reward * p.reward),
            None => None,
        };
        entry.successes = Some(successes + u64::from(success));
        Ok(())
    }

    fn on_scored(&self, task: Option<ScoredTask>) -> Result<HookResult, PluginError> {
        let task = task.unwrap_or_default();
        let (Some(context), Some(arm), Some(reward)) = (task.task_type, task.handler, task.score)
        else {
            return Ok(HookResult::Continue);
        };
        if !self.handles(&context) {
            return Ok(HookResult::Continue);
        }
        if chosen_by_bandit(task.chooser.as_deref()) == Some(false) {
            // Someone else chose (or a subscriber changed) the handler: forget our choice.
            if let Some(id) = &task.id {
                self.pending_lock().by_id.remove(id);
            }
            return Ok(HookResult::Continue);
        }
        if !self.chose(task.id.as_deref(), &context, &arm) {
            return Ok(HookResult::Continue);
        }
        if let Err(e) = self.update(UpdateParams {
            context,
            arm,
            reward,
            id: task.id,
        }) {
            tracing::warn!(error = %e, "task.scored: payload skipped");
        }
        Ok(HookResult::Continue)
    }

    /// Whether the bandit chose `arm` for this task; takes the choice back.
    fn chose(&self, id: Option<&str>, context: &str, arm: &str) -> bool {
        let mut pending = self.pending_lock();
        if let Some(routed) = id.and_then(|id| pending.by_id.remove(id)) {
            return routed.0 == context && routed.1 == arm;
        }
        match pending
            .keyless
            .get_mut(&(context.to_owned(), arm.to_owned()))
        {
            Some(waiting) if *waiting > 0 => {
                *waiting -= 1;
                true
            }
            _ => false,
        }
    }

    fn on_error(&self, task: Option<FailedTask>) -> Result<HookResult, PluginError> {
        let task = task.unwrap_or_default();
        let by_bandit = chosen_by_bandit(task.chooser.as_deref());
        let routed = task
            .id
            .as_deref()
            .and_then(|id| self.pending_lock().by_id.remove(id));
        let (context, arm) = match (routed, by_bandit, task.task_type, task.handler) {
            // Someone else chose the handler, or the task failed before one was chosen.
            (_, Some(false), _, _) => return Ok(HookResult::Continue),
            (Some((context, arm)), _, _, handler) => {
                if handler.is_some_and(|h| h != arm) {
                    return Ok(HookResult::Continue);
                }
                (context, arm)
            }
            // Chosen without a key: the payload names the arm.
            (None, Some(true), Some(context), Some(arm)) => {
                if !self.chose(None, &context, &arm) {
                    return Ok(HookResult::Continue);
                }
                (context, arm)
            }
            _ => return Ok(HookResult::Continue),
        };
        if task
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("blocked"))
        {
            return Ok(HookResult::Continue);
        }
        if let Err(e) = self.update(UpdateParams {
            context,
            arm,
            reward: 0.0,
            id: task.id,
        }) {
            tracing::warn!(error = %e, "task.error: not counted");
        }
        Ok(HookResult::Continue)
    }

    fn report(&self, p: Option<StatsParams>) -> Result<Value, PluginError> {
        let only = p.unwrap_or_default().context;
        if let Some(context) = &only
            && !self.handles(context)
        {
            return Err(PluginError::invalid_params(format!(
                "context `{context}` is not handled (configured: {})",
                self.contexts.as_deref().unwrap_or_default().join(", ")
            )));
        }
        let fleet: Stats;
        let local;
        let stats = if self.shared {
            // The fleet's arms, including those this worker never saw: listed and read with
            // neither of the plugin's locks held (both may wait for the store, and every
            // choice and every update takes one of them).
            let listed = plugin_api::store::keys("arm/").unwrap_or_default();
            // Each (context, arm) of a map of contexts to arms.
            fn pairs<'m, V: 'm>(
                contexts: impl IntoIterator<Item = (&'m String, &'m BTreeMap<String, V>)>,
            ) -> impl Iterator<Item = (String, String)> {
                contexts
                    .into_iter()
                    .flat_map(|(c, arms)| arms.keys().map(move |arm| (c.clone(), arm.clone())))
            }
            let mut names: Vec<(String, String)> = pairs(self.stats_lock().iter()).collect();
            {
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                for key in &listed {
                    if let Some((context, arm)) = key
                        .strip_prefix("arm/")
                        .and_then(|rest| rest.split_once('/'))
                    {
                        note_arms(&mut seen, context, [arm]);
                    }
                }
                names.extend(pairs(seen.iter()));
            }
            // An arm both learned here and seen in the store is read once.
            names.sort_unstable();
            names.dedup();
            let mut arms = Stats::new();
            for (context, arm) in names {
                let s = fleet_arm(&arm_key(&context, &arm));
                arms.entry(context).or_default().insert(arm, s);
            }
            fleet = arms;
            &fleet
        } else {
            local = self.stats_lock();
            &*local
        };
        let mut names: Vec<&String> = stats.keys().collect();
        names.extend(self.contexts.iter().flatten());
        if let Some(context) = &only {
            names.push(context);
        }
        names.sort();
        names.dedup();
        let mut report = serde_json::Map::new();
        for name in names {
            if only.as_ref().is_some_and(|o| o != name) {
                continue;
            }
            let mut arms = serde_json::Map::new();
            let mut best: Option<(&String, f64)> = None;
            for (arm, s) in stats.get(name).into_iter().flatten() {
                let mean = s.mean();
                if let Some(m) = mean
                    && best.is_none_or(|(_, b)| m > b)
                {
                    best = Some((arm, m));
                }
                let interval = s.moments().and_then(|m| m.interval(0.95));
                arms.insert(
                    arm.clone(),
                    serde_json::json!({
                        "pulls": s.pulls,
                        "meanReward": mean,
                        "ciLow": interval.map(|i| i.low),
                        "ciHigh": interval.map(|i| i.high),
                        "successes": s.successes(),
                    }),
                );
            }
            report.insert(
                name.clone(),
                serde_json::json!({ "arms": arms, "best": best.map(|(arm, _)| arm) }),
            );
        }
        Ok(Value::Object(report))
    }
}

impl Plugin for BanditPlugin {
    type Config = Config;
    type State = Stats;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "bandit",
            env!("CARGO_PKG_VERSION"),
            "Multi-armed bandit per task type: shifts traffic toward the best-scoring handler",
        )
    }

    fn create(config: Config) -> Result<Self, PluginError> {
        config.check()?;
        let seed = config.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Self {
            contexts: config.contexts,
            algorithm: config.algorithm.unwrap_or_default(),
            exploration: config.exploration.unwrap_or(2.0),
            stats: Mutex::new(Stats::new()),
            pending: Mutex::new(Pending::default()),
            rng: Random::new(seed),
            shared: plugin_api::store::available(),
            seen: Mutex::new(BTreeMap::new()),
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "choose",
                "Chooses an arm: {\"context\", \"arms\"} -> \"recall\" (null when not handled)",
                Self::choose,
            )
            .method(
                "update",
                "Records a reward in 0..=1: {\"context\", \"arm\", \"reward\"}",
                Self::update,
            )
            .method(
                "stats",
                "Per-arm pulls and mean rewards, and the favoured arm: {\"context\"?}",
                Self::report,
            );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on("task.scored", 50, HookMode::Audit, Self::on_scored);
        hooks.on("task.error", 50, HookMode::Audit, Self::on_error);
    }

    fn save_state(&self) -> Result<Option<Stats>, PluginError> {
        Ok(Some(self.stats_lock().clone()))
    }

    fn restore_state(&self, saved: Stats) -> Result<(), PluginError> {
        let mut stats = self.stats_lock();
        for (context, arms) in saved {
            if !self.handles(&context) {
                tracing::warn!(%context, "saved state for a context no longer handled; dropped");
                continue;
            }
            for (arm, s) in arms {
                if !s.reward_sum.is_finite() || s.reward_sum < 0.0 || s.reward_sum > s.pulls as f64
                {
                    tracing::warn!(%context, %arm, "saved arm stats are inconsistent; dropped");
                    continue;
                }
                let entry = stats
                    .entry(context.clone())
                    .or_default()
                    .entry(arm)
                    .or_default();
                let fresh = entry.pulls == 0;
                entry.successes = Some(entry.successes() + s.successes());
                entry.reward_sum_sq = match (entry.reward_sum_sq, s.reward_sum_sq) {
                    (Some(a), Some(b)) => Some(a + b),
                    (None, b) if fresh => b,
                    _ => None,
                };
                entry.pulls += s.pulls;
                entry.reward_sum += s.reward_sum;
            }
        }
        Ok(())
    }
}

export_plugin!(BanditPlugin);

#[cfg(test)]
mod tests {
    use plugin_api::Harness;
    use serde_json::json;

    use super::*;

    fn plugin(config: Value) -> BanditPlugin {
        let config: Option<Config> = serde_json::from_value(config).unwrap();
        BanditPlugin::create(config.unwrap_or_default()).unwrap()
    }

    fn choose(p: &BanditPlugin, context: &str, arms: &[&str]) -> Option<String> {
        p.choose(ChooseParams {
            context: context.into(),
            arms: arms.iter().map(|a| (*a).to_owned()).collect(),
            key: None,
        })
        .unwrap()
    }

    fn update(p: &BanditPlugin, context: &str, arm: &str, reward: f64) {
        p.update(UpdateParams {
            context: context.into(),
            arm: arm.into(),
            reward,
            id: None,
        })
        .unwrap();
    }

    /// Plays `rounds` rounds; answers how often "good" was chosen in the last 1000.
    fn simulate(p: &BanditPlugin, rounds: usize) -> usize {
        let mut good = 0;
        for round in 0..rounds {
            let arm = choose(p, "chat", &["bad", "good"]).unwrap();
            let reward = if arm == "good" { 0.8 } else { 0.3 };
            update(p, "chat", &arm, reward);
            if round >= rounds - 1000 && arm == "good" {
                good += 1;
            }
        }
        good
    }

    #[test]
    fn ucb1_converges_on_the_better_arm() {
        let p = plugin(Value::Null);
        let good = simulate(&p, 2000);
        assert!(good > 800, "good got {good} of the last 1000");
        let stats = p.report(None).unwrap();
        assert_eq!(stats["chat"]["best"], "good");
        let mean = stats["chat"]["arms"]["good"]["meanReward"]
            .as_f64()
            .unwrap();
        assert!((mean - 0.8).abs() < 1e-9, "{mean}");
    }

    #[test]
    fn thompson_converges_on_the_better_arm() {
        let p = plugin(json!({"algorithm": "thompson", "seed": 7}));
        let good = simulate(&p, 2000);
        assert!(good > 700, "good got {good} of the last 1000");
    }

    #[test]
    fn beta_sampler_has_the_right_mean() {
        let p = plugin(json!({"seed": 3}));
        for (a, b) in [(3.0, 7.0), (0.5, 0.5), (41.0, 11.0)] {
            let n = 20_000;
            let mean = (0..n).map(|_| p.beta(a, b)).sum::<f64>() / f64::from(n);
            let want = a / (a + b);
            assert!(
                (mean - want).abs() < 0.01,
                "Beta({a}, {b}): mean {mean}, want {want}"
            );
        }
    }

    #[test]
    fn ucb1_tries_unpulled_arms_first_and_breaks_ties_at_random() {
        let p = plugin(json!({"seed": 4}));
        update(&p, "chat", "a", 1.0);
        let mut seen = BTreeMap::new();
        for _ in 0..200 {
            // Choosing is not a pull: b and c stay unpulled.
            *seen
                .entry(choose(&p, "chat", &["a", "b", "c"]).unwrap())
                .or_insert(0) += 1;
        }
        assert_eq!(seen.get("a"), None);
        assert!(seen["b"] > 60 && seen["c"] > 60, "{seen:?}");
        // Equal bounds: either arm, not always the first.
        update(&p, "chat", "b", 1.0);
        let firsts = (0..200)
            .filter(|_| choose(&p, "chat", &["a", "b"]).unwrap() == "a")
            .count();
        assert!((60..140).contains(&firsts), "a chosen {firsts} of 200 ties");
    }

    #[test]
    fn the_bernoulli_trick_keeps_integer_successes_at_the_mean_reward() {
        let p = plugin(json!({"seed": 11}));
        for _ in 0..4000 {
            update(&p, "chat", "a", 0.3);
        }
        let s = p.stats_lock()["chat"]["a"].clone();
        let rate = s.successes() as f64 / s.pulls as f64;
        assert!((rate - 0.3).abs() < 0.03, "success rate {rate}");
        assert!((s.reward_sum_sq.unwrap() - 4000.0 * 0.09).abs() < 1e-6);
    }

    #[test]
    fn unhandled_contexts_and_empty_arms_answer_nothing() {
        let p = plugin(json!({"contexts": ["chat"]}));
        assert_eq!(choose(&p, "summarize", &["a", "b"]), None);
        assert_eq!(choose(&p, "chat", &[]), None);
        assert_eq!(choose(&p, "chat", &["a"]).unwrap(), "a");
        update(&p, "summarize", "a", 1.0);
        assert!(p.report(None).unwrap().get("summarize").is_none());
    }

    #[test]
    fn reward_out_of_range_is_invalid_params() {
        let p = plugin(Value::Null);
        for reward in [1.5, -0.1, f64::NAN] {
            let err = p
                .update(UpdateParams {
                    context: "chat".into(),
                    arm: "a".into(),
                    reward,
                    id: None,
                })
                .unwrap_err();
            assert_eq!(err.kind(), plugin_api::abi::ErrorKind::InvalidParams);
            assert!(err.message().contains("reward"), "{err}");
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        for (config, name) in [
            (json!({"algorithm": "greedy"}), "algorithm: "),
            (json!({"algorithm": 3}), "algorithm: "),
            (json!({"exploration": -1}), "exploration: "),
            (json!({"exploration": "big"}), "exploration: "),
            (json!({"contexts": []}), "contexts: "),
            (json!({"contexts": "chat"}), "contexts: "),
            (json!({"seed": -4}), "seed: "),
            (json!({"explore": 1}), "unknown field `explore`"),
            (json!("chat"), "invalid type: string"),
        ] {
            let err = Harness::<BanditPlugin>::new(&config).unwrap_err();
            assert!(err.message().contains(name), "{config}: {err}");
        }
        for absent in [
            Value::Null,
            json!({}),
            json!({"algorithm": null, "exploration": null}),
        ] {
            let p = Harness::<BanditPlugin>::new(&absent).unwrap();
            assert_eq!(p.plugin().algorithm, Algorithm::Ucb1);
            assert_eq!(p.plugin().exploration, 2.0);
        }
    }

    #[test]
    fn state_round_trips_and_adds_up() {
        let p = plugin(json!({"contexts": ["chat"]}));
        update(&p, "chat", "good", 0.8);
        update(&p, "chat", "good", 0.6);
        update(&p, "chat", "bad", 0.2);
        let state = p.save_state().unwrap().unwrap();

        let fresh = plugin(json!({"contexts": ["chat"]}));
        fresh.restore_state(state.clone()).unwrap();
        assert_eq!(fresh.save_state().unwrap().unwrap(), state);
        fresh.restore_state(state).unwrap();
        let stats = fresh.report(Some(StatsParams::default())).unwrap();
        assert_eq!(stats["chat"]["arms"]["good"]["pulls"], 4);
        assert_eq!(stats["chat"]["best"], "good");

        let harness = Harness::<BanditPlugin>::new(json!({"contexts": ["chat"]})).unwrap();
        let err = harness.restore_state("[1, 2]").unwrap_err();
        assert!(
            err.message().starts_with("the saved state does not fit"),
            "{err}"
        );
        let err = harness
            .restore_state(r#"{"chat": {"good": {"pulls": 1, "rewardSum": "lots"}}}"#)
            .unwrap_err();
        assert!(err.message().contains("chat.good.rewardSum: "), "{err}");
    }

    #[test]
    fn methods_and_hook_speak_json() {
        let p = plugin(json!({"contexts": ["chat"]}));
        let mut methods = Methods::new();
        BanditPlugin::methods(&mut methods);
        let mut hooks = Hooks::new();
        BanditPlugin::hooks(&mut hooks);
        assert_eq!(hooks.subscriptions()[0].mode, HookMode::Audit);
        assert_eq!(hooks.subscriptions()[0].priority, 50);

        let payload = json!({"id": "t-1", "type": "chat", "handler": "recall", "variant": null,
            "experiment": null, "role": null, "score": 0.75, "latency_ms": 0.4,
            "output_len": 3, "plugins_ms": {"bandit": 0.01}});
        // Not chosen by the bandit: not counted.
        let r = hooks.run(&p, "task.scored", &payload.to_string()).unwrap();
        assert_eq!(r, HookResult::Continue);
        assert!(
            p.report(None).unwrap()["chat"]["arms"]
                .as_object()
                .unwrap()
                .is_empty()
        );
        // Chosen (with the task id as key), then scored: counted.
        let chosen = methods
            .call(
                &p,
                "choose",
                r#"{"context": "chat", "arms": ["recall"], "key": "t-1"}"#,
            )
            .unwrap();
        assert_eq!(chosen.as_deref(), Some("\"recall\""));
        hooks.run(&p, "task.scored", &payload.to_string()).unwrap();
        for odd in [
            json!(null),
            json!({}),
            json!({"type": "chat", "handler": "recall", "score": null}),
            json!({"type": "chat", "handler": "recall", "score": "high"}),
            json!({"type": "chat", "handler": "recall", "score": 7}),
            json!({"type": "other", "handler": "recall", "score": 0.5}),
        ] {
            let r = hooks.run(&p, "task.scored", &odd.to_string()).unwrap();
            assert_eq!(r, HookResult::Continue);
        }

        let chosen = methods
            .call(
                &p,
                "choose",
                r#"{"context": "chat", "arms": ["recall", "recent"]}"#,
            )
            .unwrap();
        assert_eq!(chosen.as_deref(), Some("\"recent\""));
        // A chosen task that fails counts as 0; the keyless choice above cannot be tied to it.
        methods
            .call(
                &p,
                "choose",
                r#"{"context": "chat", "arms": ["recall", "recent"], "key": "t-2"}"#,
            )
            .unwrap();
        hooks
            .run(
                &p,
                "task.error",
                r#"{"id": "t-2", "type": "chat", "error": "handler failed"}"#,
            )
            .unwrap();
        let none = methods
            .call(&p, "choose", r#"{"context": "other", "arms": ["recall"]}"#)
            .unwrap();
        assert_eq!(none, None);
        let answer = methods
            .call(
                &p,
                "update",
                r#"{"context": "chat", "arm": "recent", "reward": 0.25}"#,
            )
            .unwrap();
        assert_eq!(answer, None);
        let stats: Value =
            serde_json::from_str(&methods.call(&p, "stats", "").unwrap().unwrap()).unwrap();
        // recall: the scored task it chose (0.75); recent: the failed task (0) and the update.
        let arms = &stats["chat"]["arms"];
        assert_eq!(
            (&arms["recall"]["pulls"], &arms["recall"]["meanReward"]),
            (&json!(1), &json!(0.75))
        );
        assert_eq!(
            (&arms["recent"]["pulls"], &arms["recent"]["meanReward"]),
            (&json!(2), &json!(0.125))
        );
        assert!(arms["recent"]["ciLow"].as_f64().unwrap() < 0.125);
        assert_eq!(stats["chat"]["best"], "recall");
        assert!(
            methods
                .call(&p, "stats", r#"{"context": "other"}"#)
                .is_err()
        );
    }

    #[test]
    fn the_chooser_says_whose_task_it_is() {
        let p = plugin(json!({"contexts": ["chat"]}));
        let pulls = |p: &BanditPlugin| -> Value {
            p.report(None).unwrap()["chat"]["arms"]["recall"]["pulls"].clone()
        };
        let scored = |id: &str, chooser: &str| {
            let payload = json!({"id": id, "type": "chat", "handler": "recall",
                "chooser": chooser, "score": 0.5});
            p.on_scored(serde_json::from_value(payload).unwrap())
                .unwrap();
        };
        // Chosen with a key, then a subscriber changed the handler back to the same arm's
        // name: the chooser says it was not the bandit's choice.
        assert_eq!(choose_keyed(&p, "t-1").as_deref(), Some("recall"));
        scored("t-1", "task.before_handle");
        assert_eq!(pulls(&p), Value::Null);
        // The choice was forgotten: a late payload naming the bandit does not count either.
        scored("t-1", "bandit");
        assert_eq!(pulls(&p), Value::Null);
        // Chosen without a key: a scored task the champion chose for the same arm is not ours;
        // the one the bandit chose is.
        assert_eq!(choose(&p, "chat", &["recall"]).as_deref(), Some("recall"));
        scored("t-2", "champion");
        assert_eq!(pulls(&p), Value::Null);
        scored("t-3", "bandit");
        assert_eq!(pulls(&p), json!(1));
        // A keyless failure naming the bandit and the arm counts 0.
        assert_eq!(choose(&p, "chat", &["recall"]).as_deref(), Some("recall"));
        let failed = json!({"id": "t-4", "type": "chat", "handler": "recall",
            "chooser": "bandit", "error": "handler recall failed"});
        p.on_error(serde_json::from_value(failed).unwrap()).unwrap();
        assert_eq!(pulls(&p), json!(2));
    }

    fn choose_keyed(p: &BanditPlugin, key: &str) -> Option<String> {
        p.choose(ChooseParams {
            context: "chat".into(),
            arms: vec!["recall".into()],
            key: Some(key.into()),
        })
        .unwrap()
    }
}
