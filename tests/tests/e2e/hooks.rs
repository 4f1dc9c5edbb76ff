//! The hook pipeline with real plugins: order, modes, write policies, blocks, panics,
//! fire-and-forget overflow, reloads, sessions, configuration, plugin-to-plugin calls.

use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugin_host::{HookMode, HookPoint, HookResult, PluginHost};
use serde_json::{Value, json};
use tests::PluginDir;
use worker::hooks;

fn task() -> Value {
    json!({"id": "t1", "type": "qa", "input": "question", "meta": {}})
}

fn host_with(dir: &PluginDir, plugins: &[&str]) -> PluginHost {
    for name in plugins {
        dir.add(name, &format!("lib{name}.so"));
    }
    let host = dir.host();
    let report = host.scan().unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    host
}

/// Records, in order, the names of the host hooks that ran.
fn recorder(
    host: &PluginHost,
    point: HookPoint,
    hooks: &[(&str, i32, HookMode)],
) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    for (name, priority, mode) in hooks {
        let log = Arc::clone(&log);
        let me = (*name).to_owned();
        host.register_hook(point, name, *priority, *mode, move |_| {
            log.lock().unwrap().push(me.clone());
            HookResult::Continue
        });
    }
    log
}

#[test]
fn a_hook_nobody_subscribes_to_builds_no_payload() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &["echo"]);
    let fired = host.fire(hooks::TASK_SCORED, || panic!("the payload was built"));
    assert_eq!(fired, Ok(None));
    assert!(!host.has_subscribers(hooks::TASK_SCORED));
}

/// `notify`: a typed payload goes to plugins as JSON text, to host hooks as a value; nothing is
/// written without subscribers; modifications are refused (the payload is not read back), and a
/// block is still a violation.
#[test]
fn notify_sends_a_typed_payload_and_takes_no_changes() {
    #[derive(serde::Serialize)]
    struct Scored<'a> {
        id: &'a str,
        score: f64,
        plugins_ms: &'a [(&'a str, f64)],
    }
    let scored = || Scored {
        id: "t9",
        score: 0.5,
        plugins_ms: &[("bandit", 0.25)],
    };

    let bare = PluginDir::new();
    let host = host_with(&bare, &["echo"]);
    let nobody = host.notify(hooks::TASK_SCORED, || -> Scored<'static> {
        panic!("the payload was built")
    });
    assert_eq!(nobody, Ok(()));

    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {
        "on": {"task.scored": {"modify": {"score": 1.0}}}
    }}}));
    let host = host_with(&dir, &["fixture"]);
    let seen_by_host = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&seen_by_host);
    host.register_hook(
        hooks::TASK_SCORED,
        "after",
        500,
        HookMode::Sequential,
        move |event| {
            seen.lock().unwrap().push(event.payload.clone());
            HookResult::Continue
        },
    );
    assert_eq!(host.notify(hooks::TASK_SCORED, scored), Ok(()));
    let expected = json!({"id": "t9", "score": 0.5, "plugins_ms": [["bandit", 0.25]]});
    let plugin_saw = host.execute("fixture", "seen", &json!(null)).unwrap();
    let scored_events: Vec<&Value> = plugin_saw
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["hook"] == "task.scored")
        .map(|e| &e["payload"])
        .collect();
    assert_eq!(scored_events, [&expected]);
    assert_eq!(
        *seen_by_host.lock().unwrap(),
        [expected],
        "the plugin's modification was refused, not applied"
    );

    let blocking = PluginDir::new();
    blocking.configure(&json!({"fixture": {"config": {
        "on": {"task.scored": {"block": {"reason": "no", "code": "nope"}}}
    }}}));
    let host = host_with(&blocking, &["fixture"]);
    let violation = host.notify(hooks::TASK_SCORED, scored).unwrap_err();
    assert_eq!(
        (violation.subscriber.as_str(), violation.code.as_str()),
        ("fixture", "nope")
    );
}

