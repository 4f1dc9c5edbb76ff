//! `champion`: champion/challenger deployment per task type, with a promotion decided by a
//! statistical test that controls the rate of false promotions.
//!
//! The pattern it serves: `route = execute("champion", "route", {...})`, then run
//! `route.handler` (or the caller's default when the answer is `null`). Scores come back through
//! the `task.scored` hook (failures through `task.error`); when the challenger is shown to be
//! better, it becomes the champion.
//!
//! # Configuration
//!
//! ```json
//! {
//!   "taskTypes": { "summarize": { "champion": "lead", "challenger": "title-match" } },
//!   "challengerShare": 0.2,
//!   "minScored": 50,
//!   "looks": 5,
//!   "alpha": 0.05,
//!   "threshold": 0.02,
//!   "seed": 7
//! }
//! ```
//!
//! - `taskTypes`: task type → its `champion` handler and (optionally) its `challenger`; the two
//!   must differ. Without a challenger every task goes to the champion.
//! - `challengerShare` (default 0.2): the share of traffic, in 0..=1, sent to the challenger.
//! - `minScored` (default 50, at least 2): the spacing of the looks, in scored tasks of the
//!   smaller arm.
//! - `looks` (default 5, at least 1): how many times the test is run.
//! - `alpha` (default 0.05, in (0, 1)): the false-promotion rate the rule guarantees at most.
//! - `threshold` (default 0.02, >= 0): how much the challenger's mean score must exceed the
//!   champion's for a promotion.
//! - `seed` (optional): seeds the random routing of calls without a key.
//!
//! # The promotion rule
//!
//! A group-sequential test with Bonferroni alpha spending: the test looks when the smaller arm
//! reaches `minScored`, `2 · minScored`, …, `looks · minScored` scored tasks, and each look is a
//! one-sided Welch t-test of `challenger mean − champion mean − threshold > 0` at level
//! `alpha / looks`. The challenger is promoted at the first look that rejects; if the last look
//! does not, the champion is kept. By the union bound, whatever the scores' distribution, the
//! chance of promoting a challenger that is not better by more than `threshold` is at most
//! `alpha` (up to the t-test's normal approximation, good for a few dozen scores per arm). The
//! price of the guarantee is power: a small improvement may end in "kept".
//!
//! Either way the experiment ends: the loser is retired, the challenger slot stays empty (all
//! traffic goes to the champion) and the decision is recorded with its statistics in the state
//! and in an `info` log event. A new experiment starts when the configuration names a challenger
//! that is neither the champion nor retired (at the next load of the configuration). The host
//! writes the state at reload and shutdown; a plugin cannot ask for an earlier write.
//!
//! # Which tasks count
//!
//! Only the tasks this plugin routed: `route` with a `key` (the pipeline passes the task id)
//! remembers the task's handler until its `task.scored` or `task.error` (at most 100,000 tasks
//! in flight; the oldest are forgotten beyond that). A scored task counts for the handler it was
//! routed to if it ran that handler; a failed task (`task.error`) counts as a score of 0 for it,
//! unless its error says it was `blocked` by a hook (the handler did not fail). A payload whose
//! `chooser` names someone else (a subscriber changed the handler, say) is not counted; a task
//! routed without a key counts when its `chooser` is `champion` (or, for payloads without a
//! `chooser`, when its `role` names the handler's current role).
//!
//! # Methods
//!
//! - `route {"taskType", "key"?}` → `{"handler", "role": "champion" | "challenger"}`, or `null`
//!   for a task type not configured. The same key always gets the same role (sticky); without a
//!   key the pick is random with the challenger share.
//! - `status {"taskType"?}` → per task type: `{"champion", "challenger", "retired",
//!   "scored": {handler: {"count", "meanScore", "ciLow", "ciHigh"}}, "comparison": {"diff",
//!   "ciLow", "ciHigh", "pValue", "pPromote", "looksTaken", "nextLookAt"} | null, "decisions":
//!   [..], "promotions": [..]}`. Intervals are 95 % Student-t intervals of the mean; `diff` is
//!   challenger minus champion with its 95 % Welch interval and two-sided `pValue`; `pPromote`
//!   is the one-sided p-value the rule compares with `alpha / looks` at each look. A decision is
//!   `{"taskType", "outcome": "promoted" | "kept", "from" (the champion), "to" (the challenger),
//!   "championMean", "challengerMean", "scored": {"champion", "challenger"}, "diff", "ciLow",
//!   "ciHigh", "pValue", "look", "level", "threshold"}`; `promotions` lists the promoted ones.
//!
//! # Hooks
//!
//! - `task.scored` (audit, priority 40) and `task.error` (audit, priority 40), as above.
//!
//! # A fleet
//!
//! When the host offers a store (`plugin_api::store`), the workers share one deployment record
//! per task type (`deploy/<task type>`: champion, challenger, retired, decisions, looks taken,
//! and the experiment's `epoch`) and the arms' statistics (`arm/<task type>/<epoch>/<handler>`:
//! `n`, `sum`, `sumsq`, a task counted once fleet-wide by its id). The test runs on the fleet's
//! statistics, and each look, and so each decision, is a compare-and-set of the record: exactly
//! one worker takes a look, so the fleet takes at most `looks` looks and the error rate holds,
//! and exactly one promotes. The others follow the record within a refresh of the store. The
//! record is written when the decision is made (with the default SQLite store, in the state
//! directory). Routing stays a local hash.
//!
//! The deployment (who is champion, the arms' count, sum and sum of squares, retired handlers,
//! decisions) survives hot reloads and restarts (`save_state` / `restore_state`). A state saved
//! by a version that kept no sum of squares loads with its arms' statistics reset.

#![forbid(unsafe_code)]

use plugin_api::assign::{Random, stable_hash, unit};
use plugin_api::stats::{Moments, welch, welch_one_sided};
use plugin_api::store::Key;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, Value, export_plugin,
};
use serde::{Deserialize, Serialize};

/// Tasks routed and not yet scored or failed that the plugin remembers.
const MAX_PENDING: usize = 100_000;

/// The plugin's configuration (see the crate docs). A field that is absent or `null` takes
/// its default.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Task type → its champion and challenger.
    pub task_types: BTreeMap<String, TaskTypeConfig>,
    /// The challenger's share of traffic (default 0.2).
    pub challenger_share: Option<f64>,
    /// Spacing of the looks in scored tasks of the smaller arm (default 50).
    pub min_scored: Option<u64>,
    /// How many looks (default 5).
    pub looks: Option<u32>,
    /// The false-promotion rate (default 0.05).
    pub alpha: Option<f64>,
    /// How much better the challenger must score (default 0.02).
    pub threshold: Option<f64>,
    /// Seeds the random routing of calls without a key.
    pub seed: Option<u64>,
}

/// One task type of the [`Config`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskTypeConfig {
    /// The handler that gets most of the traffic.
    pub champion: String,
    /// The handler that gets the challenger's share.
    pub challenger: Option<String>,
}

