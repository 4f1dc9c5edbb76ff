//! `champion`: champion/challenger deployment per task type, with automatic promotion.
//!
//! The pattern it serves: `route = execute("champion", "route", {...})`, then run
//! `route.handler` (or the caller's default when the answer is `null`). Scores come back through
//! the `task.scored` hook; when the challenger proves better, it becomes the champion.
//!
//! # Configuration
//!
//! ```json
//! {
//!   "taskTypes": { "summarize": { "champion": "lead", "challenger": "title-match" } },
//!   "challengerShare": 0.2,
//!   "minScored": 50,
//!   "threshold": 0.02,
//!   "seed": 7
//! }
//! ```
//!
//! - `taskTypes`: task type → its `champion` handler and (optionally) its `challenger`; the two
//!   must differ. Without a challenger every task goes to the champion.
//! - `challengerShare` (default 0.2): the share of traffic, in 0..=1, sent to the challenger.
//! - `minScored` (default 50, at least 1): scored tasks each side needs before a promotion.
//! - `threshold` (default 0.02, >= 0): how much the challenger's mean score must exceed the
//!   champion's for a promotion.
//! - `seed` (optional): seeds the random routing of calls without a key.
//!
//! # Methods
//!
//! - `route {"taskType", "key"?}` → `{"handler", "role": "champion" | "challenger"}`, or `null`
//!   for a task type not configured. The same key always gets the same role (sticky); without a
//!   key the pick is random with the challenger share.
//! - `status {"taskType"?}` → per task type: `{"champion", "challenger", "scored": {handler:
//!   {"count", "meanScore"}}, "promotions": [{"taskType", "from", "to", "championMean",
//!   "challengerMean", "scored": {"champion", "challenger"}}]}`.
//!
//! # Hooks
//!
//! - `task.scored` (audit, priority 40): a payload whose `type` is configured, whose `handler` is
//!   the current champion or challenger and whose `score` is a number in 0..=1 is counted. Once
//!   both sides have `minScored` scores and the challenger's mean beats the champion's by more
//!   than `threshold`, they swap roles (the old champion becomes the challenger and can win
//!   back), the counters restart from zero and the promotion is recorded. Always continues.
//!
//! The deployment (who is champion, counters, promotions) survives hot reloads and restarts
//! (`save_state` / `restore_state`): a saved decision replaces the configured one for task types
//! still configured with the same two handlers.

#![forbid(unsafe_code)]

use plugin_api::assign::{Random, stable_hash, unit};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, Value, export_plugin,
};
use serde::{Deserialize, Serialize};

/// The plugin's configuration (see the crate docs). A field that is absent or `null` takes
/// its default.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Task type → its champion and challenger.
    pub task_types: BTreeMap<String, TaskTypeConfig>,
    /// The challenger's share of traffic (default 0.2).
    pub challenger_share: Option<f64>,
    /// Scored tasks each side needs before a promotion (default 50).
    pub min_scored: Option<u64>,
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

/// Score count and sum of one handler.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counter {
    /// Scored tasks.
    pub count: u64,
    /// Sum of their scores.
    pub score_sum: f64,
}

impl Counter {
    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.score_sum / self.count as f64)
    }
}

/// How many scored tasks each side had when a promotion happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionCounts {
    /// The old champion's scored tasks.
    pub champion: u64,
    /// The old challenger's (the new champion's) scored tasks.
    pub challenger: u64,
}

/// One promotion: the challenger `to` replaced the champion `from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    /// The task type.
    pub task_type: String,
    /// The champion that lost its place.
    pub from: String,
    /// The challenger that took it.
    pub to: String,
    /// The old champion's mean score.
    pub champion_mean: f64,
    /// The old challenger's mean score.
    pub challenger_mean: f64,
    /// Scored tasks per side.
    pub scored: PromotionCounts,
}

