//! One writer per state directory: `serve`, `run` and `call` lock it; `call` while a worker
//! serves there says how to reach it, and `call --server URL` calls through the control API.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::json;
use tests::{PluginDir, eventually};

use crate::serve::Worker;

fn worker_with_state(dir: &PluginDir, state: &std::path::Path, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker-under-test"));
    command
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("WORKER_LOG")
        .env_remove("WORKER_TOKEN_FILE")
        .stdin(Stdio::null());
    crate::bounded(command)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn call_while_serving_is_refused_with_the_address_and_goes_through_with_server() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let serving = Worker::start(&dir, &state, &["--no-watch"]);

    let output = worker_with_state(&dir, &state, &["call", "fixture", "add", r#"{"n": 5}"#]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stdout));
    let err = text(&output.stderr);
    assert!(err.contains("is serving from the state directory"), "{err}");
    assert!(err.contains(&format!("http://{}", serving.addr)), "{err}");
    assert!(err.contains("call --server"), "{err}");
    assert!(output.stdout.is_empty());

    let output = worker_with_state(&dir, &state, &["run", "--tasks", "-"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("is serving from the state directory"),
        "{}",
        text(&output.stderr)
    );

    // Through the control API: the serving worker's own state changes.
    let url = format!("http://{}", serving.addr);
    let output = worker_with_state(
        &dir,
        &state,
        &["call", "--server", &url, "fixture", "add", r#"{"n": 5}"#],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "5");
    assert_eq!(
        serving
            .http("POST", "/v1/plugins/fixture/total", b"")
            .json(),
        json!(5)
    );
    // --strict tells a missing method from an answer, as without --server.
    let output = worker_with_state(
        &dir,
        &state,
        &["call", "--server", &url, "--strict", "fixture", "nothing"],
    );
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "null");
    // A wrong token file is an error, not a silent null.
    let bad_token = dir.shadow().join("bad-token");
    std::fs::write(&bad_token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let output = worker_with_state(
        &dir,
        &state,
        &[
            "call",
            "--server",
            &url,
            "--token-file",
            bad_token.to_str().unwrap(),
            "fixture",
            "total",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stdout));
    assert!(
        text(&output.stderr).contains("401"),
        "{}",
        text(&output.stderr)
    );

    let (status, _) = serving.stop();
    assert!(status.success());
    // Stopped: the lock is free, and what the call changed was saved by serve.
    let output = worker_with_state(&dir, &state, &["call", "fixture", "total"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "5");
}

#[test]
fn a_run_holds_the_state_directory_until_it_ends() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let mut run = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(&state)
        .args(["run", "--tasks", "-"])
        .env_remove("WORKER_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the run holds the lock (a call made before would take it first).
    let lock_file = state.join("worker.lock");
    assert!(
        eventually(Duration::from_secs(60), || {
            std::fs::read_to_string(&lock_file).is_ok_and(|t| t.contains("\"command\":\"run\""))
        }),
        "the run did not take the lock: {:?}",
        run.try_wait()
    );
    let mut refused = String::new();
    assert!(
        eventually(Duration::from_secs(60), || {
            let output = worker_with_state(&dir, &state, &["call", "fixture", "total"]);
            refused = format!(
                "{:?} {} {}",
                output.status,
                text(&output.stdout),
                text(&output.stderr)
            );
            output.status.code() == Some(1) && refused.contains("`worker run`")
        }),
        "{refused}"
    );
    assert!(refused.contains(&format!("pid {}", run.id())), "{refused}");
    let mut stdin = run.stdin.take().unwrap();
    stdin.write_all(b"\n").unwrap();
    drop(stdin);
    assert!(
        eventually(Duration::from_secs(60), || run
            .try_wait()
            .unwrap()
            .is_some()),
        "the run did not end"
    );
    let output = worker_with_state(&dir, &state, &["call", "fixture", "total"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn a_lock_file_that_is_not_a_regular_file_is_refused_naming_it() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let lock = state.join("worker.lock");
    let made = std::process::Command::new("mkfifo")
        .arg(&lock)
        .status()
        .unwrap();
    assert!(made.success());
    let output = worker_with_state(&dir, &state, &["call", "echo", "echo", "{}"]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not a regular file") && stderr.contains(&lock.display().to_string()),
        "{stderr}"
    );
    // Removed, the worker makes its own and goes on.
    std::fs::remove_file(&lock).unwrap();
    let output = worker_with_state(&dir, &state, &["call", "echo", "echo", "{}"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// Two workers started together: the one that finds the directory locked before its holder
/// wrote who it is looks again, and names the holder.
#[test]
fn a_worker_started_with_another_names_it() {
    let dir = PluginDir::new();
    let state = dir.shadow().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let lock = state.join("worker.lock");
    std::fs::write(&lock, b"").unwrap();
    // Another process holds the lock (flock(1) takes the same kind of lock), its note not
    // written yet.
    let mut holder = Command::new("flock")
        // The holder is `sleep` itself: killing it lets the lock go.
        .arg("--no-fork")
        .arg(&lock)
        .args(["sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("flock(1), from util-linux");
    let held = || {
        Command::new("flock")
            .args(["-n"])
            .arg(&lock)
            .arg("true")
            .status()
            .is_ok_and(|s| !s.success())
    };
    assert!(
        eventually(Duration::from_secs(30), held),
        "flock(1) never took the lock"
    );
    let note = {
        let lock = lock.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(&lock, br#"{"pid": 4242, "command": "run"}"#).unwrap();
        })
    };
    let output = worker_with_state(&dir, &state, &["run", "--tasks", "/dev/null"]);
    note.join().unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("another worker (pid 4242) (`worker run`) is using the state directory"),
        "{stderr}"
    );
}
