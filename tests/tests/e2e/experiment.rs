//! The `experiment` plugin through the host: the `pickVariant ... or "A"` pattern.

use serde_json::{Value, json};
use tests::PluginDir;

fn experiment_host(config: Value) -> (PluginDir, plugin_host::PluginHost) {
    let dir = PluginDir::new();
    dir.configure(&json!({"experiment": {"config": config}}));
    dir.add("experiment", "libexperiment.so");
    let host = dir.host();
    let report = host.scan().unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    (dir, host)
}

fn pick(host: &plugin_host::PluginHost, params: Value) -> String {
    host.execute_or("experiment", "pickVariant", &params, "A".to_owned())
}

#[test]
fn sticky_keys_and_weighted_split() {
    let (_dir, host) =
        experiment_host(json!({"experiments": {"tone": {"variants": {"A": 1, "B": 3}}}}));
    let first = pick(&host, json!({"experiment": "tone", "key": "user-42"}));
    for _ in 0..50 {
        assert_eq!(
            pick(&host, json!({"experiment": "tone", "key": "user-42"})),
            first
        );
    }
    let b = (0..2000)
        .filter(|i| {
            pick(
                &host,
                json!({"experiment": "tone", "key": format!("user-{i}")}),
            ) == "B"
        })
        .count();
    assert!(
        (1350..1650).contains(&b),
        "B got {b} of 2000 with weight 3/4"
    );
}

#[test]
fn keyless_picks_are_weighted_random() {
    let (_dir, host) =
        experiment_host(json!({"experiments": {"e": {"variants": {"A": 1, "B": 1}}}, "seed": 3}));
    let b = (0..2000)
        .filter(|_| pick(&host, json!({"experiment": "e"})) == "B")
        .count();
    assert!(
        (850..1150).contains(&b),
        "B got {b} of 2000 with weight 1/2"
    );
}

#[test]
fn unknown_experiment_or_other_task_type_falls_back_to_the_default() {
    let (_dir, host) = experiment_host(json!({
        "experiments": {"len": {"variants": {"short": 1}, "taskTypes": ["summarize"]}}
    }));
    assert_eq!(pick(&host, json!({"experiment": "nope"})), "A");
    assert_eq!(
        pick(&host, json!({"experiment": "len", "taskType": "qa"})),
        "A"
    );
    assert_eq!(
        pick(&host, json!({"experiment": "len", "taskType": "summarize"})),
        "short"
    );
    match host.call("experiment", "pickVariant", &json!({"experiment": "nope"})) {
        Err(e) => assert!(e.to_string().contains("configured: len"), "{e}"),
        Ok(v) => panic!("{v:?}"),
    }
}

#[test]
fn outcomes_and_stats_survive_a_reload() {
    let (_dir, host) =
        experiment_host(json!({"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}}));
    for (variant, score) in [("A", 0.5), ("A", 0.7), ("B", 0.9)] {
        let params = json!({"experiment": "tone", "variant": variant, "score": score});
        assert_eq!(host.call("experiment", "recordOutcome", &params), Ok(None));
    }
    assert!(
        host.call(
            "experiment",
            "recordOutcome",
            &json!({"experiment": "tone", "variant": "Z", "score": 1})
        )
        .is_err()
    );
    let before = host
        .execute("experiment", "stats", &json!({"experiment": "tone"}))
        .unwrap();
    let variants = &before["tone"]["variants"];
    assert_eq!(variants["A"]["outcomes"], 2);
    assert!((variants["A"]["meanScore"].as_f64().unwrap() - 0.6).abs() < 1e-9);
    assert_eq!(variants["B"]["meanScore"], 0.9);
    host.reload("experiment").unwrap();
    let after = host.execute("experiment", "stats", &json!(null)).unwrap();
    assert_eq!(after, before);
}

#[test]
fn invalid_configuration_is_refused_naming_the_field() {
    let dir = PluginDir::new();
    dir.configure(
        &json!({"experiment": {"config": {"experiments": {"tone": {"variants": {"A": -1}}}}}}),
    );
    let file = dir.add("experiment", "libexperiment.so");
    let message = format!("{:#}", dir.host().load(&file).unwrap_err());
    assert!(message.contains("experiments.tone.variants.A"), "{message}");
}
