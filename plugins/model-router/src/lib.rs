//! `model-router`: chooses the handler ("model") for each task from rules in the configuration.
//!
//! # Configuration
//!
//! ```json
//! {
//!   "rules": [
//!     { "taskType": "chat", "minInputWords": 40, "handler": "recall" },
//!     { "taskType": "summarize", "handler": "title-match" },
//!     { "taskType": "echo", "handler": "plugin:echo" }
//!   ]
//! }
//! ```
//!
//! A rule matches a task when every condition it has holds:
//!
//! - `taskType` (optional): the task's type equals it.
//! - `minInputWords`, `maxInputWords` (optional, integers `>= 0`, inclusive): the task's
//!   `inputWords` lies within them. A rule with a bound never matches a task whose `inputWords`
//!   is not given.
//! - `handler` (required): the handler the rule chooses.
//!
//! Rules are tried in order; the first that matches wins. An invalid rule is an error naming
//! it, e.g. `rules[2].handler`.
//!
//! # Methods
//!
//! - `chooseModel {"taskType", "inputWords"?, "handlers"?: ["recall", "lead"]}` → the handler of
//!   the first matching rule, or `null` when none matches. With `handlers`, rules whose handler
//!   is not in the list are skipped. Each decision is counted for the rule that made it.
//! - `rules` → the rules as configured, each with `matched`: how many decisions it made,
//!   e.g. `[{"taskType": "chat", "minInputWords": 40, "handler": "recall", "matched": 3}]`.
//!
//! The plugin keeps no state: the counts start again at a reload.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use plugin_api::{Methods, NoState, Plugin, PluginError, PluginInfo, Value, export_plugin};
use serde::{Deserialize, Serialize};

/// One routing rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// The task type it applies to (any when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    /// The fewest input words (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_input_words: Option<u64>,
    /// The most input words (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_input_words: Option<u64>,
    /// The handler it chooses.
    pub handler: String,
}

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The rules, tried in order.
    pub rules: Option<Vec<Rule>>,
}

impl Rule {
    /// What the types alone do not check; `path` names the rule in errors.
    fn check(&self, path: &str) -> Result<(), PluginError> {
        if self.task_type.as_deref() == Some("") {
            return Err(PluginError::new(format!(
                "{path}.taskType: must be a non-empty string"
            )));
        }
        if self.handler.is_empty() {
            return Err(PluginError::new(format!(
                "{path}.handler: must be a non-empty string"
            )));
        }
        if let (Some(min), Some(max)) = (self.min_input_words, self.max_input_words)
            && min > max
        {
            return Err(PluginError::new(format!(
                "{path}.maxInputWords: {max} is below minInputWords {min}; no task could match"
            )));
        }
        Ok(())
    }

    /// Whether every condition of the rule holds for the task.
    fn matches(&self, task_type: &str, input_words: Option<u64>) -> bool {
        if self.task_type.as_deref().is_some_and(|t| t != task_type) {
            return false;
        }
        let within = |bound: Option<u64>, holds: fn(u64, u64) -> bool| match bound {
            None => true,
            Some(bound) => input_words.is_some_and(|words| holds(words, bound)),
        };
        within(self.min_input_words, |words, min| words >= min)
            && within(self.max_input_words, |words, max| words <= max)
    }
}

/// The plugin instance.
#[derive(Debug, Default)]
pub struct ModelRouter {
    rules: Vec<Rule>,
    /// Decisions per rule, same order as `rules`.
    matched: Vec<AtomicU64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ChooseParams {
    task_type: String,
    input_words: Option<u64>,
    handlers: Option<Vec<String>>,
}

/// `rules` takes no params: `null` or `{}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// A rule with its count, as `rules` answers.
#[derive(Debug, Serialize)]
struct RuleReport<'a> {
    #[serde(flatten)]
    rule: &'a Rule,
    matched: u64,
}

impl ModelRouter {
    fn choose(&self, p: ChooseParams) -> Result<Option<String>, PluginError> {
        let candidate = |rule: &Rule| {
            p.handlers
                .as_ref()
                .is_none_or(|allowed| allowed.contains(&rule.handler))
        };
        let chosen = self
            .rules
            .iter()
            .zip(&self.matched)
            .find(|(rule, _)| candidate(rule) && rule.matches(&p.task_type, p.input_words));
        match chosen {
            Some((rule, count)) => {
                count.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(task_type = %p.task_type, handler = %rule.handler, "model chosen");
                Ok(Some(rule.handler.clone()))
            }
            None => {
                tracing::debug!(task_type = %p.task_type, "no rule matches");
                Ok(None)
            }
        }
    }

    fn list(&self, _: Option<NoParams>) -> Result<Value, PluginError> {
        let report: Vec<RuleReport<'_>> = self
            .rules
            .iter()
            .zip(&self.matched)
            .map(|(rule, count)| RuleReport {
                rule,
                matched: count.load(Ordering::Relaxed),
            })
            .collect();
        Ok(serde_json::to_value(report)?)
    }
}

impl Plugin for ModelRouter {
    type Config = Config;
    type State = NoState;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "model-router",
            env!("CARGO_PKG_VERSION"),
            "Chooses the handler for each task from ordered rules (task type, input size)",
        )
    }

    fn create(config: Config) -> Result<Self, PluginError> {
        let rules = config.rules.unwrap_or_default();
        for (i, rule) in rules.iter().enumerate() {
            rule.check(&format!("rules[{i}]"))?;
        }
        if rules.is_empty() {
            tracing::warn!("no rules configured; chooseModel will answer nothing");
        }
        let matched = rules.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Self { rules, matched })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "chooseModel",
                "The handler of the first matching rule: {\"taskType\", \"inputWords\"?, \"handlers\"?}",
                Self::choose,
            )
            .method(
                "rules",
                "The rules, each with how many decisions it made",
                Self::list,
            );
    }
}

