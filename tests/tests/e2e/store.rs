//! The shared store plugins reach through `plugin_api::store`: two hosts (as two workers would
//! be) on one SQLite file or one real Redis, with the fixture plugin built as a cdylib.

use std::time::Duration;

use plugin_host::store::{Store, StoreOptions};
use serde_json::{Value, json};
use tests::{PluginDir, RedisServer, eventually, fixture_build};

fn options() -> StoreOptions {
    StoreOptions {
        flush_interval: Duration::from_millis(50),
        timeout: Duration::from_secs(5),
    }
}

/// A host with the fixture plugin, offered `store`.
fn host_with(dir: &PluginDir, store: &Store) -> plugin_host::PluginHost {
    dir.add("fixture", "libfixture.so");
    let host = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_store(store.clone())
        .build()
        .unwrap();
    host.scan().unwrap();
    host
}

/// The URL of an SQLite store in `dir`.
fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("store.db").display())
}

/// A host with the fixture plugin on a new SQLite store with `options`, and the directories
/// they live in (kept for the test's length; bound in this order, the host is dropped first).
fn on_sqlite(
    options: StoreOptions,
) -> (tempfile::TempDir, PluginDir, Store, plugin_host::PluginHost) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&sqlite_url(dir.path()), options).unwrap();
    let plugins = PluginDir::new();
    let host = host_with(&plugins, &store);
    (dir, plugins, store, host)
}

/// A store that flushes only when asked (`Store::flush`): a flush in between would make the
/// host forget what these tests look at.
fn quiet() -> StoreOptions {
    StoreOptions {
        flush_interval: Duration::from_secs(3600),
        ..options()
    }
}

/// The fixture's addition of 1 to field `n` of `key` through `method` (`storeAdd`, by name, or
/// `storeAddKey`, through a key handle), under `mark` if any: whether it was new.
fn add_one(
    host: &plugin_host::PluginHost,
    method: &str,
    key: &str,
    mark: Option<&str>,
) -> Option<Value> {
    host.execute(
        "fixture",
        method,
        &json!({"key": key, "field": "n", "delta": 1.0, "mark": mark}),
    )
}

fn n_of(host: &plugin_host::PluginHost, key: &str) -> Option<f64> {
    host.execute("fixture", "storeRead", &json!({"key": key}))
        .and_then(|v| v.get("n").and_then(Value::as_f64))
}

fn two_hosts_share(url: &str) {
    let (dir_a, dir_b) = (PluginDir::new(), PluginDir::new());
    let (store_a, store_b) = (
        Store::open(url, options()).unwrap(),
        Store::open(url, options()).unwrap(),
    );
    let (a, b) = (host_with(&dir_a, &store_a), host_with(&dir_b, &store_b));
    let add = |host: &plugin_host::PluginHost, delta: f64, mark: Option<&str>| {
        host.execute(
            "fixture",
            "storeAdd",
            &json!({"key": "arm", "field": "n", "delta": delta, "mark": mark}),
        )
    };
    // Applied locally at once, before any flush.
    assert_eq!(add(&a, 3.0, Some("task-1")), Some(json!(true)));
    assert_eq!(n_of(&a, "arm"), Some(3.0));
    // The same mark again in this process: not counted.
    assert_eq!(add(&a, 3.0, Some("task-1")), Some(json!(false)));
    assert_eq!(n_of(&a, "arm"), Some(3.0));
    store_a.flush().unwrap();
    // Another worker scores the same task (a replay) and a new one.
    assert_eq!(add(&b, 3.0, Some("task-1")), Some(json!(true)));
    assert_eq!(add(&b, 2.0, Some("task-2")), Some(json!(true)));
    assert_eq!(add(&b, 0.5, None), Some(json!(true)));
    store_b.flush().unwrap();
    for host in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(30), || n_of(host, "arm") == Some(5.5)),
            "both workers see 3 + 2 + 0.5 (task-1 once): {:?}",
            n_of(host, "arm")
        );
    }
    // Flushed marks are the store's to decide: task-1 again, after the flush, adds nothing.
    add(&a, 3.0, Some("task-1"));
    store_a.flush().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || n_of(&a, "arm") == Some(5.5)),
        "task-1 replayed after a flush is not counted: {:?}",
        n_of(&a, "arm")
    );
    // Keys are in the plugin's namespace.
    let keys = store_a.scan("fixture", "").unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].0, "arm");
    assert!(store_a.scan("other", "").unwrap().is_empty());
    // Exactly one compare-and-set from version 0 wins; the loser then sees the winner's record.
    let cas = |host: &plugin_host::PluginHost, who: &str| {
        host.execute(
            "fixture",
            "storeCas",
            &json!({"key": "decision", "version": 0, "value": {"by": who}}),
        )
    };
    assert_eq!(cas(&a, "a"), Some(json!(true)));
    assert_eq!(cas(&b, "b"), Some(json!(false)));
    assert_eq!(
        b.execute("fixture", "storeRecord", &json!({"key": "decision"})),
        Some(json!({"version": 1, "value": {"by": "a"}}))
    );
    let status = store_b.status();
    assert_eq!(status.pending, 0, "{status:?}");
    assert!(status.last_flush_ms.is_some(), "{status:?}");
}

#[test]
fn two_workers_share_a_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    two_hosts_share(&url);
}

