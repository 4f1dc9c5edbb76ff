//! The plugins that make the worker better while it runs, through the real pipeline: the
//! bandit converges, the champion is promoted and the promotion survives a restart, and each
//! of the others does its part.

use std::process::Command;

use serde_json::{Value, json};
use tests::PluginDir;
use worker::pipeline::example_tasks;

use crate::pipeline::run;

fn host_with(dir: &PluginDir, plugins: &[&str], config: Value) -> plugin_host::PluginHost {
    dir.configure(&config);
    for name in plugins {
        dir.add(name, &format!("lib{}.so", name.replace('-', "_")));
    }
    let host = dir.host();
    let report = host.scan().unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    host
}

#[test]
fn the_bandit_shifts_traffic_to_the_better_handler() {
    let dir = PluginDir::new();
    let host = host_with(
        &dir,
        &["bandit"],
        json!({"bandit": {"config": {"contexts": ["chat"], "exploration": 0.5}}}),
    );
    let (records, summary) = run(&host, &example_tasks(1000, 11));
    let chat: Vec<&Value> = records.iter().filter(|r| r["type"] == "chat").collect();
    let last_half = &chat[chat.len() / 2..];
    let recall = last_half
        .iter()
        .filter(|r| r["handler"] == "recall")
        .count();
    assert!(
        recall * 10 >= last_half.len() * 9,
        "recall got {recall} of the last {} chat tasks",
        last_half.len()
    );
    let stats = host
        .execute("bandit", "stats", &json!({"context": "chat"}))
        .unwrap();
    assert_eq!(stats["chat"]["best"], "recall");
    // Better than the default alone.
    assert!(summary.mean_score("chat/").unwrap() > 0.9, "{summary}");
    // The bandit does not touch types it is not configured for.
    assert!(
        records
            .iter()
            .filter(|r| r["type"] == "summarize")
            .all(|r| r["handler"] == "lead")
    );
}

#[test]
fn without_the_bandit_the_default_scores_worse() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &[], json!({}));
    let (_, summary) = run(&host, &example_tasks(1000, 11));
    assert!(summary.mean_score("chat/").unwrap() < 0.7, "{summary}");
}

fn champion_config() -> Value {
    json!({"champion": {"config": {
        "taskTypes": {"summarize": {"champion": "lead", "challenger": "title-match"}},
        "challengerShare": 0.3, "minScored": 30, "threshold": 0.05
    }}})
}

