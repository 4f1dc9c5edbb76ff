//! The plugin configuration file: which plugins load, the configuration each receives, hook
//! overrides, and plugin sets.
//!
//! ```json
//! {
//!   "plugins": {
//!     "experiment": {
//!       "config": { "experiments": { "tone": { "variants": { "A": 1, "B": 1 } } } },
//!       "hooks": { "task.scored": { "priority": 5, "mode": "audit" } }
//!     },
//!     "echo": { "enabled": false }
//!   },
//!   "sets": {
//!     "tuning": { "plugins": ["bandit", "champion"], "enabled": true, "priority": 20 }
//!   }
//! }
//! ```
//!
//! - `plugins` is keyed by plugin name (the name in the plugin's manifest, not the file name).
//!   `enabled` defaults to `true`, `config` to `null`. Plugins the file does not name load with
//!   no configuration.
//! - `hooks` overrides a plugin's subscriptions by hook name: `priority`, `mode`, `timeoutMs`
//!   (the deadline of one delivery), or `"enabled": false` to switch the subscription off.
//! - `breaker` configures the plugin's circuit breaker: `{"failures": 5, "cooldownMs": 30000}`
//!   (the defaults), or `false` to switch it off. `timeoutMs` is the deadline of one call (the
//!   host's default, 10 s, when absent).
//! - `isolation`: `"process"` runs the plugin in a child process of its own (a crash or an
//!   overrun ends the child, not the host), `"in-process"` in the host's (the default, unless
//!   the host sets another). `memoryLimitMb` limits an isolated plugin's memory; `restarts`
//!   (`{"max": 3, "windowSec": 300}`, the defaults) is its crash-loop limit.
//! - `callTimingSample` (top level): the host times about one call in this many of each method and
//!   hook point (a power of two; 16 by default, 1 times every call), read when it is built.
//! - `sets` groups plugins: a set with `"enabled": false` disables all its plugins; a set's
//!   `priority` applies to all their subscriptions (a plugin's own `hooks` override wins).

use crate::text::EscapePath;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use plugin_api::HookMode;
use serde::Deserialize;
use serde_json::Value;

/// File name of the configuration file inside the plugins directory.
pub const CONFIG_FILE_NAME: &str = "plugins.json";

/// The largest configuration file read (4 MiB).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Settings of one plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    /// Whether the plugin loads at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// What the plugin's `create` receives.
    #[serde(default)]
    pub config: Value,
    /// Overrides of the plugin's hook subscriptions, by hook name.
    #[serde(default)]
    pub hooks: BTreeMap<String, HookOverride>,
    /// Pins the plugin's name to one file in the plugins directory (its file name, such as
    /// `libecho.so`): only that file may provide the plugin, and another file claiming the name
    /// is refused instead of making both refused.
    #[serde(default)]
    pub file: Option<String>,
    /// The plugin's circuit breaker: `{"failures": N, "cooldownMs": M}` (each optional), `true`
    /// for the defaults, `false` to switch it off.
    #[serde(default, deserialize_with = "breaker")]
    pub breaker: Breaker,
    /// The deadline of one call, in milliseconds (`timeoutMs`); the host's default when absent.
    #[serde(default, rename = "timeoutMs", deserialize_with = "timeout")]
    pub timeout_ms: Option<u64>,
    /// Where the plugin runs (`isolation`: `"process"` or `"in-process"`); the host's default
    /// when absent.
    #[serde(default, deserialize_with = "isolation")]
    pub isolation: Option<crate::Isolation>,
    /// The memory limit of an isolated plugin's process, in MiB (`memoryLimitMb`).
    #[serde(default, rename = "memoryLimitMb", deserialize_with = "memory_limit")]
    pub memory_limit_mb: Option<u64>,
    /// The crash-loop limit of an isolated plugin (`restarts`: `{"max": 3, "windowSec": 300}`).
    #[serde(default)]
    pub restarts: Option<crate::RestartPolicy>,
}

