//! The control API against hostile clients: no token, a foreign `Host` or `Origin`, oversized
//! and malformed heads, slow clients, and a Unix socket; against the real `worker serve`.
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::time::{Duration, Instant};

use serde_json::json;
use tests::{PluginDir, eventually, http, http_raw, http_with, sleeping_threads};

use crate::serve::Worker;

/// A worker on a plugins directory holding the fixture plugin (it has a `sleep` method).
fn worker(extra: &[&str]) -> (PluginDir, Worker) {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, extra);
    (dir, worker)
}

#[test]
fn every_endpoint_but_healthz_needs_the_token() {
    let (_dir, worker) = worker(&["--no-watch"]);
    let addr = worker.addr.as_str();
    let token = worker.token();

    let health = http(addr, "GET", "/healthz", b"");
    assert_eq!(health.status, 200, "{}", health.body);

    for (method, path) in [
        ("GET", "/v1/plugins"),
        ("GET", "/v1/plugins/fixture"),
        ("POST", "/v1/plugins/fixture/total"),
        ("POST", "/v1/plugins/fixture/reload"),
        ("DELETE", "/v1/plugins/fixture"),
        ("POST", "/v1/reload"),
        ("GET", "/v1/hooks"),
        ("POST", "/v1/tasks"),
        ("GET", "/metrics"),
    ] {
        let none = http(addr, method, path, b"");
        assert_eq!(
            none.status, 401,
            "{method} {path} without a token: {}",
            none.body
        );
        assert!(
            none.header("www-authenticate")
                .unwrap()
                .starts_with("Bearer"),
            "{method} {path}"
        );
        assert!(none.json()["error"].as_str().unwrap().contains("Bearer"));
        let wrong = http_with(
            addr,
            method,
            path,
            &[("Authorization", &format!("Bearer {}x", &token[1..]))],
            b"",
        );
        assert_eq!(wrong.status, 401, "{method} {path} with a wrong token");
        assert!(
            wrong
                .header("www-authenticate")
                .unwrap()
                .contains("invalid_token")
        );
    }
    let basic = http_with(
        addr,
        "GET",
        "/v1/plugins",
        &[("Authorization", &format!("Basic {token}"))],
        b"",
    );
    assert_eq!(basic.status, 401);

    let right = worker.http("POST", "/v1/plugins/fixture/total", b"");
    assert_eq!((right.status, right.json()), (200, json!(0)));
    assert_eq!(worker.http("GET", "/metrics", b"").status, 200);
    // Nothing was unloaded by the refused DELETE.
    assert_eq!(worker.http("GET", "/v1/plugins/fixture", b"").status, 200);
    worker.stop();

    let (_dir, public) = self::worker(&["--no-watch", "--metrics-public"]);
    let metrics = http(&public.addr, "GET", "/metrics", b"");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("worker_plugin_calls_total"),
        "{}",
        metrics.body
    );
    assert_eq!(http(&public.addr, "GET", "/v1/plugins", b"").status, 401);
    public.stop();
}

#[test]
fn the_token_file_is_made_private_reused_and_refused_when_tampered_with() {
    let dir = PluginDir::new();
    let state = dir.shadow().join("state");
    let worker = Worker::start(&dir, &state, &["--no-watch"]);
    let file = state.join("control-token");
    assert_eq!(worker.token_file, file, "the announced path");
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = worker.token();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    worker.stop();

    // Reused at the next start.
    let again = Worker::start(&dir, &state, &["--no-watch"]);
    assert_eq!(again.token(), token);
    assert_eq!(again.http("GET", "/v1/plugins", b"").status, 200);
    again.stop();

    // Readable by others: refused, and left as it is.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = Worker::try_start(&dir, &state, &["--no-watch"], &[]).unwrap_err();
    assert!(refused.contains("mode is 644"), "{refused}");
    assert!(refused.contains("control-token"), "{refused}");

    // A planted symbolic link is not followed, not written through.
    std::fs::remove_file(&file).unwrap();
    let target = dir.shadow().join("victim");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, &file).unwrap();
    let refused = Worker::try_start(&dir, &state, &["--no-watch"], &[]).unwrap_err();
    assert!(refused.contains("symbolic link"), "{refused}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");

    // A token file of the user's own, by option and by environment.
    let mine = dir.shadow().join("my-token");
    std::fs::write(&mine, "correct-horse-battery-staple\n").unwrap();
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o600)).unwrap();
    let by_option = Worker::start(
        &dir,
        &state,
        &["--no-watch", "--token-file", mine.to_str().unwrap()],
    );
    assert_eq!(by_option.token_file, mine);
    assert_eq!(by_option.http("GET", "/v1/plugins", b"").status, 200);
    by_option.stop();
    let by_env = Worker::try_start(
        &dir,
        &state,
        &["--no-watch"],
        &[("WORKER_TOKEN_FILE", mine.as_os_str())],
    )
    .unwrap();
    assert_eq!(by_env.token(), "correct-horse-battery-staple");
    assert_eq!(by_env.http("GET", "/v1/plugins", b"").status, 200);
    by_env.stop();
}

