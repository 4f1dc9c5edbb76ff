//! Typed configuration and state: the JSON text that crosses the boundary becomes the plugin's
//! own types here, and a value that does not fit is refused with the path of the bad field.

use std::fmt;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{PluginError, Value};

/// The [`Plugin::Config`](crate::Plugin::Config) of a plugin that takes no configuration.
/// Whatever configuration it is given is accepted and ignored.
///
/// A plugin that wants a configuration it was not meant to get refused says
/// `type Config = ();` instead: `()` accepts only an absent configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoConfig;

/// The [`Plugin::State`](crate::Plugin::State) of a plugin that keeps no state across a
/// reload. A state saved by an earlier version of the plugin is accepted and ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoState;

macro_rules! ignores_any_json {
    ($ty:ident) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                IgnoredAny::deserialize(d).map(|_| $ty)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_unit()
            }
        }
    };
}

ignores_any_json!(NoConfig);
ignores_any_json!(NoState);

/// What is being read, for the error message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reading {
    Config,
    State,
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reading::Config => "the configuration",
            Reading::State => "the saved state",
        })
    }
}

/// The plugin's configuration from the JSON text the host passes to `create`: empty text or
/// `null` (no configuration) gives `C::default()`.
pub(crate) fn config<C: DeserializeOwned + Default>(text: &str) -> Result<C, PluginError> {
    match parse(text, Reading::Config)? {
        Value::Null => Ok(C::default()),
        value => fit(value, Reading::Config),
    }
}

/// The state a previous generation saved, from its JSON text.
pub(crate) fn state<S: DeserializeOwned>(text: &str) -> Result<S, PluginError> {
    fit(parse(text, Reading::State)?, Reading::State)
}

fn parse(text: &str, what: Reading) -> Result<Value, PluginError> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).map_err(|e| PluginError::new(format!("{what} is not JSON: {e}")))
}

/// Reads `value` as a `T`; a misfit names the path of the field, e.g.
/// `experiments.tone.variants.A: invalid type: string "x", expected f64`.
///
/// Read from a parsed [`Value`] rather than the text: positions in text the host wrote are of
/// no use to the person who wrote the configuration file, and the path says where to look.
fn fit<T: DeserializeOwned>(value: Value, what: Reading) -> Result<T, PluginError> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| PluginError::new(format!("{what} does not fit: {e}")))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, rename_all = "camelCase", deny_unknown_fields)]
    struct Settings {
        experiments: std::collections::BTreeMap<String, Experiment>,
        share: f64,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Experiment {
        variants: std::collections::BTreeMap<String, f64>,
    }

    #[test]
    fn absent_configuration_is_the_default() {
        assert_eq!(config::<Settings>("").unwrap(), Settings::default());
        assert_eq!(config::<Settings>("null").unwrap(), Settings::default());
        assert_eq!(config::<Settings>("{}").unwrap(), Settings::default());
        config::<()>("").unwrap();
        config::<NoConfig>(r#"{"anything": [1]}"#).unwrap();
        assert_eq!(config::<Option<Settings>>("").unwrap(), None);
    }

    #[test]
    fn a_bad_field_is_named_by_its_path() {
        let e = config::<Settings>(r#"{"experiments": {"tone": {"variants": {"A": "x"}}}}"#)
            .unwrap_err();
        assert_eq!(
            e.message(),
            r#"the configuration does not fit: experiments.tone.variants.A: invalid type: string "x", expected f64"#
        );
        let e = config::<Settings>(r#"{"shares": 1}"#).unwrap_err();
        assert!(e.message().contains("unknown field `shares`"), "{e}");
        let e = config::<()>(r#"{"a": 1}"#).unwrap_err();
        assert!(
            e.message().starts_with("the configuration does not fit"),
            "{e}"
        );
        let e = config::<Settings>("{nope").unwrap_err();
        assert!(
            e.message().starts_with("the configuration is not JSON"),
            "{e}"
        );
    }

    #[test]
    fn state_is_read_the_same_way() {
        let s: Vec<u32> = state("[1, 2]").unwrap();
        assert_eq!(s, [1, 2]);
        let e = state::<Vec<u32>>("[1, -2]").unwrap_err();
        assert!(
            e.message()
                .starts_with("the saved state does not fit: [1]: "),
            "{e}"
        );
        state::<NoState>(r#"{"old": "format"}"#).unwrap();
    }
}
