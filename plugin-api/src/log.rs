//! The logging bridge: a plugin's `tracing` events reach the host's subscriber.
//!
//! Each `cdylib` links its own copy of `tracing` with its own global dispatcher, so without this
//! a plugin's `info!` would go nowhere. At create the plugin installs [`Bridge`] as its global
//! subscriber; the bridge formats each event and hands it to the host's log callback.

use std::fmt::{self, Write as _};

use abi_stable::std_types::RStr;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::abi::{HostApiRef, HostContext, level};

/// The host's functions and the context to pass back to them, for this library's instance.
///
/// `Send` and `Sync` (it lives in a `static` and in the global subscriber): see the crate's
/// `export` module, which holds this crate's `unsafe`.
#[derive(Clone, Copy)]
pub(crate) struct HostLink {
    api: HostApiRef,
    context: HostContext,
}

static HOST: std::sync::OnceLock<HostLink> = std::sync::OnceLock::new();

struct Bridge {
    log: extern "C" fn(HostContext, u8, RStr<'_>, RStr<'_>),
    link: HostLink,
    max_level: LevelFilter,
}

pub(crate) fn install(host: HostApiRef, context: HostContext, max_level: u8) {
    let link = HostLink { api: host, context };
    // A second `create` in the same library keeps the first link (and the first bridge).
    let _ = HOST.set(link);
    let max_level = match max_level {
        level::ERROR => LevelFilter::ERROR,
        level::WARN => LevelFilter::WARN,
        level::INFO => LevelFilter::INFO,
        level::DEBUG => LevelFilter::DEBUG,
        level::TRACE => LevelFilter::TRACE,
        _ => LevelFilter::OFF,
    };
    let bridge = Bridge {
        log: host.log(),
        link,
        max_level,
    };
    // Fails only if this library already has a global subscriber (a second `create` in the same
    // library), in which case the first bridge keeps serving.
    let _ = tracing::subscriber::set_global_default(bridge);
}

fn level_number(level: Level) -> u8 {
    match level {
        Level::ERROR => level::ERROR,
        Level::WARN => level::WARN,
        Level::INFO => level::INFO,
        Level::DEBUG => level::DEBUG,
        Level::TRACE => level::TRACE,
    }
}

/// Writes `message` first, then the other fields as `name=value`.
#[derive(Default)]
struct Formatter {
    message: String,
    fields: String,
}

impl Visit for Formatter {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }
}

impl Subscriber for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max_level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max_level)
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        // Spans are not forwarded; every span shares one id.
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = Formatter::default();
        event.record(&mut text);
        text.message.push_str(&text.fields);
        let metadata = event.metadata();
        (self.log)(
            self.link.context,
            level_number(*metadata.level()),
            RStr::from_str(metadata.target()),
            RStr::from_str(&text.message),
        );
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

pub(crate) fn call_plugin(
    plugin: &str,
    method: &str,
    params: &serde_json::Value,
) -> Result<Option<serde_json::Value>, crate::PluginError> {
    use abi_stable::std_types::{RErr, RNone, ROk, RSome};
    let link = HOST.get().ok_or_else(|| {
        crate::PluginError::new("not loaded by a host: call_plugin works only inside a plugin")
    })?;
    let call = link
        .api
        .call()
        .ok_or_else(|| crate::PluginError::new("this host is older than plugin-to-plugin calls"))?;
    let params = if params.is_null() {
        String::new()
    } else {
        params.to_string()
    };
    match call(
        link.context,
        RStr::from_str(plugin),
        RStr::from_str(method),
        RStr::from_str(&params),
    ) {
        ROk(RNone) => Ok(None),
        ROk(RSome(json)) => serde_json::from_str(json.as_str()).map(Some).map_err(|e| {
            crate::PluginError::new(format!("{plugin}.{method} answered invalid JSON: {e}"))
        }),
        RErr(e) => Err(crate::PluginError {
            kind: e.kind,
            message: e.message.into_string(),
        }),
    }
}

/// The generation of the host's store cache: `None` when there is no host, no store, or the
/// host is older than the generation.
pub(crate) fn store_generation() -> Option<u64> {
    #[cfg(feature = "__fixture_table_v1")]
    {
        None
    }
    #[cfg(not(feature = "__fixture_table_v1"))]
    {
        let link = HOST.get()?;
        let generation = link.api.store_generation()?;
        Some(generation(link.context)).filter(|g| *g != 0)
    }
}

/// Tells the host this plugin keeps its additions past the end of the call (see
/// `HostApi::store_hold`): `true` when the host will ask for them, `false` (hand them over now)
/// when it will not or is older than the hold (table version 7).
pub(crate) fn store_hold() -> bool {
    #[cfg(any(feature = "__fixture_table_v1", feature = "__fixture_table_v6"))]
    {
        false
    }
    #[cfg(not(any(feature = "__fixture_table_v1", feature = "__fixture_table_v6")))]
    {
        HOST.get().is_some_and(|link| {
            link.api
                .store_hold()
                .is_some_and(|store_hold| store_hold(link.context))
        })
    }
}

/// Whether the host takes additions in batches (table version 6).
pub(crate) fn has_store_batch() -> bool {
    #[cfg(feature = "__fixture_table_v1")]
    {
        false
    }
    #[cfg(not(feature = "__fixture_table_v1"))]
    {
        HOST.get()
            .is_some_and(|link| link.api.store_batch().is_some())
    }
}

/// Hands a batch of additions to the host's store (see `HostApi::store_batch`): `Ok(None)`
/// when there is no host, the host takes no batches, or it has no store.
pub(crate) fn store_batch(batch: &[u8]) -> Result<Option<String>, crate::PluginError> {
    #[cfg(feature = "__fixture_table_v1")]
    {
        let _ = batch;
        Ok(None)
    }
    #[cfg(not(feature = "__fixture_table_v1"))]
    {
        use abi_stable::std_types::{RErr, RNone, ROk, RSlice, RSome};
        let Some(link) = HOST.get() else {
            return Ok(None);
        };
        let Some(store_batch) = link.api.store_batch() else {
            return Ok(None);
        };
        match store_batch(link.context, RSlice::from_slice(batch)) {
            ROk(RNone) => Ok(None),
            ROk(RSome(answer)) => Ok(Some(answer.into_string())),
            RErr(e) => Err(crate::PluginError {
                kind: e.kind,
                message: e.message.into_string(),
            }),
        }
    }
}

/// Sends an operation to the host's store: `Ok(None)` when there is no host, the host is older
/// than the store, or it has no store.
pub(crate) fn store_call(op: &str, args: &str) -> Result<Option<String>, crate::PluginError> {
    #[cfg(feature = "__fixture_table_v1")]
    {
        let _ = (op, args);
        Ok(None)
    }
    #[cfg(not(feature = "__fixture_table_v1"))]
    {
        use abi_stable::std_types::{RErr, RNone, ROk, RSome};
        let Some(link) = HOST.get() else {
            return Ok(None);
        };
        let Some(store) = link.api.store() else {
            return Ok(None);
        };
        match store(link.context, RStr::from_str(op), RStr::from_str(args)) {
            ROk(RNone) => Ok(None),
            ROk(RSome(json)) => Ok(Some(json.into_string())),
            RErr(e) => Err(crate::PluginError {
                kind: e.kind,
                message: e.message.into_string(),
            }),
        }
    }
}