/// The plugin keeps a mark until the store has taken its batch, whatever else changes the
/// host's cache meanwhile (here a first read of another key): a task scored again before the
/// flush adds nothing, here or in the store.
#[test]
fn a_mark_pending_across_a_change_of_the_cache_counts_once() {
    let (_dir, _plugins, store, host) = on_sqlite(quiet());
    let add = |mark: &str| add_one(&host, "storeAdd", "arm", Some(mark));
    assert_eq!(n_of(&host, "arm"), None);
    assert_eq!(add("task-9"), Some(json!(true)));
    assert_eq!(n_of(&host, "arm"), Some(1.0));
    // A first read of another key changes the cache's generation.
    assert_eq!(n_of(&host, "other"), None);
    assert_eq!(n_of(&host, "arm"), Some(1.0));
    assert_eq!(
        add("task-9"),
        Some(json!(false)),
        "the plugin still has the mark"
    );
    assert_eq!(n_of(&host, "arm"), Some(1.0), "task-9 counted once here");
    store.flush().unwrap();
    assert_eq!(n_of(&host, "arm"), Some(1.0), "and once in the store");
}

/// A reloaded plugin starts with no marks of its own while its predecessor's may not be flushed
/// yet: the host carries those over until they are, so a task scored again by the new instance
/// counts once, in its reads and in the store; after the flush the store decides.
#[test]
fn a_reloaded_plugin_cannot_count_a_pending_mark_twice() {
    let (_dir, _plugins, store, host) = on_sqlite(quiet());
    let add = |mark: &str| add_one(&host, "storeAdd", "arm", Some(mark));
    assert_eq!(add("task-7"), Some(json!(true)));
    assert_eq!(n_of(&host, "arm"), Some(1.0));
    host.reload("fixture").unwrap();
    add("task-7");
    assert_eq!(n_of(&host, "arm"), Some(1.0), "task-7 counted once here");
    store.flush().unwrap();
    assert_eq!(n_of(&host, "arm"), Some(1.0), "and once in the store");
    // Flushed: the store refuses the repeat, and a new mark counts.
    add("task-7");
    assert_eq!(add("task-8"), Some(json!(true)));
    store.flush().unwrap();
    assert_eq!(n_of(&host, "arm"), Some(2.0));
}

/// A `plugin_api::store::Key` keeps the host's number of its name: additions through it count
/// as additions by name do, marks included, and a reloaded plugin's new `Key` of the same name
/// adds to the same key; a key that is not a name adds nothing.
#[test]
fn additions_through_a_key_handle_count_as_by_name_across_a_reload() {
    let (dir, _plugins, store, host) = on_sqlite(quiet());
    let url = sqlite_url(dir.path());
    let add = |method: &str, key: &str, mark: Option<&str>| add_one(&host, method, key, mark);
    assert_eq!(add("storeAddKey", "arm", None), Some(json!(true)));
    assert_eq!(add("storeAddKey", "arm", Some("task-1")), Some(json!(true)));
    assert_eq!(
        add("storeAddKey", "arm", Some("task-1")),
        Some(json!(false)),
        "a mark counts once through a key too"
    );
    assert_eq!(add("storeAdd", "arm", Some("task-1")), Some(json!(false)));
    assert_eq!(add("storeAdd", "arm", None), Some(json!(true)));
    assert_eq!(n_of(&host, "arm"), Some(3.0));
    host.reload("fixture").unwrap();
    // The new instance has no marks of its own yet: the host drops this one (still pending).
    add("storeAddKey", "arm", Some("task-1"));
    assert_eq!(add("storeAddKey", "arm", Some("task-2")), Some(json!(true)));
    assert_eq!(
        n_of(&host, "arm"),
        Some(4.0),
        "task-1 still counted once, task-2 added"
    );
    assert_eq!(add("storeAddKey", "bad\tkey", None), None);
    assert_eq!(add("storeAddKey", "", Some("task-3")), None);
    store.flush().unwrap();
    assert_eq!(n_of(&host, "arm"), Some(4.0), "and the same in the store");
    let fresh = Store::open(&url, quiet()).unwrap();
    let other = PluginDir::new();
    let reader = host_with(&other, &fresh);
    assert_eq!(
        n_of(&reader, "arm"),
        Some(4.0),
        "as another worker reads it"
    );
}

/// What the store itself holds of the fixture's key `key`, field `n` (read from the backend
/// now, not through a plugin, whose read would hand its additions over first).
fn stored_n(store: &Store, key: &str) -> Option<f64> {
    store
        .scan("fixture", key)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, fields)| fields.get("n").copied())
}

