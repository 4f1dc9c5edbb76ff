//! The `worker` command line: output and exit codes.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};
use tests::PluginDir;

fn worker(dir: &PluginDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.shadow().join("state"))
        .args(args)
        .env_remove("WORKER_LOG")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn example_dir() -> PluginDir {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    dir.add("faulty", "libfaulty.so");
    dir.write("libbroken.so", b"not a library");
    dir
}

/// A reader that goes away (`worker example-tasks | head -1`) ends the command quietly, with
/// success, as with any Unix tool.
#[test]
fn a_closed_output_pipe_is_no_error() {
    use std::io::BufRead as _;
    let dir = PluginDir::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .args(["example-tasks", "--count", "100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with('{'), "{first}");
    // The reader is dropped here: the rest of the output meets a closed pipe.
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(output.stderr.is_empty(), "{output:?}");
}

#[test]
fn list_shows_plugins_and_refusals_and_exits_zero() {
    let dir = example_dir();
    let output = worker(&dir, &["list"]);
    assert!(output.status.success());
    let text = stdout(&output);
    assert!(
        text.contains("2 plugin(s) loaded, 1 file(s) refused"),
        "{text}"
    );
    assert!(text.contains("echo 0.1.0"), "{text}");
    assert!(text.contains("libecho.so"), "{text}");
    assert!(text.contains("Returns its params unchanged"), "{text}");
    assert!(text.contains("- summarize:"), "{text}");
    assert!(
        text.contains("@ task.received (sequential, priority 50)"),
        "faulty's hook: {text}"
    );
    assert!(text.contains("refused:"), "{text}");
    assert!(
        text.contains("libbroken.so") && text.contains("not a shared library"),
        "{text}"
    );
}

#[test]
fn list_json() {
    let dir = example_dir();
    let output = worker(&dir, &["list", "--json"]);
    assert!(output.status.success());
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let names: Vec<&str> = report["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "faulty"]);
    let echo = &report["plugins"][0];
    assert_eq!(echo["version"], "0.1.0");
    assert!(echo["file"].as_str().unwrap().ends_with("libecho.so"));
    assert_eq!(echo["methods"][0]["name"], "echo");
    assert_eq!(report["refused"].as_array().unwrap().len(), 1);
    assert!(
        report["refused"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("not a shared library")
    );
}

#[test]
fn call_prints_the_answer() {
    let dir = example_dir();
    let output = worker(&dir, &["call", "echo", "echo", r#"{"a": [1, 2]}"#]);
    assert!(output.status.success());
    let answer: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(answer, json!({"a": [1, 2]}));
}

#[test]
fn call_that_degrades_prints_null_and_the_reason() {
    let dir = example_dir();
    for (plugin, method, reason) in [
        ("faulty", "panic", "panicked"),
        ("faulty", "error", "failed on purpose"),
        ("faulty", "bad_json", "invalid JSON"),
        ("nobody", "x", "no plugin `nobody`"),
        ("echo", "nothing", "no method `nothing`"),
    ] {
        let output = worker(&dir, &["call", plugin, method]);
        assert!(output.status.success(), "{plugin}.{method}");
        assert_eq!(stdout(&output).trim(), "null", "{plugin}.{method}");
        assert!(
            stderr(&output).contains(reason),
            "{plugin}.{method}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn malformed_params_are_a_usage_error() {
    let dir = example_dir();
    let output = worker(&dir, &["call", "echo", "echo", "{oops"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).is_empty());
    assert!(
        stderr(&output).contains("PARAMS_JSON is not valid JSON"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn help_explains_commands_and_options() {
    let dir = PluginDir::new();
    let output = worker(&dir, &["--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for needle in ["list", "call", "--plugins", "--config", "--log"] {
        assert!(
            text.contains(needle),
            "--help does not mention {needle}: {text}"
        );
    }
    let call_help = stdout(&worker(&dir, &["call", "--help"]));
    assert!(
        call_help.contains("PARAMS_JSON") && call_help.contains("null"),
        "{call_help}"
    );
}

#[test]
fn plugins_directory_defaults_to_plugins_in_the_current_directory() {
    let dir = example_dir();
    let output = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .args(["call", "echo", "echo", "42"])
        .current_dir(dir.path().parent().unwrap())
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(stdout(&output).trim(), "42");
}

#[test]
fn missing_plugins_directory_fails_with_advice() {
    let dir = PluginDir::new();
    let output = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .args(["--plugins", "/nonexistent/plugins", "list"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("/nonexistent/plugins") && err.contains("--plugins"),
        "{err}"
    );
    drop(dir);
}

#[test]
fn config_option_points_to_another_file() {
    let dir = example_dir();
    let config = dir.path().parent().unwrap().join("other.json");
    std::fs::write(&config, r#"{"plugins": {"echo": {"enabled": false}}}"#).unwrap();
    let output = worker(
        &dir,
        &["--config", config.to_str().unwrap(), "list", "--json"],
    );
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["plugins"].as_array().unwrap().len(), 1);
    assert!(report["refused"].to_string().contains("disabled"));
}

#[test]
fn hooks_lists_every_point_with_subscribers_in_order() {
    let dir = example_dir();
    dir.add("fixture", "libfixture.so");
    let output = worker(&dir, &["hooks"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for point in [
        "worker.start",
        "task.received",
        "task.after_step",
        "task.scored",
        "plugin.unloaded",
    ] {
        assert!(text.contains(point), "{point} missing:\n{text}");
    }
    let received = text.split("task.received").nth(1).unwrap();
    let faulty = received
        .find("1. faulty (plugin) sequential priority 50")
        .expect(&text);
    let fixture = received
        .find("2. fixture (plugin) sequential priority 100")
        .expect(&text);
    assert!(faulty < fixture);
    let json: Value = serde_json::from_str(&stdout(&worker(&dir, &["hooks", "--json"]))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 10);
    assert_eq!(json[2]["name"], "task.received");
    assert_eq!(json[2]["subscribers"][0]["name"], "faulty");
    assert_eq!(json[2]["writable"], json!(["input", "meta"]));
}

/// A configuration entry for a plugin nobody has, or an override of a hook point that does not
/// exist, is a warning naming the entry and the closest known name.
#[test]
fn misspelt_configuration_entries_are_warned_about_with_the_closest_name() {
    let dir = example_dir();
    dir.configure_file(&json!({
        "plugins": {
            "ecoh": {"config": {"x": 1}},
            "faulty": {"hooks": {"task.recieved": {"priority": 1}}},
            "echo": {}
        },
        "sets": {"mine": {"plugins": ["faulty", "fauly"]}}
    }));
    for command in [&["list"][..], &["call", "echo", "echo", "1"]] {
        let output = worker(&dir, command);
        assert!(output.status.success(), "{command:?}");
        let err = stderr(&output);
        assert!(
            err.contains("plugins.\"ecoh\"") && err.contains("closest known name is `echo`"),
            "{command:?}: {err}"
        );
        assert!(
            err.contains("plugins.\"faulty\".hooks.\"task.recieved\"")
                && err.contains("closest known name is `task.received`"),
            "{err}"
        );
        assert!(
            err.contains("sets.\"mine\".plugins \"fauly\"")
                && err.contains("closest known name is `faulty`"),
            "{err}"
        );
        assert_eq!(err.matches("configuration entry").count(), 3, "{err}");
    }
    // A disabled (refused) plugin's entry names a known plugin: no warning.
    dir.configure(&json!({"echo": {"enabled": false}}));
    let err = stderr(&worker(&dir, &["list"]));
    assert!(!err.contains("configuration entry"), "{err}");
}

/// `--config FILE` given and missing is an error; the default path may be absent.
#[test]
fn an_explicit_config_file_must_exist() {
    let dir = example_dir();
    let missing = dir.path().parent().unwrap().join("no-such.json");
    let output = worker(&dir, &["--config", missing.to_str().unwrap(), "list"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("no-such.json") && err.contains("does not exist"),
        "{err}"
    );
    assert!(stdout(&output).is_empty());
    // Without --config, plugins.json may be absent.
    assert!(worker(&dir, &["list"]).status.success());
}

/// `call --strict` exits 3 when the plugin or method is missing, 4 when the plugin failed.
#[test]
fn strict_call_exits_non_zero_when_nothing_answered() {
    let dir = example_dir();
    for (args, code) in [
        (&["call", "--strict", "echo", "echo", "1"][..], 0),
        (&["call", "--strict", "nobody", "x"], 3),
        (&["call", "--strict", "echo", "nothing"], 3),
        (&["call", "--strict", "faulty", "error"], 4),
        (&["call", "--strict", "faulty", "panic"], 4),
        (&["call", "faulty", "error"], 0),
    ] {
        let output = worker(&dir, args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&output)
        );
        if code != 0 {
            assert_eq!(stdout(&output).trim(), "null", "{args:?}");
        }
    }
}

/// `run --strict` exits 1 when a task failed, was blocked or was a bad line; `--summary-json`
/// writes the summary tables; an error record keeps the fields that parsed.
#[test]
fn strict_run_and_the_json_summary() {
    let dir = PluginDir::new();
    let good = json!({"id": "a", "type": "summarize", "input": {"title": "Orion", "text": "The Orion price is 5 dollars."}, "reference": "Orion"});
    let tasks = dir.shadow().join("tasks.jsonl");
    let summary_file = dir.shadow().join("summary.json");
    let run = |input: &str, strict: bool| {
        std::fs::write(&tasks, input).unwrap();
        let mut args = vec!["run", "--tasks", tasks.to_str().unwrap()];
        args.extend(["--summary-json", summary_file.to_str().unwrap()]);
        if strict {
            args.push("--strict");
        }
        worker(&dir, &args)
    };
    let output = run(&format!("{good}\n"), true);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("1 task done, 0 failed"),
        "{}",
        stderr(&output)
    );
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary_file).unwrap()).unwrap();
    assert_eq!(summary["completed"], 1, "{summary}");
    assert_eq!(summary["rows"]["summarize/lead/-"]["count"], 1, "{summary}");
    assert!(
        summary["rows"]["summarize/lead/-"]["mean_score"].is_number(),
        "{summary}"
    );
    assert!(summary["elapsed_s"].is_number(), "{summary}");

    let bad = format!("{good}\n{}\n", json!({"id": "c", "type": "summarize"}));
    let output = run(&bad, true);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--strict: 1 task(s)"),
        "{}",
        stderr(&output)
    );
    let records: Vec<Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        (&records[1]["id"], &records[1]["type"]),
        (&json!("c"), &json!("summarize")),
        "{}",
        records[1]
    );
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary_file).unwrap()).unwrap();
    assert_eq!(
        (&summary["failed"], &summary["bad_lines"]),
        (&json!(1), &json!(1))
    );
    // Without --strict the same run exits 0.
    assert_eq!(run(&bad, false).status.code(), Some(0));
}

/// `serve --listen 7879` (a port without a host) says to give HOST:PORT, before any plugin loads.
#[test]
fn listen_without_a_host_says_to_give_host_and_port() {
    let dir = example_dir();
    for listen in ["7879", ":7879"] {
        let output = worker(&dir, &["serve", "--no-watch", "--listen", listen]);
        assert_eq!(output.status.code(), Some(1), "{listen}");
        let err = stderr(&output);
        assert!(
            err.contains("has no host: give HOST:PORT, for example 127.0.0.1:7879"),
            "{err}"
        );
        assert!(
            !err.contains("libbroken.so"),
            "plugins were loaded first: {err}"
        );
        assert!(stdout(&output).is_empty());
    }
}

/// `worker completions SHELL` prints a completion script from the CLI definition; bash's
/// completes commands and options when sourced in a real bash.
#[test]
fn completions_for_bash_zsh_and_fish() {
    let dir = PluginDir::new();
    let script = |shell: &str| {
        let output = worker(&dir, &["completions", shell]);
        assert!(output.status.success(), "{shell}: {}", stderr(&output));
        stdout(&output)
    };
    let zsh = script("zsh");
    assert!(zsh.starts_with("#compdef worker"), "{zsh}");
    let fish = script("fish");
    assert!(
        fish.contains("complete -c worker") && fish.contains("summary-json"),
        "{fish}"
    );
    let bash = script("bash");
    let file = dir.shadow().join("worker.bash");
    std::fs::write(&file, &bash).unwrap();
    let complete = |words: &str, current: usize| {
        let program = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD={current}; _worker worker \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[@]}}\"",
            file.display()
        );
        let output = Command::new("bash")
            .args(["--noprofile", "--norc", "-c", &program])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    assert_eq!(complete("worker comp", 1).trim(), "completions");
    let options = complete("worker call --st", 2);
    assert!(options.contains("--strict"), "{options}");
    let shells = complete("worker completions ''", 2);
    assert!(
        shells.contains("fish") && shells.contains("zsh"),
        "{shells}"
    );
    let output = worker(&dir, &["completions", "tcsh"]);
    assert_eq!(output.status.code(), Some(2));
}

/// Every latency a JSON answer carries names its unit in the field (`_us`, `_ms`, `_s`), the
/// same in `list --json` and the run summary, and carries no binary-fraction noise: at most
/// three decimals.
#[test]
fn latencies_name_their_unit_and_carry_no_float_noise() {
    let dir = PluginDir::new();
    dir.add("profiler", "libprofiler.so");
    let tasks = dir.shadow().join("tasks.jsonl");
    let summary_file = dir.shadow().join("summary.json");
    let lines: Vec<String> = (0..20)
        .map(|i| json!({"id": format!("t{i}"), "type": "summarize", "input": {"title": "Orion", "text": "The Orion price is 5 dollars. Then more."}, "reference": "Orion"}).to_string())
        .collect();
    std::fs::write(&tasks, lines.join("\n") + "\n").unwrap();
    let output = worker(
        &dir,
        &[
            "run",
            "--tasks",
            tasks.to_str().unwrap(),
            "--summary-json",
            summary_file.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary_file).unwrap()).unwrap();
    let profiler = &summary["plugins"]["profiler"];
    assert!(profiler["calls"].as_u64().unwrap() > 0, "{summary}");
    for field in ["total_latency_us", "mean_latency_us", "max_latency_us"] {
        assert!(
            profiler[field].as_f64().unwrap() > 0.0,
            "{field}: {summary}"
        );
    }
    assert!(profiler.get("max_latency").is_none(), "{summary}");
    assert!(summary["elapsed_s"].is_number(), "{summary}");
    assert_no_float_noise(&summary);
    for line in stdout(&output).lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        assert!(record["latency_ms"].is_number(), "{record}");
        assert_no_float_noise(&record);
    }

    let list: Value = serde_json::from_str(&stdout(&worker(&dir, &["list", "--json"]))).unwrap();
    let stats = &list["plugins"][0]["stats"];
    for field in ["total_latency_us", "mean_latency_us", "max_latency_us"] {
        assert!(stats[field].is_number(), "{field}: {list}");
    }
}

/// Every number in `value` under a key that names a unit or a score has at most three decimals
/// (four for scores).
fn assert_no_float_noise(value: &Value) {
    fn walk(key: &str, value: &Value) {
        match value {
            Value::Object(map) => map.iter().for_each(|(k, v)| walk(k, v)),
            Value::Array(items) => items.iter().for_each(|v| walk(key, v)),
            Value::Number(n) if n.is_f64() => {
                let text = n.to_string();
                let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
                let limit = if key.ends_with("score") { 4 } else { 3 };
                if key.ends_with("_us")
                    || key.ends_with("_ms")
                    || key.ends_with("_s")
                    || key == "mean_score"
                {
                    assert!(decimals <= limit, "{key} = {text}");
                }
            }
            _ => {}
        }
    }
    walk("", value);
}

/// `worker list` shows each subscription as configured (priority and mode after `plugins.json`,
/// or off), the same as `worker hooks`, in text and in JSON.
#[test]
fn list_shows_subscriptions_as_configured() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    dir.configure(&json!({
        "fixture": {"hooks": {
            "task.scored": {"priority": 7, "mode": "audit"},
            "task.received": {"enabled": false},
        }}
    }));
    let text = stdout(&worker(&dir, &["list"]));
    assert!(text.contains("@ task.scored (audit, priority 7)"), "{text}");
    assert!(text.contains("@ task.received off"), "{text}");
    assert!(
        text.contains("@ task.error (sequential, priority 100)"),
        "{text}"
    );
    let hooks = stdout(&worker(&dir, &["hooks"]));
    assert!(
        hooks.contains("fixture (plugin) audit priority 7"),
        "{hooks}"
    );

    let list: Value = serde_json::from_str(&stdout(&worker(&dir, &["list", "--json"]))).unwrap();
    let subscriptions = list["plugins"][0]["hooks"].as_array().unwrap();
    let find = |hook: &str| {
        subscriptions
            .iter()
            .find(|s| s["hook"] == hook)
            .unwrap_or_else(|| panic!("{hook} in {list}"))
    };
    assert_eq!(
        find("task.scored"),
        &json!({"hook": "task.scored", "priority": 7, "mode": "audit", "off": false})
    );
    assert_eq!(find("task.received")["off"], true);
}

/// `list` and `hooks` only read: they do not create the state directory. `call` of a plugin
/// that keeps no state answers even when the state directory cannot be used; a plugin that
/// keeps state is refused with the reason, rather than run on fresh state.
#[test]
fn read_only_commands_leave_the_state_directory_alone() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    dir.add("fixture", "libfixture.so");
    let run = |state: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
            .arg("--plugins")
            .arg(dir.path())
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .env_remove("WORKER_LOG")
            .output()
            .unwrap()
    };
    let state = dir.shadow().join("never-made");
    for args in [
        &["list"][..],
        &["list", "--json"],
        &["hooks"],
        &["hooks", "--json"],
    ] {
        let output = run(&state, args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert!(!state.exists(), "{args:?} created {}", state.display());
    }

    let not_a_dir = dir.shadow().join("a-file");
    std::fs::write(&not_a_dir, "not a directory").unwrap();
    let output = run(&not_a_dir, &["call", "echo", "echo", r#"{"x": 1}"#]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), r#"{"x":1}"#);

    let output = run(&not_a_dir, &["call", "fixture", "total"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let err = stderr(&output);
    assert!(
        err.contains("plugin `fixture` keeps state") && err.contains("a-file"),
        "{err}"
    );
    assert!(stdout(&output).is_empty());
}

/// `worker run` draws a progress bar with the rate and the time left when stderr is a terminal
/// (a real pseudo-terminal, through `script`), and nothing of it otherwise.
#[test]
fn run_shows_a_progress_bar_with_rate_and_eta_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: needs `script` (util-linux) for a pseudo-terminal");
        return;
    }
    let dir = PluginDir::new();
    let tasks = dir.shadow().join("tasks.jsonl");
    let results = dir.shadow().join("results.jsonl");
    let example = worker(&dir, &["example-tasks", "--count", "300"]);
    std::fs::write(&tasks, &example.stdout).unwrap();
    let quote =
        |p: &std::path::Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let command = format!(
        "{} --plugins {} --state-dir {} run --tasks {} --out {}",
        quote(Path::new(env!("CARGO_BIN_EXE_worker-under-test"))),
        quote(&dir.path()),
        quote(&dir.shadow().join("state")),
        quote(&tasks),
        quote(&results),
    );
    let output = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env_remove("WORKER_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
    assert!(output.status.success(), "{shown}");
    assert!(shown.contains("100%"), "{shown}");
    assert!(shown.contains("eta "), "{shown}");
    assert!(shown.contains("B/s"), "{shown}");
    assert!(shown.contains("300 tasks done"), "{shown}");

    let plain = worker(
        &dir,
        &[
            "run",
            "--tasks",
            tasks.to_str().unwrap(),
            "--out",
            results.to_str().unwrap(),
        ],
    );
    assert!(plain.status.success());
    assert!(!stderr(&plain).contains("eta "), "{}", stderr(&plain));
}
