//! The control API: HTTP with JSON bodies, on loopback by default.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /healthz` | `{"status": "ok", "plugins": N}` |
//! | `GET /metrics` | Prometheus text: calls, errors, panics, latency per plugin |
//! | `GET /v1/plugins` | `{"plugins": [...], "refused": [...]}` |
//! | `GET /v1/plugins/{plugin}` | one loaded plugin |
//! | `POST /v1/plugins/{plugin}/{method}` | body: the params (empty = `null`); answer: the result, or `null` for a no-op, with the reason in the `X-Noop-Reason` header |
//! | `POST /v1/plugins/{plugin}/reload` | reloads; the plugin, or an error (the old generation keeps serving) |
//! | `DELETE /v1/plugins/{plugin}` | unloads |
//! | `POST /v1/reload` | reads the configuration again and loads new files |
//! | `GET /v1/hooks` | every hook point with its subscribers in execution order |
//! | `POST /v1/tasks` | body: one task or an array of tasks; answer: the result record(s), as `worker run` writes them |
//!
//! A bad request gets a 4xx answer with `{"error": "..."}` saying what was wrong. A plugin method
//! named `reload` cannot be called through this API (the route reloads the plugin).

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::PluginHost;

/// Largest request body accepted.
const MAX_BODY: u64 = 1024 * 1024;

/// Threads serving requests.
const WORKERS: usize = 4;

/// The running control API server.
pub struct ControlServer {
    server: Arc<Server>,
    workers: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ControlServer {
    /// Listens on `addr` (for example `127.0.0.1:7878`; port 0 picks a free port) and serves
    /// the control API for `host`.
    ///
    /// # Errors
    ///
    /// The address cannot be bound.
    pub fn start(host: PluginHost, addr: &str) -> anyhow::Result<Self> {
        let server = Server::http(addr)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("listening on {addr}"))?;
        let local = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow!("listening on {addr}: not an IP address"))?;
        let server = Arc::new(server);
        let mut workers = Vec::with_capacity(WORKERS);
        for i in 0..WORKERS {
            let server = Arc::clone(&server);
            let host = host.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("control-api-{i}"))
                    .spawn(move || {
                        // `recv` fails once `unblock` was called: the server is stopping.
                        while let Ok(request) = server.recv() {
                            handle(&host, request);
                        }
                    })?,
            );
        }
        Ok(Self {
            server,
            workers,
            addr: local,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting requests and waits for the requests in progress to finish.
    pub fn stop(self) {
        for _ in &self.workers {
            self.server.unblock();
        }
        for worker in self.workers {
            let _ = worker.join();
        }
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

    fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &json!({ "error": message.into() }))
    }
}

fn handle(host: &PluginHost, mut request: Request) {
    let answer = route(host, &mut request);
    let mut response = Response::from_string(answer.body).with_status_code(answer.status);
    let mut headers = vec![("Content-Type", answer.content_type.to_owned())];
    headers.extend(answer.headers);
    for (name, value) in headers {
        if let Ok(header) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(header);
        }
    }
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "could not send the answer");
    }
}