#[test]
fn order_is_priority_then_name_and_modes_run_in_phases() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &["fixture"]);
    let log = recorder(
        &host,
        hooks::TASK_RECEIVED,
        &[
            ("zeta", 10, HookMode::Sequential),
            ("alpha", 10, HookMode::Sequential),
            ("late", 500, HookMode::Sequential),
            ("early", -5, HookMode::Sequential),
            ("watcher", -100, HookMode::Audit),
            ("checker", -100, HookMode::Concurrent),
        ],
    );
    host.fire(hooks::TASK_RECEIVED, task).unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        ["early", "alpha", "zeta", "late", "checker", "watcher"]
    );
    let listed: Vec<String> = host
        .hook_points()
        .into_iter()
        .find(|p| p.name == "task.received")
        .unwrap()
        .subscribers
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        listed,
        [
            "early", "alpha", "zeta", "fixture", "late", "checker", "watcher"
        ]
    );
    let seen = host.execute("fixture", "seen", &json!(null)).unwrap();
    assert!(
        seen.as_array()
            .unwrap()
            .iter()
            .any(|e| e["hook"] == "task.received")
    );
}

#[test]
fn sequential_modifications_chain_within_the_write_policy() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {
        "label": "L",
        "on": {"task.received": {"modify": {"input": "rewritten by $label", "id": "hijacked", "meta": {"by": "$label"}}}}
    }}}));
    let host = host_with(&dir, &["fixture"]);
    // Runs after the fixture (priority 100) and sees its modification.
    let seen_by_next = Arc::new(Mutex::new(Value::Null));
    let seen = Arc::clone(&seen_by_next);
    host.register_hook(
        hooks::TASK_RECEIVED,
        "next",
        200,
        HookMode::Sequential,
        move |event| {
            *seen.lock().unwrap() = event.payload.clone();
            HookResult::modify([(
                "input",
                json!(format!(
                    "{} + next",
                    event.payload["input"].as_str().unwrap()
                )),
            )])
        },
    );
    let payload = host.fire(hooks::TASK_RECEIVED, task).unwrap().unwrap();
    assert_eq!(seen_by_next.lock().unwrap()["input"], "rewritten by $label");
    assert_eq!(payload["input"], "rewritten by $label + next");
    assert_eq!(payload["meta"], json!({"by": "$label"}));
    assert_eq!(
        payload["id"], "t1",
        "a field outside the write policy was changed"
    );
}

#[test]
fn a_block_stops_the_hook_and_names_the_plugin() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {
        "on": {"task.received": {"block": {"reason": "input too long", "code": "too_long"}}}
    }}}));
    let host = host_with(&dir, &["fixture"]);
    let after = recorder(
        &host,
        hooks::TASK_RECEIVED,
        &[
            ("after", 200, HookMode::Sequential),
            ("audit", 0, HookMode::Audit),
        ],
    );
    let violation = host.fire(hooks::TASK_RECEIVED, task).unwrap_err();
    assert_eq!(violation.subscriber, "fixture");
    assert_eq!(violation.reason, "input too long");
    assert_eq!(violation.code, "too_long");
    assert_eq!(violation.hook, "task.received");
    assert!(
        after.lock().unwrap().is_empty(),
        "subscribers after a block ran"
    );
}

#[test]
fn a_panicking_subscriber_is_skipped_counted_and_the_chain_goes_on() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &["faulty", "fixture"]);
    let payload = host.fire(hooks::TASK_RECEIVED, task).unwrap().unwrap();
    assert_eq!(payload, task());
    let seen = host.execute("fixture", "seen", &json!(null)).unwrap();
    assert_eq!(
        seen.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["hook"] == "task.received")
            .count(),
        1
    );
    assert_eq!(host.plugin("faulty").unwrap().stats.panics, 1);
    // The plugin's methods still work.
    assert_eq!(
        host.execute("faulty", "ok", &json!(null)),
        Some(json!("fine"))
    );
}