/// Sufficient statistics of one arm as saved. `sumSq` is absent in states of older versions
/// (whose `scoreSum` is read as `sum`); such an arm is reset on restore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arm {
    /// Scored tasks.
    pub count: u64,
    /// Sum of their scores.
    #[serde(alias = "scoreSum")]
    pub sum: f64,
    /// Sum of their squares.
    pub sum_sq: Option<f64>,
}

impl Arm {
    fn moments(&self) -> Moments {
        Moments {
            count: self.count,
            sum: self.sum,
            sum_sq: self.sum_sq.unwrap_or(0.0),
        }
    }

    fn push(&mut self, score: f64) {
        self.count += 1;
        self.sum += score;
        self.sum_sq = Some(self.sum_sq.unwrap_or(0.0) + score * score);
    }
}

/// How many scored tasks each side had when a decision was made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionCounts {
    /// The champion's scored tasks.
    pub champion: u64,
    /// The challenger's scored tasks.
    pub challenger: u64,
}

/// What a decision did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The challenger became the champion.
    #[default]
    Promoted,
    /// The last look did not reject: the champion stays.
    Kept,
}

/// One decision that ended an experiment. States of older versions hold only promotions,
/// without the test's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// The task type.
    pub task_type: String,
    /// What happened.
    #[serde(default)]
    pub outcome: Outcome,
    /// The champion when the decision was made.
    pub from: String,
    /// The challenger when the decision was made.
    pub to: String,
    /// The champion's mean score.
    pub champion_mean: f64,
    /// The challenger's mean score.
    pub challenger_mean: f64,
    /// Scored tasks per side.
    pub scored: DecisionCounts,
    /// Challenger minus champion.
    #[serde(default)]
    pub diff: Option<f64>,
    /// Lower bound of the difference's 95 % interval.
    #[serde(default)]
    pub ci_low: Option<f64>,
    /// Upper bound of the difference's 95 % interval.
    #[serde(default)]
    pub ci_high: Option<f64>,
    /// The one-sided p-value of the look that decided.
    #[serde(default)]
    pub p_value: Option<f64>,
    /// Which look decided (1-based).
    #[serde(default)]
    pub look: Option<u32>,
    /// The level the p-value was compared with (`alpha / looks`).
    #[serde(default)]
    pub level: Option<f64>,
    /// The threshold in force.
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// The deployment of one task type: also the shape of the saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// The handler most traffic goes to.
    pub champion: String,
    /// The handler that gets the challenger share, if any.
    pub challenger: Option<String>,
    /// Statistics of the current champion and challenger since the experiment began.
    #[serde(default)]
    pub scored: BTreeMap<String, Arm>,
    /// Looks of the test taken in this experiment.
    #[serde(default)]
    pub looks_taken: u32,
    /// Handlers that lost an experiment; never routed to again until configured anew.
    #[serde(default)]
    pub retired: Vec<String>,
    /// Decisions, oldest first.
    #[serde(default, alias = "promotions")]
    pub decisions: Vec<Decision>,
    /// The experiment's number: one more with each decision and each new challenger (names
    /// the arms' statistics in a store).
    #[serde(default)]
    pub epoch: u64,
}

impl Deployment {
    fn handlers(&self) -> BTreeSet<&str> {
        std::iter::once(self.champion.as_str())
            .chain(self.challenger.as_deref())
            .collect()
    }

    fn arm(&self, handler: &str) -> Moments {
        self.scored
            .get(handler)
            .map(Arm::moments)
            .unwrap_or_default()
    }

    /// Why a saved deployment cannot be used, if it cannot.
    fn problem(&self) -> Option<String> {
        if self.champion.is_empty() || self.challenger.as_deref() == Some("") {
            return Some("a handler name is empty".to_owned());
        }
        if self.challenger.as_deref() == Some(self.champion.as_str()) {
            return Some("champion and challenger are the same handler".to_owned());
        }
        if let Some(handler) = self
            .scored
            .keys()
            .find(|h| !self.handlers().contains(h.as_str()))
        {
            return Some(format!("statistics for `{handler}`, which is neither side"));
        }
        if self.scored.values().any(|a| !a.moments().is_consistent()) {
            return Some("a score sum is not finite".to_owned());
        }
        None
    }
}

/// The state carried over a reload.
pub type Deployments = BTreeMap<String, Deployment>;

/// A task routed and not yet back.
#[derive(Debug)]
struct Routed {
    task_type: String,
    handler: String,
}

/// Routed tasks by id, oldest first, bounded by [`MAX_PENDING`].
#[derive(Debug, Default)]
struct Pending {
    by_id: HashMap<String, Routed>,
    order: VecDeque<String>,
}

