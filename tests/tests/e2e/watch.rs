//! The watcher with real files: drop in, remove, replace, write slowly, break, reconfigure.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use plugin_host::watch::{WatchOptions, Watcher};
use serde_json::json;
use tests::{PluginDir, built_plugin, drop_in, eventually, fixture_build};

const PATIENCE: Duration = Duration::from_secs(20);

fn watched(dir: &PluginDir) -> (plugin_host::PluginHost, Watcher) {
    let host = dir.host();
    host.scan().unwrap();
    let watcher = Watcher::start(host.clone(), WatchOptions::default()).unwrap();
    (host, watcher)
}

#[test]
fn dropped_in_file_loads_and_removed_file_unloads() {
    let dir = PluginDir::new();
    let (host, _watcher) = watched(&dir);
    let file = drop_in(&built_plugin("echo"), &dir.path(), "libecho.so");
    assert!(eventually(PATIENCE, || host
        .execute("echo", "echo", &json!(1))
        .is_some()));
    std::fs::remove_file(&file).unwrap();
    assert!(eventually(PATIENCE, || host.plugin("echo").is_none()));
    assert!(eventually(PATIENCE, || dir.shadow_files().is_empty()));
}

#[test]
fn replaced_file_reloads_with_state_and_the_new_version_serves() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let (host, _watcher) = watched(&dir);
    let first = host.plugin("fixture").unwrap();
    host.execute("fixture", "add", &json!({"n": 5}));
    drop_in(&built_plugin("fixture"), &dir.path(), "libfixture.so");
    assert!(eventually(PATIENCE, || host
        .plugin("fixture")
        .unwrap()
        .generation
        > first.generation));
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(5)),
        "state was lost"
    );
    // A different build: the older-table fixture answers `table` with 1.
    drop_in(&fixture_build("table-v1"), &dir.path(), "libfixture.so");
    assert!(eventually(PATIENCE, || host.execute(
        "fixture",
        "table",
        &json!(null)
    ) == Some(json!(1))));
}

#[test]
fn slow_in_place_writer_is_loaded_only_once_complete() {
    let dir = PluginDir::new();
    let (host, _watcher) = watched(&dir);
    let whole = std::fs::read(built_plugin("echo")).unwrap();
    let path = dir.path().join("libslow.so");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunks = 40;
    let chunk = whole.len().div_ceil(chunks);
    for (i, part) in whole.chunks(chunk).enumerate() {
        file.write_all(part).unwrap();
        file.flush().unwrap();
        // A long pause halfway: the file is stable but incomplete for several settle periods.
        let pause = if i == chunks / 2 { 400 } else { 30 };
        std::thread::sleep(Duration::from_millis(pause));
        assert!(
            host.plugin("echo").is_none(),
            "loaded while only {} of {} chunks were written",
            i + 1,
            chunks
        );
        assert!(
            host.refused().is_empty(),
            "a half-written file was tried: {:?}",
            host.refused()
        );
    }
    drop(file);
    assert!(eventually(PATIENCE, || host
        .execute("echo", "echo", &json!("whole"))
        .is_some()));
}

#[test]
fn broken_replacement_keeps_the_old_version_until_a_fixed_one_arrives() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let (host, _watcher) = watched(&dir);
    let generation = host.plugin("fixture").unwrap().generation;
    host.execute("fixture", "add", &json!({"n": 3}));
    let broken = dir.path().join("broken.bin");
    std::fs::write(&broken, b"\x7fELF not really").unwrap();
    drop_in(&broken, &dir.path(), "libfixture.so");
    assert!(eventually(PATIENCE, || !host.refused().is_empty()));
    assert!(
        host.refused()[0].reason().contains("keeps serving"),
        "{:?}",
        host.refused()
    );
    assert_eq!(host.plugin("fixture").unwrap().generation, generation);
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(3))
    );
    drop_in(&built_plugin("fixture"), &dir.path(), "libfixture.so");
    assert!(eventually(PATIENCE, || host.refused().is_empty()));
    assert!(host.plugin("fixture").unwrap().generation > generation);
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(3))
    );
}

#[test]
fn configuration_changes_apply() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {"label": "one"}}}));
    dir.add("fixture", "libfixture.so");
    dir.add("echo", "libecho.so");
    let (host, _watcher) = watched(&dir);
    assert_eq!(
        host.execute("fixture", "label", &json!(null)),
        Some(json!("one"))
    );
    host.execute("fixture", "add", &json!({"n": 4}));
    dir.configure(&json!({"fixture": {"config": {"label": "two"}}, "echo": {"enabled": false}}));
    assert!(eventually(PATIENCE, || host.execute(
        "fixture",
        "label",
        &json!(null)
    ) == Some(json!("two"))));
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(4)),
        "state lost on reconfigure"
    );
    assert!(eventually(PATIENCE, || host.plugin("echo").is_none()));
    // Invalid configuration: the one in force stays.
    std::fs::write(dir.path().join("plugins.json"), "{ oops").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        host.execute("fixture", "label", &json!(null)),
        Some(json!("two"))
    );
    dir.configure(&json!({"fixture": {"config": {"label": "two"}}}));
    assert!(
        eventually(PATIENCE, || host.plugin("echo").is_some()),
        "re-enabled plugin did not load"
    );
}

#[test]
fn callers_never_see_a_gap_while_files_are_swapped() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let (host, _watcher) = watched(&dir);
    let builds = [built_plugin("fixture"), fixture_build("table-v1")];
    let stop = AtomicBool::new(false);
    let answers = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let answer = host.execute("fixture", "table", &json!(null));
                    assert!(
                        answer == Some(json!(1))
                            || answer == Some(json!(plugin_api::TABLE_VERSION)),
                        "an answer from neither version: {answer:?}"
                    );
                    answers.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for i in 0..12 {
            let build = &builds[(i + 1) % 2];
            let expected = json!(if i % 2 == 0 {
                1
            } else {
                plugin_api::TABLE_VERSION
            });
            drop_in(build, &dir.path(), "libfixture.so");
            assert!(eventually(PATIENCE, || host.execute(
                "fixture",
                "table",
                &json!(null)
            ) == Some(expected.clone())));
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(answers.load(Ordering::Relaxed) > 100);
    let stats = host.plugin("fixture").unwrap().stats;
    assert_eq!(stats.errors + stats.panics, 0);
}