impl Default for PluginSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            config: Value::Null,
            hooks: BTreeMap::new(),
            file: None,
            breaker: Breaker::default(),
            timeout_ms: None,
            isolation: None,
            memory_limit_mb: None,
            restarts: None,
        }
    }
}

/// A plugin's circuit breaker: after `failures` failures in a row (errors, panics, calls past
/// their deadline) calls are refused at once for `cooldown_ms`; then one trial call goes through,
/// and its success closes the breaker again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// No breaker: the plugin is always called.
    Off,
    /// A breaker with these limits.
    On {
        /// Consecutive failures that open it (at least 1; default 5).
        failures: u32,
        /// How long it stays open before a trial call, in milliseconds (default 30000).
        cooldown_ms: u64,
    },
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::On {
            failures: crate::health::DEFAULT_FAILURES,
            cooldown_ms: crate::health::DEFAULT_COOLDOWN_MS,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BreakerLimits {
    failures: Option<u32>,
    cooldown_ms: Option<u64>,
}

fn breaker<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Breaker, D::Error> {
    use serde::de::Error as _;
    match Value::deserialize(d)? {
        Value::Bool(false) => Ok(Breaker::Off),
        Value::Bool(true) => Ok(Breaker::default()),
        limits @ Value::Object(_) => {
            let limits: BreakerLimits = serde_json::from_value(limits)
                .map_err(|e| D::Error::custom(format!("breaker: {e}")))?;
            let failures = limits.failures.unwrap_or(crate::health::DEFAULT_FAILURES);
            if failures == 0 {
                return Err(D::Error::custom(
                    "breaker.failures must be at least 1 (use \"breaker\": false to switch the breaker off)",
                ));
            }
            Ok(Breaker::On {
                failures,
                cooldown_ms: limits
                    .cooldown_ms
                    .unwrap_or(crate::health::DEFAULT_COOLDOWN_MS),
            })
        }
        other => Err(D::Error::custom(format!(
            "breaker: expected {{\"failures\": N, \"cooldownMs\": M}}, true or false, found {other}"
        ))),
    }
}

fn timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(serde::de::Error::custom(
            "timeoutMs must be at least 1 (milliseconds)",
        )),
        ms => Ok(Some(ms)),
    }
}

fn isolation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<crate::Isolation>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("isolation: {e}")))
}

fn memory_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match u64::deserialize(d)? {
        mb @ 16.. => Ok(Some(mb)),
        mb => Err(serde::de::Error::custom(format!(
            "memoryLimitMb: {mb} MiB is too little for a process; give at least 16"
        ))),
    }
}

/// An override of one hook subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookOverride {
    /// `false` switches the subscription off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Replaces the priority the plugin declared.
    pub priority: Option<i32>,
    /// Replaces the mode the plugin declared.
    pub mode: Option<HookMode>,
    /// The deadline of one delivery to this subscription, in milliseconds (`timeoutMs`); the
    /// plugin's when absent.
    #[serde(default, rename = "timeoutMs", deserialize_with = "timeout")]
    pub timeout_ms: Option<u64>,
}

/// A named group of plugins configured as one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSet {
    /// The plugins in the set, by name.
    pub plugins: Vec<String>,
    /// `false` disables every plugin of the set.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Priority for every hook subscription of the set's plugins.
    pub priority: Option<i32>,
}

fn yes() -> bool {
    true
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Settings per plugin name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginSettings>,
    /// Plugin sets by name.
    #[serde(default)]
    pub sets: BTreeMap<String, PluginSet>,
    /// The shared store's URL (`sqlite://PATH`, `redis://HOST:PORT/DB` or `none`), for an
    /// embedder that offers one; a command-line setting wins.
    #[serde(default)]
    pub store: Option<String>,
    /// How often the store is flushed and refreshed, in milliseconds.
    #[serde(default, rename = "storeFlushMs")]
    pub store_flush_ms: Option<u64>,
    /// One call in this many is timed for the latency statistics (`callTimingSample`: a power
    /// of two from 1 to 65536); read when the host is built, and a builder's
    /// [`with_call_timing_sample`](crate::PluginHostBuilder::with_call_timing_sample) wins.
    #[serde(
        default,
        rename = "callTimingSample",
        deserialize_with = "call_timing_sample"
    )]
    pub call_timing_sample: Option<u32>,
}