#[test]
fn concurrent_subscribers_run_in_parallel_and_may_block_but_not_modify() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &["echo"]);
    // Each waits for the other: they can only both finish if they run at the same time.
    let (to_a, from_b) = mpsc::channel::<()>();
    let (to_b, from_a) = mpsc::channel::<()>();
    let (to_a, to_b) = (Mutex::new(to_a), Mutex::new(to_b));
    let (from_a, from_b) = (Mutex::new(from_a), Mutex::new(from_b));
    let parallel = Arc::new(Mutex::new(Vec::new()));
    let p = Arc::clone(&parallel);
    host.register_hook(
        hooks::TASK_RECEIVED,
        "a",
        1,
        HookMode::Concurrent,
        move |_| {
            to_b.lock().unwrap().send(()).unwrap();
            let met = from_b
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10))
                .is_ok();
            p.lock().unwrap().push(met);
            HookResult::modify([("input", json!("changed"))])
        },
    );
    let p = Arc::clone(&parallel);
    host.register_hook(
        hooks::TASK_RECEIVED,
        "b",
        2,
        HookMode::Concurrent,
        move |_| {
            to_a.lock().unwrap().send(()).unwrap();
            let met = from_a
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10))
                .is_ok();
            p.lock().unwrap().push(met);
            HookResult::Continue
        },
    );
    let payload = host.fire(hooks::TASK_RECEIVED, task).unwrap().unwrap();
    assert_eq!(
        *parallel.lock().unwrap(),
        [true, true],
        "the concurrent subscribers did not overlap"
    );
    assert_eq!(
        payload["input"], "question",
        "a concurrent subscriber modified the payload"
    );

    host.register_hook(hooks::TASK_RECEIVED, "c", 3, HookMode::Concurrent, |_| {
        HookResult::block("no", "nope")
    });
    assert_eq!(
        host.fire(hooks::TASK_RECEIVED, task)
            .unwrap_err()
            .subscriber,
        "c"
    );
}

#[test]
fn audit_subscribers_cannot_block_or_modify() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {
        "config": {"on": {"task.received": {"block": {"reason": "r", "code": "c"}}}},
        "hooks": {"task.received": {"mode": "audit"}}
    }}));
    let host = host_with(&dir, &["fixture"]);
    host.register_hook(hooks::TASK_RECEIVED, "auditor", 0, HookMode::Audit, |_| {
        HookResult::modify([("input", json!("x"))])
    });
    assert_eq!(host.fire(hooks::TASK_RECEIVED, task), Ok(Some(task())));
}

#[test]
fn fire_and_forget_never_waits_and_overflow_is_counted() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let host = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_fire_and_forget_capacity(1)
        .build()
        .unwrap();
    host.scan().unwrap();
    let (release, wait) = mpsc::channel::<()>();
    let wait = Mutex::new(wait);
    let (ran, ran_rx) = mpsc::channel::<u64>();
    let ran = Mutex::new(ran);
    host.register_hook(
        hooks::TASK_SCORED,
        "slow",
        0,
        HookMode::FireAndForget,
        move |event| {
            // Holds the background thread until the test releases it.
            let _ = wait.lock().unwrap().recv_timeout(Duration::from_secs(10));
            let _ = ran
                .lock()
                .unwrap()
                .send(event.payload["n"].as_u64().unwrap());
            HookResult::Continue
        },
    );
    for n in 0..6 {
        // Returns at once although the subscriber is stuck: it runs in the background.
        assert!(host.fire(hooks::TASK_SCORED, || json!({"n": n})).is_ok());
    }
    // One event runs (stuck), one waits in the queue of capacity 1, the rest were dropped.
    assert!(
        host.dropped_hook_events() >= 3,
        "dropped {}",
        host.dropped_hook_events()
    );
    for _ in 0..6 {
        let _ = release.send(());
    }
    let first = ran_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first, 0);
}

