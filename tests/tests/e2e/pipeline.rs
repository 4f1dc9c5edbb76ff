//! The task pipeline end to end: defaults without plugins, bad lines, every hook point, plugin
//! handlers, experiments, and (in `tuning`) the plugins that make the worker better as it runs.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::process::Command;

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

/// Runs the test build of `worker run` on `dir` with `input` as the tasks file (warnings and
/// above logged, state in a folder of its own); returns the output records and what it logged.
pub(crate) fn worker_run(dir: &PluginDir, input: &str) -> (Vec<Value>, String) {
    let tasks = dir.shadow().join("tasks.jsonl");
    std::fs::write(&tasks, input).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.shadow().join("state"))
        .args(["--log", "warn", "run", "--tasks"])
        .arg(&tasks)
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "worker run failed:\n{stderr}");
    let records = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (records, stderr)
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
    assert_eq!(
        records[2]["type"], "chat",
        "the fields that parsed are kept"
    );
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

/// `worker run`, the real binary, with the fixture subscribed to every hook point and failing
/// in each, so every delivery is one warning naming the hook: each point fires exactly as often
/// as the input and the loaded plugins say.
#[test]
fn every_documented_hook_point_fires() {
    let dir = PluginDir::new();
    let fail_everywhere: serde_json::Map<String, Value> = worker::hooks::HOOK_POINTS
        .iter()
        .chain(plugin_host::HookPoint::BUILT_IN)
        .map(|p| (p.name.to_owned(), json!("error")))
        .collect();
    dir.configure(&json!({
        "experiment": {"config": {"experiments": {"chat": {"variants": {"recall": 1}}}}},
        // Every delivery must reach it: no breaker.
        "fixture": {"config": {"on": fail_everywhere}, "breaker": false}
    }));
    dir.add("fixture", "libfixture.so");
    dir.add("experiment", "libexperiment.so");
    let chat = |id: &str| json!({"id": id, "type": "chat", "input": {"messages": [{"role": "user", "content": "My city is Lima."}, {"role": "user", "content": "What is my city?"}]}, "reference": "Lima"});
    let summarize = |id: &str, reference: Option<&str>| {
        let mut task = json!({"id": id, "type": "summarize", "input": {"title": "Orion price", "text": "Hello. The Orion price is 5 dollars."}});
        if let Some(reference) = reference {
            task["reference"] = json!(reference);
        }
        task
    };
    let poetry = |id: &str| json!({"id": id, "type": "poetry", "input": {}});
    // Chat tasks take the two-step `recall` handler (the experiment's only variant).
    let (chats, summaries, scored_summaries, unknown) = (3, 2, 1, 2);
    let mut lines: Vec<String> = Vec::new();
    for i in 0..chats {
        lines.push(chat(&format!("c{i}")).to_string());
    }
    for i in 0..summaries {
        let reference = (i < scored_summaries).then_some("The Orion price is 5 dollars.");
        lines.push(summarize(&format!("s{i}"), reference).to_string());
    }
    for i in 0..unknown {
        lines.push(poetry(&format!("p{i}")).to_string());
    }
    lines.push("not a task at all".to_owned());
    let (records, log) = worker_run(&dir, &(lines.join("\n") + "\n"));
    assert_eq!(records.len(), lines.len(), "{records:?}");

    let handled = chats + summaries;
    let expected: BTreeMap<&str, usize> = [
        ("worker.start", 1),
        ("worker.stop", 1),
        ("task.received", handled + unknown),
        ("task.before_handle", handled),
        ("task.after_step", chats),
        ("task.after_handle", handled),
        ("task.scored", chats + scored_summaries),
        ("task.error", unknown),
        // Both plugins load at the start, the fixture sees itself too.
        ("plugin.loaded", 2),
        // Nothing unloads while the run lasts; at the end the plugins leave together.
        ("plugin.unloaded", 0),
    ]
    .into_iter()
    .collect();
    let documented: Vec<&str> = worker::hooks::HOOK_POINTS
        .iter()
        .chain(plugin_host::HookPoint::BUILT_IN)
        .map(|p| p.name)
        .collect();
    assert_eq!(
        expected.keys().copied().collect::<Vec<_>>(),
        {
            let mut sorted = documented.clone();
            sorted.sort_unstable();
            sorted
        },
        "every documented point is counted"
    );
    let mut fired: BTreeMap<&str, usize> = documented.iter().map(|p| (*p, 0)).collect();
    for line in log
        .lines()
        .filter(|l| l.contains("hook subscriber failed") && l.contains("plugin=fixture"))
    {
        let hook = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("hook="))
            .unwrap_or_else(|| panic!("no hook named in {line:?}"));
        *fired
            .get_mut(hook)
            .unwrap_or_else(|| panic!("an undocumented hook point fired: {line}")) += 1;
    }
    assert_eq!(fired, expected, "log:\n{log}");
}

