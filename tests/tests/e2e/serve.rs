//! `worker serve` as a process: the control API over loopback, signals, state across restarts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Api, HttpAnswer, PluginDir, built_plugin, drop_in, eventually, sleeping_threads};

const PATIENCE: Duration = Duration::from_secs(20);

/// A running `worker serve`, started by [`Worker::start`]; killed if the test ends without
/// stopping it.
#[derive(Debug)]
pub(crate) struct Worker {
    child: std::process::Child,
    /// Where the control API listens: `HOST:PORT`, or `unix:PATH`.
    pub(crate) addr: String,
    /// The token file `serve` announced.
    pub(crate) token_file: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Worker {
    /// `plugin`'s entry in `GET /v1/plugins`, if it is loaded.
    pub(crate) fn listed(&self, plugin: &str) -> Option<Value> {
        let plugins = self.http("GET", "/v1/plugins", b"").json();
        plugins["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == plugin)
            .cloned()
    }

    /// The value of the metric line `name{plugin="plugin"}` in `/metrics`.
    ///
    /// # Panics
    ///
    /// When there is no such line.
    pub(crate) fn metric(&self, name: &str, plugin: &str) -> f64 {
        let text = self.http("GET", "/metrics", b"").body;
        let prefix = format!("{name}{{plugin=\"{plugin}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .parse()
            .unwrap()
    }

    /// Starts the test build of `worker serve` on `dir` with state in `state`, on
    /// `127.0.0.1:0` unless `extra` has a `--listen`, and waits for it to announce its address
    /// and token file.
    ///
    /// # Panics
    ///
    /// When it does not start.
    pub(crate) fn start(dir: &PluginDir, state: &Path, extra: &[&str]) -> Worker {
        Self::try_start(dir, state, extra, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Worker::start`] with environment variables; `Err` holds what the worker printed when
    /// it did not start.
    pub(crate) fn try_start(
        dir: &PluginDir,
        state: &Path,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Worker, String> {
        use std::io::{BufRead as _, Read as _};
        let mut command = Command::new(env!("CARGO_BIN_EXE_worker-under-test"));
        command
            .arg("--plugins")
            .arg(dir.path())
            .args(["--log", "info", "serve", "--state-dir"])
            .arg(state)
            .args(extra)
            .env_remove("WORKER_TOKEN_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        let mut second = String::new();
        stdout.read_line(&mut first).unwrap();
        stdout.read_line(&mut second).unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            text
        });
        let addr = match first.split(" control API on ").nth(1) {
            Some(addr) => addr.trim(),
            None => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                let log = stderr.join().unwrap();
                return Err(format!(
                    "worker did not start ({status}): stdout {first:?}, stderr:\n{log}"
                ));
            }
        };
        let addr = addr.strip_prefix("http://").unwrap_or(addr).to_owned();
        let token_file = second
            .split(" token in ")
            .nth(1)
            .and_then(|rest| rest.split(" (").next())
            .unwrap_or_else(|| panic!("no token file in {second:?}"))
            .into();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stdout.read_to_string(&mut rest);
        });
        Ok(Worker {
            child,
            addr,
            token_file,
            stderr: Some(stderr),
        })
    }

    /// The token in the announced token file.
    pub(crate) fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file)
            .unwrap()
            .trim()
            .to_owned()
    }

    /// The address and token, for other threads.
    pub(crate) fn api(&self) -> Api {
        Api {
            addr: self.addr.clone(),
            token: self.token(),
        }
    }

    /// [`http`] with the bearer token.
    pub(crate) fn http(&self, method: &str, path: &str, body: &[u8]) -> HttpAnswer {
        self.api().http(method, path, body)
    }

    /// Sends a signal (`TERM`, `HUP`, ...).
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits; returns the exit status and what it logged.
    pub(crate) fn stop(self) -> (std::process::ExitStatus, String) {
        self.stop_with("TERM")
    }

    /// Sends `signal` (`TERM`, `INT`), then waits; returns the exit status and what it logged.
    pub(crate) fn stop_with(mut self, signal: &str) -> (std::process::ExitStatus, String) {
        self.signal(signal);
        let status = self.child.wait().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap();
        (status, stderr)
    }

    /// SIGTERM, then waits at most `limit`; `None` if it had not exited by then (it is killed).
    pub(crate) fn stop_within(
        mut self,
        limit: std::time::Duration,
    ) -> Option<(std::process::ExitStatus, String)> {
        self.signal("TERM");
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let stderr = self.stderr.take().unwrap().join().unwrap();
                return Some((status, stderr));
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn control_api_end_to_end() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    dir.add("faulty", "libfaulty.so");
    dir.write("libbroken.so", b"nope");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    let api = worker.api();
    let http = |method: &str, path: &str, body: &[u8]| api.http(method, path, body);

    let hooks = http("GET", "/v1/hooks", b"");
    assert_eq!(hooks.status, 200);
    assert_eq!(hooks.json()[2]["subscribers"][0]["name"], "faulty");

    let health = http("GET", "/healthz", b"");
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok", "plugins": 2}))
    );

    let list = http("GET", "/v1/plugins", b"").json();
    assert_eq!(list["plugins"][0]["name"], "echo");
    let echo_generation = list["plugins"][0]["generation"].as_u64().unwrap();
    assert!(list["plugins"][0]["stats"]["calls"].is_u64());
    assert!(
        list["refused"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("libbroken.so")
    );

    let echo = http("POST", "/v1/plugins/echo/echo", br#"{"x": [1, 2]}"#);
    assert_eq!((echo.status, echo.json()), (200, json!({"x": [1, 2]})));
    assert_eq!(
        http("POST", "/v1/plugins/echo/echo", b"").json(),
        json!(null)
    );

    let panic = http("POST", "/v1/plugins/faulty/panic", b"");
    assert_eq!((panic.status, panic.body.as_str()), (200, "null"));
    assert!(panic.header("x-noop-reason").unwrap().contains("panicked"));
    let missing = http("POST", "/v1/plugins/nobody/x", b"{}");
    assert_eq!((missing.status, missing.body.as_str()), (200, "null"));
    assert!(
        missing
            .header("x-noop-reason")
            .unwrap()
            .contains("no plugin `nobody`")
    );

    let metrics = http("GET", "/metrics", b"");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("worker_plugin_calls_total{plugin=\"echo\"} 2\n"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains("worker_plugin_panics_total{plugin=\"faulty\"} 1\n"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("worker_plugin_refused_files 1\n"),
        "{}",
        metrics.body
    );

    let reloaded = http("POST", "/v1/plugins/echo/reload", b"");
    assert_eq!(reloaded.status, 200);
    assert!(reloaded.json()["generation"].as_u64().unwrap() > echo_generation);

    // Bad requests: 4xx with a JSON error, and the worker goes on.
    let bad = http("POST", "/v1/plugins/echo/echo", b"{not json");
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let big = vec![b' '; 2 * 1024 * 1024];
    assert_eq!(http("POST", "/v1/plugins/echo/echo", &big).status, 413);
    assert_eq!(http("GET", "/v2/nothing", b"").status, 404);
    let wrong = http("PUT", "/v1/plugins", b"");
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("GET"));
    assert_eq!(http("POST", "/v1/plugins/nobody/reload", b"").status, 404);
    assert_eq!(http("DELETE", "/v1/plugins/nobody", b"").status, 404);

    let unloaded = http("DELETE", "/v1/plugins/faulty", b"");
    assert_eq!(
        (unloaded.status, unloaded.json()),
        (200, json!({"unloaded": "faulty"}))
    );
    assert_eq!(http("GET", "/v1/plugins/faulty", b"").status, 404);

    // Rescan: a dropped-in file loads (no watcher here).
    drop_in(&built_plugin("fixture"), &dir.path(), "libfixture.so");
    let rescan = http("POST", "/v1/reload", b"");
    assert_eq!(rescan.status, 200);
    assert!(
        rescan.json()["loaded"]
            .as_array()
            .unwrap()
            .contains(&json!("fixture")),
        "{}",
        rescan.body
    );
    assert_eq!(http("GET", "/healthz", b"").status, 200);

    let (status, _) = worker.stop();
    assert!(status.success());
}

/// SIGTERM and SIGINT alike: a clean exit, each plugin's state saved, plugins unloaded in
/// reverse load order, and the state back at the next start.
#[test]
fn state_survives_a_restart_and_shutdown_unloads_in_reverse_order() {
    for signal in ["TERM", "INT"] {
        state_survives_a_restart_after(signal);
    }
}

fn state_survives_a_restart_after(signal: &str) {
    let dir = PluginDir::new();
    dir.configure(&json!({"experiment": {"config": {"experiments": {"tone": {"variants": {"A": 1, "B": 1}}}}}}));
    dir.add("experiment", "libexperiment.so");
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &[]);
    let record = json!({"experiment": "tone", "variant": "B", "score": 0.75});
    worker.http(
        "POST",
        "/v1/plugins/experiment/recordOutcome",
        record.to_string().as_bytes(),
    );
    worker.http("POST", "/v1/plugins/fixture/add", br#"{"n": 9}"#);
    let (status, log) = worker.stop_with(signal);
    assert!(status.success(), "SIG{signal}: {status}\n{log}");
    assert!(state.join("experiment.json").is_file(), "SIG{signal}");
    assert!(state.join("fixture.json").is_file(), "SIG{signal}");
    let fixture_at = log.find("plugin unloaded plugin=fixture ").expect(&log);
    let experiment_at = log.find("plugin unloaded plugin=experiment ").expect(&log);
    assert!(
        fixture_at < experiment_at,
        "SIG{signal}: not unloaded in reverse load order:\n{log}"
    );

    let worker = Worker::start(&dir, &state, &[]);
    let stats = worker
        .http("POST", "/v1/plugins/experiment/stats", b"")
        .json();
    assert_eq!(stats["tone"]["variants"]["B"]["outcomes"], 1, "SIG{signal}");
    assert_eq!(
        stats["tone"]["variants"]["B"]["meanScore"], 0.75,
        "SIG{signal}"
    );
    assert_eq!(
        worker.http("POST", "/v1/plugins/fixture/total", b"").json(),
        json!(9),
        "SIG{signal}"
    );
    let (status, log) = worker.stop_with(signal);
    assert!(status.success(), "SIG{signal}: {status}\n{log}");
}

#[test]
fn corrupt_state_file_is_kept_aside_and_the_plugin_starts_fresh() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("fixture.json"), "{ torn write").unwrap();
    let worker = Worker::start(&dir, &state, &[]);
    assert_eq!(
        worker.http("POST", "/v1/plugins/fixture/total", b"").json(),
        json!(0)
    );
    let (status, log) = worker.stop();
    assert!(status.success());
    assert!(
        log.contains("unusable") && log.contains("fixture.json"),
        "no clear warning:\n{log}"
    );
    let kept: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("fixture.json.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the bad file was not kept aside");
    assert_eq!(
        std::fs::read_to_string(state.join(&kept[0])).unwrap(),
        "{ torn write"
    );
}

#[test]
fn sighup_rescans_and_sigterm_lets_requests_finish() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    drop_in(&built_plugin("echo"), &dir.path(), "libecho.so");
    // A quiet period, not a synchronisation: a watcher would have loaded it by now.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        worker.http("GET", "/healthz", b"").json()["plugins"],
        1,
        "loaded without a watcher"
    );
    worker.signal("HUP");
    assert!(eventually(PATIENCE, || worker
        .http("GET", "/healthz", b"")
        .json()["plugins"]
        == 2));

    a_request_in_flight_finishes(worker, "TERM");
    a_request_in_flight_finishes(Worker::start(&dir, &state, &["--no-watch"]), "INT");
}

/// Stops `worker` with `signal` while a slow plugin call is running in it: the call finishes
/// and its answer arrives, and the worker exits cleanly.
fn a_request_in_flight_finishes(worker: Worker, signal: &str) {
    let asleep = sleeping_threads(worker.pid());
    let api = worker.api();
    let slow = std::thread::spawn(move || {
        api.http("POST", "/v1/plugins/fixture/sleep", br#"{"ms": 600}"#)
    });
    assert!(
        eventually(PATIENCE, || sleeping_threads(worker.pid()) > asleep),
        "the request never reached the plugin"
    );
    let (status, log) = worker.stop_with(signal);
    let answer = slow.join().unwrap();
    assert_eq!(
        (answer.status, answer.json()),
        (200, json!("done")),
        "SIG{signal}: the request in flight did not finish"
    );
    assert!(status.success(), "SIG{signal}: {log}");
}

#[test]
fn tasks_run_over_the_control_api_while_a_plugin_is_swapped() {
    let dir = PluginDir::new();
    dir.configure(&json!({"bandit": {"config": {"contexts": ["chat"]}}}));
    dir.add("bandit", "libbandit.so");
    let state = dir.shadow().join("state");
    // The load sends the same task ids again and again: with a store each counts once, so the
    // state carried over the swap is measured on the plugin's own state.
    let worker = Worker::start(&dir, &state, &["--store", "none"]);
    let tasks: Vec<serde_json::Value> = worker::pipeline::example_tasks(40, 8);
    let batch = serde_json::to_vec(&tasks).unwrap();
    let first = worker.http("POST", "/v1/tasks", &batch);
    assert_eq!(first.status, 200);
    let records = first.json();
    assert_eq!(records.as_array().unwrap().len(), 40);
    assert!(
        records
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["score"].is_number()),
        "{}",
        first.body
    );
    let one = worker
        .http("POST", "/v1/tasks", tasks[0].to_string().as_bytes())
        .json();
    assert_eq!(one["id"], tasks[0]["id"]);
    let bad = worker.http("POST", "/v1/tasks", br#"{"id": "x"}"#).json();
    assert!(
        bad["error"].as_str().unwrap().contains("missing field"),
        "{bad}"
    );
    assert_eq!(worker.http("POST", "/v1/tasks", b"42").status, 400);

    let pulls = |api: &Api| {
        let stats = api
            .http(
                "POST",
                "/v1/plugins/bandit/stats",
                br#"{"context": "chat"}"#,
            )
            .json();
        stats["chat"]["arms"]
            .as_object()
            .unwrap()
            .values()
            .map(|a| a["pulls"].as_u64().unwrap())
            .sum::<u64>()
    };
    // The bandit learns one pull from every scored chat task.
    let chat_scored = |records: &serde_json::Value| {
        let records = match records.as_array() {
            Some(batch) => batch.clone(),
            None => vec![records.clone()],
        };
        records
            .iter()
            .filter(|r| r["type"] == "chat" && r["score"].is_number())
            .count() as u64
    };
    let before = pulls(&worker.api());
    assert_eq!(before, chat_scored(&records) + chat_scored(&one));
    assert!(before > 0);
    let generation = worker.http("GET", "/v1/plugins/bandit", b"").json()["generation"]
        .as_u64()
        .unwrap();

    // Batches go in one after another until told to stop; each answer is kept with the times
    // its request was sent and answered.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let load = {
        let (api, stop, answered) = (worker.api(), Arc::clone(&stop), Arc::clone(&answered));
        let small: Vec<&serde_json::Value> = tasks.iter().take(8).collect();
        let batch = serde_json::to_vec(&small).unwrap();
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let sent = Instant::now();
                let answer = api.http("POST", "/v1/tasks", &batch);
                answers.push((sent, Instant::now(), answer));
                answered.fetch_add(1, Ordering::SeqCst);
            }
            answers
        })
    };
    assert!(eventually(PATIENCE, || answered.load(Ordering::SeqCst) >= 2));
    let swap_started = Instant::now();
    drop_in(&built_plugin("bandit"), &dir.path(), "libbandit.so");
    assert!(eventually(PATIENCE, || {
        worker.http("GET", "/v1/plugins/bandit", b"").json()["generation"]
            .as_u64()
            .unwrap()
            > generation
    }));
    let swap_ended = Instant::now();
    let at_swap_end = answered.load(Ordering::SeqCst);
    // Two more answers: the second was surely asked for after the swap.
    assert!(eventually(PATIENCE, || answered.load(Ordering::SeqCst)
        >= at_swap_end + 2));
    stop.store(true, Ordering::SeqCst);
    let answers = load.join().unwrap();

    let mut load_scored = 0;
    for (_, _, answer) in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
        let records = answer.json();
        assert!(
            records
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["score"].is_number()),
            "{records}"
        );
        load_scored += chat_scored(&records);
    }
    let count = |f: &dyn Fn(&(Instant, Instant, HttpAnswer)) -> bool| {
        answers.iter().filter(|a| f(a)).count()
    };
    let answered_before = count(&|(_, done, _)| *done < swap_started);
    let answered_during = count(&|(_, done, _)| swap_started <= *done && *done <= swap_ended);
    let asked_after = count(&|(sent, _, _)| *sent > swap_ended);
    assert!(
        answered_before > 0 && answered_during > 0 && asked_after > 0,
        "the task load did not overlap the swap: {answered_before} batches answered before \
         it, {answered_during} during it ({:?}), {asked_after} asked for after it",
        swap_ended - swap_started
    );

    // With the state carried over, the new generation counts every pull since the start but
    // those of the few tasks scored by the old generation between its state being saved and
    // the swap. Without it, only the pulls since the swap: at most the load's.
    let after = pulls(&worker.api());
    let total = before + load_scored;
    eprintln!(
        "batches answered before the swap {answered_before}, during it {answered_during} \
         ({:?}), asked for after it {asked_after}; pulls {before} before the load, {after} \
         after it, of {total} chat tasks scored",
        swap_ended - swap_started
    );
    assert!(
        after <= total && after > load_scored,
        "the bandit lost what it learned in the swap: {after} pulls after it, {total} chat \
         tasks scored in all, {before} before the load and {load_scored} during it"
    );
    worker.stop();
}
