//! `task-policy`: per-task-type profiles from the configuration: how long an answer may be, how
//! verbose, and which handlers may serve the type.
//!
//! # Configuration
//!
//! ```json
//! {
//!   "profiles": {
//!     "summarize": { "maxWords": 40, "verbosity": "short", "handlers": ["lead", "title-match"] },
//!     "chat": { "verbosity": "full" }
//!   },
//!   "default": { "maxWords": 200 }
//! }
//! ```
//!
//! Every profile field is optional:
//!
//! - `maxWords`: an integer `>= 1`.
//! - `verbosity`: a string.
//! - `handlers`: a non-empty list of handler names, the handler family allowed for the type.
//!
//! An unknown or invalid field is an error naming its path, e.g. `profiles.summarize.maxWrds`.
//!
//! # Methods
//!
//! - `selectProfile {"taskType"}` → the type's profile merged over `default` (a field the type's
//!   profile leaves out comes from `default`), e.g. `{"maxWords": 40, "verbosity": "short",
//!   "handlers": ["lead", "title-match"]}`; absent fields are left out. `null` when neither the
//!   type nor `default` has a profile.
//! - `profiles` → the profiles as configured: `{"profiles": {..}, "default": {..} | null}`.
//!
//! The plugin keeps no state.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use plugin_api::{Methods, NoState, Plugin, PluginError, PluginInfo, Value, export_plugin};
use serde::{Deserialize, Serialize};

/// One task type's profile; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Profile {
    /// The longest answer, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_words: Option<u64>,
    /// How verbose answers should be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verbosity: Option<String>,
    /// The handlers allowed for the type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handlers: Option<Vec<String>>,
}

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Task type → its profile.
    pub profiles: Option<BTreeMap<String, Profile>>,
    /// What a type's profile falls back to.
    pub default: Option<Profile>,
}

impl Profile {
    /// What the types alone do not check; `path` names the profile in errors.
    fn check(&self, path: &str) -> Result<(), PluginError> {
        if self.max_words == Some(0) {
            return Err(PluginError::new(format!(
                "{path}.maxWords: must be an integer >= 1, found 0"
            )));
        }
        if let Some(handlers) = &self.handlers {
            if handlers.is_empty() {
                return Err(PluginError::new(format!(
                    "{path}.handlers: needs at least one handler"
                )));
            }
            if let Some(i) = handlers.iter().position(String::is_empty) {
                return Err(PluginError::new(format!(
                    "{path}.handlers[{i}]: must be a non-empty handler name"
                )));
            }
        }
        Ok(())
    }

    /// This profile with the fields it lacks taken from `base`.
    fn over(&self, base: &Profile) -> Profile {
        Profile {
            max_words: self.max_words.or(base.max_words),
            verbosity: self.verbosity.clone().or_else(|| base.verbosity.clone()),
            handlers: self.handlers.clone().or_else(|| base.handlers.clone()),
        }
    }
}

/// The plugin instance.
#[derive(Debug, Default)]
pub struct TaskPolicy {
    profiles: BTreeMap<String, Profile>,
    default: Option<Profile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SelectParams {
    task_type: String,
}

/// `profiles` takes no params: `null` or `{}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

impl TaskPolicy {
    fn select(&self, p: SelectParams) -> Result<Option<Profile>, PluginError> {
        let chosen = match (self.profiles.get(&p.task_type), &self.default) {
            (Some(own), Some(default)) => Some(own.over(default)),
            (Some(own), None) => Some(own.clone()),
            (None, Some(default)) => Some(default.clone()),
            (None, None) => None,
        };
        tracing::debug!(task_type = %p.task_type, found = chosen.is_some(), "profile selected");
        Ok(chosen)
    }

    fn configured(&self, _: Option<NoParams>) -> Result<Value, PluginError> {
        Ok(serde_json::json!({
            "profiles": self.profiles,
            "default": self.default,
        }))
    }
}

impl Plugin for TaskPolicy {
    type Config = Config;
    type State = NoState;

    fn info() -> PluginInfo {
        PluginInfo::new(
            "task-policy",
            env!("CARGO_PKG_VERSION"),
            "Per-task-type profiles (max words, verbosity, allowed handlers) from configuration",
        )
    }