impl Pending {
    fn insert(&mut self, id: String, routed: Routed) {
        if self.by_id.insert(id.clone(), routed).is_none() {
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
        // Ids already taken back leave stale entries in `order`: compact now and then.
        if self.order.len() > 2 * MAX_PENDING {
            let by_id = &self.by_id;
            self.order.retain(|id| by_id.contains_key(id));
        }
    }

    fn take(&mut self, id: &str) -> Option<Routed> {
        self.by_id.remove(id)
    }
}

/// The test's settings.
#[derive(Debug, Clone, Copy)]
struct Rule {
    min_scored: u64,
    looks: u32,
    alpha: f64,
    threshold: f64,
}

impl Rule {
    fn level(&self) -> f64 {
        self.alpha / f64::from(self.looks)
    }
}

/// The plugin instance.
#[derive(Debug)]
pub struct ChampionPlugin {
    challenger_share: f64,
    rule: Rule,
    /// The configured task types and their initial deployments (also the keys of `state`).
    configured: Deployments,
    state: Mutex<Deployments>,
    pending: Mutex<Pending>,
    rng: Random,
    /// Whether the host offers a store: the deployment and the arms are then the fleet's.
    shared: bool,
    /// The version of each task type's record in the store that `state` follows, and the
    /// store's generation when it was last checked.
    versions: Mutex<BTreeMap<String, Followed>>,
    /// The store key of each configured task type's deployment record, made once.
    deploy_keys: BTreeMap<String, Key>,
    /// The store keys of each task type's arms in its running experiment, made once per
    /// experiment rather than for every score.
    arm_keys: Mutex<BTreeMap<String, ArmKeys>>,
}

/// The version of a task type's record that `state` follows.
#[derive(Debug, Clone, Copy)]
struct Followed {
    version: u64,
    /// The store's generation (`plugin_api::store::generation`) when the record was last read:
    /// while it is the same, the record is too, and is not read again.
    checked: Option<u64>,
}

/// The store keys of a task type's arms in one experiment (`epoch`).
#[derive(Debug, Default)]
struct ArmKeys {
    epoch: u64,
    keys: Vec<(String, Key)>,
}

/// The store key of a task type's deployment record.
fn deploy_key(task_type: &str) -> String {
    plugin_api::store::join(&["deploy", task_type])
}

/// The fleet's statistics kept under `key` (nothing read yet: none).
fn fleet_moments(key: &Key) -> Moments {
    let [n, sum, sum_sq] =
        plugin_api::store::read_values(key, ["n", "sum", "sumsq"]).unwrap_or_default();
    Moments {
        count: n.max(0.0).round() as u64,
        sum,
        sum_sq,
    }
}

/// The store key of an arm's statistics in an experiment.
fn arm_key(task_type: &str, epoch: u64, handler: &str) -> String {
    plugin_api::store::join(&["arm", task_type, &epoch.to_string(), handler])
}

/// How many times a look retries after another worker changed the record first.
const CAS_TRIES: usize = 4;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteParams {
    task_type: String,
    key: Option<String>,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct Route {
    handler: String,
    role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum Role {
    Champion,
    Challenger,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StatusParams {
    task_type: Option<String>,
}

/// The fields of a `task.scored` payload the plugin reads. Any of them may be missing, null or
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
    role: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    chooser: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::number")]
    score: Option<f64>,
}

/// The fields of a `task.error` payload the plugin reads.
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

/// What a payload's `chooser` says about this plugin: `Some(true)` when the champion routed the
/// task, `Some(false)` when someone else chose its handler, `None` when the payload does not say.
fn routed_by_champion(chooser: Option<&str>) -> Option<bool> {
    chooser.map(|c| c == "champion")
}

impl ChampionPlugin {
    fn state_lock(&self) -> std::sync::MutexGuard<'_, Deployments> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unknown_task_type(&self, task_type: &str) -> PluginError {
        let known: Vec<&str> = self.configured.keys().map(String::as_str).collect();
        PluginError::new(format!(
            "no task type `{task_type}` in the configuration (configured: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ))
    }

    fn route(&self, p: RouteParams) -> Result<Option<Route>, PluginError> {
        if self.shared {
            // `follow` answers at once for a task type not configured.
            self.follow(&p.task_type);
        }
        let state = self.state_lock();
        let Some(deployment) = state.get(&p.task_type) else {
            return Ok(None);
        };
        let route = match &deployment.challenger {
            Some(challenger) => {
                let draw = match &p.key {
                    // The plugin's name in the key: the experiment splits the same task ids, and
                    // its variant must be independent of the role.
                    Some(key) => stable_hash(&["champion", &p.task_type, key]),
                    None => self.rng.next_u64(),
                };
                if unit(draw) < self.challenger_share {
                    Route {
                        handler: challenger.clone(),
                        role: Role::Challenger,
                    }
                } else {
                    Route {
                        handler: deployment.champion.clone(),
                        role: Role::Champion,
                    }
                }
            }
            None => Route {
                handler: deployment.champion.clone(),
                role: Role::Champion,
            },
        };
        drop(state);
        if let Some(key) = p.key {
            self.pending_lock().insert(
                key,
                Routed {
                    task_type: p.task_type,
                    handler: route.handler.clone(),
                },
            );
        }
        Ok(Some(route))
    }

    /// Counts one scored task if this plugin routed it; answers the decision it caused, if any.
    fn record_scored(&self, task: ScoredTask) -> Option<Decision> {
        let (Some(task_type), Some(handler), Some(score)) =
            (task.task_type, task.handler, task.score)
        else {
            return None;
        };
        if !score.is_finite() || !(0.0..=1.0).contains(&score) {
            tracing::warn!(%task_type, %handler, score, "task.scored: score outside 0..=1; skipped");
            return None;
        }
        let routed = task
            .id
            .as_deref()
            .and_then(|id| self.pending_lock().take(id));
        let ours = routed_by_champion(task.chooser.as_deref());
        if ours == Some(false) {
            tracing::debug!(%task_type, %handler, chooser = ?task.chooser, "task.scored: another chose the handler; not counted");
            return None;
        }
        match routed {
            Some(routed) if routed.task_type == task_type && routed.handler == handler => {}
            Some(routed) => {
                tracing::debug!(%task_type, %handler, routed = %routed.handler, "task.scored: the task ran another handler than routed; not counted");
                return None;
            }
            None if ours == Some(true) => {}
            None => {
                // Routed without a key (or forgotten), and the payload does not say who chose:
                // the role in the payload must match.
                let state = self.state_lock();
                let deployment = state.get(&task_type)?;
                let ours = match task.role.as_deref() {
                    Some("champion") => handler == deployment.champion,
                    Some("challenger") => deployment.challenger.as_deref() == Some(&handler),
                    _ => false,
                };
                if !ours {
                    return None;
                }
            }
        }
        self.count_once(&task_type, &handler, score, task.id.as_deref())
    }

    /// Counts a failed task this plugin routed as a score of 0 for its handler.
    fn record_failed(&self, task: FailedTask) -> Option<Decision> {
        let routed = task
            .id
            .as_deref()
            .and_then(|id| self.pending_lock().take(id));
        if task
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("blocked"))
        {
            return None;
        }
        let (task_type, handler) = match (routed, routed_by_champion(task.chooser.as_deref())) {
            // Someone else chose the handler, or the task failed before one was chosen.
            (_, Some(false)) => return None,
            (Some(routed), _) => {
                if task.handler.is_some_and(|h| h != routed.handler) {
                    return None;
                }
                (routed.task_type, routed.handler)
            }
            // Routed without a key: the payload names the handler.
            (None, Some(true)) => (task.task_type?, task.handler?),
            (None, None) => return None,
        };
        self.count_once(&task_type, &handler, 0.0, task.id.as_deref())
    }

    /// Adds a score to the handler's arm and takes a look when one is due.
    /// With a store, counts in the fleet's arms, once per task `id`.
    fn count_once(
        &self,
        task_type: &str,
        handler: &str,
        score: f64,
        id: Option<&str>,
    ) -> Option<Decision> {
        if self.shared {
            let decision = self.count_shared(task_type, handler, score, id)?;
            Self::log_decision(&decision);
            return Some(decision);
        }
        let mut state = self.state_lock();
        let deployment = state.get_mut(task_type)?;
        if !deployment.handlers().contains(handler) {
            // Retired or unknown since it was routed.
            return None;
        }
        deployment
            .scored
            .entry(handler.to_owned())
            .or_default()
            .push(score);
        let decision = self.look(task_type, deployment)?;
        drop(state);
        Self::log_decision(&decision);
        Some(decision)
    }

    fn log_decision(decision: &Decision) {
        tracing::info!(
            task_type = %decision.task_type,
            outcome = ?decision.outcome,
            champion = %decision.from,
            challenger = %decision.to,
            champion_mean = decision.champion_mean,
            challenger_mean = decision.challenger_mean,
            champion_scored = decision.scored.champion,
            challenger_scored = decision.scored.challenger,
            diff = decision.diff,
            ci_low = decision.ci_low,
            ci_high = decision.ci_high,
            p_value = decision.p_value,
            level = decision.level,
            look = decision.look,
            "champion/challenger experiment decided"
        );
    }

    /// Adopts the store's record of `task_type` when it is newer than what this worker follows
    /// (and writes the configuration's new challenger into it, if any). Answers the version
    /// followed.
    fn follow(&self, task_type: &str) -> u64 {
        let Some(configured) = self.configured.get(task_type) else {
            return 0;
        };
        let Some(key) = self.deploy_keys.get(task_type) else {
            return 0;
        };
        let generation = plugin_api::store::generation();
        if generation.is_some() {
            let versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(followed) = versions.get(task_type)
                && followed.checked == generation
            {
                return followed.version;
            }
        }
        let version = self.follow_record(task_type, configured, key);
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        match versions.get_mut(task_type) {
            Some(followed) if followed.version == version => followed.checked = generation,
            Some(_) => {}
            None if version == 0 => {
                versions.insert(
                    task_type.to_owned(),
                    Followed {
                        version,
                        checked: generation,
                    },
                );
            }
            None => {}
        }
        version
    }

    /// [`Self::follow`] without its shortcut: reads the record.
    fn follow_record(&self, task_type: &str, configured: &Deployment, key: &Key) -> u64 {
        for _ in 0..CAS_TRIES {
            let known = self.version_of(task_type);
            let Some(Some(record)) = plugin_api::store::record_since(key, known) else {
                return known;
            };
            if record.version <= known {
                return known;
            }
            let saved: Deployment = match serde_json::from_value(record.value) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(%task_type, error = %e, "the store's deployment record does not fit; ignored");
                    return known;
                }
            };
            let merged = Self::merge_saved(task_type, saved.clone(), configured);
            if merged != saved {
                // The configuration starts a new experiment: the fleet's record says so first.
                let value = serde_json::to_value(&merged).unwrap_or(Value::Null);
                if plugin_api::store::compare_and_set(key, record.version, &value) != Some(true) {
                    continue;
                }
                self.adopt(task_type, merged, record.version + 1);
                return record.version + 1;
            }
            self.adopt(task_type, saved, record.version);
            return record.version;
        }
        self.version_of(task_type)
    }

    fn version_of(&self, task_type: &str) -> u64 {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(task_type)
            .map_or(0, |f| f.version)
    }

    fn adopt(&self, task_type: &str, deployment: Deployment, version: u64) {
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        if versions
            .get(task_type)
            .is_some_and(|f| f.version >= version)
        {
            return;
        }
        versions.insert(
            task_type.to_owned(),
            Followed {
                version,
                checked: None,
            },
        );
        self.state_lock().insert(task_type.to_owned(), deployment);
    }

    /// The store key of `handler`'s arm in experiment `epoch` of `task_type`.
    fn arm_key_of(&self, task_type: &str, epoch: u64, handler: &str) -> Key {
        let [key] = self.arm_keys_of(task_type, epoch, [handler]);
        key
    }

    /// [`Self::arm_key_of`] for several handlers, under one lock.
    fn arm_keys_of<const N: usize>(
        &self,
        task_type: &str,
        epoch: u64,
        handlers: [&str; N],
    ) -> [Key; N] {
        let mut all = self.arm_keys.lock().unwrap_or_else(|p| p.into_inner());
        if !all.contains_key(task_type) {
            all.insert(task_type.to_owned(), ArmKeys::default());
        }
        let Some(keys) = all.get_mut(task_type) else {
            return handlers.map(|handler| Key::new(arm_key(task_type, epoch, handler)));
        };
        if keys.epoch != epoch {
            keys.epoch = epoch;
            keys.keys.clear();
        }
        handlers.map(|handler| {
            if let Some((_, key)) = keys.keys.iter().find(|(h, _)| h == handler) {
                return key.clone();
            }
            let key = Key::new(arm_key(task_type, epoch, handler));
            keys.keys.push((handler.to_owned(), key.clone()));
            key
        })
    }

    /// The fleet's statistics of `handler` in the deployment's experiment.
    fn fleet_arm(&self, task_type: &str, deployment: &Deployment, handler: &str) -> Moments {
        fleet_moments(&self.arm_key_of(task_type, deployment.epoch, handler))
    }

    /// Counts a score in the store and takes the fleet's look when one is due: the look is a
    /// compare-and-set of the record, so exactly one worker takes it.
    fn count_shared(
        &self,
        task_type: &str,
        handler: &str,
        score: f64,
        id: Option<&str>,
    ) -> Option<Decision> {
        let mut version = self.follow(task_type);
        // The scored arm's key, and what the first look check below needs (both arms' keys
        // and the look's number), taken under one lock of the state and of the keys. The
        // check only skips looks that are not due; a look it lets through is decided on the
        // state read again below.
        let (key, mut first) = {
            let state = self.state_lock();
            let deployment = state.get(task_type)?;
            let challenger = deployment.challenger.as_deref()?;
            if handler != deployment.champion && handler != challenger {
                // Retired, unknown, or no experiment running: nothing to learn.
                return None;
            }
            let [key, champion_key, challenger_key] = self.arm_keys_of(
                task_type,
                deployment.epoch,
                [handler, &deployment.champion, challenger],
            );
            let look = u64::from(deployment.looks_taken) + 1;
            (key, Some((champion_key, challenger_key, look)))
        };
        let fields = [("n", 1.0), ("sum", score), ("sumsq", score * score)];
        match id {
            Some(id) => {
                if plugin_api::store::add_once_joined(
                    &["scored", task_type, id],
                    &[(&key, &fields)],
                ) == Some(false)
                {
                    return None;
                }
            }
            None => {
                plugin_api::store::add(&key, &fields);
            }
        }
        for attempt in 0..CAS_TRIES {
            if attempt > 0 {
                version = self.follow(task_type);
            }
            // Most scores take no look (what `look_with` checks first): that is decided on the
            // arms alone, before the deployment is copied for a compare-and-set. The arms are
            // read with the state's lock let go: a read of a key the store has not cached yet
            // may wait for the store, and routing takes that lock on every task.
            let (champion_key, challenger_key, look) = match first.take() {
                Some(first) => first,
                None => {
                    let state = self.state_lock();
                    let deployment = state.get(task_type)?;
                    let challenger = deployment.challenger.as_deref()?;
                    let [champion_key, challenger_key] = self.arm_keys_of(
                        task_type,
                        deployment.epoch,
                        [&deployment.champion, challenger],
                    );
                    (
                        champion_key,
                        challenger_key,
                        u64::from(deployment.looks_taken) + 1,
                    )
                }
            };
            let fewest = fleet_moments(&champion_key)
                .count
                .min(fleet_moments(&challenger_key).count);
            if fewest < look * self.rule.min_scored {
                return None;
            }
            let mut next = self.state_lock().get(task_type)?.clone();
            let challenger = next.challenger.clone()?;
            let champion_arm = self.fleet_arm(task_type, &next, &next.champion);
            let challenger_arm = self.fleet_arm(task_type, &next, &challenger);
            let looks_before = next.looks_taken;
            let decision = self.look_with(task_type, &mut next, champion_arm, challenger_arm);
            if decision.is_none() && next.looks_taken == looks_before {
                return None;
            }
            let value = serde_json::to_value(&next).unwrap_or(Value::Null);
            let written = match self.deploy_keys.get(task_type) {
                Some(key) => plugin_api::store::compare_and_set(key, version, &value),
                None => plugin_api::store::compare_and_set(&deploy_key(task_type), version, &value),
            };
            if written == Some(true) {
                self.adopt(task_type, next, version + 1);
                return decision;
            }
            // Another worker changed the record first (took this look, or decided): follow it
            // and look again.
        }
        None
    }

    /// Runs the test when the smaller arm reached the next look; ends the experiment when the
    /// test rejects or the last look did not.
    fn look(&self, task_type: &str, deployment: &mut Deployment) -> Option<Decision> {
        let challenger = deployment.challenger.clone()?;
        let champion_arm = deployment.arm(&deployment.champion);
        let challenger_arm = deployment.arm(&challenger);
        self.look_with(task_type, deployment, champion_arm, challenger_arm)
    }

    /// [`Self::look`] on the given statistics of the two arms.
    fn look_with(
        &self,
        task_type: &str,
        deployment: &mut Deployment,
        champion_arm: Moments,
        challenger_arm: Moments,
    ) -> Option<Decision> {
        let challenger = deployment.challenger.clone()?;
        let smaller = champion_arm.count.min(challenger_arm.count);
        let look = deployment.looks_taken + 1;
        if smaller < u64::from(look) * self.rule.min_scored {
            return None;
        }
        deployment.looks_taken = look;
        let p_value = welch_one_sided(&champion_arm, &challenger_arm, self.rule.threshold)?;
        let promote = p_value < self.rule.level();
        if !promote && look < self.rule.looks {
            return None;
        }
        let w = welch(&champion_arm, &challenger_arm, 0.95)?;
        let decision = Decision {
            task_type: task_type.to_owned(),
            outcome: if promote {
                Outcome::Promoted
            } else {
                Outcome::Kept
            },
            from: deployment.champion.clone(),
            to: challenger.clone(),
            champion_mean: champion_arm.mean()?,
            challenger_mean: challenger_arm.mean()?,
            scored: DecisionCounts {
                champion: champion_arm.count,
                challenger: challenger_arm.count,
            },
            diff: Some(w.diff),
            ci_low: Some(w.low),
            ci_high: Some(w.high),
            p_value: Some(p_value),
            look: Some(look),
            level: Some(self.rule.level()),
            threshold: Some(self.rule.threshold),
        };
        let loser = if promote {
            std::mem::replace(&mut deployment.champion, challenger)
        } else {
            challenger
        };
        deployment.retired.push(loser);
        deployment.challenger = None;
        deployment.scored.clear();
        deployment.looks_taken = 0;
        deployment.epoch += 1;
        deployment.decisions.push(decision.clone());
        Some(decision)
    }

    fn on_scored(&self, task: Option<ScoredTask>) -> Result<HookResult, PluginError> {
        self.record_scored(task.unwrap_or_default());
        Ok(HookResult::Continue)
    }

    fn on_error(&self, task: Option<FailedTask>) -> Result<HookResult, PluginError> {
        self.record_failed(task.unwrap_or_default());
        Ok(HookResult::Continue)
    }

    fn status(&self, p: Option<StatusParams>) -> Result<Value, PluginError> {
        let only = p.unwrap_or_default().task_type;
        if let Some(task_type) = &only
            && !self.configured.contains_key(task_type)
        {
            return Err(self.unknown_task_type(task_type));
        }
        if self.shared {
            for task_type in self.configured.keys() {
                self.follow(task_type);
            }
        }
        // A copy: the fleet's arms are read below, and a read may wait for the store while
        // routing needs the lock.
        let state = self.state_lock().clone();
        let mut report = serde_json::Map::new();
        for (task_type, deployment) in state.iter() {
            if only.as_ref().is_some_and(|o| o != task_type) {
                continue;
            }
            let arm = |handler: &str| {
                if self.shared {
                    self.fleet_arm(task_type, deployment, handler)
                } else {
                    deployment.arm(handler)
                }
            };
            let mut scored = serde_json::Map::new();
            for handler in deployment.handlers() {
                let m = arm(handler);
                let interval = m.interval(0.95);
                scored.insert(
                    handler.to_owned(),
                    serde_json::json!({
                        "count": m.count,
                        "meanScore": m.mean(),
                        "ciLow": interval.map(|i| i.low),
                        "ciHigh": interval.map(|i| i.high),
                    }),
                );
            }
            let comparison = deployment.challenger.as_deref().and_then(|challenger| {
                let (a, b) = (arm(&deployment.champion), arm(challenger));
                let w = welch(&a, &b, 0.95)?;
                Some(serde_json::json!({
                    "diff": w.diff,
                    "ciLow": w.low,
                    "ciHigh": w.high,
                    "pValue": w.p_value,
                    "pPromote": welch_one_sided(&a, &b, self.rule.threshold),
                    "level": self.rule.level(),
                    "looksTaken": deployment.looks_taken,
                    "nextLookAt": u64::from(deployment.looks_taken + 1) * self.rule.min_scored,
                }))
            });
            let promotions: Vec<&Decision> = deployment
                .decisions
                .iter()
                .filter(|d| d.outcome == Outcome::Promoted)
                .collect();
            report.insert(
                task_type.clone(),
                serde_json::json!({
                    "champion": deployment.champion,
                    "challenger": deployment.challenger,
                    "retired": deployment.retired,
                    "scored": scored,
                    "comparison": comparison,
                    "decisions": deployment.decisions,
                    "promotions": promotions,
                    "fleet": self.shared,
                }),
            );
        }
        Ok(Value::Object(report))
    }

    /// The deployment to go on with, given a saved one and the configured one.
    fn merge_saved(task_type: &str, saved: Deployment, configured: &Deployment) -> Deployment {
        let known = |h: &str| {
            h == saved.champion
                || saved.challenger.as_deref() == Some(h)
                || saved.retired.iter().any(|r| r == h)
        };
        if !known(&configured.champion) {
            tracing::warn!(%task_type, champion = %configured.champion, "the configuration names a champion the saved state never had; starting from the configuration");
            return Deployment {
                decisions: saved.decisions,
                ..configured.clone()
            };
        }
        match &configured.challenger {
            Some(challenger) if !known(challenger) => {
                tracing::info!(%task_type, champion = %saved.champion, %challenger, "a new challenger from the configuration: a new experiment begins");
                Deployment {
                    champion: saved.champion,
                    challenger: Some(challenger.clone()),
                    scored: BTreeMap::new(),
                    looks_taken: 0,
                    retired: saved.retired,
                    decisions: saved.decisions,
                    epoch: saved.epoch + 1,
                }
            }
            _ => saved,
        }
    }
}

impl Plugin for ChampionPlugin {
    type Config = Config;
    type State = Deployments;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "champion",
            env!("CARGO_PKG_VERSION"),
            "Champion/challenger routing per task type, promoting a challenger a sequential test shows better",
        )
    }

    fn create(config: Config) -> Result<Self, PluginError> {
        let mut configured = Deployments::new();
        for (task_type, tc) in config.task_types {
            let name = format!("taskTypes.{task_type}");
            if tc.champion.is_empty() {
                return Err(PluginError::new(format!(
                    "{name}.champion: must not be empty"
                )));
            }
            if tc.challenger.as_deref() == Some("") {
                return Err(PluginError::new(format!(
                    "{name}.challenger: must not be empty"
                )));
            }
            if tc.challenger.as_deref() == Some(tc.champion.as_str()) {
                return Err(PluginError::new(format!(
                    "{name}.challenger: must differ from the champion `{}`",
                    tc.champion
                )));
            }
            configured.insert(
                task_type,
                Deployment {
                    champion: tc.champion,
                    challenger: tc.challenger,
                    scored: BTreeMap::new(),
                    looks_taken: 0,
                    retired: Vec::new(),
                    decisions: Vec::new(),
                    epoch: 0,
                },
            );
        }
        let challenger_share = config.challenger_share.unwrap_or(0.2);
        if !challenger_share.is_finite() || !(0.0..=1.0).contains(&challenger_share) {
            return Err(PluginError::new(format!(
                "challengerShare: must be a number in 0..=1, found {challenger_share}"
            )));
        }
        let min_scored = config.min_scored.unwrap_or(50);
        if min_scored < 2 {
            return Err(PluginError::new(format!(
                "minScored: must be an integer >= 2 (a variance needs two scores), found {min_scored}"
            )));
        }
        let looks = config.looks.unwrap_or(5);
        if looks < 1 {
            return Err(PluginError::new("looks: must be an integer >= 1, found 0"));
        }
        let alpha = config.alpha.unwrap_or(0.05);
        if !alpha.is_finite() || alpha <= 0.0 || alpha >= 1.0 {
            return Err(PluginError::new(format!(
                "alpha: must be a number in (0, 1), found {alpha}"
            )));
        }
        let threshold = config.threshold.unwrap_or(0.02);
        if !threshold.is_finite() || threshold < 0.0 {
            return Err(PluginError::new(format!(
                "threshold: must be a number >= 0, found {threshold}"
            )));
        }
        if configured.is_empty() {
            tracing::warn!("no task types configured; route will answer nothing");
        }
        Ok(Self {
            challenger_share,
            rule: Rule {
                min_scored,
                looks,
                alpha,
                threshold,
            },
            state: Mutex::new(configured.clone()),
            deploy_keys: configured
                .keys()
                .map(|task_type| (task_type.clone(), Key::new(deploy_key(task_type))))
                .collect(),
            configured,
            pending: Mutex::new(Pending::default()),
            rng: Random::seeded(config.seed),
            shared: plugin_api::store::available(),
            versions: Mutex::new(BTreeMap::new()),
            arm_keys: Mutex::new(BTreeMap::new()),
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "route",
                "Routes a task: {\"taskType\", \"key\"?} -> {\"handler\", \"role\"} (null when not configured)",
                Self::route,
            )
            .method(
                "status",
                "Champion, challenger, per-arm means with 95% intervals, the comparison and decisions: {\"taskType\"?}",
                Self::status,
            );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on("task.scored", 40, HookMode::Audit, Self::on_scored);
        hooks.on("task.error", 40, HookMode::Audit, Self::on_error);
    }

    fn save_state(&self) -> Result<Option<Deployments>, PluginError> {
        Ok(Some(self.state_lock().clone()))
    }

    fn restore_state(&self, saved: Deployments) -> Result<(), PluginError> {
        let mut current = self.state_lock();
        for (task_type, mut deployment) in saved {
            let Some(configured) = self.configured.get(&task_type) else {
                tracing::warn!(%task_type, "saved deployment for a task type no longer configured; dropped");
                continue;
            };
            if let Some(problem) = deployment.problem() {
                tracing::warn!(%task_type, %problem, "saved deployment is inconsistent; dropped");
                continue;
            }
            if deployment.scored.values().any(|a| a.sum_sq.is_none()) {
                tracing::warn!(%task_type, "saved arms lack the sum of squares (an older version); their statistics restart");
                deployment.scored.clear();
                deployment.looks_taken = 0;
            }
            let deployment = Self::merge_saved(&task_type, deployment, configured);
            current.insert(task_type, deployment);
        }
        Ok(())
    }
}

