//! Calls: answers, every no-op path, typed helpers, statistics.

use plugin_host::PluginCallError;
use serde_json::{Value, json};
use tests::PluginDir;

fn host_with(plugins: &[&str]) -> (PluginDir, plugin_host::PluginHost) {
    let dir = PluginDir::new();
    for name in plugins {
        dir.add(name, &format!("lib{name}.so"));
    }
    let host = dir.host();
    let report = host.scan().unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    (dir, host)
}

#[test]
fn echo_returns_its_params() {
    let (_dir, host) = host_with(&["echo"]);
    let params = json!({"text": "héllo", "n": [1, 2.5, null], "nested": {"ok": true}});
    assert_eq!(host.execute("echo", "echo", &params), Some(params.clone()));
    assert_eq!(
        host.execute("echo", "echo", &json!(null)),
        None,
        "null answers nothing"
    );
    assert_eq!(
        host.execute(
            "echo",
            "summarize",
            &json!({"source": "a", "values": [1.0, 3.0]})
        ),
        Some(json!({"source": "A", "count": 2, "mean": 2.0, "range": [1.0, 3.0]}))
    );
}

#[test]
fn every_failure_is_a_no_op_and_the_plugin_goes_on() {
    let (_dir, host) = host_with(&["faulty", "echo"]);
    let none = json!(null);
    assert_eq!(host.execute("nobody", "echo", &none), None);
    assert_eq!(host.execute("echo", "nothing", &none), None);
    assert_eq!(host.execute("faulty", "panic", &none), None);
    assert_eq!(host.execute("faulty", "error", &none), None);
    assert_eq!(host.execute("faulty", "bad_json", &none), None);
    assert_eq!(
        host.execute("echo", "summarize", &json!({"wrong": 1})),
        None
    );
    // After all that, both plugins still answer.
    assert_eq!(host.execute("faulty", "ok", &none), Some(json!("fine")));
    assert_eq!(host.execute("echo", "echo", &json!([1])), Some(json!([1])));
}