/// A plugin keeps the additions of its calls until they reach 16 kB or the host asks for
/// them: the host asks when it flushes on request, and the plugin hands them over when its
/// state is saved for a reload and when it is unloaded. Nothing is lost or counted twice.
#[test]
fn a_plugin_holds_its_additions_until_asked_and_loses_none() {
    let (_dir, _plugins, store, host) = on_sqlite(quiet());
    let add = |mark: &str| add_one(&host, "storeAdd", "arm", Some(mark));
    let pending = || store.status().pending;
    // The plugin's first addition is handed over at once: the call that made it began
    // before the plugin batched, and only calls begun since are counted.
    assert_eq!(add("task-0"), Some(json!(true)));
    assert_eq!(pending(), 1);
    store.flush().unwrap();
    assert_eq!(store.status().holding, Vec::<String>::new());
    assert_eq!(add("task-1"), Some(json!(true)));
    assert_eq!(pending(), 0, "held in the plugin, not handed over");
    // The status names the plugin holding what `pending` does not count.
    assert_eq!(store.status().holding, ["fixture"]);
    store.flush().unwrap();
    assert_eq!(stored_n(&store, "arm"), Some(2.0), "asked for by the flush");
    assert_eq!(store.status().holding, Vec::<String>::new(), "handed over");
    // Each entry takes about 33 bytes: a batch reaches 16 kB after about 500 of them.
    for n in 2..=1001 {
        assert_eq!(add(&format!("task-{n}")), Some(json!(true)));
    }
    let handed = pending();
    assert!(
        handed > 0 && handed < 1000,
        "handed over at 16 kB, the rest held: {handed} of 1000"
    );
    store.flush().unwrap();
    assert_eq!(stored_n(&store, "arm"), Some(1002.0));
    assert_eq!(pending(), 0);
    // A reload's old instance hands over what it holds (when its state is saved, and again
    // when it is destroyed, which here follows at once).
    assert_eq!(add("task-1002"), Some(json!(true)));
    assert_eq!(pending(), 0);
    host.reload("fixture").unwrap();
    assert_eq!(pending(), 1, "handed over by the instance reloaded");
    // An unloaded one when it is destroyed. (The new instance is a new copy of the library:
    // its first addition is handed over at once again.)
    assert_eq!(add("task-1003"), Some(json!(true)));
    assert_eq!(pending(), 2);
    assert_eq!(add("task-1004"), Some(json!(true)));
    assert_eq!(pending(), 2);
    host.unload("fixture").unwrap();
    assert_eq!(pending(), 3, "handed over by the instance unloaded");
    store.flush().unwrap();
    assert_eq!(stored_n(&store, "arm"), Some(1005.0));
}

/// An embedder that closes the store while its plugins are still loaded: the last flush has
/// what they held.
#[test]
fn closing_the_store_takes_what_loaded_plugins_hold() {
    let (dir, _plugins, store, host) = on_sqlite(quiet());
    let url = sqlite_url(dir.path());
    // The first is handed over at once (see above), the second held.
    for mark in ["task-1", "task-2"] {
        assert_eq!(
            add_one(&host, "storeAdd", "arm", Some(mark)),
            Some(json!(true))
        );
    }
    assert_eq!(store.status().pending, 1, "one held in the plugin");
    store.close();
    let fresh = Store::open(&url, quiet()).unwrap();
    assert_eq!(stored_n(&fresh, "arm"), Some(2.0));
    drop(host);
}

/// A plugin that adds and is then never called again: the flush thread asks for what it holds
/// after a round, and the next round takes it to the store.
#[test]
fn an_idle_plugin_s_additions_reach_the_store_without_a_flush_asked() {
    let (_dir, _plugins, store, host) = on_sqlite(options());
    // The plugin's first addition is handed over at once (see the test above); the second is
    // held.
    for (n, mark) in [(1.0, "task-1"), (2.0, "task-2")] {
        assert_eq!(
            add_one(&host, "storeAdd", "arm", Some(mark)),
            Some(json!(true))
        );
        assert!(
            eventually(Duration::from_secs(30), || stored_n(&store, "arm")
                == Some(n)),
            "the addition reaches the store: {:?}",
            stored_n(&store, "arm")
        );
    }
}

#[test]
fn two_workers_share_a_redis_store() {
    let redis = RedisServer::start();
    two_hosts_share(&redis.url());
}

#[test]
fn additions_made_while_redis_is_down_are_flushed_once_when_it_is_back() {
    let mut redis = RedisServer::start();
    let dir = PluginDir::new();
    let store = Store::open(&redis.url(), options()).unwrap();
    let host = host_with(&dir, &store);
    let add = |mark: &str| add_one(&host, "storeAdd", "arm", Some(mark));
    add("t1");
    store.flush().unwrap();
    redis.stop();
    for mark in ["t2", "t3", "t4"] {
        // The plugin goes on learning locally.
        assert_eq!(add(mark), Some(json!(true)));
    }
    assert_eq!(n_of(&host, "arm"), Some(4.0));
    assert!(store.flush().is_err());
    let status = store.status();
    assert!(
        !status.reachable && status.pending > 0 && status.errors > 0,
        "{status:?}"
    );
    // The failed flush keeps its batch to retry; what comes in meanwhile waits behind it,
    // and a task of the kept batch scored again still counts once.
    assert_eq!(add("t5"), Some(json!(true)));
    assert_eq!(add("t3"), Some(json!(false)));
    assert_eq!(n_of(&host, "arm"), Some(5.0));
    redis.start_again();
    assert!(
        eventually(Duration::from_secs(60), || store.status().pending == 0),
        "the pending additions reach Redis once it is back: {:?}",
        store.status()
    );
    // A second store (another worker) reads what is in Redis: each task once, the retried
    // batch's and the one after it. The host's count of pending additions can reach zero while
    // the plugin still holds its last addition (handed over when the host asks, after a
    // flush), so Redis is read until it has both or the wait runs out.
    let other = Store::open(&redis.url(), options()).unwrap();
    let n_in_redis = || {
        other
            .scan("fixture", "arm")
            .ok()
            .and_then(|rows| rows.first().and_then(|(_, f)| f.get("n").copied()))
    };
    assert!(
        eventually(Duration::from_secs(60), || n_in_redis() == Some(5.0)),
        "each task once in Redis: {:?}",
        other.scan("fixture", "arm")
    );
    // A task of the retried batch scored again after it reached Redis counts once, whether
    // this process or the store turns it away; a new one counts.
    add("t2");
    assert_eq!(add("t6"), Some(json!(true)));
    store.flush().unwrap();
    let rows = other.scan("fixture", "arm").unwrap();
    assert_eq!(rows[0].1.get("n"), Some(&6.0), "{rows:?}");
}