export_plugin!(ChampionPlugin);

#[cfg(test)]
mod tests {
    use plugin_api::Harness;
    use serde_json::json;

    use super::*;

    fn config() -> Value {
        json!({
            "taskTypes": {"summarize": {"champion": "lead", "challenger": "title-match"}},
            "challengerShare": 0.5,
            "minScored": 20,
            "threshold": 0.05,
            "seed": 1,
        })
    }

    fn plugin(config: Value) -> ChampionPlugin {
        ChampionPlugin::create(serde_json::from_value(config).unwrap()).unwrap()
    }

    /// A scored task routed without a key: counted by the role in the payload.
    fn scored(p: &ChampionPlugin, handler: &str, score: f64) -> Option<Decision> {
        let role = if handler == p.state_lock()["summarize"].champion {
            "champion"
        } else {
            "challenger"
        };
        let payload = json!({"id": "t-1", "type": "summarize", "handler": handler,
            "variant": null, "experiment": null, "role": role, "score": score,
            "latency_ms": 0.4, "output_len": 12, "plugins_ms": {"champion": 0.01}});
        p.record_scored(serde_json::from_value(payload).unwrap())
    }

    fn route(p: &ChampionPlugin, key: Option<String>) -> Route {
        p.route(RouteParams {
            task_type: "summarize".into(),
            key,
        })
        .unwrap()
        .unwrap()
    }