/// The deployment of one task type: also the shape of the saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// The handler most traffic goes to.
    pub champion: String,
    /// The handler that gets the challenger share, if any.
    pub challenger: Option<String>,
    /// Counters of the current champion and challenger since the last promotion.
    #[serde(default)]
    pub scored: BTreeMap<String, Counter>,
    /// Past promotions, oldest first.
    #[serde(default)]
    pub promotions: Vec<Promotion>,
}

impl Deployment {
    fn handlers(&self) -> BTreeSet<&str> {
        std::iter::once(self.champion.as_str())
            .chain(self.challenger.as_deref())
            .collect()
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
            return Some(format!("counter for `{handler}`, which is neither side"));
        }
        if self.scored.values().any(|c| !c.score_sum.is_finite()) {
            return Some("a score sum is not finite".to_owned());
        }
        None
    }
}

/// The state carried over a reload.
pub type Deployments = BTreeMap<String, Deployment>;

/// The plugin instance.
#[derive(Debug)]
pub struct ChampionPlugin {
    challenger_share: f64,
    min_scored: u64,
    threshold: f64,
    /// The configured task types and their initial deployments (also the keys of `state`).
    configured: Deployments,
    state: Mutex<Deployments>,
    rng: Random,
}

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
    #[serde(
        rename = "type",
        default,
        deserialize_with = "plugin_api::lenient::text"
    )]
    task_type: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::text")]
    handler: Option<String>,
    #[serde(default, deserialize_with = "plugin_api::lenient::number")]
    score: Option<f64>,
}

impl ChampionPlugin {
    fn state_lock(&self) -> std::sync::MutexGuard<'_, Deployments> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
        Ok(Some(route))
    }

    /// Counts one scored task; answers the promotion it caused, if any.
    fn record_scored(&self, task: ScoredTask) -> Option<Promotion> {
        let (Some(task_type), Some(handler), Some(score)) =
            (task.task_type, task.handler, task.score)
        else {
            return None;
        };
        let mut state = self.state_lock();
        let deployment = state.get_mut(&task_type)?;
        if handler != deployment.champion && deployment.challenger.as_ref() != Some(&handler) {
            return None;
        }
        if !score.is_finite() || !(0.0..=1.0).contains(&score) {
            tracing::warn!(%task_type, %handler, score, "task.scored: score outside 0..=1; skipped");
            return None;
        }
        let counter = deployment.scored.entry(handler).or_default();
        counter.count += 1;
        counter.score_sum += score;
        let challenger = deployment.challenger.clone()?;

        let champion = deployment
            .scored
            .get(&deployment.champion)
            .cloned()
            .unwrap_or_default();
        let contender = deployment
            .scored
            .get(&challenger)
            .cloned()
            .unwrap_or_default();
        if champion.count < self.min_scored || contender.count < self.min_scored {
            return None;
        }
        let (Some(champion_mean), Some(challenger_mean)) = (champion.mean(), contender.mean())
        else {
            return None;
        };
        if challenger_mean <= champion_mean + self.threshold {
            return None;
        }
        let promotion = Promotion {
            task_type: task_type.clone(),
            from: deployment.champion.clone(),
            to: challenger.clone(),
            champion_mean,
            challenger_mean,
            scored: PromotionCounts {
                champion: champion.count,
                challenger: contender.count,
            },
        };
        deployment.challenger = Some(std::mem::replace(&mut deployment.champion, challenger));
        deployment.scored.clear();
        deployment.promotions.push(promotion.clone());
        drop(state);
        tracing::info!(
            task_type = %promotion.task_type,
            from = %promotion.from,
            to = %promotion.to,
            champion_mean = promotion.champion_mean,
            challenger_mean = promotion.challenger_mean,
            "challenger promoted to champion"
        );
        Some(promotion)
    }

    fn on_scored(&self, task: Option<ScoredTask>) -> Result<HookResult, PluginError> {
        let task = task.unwrap_or_default();
        self.record_scored(task);
        Ok(HookResult::Continue)
    }

    fn status(&self, p: Option<StatusParams>) -> Result<Value, PluginError> {
        let only = p.unwrap_or_default().task_type;
        if let Some(task_type) = &only {
            if !self.configured.contains_key(task_type) {
                return Err(self.unknown_task_type(task_type));
            }
        }
        let state = self.state_lock();
        let mut report = serde_json::Map::new();
        for (task_type, deployment) in state.iter() {
            if only.as_ref().is_some_and(|o| o != task_type) {
                continue;
            }
            let mut scored = serde_json::Map::new();
            for handler in deployment.handlers() {
                let c = deployment.scored.get(handler).cloned().unwrap_or_default();
                scored.insert(
                    handler.to_owned(),
                    serde_json::json!({ "count": c.count, "meanScore": c.mean() }),
                );
            }
            report.insert(
                task_type.clone(),
                serde_json::json!({
                    "champion": deployment.champion,
                    "challenger": deployment.challenger,
                    "scored": scored,
                    "promotions": deployment.promotions,
                }),
            );
        }
        Ok(Value::Object(report))
    }
}