#[test]
fn an_older_plugin_loads_in_a_host_with_a_store_and_has_none() {
    let state = tempfile::tempdir().unwrap();
    let url = sqlite_url(state.path());
    let store = Store::open(&url, options()).unwrap();
    let dir = PluginDir::new();
    let file = dir.add_file(&fixture_build("table-v1"), "libfixture.so");
    let host = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_store(store.clone())
        .build()
        .unwrap();
    let plugin = host.load(&file).unwrap();
    assert_eq!(plugin.table_version, 1);
    // Built before the store: its wrappers say "no store", and nothing reaches the store.
    let added = host.call(
        "fixture",
        "storeAdd",
        &json!({"key": "arm", "field": "n", "delta": 1.0}),
    );
    assert!(matches!(added, Ok(None | Some(Value::Null))), "{added:?}");
    let read = host.call("fixture", "storeRead", &json!({"key": "arm"}));
    assert!(matches!(read, Ok(None | Some(Value::Null))), "{read:?}");
    store.flush().unwrap();
    assert!(store.scan("fixture", "").unwrap().is_empty());
}

/// A plugin built before additions could be held (table version 6) hands its additions over at
/// the end of every call in a host that would ask for them, as it did before: none waits in
/// it, and the host never asks it.
#[test]
fn a_plugin_of_table_version_6_hands_over_every_call() {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(&sqlite_url(state.path()), quiet()).unwrap();
    let dir = PluginDir::new();
    let file = dir.add_file(&fixture_build("table-v6"), "libfixture.so");
    let host = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_store(store.clone())
        .build()
        .unwrap();
    let plugin = host.load(&file).unwrap();
    assert_eq!(plugin.table_version, 6);
    for n in 1..=3 {
        assert_eq!(
            add_one(&host, "storeAdd", "arm", Some(&format!("task-{n}"))),
            Some(json!(true))
        );
        assert_eq!(
            store.status().pending,
            n,
            "handed over at the end of the call"
        );
    }
    store.flush().unwrap();
    assert_eq!(stored_n(&store, "arm"), Some(3.0));
}

fn worker_json(dir: &PluginDir, state: &std::path::Path, args: &[&str]) -> Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("WORKER_LOG")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn store_status_names_the_backend_and_says_when_it_cannot_be_reached() {
    let dir = PluginDir::new();
    let state = dir.shadow().join("state");
    // The default: SQLite in the state directory.
    let status = worker_json(&dir, &state, &["store", "status", "--json"]);
    assert_eq!(status["store"]["backend"], sqlite_url(&state));
    assert_eq!(status["store"]["reachable"], true, "{status}");
    assert_eq!(status["store"]["pending"], 0, "{status}");
    assert_eq!(status["store"]["holding"], json!([]), "{status}");
    assert!(state.join("store.db").is_file());
    // Owner-only, as the state files are; and never opened through a planted link.
    for file in ["store.db", "store.db-wal", "store.db-shm"] {
        if let Ok(meta) = std::fs::metadata(state.join(file)) {
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            assert_eq!(mode & 0o077, 0, "{file}: mode {mode:o}");
        }
    }
    let planted = dir.shadow().join("planted");
    std::fs::create_dir_all(&planted).unwrap();
    std::os::unix::fs::symlink(dir.shadow().join("elsewhere.db"), planted.join("store.db"))
        .unwrap();
    let output = crate::worker(
        &dir,
        &["--store", &sqlite_url(&planted), "store", "status"],
        &[],
    );
    assert!(!output.status.success(), "{output:?}");
    assert!(!dir.shadow().join("elsewhere.db").exists());
    // A Redis nobody listens on: not reachable, with the error; the command still prints the
    // status, and fails.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The command fails (a health check), and says why once.
    let url = format!("redis://127.0.0.1:{port}/0");
    let output = crate::worker(&dir, &["--store", &url, "store", "status", "--json"], &[]);
    assert!(!output.status.success(), "{output:?}");
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["store"]["backend"], url);
    assert_eq!(status["store"]["reachable"], false, "{status}");
    assert!(status["store"]["errors"].as_u64().unwrap() >= 1, "{status}");
    let error = status["store"]["lastError"].as_str().unwrap();
    assert!(error.starts_with("connecting to Redis: "), "{status}");
    assert_eq!(error.matches("refused").count(), 1, "{status}");
    assert!(status["store"]["lastErrorMs"].is_u64(), "{status}");
    assert_eq!(status["workers"], Value::Null, "{status}");
    assert_eq!(status["workersError"], error, "{status}");
    // `worker report` fails too, rather than print an empty table.
    dir.add("experiment", "libexperiment.so");
    let output = crate::worker(&dir, &["--store", &url, "report"], &[]);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("the store {url} cannot be reached")),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "{output:?}");
    // A server that hangs: the error says it did not answer in time.
    let redis = RedisServer::start();
    let paused = redis.pause();
    let output = crate::worker(&dir, &["--store", &redis.url(), "store", "status"], &[]);
    drop(paused);
    assert!(!output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("no answer within 5000 ms"), "{stdout}");
    // `"store": "none"` in the configuration: no store.
    dir.configure_file(&json!({"store": "none"}));
    let status = worker_json(&dir, &state, &["store", "status", "--json"]);
    assert_eq!(status, json!({"store": null}));
}