    /// Feeds 20 champion scores (around 0.5), then 20 challenger scores (around 0.9).
    fn promote(p: &ChampionPlugin) -> Decision {
        for i in 0..20 {
            assert_eq!(scored(p, "lead", 0.45 + 0.1 * f64::from(i % 2)), None);
        }
        for i in 0..19 {
            assert_eq!(
                scored(p, "title-match", 0.85 + 0.1 * f64::from(i % 2)),
                None
            );
        }
        scored(p, "title-match", 0.95).unwrap()
    }

    #[test]
    fn better_challenger_is_promoted_at_the_first_look_and_the_slot_empties() {
        let p = plugin(config());
        let d = promote(&p);
        assert_eq!(d.outcome, Outcome::Promoted);
        assert_eq!((d.from.as_str(), d.to.as_str()), ("lead", "title-match"));
        assert!((d.challenger_mean - 0.9).abs() < 1e-9);
        assert!((d.champion_mean - 0.5).abs() < 1e-9);
        assert_eq!(d.look, Some(1));
        assert!(d.p_value.unwrap() < 0.01 && d.ci_low.unwrap() > 0.3);

        let status = p.status(None).unwrap();
        let s = &status["summarize"];
        assert_eq!(s["champion"], "title-match");
        assert_eq!(s["challenger"], Value::Null);
        assert_eq!(s["retired"], json!(["lead"]));
        assert_eq!(s["comparison"], Value::Null);
        assert_eq!(
            s["promotions"][0]["scored"],
            json!({"champion": 20, "challenger": 20})
        );
        // Every key now goes to the new champion; the old one is not scored any more.
        for i in 0..200 {
            let r = route(&p, Some(format!("doc-{i}")));
            assert_eq!(
                (r.handler.as_str(), r.role),
                ("title-match", Role::Champion)
            );
        }
        assert_eq!(scored(&p, "lead", 1.0), None);
        assert_eq!(p.state_lock()["summarize"].scored.get("lead"), None);
    }