#[test]
fn foreign_host_and_origin_are_refused() {
    let (_dir, worker) = worker(&["--no-watch"]);
    let api = worker.api();
    let auth = format!("Bearer {}", api.token);
    let port = api.addr.rsplit(':').next().unwrap().to_owned();
    let ask = |headers: &[(&str, &str)]| {
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        http_with(&api.addr, "GET", "/v1/plugins", &all, b"")
    };
    for host in [
        "evil.example",
        "evil.example:7878",
        "127.0.0.1.evil.example",
    ] {
        let answer = ask(&[("Host", host)]);
        assert_eq!(answer.status, 403, "Host: {host}");
        assert!(answer.json()["error"].as_str().unwrap().contains("Host"));
    }
    let foreign_health = http_with(
        &api.addr,
        "GET",
        "/healthz",
        &[("Host", "evil.example")],
        b"",
    );
    assert_eq!(foreign_health.status, 403);
    for host in [
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(ask(&[("Host", &host)]).status, 200, "Host: {host}");
    }
    for origin in [
        "http://evil.example".to_owned(),
        format!("http://evil.example:{port}"),
        "null".to_owned(),
        "http://localhost:1".to_owned(),
    ] {
        assert_eq!(ask(&[("Origin", &origin)]).status, 403, "Origin: {origin}");
    }
    assert_eq!(
        ask(&[("Origin", &format!("http://127.0.0.1:{port}"))]).status,
        200
    );
    assert_eq!(
        ask(&[("Origin", &format!("http://localhost:{port}"))]).status,
        200
    );
    worker.stop();
}

#[test]
fn oversized_and_malformed_heads_are_refused() {
    let (_dir, worker) = worker(&["--no-watch"]);
    let addr = worker.addr.clone();
    let auth = format!("Authorization: Bearer {}\r\n", worker.token());
    let head = |extra: &str| {
        format!(
            "POST /v1/plugins/fixture/total HTTP/1.1\r\nHost: {addr}\r\n{auth}{extra}Connection: close\r\n\r\n"
        )
    };

    let filler = format!("X-Filler: {}\r\n", "a".repeat(17 * 1024));
    assert_eq!(http_raw(&addr, head(&filler).as_bytes()).status, 431);
    assert_eq!(
        http_raw(&addr, head("Content-Length: -1\r\n").as_bytes()).status,
        400
    );
    assert_eq!(
        http_raw(
            &addr,
            format!("{}{{}}", head("Content-Length: 2\r\nContent-Length: 3\r\n")).as_bytes()
        )
        .status,
        400
    );
    assert_eq!(
        http_raw(&addr, head("Content-Length: twelve\r\n").as_bytes()).status,
        400
    );
    assert_eq!(http_raw(&addr, b"\x16\x03\x01garbage\r\n\r\n").status, 400);
    assert_eq!(
        http_raw(&addr, b"GET / HTTP/1.1\r\nbad header line\r\n\r\n").status,
        400
    );
    // Equal duplicates are one length: fine.
    let same = http_raw(
        &addr,
        format!("{}{{}}", head("Content-Length: 2\r\nContent-Length: 2\r\n")).as_bytes(),
    );
    assert_eq!((same.status, same.json()), (200, json!(0)));
    // A declared body over the limit is refused without being waited for.
    let big = http_raw(&addr, head("Content-Length: 5000000\r\n").as_bytes());
    assert_eq!(big.status, 413);

    assert_eq!(worker.http("GET", "/healthz", b"").status, 200);
    worker.stop();
}

/// Opens `n` connections that each declare a 100 kB body and send 5 bytes of it.
fn slow_clients(addr: &str, token: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            write!(
                stream,
                "POST /v1/plugins/fixture/total HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n12345"
            )
            .unwrap();
            stream
        })
        .collect()
}

