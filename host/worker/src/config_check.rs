//! Mistakes in the plugin configuration said out loud: an entry for a plugin name that no
//! loaded or refused plugin has, and a hook override for a hook point that does not exist, are
//! ignored by the runtime; [`unknown_entries`] names each with the closest known name.

use plugin_host::{LoadErrorKind, PluginHost, PluginsConfig, Refusal};

/// The name a refusal is about, when the file got far enough to tell it.
fn refused_name(refusal: &Refusal) -> Option<&str> {
    match &refusal.kind {
        LoadErrorKind::AbiStableMismatch { plugin, .. }
        | LoadErrorKind::Disabled { plugin }
        | LoadErrorKind::DuplicateName { plugin, .. }
        | LoadErrorKind::CreateFailed { plugin, .. }
        | LoadErrorKind::CreatePanicked { plugin, .. }
        | LoadErrorKind::NamePinned { plugin, .. }
        | LoadErrorKind::NotLoaded { plugin } => Some(plugin),
        _ => None,
    }
}

/// The name of `known` closest to `name` by edit distance (Levenshtein); ties go to the first.
pub fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .min_by_key(|k| strsim::levenshtein(name, k))
}

/// One warning per configuration entry that names nothing known: `plugins.<name>` and the
/// plugins of `sets.<set>` against the names of the loaded and refused plugins, and
/// `plugins.<name>.hooks.<hook>` against the host's hook points. Each names the entry and the
/// closest known name.
pub fn unknown_entries(
    config: &PluginsConfig,
    plugins: &[String],
    hook_points: &[&str],
) -> Vec<String> {
    let mut warnings = Vec::new();
    let escape = plugin_host::text::escape_control;
    let suggest = |name: &str, known: &[&str]| match closest(name, known.iter().copied()) {
        Some(near) => format!("the closest known name is `{}`", escape(near)),
        None => "none is known".to_owned(),
    };
    let known: Vec<&str> = plugins.iter().map(String::as_str).collect();
    let mut check_plugin = |entry: String, name: &str| {
        if !known.contains(&name) {
            warnings.push(format!(
                "configuration entry {entry}: no loaded or refused plugin is named `{}`; {}. The entry has no effect",
                escape(name),
                suggest(name, &known)
            ));
        }
    };
    for name in config.plugins.keys() {
        check_plugin(format!("plugins.\"{}\"", escape(name)), name);
    }
    for (set, members) in &config.sets {
        for name in &members.plugins {
            check_plugin(
                format!("sets.\"{}\".plugins \"{}\"", escape(set), escape(name)),
                name,
            );
        }
    }
    for (plugin, settings) in &config.plugins {
        for hook in settings.hooks.keys() {
            if !hook_points.contains(&hook.as_str()) {
                warnings.push(format!(
                    "configuration entry plugins.\"{}\".hooks.\"{}\": there is no hook point `{}`; {}. The override has no effect (see `worker hooks`)",
                    escape(plugin),
                    escape(hook),
                    escape(hook),
                    suggest(hook, hook_points)
                ));
            }
        }
    }
    warnings
}

/// Logs a warning for each entry of `host`'s configuration file that names nothing known (see
/// [`unknown_entries`]); answers how many. A configuration that cannot be read is not checked
/// (loading said why).
pub fn warn_unknown_entries(host: &PluginHost) -> usize {
    let Ok(config) = PluginsConfig::read(host.config_file()) else {
        return 0;
    };
    let mut plugins: Vec<String> = host.plugins().into_iter().map(|p| p.name).collect();
    plugins.extend(
        host.refused()
            .iter()
            .filter_map(refused_name)
            .map(str::to_owned),
    );
    let points = host.hook_points();
    let points: Vec<&str> = points.iter().map(|p| p.name).collect();
    let warnings = unknown_entries(&config, &plugins, &points);
    for warning in &warnings {
        tracing::warn!(file = %plugin_host::text::EscapePath(host.config_file()), "{warning}");
    }
    warnings.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closest_name_is_by_edit_distance() {
        assert_eq!(
            closest("rate-limter", ["bandit", "rate-limiter", "champion"]),
            Some("rate-limiter")
        );
        assert_eq!(
            closest("task.scord", ["task.scored", "task.error"]),
            Some("task.scored")
        );
        assert_eq!(closest("x", []), None);
    }
}