    #[test]
    fn a_small_lead_is_kept_after_the_last_look() {
        let p = plugin(config());
        let mut decision = None;
        for i in 0..100 {
            let wobble = 0.1 * f64::from(i % 2);
            assert_eq!(scored(&p, "lead", 0.5 + wobble), None);
            decision = scored(&p, "title-match", 0.52 + wobble);
            if i < 99 {
                assert_eq!(decision, None, "decided after {i}");
            }
        }
        let d = decision.unwrap();
        assert_eq!((d.outcome, d.look), (Outcome::Kept, Some(5)));
        let s = &p.status(None).unwrap()["summarize"];
        assert_eq!(
            (&s["champion"], &s["challenger"], &s["retired"]),
            (&json!("lead"), &Value::Null, &json!(["title-match"]))
        );
    }

    #[test]
    fn only_routed_tasks_count_and_a_failure_scores_zero() {
        let p = plugin(config());
        let mut roles = BTreeMap::new();
        for i in 0..10 {
            let r = route(&p, Some(format!("t-{i}")));
            roles.insert(format!("t-{i}"), r);
        }
        let hook = |id: &str, handler: &str| {
            let payload = json!({"id": id, "type": "summarize", "handler": handler, "role": null, "score": 0.8});
            p.record_scored(serde_json::from_value(payload).unwrap())
        };
        // Not routed by us (no pending id, no role): skipped.
        hook("other", "lead");
        // Routed, but another handler ran: skipped.
        let (id, r) = roles.iter().next().unwrap();
        let other = if r.handler == "lead" {
            "title-match"
        } else {
            "lead"
        };
        hook(id, other);
        assert!(p.state_lock()["summarize"].scored.is_empty());
        // Routed and ran: counted, once.
        let (id, r) = roles.iter().nth(1).unwrap();
        hook(id, &r.handler);
        hook(id, &r.handler);
        assert_eq!(p.state_lock()["summarize"].arm(&r.handler).count, 1);
        // A failure of a routed task is a 0 for its handler; a block is not.
        let (id, _) = roles.iter().nth(2).unwrap();
        p.record_failed(FailedTask {
            id: Some(id.clone()),
            error: Some("handler failed".into()),
            ..FailedTask::default()
        });
        let (blocked, _) = roles.iter().nth(3).unwrap();
        p.record_failed(FailedTask {
            id: Some(blocked.clone()),
            error: Some("blocked: by policy".into()),
            ..FailedTask::default()
        });
        let total: u64 = p.state_lock()["summarize"]
            .scored
            .values()
            .map(|a| a.count)
            .sum();
        assert_eq!(total, 2, "one scored and one failed task");
        let sum: f64 = p.state_lock()["summarize"]
            .scored
            .values()
            .map(|a| a.sum)
            .sum();
        assert!((sum - 0.8).abs() < 1e-12, "the failure counts 0: {sum}");
    }

