//! The experimentation plugins' statistics through the host: independent assignment, a sound
//! promotion rule, intervals and p-values, the sample-ratio check, unique keys, learning only
//! from routed tasks, and the profiler's percentile rank.

use plugin_api::stats::chi_square_sf;
use serde_json::{Value, json};
use tests::PluginDir;

/// The bundled configuration (`plugins/plugins.json`) of `names`.
fn bundled(names: &[&str]) -> Value {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/plugins.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut picked = serde_json::Map::new();
    for name in names {
        picked.insert((*name).to_owned(), all["plugins"][*name].clone());
    }
    Value::Object(picked)
}

fn host_with(dir: &PluginDir, plugins: &[&str], config: &Value) -> plugin_host::PluginHost {
    dir.configure(config);
    for name in plugins {
        dir.add(name, &format!("lib{}.so", name.replace('-', "_")));
    }
    let host = dir.host();
    let report = host.scan().unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    host
}

/// Pearson's chi-square test of independence of a table of counts: its p-value.
fn independence_p(table: &[Vec<u64>]) -> f64 {
    let rows: Vec<f64> = table.iter().map(|r| r.iter().sum::<u64>() as f64).collect();
    let cols: Vec<f64> = (0..table[0].len())
        .map(|j| table.iter().map(|r| r[j]).sum::<u64>() as f64)
        .collect();
    let n: f64 = rows.iter().sum();
    let mut statistic = 0.0;
    for (i, row) in table.iter().enumerate() {
        for (j, &observed) in row.iter().enumerate() {
            let expected = rows[i] * cols[j] / n;
            statistic += (observed as f64 - expected).powi(2) / expected;
        }
    }
    let df = ((rows.len() - 1) * (cols.len() - 1)) as f64;
    chi_square_sf(statistic, df)
}

/// With the bundled configuration, a task's variant and its champion/challenger role are
/// independent: before each plugin hashed in its own namespace, every challenger task got the
/// variant `full` (challenger/short = 0 of 20,000).
#[test]
fn the_experiment_and_the_champion_assign_independently() {
    let dir = PluginDir::new();
    let host = host_with(
        &dir,
        &["experiment", "champion"],
        &bundled(&["experiment", "champion"]),
    );
    // Rows: champion, challenger; columns: full, short.
    let mut table = vec![vec![0u64; 2]; 2];
    for i in 0..20_000 {
        let key = format!("task-{i}");
        let variant = host
            .execute(
                "experiment",
                "pickVariant",
                &json!({"experiment": "summarize", "key": key}),
            )
            .unwrap();
        let route = host
            .execute(
                "champion",
                "route",
                &json!({"taskType": "summarize", "key": key}),
            )
            .unwrap();
        let row = usize::from(route["role"] == "challenger");
        let col = usize::from(variant == "short");
        table[row][col] += 1;
    }
    let p = independence_p(&table);
    assert!(
        table.iter().flatten().all(|&c| c > 0) && p > 0.001,
        "variant and role are dependent: {table:?} (champion/challenger × full/short), p = {p:e}"
    );
}

/// A score like the example set's token F1: often 0 or 1, otherwise spread between.
fn example_like_score(random: &plugin_api::assign::Random) -> f64 {
    let u = random.next_unit();
    if u < 0.2 {
        0.0
    } else if u < 0.5 {
        1.0
    } else {
        0.2 + 0.6 * random.next_unit()
    }
}