impl Plugin for ChampionPlugin {
    type Config = Config;
    type State = Deployments;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "champion",
            env!("CARGO_PKG_VERSION"),
            "Champion/challenger routing per task type, promoting a challenger that scores better",
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
                    promotions: Vec::new(),
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
        if min_scored < 1 {
            return Err(PluginError::new(
                "minScored: must be an integer >= 1, found 0",
            ));
        }
        let threshold = config.threshold.unwrap_or(0.02);
        if !threshold.is_finite() || threshold < 0.0 {
            return Err(PluginError::new(format!(
                "threshold: must be a number >= 0, found {threshold}"
            )));
        }
        let seed = config.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        if configured.is_empty() {
            tracing::warn!("no task types configured; route will answer nothing");
        }
        Ok(Self {
            challenger_share,
            min_scored,
            threshold,
            state: Mutex::new(configured.clone()),
            configured,
            rng: Random::new(seed),
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
                "Champion, challenger, score counters and promotions: {\"taskType\"?}",
                Self::status,
            );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        hooks.on("task.scored", 40, HookMode::Audit, Self::on_scored);
    }

    fn save_state(&self) -> Result<Option<Deployments>, PluginError> {
        Ok(Some(self.state_lock().clone()))
    }

    fn restore_state(&self, saved: Deployments) -> Result<(), PluginError> {
        let mut current = self.state_lock();
        for (task_type, deployment) in saved {
            let Some(configured) = self.configured.get(&task_type) else {
                tracing::warn!(%task_type, "saved deployment for a task type no longer configured; dropped");
                continue;
            };
            if let Some(problem) = deployment.problem() {
                tracing::warn!(%task_type, %problem, "saved deployment is inconsistent; dropped");
                continue;
            }
            if deployment.handlers() != configured.handlers() {
                tracing::warn!(
                    %task_type,
                    saved = ?deployment.handlers(),
                    configured = ?configured.handlers(),
                    "configured handlers changed since the state was saved; using the configuration"
                );
                continue;
            }
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

    fn scored(p: &ChampionPlugin, handler: &str, score: f64) -> Option<Promotion> {
        let payload = json!({"id": "t-1", "type": "summarize", "handler": handler,
            "variant": null, "experiment": null, "role": null, "score": score,
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

    /// Feeds 20 champion scores (0.5), then 20 challenger scores (0.9).
    fn promote(p: &ChampionPlugin) -> Promotion {
        for _ in 0..20 {
            assert_eq!(scored(p, "lead", 0.5), None);
        }
        for _ in 0..19 {
            assert_eq!(scored(p, "title-match", 0.9), None);
        }
        scored(p, "title-match", 0.9).unwrap()
    }

    #[test]
    fn better_challenger_is_promoted_and_routed_to() {
        let p = plugin(config());
        let promotion = promote(&p);
        assert_eq!(
            (promotion.from.as_str(), promotion.to.as_str()),
            ("lead", "title-match")
        );
        assert!((promotion.challenger_mean - 0.9).abs() < 1e-9);
        assert!((promotion.champion_mean - 0.5).abs() < 1e-9);

        let status = p.status(None).unwrap();
        let s = &status["summarize"];
        assert_eq!(s["champion"], "title-match");
        assert_eq!(s["challenger"], "lead");
        assert_eq!(s["scored"]["lead"], json!({"count": 0, "meanScore": null}));
        assert_eq!(
            s["promotions"][0]["scored"],
            json!({"champion": 20, "challenger": 20})
        );

        // The champion role now means the new champion; with a share of 0.5, half the keys.
        let mut champion = 0;
        for i in 0..1000 {
            let r = route(&p, Some(format!("doc-{i}")));
            match r.role {
                Role::Champion => {
                    assert_eq!(r.handler, "title-match");
                    champion += 1;
                }
                Role::Challenger => assert_eq!(r.handler, "lead"),
            }
        }
        assert!(
            (400..600).contains(&champion),
            "champion got {champion} of 1000"
        );
    }

    #[test]
    fn a_small_lead_or_too_few_scores_does_not_promote() {
        let p = plugin(config());
        for _ in 0..100 {
            assert_eq!(scored(&p, "lead", 0.5), None);
            assert_eq!(scored(&p, "title-match", 0.54), None);
        }
        let p = plugin(config());
        for _ in 0..100 {
            assert_eq!(scored(&p, "title-match", 0.9), None);
        }
        for _ in 0..19 {
            assert_eq!(scored(&p, "lead", 0.5), None);
        }
        assert!(scored(&p, "lead", 0.5).is_some());
    }

    #[test]
    fn the_old_champion_can_win_back() {
        let p = plugin(config());
        promote(&p);
        for _ in 0..20 {
            assert_eq!(scored(&p, "title-match", 0.2), None);
        }
        for _ in 0..19 {
            assert_eq!(scored(&p, "lead", 0.7), None);
        }
        let back = scored(&p, "lead", 0.7).unwrap();
        assert_eq!(
            (back.from.as_str(), back.to.as_str()),
            ("title-match", "lead")
        );
        assert_eq!(
            p.status(None).unwrap()["summarize"]["promotions"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn promotion_survives_save_and_restore() {
        let p = plugin(config());
        promote(&p);
        scored(&p, "lead", 0.4);
        let state = p.save_state().unwrap().unwrap();

        let fresh = plugin(config());
        fresh.restore_state(state.clone()).unwrap();
        assert_eq!(fresh.save_state().unwrap().unwrap(), state);
        assert_eq!(fresh.status(None).unwrap(), p.status(None).unwrap());
        assert_eq!(
            fresh.status(None).unwrap()["summarize"]["champion"],
            "title-match"
        );

        // Task types no longer configured, and changed handlers, keep the configuration.
        let other =
            plugin(json!({"taskTypes": {"summarize": {"champion": "lead", "challenger": "new"}}}));
        other.restore_state(state.clone()).unwrap();
        assert_eq!(other.status(None).unwrap()["summarize"]["champion"], "lead");
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
            (json!({"taskTypes": tt, "minScored": 0}), "minScored"),
            (json!({"taskTypes": tt, "minScored": -3}), "minScored"),
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
    fn methods_and_hook_speak_json() {
        let p = plugin(config());
        let mut methods = Methods::new();
        ChampionPlugin::methods(&mut methods);
        let mut hooks = Hooks::new();
        ChampionPlugin::hooks(&mut hooks);
        assert_eq!(hooks.subscriptions()[0].mode, HookMode::Audit);
        assert_eq!(hooks.subscriptions()[0].priority, 40);

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
        assert_eq!(
            status,
            json!({"summarize": {
                "champion": "lead",
                "challenger": "title-match",
                "scored": {
                    "lead": {"count": 1, "meanScore": 0.4},
                    "title-match": {"count": 0, "meanScore": null},
                },
                "promotions": [],
            }})
        );
        assert!(
            methods
                .call(&p, "status", r#"{"taskType": "chat"}"#)
                .is_err()
        );
    }
}
