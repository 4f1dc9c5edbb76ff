//! Entry points of the fuzz targets in `tests/fuzz` (cargo-fuzz), one per target, each taking
//! the fuzzer's bytes. Not an API: it exists only with the `fuzzing` feature (and in this
//! crate's unit tests, which run every entry point over the committed seeds).
//!
//! Each entry point panics only when it finds a bug: a panic or hang in the code under test,
//! or a broken invariant that it checks (named in its docs).

use std::sync::OnceLock;

use plugin_host::PluginHost;
use serde_json::Value;

use crate::http::Token;

/// Longest input an entry point looks at; past it, the input is cut (the parsers under test
/// have no size limit of their own that a longer input would reach more of).
const MAX_INPUT: usize = 64 * 1024;

fn cut(data: &[u8]) -> &[u8] {
    &data[..data.len().min(MAX_INPUT)]
}

/// The bearer token the `http_request` target's server expects.
pub const HTTP_TOKEN: &str = "fuzz-token-0123456789";

fn fail(what: &str, e: &dyn std::fmt::Display) -> ! {
    panic!("setting up a fuzz target: {what}: {e:#}")
}

/// One host for the whole run, on an empty plugins directory: no plugin code runs.
fn empty_host() -> &'static PluginHost {
    static HOST: OnceLock<(PluginHost, tempfile::TempDir)> = OnceLock::new();
    &HOST
        .get_or_init(|| {
            let plugins = tempfile::tempdir().unwrap_or_else(|e| fail("temporary directory", &e));
            let host = crate::hooks::host_builder(plugins.path())
                .build()
                .unwrap_or_else(|e| fail("plugin host", &e));
            (host, plugins)
        })
        .0
}

struct HttpFixture {
    runtime: tokio::runtime::Runtime,
    host: PluginHost,
    token: Token,
}

/// One server for the whole run: the empty host, the same small runtime as `serve`'s.
fn http_fixture() -> &'static HttpFixture {
    static FIXTURE: OnceLock<HttpFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let host = empty_host().clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(4)
            .build()
            .unwrap_or_else(|e| fail("runtime", &e));
        let token = Token::new(HTTP_TOKEN).unwrap_or_else(|e| fail("token", &e));
        HttpFixture {
            runtime,
            host,
            token,
        }
    })
}

/// The control API: `data` as the bytes a client sends on one connection (one request, several
/// pipelined, or garbage) before closing its side, served as over TCP on `127.0.0.1:7878` with
/// the token [`HTTP_TOKEN`], by a host with no plugins.
///
/// Checks that the server answers with HTTP/1.x (or nothing) and closes the connection.
///
/// # Panics
///
/// When the server panics, hangs, or writes something that is not an HTTP/1.1 answer.
pub fn http_request(data: &[u8]) {
    let fixture = http_fixture();
    let out = crate::http::serve_bytes(
        &fixture.runtime,
        fixture.host.clone(),
        fixture.token.clone(),
        cut(data),
    );
    assert!(
        // hyper answers an HTTP/1.0 request in HTTP/1.0.
        out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
        "the control API wrote something that is not an HTTP answer: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
}

/// What a line of a task stream must give, by the reading rules of `worker run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    /// Longer than the limit: an error record, without the line held in memory.
    TooLong,
    /// Not UTF-8: an error record.
    NotUtf8,
    /// Blank: nothing.
    Blank,
    /// Text: a result or an error record.
    Text,
}

/// The lines of `stream` (split at `\n`; a final `\r` is not part of a line; a last line
/// without a newline still counts), each with what it must give under a limit of `max` bytes
/// (counted before the `\r` is taken off).
fn expected_lines(stream: &[u8], max: usize) -> Vec<LineKind> {
    let mut segments: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    if segments.last().is_some_and(|last| last.is_empty()) {
        segments.pop();
    }
    segments
        .into_iter()
        .map(|segment| {
            if segment.len() > max {
                return LineKind::TooLong;
            }
            let line = segment.strip_suffix(b"\r").unwrap_or(segment);
            match std::str::from_utf8(line) {
                Err(_) => LineKind::NotUtf8,
                Ok(text) if text.trim().is_empty() => LineKind::Blank,
                Ok(_) => LineKind::Text,
            }
        })
        .collect()
}

