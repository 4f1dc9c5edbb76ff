//! Method handles (`PluginHost::method`): the same answers, errors and statistics as calls by
//! name, across reloads (methods in another order), unloads, isolated plugins and plugins
//! built before calls by index.

use std::time::Duration;

use plugin_host::{CallKind, PluginCallError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tests::{PluginDir, eventually, fixture_build, patched};

const PATIENCE: Duration = Duration::from_secs(30);

/// Calls of `method` in `plugin`'s latency histograms.
fn method_calls(host: &plugin_host::PluginHost, plugin: &str, method: &str) -> u64 {
    host.latencies()
        .into_iter()
        .filter(|(name, _)| name == plugin)
        .flat_map(|(_, histograms)| histograms)
        .filter(|h| h.kind == CallKind::Method && h.name == method)
        .map(|h| h.count())
        .sum()
}

#[test]
fn a_handle_answers_as_a_call_by_name() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let host = dir.host();
    host.scan().unwrap();
    let params = json!({"source": "a", "values": [1.0, 3.0]});
    let summarize = host.method("echo", "summarize");
    assert_eq!(
        (summarize.plugin(), summarize.method()),
        ("echo", "summarize")
    );
    let by_name = host.execute("echo", "summarize", &params);
    assert!(by_name.is_some());
    assert_eq!(summarize.execute(&host, &params), by_name);
    assert_eq!(summarize.call(&host, &params).unwrap(), by_name);
    let text = params.to_string();
    assert_eq!(
        summarize.call_text(&host, &text).unwrap(),
        host.call_text("echo", "summarize", &text).unwrap()
    );
    assert_eq!(
        summarize.execute_text(&host, &text),
        host.execute_text("echo", "summarize", &text)
    );

    #[derive(Serialize)]
    struct Readings<'a> {
        source: &'a str,
        values: &'a [f64],
    }
    #[derive(Deserialize, Debug, PartialEq)]
    struct Summary {
        count: usize,
        mean: f64,
    }
    let typed = Readings {
        source: "a",
        values: &[1.0, 3.0],
    };
    let answer: Option<Summary> = summarize.call_with(&host, &typed).unwrap();
    assert_eq!(
        answer,
        Some(Summary {
            count: 2,
            mean: 2.0
        })
    );
    assert_eq!(
        summarize.execute_with::<_, Summary>(&host, &typed),
        Some(Summary {
            count: 2,
            mean: 2.0
        })
    );
    // Every call, through the handle (six) or by name (three), is counted in the method's
    // histogram.
    assert_eq!(method_calls(&host, "echo", "summarize"), 9);
    assert_eq!(host.plugin("echo").unwrap().stats.calls, 9);

    // A method the plugin does not declare, and a plugin that is not loaded: the same errors.
    let missing_method = host.method("echo", "nope");
    assert!(matches!(
        missing_method.call(&host, &Value::Null),
        Err(PluginCallError::MethodNotFound { .. })
    ));
    assert_eq!(missing_method.execute(&host, &Value::Null), None);
    let missing_plugin = host.method("nobody", "noop");
    let error = missing_plugin.call(&host, &Value::Null).unwrap_err();
    assert!(
        matches!(error, PluginCallError::PluginNotFound { .. }),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        host.call("nobody", "noop", &Value::Null)
            .unwrap_err()
            .to_string()
    );
    // The answer lent to a closure is the text `call_text` copies out.
    let copied = host.call_text("echo", "summarize", &text).unwrap();
    assert_eq!(
        host.call_text_with("echo", "summarize", &text, str::to_owned)
            .unwrap(),
        copied
    );
    assert_eq!(
        summarize.call_text_with(&host, &text, str::len).unwrap(),
        copied.as_deref().map(str::len)
    );
    assert!(matches!(
        host.call_text_with("nobody", "noop", "", |_| ()),
        Err(PluginCallError::PluginNotFound { .. })
    ));
    assert!(matches!(
        host.call_text_with("echo", "nope", "", |_| ()),
        Err(PluginCallError::MethodNotFound { .. })
    ));
    // A clone is a handle of its own to the same method.
    assert_eq!(summarize.clone().execute(&host, &params), by_name);
}

