//! Load, unload and reload at run time, with calls in flight.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tests::{PluginDir, eventually, is_mapped, is_sleeping, thread_id};

#[test]
fn unload_unmaps_the_library_and_deletes_its_shadow_copy() {
    let dir = PluginDir::new();
    let file = dir.add("fixture", "libfixture.so");
    let host = dir.host();
    let shadow = host.load(&file).unwrap().shadow_file;
    assert!(is_mapped(&shadow), "a loaded plugin is mapped");
    assert!(shadow.starts_with(dir.shadow()));
    host.unload("fixture").unwrap();
    assert!(
        !is_mapped(&shadow),
        "{} is still mapped after unload",
        shadow.display()
    );
    assert!(!shadow.exists(), "the shadow copy was not deleted");
    assert_eq!(host.execute("fixture", "total", &json!(null)), None);
    assert!(
        host.unload("fixture").is_err(),
        "unloading twice is an error"
    );
}

#[test]
fn unload_waits_for_the_call_in_flight() {
    let dir = PluginDir::new();
    let file = dir.add("fixture", "libfixture.so");
    let host = dir.host();
    let shadow = host.load(&file).unwrap().shadow_file;
    std::thread::scope(|s| {
        let (tid, caller) = std::sync::mpsc::channel();
        let host = &host;
        let slow = s.spawn(move || {
            tid.send(thread_id()).unwrap();
            host.execute("fixture", "sleep", &json!({"ms": 400}))
        });
        let caller = caller.recv().unwrap();
        assert!(
            eventually(Duration::from_secs(20), || is_sleeping(
                std::process::id(),
                caller
            )),
            "the call never reached the plugin"
        );
        host.unload("fixture").unwrap();
        assert!(
            is_mapped(&shadow),
            "unmapped while a call was still running in it"
        );
        assert_eq!(slow.join().unwrap(), Some(json!("done")));
    });
    assert!(!is_mapped(&shadow));
    assert!(!shadow.exists());
}

#[test]
fn reload_carries_state_and_retires_the_old_generation() {
    let dir = PluginDir::new();
    let file = dir.add("fixture", "libfixture.so");
    let host = dir.host();
    let first = host.load(&file).unwrap();
    assert_eq!(
        host.execute("fixture", "add", &json!({"n": 5})),
        Some(json!(5))
    );
    let calls_before = host.plugin("fixture").unwrap().stats.calls;
    assert!(calls_before >= 1);
    let second = host.reload("fixture").unwrap();
    assert!(second.generation > first.generation);
    assert_ne!(second.shadow_file, first.shadow_file);
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(5))
    );
    assert!(!is_mapped(&first.shadow_file));
    assert!(!first.shadow_file.exists());
    assert!(
        second.stats.calls >= calls_before,
        "statistics were reset by the reload"
    );
}

#[test]
fn failed_reload_keeps_the_old_generation_serving() {
    let dir = PluginDir::new();
    let file = dir.add("fixture", "libfixture.so");
    let host = dir.host();
    let first = host.load(&file).unwrap();
    host.execute("fixture", "add", &json!({"n": 2}));
    std::fs::write(&file, b"a broken build").unwrap();
    let message = format!("{:#}", host.reload("fixture").unwrap_err());
    assert!(
        message.contains("keeps serving") && message.contains("libfixture.so"),
        "{message}"
    );
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(2))
    );
    assert_eq!(host.plugin("fixture").unwrap().generation, first.generation);
    assert_eq!(host.refused().len(), 1);
    // A fixed file loads, and the refusal is gone.
    dir.add("fixture", "libfixture.so");
    host.reload("fixture").unwrap();
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(2))
    );
    assert!(host.refused().is_empty());
}

#[test]
fn reload_refuses_a_file_that_now_provides_another_plugin() {
    let dir = PluginDir::new();
    let file = dir.add("fixture", "libthing.so");
    let host = dir.host();
    host.load(&file).unwrap();
    dir.add("echo", "libthing.so");
    let message = format!("{:#}", host.reload("fixture").unwrap_err());
    assert!(message.contains("now provides plugin `echo`"), "{message}");
    assert!(host.execute("fixture", "table", &json!(null)).is_some());
}

