//! Support for the end-to-end tests: finding the plugins cargo built, building the fixtures that
//! need other build settings, plugin directories in temporary folders, and byte-level patches
//! that make broken plugin files out of good ones.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: any failure here should stop the test with its message"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Cargo's output directory for this profile (`target/debug`), found from the running test
/// binary (`target/debug/deps/e2e-…`), so `CARGO_TARGET_DIR` and profiles are respected.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let mut dir = exe
        .parent()
        .expect("the test binary is in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The `.so` cargo built for plugin crate `name` (a dev-dependency of this package).
///
/// # Panics
///
/// When it was not built.
pub fn built_plugin(name: &str) -> PathBuf {
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let dir = profile_dir();
    [dir.join("deps").join(&file), dir.join(&file)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{file} was not built in {}", dir.display()))
}

/// Builds one of the fixture crates under `tests/fixtures` (`table-v1`, `table-incompatible`,
/// `panic-abort`) with its own cargo invocation and target directory, and returns its `.so`.
///
/// # Panics
///
/// When the build fails.
pub fn fixture_build(variant: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/Cargo.toml");
    let target = profile_dir()
        .parent()
        .expect("the profile directory is inside the target directory")
        .join("fixtures");
    let package = format!("fixture-{variant}");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .args(["-p", &package]);
    if variant == "panic-abort" {
        command.args(["--config", "profile.dev.panic=\"abort\""]);
    }
    // Variables the outer build set for this package must not leak into the inner one.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        command.env_remove(var);
    }
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "building {package} failed");
    let so = target.join("debug").join(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    ));
    assert!(so.is_file(), "{} is missing after the build", so.display());
    so
}

/// A plugins directory in a temporary folder, with its own shadow directory beside it.
#[derive(Debug)]
pub struct PluginDir {
    root: tempfile::TempDir,
}

impl Default for PluginDir {
    fn default() -> Self {
        Self::new()
    }
}

impl PluginDir {
    /// An empty plugins directory.
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("plugins")).unwrap();
        std::fs::create_dir(root.path().join("shadow")).unwrap();
        Self { root }
    }

    /// The plugins directory.
    pub fn path(&self) -> PathBuf {
        self.root.path().join("plugins")
    }

    /// The shadow directory [`host`](Self::host) uses.
    pub fn shadow(&self) -> PathBuf {
        self.root.path().join("shadow")
    }

    /// Copies the built plugin crate `crate_name` in as `file_name`; returns its path.
    pub fn add(&self, crate_name: &str, file_name: &str) -> PathBuf {
        self.add_file(&built_plugin(crate_name), file_name)
    }

    /// Copies any file in as `file_name`; returns its path.
    pub fn add_file(&self, source: &Path, file_name: &str) -> PathBuf {
        let dest = self.path().join(file_name);
        std::fs::copy(source, &dest).unwrap();
        dest
    }

    /// Writes `bytes` as `file_name`; returns its path.
    pub fn write(&self, file_name: &str, bytes: &[u8]) -> PathBuf {
        let dest = self.path().join(file_name);
        std::fs::write(&dest, bytes).unwrap();
        dest
    }

    /// Writes `plugins.json` with these plugin settings: `{"plugins": plugins}`.
    pub fn configure(&self, plugins: &Value) {
        self.configure_file(&serde_json::json!({ "plugins": plugins }));
    }

    /// Writes `plugins.json` as given.
    pub fn configure_file(&self, config: &Value) {
        std::fs::write(
            self.path().join("plugins.json"),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
    }

    /// A host on this directory with the worker's hook points (not scanned yet).
    pub fn host(&self) -> plugin_host::PluginHost {
        worker::hooks::host_builder(self.path())
            .with_shadow_dir(self.shadow())
            .build()
            .unwrap()
    }

    /// Files left in the shadow directory.
    pub fn shadow_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.shadow())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}

/// The bytes of `file` with every occurrence of `find` replaced by `replace` (same length).
///
/// # Panics
///
/// When `find` does not occur.
pub fn patched(file: &Path, find: &[u8], replace: &[u8]) -> Vec<u8> {
    assert_eq!(find.len(), replace.len());
    let mut bytes = std::fs::read(file).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while i + find.len() <= bytes.len() {
        if &bytes[i..i + find.len()] == find {
            bytes[i..i + find.len()].copy_from_slice(replace);
            hits += 1;
            i += find.len();
        } else {
            i += 1;
        }
    }
    assert!(
        hits > 0,
        "{:?} not found in {}",
        String::from_utf8_lossy(find),
        file.display()
    );
    bytes
}

