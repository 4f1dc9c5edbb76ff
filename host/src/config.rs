//! The plugin configuration file: which plugins load, and the configuration each receives.
//!
//! A JSON object keyed by plugin name (the name in the plugin's manifest, not the file name):
//!
//! ```json
//! {
//!   "experiment": { "config": { "experiments": { "tone": { "variants": { "A": 1, "B": 1 } } } } },
//!   "echo": { "enabled": false }
//! }
//! ```
//!
//! `enabled` defaults to `true`, `config` to `null`. Plugins the file does not name load with no
//! configuration.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::Value;

/// File name of the configuration file inside the plugins directory.
pub const CONFIG_FILE_NAME: &str = "plugins.json";

/// Settings of one plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    /// Whether the plugin loads at all.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// What the plugin's `create` receives.
    #[serde(default)]
    pub config: Value,
}

impl Default for PluginSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            config: Value::Null,
        }
    }
}

fn enabled_by_default() -> bool {
    true
}

/// The whole file: settings per plugin name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct PluginsConfig {
    /// Settings per plugin name.
    pub plugins: BTreeMap<String, PluginSettings>,
}

impl PluginsConfig {
    /// Reads the file; a file that does not exist is an empty configuration.
    ///
    /// # Errors
    ///
    /// The file cannot be read or is not valid: the message names the file, the line and the
    /// field.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading the plugin configuration {}", path.display())
                });
            }
        };
        Self::parse(&text).with_context(|| {
            format!(
                "invalid plugin configuration {}; expected {{\"<plugin>\": {{\"enabled\": true, \"config\": ...}}}}",
                path.display()
            )
        })
    }

    /// Parses the JSON text of a configuration file.
    ///
    /// # Errors
    ///
    /// The text is not a valid configuration; the message gives line, column and field.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(serde_json::from_str(text)?)
    }

    /// The settings of `plugin` (the defaults when the file does not name it).
    pub fn settings(&self, plugin: &str) -> PluginSettings {
        self.plugins.get(plugin).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_missing_fields_and_plugins() {
        let config =
            PluginsConfig::parse(r#"{"a": {"config": {"x": 1}}, "b": {"enabled": false}}"#)
                .unwrap();
        assert!(config.settings("a").enabled);
        assert_eq!(config.settings("a").config, serde_json::json!({"x": 1}));
        assert!(!config.settings("b").enabled);
        assert_eq!(config.settings("c"), PluginSettings::default());
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = PluginsConfig::parse(r#"{"a": {"enable": false}}"#).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("unknown field `enable`"), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn missing_file_is_empty_and_bad_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE_NAME);
        assert_eq!(
            PluginsConfig::read(&path).unwrap(),
            PluginsConfig::default()
        );
        std::fs::write(&path, "{ not json").unwrap();
        let message = format!("{:#}", PluginsConfig::read(&path).unwrap_err());
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
}