#[test]
fn the_champion_is_promoted_and_the_promotion_survives_a_restart() {
    let dir = PluginDir::new();
    dir.configure(&champion_config());
    dir.add("champion", "libchampion.so");
    let tasks = dir.path().parent().unwrap().join("tasks.jsonl");
    let text: String = example_tasks(600, 3)
        .iter()
        .map(|t| format!("{t}\n"))
        .collect();
    std::fs::write(&tasks, text).unwrap();
    let state = dir.shadow().join("state");
    let worker_run = |out: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
            .arg("--plugins")
            .arg(dir.path())
            .arg("--state-dir")
            .arg(&state)
            .args(["run", "--tasks", tasks.to_str().unwrap(), "--out"])
            .arg(dir.shadow().join(out))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let records: Vec<Value> = std::fs::read_to_string(dir.shadow().join(out))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (records, String::from_utf8(output.stdout).unwrap())
    };
    let (first, summary) = worker_run("first.jsonl");
    assert!(summary.contains("summarize  title-match"), "{summary}");
    let summarize: Vec<&Value> = first.iter().filter(|r| r["type"] == "summarize").collect();
    fn champion_of(r: &&&Value) -> bool {
        r["role"] == "champion"
    }
    // Early on the champion is lead; by the end it is title-match.
    assert_eq!(
        summarize.iter().find(champion_of).unwrap()["handler"],
        "lead"
    );
    assert_eq!(
        summarize.iter().rev().find(champion_of).unwrap()["handler"],
        "title-match"
    );
    assert!(state.join("champion.json").is_file());

    // A new process: the promotion holds from the first task on.
    let (second, _) = worker_run("second.jsonl");
    let summarize: Vec<&Value> = second.iter().filter(|r| r["type"] == "summarize").collect();
    assert_eq!(
        summarize.iter().find(champion_of).unwrap()["handler"],
        "title-match"
    );
    let status = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(&state)
        .args(["call", "champion", "status", r#"{"taskType": "summarize"}"#])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["summarize"]["champion"], "title-match");
    assert_eq!(status["summarize"]["promotions"][0]["from"], "lead");
}

#[test]
fn the_profiler_and_attribution_observe_every_scored_task() {
    let dir = PluginDir::new();
    let host = host_with(
        &dir,
        &["profiler", "attribution", "experiment"],
        json!({"experiment": {"config": {"experiments": {"chat": {"variants": {"recent": 1, "recall": 1}}}}}}),
    );
    let (records, _) = run(&host, &example_tasks(400, 9));
    let chat = records.iter().filter(|r| r["type"] == "chat").count() as u64;
    let percentiles = host
        .execute("profiler", "percentiles", &json!({"kind": "type"}))
        .unwrap();
    assert_eq!(percentiles["type"]["chat"]["count"].as_u64().unwrap(), chat);
    assert!(
        percentiles["type"]["chat"]["p95"].as_f64().unwrap()
            >= percentiles["type"]["chat"]["p50"].as_f64().unwrap()
    );
    let by_plugin = host
        .execute("profiler", "percentiles", &json!({"kind": "plugin"}))
        .unwrap();
    assert!(
        by_plugin["plugin"]["experiment"]["count"].as_u64().unwrap() > 0,
        "{by_plugin}"
    );
    let report = host.execute("attribution", "report", &json!(null)).unwrap();
    assert_eq!(report["all"]["n"].as_u64().unwrap(), records.len() as u64);
    assert!(report["chat:recall"]["n"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["chat:recall"]["meanScore"].as_f64().unwrap()
            > report["chat:recent"]["meanScore"].as_f64().unwrap()
    );
}

#[test]
fn the_task_policy_and_the_model_router_shape_each_task() {
    let dir = PluginDir::new();
    let host = host_with(
        &dir,
        &["task-policy", "model-router", "echo"],
        json!({
            "task-policy": {"config": {"profiles": {"summarize": {"maxWords": 3, "handlers": ["lead", "plugin:echo"]}}}},
            "model-router": {"config": {"rules": [
                {"taskType": "chat", "handler": "recall"},
                {"taskType": "summarize", "handler": "title-match"},
                {"taskType": "summarize", "handler": "plugin:echo"}
            ]}}
        }),
    );
    let (records, _) = run(&host, &example_tasks(100, 2));
    for record in &records {
        if record["type"] == "chat" {
            assert_eq!(record["handler"], "recall", "{record}");
        } else {
            // title-match is not in the policy's handler family, so the router's next rule wins.
            assert_eq!(record["handler"], "plugin:echo", "{record}");
            assert!(
                record["output"]
                    .as_str()
                    .unwrap()
                    .split_whitespace()
                    .count()
                    <= 3,
                "{record}"
            );
        }
    }
    let rules = host.execute("model-router", "rules", &json!(null)).unwrap();
    assert!(rules[0]["matched"].as_u64().unwrap() > 0, "{rules}");
}

#[test]
fn a_misbehaving_plugin_never_stops_the_pipeline() {
    let dir = PluginDir::new();
    // faulty's task.received hook panics on every task; the pipeline goes on.
    let host = host_with(
        &dir,
        &["faulty", "bandit"],
        json!({"faulty": {"breaker": false}}),
    );
    let (records, summary) = run(&host, &example_tasks(50, 4));
    assert_eq!(summary.completed, 50);
    assert!(records.iter().all(|r| r["score"].is_number()));
    assert_eq!(host.plugin("faulty").unwrap().stats.panics, 50);
    drop(host);

    // With the default breaker, five panics in a row open it: the other deliveries are refused
    // without reaching the plugin (the cool-down, 30 s, outlasts the run).
    let dir = PluginDir::new();
    let host = host_with(&dir, &["faulty", "bandit"], json!({}));
    let (records, summary) = run(&host, &example_tasks(50, 4));
    assert_eq!(summary.completed, 50);
    assert!(records.iter().all(|r| r["score"].is_number()));
    let faulty = host.plugin("faulty").unwrap();
    assert_eq!(faulty.stats.panics, 5);
    assert_eq!(faulty.health.breaker, "open");
    assert_eq!(faulty.health.times_opened, 1);
    assert_eq!(faulty.health.calls_refused, 45);
}