#[test]
fn the_control_api_shows_the_store() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let worker = crate::serve::Worker::start(&dir, &state, &["--store-flush-ms", "50"]);
    worker.http(
        "POST",
        "/v1/plugins/fixture/storeAdd",
        br#"{"key": "arm", "field": "n", "delta": 2}"#,
    );
    assert!(
        eventually(Duration::from_secs(30), || {
            let status = worker.http("GET", "/v1/store", b"").json();
            status["store"]["pending"] == 0 && status["store"]["lastFlushMs"].is_u64()
        }),
        "{}",
        worker.http("GET", "/v1/store", b"").body
    );
    let status = worker.http("GET", "/v1/store", b"").json();
    assert_eq!(status["store"]["backend"], sqlite_url(&state));
    assert_eq!(status["store"]["reachable"], true);
    // A second addition is held in the plugin (the first was handed over at once: the call
    // that made it began before the plugin batched) until the worker asks for it after its
    // next flush: no plugin is named once it handed it over (the next test sees it named).
    worker.http(
        "POST",
        "/v1/plugins/fixture/storeAdd",
        br#"{"key": "arm", "field": "n", "delta": 3}"#,
    );
    assert!(
        eventually(Duration::from_secs(30), || {
            let status = worker.http("GET", "/v1/store", b"").json();
            status["store"]["pending"] == 0 && status["store"]["holding"] == json!([])
        }),
        "{}",
        worker.http("GET", "/v1/store", b"").body
    );
    worker.stop();
    // What the plugin added is in the store file for the next process.
    let store = Store::open(&sqlite_url(&state), options()).unwrap();
    let rows = store.scan("fixture", "").unwrap();
    assert_eq!(rows[0].1.get("n"), Some(&5.0), "{rows:?}");
}

/// `worker store status`, from any process on the store, lists the workers running on it: each
/// publishes its status after its flushes and removes it as it stops. A status written by
/// something else is left out (and counted), an over-long one too, and nothing in one reaches
/// the terminal unescaped.
#[test]
fn store_status_lists_the_workers_on_the_store() {
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let extra = ["--store", url.as_str(), "--store-flush-ms", "50"];
    let workers: Vec<crate::serve::Worker> = ["a", "b"]
        .iter()
        .map(|name| crate::serve::Worker::start(&dir, &dir.shadow().join(name), &extra))
        .collect();
    let probe = dir.shadow().join("probe");
    let status = || {
        worker_json(
            &dir,
            &probe,
            &["--store", &url, "store", "status", "--json"],
        )
    };
    let listed = |status: &Value, pid: u32| {
        status["workers"].as_array().and_then(|list| {
            list.iter()
                .find(|w| {
                    w["worker"]
                        .as_str()
                        .is_some_and(|id| id.contains(&format!(":{pid}:")))
                })
                .cloned()
        })
    };
    assert!(
        eventually(Duration::from_secs(30), || {
            let status = status();
            workers.iter().all(|w| listed(&status, w.pid()).is_some())
        }),
        "{}",
        status()
    );
    let seen = status();
    for worker in &workers {
        let w = listed(&seen, worker.pid()).unwrap();
        assert_eq!(w["flushIntervalMs"], 50, "{w}");
        assert!(w["lastFlushMs"].is_u64(), "{w}");
        assert_eq!(w["pending"], 0, "{w}");
        assert_eq!(w["errors"], 0, "{w}");
        assert_eq!(w["holding"], json!([]), "{w}");
    }
    assert_eq!(seen["unreadableWorkers"], 0, "{seen}");
    // Statuses written by something else, each in the workers' index: not JSON, over-long,
    // not a string, an id that is not UTF-8; one expired; and one that is a worker's in
    // shape, with terminal escapes in its names.
    let index = |id: &[u8], expires: &[u8]| {
        redis.command(&[b"ZADD", b"store:workers", expires, id]);
    };
    redis.command(&[b"SET", b"store:w:junk", b"\x1b[31mnot json"]);
    index(b"junk", b"+inf");
    redis.command(&[b"SET", b"store:w:huge", &vec![b'x'; 70_000]]);
    index(b"huge", b"+inf");
    redis.command(&[b"HSET", b"store:w:hashy", b"a", b"b"]);
    index(b"hashy", b"+inf");
    index(b"bad\xff", b"+inf");
    let gone = json!({
        "worker": "gone:1:0", "startedMs": 1, "updatedMs": 1, "ttlMs": 1, "flushIntervalMs": 1,
        "lastFlushMs": null, "pending": 0, "holding": [], "errors": 0, "lastError": null,
    });
    redis.command(&[b"SET", b"store:w:gone:1:0", gone.to_string().as_bytes()]);
    index(b"gone:1:0", b"1");
    let forged_id = "evil\u{1b}[2J:1:0";
    let forged = json!({
        "worker": forged_id, "startedMs": 1, "updatedMs": 1, "ttlMs": 1, "flushIntervalMs": 1,
        "lastFlushMs": null, "pending": 0, "holding": ["x\u{1b}]0;title\u{7}"], "errors": 0,
        "lastError": "\u{1b}[2Jwiped",
    });
    let key = format!("store:w:{forged_id}");
    redis.command(&[b"SET", key.as_bytes(), forged.to_string().as_bytes()]);
    index(forged_id.as_bytes(), b"+inf");
    let seen = status();
    assert_eq!(seen["unreadableWorkers"], 4, "{seen}");
    assert_eq!(seen["workersLeftOut"], 0, "{seen}");
    assert_eq!(seen["workers"].as_array().map(Vec::len), Some(3), "{seen}");
    let output = crate::worker(&dir, &["--store", &url, "store", "status"], &[]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text}"
    );
    assert!(text.contains("wiped"), "{text}");
    assert!(
        text.contains("4 status(es) that are not a worker's"),
        "{text}"
    );
    // The forged status was last updated in 1970.
    assert!(text.contains("not updated for"), "{text}");
    for worker in &workers {
        assert!(text.contains(&format!(":{}:", worker.pid())), "{text}");
    }
    // A worker that stops removes its status; the other's stays.
    let mut workers = workers.into_iter();
    let first = workers.next().unwrap();
    let (pid, (exit, stderr)) = (first.pid(), first.stop());
    assert!(exit.success(), "{stderr}");
    let seen = status();
    assert!(listed(&seen, pid).is_none(), "{seen}");
    let second = workers.next().unwrap();
    assert!(listed(&seen, second.pid()).is_some(), "{seen}");
    second.stop();
}