#[test]
fn subscriptions_follow_a_reloaded_plugin() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {"label": "one", "on": {"task.received": {"modify": {"meta": "$label"}}}}}}));
    let host = host_with(&dir, &["fixture"]);
    assert_eq!(
        host.fire(hooks::TASK_RECEIVED, task).unwrap().unwrap()["meta"],
        "one"
    );
    dir.configure(&json!({"fixture": {"config": {"label": "two", "on": {"task.received": {"modify": {"meta": "$label"}}}}}}));
    host.reload_config().unwrap();
    assert_eq!(
        host.fire(hooks::TASK_RECEIVED, task).unwrap().unwrap()["meta"],
        "two"
    );
    host.unload("fixture").unwrap();
    assert_eq!(
        host.fire(hooks::TASK_RECEIVED, task),
        Ok(None),
        "an unloaded plugin still subscribed"
    );
}

#[test]
fn session_hooks_go_away_with_the_session() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &["echo"]);
    let calls = Arc::new(Mutex::new(0));
    {
        let session = host.hook_session();
        let c = Arc::clone(&calls);
        session.register(
            hooks::TASK_SCORED,
            "session-hook",
            0,
            HookMode::Sequential,
            move |_| {
                *c.lock().unwrap() += 1;
                HookResult::Continue
            },
        );
        host.fire(hooks::TASK_SCORED, || json!({})).unwrap();
        assert!(host.has_subscribers(hooks::TASK_SCORED));
    }
    assert!(!host.has_subscribers(hooks::TASK_SCORED));
    assert_eq!(host.fire(hooks::TASK_SCORED, || json!({})), Ok(None));
    assert_eq!(*calls.lock().unwrap(), 1);
}

#[test]
fn configuration_overrides_subscriptions_and_sets() {
    let dir = PluginDir::new();
    dir.configure_file(&json!({
        "plugins": {"fixture": {"hooks": {"task.scored": {"enabled": false}, "task.error": {"mode": "audit", "priority": 7}}}},
        "sets": {"noisy": {"plugins": ["faulty"], "priority": 1000}}
    }));
    let host = host_with(&dir, &["fixture", "faulty"]);
    // Read afresh at each call: the list as it stands now.
    let subscribers = |name: &str| {
        host.hook_points()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap()
            .subscribers
    };
    let listed = |name: &str| -> Vec<(String, HookMode, i32)> {
        subscribers(name)
            .into_iter()
            .map(|s| (s.name, s.mode, s.priority))
            .collect()
    };
    assert!(subscribers("task.scored").is_empty());
    let error = &subscribers("task.error")[0];
    assert_eq!((error.mode, error.priority), (HookMode::Audit, 7));
    let received: Vec<(String, i32)> = subscribers("task.received")
        .into_iter()
        .map(|s| (s.name, s.priority))
        .collect();
    assert_eq!(
        received,
        [("fixture".to_owned(), 100), ("faulty".to_owned(), 1000)]
    );

    // A disabled set unloads its plugins; the fixture's overrides are gone from the file, so
    // its own subscriptions (sequential, priority 100) apply again.
    dir.configure_file(&json!({"sets": {"noisy": {"plugins": ["faulty"], "enabled": false}}}));
    host.reload_config().unwrap();
    assert!(host.plugin("faulty").is_none());
    let own = || vec![("fixture".to_owned(), HookMode::Sequential, 100)];
    assert_eq!(listed("task.scored"), own());
    assert_eq!(listed("task.error"), own());
    assert_eq!(listed("task.received"), own());
}

