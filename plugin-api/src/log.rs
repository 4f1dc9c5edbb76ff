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

struct Bridge {
    log: extern "C" fn(HostContext, u8, RStr<'_>, RStr<'_>),
    context: HostContext,
    max_level: LevelFilter,
}

// SAFETY: `context` is an opaque pointer that this code never dereferences; it only hands it back
// to the host's `log` function, which the host guarantees may be called from any thread for as
// long as the plugin is loaded.
unsafe impl Send for Bridge {}
// SAFETY: as for `Send`: nothing here is ever mutated or dereferenced.
unsafe impl Sync for Bridge {}

pub(crate) fn install(host: HostApiRef, context: HostContext, max_level: u8) {
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
        context,
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
            self.context,
            level_number(*metadata.level()),
            RStr::from_str(metadata.target()),
            RStr::from_str(&text.message),
        );
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}
