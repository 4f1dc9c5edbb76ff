//! A fleet: three `worker run` processes on three thirds of the example task set, sharing one
//! store (a real `redis-server`, or one SQLite file), against one worker on the whole set.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use plugin_host::store::{Store, StoreOptions};
use serde_json::{Value, json};
use tests::{PluginDir, RedisServer, eventually};

const PLUGINS: [&str; 5] = [
    "experiment",
    "bandit",
    "champion",
    "task-policy",
    "model-router",
];
const TASKS: usize = 1200;

/// The plugins of the example with their bundled configuration.
fn fleet_dir() -> PluginDir {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/plugins.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let dir = PluginDir::new();
    let mut picked = serde_json::Map::new();
    for name in PLUGINS {
        picked.insert(name.to_owned(), all["plugins"][name].clone());
        dir.add(name, &format!("lib{}.so", name.replace('-', "_")));
    }
    dir.configure(&Value::Object(picked));
    dir
}

fn command(dir: &PluginDir, state: &Path, store: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker-under-test"));
    command
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(state)
        .args(["--store", store, "--store-flush-ms", "20"])
        .env_remove("WORKER_LOG")
        .env_remove("WORKER_TOKEN_FILE");
    command
}

/// The example tasks, as JSON lines.
fn example_tasks() -> Vec<String> {
    let dir = PluginDir::new();
    let output = command(&dir, &dir.shadow().join("state"), "none")
        .args([
            "example-tasks",
            "--count",
            &TASKS.to_string(),
            "--seed",
            "42",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Third `k` of the tasks (every third line).
fn third(tasks: &[String], k: usize) -> Vec<String> {
    tasks.iter().skip(k).step_by(3).cloned().collect()
}

fn write_tasks(dir: &Path, name: &str, tasks: &[String]) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, tasks.join("\n") + "\n").unwrap();
    file
}

/// Waits (at most two minutes) for a worker; asserts it succeeded.
fn finish(mut child: Child, what: &str) {
    let done = eventually(Duration::from_secs(120), || {
        child.try_wait().unwrap().is_some()
    });
    if !done {
        let _ = child.kill();
        panic!("{what} did not finish within two minutes");
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `worker run` on a tasks file, in the background.
fn run(dir: &PluginDir, state: &Path, store: &str, tasks: &Path, out: &Path) -> Child {
    command(dir, state, store)
        .arg("run")
        .arg("--tasks")
        .arg(tasks)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A worker reading its tasks from a pipe: the test decides when they arrive.
struct Fed {
    child: Child,
    stdin: Option<ChildStdin>,
    answered: Arc<AtomicUsize>,
    results: Arc<std::sync::Mutex<Vec<String>>>,
    /// Its standard error, read as it comes (a full pipe would stop the worker).
    errors: Arc<std::sync::Mutex<String>>,
}

impl Fed {
    fn start(dir: &PluginDir, state: &Path, store: &str) -> Fed {
        let mut child = command(dir, state, store)
            .args(["run", "--tasks", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let results = Arc::new(std::sync::Mutex::new(Vec::new()));
        let errors = Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let said = Arc::clone(&errors);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut said = said.lock().unwrap();
                said.push_str(&line);
                said.push('\n');
            }
        });
        let (counter, kept) = (Arc::clone(&answered), Arc::clone(&results));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push(line);
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        Fed {
            child,
            stdin,
            answered,
            results,
            errors,
        }
    }

    fn feed(&mut self, tasks: &[String]) {
        let stdin = self.stdin.as_mut().unwrap();
        for task in tasks {
            writeln!(stdin, "{task}").unwrap();
        }
        stdin.flush().unwrap();
    }

    /// Waits until the worker answered `n` tasks in all; fails at once if it ended.
    fn wait_answered(&mut self, n: usize) {
        let mut ended = None;
        let answered = eventually(Duration::from_secs(120), || {
            ended = self.child.try_wait().unwrap();
            self.answered.load(Ordering::SeqCst) >= n || ended.is_some()
        });
        assert!(
            answered && self.answered.load(Ordering::SeqCst) >= n,
            "the worker answered {} of {n} tasks (ended: {ended:?}); it said: {}",
            self.answered.load(Ordering::SeqCst),
            self.errors.lock().unwrap()
        );
    }

    /// Closes its input, waits for it to finish; its result records.
    fn close(mut self, what: &str) -> Vec<Value> {
        drop(self.stdin.take());
        let mut status = None;
        eventually(Duration::from_secs(120), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        if status.is_none() {
            let _ = self.child.kill();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "{what} did not finish well within two minutes ({status:?}): {}",
            self.errors.lock().unwrap()
        );
        // The reader thread sees the end of the output right after the exit.
        assert!(eventually(Duration::from_secs(60), || Arc::strong_count(
            &self.results
        ) == 1));
        let lines = self.results.lock().unwrap();
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// `worker call PLUGIN METHOD PARAMS` with its own state directory.
fn call(dir: &PluginDir, store: &str, plugin: &str, method: &str, params: &Value) -> Value {
    let state = tempfile::tempdir().unwrap();
    let output = command(dir, state.path(), store)
        .args(["call", plugin, method, &params.to_string(), "--strict"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{plugin}.{method}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `worker report --json`: the fleet's experiments.
fn report(dir: &PluginDir, store: &str) -> Value {
    let state = tempfile::tempdir().unwrap();
    let output = command(dir, state.path(), store)
        .args(["report", "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "report: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// What one worker learns on the whole set, alone (no store).
struct Alone {
    experiment: Value,
    bandit: Value,
}

fn alone(tasks: &[String]) -> Alone {
    let dir = fleet_dir();
    let work = tempfile::tempdir().unwrap();
    let file = write_tasks(work.path(), "all.jsonl", tasks);
    let state = work.path().join("state");
    finish(
        run(&dir, &state, "none", &file, &work.path().join("out.jsonl")),
        "the lone worker",
    );
    let ask = |plugin: &str| {
        let output = command(&dir, &state, "none")
            .args(["call", plugin, "stats", "--strict"])
            .output()
            .unwrap();
        assert!(output.status.success());
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    Alone {
        experiment: ask("experiment"),
        bandit: ask("bandit"),
    }
}

fn summarize_tasks(tasks: &[String]) -> u64 {
    tasks
        .iter()
        .filter(|t| t.contains("\"type\":\"summarize\""))
        .count() as u64
}

fn variant_field(stats: &Value, variant: &str, field: &str) -> u64 {
    stats["summarize"]["variants"][variant][field]
        .as_u64()
        .unwrap_or_else(|| panic!("summarize.{variant}.{field} in {stats}"))
}

fn total_pulls(bandit: &Value) -> u64 {
    bandit["chat"]["arms"]
        .as_object()
        .unwrap()
        .values()
        .map(|a| a["pulls"].as_u64().unwrap())
        .sum()
}

/// Every summarize task counted once, fleet-wide, per variant as the lone worker counts them
/// (assignment is a hash of the task id, so the split is the same).
fn assert_each_task_once(fleet: &Value, alone: &Alone, tasks: &[String]) {
    let mut outcomes = 0;
    for variant in ["full", "short"] {
        let expected = variant_field(&alone.experiment, variant, "outcomes");
        assert_eq!(
            variant_field(fleet, variant, "outcomes"),
            expected,
            "outcomes of {variant}: {fleet}"
        );
        assert_eq!(
            variant_field(fleet, variant, "uniqueKeys"),
            expected,
            "units of {variant}: {fleet}"
        );
        outcomes += expected;
    }
    assert_eq!(outcomes, summarize_tasks(tasks));
}

/// The decisions in the champion's record in the store, read directly.
fn stored_decisions(url: &str) -> usize {
    let store = Store::open(url, StoreOptions::default()).unwrap();
    store
        .read_record("champion", "deploy/summarize")
        .unwrap()
        .map_or(0, |r| {
            let value: Value = serde_json::from_str(&r.value).unwrap();
            value["decisions"].as_array().map_or(0, Vec::len)
        })
}

/// Three workers on three thirds, fed in step (40 tasks each, then the next 40 once all three
/// answered), on `store`; then what the fleet learned.
fn three_workers(store: &str) {
    let tasks = example_tasks();
    let alone = alone(&tasks);
    let dir = fleet_dir();
    let work = tempfile::tempdir().unwrap();
    let thirds: Vec<Vec<String>> = (0..3).map(|k| third(&tasks, k)).collect();
    let mut workers: Vec<Fed> = (0..3)
        .map(|k| Fed::start(&dir, &work.path().join(format!("state{k}")), store))
        .collect();
    // All but the last 100 tasks of each third in steps; by then the challenger is decided.
    let tail = thirds[0].len() - 100;
    let mut fed = 0;
    while fed < tail {
        let upto = (fed + 40).min(tail);
        for (worker, part) in workers.iter_mut().zip(&thirds) {
            worker.feed(&part[fed..upto]);
        }
        for worker in &mut workers {
            worker.wait_answered(upto);
        }
        fed = upto;
    }
    assert!(
        eventually(Duration::from_secs(60), || stored_decisions(store) == 1),
        "the champion decided once in the first {tail} tasks of each worker"
    );
    for (worker, part) in workers.iter_mut().zip(&thirds) {
        worker.feed(&part[fed..]);
    }
    let results: Vec<Vec<Value>> = workers
        .into_iter()
        .enumerate()
        .map(|(k, worker)| worker.close(&format!("worker {k}")))
        .collect();
    // The experiment: the combined counts are the tasks scored, each once.
    let fleet = report(&dir, store);
    assert_each_task_once(&fleet, &alone, &tasks);
    assert_eq!(
        variant_field(&fleet, "full", "assigned") + variant_field(&fleet, "short", "assigned"),
        summarize_tasks(&tasks)
    );
    // The champion: one promotion fleet-wide, and every worker routes by it afterwards.
    let status = call(&dir, store, "champion", "status", &json!({}));
    let decisions = status["summarize"]["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 1, "one decision fleet-wide: {status}");
    assert_eq!(decisions[0]["outcome"], "promoted", "{status}");
    let winner = decisions[0]["to"].as_str().unwrap();
    assert_eq!(status["summarize"]["champion"], winner);
    assert_eq!(status["summarize"]["challenger"], Value::Null);
    for (k, records) in results.iter().enumerate() {
        let summarize: Vec<&Value> = records
            .iter()
            .filter(|r| r["type"] == "summarize")
            .collect();
        // The last 100 tasks came after the decision was in the store; a worker follows it
        // within a refresh of its cache (20 ms here), a few tasks at most.
        let last = &summarize[summarize.len() - 10..];
        assert!(
            last.iter()
                .all(|r| r["handler"] == winner && r["role"] == "champion"),
            "worker {k} routes its last tasks to the promoted {winner}: {last:?}"
        );
    }
    // The bandit: the fleet's choice is the lone worker's, from the same number of pulls.
    let bandit = call(&dir, store, "bandit", "stats", &json!({}));
    assert_eq!(
        bandit["chat"]["best"], alone.bandit["chat"]["best"],
        "{bandit}"
    );
    assert_eq!(total_pulls(&bandit), total_pulls(&alone.bandit), "{bandit}");
}

#[test]
fn three_workers_on_redis_learn_as_one() {
    let redis = RedisServer::start();
    three_workers(&redis.url());
}

#[test]
fn three_workers_on_one_sqlite_file_learn_as_one() {
    let dir = tempfile::tempdir().unwrap();
    three_workers(&format!(
        "sqlite://{}",
        dir.path().join("store.db").display()
    ));
}

/// The experiment's outcomes in the store, read directly.
fn stored_outcomes(url: &str) -> u64 {
    let store = Store::open(url, StoreOptions::default()).unwrap();
    store
        .scan("experiment", "exp/summarize/")
        .unwrap()
        .iter()
        .map(|(_, f)| f.get("n").copied().unwrap_or(0.0) as u64)
        .sum()
}

#[test]
fn a_worker_killed_mid_run_and_run_again_counts_nothing_twice() {
    let redis = RedisServer::start();
    let store = redis.url();
    let tasks = example_tasks();
    let alone = alone(&tasks);
    let dir = fleet_dir();
    let work = tempfile::tempdir().unwrap();
    for k in 0..2 {
        let file = write_tasks(work.path(), &format!("third{k}.jsonl"), &third(&tasks, k));
        finish(
            run(
                &dir,
                &work.path().join(format!("state{k}")),
                &store,
                &file,
                &work.path().join(format!("out{k}.jsonl")),
            ),
            &format!("worker {k}"),
        );
    }
    let before = stored_outcomes(&store);
    // The third worker gets half of its tasks, flushes some, and is killed with SIGKILL.
    let last = third(&tasks, 2);
    let state = work.path().join("state2");
    let mut fed = Fed::start(&dir, &state, &store);
    fed.feed(&last[..last.len() / 2]);
    fed.wait_answered(last.len() / 2);
    assert!(
        eventually(Duration::from_secs(60), || stored_outcomes(&store) > before),
        "the third worker flushed some outcomes before it is killed"
    );
    Command::new("kill")
        .args(["-9", &fed.child.id().to_string()])
        .status()
        .unwrap();
    let _ = fed.child.wait();
    // Its whole third again: what was flushed before the kill is not counted twice.
    let file = write_tasks(work.path(), "third2.jsonl", &last);
    finish(
        run(&dir, &state, &store, &file, &work.path().join("out2.jsonl")),
        "the re-run",
    );
    assert_each_task_once(&report(&dir, &store), &alone, &tasks);
    let bandit = call(&dir, &store, "bandit", "stats", &json!({}));
    assert_eq!(total_pulls(&bandit), total_pulls(&alone.bandit), "{bandit}");
}

#[test]
fn redis_stopped_mid_run_and_started_again_loses_and_repeats_nothing() {
    let mut redis = RedisServer::start();
    let store = redis.url();
    let tasks = example_tasks();
    let alone = alone(&tasks);
    let dir = fleet_dir();
    let work = tempfile::tempdir().unwrap();
    let thirds: Vec<Vec<String>> = (0..3).map(|k| third(&tasks, k)).collect();
    let mut workers: Vec<Fed> = (0..3)
        .map(|k| Fed::start(&dir, &work.path().join(format!("state{k}")), &store))
        .collect();
    for (fed, part) in workers.iter_mut().zip(&thirds) {
        fed.feed(&part[..part.len() / 2]);
    }
    for (fed, part) in workers.iter_mut().zip(&thirds) {
        fed.wait_answered(part.len() / 2);
    }
    redis.stop();
    // The workers go on while the store is down.
    for (fed, part) in workers.iter_mut().zip(&thirds) {
        fed.feed(&part[part.len() / 2..]);
    }
    for (fed, part) in workers.iter_mut().zip(&thirds) {
        fed.wait_answered(part.len());
    }
    redis.start_again();
    for (k, fed) in workers.into_iter().enumerate() {
        fed.close(&format!("worker {k}"));
    }
    assert_each_task_once(&report(&dir, &store), &alone, &tasks);
    let bandit = call(&dir, &store, "bandit", "stats", &json!({}));
    assert_eq!(total_pulls(&bandit), total_pulls(&alone.bandit), "{bandit}");
}