/// Offset of the plugin header's magic bytes in a plugin file.
///
/// # Panics
///
/// When the magic occurs other than exactly once.
pub fn header_offset(bytes: &[u8]) -> usize {
    let magic = plugin_api::abi::MAGIC;
    let hits: Vec<usize> = bytes
        .windows(magic.len())
        .enumerate()
        .filter(|(_, w)| *w == magic)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "expected the header magic exactly once");
    hits[0]
}

/// Whether `path` is mapped into this process.
pub fn is_mapped(path: &Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.contains(path.to_str().unwrap())
}

/// An HTTP answer: status, headers (names lower-cased), body.
#[derive(Debug)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// Header name (lower case) and value pairs.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpAnswer {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 request (one request per connection) to `addr`: `HOST:PORT` over TCP, or
/// `unix:PATH` over a Unix socket. No `Authorization` header: see [`Api::http`] for that.
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> HttpAnswer {
    http_with(addr, method, path, &[], body)
}

/// [`http`] with extra headers. `Host` is `addr` (`localhost` over a Unix socket) unless
/// `headers` names one.
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpAnswer {
    let mut request = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        let host = if addr.starts_with("unix:") {
            "localhost"
        } else {
            addr
        };
        request.push_str(&format!("Host: {host}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!(
        "Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ));
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    http_raw(addr, &bytes)
}

/// A byte stream to the control API.
pub trait Connection: std::io::Read + std::io::Write + Send {
    /// Sets the read timeout.
    fn read_timeout(&self, timeout: std::time::Duration);
}

impl Connection for std::net::TcpStream {
    fn read_timeout(&self, timeout: std::time::Duration) {
        self.set_read_timeout(Some(timeout)).unwrap();
    }
}

impl Connection for std::os::unix::net::UnixStream {
    fn read_timeout(&self, timeout: std::time::Duration) {
        self.set_read_timeout(Some(timeout)).unwrap();
    }
}

/// Connects to `addr` (`HOST:PORT` or `unix:PATH`), with a 30 s read timeout.
pub fn connect(addr: &str) -> Box<dyn Connection> {
    let stream: Box<dyn Connection> = match addr.strip_prefix("unix:") {
        Some(path) => Box::new(std::os::unix::net::UnixStream::connect(path).unwrap()),
        None => Box::new(std::net::TcpStream::connect(addr).unwrap()),
    };
    stream.read_timeout(std::time::Duration::from_secs(30));
    stream
}

/// Sends `request` as it is and reads the answer until the server closes the connection. A
/// failed write (the server answered early and closed) is not an error: the answer is read.
pub fn http_raw(addr: &str, request: &[u8]) -> HttpAnswer {
    let mut stream = connect(addr);
    let _ = stream.write_all(request);
    read_answer(&mut *stream)
}

/// Reads one HTTP answer until the connection closes (a reset after the answer is fine).
pub fn read_answer(stream: &mut dyn Connection) -> HttpAnswer {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                assert!(!raw.is_empty(), "no answer: {e}");
                break;
            }
        }
    }
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// What a client needs to reach a running worker's control API: address and token.
#[derive(Debug, Clone)]
pub struct Api {
    /// `HOST:PORT` or `unix:PATH`.
    pub addr: String,
    /// The bearer token.
    pub token: String,
}

impl Api {
    /// [`http`] with the bearer token.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> HttpAnswer {
        let auth = format!("Bearer {}", self.token);
        http_with(&self.addr, method, path, &[("Authorization", &auth)], body)
    }
}