/// The task-line reader of `worker run` ([`Pipeline::run_stream`](crate::pipeline::Pipeline::run_stream))
/// on a host with no plugins.
///
/// `data` is: one byte giving the line limit (`--max-line-bytes`, 1 to 64), one byte giving the
/// size of the reader's buffer (1 to 32 bytes, so that lines span reads), then the stream.
///
/// Checks that every non-blank line gives exactly one output line of JSON, in order: an error
/// record naming the line for a line too long or not UTF-8, a result or error record for the
/// others.
///
/// # Panics
///
/// When the check fails, or the run fails (it reads from memory and writes to memory, so it
/// never has a reason to).
pub fn task_line(data: &[u8]) {
    let data = cut(data);
    let [limit, buffer, stream @ ..] = data else {
        return;
    };
    let max = 1 + usize::from(*limit % 64);
    let capacity = 1 + usize::from(*buffer % 32);
    let pipeline = crate::pipeline::Pipeline::new(empty_host().clone()).with_max_line_bytes(max);
    let mut out = Vec::new();
    let input = std::io::BufReader::with_capacity(capacity, stream);
    let summary = pipeline.run_stream(input, &mut out, |_| {});
    assert!(summary.is_ok(), "run_stream failed: {summary:?}");
    let text = std::str::from_utf8(&out).unwrap_or_else(|e| panic!("output not UTF-8: {e}"));
    let records: Vec<Value> = text
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("output line not JSON ({e}): {line}"))
        })
        .collect();
    let expected: Vec<(usize, LineKind)> = expected_lines(stream, max)
        .into_iter()
        .enumerate()
        .map(|(i, kind)| (i + 1, kind))
        .filter(|(_, kind)| *kind != LineKind::Blank)
        .collect();
    assert_eq!(
        records.len(),
        expected.len(),
        "one record per non-blank line: expected {expected:?}, got {records:?}"
    );
    for ((number, kind), record) in expected.into_iter().zip(&records) {
        let error = record.get("error").and_then(Value::as_str);
        let line = record.get("line").and_then(Value::as_u64);
        let says = |what: &str| error.is_some_and(|e| e.contains(what));
        match kind {
            LineKind::TooLong => assert!(says("longer than the limit"), "line {number}: {record}"),
            LineKind::NotUtf8 => assert!(says("not valid UTF-8"), "line {number}: {record}"),
            LineKind::Blank | LineKind::Text => {}
        }
        if error.is_some() {
            assert_eq!(
                line,
                Some(number as u64),
                "error record for line {number}: {record}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every entry point over the committed seeds (`tests/fuzz/seeds/<target>/`), so that the
    //! targets keep compiling and the seeds keep passing without the fuzzer.

    use std::path::PathBuf;

    fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fuzz/seeds")
            .join(target);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                (path, data)
            })
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
        seeds
    }

    fn run(target: &str, entry: fn(&[u8])) {
        for (path, data) in seeds(target) {
            eprintln!("{target}: {}", path.display());
            entry(&data);
        }
    }

    #[test]
    fn task_line_seeds() {
        run("task_line", super::task_line);
    }

    #[test]
    fn http_request_seeds() {
        run("http_request", super::http_request);
    }

    #[test]
    fn http_request_answers_what_a_client_would_see() {
        let fixture = super::http_fixture();
        let serve = |request: String| {
            let out = crate::http::serve_bytes(
                &fixture.runtime,
                fixture.host.clone(),
                fixture.token.clone(),
                request.as_bytes(),
            );
            String::from_utf8(out).unwrap()
        };
        let healthz = serve("GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned());
        assert!(healthz.starts_with("HTTP/1.1 200 "), "{healthz}");
        assert!(healthz.contains(r#""plugins":0"#), "{healthz}");
        let authorized = serve(format!(
            "GET /v1/plugins HTTP/1.1\r\nHost: 127.0.0.1:7878\r\nAuthorization: Bearer {}\r\n\r\n",
            super::HTTP_TOKEN
        ));
        assert!(authorized.starts_with("HTTP/1.1 200 "), "{authorized}");
        let rebinding = serve("GET /healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n".to_owned());
        assert!(rebinding.starts_with("HTTP/1.1 403 "), "{rebinding}");
        let no_token = serve("GET /v1/plugins HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned());
        assert!(no_token.starts_with("HTTP/1.1 401 "), "{no_token}");
    }
}
