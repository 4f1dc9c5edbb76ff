//! The task pipeline end to end: defaults without plugins, bad lines, every hook point, plugin
//! handlers, experiments, and (in `tuning`) the plugins that make the worker better as it runs.

use std::io::Cursor;

use serde_json::{Value, json};
use tests::PluginDir;
use worker::Worker;
use worker::pipeline::{DEFAULT_MAX_LINE_BYTES, Summary, example_tasks};

/// Runs `tasks` through the pipeline of `host`; returns the output records and the summary.
pub(crate) fn run(host: &plugin_host::PluginHost, tasks: &[Value]) -> (Vec<Value>, Summary) {
    let input: String = tasks.iter().map(|t| format!("{t}\n")).collect();
    run_text(host, &input)
}

pub(crate) fn run_text(host: &plugin_host::PluginHost, input: &str) -> (Vec<Value>, Summary) {
    let mut out = Vec::new();
    // The worker's job: worker.start, the tasks, worker.stop.
    let worker = Worker::start(host.clone());
    let summary = worker
        .run_tasks(
            Cursor::new(input.to_owned()),
            &mut out,
            DEFAULT_MAX_LINE_BYTES,
            |_| {},
        )
        .unwrap();
    worker.stop("tasks done");
    let records = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (records, summary)
}

#[test]
fn without_any_plugin_the_defaults_run() {
    let dir = PluginDir::new();
    let host = dir.host();
    host.scan().unwrap();
    let tasks = example_tasks(200, 1);
    let (records, summary) = run(&host, &tasks);
    assert_eq!(records.len(), 200);
    assert_eq!(summary.completed, 200);
    for record in &records {
        let expected = if record["type"] == "chat" {
            "recent"
        } else {
            "lead"
        };
        assert_eq!(record["handler"], expected, "{record}");
        assert_eq!(record["variant"], Value::Null);
        assert!(record["score"].as_f64().unwrap() >= 0.0);
    }
    let text = summary.to_string();
    assert!(
        text.contains("chat       recent") && text.contains("200 tasks done"),
        "{text}"
    );
}

#[test]
fn bad_lines_get_error_records_and_processing_goes_on() {
    let dir = PluginDir::new();
    let host = dir.host();
    let good = json!({"id": "ok-1", "type": "chat", "input": {"messages": [{"role": "user", "content": "My city is Oslo."}, {"role": "user", "content": "What is my city?"}]}, "reference": "Oslo"});
    let input = format!(
        "{good}\nnot json at all\n\n{}\n{}\n{}\n{good}\n",
        json!({"id": "x", "type": "chat"}),
        json!({"id": "y", "type": "poetry", "input": {}}),
        json!({"id": "z", "type": "summarize", "input": {"title": "no text"}}),
    );
    let (records, summary) = run_text(&host, &input);
    assert_eq!(records.len(), 6, "{records:?}");
    assert_eq!(records[0]["id"], "ok-1");
    assert_eq!(records[1]["line"], 2);
    assert!(
        records[1]["error"]
            .as_str()
            .unwrap()
            .contains("line 2 is not a task"),
        "{}",
        records[1]
    );
    assert_eq!(records[2]["line"], 4);
    assert!(
        records[2]["error"]
            .as_str()
            .unwrap()
            .contains("missing field `input`"),
        "{}",
        records[2]
    );
    assert_eq!(records[2]["id"], "x");
    assert!(
        records[3]["error"]
            .as_str()
            .unwrap()
            .contains("unknown task type `poetry`"),
        "{}",
        records[3]
    );
    assert!(
        records[4]["error"].as_str().unwrap().contains("input.text"),
        "{}",
        records[4]
    );
    assert_eq!(records[5]["score"], 1.0);
    assert_eq!(
        (summary.completed, summary.failed, summary.bad_lines),
        (2, 4, 2)
    );
}

