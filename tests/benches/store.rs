//! The task pipeline with all the example plugins, their state in files (no store), in an
//! SQLite store and in a Redis store (a `redis-server` started for the run), measured in one
//! run: `cargo bench -p tests --bench store`. Each round runs the 1200 example tasks under
//! fresh task ids (a store counts a task id once, so a replay would be cheaper), the same in
//! the three setups, whose plugins are seeded alike (see `host`); the three setups take
//! turns of an untimed round and a timed one (`STORE_BENCH_TURN`), 300 timed rounds
//! (`STORE_BENCH_ROUNDS`, rounded up to whole turns) after 3 s of untimed ones
//! (`STORE_BENCH_WARMUP_S`); the medians (and the fastest rounds, and the pipeline thread's
//! median time on the CPU) are printed with their ratio to the file state, and the median of
//! each round's ratio to the file state's round of the same place in the same turn (paired:
//! what slows the machine for a while slows both), and the range of the turns' ratios.
//! `STORE_BENCH_ONLY=SQLite` (or `file state`, `Redis`) runs one setup alone, to count its
//! instructions with callgrind or profile it (with `STORE_BENCH_FLUSH_MS=3600000`, no flush
//! inside the rounds); `STORE_BENCH_VERBOSE=1` prints each round (time, the pipeline thread's
//! time on the CPU and waiting for it, minor page faults).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::io::Cursor;
use std::time::Duration;

use plugin_host::store::{Store, StoreOptions};
use tests::{PluginDir, RedisServer};
use worker::pipeline::{Pipeline, example_tasks};

const PLUGINS: &[&str] = &[
    "echo",
    "experiment",
    "bandit",
    "champion",
    "profiler",
    "attribution",
    "task-policy",
    "model-router",
];

fn host(dir: &PluginDir, store: Option<Store>) -> plugin_host::PluginHost {
    // The bundled configuration, seeded alike in the three setups. The bandit, the champion and
    // the experiment choose the handler a task runs, and the handlers' work is about a sixth of
    // the pipeline's. The bandit draws at random (the other two only for calls without a key,
    // which the pipeline never makes: they split tasks by a hash of the task id, the same in
    // the three setups below). Unseeded, one setup's handlers ran 25.0 k instructions a task in
    // one run and 29.0 k in another (callgrind), which moves a setup's time against another's
    // by a few percent for reasons that are not the store (`docs/store-benchmark.md`, tenth
    // round).
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/plugins.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundled).unwrap()).unwrap();
    for name in ["experiment", "bandit", "champion"] {
        config["plugins"][name]["config"]["seed"] = serde_json::json!(7);
    }
    std::fs::write(
        dir.path().join("plugins.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    for name in PLUGINS {
        dir.add(name, &format!("lib{}.so", name.replace('-', "_")));
    }
    let mut builder = worker::hooks::host_builder(dir.path()).with_shadow_dir(dir.shadow());
    if let Some(store) = store {
        builder = builder.with_store(store);
    }
    let host = builder.build().unwrap();
    let report = host.scan().unwrap();
    assert_eq!(report.loaded.len(), PLUGINS.len(), "{:?}", report.refused);
    host
}