#[test]
fn reload_and_unload_while_threads_call() {
    let dir = PluginDir::new();
    let file = dir.add("echo", "libecho.so");
    let host = dir.host();
    host.load(&file).unwrap();
    let stop = AtomicBool::new(false);
    let answered = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let unloading = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..3 {
            let (host, stop, answered, skipped, unloading) =
                (&host, &stop, &answered, &skipped, &unloading);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let params = json!({"t": t, "i": i});
                    match host.execute("echo", "echo", &params) {
                        Some(answer) => {
                            assert_eq!(answer, params, "a wrong answer");
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {
                            assert!(
                                unloading.load(Ordering::Relaxed),
                                "no answer during a reload"
                            );
                            skipped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            });
        }
        for _ in 0..30 {
            host.reload("echo").unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        unloading.store(true, Ordering::Relaxed);
        for _ in 0..20 {
            host.unload("echo").unwrap();
            std::thread::sleep(Duration::from_millis(1));
            host.load(&file).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(answered.load(Ordering::Relaxed) > 0);
    let stats = host.plugin("echo").unwrap().stats;
    assert_eq!(stats.errors + stats.panics, 0);
    drop(host);
    assert!(
        dir.shadow_files().is_empty(),
        "left behind: {:?}",
        dir.shadow_files()
    );
}

#[test]
fn dropping_the_host_unloads_everything() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    dir.add("fixture", "libfixture.so");
    let host = dir.host();
    host.scan().unwrap();
    let shadows: Vec<_> = host.plugins().into_iter().map(|p| p.shadow_file).collect();
    assert_eq!(shadows.len(), 2);
    let clone = host.clone();
    drop(host);
    assert!(
        clone.execute("echo", "echo", &json!(1)).is_some(),
        "clones share one host"
    );
    drop(clone);
    for shadow in shadows {
        assert!(
            !is_mapped(&shadow) && !shadow.exists(),
            "{} left behind",
            shadow.display()
        );
    }
}

#[test]
fn default_shadow_directory_is_private_and_removed() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let host = plugin_host::PluginHost::builder(dir.path())
        .build()
        .unwrap();
    host.scan().unwrap();
    let shadow_dir = host.shadow_dir().to_path_buf();
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&shadow_dir).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o700,
        "the shadow directory is readable by others"
    );
    drop(host);
    assert!(
        !shadow_dir.exists(),
        "{} was not removed",
        shadow_dir.display()
    );
}

#[test]
fn thread_locals_keep_a_library_mapped_unless_mitigated() {
    use std::sync::mpsc;
    for (source, mitigated) in [
        (tests::built_plugin("fixture"), false),
        (tests::fixture_build("unload-mitigation"), true),
    ] {
        let dir = PluginDir::new();
        let file = dir.add_file(&source, "libfixture.so");
        let host = dir.host();
        let shadow = host.load(&file).unwrap().shadow_file;
        let (touched, wait_touched) = mpsc::channel();
        let (finish, wait_finish) = mpsc::channel::<()>();
        let caller = {
            let host = host.clone();
            std::thread::spawn(move || {
                assert_eq!(host.execute("fixture", "tls", &json!(null)), Some(json!(1)));
                touched.send(()).unwrap();
                let _ = wait_finish.recv();
            })
        };
        wait_touched.recv().unwrap();
        host.unload("fixture").unwrap();
        assert!(!shadow.exists(), "the shadow file is deleted either way");
        assert_eq!(
            is_mapped(&shadow),
            !mitigated,
            "mitigated: {mitigated}: while the calling thread lives, the library is {}",
            if is_mapped(&shadow) {
                "still mapped"
            } else {
                "unmapped"
            }
        );
        finish.send(()).unwrap();
        caller.join().unwrap();
        // glibc runs the destructors when the thread exits but unmaps the library only at the
        // next dlclose of any library, when it collects unused ones again.
        assert_eq!(is_mapped(&shadow), !mitigated, "after the thread exited");
        let other = dir.add("echo", "libecho.so");
        host.load(&other).unwrap();
        host.unload("echo").unwrap();
        assert!(
            !is_mapped(&shadow),
            "still mapped after the thread exited and another dlclose"
        );
    }
}

#[test]
fn shadow_copies_of_a_killed_process_are_removed_by_the_next_host() {
    // A process that is gone: its pid no longer runs.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let stale = std::env::temp_dir().join(format!("plugin-host-{pid}-0stale0dir00"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(stale.join(format!("libecho.{pid}.1.so")), b"left behind").unwrap();
    // Left a while ago (without a lock file, a younger one may be a host being made).
    std::fs::File::open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120))
        .unwrap();
    let dir = PluginDir::new();
    let host = plugin_host::PluginHost::builder(dir.path())
        .build()
        .unwrap();
    assert!(!stale.exists(), "{} was not cleaned up", stale.display());
    // A live process's directory (this one's) is left alone.
    assert!(host.shadow_dir().exists());
}