#[test]
fn call_says_why() {
    let (_dir, host) = host_with(&["faulty", "echo"]);
    let none = json!(null);
    assert!(matches!(
        host.call("nobody", "x", &none),
        Err(PluginCallError::PluginNotFound { .. })
    ));
    assert!(matches!(
        host.call("echo", "x", &none),
        Err(PluginCallError::MethodNotFound { .. })
    ));
    match host.call("faulty", "panic", &none) {
        Err(PluginCallError::Panicked { message, .. }) => {
            assert_eq!(message, "faulty plugin panicked on purpose")
        }
        other => panic!("{other:?}"),
    }
    match host.call("faulty", "error", &none) {
        Err(PluginCallError::Failed { message, .. }) => {
            assert_eq!(message, "faulty plugin failed on purpose")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        host.call("faulty", "bad_json", &none),
        Err(PluginCallError::InvalidJson { .. })
    ));
    match host.call("echo", "summarize", &json!({"values": "x"})) {
        Err(e @ PluginCallError::InvalidParams { .. }) => {
            assert!(e.to_string().contains("echo.summarize"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn typed_helpers() {
    let (_dir, host) = host_with(&["echo", "faulty"]);
    let n: Option<u32> = host.execute_with("echo", "echo", &json!(7));
    assert_eq!(n, Some(7));
    let wrong: Option<u32> = host.execute_with("echo", "echo", &json!("seven"));
    assert_eq!(wrong, None);
    assert_eq!(
        host.execute_or("faulty", "panic", &json!(null), "A".to_owned()),
        "A"
    );
    assert_eq!(
        host.execute_or("missing", "pickVariant", &json!({}), "A".to_owned()),
        "A"
    );
    assert_eq!(
        host.execute_or("echo", "echo", &json!("B"), "A".to_owned()),
        "B"
    );
}

/// Typed both ways with no `Value` in between: params of any `Serialize` type, answers read
/// into the caller's type, every failure named.
#[test]
fn typed_calls_write_params_and_read_answers_directly() {
    #[derive(serde::Serialize)]
    struct Readings<'a> {
        source: &'a str,
        values: &'a [f64],
    }
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Summary {
        source: String,
        count: u32,
        mean: f64,
    }
    let (_dir, host) = host_with(&["echo", "faulty"]);
    let params = Readings {
        source: "b",
        values: &[2.0, 4.0],
    };
    let summary: Summary = host
        .call_with("echo", "summarize", &params)
        .unwrap()
        .unwrap();
    assert_eq!(
        summary,
        Summary {
            source: "B".into(),
            count: 2,
            mean: 3.0
        }
    );
    assert_eq!(
        host.execute_with::<_, Summary>("echo", "summarize", &params),
        Some(summary)
    );

    // No params reach the plugin as none; a JSON null answer is no answer.
    assert_eq!(host.call_with::<_, String>("echo", "echo", &()), Ok(None));
    assert_eq!(
        host.call_with::<_, u8>("echo", "echo", &Option::<u8>::None),
        Ok(None)
    );

    // An answer of another shape is WrongType, naming the type asked for.
    match host.call_with::<_, Summary>("echo", "echo", &[1, 2]) {
        Err(PluginCallError::WrongType {
            plugin,
            method,
            message,
        }) => {
            assert_eq!((plugin.as_str(), method.as_str()), ("echo", "echo"));
            assert!(message.contains("Summary"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        host.execute_with::<_, Summary>("echo", "echo", &[1, 2]),
        None
    );

    // Params that cannot be JSON never reach the plugin.
    let mut bad_keys = std::collections::BTreeMap::new();
    bad_keys.insert((1, 2), "a map with non-string keys");
    let calls_before = host.plugin("echo").unwrap().stats.calls;
    assert!(matches!(
        host.call_with::<_, Value>("echo", "echo", &bad_keys),
        Err(PluginCallError::InvalidParams { .. })
    ));
    assert_eq!(host.plugin("echo").unwrap().stats.calls, calls_before);

    // The other failures are the same as `call`'s.
    assert!(matches!(
        host.call_with::<_, Value>("nobody", "echo", &1),
        Err(PluginCallError::PluginNotFound { .. })
    ));
    assert!(matches!(
        host.call_with::<_, Value>("faulty", "bad_json", &()),
        Err(PluginCallError::InvalidJson { .. })
    ));
    assert!(matches!(
        host.call_with::<_, Value>("faulty", "panic", &()),
        Err(PluginCallError::Panicked { .. })
    ));
    assert_eq!(host.execute_with::<_, Value>("faulty", "error", &()), None);
    assert_eq!(
        host.execute_with::<_, String>("faulty", "ok", &()),
        Some("fine".to_owned())
    );
}

#[test]
fn statistics_count_calls_errors_panics_and_latency() {
    // Every call timed: the latency figures below are exact (with a sample, seven calls may
    // have none timed).
    let dir = PluginDir::new();
    dir.add("faulty", "libfaulty.so");
    let host = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_call_timing_sample(1)
        .build()
        .unwrap();
    assert!(host.scan().unwrap().refused.is_empty());
    let none = json!(null);
    for _ in 0..3 {
        host.execute("faulty", "ok", &none);
    }
    host.execute("faulty", "error", &none);
    host.execute("faulty", "bad_json", &none);
    host.execute("faulty", "panic", &none);
    host.execute("faulty", "panic", &none);
    let stats = host.plugin("faulty").unwrap().stats;
    assert_eq!(stats.calls, 7);
    assert_eq!(stats.errors, 2);
    assert_eq!(stats.panics, 2);
    assert!(stats.total_latency > std::time::Duration::ZERO);
    assert!(stats.max_latency <= stats.total_latency);
    assert!(stats.max_latency >= stats.mean_latency());
}

#[test]
fn many_threads_call_at_once() {
    let (_dir, host) = host_with(&["echo"]);
    std::thread::scope(|s| {
        for t in 0..4 {
            let host = &host;
            s.spawn(move || {
                for i in 0..2000 {
                    let params = json!({"thread": t, "i": i});
                    assert_eq!(host.execute("echo", "echo", &params), Some(params));
                }
            });
        }
    });
    assert_eq!(host.plugin("echo").unwrap().stats.calls, 8000);
}

#[test]
fn missing_plugin_fast_path_never_hides_a_loaded_plugin() {
    let (dir, host) = host_with(&["echo", "faulty", "fixture"]);
    let probe = |name: &str, method: &str| host.call(name, method, &json!(null));
    for gone in ["echo", "faulty", "fixture"] {
        host.unload(gone).unwrap();
        assert!(matches!(
            probe(gone, "ok"),
            Err(PluginCallError::PluginNotFound { .. })
        ));
        for other in ["echo", "faulty", "fixture"]
            .into_iter()
            .filter(|n| *n != gone)
        {
            let (method, expected) = match other {
                "echo" => ("echo", Ok(None)),
                "faulty" => ("ok", Ok(Some(json!("fine")))),
                _ => ("total", Ok(Some(json!(0)))),
            };
            assert_eq!(
                probe(other, method),
                expected,
                "{other} after unloading {gone}"
            );
        }
        host.load(dir.path().join(format!("lib{gone}.so"))).unwrap();
    }
    for name in ["nobody", "echo2", "", "ECHO"] {
        assert!(
            matches!(
                probe(name, "x"),
                Err(PluginCallError::PluginNotFound { .. })
            ),
            "{name}"
        );
    }
}

/// The text path hands the caller's text to the plugin and its answer back as text, checked to
/// be JSON: the same answers and failures as the value path, without a value on either side.
#[test]
fn the_text_path_answers_text_and_fails_like_the_value_path() {
    let (_dir, host) = host_with(&["echo", "faulty"]);
    let params = r#"{"source":"a","values":[1.0,3.0]}"#;
    let answer = host
        .call_text("echo", "summarize", params)
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap(),
        host.execute("echo", "summarize", &serde_json::from_str(params).unwrap())
            .unwrap()
    );
    // No params: empty text or `null`; the plugin answers nothing for them.
    assert_eq!(host.call_text("echo", "echo", "").unwrap(), None);
    assert_eq!(host.call_text("echo", "echo", "null").unwrap(), None);
    assert_eq!(
        host.execute_text("echo", "echo", r#"[1, "two"]"#)
            .as_deref(),
        Some(r#"[1,"two"]"#)
    );
    // Params that are not JSON are the plugin's invalid params, not a host failure.
    assert!(matches!(
        host.call_text("echo", "summarize", "{not json"),
        Err(PluginCallError::InvalidParams { .. })
    ));
    // An answer that is not JSON never reaches the caller.
    assert!(matches!(
        host.call_text("faulty", "bad_json", ""),
        Err(PluginCallError::InvalidJson { .. })
    ));
    assert_eq!(host.execute_text("faulty", "bad_json", ""), None);
    assert!(matches!(
        host.call_text("nobody", "echo", "1"),
        Err(PluginCallError::PluginNotFound { .. })
    ));
    assert_eq!(host.execute_text("faulty", "nothing", ""), None);
}

/// A call to a plugin that is not loaded, on every API that says why: the error reads as it
/// always did, and the name is held inline (no allocation) when it fits, copied whole when not.
#[test]
fn a_missing_plugin_error_reads_as_before_and_holds_a_short_name_inline() {
    let (_dir, host) = host_with(&["echo"]);
    let errors = [
        host.call("nobody", "echo", &json!(1)).unwrap_err(),
        host.call_with::<_, Value>("nobody", "echo", &1)
            .unwrap_err(),
        host.call_text("nobody", "echo", "1").unwrap_err(),
    ];
    for error in errors {
        let PluginCallError::PluginNotFound { plugin } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(plugin, "nobody");
        assert!(!plugin.is_heap_allocated());
        assert_eq!(error.to_string(), "no plugin `nobody` is loaded");
    }
    let long = "a-plugin-name-longer-than-twenty-three-bytes";
    let error = host.call_with::<_, Value>(long, "echo", &1).unwrap_err();
    assert_eq!(error.to_string(), format!("no plugin `{long}` is loaded"));
    // A loaded plugin without the method still names both.
    let error = host.call("echo", "nothing-here", &json!(1)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "plugin `echo` has no method `nothing-here`"
    );
}