/// `task.after_step` replaces the messages between the steps of a multi-step handler, and the
/// next step works from them.
#[test]
fn an_after_step_hook_changes_what_the_next_step_sees() {
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
    let tasks = vec![
        json!({"id": "c1", "type": "chat", "input": {"messages": [{"role": "user", "content": "My city is Lima."}, {"role": "user", "content": "What is my order number?"}]}, "reference": "Quito"}),
    ];
    let (records, _) = run(&host, &tasks);
    assert_eq!(records[0]["handler"], "recall");
    assert_eq!(
        records[0]["output"], "Quito",
        "step 2 did not see the hook's messages"
    );
    assert_eq!(records[0]["score"], 1.0);
    let seen = host.execute("fixture", "seen", &json!(null)).unwrap();
    let steps: Vec<&Value> = seen
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["hook"] == "task.after_step")
        .collect();
    assert_eq!(steps.len(), 1, "{seen}");
    assert_eq!(steps[0]["payload"]["step"], 1);
    assert_eq!(
        steps[0]["payload"]["messages"]
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
    let outcomes = stats["chat"]["variants"]["recent"]["outcomes"]
        .as_u64()
        .unwrap()
        + stats["chat"]["variants"]["recall"]["outcomes"]
            .as_u64()
            .unwrap();
    assert_eq!(
        outcomes as usize,
        2 * counted,
        "outcomes recorded through task.scored"
    );
    // The A/B test tells the strategies apart.
    let recall = summary.mean_score("chat/recall/recall").unwrap();
    let recent = summary.mean_score("chat/recent/recent").unwrap();
    assert!(recall > recent + 0.2, "recall {recall} vs recent {recent}");
    let mean = |v: &str| stats["chat"]["variants"][v]["meanScore"].as_f64().unwrap();
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

/// `task.scored` and `task.error` name the handler and who chose it; the bandit is asked with the
/// task id as its key and learns only from the tasks it chose.
#[test]
fn scored_and_error_payloads_name_the_handler_and_its_chooser() {
    let dir = PluginDir::new();
    dir.configure(&json!({
        "experiment": {"config": {"experiments": {"chat": {"variants": {"recall": 1}}}}},
        "bandit": {"config": {"contexts": ["summarize"]}},
        // Changes chat's handler (summarize has no `recent`: ignored there).
        "fixture": {"config": {"on": {"task.before_handle": {"modify": {"handler": "recent"}}}}}
    }));
    dir.add("fixture", "libfixture.so");
    dir.add("experiment", "libexperiment.so");
    dir.add("bandit", "libbandit.so");
    let host = dir.host();
    host.scan().unwrap();
    let tasks = vec![
        json!({"id": "c1", "type": "chat", "input": {"messages": [{"role": "user", "content": "My city is Lima."}, {"role": "user", "content": "What is my city?"}]}, "reference": "Lima"}),
        json!({"id": "s1", "type": "summarize", "input": {"title": "Orion price", "text": "The Orion price is 5 dollars."}, "reference": "Orion price"}),
        json!({"id": "p1", "type": "poetry", "input": {}}),
    ];
    let (records, _) = run(&host, &tasks);
    assert_eq!(records[0]["handler"], "recent", "{}", records[0]);
    let seen = host.execute("fixture", "seen", &json!(null)).unwrap();
    let payload = |hook: &str, id: &str| -> Value {
        seen.as_array()
            .unwrap()
            .iter()
            .find(|e| e["hook"] == hook && e["payload"]["id"] == id)
            .unwrap_or_else(|| panic!("no {hook} for {id} in {seen}"))["payload"]
            .clone()
    };
    let chat = payload("task.scored", "c1");
    assert_eq!(
        (&chat["handler"], &chat["chooser"]),
        (&json!("recent"), &json!("task.before_handle")),
        "{chat}"
    );
    let summarize = payload("task.scored", "s1");
    assert_eq!(summarize["chooser"], "bandit", "{summarize}");
    let error = payload("task.error", "p1");
    assert_eq!(
        (&error["handler"], &error["chooser"], &error["type"]),
        (&Value::Null, &Value::Null, &json!("poetry")),
        "{error}"
    );
    // The bandit chose s1 with its id as the key and counted its score, once.
    let stats = host.execute("bandit", "stats", &json!({})).unwrap();
    let arm = &stats["summarize"]["arms"][summarize["handler"].as_str().unwrap()];
    assert_eq!(arm["pulls"], 1, "{stats}");

    // A task blocked after its handler ran names the handler and its chooser in task.error.
    let blocked = PluginDir::new();
    blocked.configure(&json!({
        "fixture": {"config": {"on": {"task.after_handle": {"block": {"reason": "no", "code": "no"}}}}}
    }));
    blocked.add("fixture", "libfixture.so");
    let host = blocked.host();
    host.scan().unwrap();
    let (records, _) = run(&host, &tasks[1..2]);
    assert_eq!(records[0]["blocked_by"], "fixture", "{}", records[0]);
    let seen = host.execute("fixture", "seen", &json!(null)).unwrap();
    let error = seen
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["hook"] == "task.error")
        .unwrap_or_else(|| panic!("no task.error in {seen}"));
    assert_eq!(
        (&error["payload"]["handler"], &error["payload"]["chooser"]),
        (&json!("lead"), &json!("default")),
        "{error}"
    );
}

