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

fn host_with(dir: &PluginDir, plugins: &[&str], config: &Value) -> host::PluginHost {
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