/// Runs `experiments` champion/challenger experiments of `tasks` tasks each through the loaded
/// plugin (one task type per experiment), the challenger's scores shifted by `shift`; answers
/// how many ended in a promotion.
fn promotions(
    host: &plugin_host::PluginHost,
    prefix: &str,
    experiments: usize,
    tasks: usize,
    shift: f64,
) -> usize {
    let random = plugin_api::assign::Random::new(17);
    for e in 0..experiments {
        let task_type = format!("{prefix}{e}");
        for t in 0..tasks {
            let id = format!("{task_type}-{t}");
            let route = host
                .execute(
                    "champion",
                    "route",
                    &json!({"taskType": task_type, "key": id}),
                )
                .unwrap();
            let mut score = example_like_score(&random);
            if route["role"] == "challenger" {
                score = (score + shift).clamp(0.0, 1.0);
            }
            host.fire(worker::hooks::TASK_SCORED, || {
                json!({"id": id, "type": task_type, "handler": route["handler"],
                       "role": route["role"], "score": score})
            })
            .unwrap();
        }
    }
    let status = host.execute("champion", "status", &json!(null)).unwrap();
    (0..experiments)
        .filter(|e| {
            status[format!("{prefix}{e}")]["promotions"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        })
        .count()
}

/// The promotion rule's false-promotion rate is at most its configured `alpha` (the default,
/// 5 %), checked at every scored task: 300 experiments with equal arms and 300 with a slightly
/// worse challenger (−0.02), 300 tasks each, half to the challenger, a look every 30 scores per
/// arm, no threshold. The allowance for simulation noise is three binomial standard errors at
/// 5 % over 300 experiments (3.8 points). The old running-mean rule promoted in about half.
#[test]
fn the_champion_rarely_promotes_an_equal_or_worse_challenger() {
    const EXPERIMENTS: usize = 300;
    let mut task_types = serde_json::Map::new();
    for prefix in ["equal-", "worse-"] {
        for e in 0..EXPERIMENTS {
            task_types.insert(
                format!("{prefix}{e}"),
                json!({"champion": "a", "challenger": "b"}),
            );
        }
    }
    let dir = PluginDir::new();
    let host = host_with(
        &dir,
        &["champion"],
        &json!({"champion": {"config": {"taskTypes": task_types, "challengerShare": 0.5,
                "minScored": 30, "threshold": 0.0, "seed": 5}}}),
    );
    let allowed = 0.05 + 3.0 * (0.05f64 * 0.95 / EXPERIMENTS as f64).sqrt();
    for (prefix, shift) in [("equal-", 0.0), ("worse-", -0.02)] {
        let promoted = promotions(&host, prefix, EXPERIMENTS, 300, shift);
        let rate = promoted as f64 / EXPERIMENTS as f64;
        assert!(
            rate <= allowed,
            "{prefix}: {promoted} of {EXPERIMENTS} promoted ({rate:.3} > {allowed:.3})"
        );
    }
}

fn close(got: &Value, want: f64, tolerance: f64) {
    let got = got.as_f64().unwrap_or(f64::NAN);
    assert!(
        (got - want).abs() <= tolerance,
        "got {got}, want {want} ± {tolerance}"
    );
}

/// `experiment.stats`: per variant the mean with its 95 % interval, the difference from the
/// control with its interval and Welch p-value, calls and unique keys, and the sample-ratio
/// check, checked against textbook values (R: `t.test(b, a)` on 1..5 and 2..10, scaled).
#[test]
fn experiment_stats_report_intervals_p_values_and_unique_keys() {
    let dir = PluginDir::new();
    let host = host_with(
        &dir,
        &["experiment"],
        &json!({"experiment": {"config": {"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}}}}),
    );
    for i in 1..=5 {
        for (variant, score) in [("A", 0.1 * f64::from(i)), ("B", 0.2 * f64::from(i))] {
            let params = json!({"experiment": "tone", "variant": variant, "score": score});
            assert_eq!(host.call("experiment", "recordOutcome", &params), Ok(None));
        }
    }
    for _ in 0..3 {
        for i in 0..1000 {
            let key = format!("user-{i}");
            host.execute(
                "experiment",
                "pickVariant",
                &json!({"experiment": "tone", "key": key}),
            )
            .unwrap();
        }
    }
    let stats = host
        .execute("experiment", "stats", &json!({"experiment": "tone"}))
        .unwrap();
    let tone = &stats["tone"];
    assert_eq!(tone["control"], "A");
    let (a, b) = (&tone["variants"]["A"], &tone["variants"]["B"]);
    close(&a["meanScore"], 0.3, 1e-9);
    // 0.3 ± t(0.975, 4) · √(0.025/5)
    close(&a["ciLow"], 0.3 - 0.196_324, 1e-5);
    close(&a["ciHigh"], 0.3 + 0.196_324, 1e-5);
    assert_eq!(a["vsControl"], Value::Null);
    close(&b["vsControl"]["diff"], 0.3, 1e-9);
    close(&b["vsControl"]["pValue"], 0.107_5, 5e-4);
    assert!(b["vsControl"]["ciLow"].as_f64().unwrap() < 0.0);
    assert!(b["vsControl"]["ciHigh"].as_f64().unwrap() > 0.3);

    let assigned = a["assigned"].as_u64().unwrap() + b["assigned"].as_u64().unwrap();
    assert_eq!(assigned, 3000);
    let unique = a["uniqueKeys"].as_u64().unwrap() + b["uniqueKeys"].as_u64().unwrap();
    assert!(
        (950..=1050).contains(&unique),
        "{unique} unique keys of 1000"
    );
    assert!(
        tone["sampleRatio"]["pValue"].as_f64().unwrap() > 0.001,
        "{tone}"
    );
    assert_eq!(tone["sampleRatio"]["mismatch"], false);
}

/// Weights changed mid-experiment (1:1, then 1:3 for the same counts): the assignments no longer
/// fit the configured weights, and `experiment.stats` says so.
#[test]
fn a_sample_ratio_mismatch_is_flagged() {
    let dir = PluginDir::new();
    let config = |b: u32| json!({"experiment": {"config": {"experiments": {"tone": {"variants": {"A": 1, "B": b}}}}}});
    let host = host_with(&dir, &["experiment"], &config(1));
    for i in 0..4000 {
        host.execute(
            "experiment",
            "pickVariant",
            &json!({"experiment": "tone", "key": format!("user-{i}")}),
        )
        .unwrap();
    }
    let fits = host.execute("experiment", "stats", &json!(null)).unwrap();
    assert_eq!(fits["tone"]["sampleRatio"]["mismatch"], false, "{fits}");
    dir.configure(&config(3));
    host.reload_config().unwrap();
    let stats = host.execute("experiment", "stats", &json!(null)).unwrap();
    let ratio = &stats["tone"]["sampleRatio"];
    assert_eq!(ratio["mismatch"], true, "{stats}");
    assert!(ratio["pValue"].as_f64().unwrap() < 1e-6, "{stats}");
}

/// The profiler's percentile is the value of integer nearest rank: p7 of 1..=100 ms is the 7th
/// value, in the bucket ending at 10^0.9 ms. Float arithmetic made the rank 8 (0.07 · 100 =
/// 7.000000000000001), whose bucket ends at 10 ms.
#[test]
fn the_profiler_uses_the_integer_nearest_rank() {
    let dir = PluginDir::new();
    let host = host_with(&dir, &["profiler"], &json!({}));
    for ms in 1..=100 {
        let params = json!({"kind": "type", "key": "chat", "ms": f64::from(ms)});
        assert_eq!(host.call("profiler", "observeLatency", &params), Ok(None));
    }
    let answer = host
        .execute(
            "profiler",
            "percentiles",
            &json!({"kind": "type", "key": "chat", "p": [7]}),
        )
        .unwrap();
    let p7 = answer["type"]["chat"]["p7"].as_f64().unwrap();
    assert!(
        (7.0..10f64.powf(0.9) + 1e-9).contains(&p7),
        "p7 of 1..=100 ms reported as {p7}"
    );
}

/// The champion and the bandit learn only from the tasks they routed, and a failed task
/// (`task.error`) counts as a score of 0 for the handler it was routed to.
#[test]
fn champion_and_bandit_learn_only_from_their_tasks_and_count_failures() {
    let dir = PluginDir::new();
    let host = host_with(
        &dir,
        &["champion", "bandit"],
        &json!({
            "champion": {"config": {"taskTypes": {"summarize": {"champion": "lead", "challenger": "title-match"}}}},
            "bandit": {"config": {"contexts": ["chat"]}},
        }),
    );
    let scored = |id: &str, task_type: &str, handler: &Value, score: f64| {
        host.fire(worker::hooks::TASK_SCORED, || {
            json!({"id": id, "type": task_type, "handler": handler, "role": null, "score": score})
        })
        .unwrap();
    };
    let failed = |id: &str, task_type: &str| {
        host.fire(
            worker::hooks::TASK_ERROR,
            || json!({"id": id, "type": task_type, "error": "handler lead failed: boom"}),
        )
        .unwrap();
    };
    // Tasks someone else routed: not counted.
    scored("other-1", "summarize", &json!("lead"), 0.9);
    scored("other-2", "chat", &json!("recall"), 0.9);
    // A routed task that ran and one that failed.
    let routed = host
        .execute(
            "champion",
            "route",
            &json!({"taskType": "summarize", "key": "s-1"}),
        )
        .unwrap();
    scored("s-1", "summarize", &routed["handler"], 0.9);
    let failing = host
        .execute(
            "champion",
            "route",
            &json!({"taskType": "summarize", "key": "s-2"}),
        )
        .unwrap();
    failed("s-2", "summarize");
    let chosen = host
        .execute(
            "bandit",
            "choose",
            &json!({"context": "chat", "arms": ["recall"], "key": "c-1"}),
        )
        .unwrap();
    failed("c-1", "chat");

    let status = host.execute("champion", "status", &json!(null)).unwrap();
    let arms = &status["summarize"]["scored"];
    let count = |h: &Value| arms[h.as_str().unwrap()]["count"].as_u64().unwrap();
    let total: u64 = ["lead", "title-match"]
        .iter()
        .map(|h| arms[h]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 2, "{status}");
    assert!(
        count(&routed["handler"]) >= 1 && count(&failing["handler"]) >= 1,
        "{status}"
    );
    let sum: f64 = ["lead", "title-match"]
        .iter()
        .map(|h| arms[h]["meanScore"].as_f64().unwrap_or(0.0) * arms[h]["count"].as_f64().unwrap())
        .sum();
    assert!((sum - 0.9).abs() < 1e-9, "the failure counts 0: {status}");

    let stats = host
        .execute("bandit", "stats", &json!({"context": "chat"}))
        .unwrap();
    let arm = &stats["chat"]["arms"][chosen.as_str().unwrap()];
    assert_eq!(
        (&arm["pulls"], &arm["meanReward"]),
        (&json!(1), &json!(0.0)),
        "{stats}"
    );
}
