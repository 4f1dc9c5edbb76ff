//! Hostile inputs the `worker` must refuse or survive: planted symbolic links in the state
//! directory, task lines that are not UTF-8 or are huge, configuration files that are FIFOs or
//! devices, a bad `--log` filter, plugin text that is not UTF-8 or carries control characters.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tests::PluginDir;

/// The worker binary on `dir` with state in `state`, logging warnings.
fn worker_command(dir: &PluginDir, state: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker-under-test"));
    command
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(state)
        .env_remove("WORKER_LOG");
    command
}

/// The worker binary under an address-space limit of `kib` KiB (a runaway read fails fast
/// instead of eating the machine's memory), on `dir` with state in `state`.
fn limited_worker(kib: u32, dir: &PluginDir, state: &Path) -> Command {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(format!(r#"ulimit -v {kib} && exec "$@""#))
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(state)
        // One malloc arena: each thread's own arena reserves 64 MiB of address space, which
        // under `ulimit -v` fails allocations at random (whichever thread allocates first),
        // whatever the worker actually holds.
        .env("MALLOC_ARENA_MAX", "1")
        .env_remove("WORKER_LOG");
    command
}

fn run(mut command: Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Waits at most `limit` for `child` to exit; kills it and fails the test if it does not.
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "the worker did not exit within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// State directory

/// The state directory with a symbolic link at the old temporary name and one at the state
/// file's name, each pointing at a victim file outside it.
struct PlantedState {
    dir: PluginDir,
    state: PathBuf,
    victim_temp: PathBuf,
    victim_state: PathBuf,
    /// Arguments before the command (`--insecure-permissions`).
    global: Vec<&'static str>,
}

const VICTIM_TEMP: &str = "precious: must never be overwritten\n";
/// Valid state for the fixture: had the link been followed, the total would start at 41.
const VICTIM_STATE: &str = "41";

impl PlantedState {
    fn new() -> Self {
        let dir = PluginDir::new();
        dir.add("fixture", "libfixture.so");
        let state = dir.shadow().join("state");
        std::fs::create_dir(&state).unwrap();
        let victim_temp = dir.shadow().join("victim-temp");
        let victim_state = dir.shadow().join("victim-state");
        std::fs::write(&victim_temp, VICTIM_TEMP).unwrap();
        std::fs::write(&victim_state, VICTIM_STATE).unwrap();
        Self {
            dir,
            state,
            victim_temp,
            victim_state,
            global: Vec::new(),
        }
    }

    /// Plants the links, running `ln` through `prefix` (e.g. as another user).
    fn plant(&self, prefix: &[&str]) {
        for (link, target) in [
            (".fixture.json.tmp", &self.victim_temp),
            ("fixture.json", &self.victim_state),
        ] {
            let (program, args) = match prefix.split_first() {
                Some((program, args)) => (*program, args.to_vec()),
                None => ("ln", Vec::new()),
            };
            let mut ln = Command::new(program);
            ln.args(args);
            if !prefix.is_empty() {
                ln.arg("ln");
            }
            let status = ln
                .arg("-s")
                .arg(target)
                .arg(self.state.join(link))
                .status()
                .unwrap();
            assert!(status.success(), "planting {link}");
        }
    }

    fn call(&self, method: &str, params: &str) -> Output {
        let mut command = worker_command(&self.dir, &self.state);
        command
            .args(&self.global)
            .args(["--log", "warn", "call", "fixture", method, params]);
        run(command)
    }

    /// A save, a reload and a shutdown through the links leave both victims untouched.
    fn check(&self) {
        let first = self.call("add", r#"{"n": 1}"#);
        let stderr = text(&first.stderr);
        assert!(first.status.success(), "{stderr}");
        // The link at fixture.json was not followed: the total starts from 0, not from 41.
        assert_eq!(text(&first.stdout).trim(), "1", "{stderr}");
        assert!(
            stderr.contains("fixture.json") && stderr.contains("symbolic link"),
            "the warning names the link: {stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(&self.victim_temp).unwrap(),
            VICTIM_TEMP
        );
        assert_eq!(
            std::fs::read_to_string(&self.victim_state).unwrap(),
            VICTIM_STATE
        );
        // The save replaced the link itself with a regular file.
        let saved = self.state.join("fixture.json");
        assert!(
            std::fs::symlink_metadata(&saved).unwrap().is_file(),
            "the link was replaced"
        );
        assert_eq!(std::fs::read_to_string(&saved).unwrap(), "1");
        // The next run restores it (the state file now is ours) and saves again.
        let second = self.call("add", r#"{"n": 2}"#);
        assert_eq!(text(&second.stdout).trim(), "3", "{}", text(&second.stderr));
        assert_eq!(
            std::fs::read_to_string(&self.victim_temp).unwrap(),
            VICTIM_TEMP
        );
        assert_eq!(
            std::fs::read_to_string(&self.victim_state).unwrap(),
            VICTIM_STATE
        );
        // No temporary file is left behind, whatever its random name.
        let left: Vec<String> = std::fs::read_dir(&self.state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            // `crash-records` is opened (and created) at start, for the crash handler;
            // worker.lock is the state directory's lock (one writer at a time).
            .filter(|n| {
                n != ".fixture.json.tmp"
                    && n != "fixture.json"
                    && n != "crash-records"
                    && n != "worker.lock"
            })
            // The default store (see "Running a fleet" in the README).
            .filter(|n| !n.starts_with("store.db"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[test]
fn planted_state_symlinks_are_never_written_through_or_read() {
    let planted = PlantedState::new();
    planted.plant(&[]);
    planted.check();
}

/// The same attack by another, unprivileged user on a state directory they can write to.
#[test]
fn state_symlinks_planted_by_another_user_are_never_followed() {
    let setpriv = Path::new("/usr/bin/setpriv");
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| text(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !setpriv.exists() || !is_root {
        eprintln!(
            "skipped: needs root and setpriv to act as another user; planted links are tested above"
        );
        return;
    }
    let planted = PlantedState::new();
    // The other user must reach the state directory and write into it.
    use std::os::unix::fs::PermissionsExt as _;
    let root = planted.dir.shadow().parent().unwrap().to_path_buf();
    for (path, mode) in [
        (&root, 0o711),
        (&planted.dir.shadow(), 0o711),
        (&planted.state, 0o777),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    planted.plant(&[
        "/usr/bin/setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]);
    // A state directory others can write is refused outright, and nothing in it is touched.
    let refused = planted.call("add", r#"{"n": 1}"#);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("refusing the state directory"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&planted.victim_state).unwrap(),
        VICTIM_STATE
    );
    // Allowed for development, the links are still never followed.
    let mut planted = planted;
    planted.global.push("--insecure-permissions");
    planted.check();
}

// ---------------------------------------------------------------------------------------------
// Task lines

const TASK_A: &str = r#"{"id": "a", "type": "chat", "input": {"messages": [{"role": "user", "content": "My city is Hanoi."}, {"role": "user", "content": "What is my city?"}]}, "reference": "Hanoi"}"#;
const TASK_B: &str =
    r#"{"id": "b", "type": "chat", "input": {"messages": [{"role": "user", "content": "Hello"}]}}"#;

fn records(output: &Output) -> Vec<serde_json::Value> {
    text(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn run_gives_bad_and_overlong_lines_an_error_record_and_goes_on() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let mut tasks = Vec::new();
    tasks.extend_from_slice(TASK_A.as_bytes());
    tasks.extend_from_slice(b"\n{\"id\": \"\xff\xfe\", \"type\": \"chat\"}\n");
    tasks.extend_from_slice(&[b'x'; 5000]);
    tasks.push(b'\n');
    tasks.extend_from_slice(TASK_B.as_bytes());
    tasks.push(b'\n');
    let file = dir.shadow().join("tasks.jsonl");
    std::fs::write(&file, &tasks).unwrap();

    let mut command = worker_command(&dir, &state);
    command
        .args(["run", "--max-line-bytes", "1000", "--tasks"])
        .arg(&file);
    let output = run(command);
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let records = records(&output);
    assert_eq!(records.len(), 4, "{records:?}");
    assert_eq!(records[0]["id"], "a", "{records:?}");
    assert!(records[0].get("error").is_none(), "{records:?}");
    assert_eq!(records[1]["line"], 2);
    let error = records[1]["error"].as_str().unwrap();
    assert!(
        error.contains("line 2") && error.contains("UTF-8"),
        "{error}"
    );
    assert_eq!(records[2]["line"], 3);
    let error = records[2]["error"].as_str().unwrap();
    assert!(
        error.contains("line 3")
            && error.contains("1000 bytes")
            && error.contains("--max-line-bytes"),
        "{error}"
    );
    assert_eq!(records[3]["id"], "b", "{records:?}");
    assert!(records[3].get("error").is_none(), "{records:?}");
    // The run finished properly: the plugin's state was saved.
    assert!(state.join("fixture.json").is_file(), "{stderr}");
}

/// A 150 MiB line under a 120 MB address-space limit: read whole, it could not even be held.
#[test]
fn an_overlong_line_is_skipped_without_being_held_in_memory() {
    use std::io::Write as _;
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    let mut child = limited_worker(120_000, &dir, &state)
        .args(["run", "--tasks", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        writeln!(stdin, "{TASK_A}")?;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..150 {
            stdin.write_all(&chunk)?;
        }
        writeln!(stdin)?;
        writeln!(stdin, "{TASK_B}")
    });
    let output = wait_bounded(child, Duration::from_secs(120));
    let written = writer.join().unwrap();
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    written.unwrap();
    let records = records(&output);
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(records[0]["id"], "a");
    assert_eq!(records[1]["line"], 2);
    assert!(
        records[1]["error"]
            .as_str()
            .unwrap()
            .contains("longer than the limit of 16777216 bytes"),
        "{records:?}"
    );
    assert_eq!(records[2]["id"], "b");
}

// ---------------------------------------------------------------------------------------------
// The configuration file

/// How the configuration file is made hostile, and what the refusal must say.
#[derive(Debug, Clone, Copy)]
enum BadConfig {
    /// `plugins.json` is a FIFO nobody writes to.
    Fifo,
    /// `plugins.json` is a symbolic link to `/dev/zero`.
    LinkToDevZero,
    /// `--config /dev/zero`.
    DevZero,
}

impl BadConfig {
    const ALL: [BadConfig; 3] = [
        BadConfig::Fifo,
        BadConfig::LinkToDevZero,
        BadConfig::DevZero,
    ];

    /// Sets the case up in `dir`; returns the extra arguments and the file the error must name.
    fn set_up(self, dir: &PluginDir) -> (Vec<String>, String) {
        let config = dir.path().join("plugins.json");
        match self {
            BadConfig::Fifo => {
                let status = Command::new("mkfifo").arg(&config).status().unwrap();
                assert!(status.success());
                (Vec::new(), config.display().to_string())
            }
            BadConfig::LinkToDevZero => {
                std::os::unix::fs::symlink("/dev/zero", &config).unwrap();
                (Vec::new(), config.display().to_string())
            }
            BadConfig::DevZero => (
                vec!["--config".to_owned(), "/dev/zero".to_owned()],
                "/dev/zero".to_owned(),
            ),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            BadConfig::Fifo => "FIFO",
            BadConfig::LinkToDevZero | BadConfig::DevZero => "character device",
        }
    }
}

fn assert_config_refused(case: BadConfig, what: &str, named: &str, output: &Output) {
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{case:?} {what}: {stderr}");
    assert_eq!(output.status.code(), Some(1), "{case:?} {what}: {stderr}");
    assert!(
        stderr.contains(named) && stderr.contains(case.kind()) && stderr.contains("regular file"),
        "{case:?} {what}: the error names the file and what it is: {stderr}"
    );
}

#[test]
fn list_refuses_a_configuration_that_is_not_a_regular_file() {
    for case in BadConfig::ALL {
        let dir = PluginDir::new();
        dir.add("echo", "libecho.so");
        let (args, named) = case.set_up(&dir);
        let child = limited_worker(500_000, &dir, &dir.shadow().join("state"))
            .args(&args)
            .arg("list")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = wait_bounded(child, Duration::from_secs(30));
        assert_config_refused(case, "list", &named, &output);
    }
}

#[test]
fn serve_exits_at_once_on_a_configuration_that_is_not_a_regular_file() {
    for case in BadConfig::ALL {
        let dir = PluginDir::new();
        dir.add("echo", "libecho.so");
        let (args, named) = case.set_up(&dir);
        let child = limited_worker(500_000, &dir, &dir.shadow().join("state"))
            .args(&args)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = wait_bounded(child, Duration::from_secs(30));
        assert_config_refused(case, "serve", &named, &output);
    }
}

// ---------------------------------------------------------------------------------------------
// The log filter

#[test]
fn an_invalid_log_filter_is_a_usage_error() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let state = dir.shadow().join("state");
    for (flag, env) in [
        (Some("warnn"), None),
        (Some("info,host=loud"), None),
        (None, Some("warnn")),
    ] {
        let mut command = worker_command(&dir, &state);
        if let Some(filter) = flag {
            command.args(["--log", filter]);
        }
        if let Some(filter) = env {
            command.env("WORKER_LOG", filter);
        }
        command.arg("list");
        let output = run(command);
        let stderr = text(&output.stderr);
        let filter = flag.or(env).unwrap();
        assert_eq!(output.status.code(), Some(2), "{filter}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid --log filter `{filter}`")),
            "{filter}: {stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "nothing ran: {}",
            text(&output.stdout)
        );
    }
    // A valid one still works.
    let mut command = worker_command(&dir, &state);
    command.args(["--log", "warn,plugin_host=info", "list"]);
    let output = run(command);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("plugin loaded"));
}

// ---------------------------------------------------------------------------------------------
// Plugin text

fn fixture_call(method: &str) -> Output {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let mut command = worker_command(&dir, &dir.shadow().join("state"));
    command.args(["--log", "warn", "call", "fixture", method]);
    run(command)
}

#[test]
fn an_answer_that_is_not_utf8_answers_nothing() {
    let output = fixture_call("not_utf8");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    // Before: the raw bytes 0xFF 0xFE went to stdout as "JSON".
    assert_eq!(output.stdout, b"null\n", "{stderr}");
    assert!(
        stderr.contains("fixture.not_utf8") && stderr.contains("not UTF-8"),
        "{stderr}"
    );

    // The library answers nothing too, and counts an error.
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let host = dir.host();
    host.scan().unwrap();
    assert_eq!(
        host.execute("fixture", "not_utf8", &serde_json::Value::Null),
        None
    );
    let error = host
        .call("fixture", "not_utf8", &serde_json::Value::Null)
        .unwrap_err();
    assert!(error.to_string().contains("not UTF-8"), "{error}");
}

/// The fixture's text: `oops ESC[2J NEWLINE <a forged log line>`.
const FORGED: &str = "2030-01-01T00:00:00Z  INFO host: forged line";

fn assert_escaped_on_one_line(stderr: &str, context: &str) {
    assert!(!stderr.contains('\x1b'), "{context}: a raw ESC: {stderr:?}");
    assert!(
        stderr.contains(r"oops\x1b[2J\n2030-01-01T00:00:00Z  INFO host: forged line"),
        "{context}: escaped in place: {stderr}"
    );
    assert!(
        !stderr.lines().any(|line| line.starts_with(FORGED)),
        "{context}: a forged line: {stderr}"
    );
}

#[test]
fn control_characters_from_plugins_are_escaped_in_cli_output_and_logs() {
    // The error message, printed by `worker call` and in the warning log line.
    let output = fixture_call("control_error");
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(output.stdout, b"null\n");
    assert!(
        stderr.contains("note: the call answered nothing: fixture.control_error failed: oops"),
        "{stderr}"
    );
    assert_escaped_on_one_line(&stderr, "call");

    // A plugin's log event, re-emitted by the host.
    let output = fixture_call("control_log");
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_escaped_on_one_line(&stderr, "log");

    // In a log line of the library's own, through `worker run` (the pipeline asks plugins).
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    dir.configure(&serde_json::json!({
        "fixture": {"config": {"on": {"task.received": {"block": {"reason": "oops\u{1b}[2J\n2030-01-01T00:00:00Z  INFO host: forged line", "code": "c\nd"}}}}}
    }));
    let mut command = worker_command(&dir, &dir.shadow().join("state"));
    command.args(["--log", "info", "run", "--tasks", "-"]);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{TASK_A}").unwrap();
    }
    let output = wait_bounded(child, Duration::from_secs(60));
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("hook blocked"), "{stderr}");
    assert_escaped_on_one_line(&stderr, "hook blocked");
}