    #[test]
    fn the_chooser_says_whose_task_it_is() {
        let p = plugin(config());
        let count = |p: &ChampionPlugin| -> u64 {
            p.state_lock()["summarize"]
                .scored
                .values()
                .map(|a| a.count)
                .sum()
        };
        // Routed with a key, but a subscriber changed the handler: not ours.
        let r = route(&p, Some("changed".into()));
        let payload = json!({"id": "changed", "type": "summarize", "handler": r.handler,
            "chooser": "task.before_handle", "score": 0.8});
        p.record_scored(serde_json::from_value(payload).unwrap());
        assert_eq!(count(&p), 0);
        // Routed without a key: the chooser names us, no role needed.
        let r = route(&p, None);
        let payload = json!({"id": "keyless", "type": "summarize", "handler": r.handler,
            "chooser": "champion", "role": null, "score": 0.8});
        p.record_scored(serde_json::from_value(payload).unwrap());
        assert_eq!(count(&p), 1);
        // A keyless failure with the chooser and handler counts 0; another chooser's does not.
        let payload = json!({"id": "f", "type": "summarize", "handler": "lead",
            "chooser": "champion", "error": "handler lead failed"});
        p.record_failed(serde_json::from_value(payload).unwrap());
        let payload = json!({"id": "g", "type": "summarize", "handler": "lead",
            "chooser": "bandit", "error": "handler lead failed"});
        p.record_failed(serde_json::from_value(payload).unwrap());
        assert_eq!(count(&p), 2);
    }

