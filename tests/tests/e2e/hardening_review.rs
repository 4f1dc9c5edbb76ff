//! Findings of a hostile review of the hardening work, each against the real `worker`: an idle
//! watcher that must stay idle, file names and manifest fields that must not forge log lines,
//! a token file that must not hang start-up, a state directory others can write.

use crate::worker;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::io::{Read as _, Write as _};

use tests::{PluginDir, http};

use crate::serve::Worker;

/// CPU time (user + system) of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_watcher_does_not_wake_itself_up() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &[]);
    // Past the start-up work.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(worker.pid());
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(worker.pid()) - before;
    let elapsed = start.elapsed().as_secs_f64();
    // Ticks are 1/100 s on Linux; 10% of a core over the interval is a generous bound.
    let share = used as f64 / 100.0 / elapsed;
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
    assert!(
        share < 0.10,
        "an idle worker used {:.0}% of a core ({used} ticks in {elapsed:.1} s)",
        share * 100.0
    );
}

/// A log line the tests try to forge through a file name or a manifest field.
const FORGED: &str = "\n2026-01-01T00:00:00.000000Z ERROR host: FORGED LINE \x1b[31mred";

/// Asserts that nothing in `text` starts a forged line or carries an escape character.
fn assert_not_forged(text: &str, context: &str) {
    assert!(
        !text.contains('\x1b'),
        "{context}: an escape character got through:\n{text}"
    );
    for line in text.lines() {
        assert!(
            !line.starts_with("2026-01-01T00:00:00.000000Z"),
            "{context}: a forged line:\n{text}"
        );
    }
    assert!(
        text.contains("FORGED LINE"),
        "{context}: the name was not shown at all:\n{text}"
    );
}

#[test]
fn file_names_cannot_forge_log_lines_or_drive_a_terminal() {
    let dir = PluginDir::new();
    // One that loads (a real plugin under a hostile name), one that is refused.
    dir.add("echo", &format!("libecho{FORGED}.so"));
    dir.write(&format!("junk{FORGED}.so"), b"not a plugin at all");
    let output = worker(&dir, &["--log", "info", "list"], &[]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("plugin loaded"), "{stderr}");
    assert!(stderr.contains("plugin file refused"), "{stderr}");
    assert_not_forged(&stderr, "worker list's log");
    assert_not_forged(&stdout, "worker list's listing");
}

#[test]
fn a_plugin_version_is_validated_and_never_logged_raw() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let version = format!("1.0{FORGED}");
    let output = worker(
        &dir,
        &["--log", "info", "list", "--json"],
        &[("FIXTURE_PLUGIN_VERSION", &version)],
    );
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_not_forged(&stderr, "worker list's log");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["plugins"], serde_json::json!([]), "{report:#}");
    let reason = report["refused"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("invalid version"), "{reason}");
    assert!(reason.contains("control character"), "{reason}");

    let long = "1".repeat(65);
    let output = worker(
        &dir,
        &["list", "--json"],
        &[("FIXTURE_PLUGIN_VERSION", &long)],
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let reason = report["refused"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("65 characters long"), "{reason}");

    let fine = "2.0.0-rc.1+build.5 (test)";
    let output = worker(
        &dir,
        &["list", "--json"],
        &[("FIXTURE_PLUGIN_VERSION", fine)],
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["plugins"][0]["version"], fine, "{report:#}");
}