/// `GET /v1/store` names a plugin that holds additions the worker has not asked for yet (with
/// a flush interval of ten minutes, the worker asks only as it stops), and they reach the
/// store as the worker stops.
#[test]
fn the_control_api_names_a_plugin_holding_additions() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let worker = crate::serve::Worker::start(&dir, &state, &["--store-flush-ms", "600000"]);
    for delta in [2, 3] {
        let body = format!(r#"{{"key": "arm", "field": "n", "delta": {delta}}}"#);
        worker.http("POST", "/v1/plugins/fixture/storeAdd", body.as_bytes());
    }
    let status = worker.http("GET", "/v1/store", b"").json();
    // The first addition is the worker's (handed over at once: the call that made it began
    // before the plugin batched), the second the plugin's.
    assert_eq!(status["store"]["holding"], json!(["fixture"]), "{status}");
    assert_eq!(status["store"]["pending"], 1, "{status}");
    worker.stop();
    let store = Store::open(&sqlite_url(&state), options()).unwrap();
    let rows = store.scan("fixture", "").unwrap();
    assert_eq!(rows[0].1.get("n"), Some(&5.0), "{rows:?}");
}

/// `worker call` of the fixture with `"isolation": "process"`, on the store at `url`.
fn isolated_call(dir: &PluginDir, url: &str, method: &str, params: &Value) -> Value {
    let state = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(state.path())
        .args(["--store", url, "--store-flush-ms", "20"])
        .args(["call", "fixture", method, &params.to_string(), "--strict"])
        .env_remove("WORKER_LOG")
        .env_remove("WORKER_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "fixture.{method}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// An isolated plugin (its own process) shares the host's store: its additions reach the store
/// through the host, once per mark, and its reads see the store's figures.
#[test]
fn an_isolated_plugin_shares_the_store() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    dir.configure(&json!({"fixture": {"isolation": "process"}}));
    let db = tempfile::tempdir().unwrap();
    let url = sqlite_url(db.path());
    let add = |delta: f64, mark: &str| {
        isolated_call(
            &dir,
            &url,
            "storeAdd",
            &json!({"key": "arm", "field": "n", "delta": delta, "mark": mark}),
        )
    };
    assert_eq!(add(2.0, "task-1"), json!(true));
    // Another worker process scores the same task (counted once) and a new one.
    add(2.0, "task-1");
    assert_eq!(add(3.0, "task-2"), json!(true));
    assert_eq!(
        isolated_call(&dir, &url, "storeRead", &json!({"key": "arm"})),
        json!({"n": 5.0})
    );
    let store = Store::open(&url, options()).unwrap();
    let keys = store.scan("fixture", "").unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].1.get("n"), Some(&5.0), "{keys:?}");
    // A decision too: the record is written through the host.
    assert_eq!(
        isolated_call(
            &dir,
            &url,
            "storeCas",
            &json!({"key": "decision", "version": 0, "value": {"by": "isolated"}})
        ),
        json!(true)
    );
    assert_eq!(
        store
            .read_record("fixture", "decision")
            .unwrap()
            .map(|r| r.version),
        Some(1)
    );
}

/// A store that answers one byte every half second never lets its socket's read timeout fire;
/// the worker still ends (its last flush is waited for at most 15 s), with the answer given.
#[test]
fn a_store_that_answers_a_byte_at_a_time_does_not_hold_the_exit() {
    use std::io::Write as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                loop {
                    if stream.write_all(b"+").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            });
        }
    });
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let url = format!("redis://127.0.0.1:{port}/0");
    // `bounded` kills the worker (and fails the test) after two minutes.
    let output = crate::worker(&dir, &["--store", &url, "call", "echo", "echo", "1"], &[]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1");
}

/// Workers started together on one new SQLite file all open it: the switch to WAL that the
/// first one makes is waited for, not reported as "database is locked".
#[test]
fn workers_started_together_on_a_new_sqlite_file_all_open_it() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let url = sqlite_url(dir.path());
        let start = std::sync::Arc::new(std::sync::Barrier::new(6));
        let opened: Vec<_> = (0..6)
            .map(|_| {
                let (url, start) = (url.clone(), std::sync::Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    Store::open(&url, options()).map(drop)
                })
            })
            .collect();
        for (k, opened) in opened.into_iter().enumerate() {
            if let Err(e) = opened.join().unwrap() {
                panic!("round {round}, opener {k}: {e:#}");
            }
        }
    }
}