    #[test]
    fn the_decision_survives_save_and_restore_and_a_new_challenger_starts_over() {
        let p = plugin(config());
        promote(&p);
        let state = p.save_state().unwrap().unwrap();

        let fresh = plugin(config());
        fresh.restore_state(state.clone()).unwrap();
        assert_eq!(fresh.save_state().unwrap().unwrap(), state);
        assert_eq!(fresh.status(None).unwrap(), p.status(None).unwrap());

        // The configuration names a new challenger: a new experiment against the new champion.
        let next = plugin(
            json!({"taskTypes": {"summarize": {"champion": "lead", "challenger": "plugin:echo"}}}),
        );
        next.restore_state(state.clone()).unwrap();
        let s = &next.status(None).unwrap()["summarize"];
        assert_eq!(s["champion"], "title-match");
        assert_eq!(s["challenger"], "plugin:echo");
        assert_eq!(s["decisions"].as_array().unwrap().len(), 1);
        // A retired handler named again does not come back.
        let again = plugin(
            json!({"taskTypes": {"summarize": {"champion": "title-match", "challenger": "lead"}}}),
        );
        again.restore_state(state.clone()).unwrap();
        assert_eq!(
            again.status(None).unwrap()["summarize"]["challenger"],
            Value::Null
        );
        // A champion the state never had: the configuration wins.
        let other = plugin(json!({"taskTypes": {"summarize": {"champion": "new"}}}));
        other.restore_state(state.clone()).unwrap();
        assert_eq!(other.status(None).unwrap()["summarize"]["champion"], "new");
        let none = plugin(json!({"taskTypes": {"chat": {"champion": "a", "challenger": "b"}}}));
        none.restore_state(state).unwrap();
        assert!(none.status(None).unwrap().get("summarize").is_none());

        let harness = Harness::<ChampionPlugin>::new(config()).unwrap();
        let err = harness.restore_state(r#""nonsense""#).unwrap_err();
        assert!(
            err.message().starts_with("the saved state does not fit"),
            "{err}"
        );
        let err = harness
            .restore_state(r#"{"summarize": {"champion": 1}}"#)
            .unwrap_err();
        assert!(err.message().contains("summarize.champion: "), "{err}");
    }

    #[test]
    fn a_state_of_the_older_shape_loads_with_its_statistics_reset() {
        let old = r#"{"summarize": {"champion": "title-match", "challenger": "lead",
            "scored": {"lead": {"count": 3, "scoreSum": 1.2}},
            "promotions": [{"taskType": "summarize", "from": "lead", "to": "title-match",
                "championMean": 0.4, "challengerMean": 0.9,
                "scored": {"champion": 40, "challenger": 41}}]}}"#;
        let harness = Harness::<ChampionPlugin>::new(config()).unwrap();
        harness.restore_state(old).unwrap();
        let s = &harness.call::<Value>("status", &()).unwrap()["summarize"];
        assert_eq!(s["champion"], "title-match");
        assert_eq!(s["scored"]["lead"]["count"], 0);
        assert_eq!(s["promotions"][0]["from"], "lead");
        assert_eq!(s["decisions"][0]["outcome"], "promoted");
    }

    #[test]
    fn keys_are_sticky() {
        let p = plugin(config());
        for i in 0..20 {
            let key = format!("user-{i}");
            let first = route(&p, Some(key.clone()));
            for _ in 0..50 {
                assert_eq!(route(&p, Some(key.clone())), first);
            }
        }
    }

    #[test]
    fn routing_without_a_key_follows_the_share() {
        let p = plugin(json!({
            "taskTypes": {"summarize": {"champion": "lead", "challenger": "title-match"}},
            "seed": 9,
        }));
        let challenger = (0..5000)
            .filter(|_| route(&p, None).role == Role::Challenger)
            .count();
        assert!(
            (800..1200).contains(&challenger),
            "challenger got {challenger} of 5000"
        );

        let solo = plugin(json!({"taskTypes": {"summarize": {"champion": "lead"}}}));
        for i in 0..100 {
            let r = route(&solo, Some(i.to_string()));
            assert_eq!((r.handler.as_str(), r.role), ("lead", Role::Champion));
        }
        let unknown = p
            .route(RouteParams {
                task_type: "chat".into(),
                key: None,
            })
            .unwrap();
        assert_eq!(unknown, None);
    }

    #[test]
    fn config_errors_name_the_field() {
        let tt = json!({"s": {"champion": "a", "challenger": "b"}});
        for (config, name) in [
            (
                json!({"taskTypes": tt, "challengerShare": 1.5}),
                "challengerShare",
            ),
            (
                json!({"taskTypes": tt, "challengerShare": "x"}),
                "challengerShare",
            ),
            (json!({"taskTypes": tt, "minScored": 1}), "minScored"),
            (json!({"taskTypes": tt, "minScored": -3}), "minScored"),
            (json!({"taskTypes": tt, "looks": 0}), "looks"),
            (json!({"taskTypes": tt, "alpha": 0}), "alpha"),
            (json!({"taskTypes": tt, "alpha": 1.5}), "alpha"),
            (json!({"taskTypes": tt, "threshold": -0.1}), "threshold"),
            (
                json!({"taskTypes": {"s": {"champion": "a", "challenger": "a"}}}),
                "taskTypes.s.challenger",
            ),
            (
                json!({"taskTypes": {"s": {"challenger": "a"}}}),
                "taskTypes.s",
            ),
            (
                json!({"taskTypes": {"s": {"champion": "a", "extra": 1}}}),
                "taskTypes.s",
            ),
            (
                json!({"taskTypes": {"s": {"champion": ""}}}),
                "taskTypes.s.champion",
            ),
            (json!({"taskTypes": [1]}), "taskTypes"),
            (json!({"share": 0.1}), "share"),
        ] {
            let err = Harness::<ChampionPlugin>::new(&config).unwrap_err();
            assert!(err.message().contains(name), "{config}: {err}");
        }
        assert!(Harness::<ChampionPlugin>::new(()).is_ok());
    }

    #[test]
    fn methods_and_hooks_speak_json() {
        let p = plugin(config());
        let mut methods = Methods::new();
        ChampionPlugin::methods(&mut methods);
        let mut hooks = Hooks::new();
        ChampionPlugin::hooks(&mut hooks);
        assert_eq!(hooks.subscriptions().len(), 2);
        assert!(
            hooks
                .subscriptions()
                .iter()
                .all(|s| s.mode == HookMode::Audit)
        );

        for payload in [
            json!(null),
            json!({}),
            json!({"type": "summarize", "handler": "lead", "score": null}),
            json!({"type": "summarize", "handler": "lead", "score": "0.4"}),
            json!({"type": "summarize", "handler": "lead", "score": 4.0}),
            json!({"type": "summarize", "handler": "other", "score": 0.4}),
            json!({"type": "chat", "handler": "lead", "score": 0.4}),
            json!({"type": "summarize", "handler": "lead", "score": 0.4, "role": "champion"}),
        ] {
            let r = hooks.run(&p, "task.scored", &payload.to_string()).unwrap();
            assert_eq!(r, HookResult::Continue);
        }
        for payload in [
            json!(null),
            json!({"id": 3}),
            json!({"id": "x", "error": "e"}),
        ] {
            let r = hooks.run(&p, "task.error", &payload.to_string()).unwrap();
            assert_eq!(r, HookResult::Continue);
        }

        let answer = methods
            .call(&p, "route", r#"{"taskType": "summarize", "key": "k"}"#)
            .unwrap()
            .unwrap();
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert!(
            answer["role"] == "champion" || answer["role"] == "challenger",
            "{answer}"
        );
        assert_eq!(
            methods
                .call(&p, "route", r#"{"taskType": "chat"}"#)
                .unwrap(),
            None
        );
        assert!(methods.call(&p, "route", r#"{"task": "chat"}"#).is_err());

        let status: Value = serde_json::from_str(
            &methods
                .call(&p, "status", r#"{"taskType": "summarize"}"#)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(status["summarize"]["scored"]["lead"]["count"], 1);
        assert_eq!(status["summarize"]["scored"]["lead"]["meanScore"], 0.4);
        assert_eq!(status["summarize"]["scored"]["lead"]["ciLow"], Value::Null);
        assert_eq!(status["summarize"]["comparison"], Value::Null);
        assert!(
            methods
                .call(&p, "status", r#"{"taskType": "chat"}"#)
                .is_err()
        );
    }
}