#[test]
fn slow_clients_block_neither_healthz_nor_shutdown() {
    let (_dir, worker) = worker(&["--no-watch"]);
    let token = worker.token();
    let mut held = slow_clients(&worker.addr, &token, 4);
    // Four more that never finish their head.
    for _ in 0..4 {
        let mut stream = std::net::TcpStream::connect(&worker.addr).unwrap();
        stream
            .write_all(b"GET /v1/plugins HTTP/1.1\r\nHost: loc")
            .unwrap();
        held.push(stream);
    }
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let started = Instant::now();
        let health = http(&worker.addr, "GET", "/healthz", b"");
        assert_eq!(health.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "healthz took {:?} with slow clients connected",
            started.elapsed()
        );
    }
    assert_eq!(
        worker.http("POST", "/v1/plugins/fixture/total", b"").status,
        200
    );
    let (status, log) = worker
        .stop_within(Duration::from_secs(5))
        .expect("SIGTERM did not stop the worker within 5 s while slow clients were connected");
    assert!(status.success(), "{log}");
    drop(held);
}

#[test]
fn healthz_answers_while_plugin_calls_are_busy() {
    let (_dir, worker) = worker(&["--no-watch"]);
    let api = worker.api();
    let asleep = sleeping_threads(worker.pid());
    let sleepers: Vec<_> = (0..6)
        .map(|_| {
            let api = api.clone();
            std::thread::spawn(move || {
                api.http("POST", "/v1/plugins/fixture/sleep", br#"{"ms": 1500}"#)
            })
        })
        .collect();
    // The control API runs plugin calls on four threads: all four asleep in the plugin, two
    // calls queued behind them.
    assert!(
        eventually(Duration::from_secs(20), || sleeping_threads(worker.pid())
            >= asleep + 4),
        "the plugin calls never took every call thread"
    );
    let started = Instant::now();
    assert_eq!(http(&api.addr, "GET", "/healthz", b"").status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "healthz took {:?} while plugin calls were busy",
        started.elapsed()
    );
    for sleeper in sleepers {
        let answer = sleeper.join().unwrap();
        assert_eq!((answer.status, answer.json()), (200, json!("done")));
    }
    worker.stop();
}

#[test]
fn unix_socket_is_private_serves_and_replaces_only_a_stale_socket() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let state = dir.shadow().join("state");
    let socket = dir.shadow().join("control.sock");
    // A stale socket (its server is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let listen = format!("unix:{}", socket.display());
    let worker = Worker::start(&dir, &state, &["--no-watch", "--listen", &listen]);
    assert_eq!(worker.addr, listen);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(http(&listen, "GET", "/healthz", b"").status, 200);
    assert_eq!(http(&listen, "GET", "/v1/plugins", b"").status, 401);
    let total = worker.http("POST", "/v1/plugins/fixture/total", b"");
    assert_eq!((total.status, total.json()), (200, json!(0)));
    // No browser reaches a Unix socket: no Host check there.
    let auth = format!("Bearer {}", worker.token());
    let any_host = http_with(
        &listen,
        "GET",
        "/v1/plugins",
        &[("Host", "anything.example"), ("Authorization", &auth)],
        b"",
    );
    assert_eq!(any_host.status, 200);
    // A live socket is not taken over.
    let second = Worker::try_start(
        &dir,
        &dir.shadow().join("state2"),
        &["--no-watch", "--listen", &listen],
        &[],
    )
    .unwrap_err();
    assert!(second.contains("another process is serving"), "{second}");
    let (status, log) = worker.stop();
    assert!(status.success(), "{log}");
    assert!(!socket.exists(), "the socket file was left behind");

    // Anything but a socket at that path is refused and left alone.
    std::fs::write(&socket, "not a socket").unwrap();
    let refused =
        Worker::try_start(&dir, &state, &["--no-watch", "--listen", &listen], &[]).unwrap_err();
    assert!(refused.contains("is not a socket"), "{refused}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
}

#[test]
fn connections_are_bounded_and_slots_come_back() {
    let (_dir, worker) = worker(&["--no-watch"]);
    // 64 connections that never finish their head fill every slot, 16 more the reserve kept
    // for `/healthz`.
    let held: Vec<std::net::TcpStream> = (0..80)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(&worker.addr).unwrap();
            stream.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            stream
        })
        .collect();
    assert!(
        tests::eventually(Duration::from_secs(5), || http(
            &worker.addr,
            "GET",
            "/healthz",
            b""
        )
        .status
            == 503),
        "an 81st connection was not refused"
    );
    drop(held);
    assert!(
        tests::eventually(Duration::from_secs(5), || http(
            &worker.addr,
            "GET",
            "/healthz",
            b""
        )
        .status
            == 200),
        "the slots did not come back"
    );
    worker.stop();
}