    fn create(config: Config) -> Result<Self, PluginError> {
        let policy = TaskPolicy {
            profiles: config.profiles.unwrap_or_default(),
            default: config.default,
        };
        for (task_type, profile) in &policy.profiles {
            profile.check(&format!("profiles.{task_type}"))?;
        }
        if let Some(default) = &policy.default {
            default.check("default")?;
        }
        if policy.profiles.is_empty() && policy.default.is_none() {
            tracing::warn!("no profiles configured; selectProfile will answer nothing");
        }
        Ok(policy)
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .method(
                "selectProfile",
                "The profile of a task type merged over the default: {\"taskType\"}",
                Self::select,
            )
            .method(
                "profiles",
                "The configured profiles: {\"profiles\": {..}, \"default\"}",
                Self::configured,
            );
    }
}

export_plugin!(TaskPolicy);

#[cfg(test)]
mod tests {
    use plugin_api::Harness;
    use serde_json::json;

    use super::*;

    fn plugin(config: Value) -> Harness<TaskPolicy> {
        Harness::new(config).unwrap()
    }

    fn select(p: &Harness<TaskPolicy>, task_type: &str) -> Value {
        let profile = p
            .plugin()
            .select(SelectParams {
                task_type: task_type.into(),
            })
            .unwrap();
        serde_json::to_value(profile).unwrap()
    }

    #[test]
    fn the_type_profile_is_merged_over_the_default() {
        let p = plugin(json!({
            "profiles": {
                "summarize": {"maxWords": 40, "handlers": ["lead", "title-match"]},
                "chat": {}
            },
            "default": {"maxWords": 200, "verbosity": "full"}
        }));
        assert_eq!(
            select(&p, "summarize"),
            json!({"maxWords": 40, "verbosity": "full", "handlers": ["lead", "title-match"]})
        );
        assert_eq!(
            select(&p, "chat"),
            json!({"maxWords": 200, "verbosity": "full"})
        );
        assert_eq!(
            select(&p, "echo"),
            json!({"maxWords": 200, "verbosity": "full"})
        );
    }

    #[test]
    fn nothing_configured_answers_null() {
        for config in [
            Value::Null,
            json!({}),
            json!({"profiles": {"chat": {"maxWords": 5}}}),
        ] {
            let p = plugin(config);
            assert_eq!(select(&p, "summarize"), Value::Null);
        }
        let p = plugin(json!({"profiles": {"chat": {"verbosity": "short"}}}));
        assert_eq!(select(&p, "chat"), json!({"verbosity": "short"}));
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (
                json!({"profiles": {"summarize": {"maxWrds": 40}}}),
                "profiles.summarize.maxWrds",
            ),
            (
                json!({"profiles": {"summarize": {"maxWords": 0}}}),
                "profiles.summarize.maxWords",
            ),
            (
                json!({"profiles": {"chat": {"maxWords": 2.5}}}),
                "profiles.chat.maxWords",
            ),
            (
                json!({"profiles": {"chat": {"verbosity": 3}}}),
                "profiles.chat.verbosity",
            ),
            (
                json!({"profiles": {"chat": {"handlers": []}}}),
                "profiles.chat.handlers",
            ),
            (
                json!({"profiles": {"chat": {"handlers": ["a", 1]}}}),
                "profiles.chat.handlers[1]",
            ),
            (json!({"profiles": {"chat": 3}}), "profiles.chat"),
            (json!({"default": {"extra": true}}), "default.extra"),
            (json!({"profile": {}}), "profile"),
        ];
        for (config, path) in cases {
            let err = Harness::<TaskPolicy>::new(&config).unwrap_err();
            assert!(err.message().contains(path), "{config}: {err}");
        }
    }

    #[test]
    fn profiles_lists_the_configuration() {
        let p = plugin(json!({"profiles": {"summarize": {"maxWords": 40}}}));
        let listed: Value = p.call("profiles", &()).unwrap();
        assert_eq!(
            listed,
            json!({"profiles": {"summarize": {"maxWords": 40}}, "default": null})
        );
    }
}