/// The second generation declares `label` and `total` in each other's place (their names are
/// swapped in the library's bytes): a handle resolved in the first finds the method again by
/// name, counts it in the right histogram, and answers what a call by name answers.
#[test]
fn a_handle_follows_a_reload_with_the_methods_in_another_order() {
    let dir = PluginDir::new();
    let file = dir.add("fixture", "libfixture.so");
    let host = dir.host();
    host.scan().unwrap();
    let total = host.method("fixture", "total");
    let label = host.method("fixture", "label");
    assert_eq!(total.execute(&host, &Value::Null), Some(json!(0)));
    assert_eq!(label.execute(&host, &Value::Null), Some(json!("default")));
    let index_of = |name: &str| {
        host.plugin("fixture")
            .unwrap()
            .methods
            .iter()
            .position(|m| m.name == name)
            .unwrap()
    };
    let (label_at, total_at) = (index_of("label"), index_of("total"));

    let swapped = patched(&file, b"label", b"l@bel");
    std::fs::write(&file, &swapped).unwrap();
    let swapped = patched(&file, b"total", b"label");
    std::fs::write(&file, &swapped).unwrap();
    let swapped = patched(&file, b"l@bel", b"total");
    std::fs::write(&file, &swapped).unwrap();
    host.reload("fixture").unwrap();
    assert_eq!((index_of("label"), index_of("total")), (total_at, label_at));

    let (total_before, label_before) = (
        method_calls(&host, "fixture", "total"),
        method_calls(&host, "fixture", "label"),
    );
    // "total" is now the code that answers the label, and the other way round.
    assert_eq!(total.execute(&host, &Value::Null), Some(json!("default")));
    assert_eq!(
        total.execute(&host, &Value::Null),
        host.execute("fixture", "total", &Value::Null)
    );
    assert_eq!(label.execute(&host, &Value::Null), Some(json!(0)));
    assert_eq!(method_calls(&host, "fixture", "total"), total_before + 3);
    assert_eq!(method_calls(&host, "fixture", "label"), label_before + 1);
}

/// Unloaded, a handle answers "not loaded" (no crash, no stale library); loaded again, it
/// reaches the new generation. Calls from other threads go on meanwhile.
#[test]
fn a_handle_answers_not_loaded_after_an_unload_and_comes_back_with_a_load() {
    let dir = PluginDir::new();
    let file = dir.add("echo", "libecho.so");
    let host = std::sync::Arc::new(dir.host());
    host.scan().unwrap();
    let echo = std::sync::Arc::new(host.method("echo", "echo"));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (host, echo) = (host.clone(), echo.clone());
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let answer = echo.execute(&host, &json!(i));
                    assert!(answer.is_none() || answer == Some(json!(i)), "{answer:?}");
                }
            })
        })
        .collect();
    for _ in 0..5 {
        host.unload("echo").unwrap();
        host.load(&file).unwrap();
    }
    for caller in callers {
        caller.join().unwrap();
    }

    host.unload("echo").unwrap();
    let error = echo.call(&host, &json!(1)).unwrap_err();
    assert!(
        matches!(error, PluginCallError::PluginNotFound { .. }),
        "{error}"
    );
    assert_eq!(echo.execute(&host, &json!(1)), None);
    assert!(dir.shadow_files().is_empty(), "{:?}", dir.shadow_files());
    host.load(&file).unwrap();
    assert_eq!(echo.execute(&host, &json!(2)), Some(json!(2)));
}

/// A handle made by one host and used with another finds the plugin there by name.
#[test]
fn a_handle_from_another_host_resolves_again() {
    let (one, two) = (PluginDir::new(), PluginDir::new());
    one.add("echo", "libecho.so");
    two.add("echo", "libecho.so");
    let (first, second) = (one.host(), two.host());
    first.scan().unwrap();
    second.scan().unwrap();
    let echo = first.method("echo", "echo");
    assert_eq!(echo.execute(&second, &json!("x")), Some(json!("x")));
    assert_eq!(echo.execute(&first, &json!("y")), Some(json!("y")));
    assert_eq!(second.plugin("echo").unwrap().stats.calls, 1);
    assert_eq!(first.plugin("echo").unwrap().stats.calls, 1);
}