/// A plugin keeps what it read between refreshes of the host's cache: its own additions show
/// in its next read at once (a field it had and a new one, with a mark or without), another
/// worker's once this worker's cache is refreshed, and its records follow a compare-and-set.
#[test]
fn a_plugin_sees_its_own_additions_at_once_and_the_fleets_after_a_refresh() {
    let db = tempfile::tempdir().unwrap();
    let url = sqlite_url(db.path());
    let (dir_a, dir_b) = (PluginDir::new(), PluginDir::new());
    // This worker refreshes only when told to.
    let hourly = quiet();
    let (store_a, store_b) = (
        Store::open(&url, hourly).unwrap(),
        Store::open(&url, options()).unwrap(),
    );
    let (a, b) = (host_with(&dir_a, &store_a), host_with(&dir_b, &store_b));
    let add = |host: &plugin_host::PluginHost, field: &str, delta: f64, mark: Option<&str>| {
        host.execute(
            "fixture",
            "storeAdd",
            &json!({"key": "arm", "field": field, "delta": delta, "mark": mark}),
        )
    };
    let read = |host: &plugin_host::PluginHost| {
        host.execute("fixture", "storeRead", &json!({"key": "arm"}))
    };
    assert_eq!(read(&a), Some(json!({})));
    for i in 1..=20 {
        assert_eq!(add(&a, "n", 1.0, None), Some(json!(true)));
        let mark = format!("task-{i}");
        assert_eq!(add(&a, "sum", 0.5, Some(&mark)), Some(json!(true)));
        // The same mark again: not counted, not in the read.
        assert_eq!(add(&a, "sum", 0.5, Some(&mark)), Some(json!(false)));
        let i = f64::from(i);
        assert_eq!(
            read(&a),
            Some(json!({"n": i, "sum": 0.5 * i})),
            "after {i} tasks"
        );
    }
    // Another worker's addition, in the store: not in this worker's reads before its refresh.
    assert_eq!(add(&b, "n", 100.0, None), Some(json!(true)));
    store_b.flush().unwrap();
    assert_eq!(read(&a), Some(json!({"n": 20.0, "sum": 10.0})));
    store_a.flush().unwrap();
    // An addition made before this worker reads again goes to a copy older than its cache
    // (an addition does not ask for the cache's generation): the read drops that copy and
    // shows the refresh and the addition, once each.
    assert_eq!(add(&a, "n", 1.0, None), Some(json!(true)));
    assert_eq!(read(&a), Some(json!({"n": 121.0, "sum": 10.0})));
    assert_eq!(read(&a), Some(json!({"n": 121.0, "sum": 10.0})));
    // A record read, then changed by this worker's compare-and-set: the next read shows it.
    let record = |host: &plugin_host::PluginHost| {
        host.execute("fixture", "storeRecord", &json!({"key": "decision"}))
    };
    assert_eq!(record(&a), None, "no record yet");
    assert_eq!(
        a.execute(
            "fixture",
            "storeCas",
            &json!({"key": "decision", "version": 0, "value": {"by": "a"}})
        ),
        Some(json!(true))
    );
    assert_eq!(
        record(&a),
        Some(json!({"version": 1, "value": {"by": "a"}}))
    );
}