fn read_params(request: &mut Request) -> Result<Value, Answer> {
    if request
        .body_length()
        .is_some_and(|len| len as u64 > MAX_BODY)
    {
        return Err(Answer::error(
            413,
            format!("the body is larger than {MAX_BODY} bytes"),
        ));
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| Answer::error(400, format!("could not read the body: {e}")))?;
    if body.len() as u64 > MAX_BODY {
        return Err(Answer::error(
            413,
            format!("the body is larger than {MAX_BODY} bytes"),
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| {
        Answer::error(
            400,
            format!("the body is not valid JSON ({e}); send the params as one JSON value"),
        )
    })
}

fn route(host: &PluginHost, request: &mut Request) -> Answer {
    let url = request.url().to_owned();
    let path = url.split(['?', '#']).next().unwrap_or("");
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = request.method().clone();
    let allow = |methods: &str| {
        let mut answer = Answer::error(
            405,
            format!("{method} is not allowed on {path}; use {methods}"),
        );
        answer.headers.push(("Allow", methods.to_owned()));
        answer
    };
    match (segments.as_slice(), &method) {
        (["healthz"], Method::Get) => Answer::json(
            200,
            &json!({"status": "ok", "plugins": host.plugins().len()}),
        ),
        (["healthz"], _) => allow("GET"),
        (["metrics"], Method::Get) => Answer {
            status: 200,
            body: metrics(host),
            content_type: "text/plain; version=0.0.4",
            headers: Vec::new(),
        },
        (["metrics"], _) => allow("GET"),
        (["v1", "plugins"], Method::Get) => Answer::json(
            200,
            &json!({"plugins": host.plugins(), "refused": host.refused()}),
        ),
        (["v1", "plugins"], _) => allow("GET"),
        (["v1", "tasks"], Method::Post) => {
            let body = match read_params(request) {
                Ok(body) => body,
                Err(answer) => return answer,
            };
            let pipeline = crate::pipeline::Pipeline::new(host.clone());
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
        (["v1", "hooks"], Method::Get) => Answer::json(200, &json!(host.hook_points())),
        (["v1", "hooks"], _) => allow("GET"),
        (["v1", "reload"], Method::Post) => match host.reload_config() {
            Ok(report) => Answer::json(200, &json!(report)),
            Err(e) => Answer::error(422, format!("{e:#}")),
        },
        (["v1", "reload"], _) => allow("POST"),
        (["v1", "plugins", plugin], Method::Get) => match host.plugin(plugin) {
            Some(info) => Answer::json(200, &json!(info)),
            None => Answer::error(404, format!("no plugin `{plugin}` is loaded")),
        },
        (["v1", "plugins", plugin], Method::Delete) => {
            if host.plugin(plugin).is_none() {
                return Answer::error(404, format!("no plugin `{plugin}` is loaded"));
            }
            match host.unload(plugin) {
                Ok(()) => Answer::json(200, &json!({"unloaded": plugin})),
                Err(e) => Answer::error(409, format!("{e:#}")),
            }
        }
        (["v1", "plugins", _], _) => allow("GET, DELETE"),
        (["v1", "plugins", plugin, "reload"], Method::Post) => {
            if host.plugin(plugin).is_none() {
                return Answer::error(404, format!("no plugin `{plugin}` is loaded"));
            }
            match host.reload(plugin) {
                Ok(info) => Answer::json(200, &json!(info)),
                Err(e) => Answer::error(422, format!("{e:#}")),
            }
        }
        (["v1", "plugins", plugin, method_name], Method::Post) => {
            let params = match read_params(request) {
                Ok(params) => params,
                Err(answer) => return answer,
            };
            match host.call(plugin, method_name, &params) {
                Ok(answer) => Answer::json(200, &answer.unwrap_or(Value::Null)),
                Err(e) => {
                    let mut answer = Answer::json(200, &Value::Null);
                    answer
                        .headers
                        .push(("X-Noop-Reason", e.to_string().replace(['\r', '\n'], " ")));
                    if !e.is_missing() {
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

/// One metric family: name, type, help, and how to read it off a plugin.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::LoadedPlugin) -> f64,
);

/// Per-plugin statistics in the Prometheus text format.
fn metrics(host: &PluginHost) -> String {
    let plugins = host.plugins();
    let mut out = String::new();
    let families: [Family; 6] = [
        (
            "plugin_calls_total",
            "counter",
            "Calls that reached the plugin.",
            |p| p.stats.calls as f64,
        ),
        (
            "plugin_errors_total",
            "counter",
            "Calls that ended in an error.",
            |p| p.stats.errors as f64,
        ),
        (
            "plugin_panics_total",
            "counter",
            "Calls that panicked (caught).",
            |p| p.stats.panics as f64,
        ),
        (
            "plugin_latency_seconds_total",
            "counter",
            "Time spent in plugin calls.",
            |p| p.stats.total_latency.as_secs_f64(),
        ),
        (
            "plugin_latency_seconds_max",
            "gauge",
            "The longest plugin call.",
            |p| p.stats.max_latency.as_secs_f64(),
        ),
        (
            "plugin_generation",
            "gauge",
            "Generation number of the loaded plugin.",
            |p| p.generation as f64,
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for plugin in &plugins {
            let _ = writeln!(
                out,
                "{name}{{plugin=\"{}\"}} {}",
                escape_label(&plugin.name),
                value(plugin)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP plugin_refused_files Files in the plugins directory that were refused."
    );
    let _ = writeln!(out, "# TYPE plugin_refused_files gauge");
    let _ = writeln!(out, "plugin_refused_files {}", host.refused().len());
    out
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