/// A plugin built with table version 1 has no `execute_at`: the handle calls it by name.
#[test]
fn a_handle_calls_an_older_table_by_name() {
    let dir = PluginDir::new();
    let file = dir.add_file(&fixture_build("table-v1"), "libfixture_v1.so");
    let host = dir.host();
    assert_eq!(host.load(&file).unwrap().table_version, 1);
    let add = host.method("fixture", "add");
    assert_eq!(add.execute(&host, &json!({"n": 5})), Some(json!(5)));
    assert_eq!(add.call(&host, &json!({"n": 2})).unwrap(), Some(json!(7)));
    assert_eq!(
        host.method("fixture", "table").execute(&host, &Value::Null),
        Some(json!(1))
    );
    assert_eq!(method_calls(&host, "fixture", "add"), 2);
}

/// An isolated plugin is called by name over its pipe: answers, a crash and the restart after
/// it read as through the host's own calls.
#[test]
fn a_handle_reaches_an_isolated_plugin_through_a_crash() {
    let dir = PluginDir::new();
    dir.configure(&json!({"crashy": {"timeoutMs": 5000, "breaker": false}}));
    dir.add("crashy", "libcrashy.so");
    let host = plugin_host::PluginHost::builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_isolation(plugin_host::Isolation::Process)
        .with_child_program(env!("CARGO_BIN_EXE_worker-under-test"))
        .build()
        .unwrap();
    assert_eq!(host.scan().unwrap().loaded, ["crashy"]);
    let ok = host.method("crashy", "ok");
    assert_eq!(ok.execute(&host, &Value::Null), Some(json!("fine")));
    let crashed = host
        .method("crashy", "segfault")
        .call(&host, &Value::Null)
        .unwrap_err();
    assert!(
        matches!(crashed, PluginCallError::Crashed { .. }),
        "{crashed}"
    );
    assert!(eventually(PATIENCE, || ok.execute(&host, &Value::Null)
        == Some(json!("fine"))));
    assert_eq!(host.plugin("crashy").unwrap().isolation.crashes, 1);
}

/// A `call_text_with` whose closure panics (the caller's code, reading a plugin's answer) ends
/// the call before the panic goes on: no call stays marked in flight, so the watchdog never
/// finds the plugin overdue and its breaker never opens for good; by name and through a
/// handle.
#[test]
fn a_panic_in_the_answer_closure_leaves_no_call_in_flight() {
    let dir = PluginDir::new();
    // A deadline well past the time a panic takes to print its backtrace (which counts).
    dir.configure(&json!({"echo": {"timeoutMs": 60_000}}));
    dir.add("echo", "libecho.so");
    let host = dir.host();
    host.scan().unwrap();
    let handle = host.method("echo", "echo");
    for through_handle in [false, true] {
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let read = |_: &str| -> usize { panic!("the caller's reader panicked") };
            if through_handle {
                let _ = handle.call_text_with(&host, "[1]", read);
            } else {
                let _ = host.call_text_with("echo", "echo", "[1]", read);
            }
        }));
        assert!(panicked.is_err());
    }
    // A call left marked in flight would be found overdue at the deadline, its breaker open.
    assert!(
        host.calls_in_flight().is_empty(),
        "{:?}",
        host.calls_in_flight()
    );
    let health = host.plugin("echo").unwrap().health;
    // The plugin answered: the caller's panic is not its failure.
    assert_eq!(health.consecutive_failures, 0, "{health:?}");
    assert_eq!(method_calls(&host, "echo", "echo"), 2);
    assert_eq!(
        host.call_text("echo", "echo", "[2]").unwrap().as_deref(),
        Some("[2]")
    );
}