/// `worker run` ends with each experiment's variants against the control: the difference, its
/// 95 % interval and the p-value.
#[test]
fn the_run_summary_compares_each_variant_with_the_control() {
    let dir = PluginDir::new();
    dir.configure(&json!({"experiment": {"config": {"experiments": {"chat": {
        "variants": {"recent": 1, "recall": 1}, "control": "recent"}}}}}));
    dir.add("experiment", "libexperiment.so");
    let input: String = example_tasks(200, 5)
        .iter()
        .map(|t| format!("{t}\n"))
        .collect();
    let (_, log) = worker_run(&dir, &input);
    assert!(
        log.contains("vs control") && log.contains("95% interval"),
        "{log}"
    );
    let line = log
        .lines()
        .find(|l| l.starts_with("chat ") && l.contains('[') && l.contains("recall"))
        .unwrap_or_else(|| panic!("no comparison line in:\n{log}"));
    // chat  recall  recent  <outcomes>  +0.xxx  [+0.xxx, +0.xxx]  <0.001
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&words[..3], ["chat", "recall", "recent"], "{line}");
    let diff: f64 = words[4].parse().unwrap();
    assert!(diff > 0.2, "recall beats recent: {line}");
    let low: f64 = words[5].trim_matches(['[', ',']).parse().unwrap();
    let high: f64 = words[6].trim_matches(']').parse().unwrap();
    assert!(low < diff && diff < high && low > 0.0, "{line}");
    assert_eq!(words[7], "<0.001", "{line}");
    assert!(!log.contains("MISMATCH"), "{log}");
}