#[test]
fn every_documented_hook_point_fires() {
    let dir = PluginDir::new();
    dir.configure(&json!({
        "experiment": {"config": {"experiments": {"chat": {"variants": {"recall": 1}}}}},
        "fixture": {"config": {"on": {"task.after_step": {"modify": {"messages": [
            {"role": "user", "content": "My city is Quito."},
            {"role": "assistant", "content": "Looking for: city"}
        ]}}}}}
    }));
    dir.add("fixture", "libfixture.so");
    dir.add("experiment", "libexperiment.so");
    let host = dir.host();
    host.scan().unwrap();
    let echo = dir.add("echo", "libecho.so");
    host.load(&echo).unwrap();
    host.unload("echo").unwrap();
    let tasks = vec![
        json!({"id": "c1", "type": "chat", "input": {"messages": [{"role": "user", "content": "My city is Lima."}, {"role": "user", "content": "What is my order number?"}]}, "reference": "Quito"}),
        json!({"id": "bad", "type": "poetry", "input": {}}),
    ];
    let (records, _) = run(&host, &tasks);
    // The after_step hook replaced the messages, and step 2 worked from them.
    assert_eq!(records[0]["handler"], "recall");
    assert_eq!(
        records[0]["output"], "Quito",
        "step 2 did not see the hook's messages"
    );
    assert_eq!(records[0]["score"], 1.0);
    let seen = host.execute("fixture", "seen", &json!(null)).unwrap();
    let fired: Vec<&str> = seen
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["hook"].as_str().unwrap())
        .collect();
    for point in host.hook_points() {
        assert!(
            fired.contains(&point.name),
            "{} never fired; fired: {fired:?}",
            point.name
        );
    }
    let step = seen
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["hook"] == "task.after_step")
        .unwrap();
    assert_eq!(step["payload"]["step"], 1);
    assert_eq!(
        step["payload"]["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["content"],
        "Looking for: order number"
    );
}

#[test]
fn a_blocked_task_is_skipped_and_says_why() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {"on": {"task.received": {"block": {"reason": "not today", "code": "closed"}}}}}}));
    dir.add("fixture", "libfixture.so");
    let host = dir.host();
    host.scan().unwrap();
    let (records, summary) = run(&host, &example_tasks(3, 1));
    assert_eq!(summary.blocked, 3);
    assert_eq!(records[0]["blocked_by"], "fixture");
    assert!(
        records[0]["error"].as_str().unwrap().contains("not today"),
        "{}",
        records[0]
    );
}

#[test]
fn experiment_variants_are_recorded_sticky_and_counted() {
    let dir = PluginDir::new();
    dir.configure(&json!({"experiment": {"config": {"experiments": {"chat": {"variants": {"recent": 1, "recall": 1}}}}}}));
    dir.add("experiment", "libexperiment.so");
    let host = dir.host();
    host.scan().unwrap();
    let tasks = example_tasks(300, 5);
    let (first, summary) = run(&host, &tasks);
    let (second, _) = run(&host, &tasks);
    let mut counted = 0;
    for (a, b) in first.iter().zip(&second) {
        if a["type"] == "chat" {
            assert_eq!(a["experiment"], "chat");
            assert!(a["variant"] == "recent" || a["variant"] == "recall", "{a}");
            assert_eq!(a["handler"], a["variant"], "the variant names the handler");
            assert_eq!(a["variant"], b["variant"], "not sticky for {}", a["id"]);
            counted += 1;
        } else {
            assert_eq!(a["variant"], Value::Null, "{a}");
        }
    }
    let stats = host
        .execute("experiment", "stats", &json!({"experiment": "chat"}))
        .unwrap();
    let outcomes = stats["chat"]["recent"]["outcomes"].as_u64().unwrap()
        + stats["chat"]["recall"]["outcomes"].as_u64().unwrap();
    assert_eq!(
        outcomes as usize,
        2 * counted,
        "outcomes recorded through task.scored"
    );
    // The A/B test tells the strategies apart.
    let recall = summary.mean_score("chat/recall/recall").unwrap();
    let recent = summary.mean_score("chat/recent/recent").unwrap();
    assert!(recall > recent + 0.2, "recall {recall} vs recent {recent}");
    let mean = |v: &str| stats["chat"][v]["meanScore"].as_f64().unwrap();
    assert!(mean("recall") > mean("recent"));
}

#[test]
fn a_plugin_handler_competes_with_the_built_in_ones() {
    let dir = PluginDir::new();
    dir.configure(&json!({"experiment": {"config": {"experiments": {"summarize": {"variants": {"plugin:echo": 1}}}}}}));
    dir.add("experiment", "libexperiment.so");
    dir.add("echo", "libecho.so");
    let host = dir.host();
    host.scan().unwrap();
    let task = json!({"id": "s", "type": "summarize", "input": {"title": "Orion price", "text": "Hello. The Orion price is 5 dollars."}, "reference": "The Orion price is 5 dollars."});
    let (records, _) = run(&host, &[task]);
    assert_eq!(records[0]["handler"], "plugin:echo");
    assert_eq!(records[0]["output"], "Orion price");
}