export_plugin!(ModelRouter);

#[cfg(test)]
mod tests {
    use plugin_api::Harness;
    use serde_json::json;

    use super::*;

    fn plugin(config: Value) -> ModelRouter {
        let config: Option<Config> = serde_json::from_value(config).unwrap();
        ModelRouter::create(config.unwrap_or_default()).unwrap()
    }

    fn example() -> ModelRouter {
        plugin(json!({"rules": [
            {"taskType": "chat", "minInputWords": 40, "handler": "recall"},
            {"taskType": "chat", "minInputWords": 10, "maxInputWords": 39, "handler": "short-chat"},
            {"taskType": "summarize", "handler": "title-match"},
            {"taskType": "summarize", "handler": "lead"},
            {"handler": "plugin:echo", "taskType": "echo"}
        ]}))
    }

    fn choose(
        router: &ModelRouter,
        task_type: &str,
        input_words: Option<u64>,
        handlers: Option<&[&str]>,
    ) -> Option<String> {
        router
            .choose(ChooseParams {
                task_type: task_type.into(),
                input_words,
                handlers: handlers.map(|h| h.iter().map(|s| (*s).to_owned()).collect()),
            })
            .unwrap()
    }

    #[test]
    fn first_match_wins() {
        let r = example();
        assert_eq!(
            choose(&r, "summarize", None, None).as_deref(),
            Some("title-match")
        );
        assert_eq!(
            choose(&r, "echo", Some(3), None).as_deref(),
            Some("plugin:echo")
        );
        let any = plugin(json!({"rules": [{"handler": "a"}, {"handler": "b"}]}));
        assert_eq!(choose(&any, "x", None, None).as_deref(), Some("a"));
    }

    #[test]
    fn bounds_are_inclusive() {
        let r = example();
        assert_eq!(
            choose(&r, "chat", Some(40), None).as_deref(),
            Some("recall")
        );
        assert_eq!(
            choose(&r, "chat", Some(39), None).as_deref(),
            Some("short-chat")
        );
        assert_eq!(
            choose(&r, "chat", Some(10), None).as_deref(),
            Some("short-chat")
        );
        assert_eq!(choose(&r, "chat", Some(9), None), None);
        // A bound cannot hold without inputWords.
        assert_eq!(choose(&r, "chat", None, None), None);
    }

    #[test]
    fn candidates_filter_the_rules() {
        let r = example();
        assert_eq!(
            choose(&r, "summarize", None, Some(&["lead", "recall"])).as_deref(),
            Some("lead")
        );
        assert_eq!(choose(&r, "summarize", None, Some(&["recall"])), None);
        assert_eq!(choose(&r, "summarize", None, Some(&[])), None);
    }

    #[test]
    fn nothing_matching_answers_null() {
        assert_eq!(choose(&example(), "translate", Some(100), None), None);
        assert_eq!(choose(&plugin(Value::Null), "chat", Some(100), None), None);
    }

    #[test]
    fn rules_report_their_decisions() {
        let r = example();
        choose(&r, "summarize", None, None);
        choose(&r, "summarize", None, None);
        choose(&r, "chat", Some(50), None);
        choose(&r, "nothing", None, None);
        let listed = r.list(None).unwrap();
        assert_eq!(
            listed[0],
            json!({"taskType": "chat", "minInputWords": 40, "handler": "recall", "matched": 1})
        );
        assert_eq!(listed[1]["matched"], 0);
        assert_eq!(listed[2]["matched"], 2);
        assert_eq!(listed.as_array().unwrap().len(), 5);
    }

    #[test]
    fn config_errors_name_the_rule() {
        let cases = [
            (
                json!({"rules": [{"handler": "a"}, {"taskType": "chat"}]}),
                "rules[1]: missing field `handler`",
            ),
            (json!({"rules": [{"handler": ""}]}), "rules[0].handler"),
            (
                json!({"rules": [{"handler": "a", "taskType": ""}]}),
                "rules[0].taskType",
            ),
            (
                json!({"rules": [{"handler": "a", "minInputWords": -1}]}),
                "rules[0].minInputWords",
            ),
            (
                json!({"rules": [{"handler": "a", "maxInputWords": 1.5}]}),
                "rules[0].maxInputWords",
            ),
            (
                json!({"rules": [{"handler": "a", "minInputWords": 5, "maxInputWords": 4}]}),
                "rules[0].maxInputWords",
            ),
            (
                json!({"rules": [{"handler": "a"}, {"handler": "b", "tasktype": "x"}]}),
                "rules[1].tasktype",
            ),
            (
                json!({"rules": [{"handler": "a", "taskType": 3}]}),
                "rules[0].taskType",
            ),
            (json!({"rules": ["a"]}), "rules[0]"),
            (json!({"rules": {}}), "rules"),
            (json!({"rule": []}), "rule"),
        ];
        for (config, path) in cases {
            let err = Harness::<ModelRouter>::new(&config).unwrap_err();
            assert!(err.message().contains(path), "{config}: {err}");
        }
    }
}
