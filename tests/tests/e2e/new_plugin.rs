//! `worker new`: the crate it writes builds offline and loads in the real worker.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{PluginDir, eventually};

#[test]
fn worker_new_writes_a_crate_that_builds_and_loads() {
    // Inside this repository (the workspace's target dir): plugin-api by path.
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target_dir = tmp.parent().unwrap();
    let crate_dir = tmp.join(format!("new-plugin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&crate_dir);
    let scratch = PluginDir::new();
    let new = |args: &[&str]| crate::worker(&scratch, args, &[]);

    let output = new(&["new", "e2e-greeter", "--path", crate_dir.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"crate-type = ["cdylib", "rlib"]"#),
        "{manifest}"
    );
    assert!(manifest.contains("plugin-api = { path = "), "{manifest}");
    let lib = std::fs::read_to_string(crate_dir.join("src/lib.rs")).unwrap();
    for part in [
        "methods.method(",
        "hooks.on(",
        "fn save_state",
        "Harness::<",
    ] {
        assert!(lib.contains(part), "{part} missing in\n{lib}");
    }
    // A second time into the same directory, or a name that is no crate name: refused.
    let again = new(&["new", "e2e-greeter", "--path", crate_dir.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let bad = new(&[
        "new",
        "Bad Name",
        "--path",
        tmp.join("bad").to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(1));

    // Built offline with the workspace's target dir, so what is built already is reused.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo)
        .args(["build", "--offline", "--quiet"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = None;
    let finished = eventually(Duration::from_secs(900), || {
        status = build.try_wait().unwrap();
        status.is_some()
    });
    if !finished {
        let _ = build.kill();
        panic!("cargo build of the new crate did not finish in 15 minutes");
    }
    assert!(
        status.unwrap().success(),
        "cargo build of the new crate failed"
    );

    let plugins = PluginDir::new();
    plugins.add_file(
        &target_dir.join("debug/libe2e_greeter.so"),
        "libe2e_greeter.so",
    );
    let call = |method: &str, params: &str| {
        let output = crate::worker(&plugins, &["call", "e2e-greeter", method, params], &[]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(
        call("hello", r#"{"name": "Ada"}"#),
        r#"{"number":1,"text":"Hello, Ada!"}"#
    );
    // Its state is kept between commands.
    assert_eq!(
        call("hello", r#"{"name": "Bob"}"#),
        r#"{"number":2,"text":"Hello, Bob!"}"#
    );
    let hooks = crate::worker(&plugins, &["hooks"], &[]);
    assert!(String::from_utf8_lossy(&hooks.stdout).contains("e2e-greeter (plugin) audit"));
    let _ = std::fs::remove_dir_all(&crate_dir);
}