/// What a store server says reaches the log with its control characters escaped: an error
/// with a newline in it cannot forge a log line.
#[test]
fn a_store_error_cannot_forge_a_log_line() {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {
                    // An error for each command a read may hold (commands are pipelined).
                    let forged = b"-ERR evil\n2026-01-01T00:00:00Z ERROR FORGED by the server\r\n";
                    if stream.write_all(&forged.repeat(8)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let url = format!("redis://127.0.0.1:{port}/0");
    // A read of a key not cached yet asks the server.
    let output = crate::worker(
        &dir,
        &[
            "--log",
            "warn",
            "--store",
            &url,
            "call",
            "fixture",
            "storeRead",
            r#"{"key": "arm"}"#,
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("FORGED"),
        "the server's error is logged: {stderr}"
    );
    assert!(
        stderr
            .lines()
            .all(|l| !l.contains("FORGED") || l.contains("evil\\n")),
        "{stderr}"
    );
}

/// A mark the host would refuse (a unit key of 600 bytes, from a task) costs only its own
/// addition: the additions handed over with it in the same batch (the assignment counted just
/// before it) still reach the store.
#[test]
fn an_overlong_mark_loses_no_other_addition() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let store = Store::open(&url, options()).unwrap();
    let plugins = PluginDir::new();
    plugins.configure(
        &json!({"experiment": {"config": {"experiments": {"e": {"variants": {"only": 1}}}}}}),
    );
    plugins.add("experiment", "libexperiment.so");
    let host = worker::hooks::host_builder(plugins.path())
        .with_shadow_dir(plugins.shadow())
        .with_store(store.clone())
        .build()
        .unwrap();
    host.scan().unwrap();
    for key in ["a-unit".to_owned(), "u".repeat(600)] {
        let variant = host.execute(
            "experiment",
            "pickVariant",
            &json!({"experiment": "e", "key": key}),
        );
        assert_eq!(variant, Some(json!("only")));
    }
    store.flush().unwrap();
    let stored = store.scan("experiment", "exp/e/").unwrap();
    let only = stored
        .iter()
        .find(|(key, _)| key.ends_with("exp/e/only"))
        .map(|(_, fields)| fields.clone())
        .unwrap_or_else(|| panic!("{stored:?}"));
    assert_eq!(only.get("assigned"), Some(&2.0), "{only:?}");
    assert_eq!(only.get("units"), Some(&1.0), "{only:?}");
}

/// A new `redis-server`, and a host of the plugins in `dir` on it (the host dropped first):
/// no flush within a test, and a timeout longer than [`while_paused`]'s two waits together
/// (30 s each), so that a read it pauses is still waiting when the other calls must have
/// returned.
fn host_on_redis(dir: &PluginDir) -> (RedisServer, plugin_host::PluginHost) {
    let redis = RedisServer::start();
    let store = Store::open(
        &redis.url(),
        StoreOptions {
            flush_interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(120),
        },
    )
    .unwrap();
    let host = worker::hooks::host_builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_store(store)
        .build()
        .unwrap();
    host.scan().unwrap();
    (redis, host)
}

/// Runs `waits` (a call that reads the store) on a thread with the server paused, until its
/// read reached the server, then `others` on another: asserts that `others` returned while
/// `waits` still waited for the store (`what` names it), lets the server go on, and answers
/// what both returned.
fn while_paused<A: Send + 'static, B: Send + 'static>(
    redis: &RedisServer,
    what: &str,
    waits: impl FnOnce() -> A + Send + 'static,
    others: impl FnOnce() -> B + Send + 'static,
) -> (A, B) {
    let paused = redis.pause();
    let waits = std::thread::spawn(waits);
    assert!(
        eventually(Duration::from_secs(30), || redis.has_unread_request()),
        "{what}: its read never reached the paused server"
    );
    let others = std::thread::spawn(others);
    let returned = eventually(Duration::from_secs(30), || others.is_finished());
    let still_waiting = !waits.is_finished();
    drop(paused);
    assert!(
        returned && still_waiting,
        "the other calls waited for {what} to read the store (they returned: {returned}, {what} still waiting: {still_waiting})"
    );
    (waits.join().unwrap(), others.join().unwrap())
}

/// A bandit's first choice in a context whose arms the store has not sent yet waits for the
/// store (once, bounded by its timeout). Meanwhile the plugin's other calls go on: it does not
/// hold the lock that every choice and every update take while it waits.
#[test]
fn a_choice_waiting_for_the_store_holds_up_no_other_call() {
    let dir = PluginDir::new();
    dir.add("bandit", "libbandit.so");
    let (redis, host) = host_on_redis(&dir);
    let choose = |host: &plugin_host::PluginHost, context: &str| {
        host.call(
            "bandit",
            "choose",
            &json!({"context": context, "arms": ["a", "b"]}),
        )
    };
    // A context whose arms the store has sent.
    assert!(choose(&host, "known").unwrap().is_some());
    let (chosen, updated) = while_paused(
        &redis,
        "a choice's first read",
        {
            let host = host.clone();
            move || choose(&host, "new")
        },
        {
            let host = host.clone();
            move || {
                host.call(
                    "bandit",
                    "update",
                    &json!({"context": "known", "arm": "a", "reward": 1.0}),
                )
            }
        },
    );
    updated.unwrap();
    assert!(chosen.unwrap().is_some());

    // The statistics of the fleet list the store's arms: while that listing waits, choices
    // and updates go on.
    let (stats, calls) = while_paused(
        &redis,
        "the bandit's statistics",
        {
            let host = host.clone();
            move || host.call("bandit", "stats", &json!({}))
        },
        {
            let host = host.clone();
            move || {
                choose(&host, "known")?;
                host.call(
                    "bandit",
                    "update",
                    &json!({"context": "known", "arm": "b", "reward": 0.5}),
                )
            }
        },
    );
    calls.unwrap();
    let stats = stats.unwrap().expect("the bandit's statistics");
    assert!(stats.to_string().contains("known"), "{stats}");
}

/// The experiment's fleet-wide statistics read the store, and a read of a key the store has not
/// sent yet waits for it. Meanwhile the experiment's picks and outcomes go on: the report does
/// not hold the lock that every task takes while it waits.
#[test]
fn an_experiment_report_waiting_for_the_store_holds_up_no_pick() {
    let plugins = PluginDir::new();
    plugins.configure(
        &json!({"experiment": {"config": {"experiments": {"e": {"variants": {"a": 1, "b": 1}}}}}}),
    );
    plugins.add("experiment", "libexperiment.so");
    let (redis, host) = host_on_redis(&plugins);
    let (report, calls) = while_paused(
        &redis,
        "the experiment's report",
        {
            let host = host.clone();
            move || host.call("experiment", "stats", &json!({}))
        },
        {
            let host = host.clone();
            move || {
                let variant = host.call(
                    "experiment",
                    "pickVariant",
                    &json!({"experiment": "e", "key": "unit-1"}),
                )?;
                let variant = variant.and_then(|v| v.as_str().map(str::to_owned));
                host.call(
                    "experiment",
                    "recordOutcome",
                    &json!({"experiment": "e", "variant": variant, "score": 0.5}),
                )
            }
        },
    );
    calls.unwrap();
    let report = report.unwrap().expect("the experiment's report");
    assert_eq!(report["e"]["fleet"], json!(true), "{report}");
}
