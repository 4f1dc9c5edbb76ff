//! The control API: HTTP with JSON bodies, on loopback by default, or on a Unix socket.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /healthz` | `{"status": "ok", "plugins": N}`, or `"degraded"` with the unhealthy plugins under `degraded` (always 200; no token needed) |
//! | `GET /metrics` | OpenMetrics text (`crate::metrics`): plugin calls, latency histograms, breakers, tasks (no token needed with [`ControlOptions::with_metrics_public`]) |
//! | `GET /v1/plugins` | `{"plugins": [...], "refused": [...]}` |
//! | `GET /v1/plugins/{plugin}` | one loaded plugin |
//! | `POST /v1/plugins/{plugin}/{method}` | body: the params (empty = `null`); answer: the result, or `null` for a no-op, with the reason in the `X-Noop-Reason` header |
//! | `POST /v1/plugins/{plugin}/reload` | reloads; the plugin, or an error (the old generation keeps serving) |
//! | `POST /v1/plugins/{plugin}/reset` | an isolated plugin stopped by its crash-loop limit is restarted (with its last state); the plugin |
//! | `DELETE /v1/plugins/{plugin}` | unloads |
//! | `POST /v1/reload` | reads the configuration again and loads new files |
//! | `GET /v1/hooks` | every hook point with its subscribers in execution order |
//! | `POST /v1/tasks` | body: one task or an array of tasks; answer: the result record(s), as `worker run` writes them |
//!
//! A bad request gets a 4xx answer with `{"error": "..."}` saying what was wrong. A plugin method
//! named `reload` cannot be called through this API (the route reloads the plugin).
//!
//! # Defences
//!
//! - Every request but `GET /healthz` presents `Authorization: Bearer <token>` ([`Token`]),
//!   compared in constant time; otherwise `401` with `WWW-Authenticate: Bearer`.
//! - Over TCP, a `Host` that is not a loopback name (`localhost`, `127.0.0.1`, `[::1]`), the
//!   listen address or the address the client connected to gets `403` (DNS rebinding), and so
//!   does an `Origin` other than our own. A Unix socket is not reachable from a browser: no
//!   `Host` check there.
//! - Headers must arrive within 10 s and fit in 16 KiB (`431`); a body must arrive within 10 s
//!   (`408`) and fit in 1 MiB (`413`); a negative, unparsable or conflicting `Content-Length` is
//!   `400` (hyper's parser); at most 64 connections are served at once, and 16 more answer
//!   `GET /healthz` only; a write a client does not read for 10 s ends its connection.
//!
//! # Why hyper on a tokio runtime
//!
//! The server used before (`tiny_http`) has no header or body read timeouts, no header size
//! limit and a fixed pool of threads that each block on one client: four clients that declared
//! a body and sent five bytes froze the API and blocked shutdown. hyper's HTTP/1 server gives
//! the header timeout, the header size limit and strict `Content-Length` parsing; a
//! single-threaded tokio runtime keeps thousands of slow clients cheap, and plugin calls (which
//! block, and may block for long) run on a bounded pool of blocking threads so that the reactor,
//! and `/healthz`, always answer.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body as _, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, watch};

use plugin_host::{PluginCallError, PluginHost};

mod auth;
mod listen;

pub use auth::Token;
use listen::{Bound, HostPolicy, OwnedSocket};
pub use listen::{ControlAddress, check_address as check_listen_address};

/// Largest request body accepted.
const MAX_BODY: u64 = 1024 * 1024;

/// Largest request head (request line and headers) accepted; past it, `431`.
const MAX_HEADER: usize = 16 * 1024;

/// Time a client has to send a complete request head (also bounds idle keep-alive).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a client has to send a complete body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; past it, new connections are served by the reserve.
const MAX_CONNECTIONS: usize = 64;

/// Connections past [`MAX_CONNECTIONS`] that still get an answer: `GET /healthz` is served,
/// anything else gets `503`; one request each, with a short head timeout. Past these too, a
/// connection gets `503` and is closed. Clients that hold every regular slot cannot make the
/// worker look dead to its health check.
const RESERVE_CONNECTIONS: usize = 16;