/// Runs `worker serve` on `dir` with `args`; `None` if it had not exited within `limit` (it is
/// then killed).
fn serve_within(dir: &PluginDir, args: &[&str], limit: Duration) -> Option<Output> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker-under-test"));
    command
        .arg("--plugins")
        .arg(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-watch",
            "--state-dir",
        ])
        .arg(dir.shadow().join("state"))
        .args(args)
        .env_remove("WORKER_LOG")
        .env_remove("WORKER_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn a_token_file_that_is_a_fifo_is_refused_at_once() {
    let dir = PluginDir::new();
    let fifo = dir.shadow().join("token-fifo");
    mkfifo(&fifo);
    let output = serve_within(
        &dir,
        &["--token-file", fifo.to_str().unwrap()],
        Duration::from_secs(10),
    )
    .expect("serve hung on a FIFO given as --token-file");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a regular file"), "{stderr}");
    assert!(stderr.contains("token-fifo"), "{stderr}");

    // A FIFO planted where the generated token is kept.
    let state = dir.shadow().join("state");
    std::fs::create_dir_all(&state).unwrap();
    mkfifo(&state.join("control-token"));
    let output = serve_within(&dir, &[], Duration::from_secs(10))
        .expect("serve hung on a FIFO in place of the control token");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

/// A worker serving the fixture plugin, without the watcher.
fn serving() -> (PluginDir, Worker) {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    (dir, worker)
}

#[test]
fn healthz_answers_while_every_connection_slot_is_held() {
    let (_dir, worker) = serving();
    // 64 connections that never finish their head hold every regular slot.
    let held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(&worker.addr).unwrap();
            stream.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            stream
        })
        .collect();
    assert!(
        tests::eventually(Duration::from_secs(5), || worker
            .http("GET", "/v1/plugins", b"")
            .status
            == 503),
        "a 65th connection was served in full"
    );
    for _ in 0..3 {
        let started = Instant::now();
        let health = http(&worker.addr, "GET", "/healthz", b"");
        assert_eq!(health.status, 200, "{}", health.body);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    drop(held);
    assert!(
        tests::eventually(Duration::from_secs(5), || worker
            .http("GET", "/v1/plugins", b"")
            .status
            == 200),
        "the slots did not come back"
    );
    worker.stop();
}

#[test]
fn a_client_that_never_reads_its_answers_is_cut_off() {
    let (_dir, worker) = serving();
    let mut stream = std::net::TcpStream::connect(&worker.addr).unwrap();
    stream.set_nonblocking(true).unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", worker.addr);
    let chunk = request.repeat(65536 / request.len());
    let started = Instant::now();
    let mut sent = 0usize;
    // Pipelined requests, answers never read: once both sides' buffers are full the
    // worker's write blocks; it must give up and close the connection.
    let closed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the connection is still open after {:?} ({sent} bytes sent)",
            started.elapsed()
        );
        match stream.write(chunk.as_bytes()) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            closed.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{closed}"
    );
    assert_eq!(http(&worker.addr, "GET", "/healthz", b"").status, 200);
    worker.stop();
}

#[test]
fn a_client_that_shuts_down_its_writing_side_gets_its_answer() {
    let (_dir, worker) = serving();
    let mut stream = std::net::TcpStream::connect(&worker.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n",
        worker.addr
    )
    .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    worker.stop();
}

/// A user id that is neither root nor the tests' user.
const OTHER_USER: u32 = 65534;