/// Waits up to `timeout` for `condition`, checking every 10 ms; returns whether it held.
pub fn eventually(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Copies `source` into `dir` as `name` the safe way: under a hidden name, then renamed.
pub fn drop_in(source: &Path, dir: &Path, name: &str) -> PathBuf {
    let temp = dir.join(format!(".{name}.partial"));
    std::fs::copy(source, &temp).unwrap();
    let dest = dir.join(name);
    std::fs::rename(&temp, &dest).unwrap();
    dest
}

/// Resident memory of this process in bytes.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// This thread's id in the kernel (what `/proc/PID/task/` lists).
pub fn thread_id() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

/// Whether thread `tid` of process `pid` is asleep in `nanosleep` (as a plugin's `sleep` call
/// is): how a test knows a slow call is in flight without sleeping itself.
pub fn is_sleeping(pid: u32, tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan"))
        .is_ok_and(|w| w.contains("nanosleep"))
}

/// How many threads of process `pid` are asleep in `nanosleep`.
pub fn sleeping_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .filter(|tid| is_sleeping(pid, *tid))
        .count()
}

/// A real `redis-server` on a free loopback port, with its data in a temporary directory
/// (append-only file, fsync'd on every write, so a stop and a start lose nothing). Killed when
/// dropped. Panics with what to do when `redis-server` is not on `PATH`: the fleet tests need it
/// (`.ci/run` installs it).
#[derive(Debug)]
pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts a server and waits (at most a minute) until it answers PING.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let mut server = RedisServer {
            dir: tempfile::tempdir().expect("a temporary directory"),
            port,
            child: None,
        };
        server.start_again();
        server
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server again (after [`RedisServer::stop`]) on the same port and data.
    pub fn start_again(&mut self) {
        let spawned = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => panic!(
                "cannot start redis-server ({e}): the fleet tests need a real Redis; install it (apt-get install -y redis-server, as .ci/run does) and run again"
            ),
        };
        self.child = Some(child);
        assert!(
            eventually(std::time::Duration::from_secs(60), || self.ping()),
            "redis-server on port {} did not answer PING within a minute",
            self.port
        );
    }

    /// Whether the server answers PING.
    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// Runs a command whose answer is one line (`+OK`, `:1`), with arguments of any bytes, as
    /// any client of the server could; panics on an error answer.
    pub fn command(&self, args: &[&[u8]]) {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("redis");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request).unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(stream)
            .read_line(&mut answer)
            .unwrap();
        assert!(
            answer.starts_with('+') || answer.starts_with(':'),
            "{:?}: {answer}",
            String::from_utf8_lossy(args[0])
        );
    }

    /// Freezes the server (SIGSTOP) until the answer is dropped: connections stay open and
    /// requests wait unanswered, as with a server that hangs. Bind the answer after the
    /// clients: a test that fails while the server is paused then lets it go on before its
    /// clients, which may wait for it as they close, are dropped.
    #[must_use = "the server goes on when this is dropped"]
    pub fn pause(&self) -> Paused<'_> {
        assert!(self.signal("-STOP"), "kill -STOP of redis-server failed");
        Paused(self)
    }

    /// Sends `signal` to the server: whether `kill` succeeded (or there is no server).
    fn signal(&self, signal: &str) -> bool {
        self.child.as_ref().is_none_or(|child| {
            std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .is_ok_and(|status| status.success())
        })
    }

    /// Whether a request waits, unread, on one of the server's connections (the kernel's
    /// receive queue of a socket on its port, as `/proc/net/tcp` shows): with the server paused,
    /// proof that a client's request reached it.
    pub fn has_unread_request(&self) -> bool {
        let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
            return false;
        };
        let port = format!(":{:04X}", self.port);
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local address, state (`0A`: listening, whose queue is of connections not yet
            // accepted), then the transmit and receive queues as `TX:RX`.
            fields.get(1).is_some_and(|local| local.ends_with(&port))
                && fields.get(3).is_some_and(|state| *state != "0A")
                && fields
                    .get(4)
                    .and_then(|queues| queues.split(':').nth(1))
                    .and_then(|rx| u64::from_str_radix(rx, 16).ok())
                    .is_some_and(|rx| rx > 0)
        })
    }

    /// Stops the server (SIGTERM: it syncs its append-only file) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

/// A paused [`RedisServer`]: it goes on (SIGCONT) when this is dropped.
#[derive(Debug)]
pub struct Paused<'a>(&'a RedisServer);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        // No panic here: this may run as a failed test unwinds.
        if !self.0.signal("-CONT") {
            eprintln!("kill -CONT of redis-server failed");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