/// Time a reserve connection has to send its request head.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// A write to a client that stays blocked this long (a client that sends requests and never
/// reads the answers) fails, and the connection is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Threads running plugin calls and other blocking work; further requests wait for one.
const BLOCKING_THREADS: usize = 4;

/// How long `stop` waits for requests in progress (plugin calls) to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Bytes of an oversized body read and thrown away before answering `413`, so that the client
/// (still sending) reads the answer instead of a connection reset.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

/// Draining stops when the client pauses this long.
const DRAIN_IDLE: Duration = Duration::from_millis(300);

/// How the control API is protected. Made with [`ControlOptions::new`].
#[derive(Debug, Clone)]
pub struct ControlOptions {
    token: Token,
    metrics_public: bool,
}

impl ControlOptions {
    /// Requests must present `token`; `/metrics` too.
    pub fn new(token: Token) -> Self {
        Self {
            token,
            metrics_public: false,
        }
    }

    /// Whether `GET /metrics` answers without the token (for a Prometheus scraper that has no
    /// way to send one).
    pub fn with_metrics_public(mut self, public: bool) -> Self {
        self.metrics_public = public;
        self
    }
}

/// What every connection shares.
struct Shared {
    host: PluginHost,
    metrics: Arc<crate::metrics::Metrics>,
    options: ControlOptions,
    /// `None` on a Unix socket: no browser reaches it, so no `Host` check.
    policy: Option<HostPolicy>,
}

