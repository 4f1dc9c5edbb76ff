//! `worker call --server URL`: a method call through a serving worker's control API
//! (`POST /v1/plugins/{plugin}/{method}`), with hyper's HTTP/1 client.

use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The largest answer read (the server's own body limit is far below).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// What the serving worker answered.
#[derive(Debug)]
pub(crate) struct RemoteAnswer {
    /// The JSON answer (`null` for a no-op).
    pub(crate) answer: Value,
    /// The no-op reason (`X-Noop-Reason`), when the call answered nothing.
    pub(crate) noop_reason: Option<String>,
    /// Whether the no-op was a missing plugin or method (`X-Noop-Kind: missing`).
    pub(crate) missing: bool,
}

/// Where the server listens.
enum Target {
    Tcp(String),
    Unix(std::path::PathBuf),
}

fn target(server: &str) -> anyhow::Result<Target> {
    if let Some(path) = server.strip_prefix("unix:") {
        return Ok(Target::Unix(path.into()));
    }
    let rest = server.strip_prefix("http://").unwrap_or(server);
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
        bail!(
            "--server `{}` is not a control API address; give http://HOST:PORT or unix:PATH, as `worker serve` prints it",
            plugin_host::text::escape_control(server)
        );
    }
    Ok(Target::Tcp(authority.to_owned()))
}

/// A name that can travel as one path segment as it is.
fn segment<'a>(what: &str, name: &'a str) -> anyhow::Result<&'a str> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
    {
        bail!(
            "the {what} name `{}` cannot be sent over the control API (only ASCII letters, digits and -._~)",
            plugin_host::text::escape_control(name)
        );
    }
    Ok(name)
}

/// Calls `plugin.method` with `params` on the worker at `server`, presenting `token`; gives up
/// after `timeout`.
pub(crate) fn call(
    server: &str,
    token: &str,
    plugin: &str,
    method: &str,
    params: &Value,
    timeout: Duration,
) -> anyhow::Result<RemoteAnswer> {
    let target = target(server)?;
    let path = format!(
        "/v1/plugins/{}/{}",
        segment("plugin", plugin)?,
        segment("method", method)?
    );
    let body = if params.is_null() {
        String::new()
    } else {
        params.to_string()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP client")?;
    let exchange = async {
        let (host, io): (String, Box<dyn Io>) = match &target {
            Target::Tcp(authority) => (
                authority.clone(),
                Box::new(
                    tokio::net::TcpStream::connect(authority)
                        .await
                        .with_context(|| format!("connecting to {server}"))?,
                ),
            ),
            Target::Unix(path) => (
                "localhost".to_owned(),
                Box::new(
                    tokio::net::UnixStream::connect(path)
                        .await
                        .with_context(|| format!("connecting to {server}"))?,
                ),
            ),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .with_context(|| format!("talking HTTP to {server}"))?;
        tokio::spawn(connection);
        let request = Request::post(path)
            .header(header::HOST, host)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .context("making the request")?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("calling {server}"))?;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let noop_reason = header("x-noop-reason");
        let missing = header("x-noop-kind").as_deref() == Some("missing");
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer from {server}: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            let error = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| text.trim().to_owned());
            bail!(
                "the worker at {server} answered {}: {}",
                status.as_u16(),
                plugin_host::text::escape_control(&error)
            );
        }
        let answer = serde_json::from_str(&text).with_context(|| {
            format!("the worker at {server} answered something that is not JSON")
        })?;
        Ok(RemoteAnswer {
            answer,
            noop_reason,
            missing,
        })
    };
    runtime
        .block_on(async { tokio::time::timeout(timeout, exchange).await })
        .map_err(|_| anyhow::anyhow!("no answer from {server} within {} s", timeout.as_secs()))?
}

/// A stream the client can talk over.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
