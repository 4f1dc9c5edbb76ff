//! A plugin's `tracing` events reach the host's subscriber, tagged with the plugin's name, and
//! failed calls are logged with plugin, method and reason.
//!
//! A test binary of its own with a single test: `tracing` caches per call site whether anyone
//! listens, and scoped subscribers in tests running in parallel threads race with that cache.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure should stop the test with its message"
)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tests::PluginDir;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture(f: impl FnOnce()) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn logging() {
    plugin_events_reach_the_host_tagged_with_the_plugin();
    failed_calls_are_logged_with_plugin_method_and_reason();
}

fn plugin_events_reach_the_host_tagged_with_the_plugin() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let logs = capture(|| {
        let host = dir.host();
        host.scan().unwrap();
        host.execute("fixture", "log", &json!(null));
    });
    let line = logs
        .lines()
        .find(|l| l.contains("fixture says hello"))
        .unwrap_or_else(|| panic!("the plugin's event did not arrive:\n{logs}"));
    assert!(line.contains("WARN"), "{line}");
    // The event's target is the plugin's name; the name is also a field, written as in the
    // load, reload and unload lines.
    assert!(
        line.contains(" fixture: ") && line.contains("plugin=fixture"),
        "{line}"
    );
    assert!(line.contains("code=7"), "{line}");
    assert!(logs.contains("plugin loaded"), "{logs}");
}

fn failed_calls_are_logged_with_plugin_method_and_reason() {
    let dir = PluginDir::new();
    dir.add("faulty", "libfaulty.so");
    let logs = capture(|| {
        let host = dir.host();
        host.scan().unwrap();
        host.execute("faulty", "panic", &json!(null));
        host.execute("faulty", "nothing", &json!(null));
        host.execute("nobody", "x", &json!(null));
    });
    let panic = logs
        .lines()
        .find(|l| l.contains("plugin panicked"))
        .expect(&logs);
    assert!(
        panic.contains("WARN")
            && panic.contains("plugin=\"faulty\"")
            && panic.contains("method=\"panic\""),
        "{panic}"
    );
    assert!(
        panic.contains("faulty plugin panicked on purpose"),
        "{panic}"
    );
    let missing = logs
        .lines()
        .find(|l| l.contains("no such method"))
        .expect(&logs);
    assert!(
        missing.contains("DEBUG") && missing.contains("method=\"nothing\""),
        "{missing}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("no such plugin") && l.contains("DEBUG")),
        "{logs}"
    );
    assert!(
        !logs.contains("thread '"),
        "the panic was printed by the default hook:\n{logs}"
    );
}