fn main() {
    let tasks: Vec<String> = example_tasks(1200, 42)
        .iter()
        .map(ToString::to_string)
        .collect();
    // `STORE_BENCH_FLUSH_MS` sets the flush interval (1000 by default): under callgrind, whose
    // rounds take seconds, a long one keeps flushes out of the rounds as in a plain run, so the
    // counts do not depend on how many flushes fell inside them.
    let flush_ms = env_or("STORE_BENCH_FLUSH_MS", 1000);
    let options = StoreOptions {
        flush_interval: Duration::from_millis(flush_ms),
        timeout: Duration::from_secs(5),
    };
    let redis = RedisServer::start();
    let sqlite_dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}", sqlite_dir.path().join("store.db").display());
    let dirs = [PluginDir::new(), PluginDir::new(), PluginDir::new()];
    let setups = [
        ("file state", host(&dirs[0], None)),
        (
            "SQLite",
            host(&dirs[1], Some(Store::open(&sqlite_url, options).unwrap())),
        ),
        (
            "Redis",
            host(&dirs[2], Some(Store::open(&redis.url(), options).unwrap())),
        ),
    ];
    // `STORE_BENCH_ONLY=SQLite` (or `file state`, `Redis`) runs one setup alone, for callgrind.
    let only = std::env::var("STORE_BENCH_ONLY").ok();
    if let Some(only) = &only {
        assert!(
            setups.iter().any(|(name, _)| name == only),
            "STORE_BENCH_ONLY: `{only}` is none of `file state`, `SQLite`, `Redis`"
        );
    }
    // `STORE_BENCH_ROUNDS` (300 by default, about a minute and a half): single rounds' ratios
    // to the file state's spread by tens of percent on a machine whose speed moves, and over
    // nine runs of 100 rounds the SQLite store's median moved with a standard deviation of
    // 4.4 points, over nine of 300 of 2.8 (Redis 4.8 and 4.2; `docs/store-benchmark.md`, ninth
    // round). More rounds also make the setup's share of a profile small.
    let rounds: usize = env_or("STORE_BENCH_ROUNDS", 300);
    assert!(rounds >= 1, "STORE_BENCH_ROUNDS: at least one round");
    // Untimed rounds first, for `STORE_BENCH_WARMUP_S` seconds (3 by default: three flush
    // intervals): a worker runs for hours, and its store's buffers, grown in the first second
    // and then reused, are part of its steady state. Timing a store's first second alone
    // measured the price of touching new memory, which on a virtual machine is a fault to the
    // hypervisor per page (3 to 24 µs here).
    let warmup = Duration::from_secs_f64(env_or("STORE_BENCH_WARMUP_S", 3.0));
    let warming = std::time::Instant::now();
    // Each setup runs `STORE_BENCH_TURN` timed rounds in a row (1 by default) before the next
    // one's turn, after one untimed round. A worker runs one host; here three hosts, each with
    // its own copies of the eight plugins, share one core's caches, and the first round of a
    // turn starts with the other setups' code and data in them: the untimed round takes that
    // switch (0.4 to 1 ms for the file state, 0.9 to 2.9 ms for a store, whose filters, copies
    // and buffers are more to bring back), a cost no worker pays. Turns of one timed round
    // pair each round with the file state's of a tenth of a second before: this machine's
    // speed moves by tens of percent within a second or two, and in turns of 10 rounds (half
    // a second) single runs' medians of one build spread from -20 to +31 % against the file
    // state, in turns of one from +4 to +17 % (`docs/store-benchmark.md`, eighth round). The
    // paired ratio moves less either way.
    let turn: usize = env_or("STORE_BENCH_TURN", 1);
    assert!(
        (1..=1000).contains(&turn),
        "STORE_BENCH_TURN: 1 to 1000 timed rounds a turn, found {turn}"
    );
    let (mut warm_rounds, mut timed_rounds) = (0, 0);
    let mut times = vec![Vec::new(); setups.len()];
    // The pipeline thread's time on the CPU, each round: less moved than the wall clock by
    // what else runs on the machine.
    let mut cpu = vec![Vec::new(); setups.len()];
    while timed_rounds < rounds {
        let warm = warming.elapsed() < warmup;
        // The turn's rounds, the first one untimed.
        let first = warm_rounds + timed_rounds;
        warm_rounds += if warm { turn + 1 } else { 1 };
        if !warm {
            timed_rounds += turn;
        }
        for (i, (name, host)) in setups.iter().enumerate() {
            if only.as_deref().is_some_and(|o| o != *name) {
                continue;
            }
            for round in first..=first + turn {
                let timed = !warm && round > first;
                let text: String = tasks
                    .iter()
                    .map(|t| t.replacen("\"id\":\"", &format!("\"id\":\"{round}-"), 1) + "\n")
                    .collect();
                let flt0 = minflt();
                let sched0 = schedstat();
                let started = std::time::Instant::now();
                let mut out = Vec::with_capacity(1 << 20);
                let summary = Pipeline::new(host.clone())
                    .run_stream(Cursor::new(text.as_bytes()), &mut out, |_| {})
                    .unwrap();
                assert_eq!(summary.completed, 1200);
                if !timed {
                    continue;
                }
                let elapsed = started.elapsed();
                let sched = schedstat();
                times[i].push(elapsed.as_secs_f64());
                cpu[i].push((sched.0 - sched0.0) as f64 / 1e9);
                if std::env::var_os("STORE_BENCH_VERBOSE").is_some() {
                    eprintln!(
                        "{name} round {round} ({} of its turn): {:.1} ms, on the CPU {:.1} ms, waiting for it {:.1} ms, {} minor faults",
                        round - first,
                        elapsed.as_secs_f64() * 1e3,
                        (sched.0 - sched0.0) as f64 / 1e6,
                        (sched.1 - sched0.1) as f64 / 1e6,
                        minflt() - flt0
                    );
                }
            }
        }
    }
    // Each round's ratio to the file state's of the same place in the same turn.
    let paired: Vec<f64> = times
        .iter()
        .map(|t| {
            median(
                &t.iter()
                    .zip(&times[0])
                    .map(|(t, f)| t / f)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    // Each turn's median round against the file state's in the same turn: how far one turn
    // is from the next says how far one run's figure can be trusted.
    let turns: Vec<Vec<f64>> = times
        .iter()
        .map(|t| {
            let mut ratios: Vec<f64> = t
                .chunks(turn)
                .zip(times[0].chunks(turn))
                .map(|(t, f)| median(t) / median(f))
                .collect();
            ratios.sort_by(f64::total_cmp);
            ratios
        })
        .collect();
    let medians: Vec<f64> = times.iter().map(|t| median(t)).collect();
    let cpu_medians: Vec<f64> = cpu.iter().map(|c| median(c)).collect();
    // The fastest round too: on a shared machine the rounds another process slowed down move
    // the median, rarely the minimum.
    let fastest: Vec<f64> = times
        .iter()
        .map(|v| v.iter().copied().min_by(f64::total_cmp).unwrap_or(f64::NAN))
        .collect();
    println!(
        "in turns of {turn} timed round{} after an untimed one; {warm_rounds} untimed rounds in all ({:.1} s of them first):",
        if turn == 1 { "" } else { "s" },
        warmup.as_secs_f64()
    );
    for (i, (name, _)) in setups.iter().enumerate() {
        let (m, f, c, p) = (medians[i], fastest[i], cpu_medians[i], paired[i]);
        if m.is_nan() {
            continue;
        }
        println!(
            "{name:<10} median of {timed_rounds} runs of 1200 tasks: {:.1} ms ({:.0} tasks/s), {:+.1}% against the file state (paired, round by round: {:+.1}%); fastest {:.1} ms, {:+.1}%; on the CPU {:.1} ms, {:+.1}%",
            m * 1e3,
            1200.0 / m,
            (m / medians[0] - 1.0) * 100.0,
            (p - 1.0) * 100.0,
            f * 1e3,
            (f / fastest[0] - 1.0) * 100.0,
            c * 1e3,
            (c / cpu_medians[0] - 1.0) * 100.0
        );
        let turns = &turns[i];
        if i > 0 && turns.len() >= 4 {
            let pct = |at: usize| (turns[at] - 1.0) * 100.0;
            let n = turns.len();
            println!(
                "{:<10} its {n} turns against the file state's: {:+.1}% to {:+.1}%, the middle half {:+.1}% to {:+.1}%",
                "",
                pct(0),
                pct(n - 1),
                pct(n / 4),
                pct(n - 1 - n / 4)
            );
        }
    }
    for (_, host) in &setups {
        host.shutdown();
    }
}

/// The environment variable `name` read as a number, `default` when it is not set; a value
/// that is not a number stops the benchmark, naming it.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: `{text}` is not a number")),
        Err(_) => default,
    }
}

/// The median of `v` (the upper one of an even count); NaN when empty.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// This thread's time on the CPU and waiting for one (run queue), in nanoseconds.
fn schedstat() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut fields = stat.split(' ').map(|f| f.trim().parse().unwrap_or(0));
    (fields.next().unwrap_or(0), fields.next().unwrap_or(0))
}

fn minflt() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(7).unwrap().parse().unwrap()
}
