//! A plugin's `tracing` events on the host's subscriber, each with the plugin's name as its
//! target, so that a filter can raise or silence one plugin (`warn,rate_limiter=off`).
//!
//! `tracing` macros need a target known at compile time; a plugin's name is known at load. So
//! each (plugin name, level) gets its own callsite, made once and kept for the life of the
//! process (a few hundred bytes each; past [`MAX_TARGETS`] names, events use the target
//! `plugin`). Events are checked against the subscriber (`enabled`) and then dispatched, as the
//! macros do.

use std::sync::{Mutex, OnceLock};

use rustc_hash::FxHashMap;
use tracing::callsite::{Callsite, Identifier};
use tracing::field::{FieldSet, Value};
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata};

/// The most plugin names given a target of their own.
const MAX_TARGETS: usize = 1024;

const FIELDS: &[&str] = &["message", "plugin", "source"];

/// The callsite of one plugin's events at one level.
struct PluginCallsite {
    metadata: OnceLock<Metadata<'static>>,
}

impl Callsite for PluginCallsite {
    fn set_interest(&self, _: Interest) {
        // Not cached: every event asks the subscriber (`enabled`).
    }

    fn metadata(&self) -> &Metadata<'_> {
        self.metadata.get().unwrap_or_else(|| {
            unreachable!("a plugin callsite is shared only once its metadata is set")
        })
    }
}

type Callsites = FxHashMap<(Box<str>, Level), &'static PluginCallsite>;

fn callsite(target: &str, level: Level) -> &'static PluginCallsite {
    static CALLSITES: OnceLock<Mutex<Callsites>> = OnceLock::new();
    let mut callsites = CALLSITES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let target = if callsites.len() >= MAX_TARGETS * 5
        && !callsites.contains_key(&(Box::from(target), level))
    {
        "plugin"
    } else {
        target
    };
    if let Some(callsite) = callsites.get(&(Box::from(target), level)) {
        return callsite;
    }
    let callsite: &'static PluginCallsite = Box::leak(Box::new(PluginCallsite {
        metadata: OnceLock::new(),
    }));
    let name: &'static str = Box::leak(format!("event from plugin {target}").into_boxed_str());
    let leaked_target: &'static str = Box::leak(Box::from(target));
    let _ = callsite.metadata.set(Metadata::new(
        name,
        leaked_target,
        level,
        Some(file!()),
        Some(line!()),
        Some(module_path!()),
        FieldSet::new(FIELDS, Identifier(callsite)),
        Kind::EVENT,
    ));
    tracing::callsite::register(callsite);
    callsites.insert((Box::from(target), level), callsite);
    callsite
}

/// Emits `message` from plugin `plugin` (escaped text) at `level`, with the plugin's own
/// `tracing` target as the field `source`.
pub(crate) fn emit(plugin: &str, level: Level, source: &dyn Value, message: &dyn Value) {
    let metadata = callsite(plugin, level).metadata();
    if !tracing::dispatcher::get_default(|dispatch| dispatch.enabled(metadata)) {
        return;
    }
    let fields = metadata.fields();
    let (Some(message_field), Some(plugin_field), Some(source_field)) = (
        fields.field("message"),
        fields.field("plugin"),
        fields.field("source"),
    ) else {
        return;
    };
    let plugin = format_args!("{plugin}");
    let values = [
        (&message_field, Some(message)),
        (&plugin_field, Some(&plugin as &dyn Value)),
        (&source_field, Some(source)),
    ];
    Event::dispatch(metadata, &fields.value_set(&values));
}