fn call_timing_sample<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    // Any JSON value, so that every refusal (a negative, a fraction, text, null) names the
    // field and the value, not only serde's type.
    let value = serde_json::Value::deserialize(d)?;
    match value.as_u64().map(u32::try_from) {
        Some(Ok(sample)) if crate::stats::valid_timing_sample(sample) => Ok(Some(sample)),
        _ => Err(serde::de::Error::custom(format!(
            "callTimingSample: {value} is not a power of two from 1 to {}; give a whole number without quotes, 1 to time every call, or 16 (the default) to time about one in 16",
            crate::stats::MAX_TIMING_SAMPLE
        ))),
    }
}

impl PluginsConfig {
    /// Reads the file; a file that does not exist is an empty configuration.
    ///
    /// Only a regular file of at most [`MAX_CONFIG_BYTES`] is read. A symbolic link is followed
    /// (configuration is often linked into place), but what it ends at must be such a file: a
    /// FIFO, a device or a directory is refused without blocking and without being read.
    ///
    /// # Errors
    ///
    /// The file is not a regular file, is too big, cannot be read or is not valid: the message
    /// names the file, and the line and the field where they apply.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = match crate::files::read_regular(
            path,
            MAX_CONFIG_BYTES,
            crate::files::Symlinks::Follow,
        ) {
            Ok(bytes) => bytes,
            Err(crate::files::FileError::NotFound) => return Ok(Self::default()),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "refusing the plugin configuration {}: {e}",
                    EscapePath(path)
                ));
            }
        };
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "invalid plugin configuration {}: it is not UTF-8 text ({})",
                EscapePath(path),
                e.utf8_error()
            )
        })?;
        Self::parse(&text).with_context(|| {
            format!(
                "invalid plugin configuration {}; expected {{\"plugins\": {{\"<plugin>\": {{\"enabled\": true, \"config\": ...}}}}, \"sets\": {{...}}}}",
                EscapePath(path)
            )
        })
    }

    /// Parses the JSON text of a configuration file.
    ///
    /// # Errors
    ///
    /// The text is not a valid configuration; the message gives line, column and field.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Self = serde_json::from_str(text)?;
        for (name, set) in &config.sets {
            if set.plugins.is_empty() {
                anyhow::bail!("sets.{name}.plugins: a set needs at least one plugin");
            }
        }
        Ok(config)
    }

    /// The settings of `plugin` (the defaults when the file does not name it), with its sets
    /// applied: a plugin in a disabled set is disabled.
    pub fn settings(&self, plugin: &str) -> PluginSettings {
        let mut settings = self.plugins.get(plugin).cloned().unwrap_or_default();
        if self.sets_of(plugin).any(|set| !set.enabled) {
            settings.enabled = false;
        }
        settings
    }

    fn sets_of<'a>(&'a self, plugin: &'a str) -> impl Iterator<Item = &'a PluginSet> + 'a {
        self.sets
            .values()
            .filter(move |set| set.plugins.iter().any(|p| p == plugin))
    }

    /// The priority and mode in force for `plugin`'s subscription to `hook`, given what the
    /// plugin declared; `None` when the configuration switches it off.
    pub fn hook_settings(
        &self,
        settings: &PluginSettings,
        plugin: &str,
        hook: &str,
        declared: (i32, HookMode),
    ) -> Option<(i32, HookMode)> {
        let set_priority = self.sets_of(plugin).find_map(|set| set.priority);
        let (mut priority, mut mode) = declared;
        if let Some(p) = set_priority {
            priority = p;
        }
        if let Some(o) = settings.hooks.get(hook) {
            if !o.enabled {
                return None;
            }
            priority = o.priority.unwrap_or(priority);
            mode = o.mode.unwrap_or(mode);
        }
        Some((priority, mode))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_missing_fields_and_plugins() {
        let config = PluginsConfig::parse(
            r#"{"plugins": {"a": {"config": {"x": 1}}, "b": {"enabled": false}}}"#,
        )
        .unwrap();
        assert!(config.settings("a").enabled);
        assert_eq!(config.settings("a").config, serde_json::json!({"x": 1}));
        assert!(!config.settings("b").enabled);
        assert_eq!(config.settings("c"), PluginSettings::default());
    }

    #[test]
    fn breaker_and_timeout_settings() {
        let config = PluginsConfig::parse(
            r#"{"plugins": {"a": {"breaker": {"failures": 2, "cooldownMs": 50}, "timeoutMs": 200},
                "b": {"breaker": false}, "c": {"breaker": {"cooldownMs": 7}}}}"#,
        )
        .unwrap();
        let a = config.settings("a");
        assert_eq!(
            a.breaker,
            Breaker::On {
                failures: 2,
                cooldown_ms: 50
            }
        );
        assert_eq!(a.timeout_ms, Some(200));
        assert_eq!(config.settings("b").breaker, Breaker::Off);
        assert_eq!(
            config.settings("c").breaker,
            Breaker::On {
                failures: 5,
                cooldown_ms: 7
            }
        );
        assert_eq!(config.settings("d").breaker, Breaker::default());
        assert_eq!(config.settings("d").timeout_ms, None);
        for bad in [
            r#"{"plugins": {"a": {"breaker": {"failures": 0}}}}"#,
            r#"{"plugins": {"a": {"breaker": {"failure": 3}}}}"#,
            r#"{"plugins": {"a": {"breaker": "off"}}}"#,
            r#"{"plugins": {"a": {"timeoutMs": 0}}}"#,
        ] {
            let message = format!("{:#}", PluginsConfig::parse(bad).unwrap_err());
            assert!(
                message.contains("breaker") || message.contains("timeoutMs"),
                "{bad}: {message}"
            );
        }
    }

    #[test]
    fn the_call_timing_sample_is_a_power_of_two() {
        let config = PluginsConfig::parse(r#"{"callTimingSample": 64}"#).unwrap();
        assert_eq!(config.call_timing_sample, Some(64));
        assert_eq!(PluginsConfig::parse("{}").unwrap().call_timing_sample, None);
        for bad in [
            "0",
            "12",
            "131072",
            "4294967296",
            "-1",
            "16.0",
            "\"16\"",
            "null",
            "[16]",
        ] {
            let text = format!(r#"{{"callTimingSample": {bad}}}"#);
            let message = format!("{:#}", PluginsConfig::parse(&text).unwrap_err());
            assert!(
                message.contains("callTimingSample")
                    && message.contains(bad)
                    && message.contains("give"),
                "{bad}: {message}"
            );
            assert!(message.contains("line 1"), "{bad}: {message}");
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = PluginsConfig::parse(r#"{"plugins": {"a": {"enable": false}}}"#).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("unknown field `enable`"), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn sets_disable_and_reprioritise_their_plugins() {
        let config = PluginsConfig::parse(
            r#"{
                "plugins": {"a": {"hooks": {"task.scored": {"priority": 1}, "task.error": {"enabled": false}}}},
                "sets": {"s": {"plugins": ["a", "b"], "priority": 50}, "off": {"plugins": ["c"], "enabled": false}}
            }"#,
        )
        .unwrap();
        assert!(!config.settings("c").enabled);
        assert!(config.settings("b").enabled);
        let a = config.settings("a");
        let declared = (10, HookMode::Sequential);
        assert_eq!(
            config.hook_settings(&a, "a", "task.scored", declared),
            Some((1, HookMode::Sequential))
        );
        assert_eq!(
            config.hook_settings(&a, "a", "task.received", declared),
            Some((50, HookMode::Sequential))
        );
        assert_eq!(config.hook_settings(&a, "a", "task.error", declared), None);
        let d = config.settings("d");
        assert_eq!(
            config.hook_settings(&d, "d", "task.scored", declared),
            Some(declared)
        );
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