#[test]
fn a_state_directory_others_can_write_is_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = worker(&dir, &["call", "fixture", "total"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("refusing the state directory"), "{stderr}");
    assert!(stderr.contains("chmod go-w"), "{stderr}");

    let output = worker(
        &dir,
        &["--insecure-permissions", "call", "fixture", "total"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "0");
    assert!(stderr.contains("--insecure-permissions"), "{stderr}");
}

#[test]
fn a_state_file_owned_by_another_user_is_not_restored() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let saved = worker(&dir, &["call", "fixture", "add", r#"{"n": 5}"#], &[]);
    assert!(saved.status.success(), "{saved:?}");
    let total = worker(&dir, &["call", "fixture", "total"], &[]);
    assert_eq!(String::from_utf8_lossy(&total.stdout).trim(), "5");

    let file = dir.shadow().join("state").join("fixture.json");
    if std::os::unix::fs::chown(&file, Some(OTHER_USER), None).is_err() {
        eprintln!("skipped: cannot give a file to another user here (not root)");
        return;
    }
    let output = worker(&dir, &["call", "fixture", "total"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "0",
        "a state file owned by another user was restored: {stderr}"
    );
    assert!(stderr.contains("owned by another user"), "{stderr}");
}

#[test]
fn a_plugin_that_changes_the_working_directory_does_not_unload_the_others() {
    use std::io::BufRead as _;
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    dir.add("echo", "libecho.so");
    let root = dir.path().parent().unwrap().to_path_buf();
    // Relative paths, from the directory the worker starts in.
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .current_dir(&root)
        .args(["--plugins", "plugins", "--log", "info", "serve"])
        .args(["--state-dir", "shadow/state", "--listen", "127.0.0.1:0"])
        .env_remove("WORKER_LOG")
        .env_remove("WORKER_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let addr = first
        .split(" control API on ")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .trim()
        .trim_start_matches("http://")
        .to_owned();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stdout.read_to_string(&mut rest);
    });
    let token = std::fs::read_to_string(root.join("shadow/state/control-token")).unwrap();
    let api = tests::Api {
        addr,
        token: token.trim().to_owned(),
    };
    assert_eq!(api.http("GET", "/v1/plugins/echo", b"").status, 200);
    let moved = api.http("POST", "/v1/plugins/fixture/chdir", b"\"/\"");
    assert_eq!((moved.status, moved.body.as_str()), (200, "\"done\""));
    // Well past the watcher's settle time and a poll.
    std::thread::sleep(Duration::from_secs(2));
    let echo = api.http("GET", "/v1/plugins/echo", b"");
    let fixture = api.http("GET", "/v1/plugins/fixture", b"");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(echo.status, 200, "echo was unloaded: {}", echo.body);
    assert_eq!(
        fixture.status, 200,
        "fixture was unloaded: {}",
        fixture.body
    );
}

#[test]
fn a_temporary_directory_others_can_write_without_the_sticky_bit_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let temp = dir.shadow().join("open-temp");
    std::fs::create_dir(&temp).unwrap();
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker-under-test"));
    let output = command
        .arg("--plugins")
        .arg(dir.path())
        .args(["list", "--json"])
        .env("TMPDIR", &temp)
        .env_remove("WORKER_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("sticky bit"), "{stderr}");
    assert!(stderr.contains("open-temp"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&temp).unwrap().count(),
        0,
        "a shadow directory was made"
    );

    // With the sticky bit (as /tmp has), it is fine.
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .args(["list", "--json"])
        .env("TMPDIR", &temp)
        .env_remove("WORKER_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn a_shadow_directory_swapped_under_its_name_is_never_written_to() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let host = dir.host();
    host.scan().unwrap();
    assert!(host.plugin("fixture").is_some());
    // Someone renames the shadow directory away and puts another in its place (here with the
    // same owner and mode: only its identity differs).
    let shadow = dir.shadow();
    let moved = shadow.with_file_name("shadow-moved");
    std::fs::rename(&shadow, &moved).unwrap();
    std::fs::create_dir(&shadow).unwrap();
    let error = host.reload("fixture").unwrap_err();
    let message = error.to_string();
    assert!(message.contains("was replaced"), "{message}");
    assert_eq!(
        std::fs::read_dir(&shadow).unwrap().count(),
        0,
        "a copy was written into the swapped-in directory"
    );
    // The loaded generation keeps serving.
    assert!(host.plugin("fixture").is_some());
}

#[test]
fn an_empty_worker_log_means_the_default_filter() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker-under-test"));
    let output = command
        .arg("--plugins")
        .arg(dir.path())
        .args(["list", "--json"])
        .env("WORKER_LOG", "")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["plugins"][0]["name"], "echo");
}

#[test]
fn a_shadow_directory_whose_lock_is_held_is_not_removed_as_stale() {
    use std::os::unix::fs::PermissionsExt as _;
    // A pid that is gone here, as a live worker in another pid namespace sharing /tmp looks.
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let live = std::env::temp_dir().join(format!("plugin-host-{pid}-live00000000"));
    std::fs::create_dir(&live).unwrap();
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(live.join("libecho.1.1.so"), b"mapped by the other worker").unwrap();
    // The other worker: a process holding the lock (`flock(1)`), until it is killed.
    let mut holder = Command::new("flock")
        // -o: the lock stays with `flock` itself, not with the command it runs.
        .args(["-n", "-o"])
        .arg(live.join(".lock"))
        .args(["-c", "echo locked; exec sleep 60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut said,
    )
    .unwrap();
    assert_eq!(said.trim(), "locked");

    let dir = PluginDir::new();
    let host = plugin_host::PluginHost::builder(dir.path())
        .build()
        .unwrap();
    let kept = live.join("libecho.1.1.so").exists();
    // The lock released (the other worker died): the next host removes it.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let next = plugin_host::PluginHost::builder(dir.path())
        .build()
        .unwrap();
    let removed = !live.exists();
    let _ = std::fs::remove_dir_all(&live);
    assert!(kept, "a live worker's shadow directory was removed");
    assert!(removed, "a dead worker's shadow directory was left");
    // A host's own shadow directory holds its lock file while it lives, and is gone after.
    let own = host.shadow_dir().to_path_buf();
    assert!(own.join(".lock").exists());
    drop(host);
    drop(next);
    assert!(!own.exists(), "{} left behind", own.display());
}