#[test]
fn plugins_call_plugins_and_cycles_are_cut() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &["fixture", "faulty", "echo"]);
    let via = |params: Value| host.call("fixture", "call", &params);
    assert_eq!(
        via(json!({"plugin": "echo", "method": "echo", "params": {"x": 1}})),
        Ok(Some(json!({"x": 1})))
    );
    // The callee's failures come back as errors, never as crashes.
    let err = via(json!({"plugin": "faulty", "method": "panic"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("faulty.panic panicked"), "{err}");
    let err = via(json!({"plugin": "nobody", "method": "x"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no plugin `nobody`"), "{err}");
    // fixture -> fixture, and fixture -> faulty -> fixture.
    let err = via(json!({"plugin": "fixture", "method": "total"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("call cycle cut: fixture -> fixture"), "{err}");
    let err = via(json!({"plugin": "faulty", "method": "call", "params": {"plugin": "fixture", "method": "total"}}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("call cycle cut: fixture -> faulty -> fixture"),
        "{err}"
    );
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(0))
    );
}

/// `plugin.loaded` fires once per load and once per reload (a reload is a new generation
/// loaded), `plugin.unloaded` once per unload, each naming the plugin and its generation.
#[test]
fn plugin_lifecycle_hooks_fire() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &["fixture"]);
    let file = dir.add("echo", "libecho.so");
    let loaded = host.load(&file).unwrap().generation;
    let reloaded = host.reload("echo").unwrap().generation;
    host.unload("echo").unwrap();
    let seen = host.execute("fixture", "seen", &json!(null)).unwrap();
    let events: Vec<(String, u64)> = seen
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["payload"]["plugin"] == "echo")
        .map(|e| {
            (
                e["hook"].as_str().unwrap().to_owned(),
                e["payload"]["generation"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("plugin.loaded".to_owned(), loaded),
            ("plugin.loaded".to_owned(), reloaded),
            ("plugin.unloaded".to_owned(), reloaded),
        ]
    );
}

/// The host drops the hooks of a plugin whose older function table cannot serve them, and says
/// so: the library subscribes it nowhere, and `worker hooks` logs a warning naming it.
#[test]
fn an_older_plugin_with_hooks_in_its_manifest_is_not_silently_subscribed() {
    let dir = PluginDir::new();
    let file = dir.add_file(&tests::fixture_build("table-v1"), "libfixture.so");
    let host = dir.host();
    host.load(&file).unwrap();
    assert!(host.hook_points().iter().all(|p| p.subscribers.is_empty()));
    drop(host);

    let output = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .args(["--log", "warn", "hooks", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{stderr}");
    let points: Value = serde_json::from_slice(&output.stdout).unwrap();
    let subscribed: Vec<&Value> = points
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["subscribers"].as_array().unwrap())
        .collect();
    assert!(subscribed.is_empty(), "{subscribed:?}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("function table predates hooks"))
        .unwrap_or_else(|| panic!("no warning that the hooks are ignored:\n{stderr}"));
    assert!(
        warning.contains("plugin=fixture") && warning.contains("table_version=1"),
        "{warning}"
    );
}

/// A modification of a field outside the hook point's writable fields is refused with a
/// warning naming the plugin, the hook and the field; the writable ones apply. Through
/// `worker run`, the real binary, reading what it logs.
#[test]
fn a_modification_outside_the_writable_fields_is_refused_with_a_warning() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {
        "on": {"task.received": {"modify": {"id": "hijacked", "meta": {"by": "fixture"}}}}
    }}}));
    dir.add("fixture", "libfixture.so");
    let task = json!({"id": "t1", "type": "summarize", "input": {"title": "Orion", "text": "The Orion price is 5 dollars."}});
    let (records, log) = crate::pipeline::worker_run(&dir, &format!("{task}\n"));
    assert_eq!(records[0]["id"], "t1", "{records:?}");
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("modification refused"))
        .collect();
    assert_eq!(refusals.len(), 1, "{log}");
    for field in [
        "WARN",
        "the field is not writable",
        "plugin=fixture",
        "hook=task.received",
        "field=id",
    ] {
        assert!(
            refusals[0].contains(field),
            "{field} missing: {}",
            refusals[0]
        );
    }
}