/// The running control API server. Stops (as [`ControlServer::stop`]) when dropped.
pub struct ControlServer {
    address: ControlAddress,
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    socket: Option<OwnedSocket>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("address", &self.address)
            .finish()
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl ControlServer {
    /// Listens on `listen` and serves the control API for `host`: a TCP address such as
    /// `127.0.0.1:7878` (port 0 picks a free port), or `unix:/path/to/socket` for a Unix socket
    /// created with mode 0600 (a stale socket at that path is replaced; any other file there is
    /// refused).
    ///
    /// # Errors
    ///
    /// The address cannot be bound, or the runtime cannot be started.
    pub fn start(host: PluginHost, listen: &str, options: ControlOptions) -> anyhow::Result<Self> {
        let (bound, address, policy) = listen::bind(listen)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(BLOCKING_THREADS)
            .thread_name("control-api-call")
            .build()
            .context("starting the control API runtime")?;
        let (listener, socket) = {
            let _context = runtime.enter();
            match bound {
                Bound::Tcp(l) => {
                    l.set_nonblocking(true)?;
                    (Listener::Tcp(tokio::net::TcpListener::from_std(l)?), None)
                }
                Bound::Unix(l, owned) => {
                    l.set_nonblocking(true)?;
                    (
                        Listener::Unix(tokio::net::UnixListener::from_std(l)?),
                        Some(owned),
                    )
                }
            }
        };
        let shared = Arc::new(Shared {
            metrics: Arc::new(crate::metrics::Metrics::new(host.clone())),
            host,
            options,
            policy,
        });
        let (shutdown, stopping) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("control-api".to_owned())
            .spawn(move || {
                runtime.block_on(accept_loop(listener, shared, stopping));
                // Whatever still runs (a plugin call past the grace time) is left behind.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .context("starting the control API thread")?;
        Ok(Self {
            address,
            shutdown,
            thread: Some(thread),
            socket,
        })
    }

    /// Where it listens.
    pub fn address(&self) -> &ControlAddress {
        &self.address
    }

    /// Stops accepting, closes connections that are not in a request, cuts off requests still
    /// sending their body, and waits (up to 30 s) for the requests in progress to finish. A
    /// Unix socket file is removed.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(socket) = self.socket.take() {
            socket.remove();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>, mut stopping: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let reserve = Arc::new(Semaphore::new(RESERVE_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stopping.wait_for(|s| *s) => break,
            accepted = accept(&listener) => accepted,
        };
        let (io, local_ip) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: do not spin.
                tracing::warn!(error = %e, "control API: accepting a connection failed");
                tokio::select! {
                    _ = stopping.wait_for(|s| *s) => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let (slot, mode) = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => (slot, Mode::Full),
            Err(_) => match Arc::clone(&reserve).try_acquire_owned() {
                Ok(slot) => {
                    tracing::debug!(
                        limit = MAX_CONNECTIONS,
                        "control API: every connection slot is taken; serving /healthz only"
                    );
                    (slot, Mode::HealthOnly)
                }
                Err(_) => {
                    tracing::warn!(
                        limit = MAX_CONNECTIONS + RESERVE_CONNECTIONS,
                        "control API: too many connections; refusing one"
                    );
                    io.refuse();
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        let stopping = stopping.clone();
        tokio::spawn(async move {
            match io {
                Stream::Tcp(s) => {
                    connection(WriteTimeout::new(s), local_ip, shared, stopping, mode).await;
                }
                Stream::Unix(s) => {
                    connection(WriteTimeout::new(s), local_ip, shared, stopping, mode).await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    // Every connection holds a slot: all slots back means all connections are done.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    let all_reserve = u32::try_from(RESERVE_CONNECTIONS).unwrap_or(u32::MAX);
    let all_back = async {
        let _regular = slots.acquire_many(all).await;
        let _reserve = reserve.acquire_many(all_reserve).await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, all_back)
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "control API: requests still running at shutdown; leaving them"
        );
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Stream {
    /// Best effort, without waiting: a `503` for a connection over the limit, then close.
    fn refuse(self) {
        let answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 55\r\n\r\n{\"error\": \"too many connections; retry in a moment\"}\r\n";
        let _ = match &self {
            Self::Tcp(s) => s.try_write(answer),
            Self::Unix(s) => s.try_write(answer),
        };
    }
}

async fn accept(listener: &Listener) -> std::io::Result<(Stream, Option<IpAddr>)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, _) = l.accept().await?;
            let local = stream.local_addr().ok().map(|a| a.ip());
            Ok((Stream::Tcp(stream), local))
        }
        Listener::Unix(l) => {
            let (stream, _) = l.accept().await?;
            Ok((Stream::Unix(stream), None))
        }
    }
}

/// Counts the requests of one connection that are in progress, from the parsed head until the
/// answer's body was written (the guard travels inside the answer's body).
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(count))
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body, holding its request's [`InProgress`] until it is written.
struct Reply {
    body: Full<Bytes>,
    _in_progress: InProgress,
}

impl hyper::body::Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a connection is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every endpoint, keep-alive.
    Full,
    /// A reserve connection: `GET /healthz` only, one request.
    HealthOnly,
}

/// A connection's IO whose writes fail once they stay blocked for [`WRITE_TIMEOUT`]: a client
/// that pipelines requests and never reads the answers would otherwise hold its connection
/// (and its slot) forever.
struct WriteTimeout<I> {
    io: I,
    /// Set while a write is blocked: when it started waiting fails it.
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteTimeout<I> {
    fn new(io: I) -> Self {
        Self { io, blocked: None }
    }

    /// `pending` from a write: starts (or checks) the clock; an error once it ran out.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let sleep = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.blocked = None;
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read its answers",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match poll {
            Poll::Pending => self.blocked(cx),
            ready => {
                self.blocked = None;
                ready
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteTimeout<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.progress(cx, poll)
    }
}

async fn connection<I>(
    io: I,
    local_ip: Option<IpAddr>,
    shared: Arc<Shared>,
    mut stopping: watch::Receiver<bool>,
    mode: Mode,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let in_progress = Arc::new(AtomicUsize::new(0));
    let service = {
        let in_progress = Arc::clone(&in_progress);
        let stopping = stopping.clone();
        hyper::service::service_fn(move |request| {
            let guard = InProgress::new(&in_progress);
            let shared = Arc::clone(&shared);
            let stopping = stopping.clone();
            async move {
                let answer = if mode == Mode::HealthOnly && !is_healthz(&request) {
                    Answer::error(503, "too many connections; retry in a moment")
                } else {
                    answer(&shared, local_ip, request, stopping).await
                };
                Ok::<_, Infallible>(answer.into_response(guard))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(match mode {
            Mode::Full => HEADER_TIMEOUT,
            Mode::HealthOnly => RESERVE_HEADER_TIMEOUT,
        })
        .max_header_size(MAX_HEADER)
        .keep_alive(mode == Mode::Full)
        // A client that shuts down its writing side after its request (`nc -N`) still gets
        // the answer.
        .half_close(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        finished = conn.as_mut() => {
            if let Err(e) = finished {
                tracing::debug!(error = %e, "control API connection ended with an error");
            }
            return;
        }
        _ = stopping.wait_for(|s| *s) => {}
    }
    // Stopping. A connection between requests, or still sending a request head, is closed now;
    // one with a request in progress finishes it (a body still arriving is cut off by
    // `read_body`), bounded by the accept loop's grace time.
    if in_progress.load(Ordering::SeqCst) == 0 {
        return;
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "control API connection ended with an error");
    }
}

struct Answer {
    status: u16,
    body: String,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            body: value.to_string(),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    /// An answer whose body is JSON text already (checked by whoever made it).
    fn json_text(status: u16, body: String) -> Self {
        Self {
            status,
            body,
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &json!({ "error": message.into() }))
    }

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn into_response(self, in_progress: InProgress) -> Response<Reply> {
        let mut response = Response::new(Reply {
            body: Full::new(Bytes::from(self.body)),
            _in_progress: in_progress,
        });
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        for (name, value) in self.headers {
            match HeaderValue::from_str(&header_safe(&value)) {
                Ok(value) => {
                    headers.append(name, value);
                }
                Err(e) => tracing::debug!(header = name, error = %e, "dropped an answer header"),
            }
        }
        response
    }
}

/// `value` with every character that may not appear in a header value escaped.
fn header_safe(value: &str) -> String {
    if value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return value.to_owned();
    }
    value
        .chars()
        .map(|c| match c {
            ' ' => " ".to_owned(),
            c if c.is_ascii_graphic() => c.to_string(),
            c => c.escape_unicode().to_string(),
        })
        .collect()
}

/// Whether `request` is `GET /healthz`.
fn is_healthz<B>(request: &Request<B>) -> bool {
    request.method() == Method::GET
        && request
            .uri()
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .eq(["healthz"])
}

/// Checks the request (host, origin, token), reads its body, and runs the route on the
/// blocking pool. `GET /healthz` answers right here, so it answers while plugin calls are busy.
async fn answer(
    shared: &Shared,
    local_ip: Option<IpAddr>,
    request: Request<Incoming>,
    stopping: watch::Receiver<bool>,
) -> Answer {
    if let Some(policy) = &shared.policy
        && let Err(answer) = check_host(policy, request.headers(), local_ip)
    {
        return answer;
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let public = match segments.as_slice() {
        ["healthz"] => true,
        ["metrics"] => shared.options.metrics_public,
        _ => false,
    };
    if !public && let Err(answer) = check_token(&shared.options.token, request.headers()) {
        return answer;
    }
    if segments == ["healthz"] && method == Method::GET {
        return healthz(&shared.host);
    }
    let body = if method == Method::POST {
        match read_body(request.into_body(), stopping).await {
            Ok(body) => body,
            Err(answer) => return answer,
        }
    } else {
        Bytes::new()
    };
    let host = shared.host.clone();
    let metrics = Arc::clone(&shared.metrics);
    match tokio::task::spawn_blocking(move || route(&host, &metrics, &method, &path, &body)).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::error!(error = %e, "control API: a request failed inside the worker");
            Answer::error(500, "the request failed inside the worker; see its log")
        }
    }
}

fn check_host(
    policy: &HostPolicy,
    headers: &HeaderMap,
    local_ip: Option<IpAddr>,
) -> Result<(), Answer> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(host), None) => host.to_str().unwrap_or(""),
        (None, _) => {
            return Err(Answer::error(400, "the request has no Host header"));
        }
        (Some(_), Some(_)) => {
            return Err(Answer::error(
                400,
                "the request has more than one Host header",
            ));
        }
    };
    if !policy.host_allowed(host, local_ip) {
        tracing::warn!(host = %header_safe(host), "control API: refused a request for a foreign Host (DNS rebinding?)");
        return Err(Answer::error(
            403,
            format!(
                "Host `{}` is not this worker's address; use localhost, 127.0.0.1, [::1] or the listen address",
                header_safe(host)
            ),
        ));
    }
    for origin in headers.get_all(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !policy.origin_allowed(origin, local_ip) {
            tracing::warn!(origin = %header_safe(origin), "control API: refused a request from a foreign Origin");
            return Err(Answer::error(
                403,
                format!(
                    "requests from the web origin `{}` are not allowed",
                    header_safe(origin)
                ),
            ));
        }
    }
    Ok(())
}

fn check_token(token: &Token, headers: &HeaderMap) -> Result<(), Answer> {
    let unauthorized = |message: &str, challenge: &str| {
        Answer::error(401, message).with_header("WWW-Authenticate", challenge)
    };
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (Some(value), None) => value.as_bytes(),
        (None, _) => {
            return Err(unauthorized(
                "this endpoint needs `Authorization: Bearer <token>`; `worker serve` prints where its token file is when it starts",
                "Bearer realm=\"worker\"",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(unauthorized(
                "send one Authorization header, not several",
                "Bearer realm=\"worker\", error=\"invalid_request\"",
            ));
        }
    };
    let presented = match value.split_at_checked(7) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest.trim_ascii(),
        _ => {
            return Err(unauthorized(
                "the Authorization header must be `Bearer <token>`",
                "Bearer realm=\"worker\", error=\"invalid_request\"",
            ));
        }
    };
    if token.matches(presented) {
        Ok(())
    } else {
        tracing::warn!("control API: refused a request with a wrong token");
        Err(unauthorized(
            "the bearer token is wrong",
            "Bearer realm=\"worker\", error=\"invalid_token\"",
        ))
    }
}

/// Reads a request body of at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`]; cut off when the
/// server stops.
async fn read_body(
    mut body: Incoming,
    mut stopping: watch::Receiver<bool>,
) -> Result<Bytes, Answer> {
    let too_big = || {
        Answer::error(413, format!("the body is larger than {MAX_BODY} bytes"))
            .with_header("Connection", "close")
    };
    if body.size_hint().lower() > MAX_BODY {
        // Read what the client is sending (a bounded amount, while it keeps coming) and throw
        // it away, so that the client gets to read the answer rather than a reset.
        let drain = async {
            let mut seen = 0u64;
            while let Ok(Some(Ok(frame))) = tokio::time::timeout(DRAIN_IDLE, body.frame()).await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > DRAIN_LIMIT {
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(BODY_TIMEOUT, drain) => {}
            _ = stopping.wait_for(|s| *s) => {}
        }
        return Err(too_big());
    }
    let collect = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(body, MAX_BODY as usize).collect(),
    );
    tokio::select! {
        collected = collect => match collected {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
            Ok(Err(e)) => Err(Answer::error(400, format!("could not read the body: {e}"))),
            Err(_) => Err(Answer::error(
                408,
                format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
            )
            .with_header("Connection", "close")),
        },
        _ = stopping.wait_for(|s| *s) => Err(Answer::error(503, "the worker is shutting down")
            .with_header("Connection", "close")),
    }
}

/// The params of a plugin call: the body as JSON text, checked to be one JSON value (without
/// building it) so that a malformed body is the caller's 400, not the plugin's failure; an empty
/// body is no params.
fn read_params(body: &[u8]) -> Result<&str, Answer> {
    let malformed = |e: &dyn std::fmt::Display| {
        Answer::error(
            400,
            format!("the body is not valid JSON ({e}); send the params as one JSON value"),
        )
    };
    let text = std::str::from_utf8(body).map_err(|e| malformed(&e))?;
    if text.trim().is_empty() {
        return Ok("");
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| malformed(&e))?;
    Ok(text)
}

/// A body read by [`read_params`] as a value (no params: `null`).
fn read_value(text: &str) -> Result<Value, Answer> {
    if text.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).map_err(|e| {
        Answer::error(
            400,
            format!("the body is not valid JSON ({e}); send the params as one JSON value"),
        )
    })
}

fn route(
    host: &PluginHost,
    metrics: &crate::metrics::Metrics,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Answer {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let allow = |methods: &str| {
        let mut answer = Answer::error(
            405,
            format!("{method} is not allowed on {path}; use {methods}"),
        );
        answer.headers.push(("Allow", methods.to_owned()));
        answer
    };
    match (segments.as_slice(), method) {
        (["healthz"], &Method::GET) => healthz(host),
        (["healthz"], _) => allow("GET"),
        (["metrics"], &Method::GET) => Answer {
            status: 200,
            body: metrics.encode(),
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            headers: Vec::new(),
        },
        (["metrics"], _) => allow("GET"),
        (["v1", "plugins"], &Method::GET) => Answer::json(
            200,
            &json!({"plugins": host.plugins(), "refused": host.refused()}),
        ),
        (["v1", "plugins"], _) => allow("GET"),
        (["v1", "tasks"], &Method::POST) => {
            let body = match read_params(body).and_then(read_value) {
                Ok(body) => body,
                Err(answer) => return answer,
            };
            let pipeline =
                crate::pipeline::Pipeline::new(host.clone()).with_metrics(metrics.tasks());
            match body {
                Value::Array(tasks) => Answer::json(
                    200,
                    &Value::Array(tasks.into_iter().map(|t| pipeline.run_value(t)).collect()),
                ),
                Value::Object(_) => Answer::json(200, &pipeline.run_value(body)),
                _ => Answer::error(400, "send one task object or an array of tasks"),
            }
        }
        (["v1", "tasks"], _) => allow("POST"),
        (["v1", "store"], &Method::GET) => Answer::json(
            200,
            &json!({"store": host.store().map(plugin_host::store::Store::status)}),
        ),
        (["v1", "store"], _) => allow("GET"),
        (["v1", "hooks"], &Method::GET) => Answer::json(200, &json!(host.hook_points())),
        (["v1", "hooks"], _) => allow("GET"),
        (["v1", "reload"], &Method::POST) => match host.reload_config() {
            Ok(report) => Answer::json(200, &json!(report)),
            Err(e) => Answer::error(422, format!("{e:#}")),
        },
        (["v1", "reload"], _) => allow("POST"),
        (["v1", "plugins", plugin], &Method::GET) => match host.plugin(plugin) {
            Some(info) => Answer::json(200, &json!(info)),
            None => Answer::error(404, format!("no plugin `{plugin}` is loaded")),
        },
        (["v1", "plugins", plugin], &Method::DELETE) => {
            if host.plugin(plugin).is_none() {
                return Answer::error(404, format!("no plugin `{plugin}` is loaded"));
            }
            match host.unload(plugin) {
                Ok(()) => Answer::json(200, &json!({"unloaded": plugin})),
                Err(e) => Answer::error(409, format!("{e:#}")),
            }
        }
        (["v1", "plugins", _], _) => allow("GET, DELETE"),
        (["v1", "plugins", plugin, "reload"], &Method::POST) => {
            if host.plugin(plugin).is_none() {
                return Answer::error(404, format!("no plugin `{plugin}` is loaded"));
            }
            match host.reload(plugin) {
                Ok(info) => Answer::json(200, &json!(info)),
                Err(e) => Answer::error(422, format!("{e:#}")),
            }
        }
        (["v1", "plugins", plugin, "reset"], &Method::POST) => match host.reset(plugin) {
            Ok(()) => match host.plugin(plugin) {
                Some(info) => Answer::json(200, &json!(info)),
                None => Answer::error(404, format!("no plugin `{plugin}` is loaded")),
            },
            Err(e) => Answer::error(404, format!("{e:#}")),
        },
        (["v1", "plugins", plugin, method_name], &Method::POST) => {
            let params = match read_params(body) {
                Ok(params) => params,
                Err(answer) => return answer,
            };
            // Text in, text out: the body goes to the plugin and its answer comes back as
            // the JSON text they are, with no value built on either side.
            match host.call_text(plugin, method_name, params) {
                Ok(answer) => Answer::json_text(200, answer.unwrap_or_else(|| "null".to_owned())),
                Err(e) => {
                    let mut answer = Answer::json(200, &Value::Null);
                    answer
                        .headers
                        .push(("X-Noop-Reason", e.to_string().replace(['\r', '\n'], " ")));
                    answer.headers.push((
                        "X-Noop-Kind",
                        if e.is_missing() { "missing" } else { "failed" }.to_owned(),
                    ));
                    if !e.is_missing() && !matches!(e, PluginCallError::CircuitOpen { .. }) {
                        tracing::warn!(plugin, method = method_name, error = %e, "plugin call failed; answering null");
                    }
                    answer
                }
            }
        }
        (["v1", "plugins", _, _], _) => allow("POST"),
        _ => Answer::error(
            404,
            format!("no such endpoint: {method} {path}; see /v1/plugins, /healthz, /metrics"),
        ),
    }
}

/// `GET /healthz`: `ok`, or `degraded` naming the plugins whose breaker is open or that have a
/// call past its deadline. 200 either way: the worker itself answers (a restart would lose what
/// the plugins learned since the last checkpoint); a probe that wants a restart matches on the
/// status in the body.
fn healthz(host: &PluginHost) -> Answer {
    let degraded = host.degraded();
    let plugins = host.plugins().len();
    Answer::json(
        200,
        &if degraded.is_empty() {
            json!({"status": "ok", "plugins": plugins})
        } else {
            json!({"status": "degraded", "plugins": plugins, "degraded": degraded})
        },
    )
}

/// Serves one connection on which a client sends `request` and then closes its writing side,
/// exactly as a TCP connection to `127.0.0.1:7878` is served (hyper's parser, the `Host`,
/// `Origin` and token checks, the body limits, the routes); returns the bytes the server wrote.
/// The fuzz target `http_request` and its seed test drive it.
///
/// # Panics
///
/// The server does not close the connection within 30 s after the client stopped sending: a
/// hang, which a fuzzer must report.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn serve_bytes(
    runtime: &tokio::runtime::Runtime,
    host: PluginHost,
    token: Token,
    request: &[u8],
) -> Vec<u8> {
    use std::io::{Read as _, Write as _};
    use std::net::Shutdown;

    const HANG: Duration = Duration::from_secs(30);
    let local: std::net::SocketAddr = ([127, 0, 0, 1], 7878).into();
    let shared = Arc::new(Shared {
        metrics: Arc::new(crate::metrics::Metrics::new(host.clone())),
        host,
        options: ControlOptions::new(token),
        policy: Some(HostPolicy::new("127.0.0.1:7878", local)),
    });
    let Ok((mut client, server)) = std::os::unix::net::UnixStream::pair() else {
        return Vec::new();
    };
    if server.set_nonblocking(true).is_err() || client.set_read_timeout(Some(HANG * 2)).is_err() {
        return Vec::new();
    }
    std::thread::scope(|scope| {
        let answer = scope.spawn(move || {
            // A write error means the server closed early: what it wrote is still readable.
            let _ = client.write_all(request);
            let _ = client.shutdown(Shutdown::Write);
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out);
            out
        });
        let served = runtime.block_on(async {
            let Ok(server) = tokio::net::UnixStream::from_std(server) else {
                return Ok(());
            };
            let (_stop, stopping) = watch::channel(false);
            tokio::time::timeout(
                HANG,
                connection(server, Some(local.ip()), shared, stopping, Mode::Full),
            )
            .await
        });
        let out = answer
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        assert!(
            served.is_ok(),
            "the control API hung: the connection was still open {HANG:?} after the client stopped sending"
        );
        out
    })
}

#[cfg(test)]
mod tests {
    /// The README documents the answer to a call of an unknown plugin as the no-op it is
    /// (`200 null` with `X-Noop-Reason`, tested end to end in `tests/tests/e2e/serve.rs`), not
    /// as a 404.
    #[test]
    fn the_readme_documents_the_no_op_answer() {
        let readme = include_str!("../../../README.md");
        let text = readme.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            text.contains("answers `200` with `null` when the call answered nothing, the plugin or the method missing included"),
            "README.md must document POST /v1/plugins/{{plugin}}/{{method}} for an unknown plugin as 200 null with X-Noop-Reason"
        );
        assert!(
            !text.contains("404 for an unknown endpoint or plugin,"),
            "README.md still says 404 for any unknown plugin"
        );
    }
}
