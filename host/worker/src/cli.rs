//! The `worker` command line. `main.rs` only calls [`main`]; everything else is here so that
//! tests and embedders can reach it.

use plugin_host::text::EscapePath;
use std::io::{IsTerminal as _, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::Value;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::Worker;
use crate::http::{ControlOptions, ControlServer, Token};
use crate::state_lock::StateLock;
use plugin_host::text::EscapeControl;
use plugin_host::watch::{WatchOptions, Watcher};
use plugin_host::{LoadedPlugin, PluginHost, Refusal};

/// The worker: runs native plugins from a directory.
///
/// Plugins are `cdylib` crates built against `plugin-api`; their built `.so` files go into the
/// plugins directory, optionally with a `plugins.json` that enables, disables and configures them
/// by plugin name. A plugin that is missing, broken or panicking never stops the worker: the call
/// that reached it answers `null`.
#[derive(Debug, Parser)]
#[command(name = "worker", version, max_term_width = 100)]
pub struct Cli {
    /// Directory holding the plugin files (*.so) and their configuration (plugins.json).
    #[arg(long, global = true, value_name = "DIR", default_value = "plugins")]
    pub plugins: PathBuf,

    /// Plugin configuration file [default: DIR/plugins.json].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where plugin state is kept between runs (one JSON file per plugin): restored when a
    /// plugin loads, saved when it unloads. Used by run, serve and call.
    #[arg(long, global = true, value_name = "DIR", default_value = "state")]
    pub state_dir: PathBuf,

    /// The store of the plugins' shared statistics and decisions: sqlite://PATH (the processes
    /// of one machine), redis://HOST:PORT/DB (a fleet), or none (each plugin keeps its own state
    /// file) [default: `store` in plugins.json, else sqlite://STATE_DIR/store.db].
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,

    /// How often additions are flushed to the store and reads refreshed, in milliseconds
    /// [default: `storeFlushMs` in plugins.json, else 1000].
    #[arg(long, global = true, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub store_flush_ms: Option<u64>,

    /// Accept plugin files and a plugins directory that other users can write (group- or
    /// other-writable, or owned by a user other than the worker's or root), with a warning.
    /// Insecure: whoever can write a plugin runs code as the worker. For development setups
    /// only.
    #[arg(long, global = true)]
    pub insecure_permissions: bool,

    /// Largest plugin file accepted, in MiB; a bigger file is refused without being read.
    #[arg(
        long,
        global = true,
        value_name = "MIB",
        default_value_t = 256,
        value_parser = clap::value_parser!(u64).range(1..=1 << 20)
    )]
    pub max_plugin_size_mb: u64,

    /// The deadline of one plugin call, in milliseconds, for plugins whose plugins.json entry
    /// sets no `timeoutMs`. In-process code cannot be interrupted: a call past its deadline is
    /// logged and counted, and opens the plugin's circuit breaker so no new call enters it.
    #[arg(
        long,
        global = true,
        value_name = "MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub call_timeout_ms: u64,

    /// Time about one plugin call in N, at random gaps, of each method and hook point
    /// (fire-and-forget deliveries included; N a power of two, 1 to 65536): counts stay exact,
    /// latency histograms and totals are estimated from the calls timed (each standing for N),
    /// and the maximum takes every call timed and any other longer than about 100 ms. 1 times
    /// every call [default: `callTimingSample` in plugins.json, else 16].
    #[arg(long, global = true, value_name = "N", value_parser = timing_sample)]
    pub call_timing_sample: Option<u32>,

    /// Where plugins whose plugins.json entry sets no `isolation` run: `in-process` (the
    /// default: native speed, but a crash of the plugin is a crash of the worker) or `process`
    /// (each in a child process of its own, restarted with its last state when it crashes or
    /// overruns its deadline).
    #[arg(long, global = true, value_name = "MODE", default_value = "in-process")]
    pub isolation: plugin_host::Isolation,

    /// What to log on stderr: a level (error, warn, info, debug, trace) or per-target filters
    /// such as `warn,plugin_host=debug`. A plugin's own events have its name as their target:
    /// `warn,rate_limiter=off` silences plugin `rate_limiter`, `warn,echo=debug` raises `echo`.
    /// Empty means the default.
    #[arg(
        long,
        global = true,
        value_name = "FILTER",
        env = "WORKER_LOG",
        default_value = "warn"
    )]
    pub log: String,

    /// How log lines are written on stderr: `text` for people, `json` for log collectors (one
    /// JSON object per event: timestamp, level, target, fields).
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        env = "WORKER_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--call-timing-sample`: a power of two from 1 to 65536.
fn timing_sample(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(sample) if plugin_host::valid_timing_sample(sample) => Ok(sample),
        _ => Err(format!(
            "`{text}` is not a power of two from 1 to {}; give 1 to time every call, or 16 (the default) to time one in 16",
            plugin_host::MAX_TIMING_SAMPLE
        )),
    }
}

/// The format of the log lines (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// The worker's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the loaded plugins (name, version, file, description, methods) and every refused
    /// file with the reason. Exits 0 even when files were refused.
    List {
        /// Print JSON instead of text: {"plugins": [...], "refused": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// List every hook point with its payload, its writable fields and its subscribers in
    /// execution order (mode, priority, name), after configuration.
    Hooks {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the long-running worker: load the plugins, watch the directory (a new file loads, a
    /// removed one unloads, a changed one reloads with its state carried over, a changed
    /// plugins.json applies), and serve the control API.
    ///
    /// SIGHUP rescans (the configuration and every file not loaded). SIGINT and SIGTERM shut
    /// down gracefully: requests in progress finish, each plugin's state is saved to the state
    /// directory, and plugins unload in reverse load order, within --shutdown-timeout (a plugin
    /// stuck in a call is abandoned and the exit status is 1). The state is also saved every
    /// --checkpoint-interval seconds and after each reload, and restored at the next start.
    Serve {
        /// Address of the control API (HTTP, JSON): HOST:PORT, or unix:PATH for a Unix socket
        /// (created with mode 0600). Port 0 picks a free port; the address is printed on stdout.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7878")]
        listen: String,
        /// File holding the control API's bearer token [default: STATE_DIR/control-token,
        /// created with a random token and mode 0600 on first start].
        #[arg(long, value_name = "FILE", env = "WORKER_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Answer GET /metrics without the token (for scrapers that cannot send one).
        #[arg(long)]
        metrics_public: bool,
        /// Do not watch the plugins directory (SIGHUP and POST /v1/reload still rescan).
        #[arg(long)]
        no_watch: bool,
        /// Save every plugin's state to the state directory every SECONDS (and after each
        /// reload), so a worker killed outright restarts with at most this much lost; 0 = only
        /// at reloads and shutdown.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        checkpoint_interval: u64,
        /// SIGTERM and SIGINT end the worker within SECONDS, whatever the plugins do: plugins
        /// that answer are saved; a plugin stuck in a call keeps its last checkpoint, and the
        /// exit status is then 1 with the log naming what was abandoned.
        #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        shutdown_timeout: u64,
    },
    /// Process JSON-lines tasks and write one JSON-lines result per task, then a summary per
    /// task type, handler and variant, and per plugin.
    ///
    /// A task is {"id", "type", "input", "reference"?, "meta"?}. A result has id, type, handler,
    /// experiment and variant (when one applied), role, score, latency_ms, total_ms and output; a
    /// line that is not a task gives an error record naming the line, and processing goes on.
    /// Results go to --out, or to stdout (the summary then goes to stderr). Plugin state is
    /// kept in --state-dir across runs.
    Run {
        /// The tasks: a JSON-lines file, or `-` for stdin.
        #[arg(long, value_name = "FILE|-")]
        tasks: String,
        /// Where to write the results [default: stdout].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The longest task line read, in bytes: a longer line gets an error record and is
        /// skipped without being held in memory whole.
        #[arg(long, value_name = "BYTES", default_value_t = crate::pipeline::DEFAULT_MAX_LINE_BYTES as u64,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_line_bytes: u64,
        /// Also write the summary tables as JSON to FILE: {"rows", "completed", "failed",
        /// "blocked", "bad_lines", "elapsed_s", "plugins", "experiments"}.
        #[arg(long, value_name = "FILE")]
        summary_json: Option<PathBuf>,
        /// Exit 1 when any task failed, was blocked or was a bad line (the summary says how
        /// many), instead of 0.
        #[arg(long)]
        strict: bool,
    },
    /// Print a shell completion script for the worker on stdout.
    ///
    /// bash: `worker completions bash > ~/.local/share/bash-completion/completions/worker`;
    /// zsh: `worker completions zsh > ~/.zfunc/_worker` (with `fpath+=~/.zfunc` before
    /// `compinit`); fish: `worker completions fish > ~/.config/fish/completions/worker.fish`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Plugins quarantined because they brought the worker down (a crash record in
    /// --state-dir names them): they run isolated until cleared.
    Quarantine {
        /// What to do.
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// The shared store (see --store).
    Store {
        /// What to show.
        #[command(subcommand)]
        action: StoreCommand,
    },
    /// Print the fleet-wide experiment table from the store: every worker's assignments and
    /// outcomes, with each variant's mean, its 95% interval, and its difference from the
    /// control with the interval and p-value.
    Report {
        /// Print the `experiment.stats` JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Write a new plugin crate NAME: a Cargo.toml (cdylib, with a plugin-api dependency that
    /// resolves from there) and a src/lib.rs with one typed method, one hook, state and a
    /// Harness test. It builds with `cargo build --release` and loads as it is.
    New {
        /// The plugin's name (also the crate's): lowercase letters, digits, `-` and `_`.
        name: String,
        /// Where to write it [default: ./NAME]; must be absent or empty.
        #[arg(long, value_name = "DIR")]
        path: Option<PathBuf>,
    },
    /// Print the bundled example task set (JSON lines), generated deterministically.
    ExampleTasks {
        /// How many tasks.
        #[arg(long, default_value_t = 1200)]
        count: usize,
        /// The seed: the same seed always gives the same tasks.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Call one method of one plugin and print its JSON answer on stdout. Plugin state comes
    /// from and goes back to --state-dir, so `call` sees what `run` learned.
    ///
    /// Prints `null` when the call answered nothing (the plugin or method is missing, failed or
    /// panicked); the reason goes to stderr. Exits 0 in both cases (with --strict: 3 when the
    /// plugin or method is missing, 4 when the plugin failed), 2 on malformed PARAMS_JSON.
    Call {
        /// The plugin's name (from its manifest, see `worker list`).
        plugin: String,
        /// The method's name.
        method: String,
        /// The params, one JSON value (usually an object) [default: null].
        #[arg(value_name = "PARAMS_JSON")]
        params: Option<String>,
        /// Exit non-zero when the call answered nothing: 3 when the plugin or the method is
        /// missing, 4 when the plugin failed (an error, invalid params, a panic, an answer that is
        /// not JSON).
        #[arg(long)]
        strict: bool,
        /// Call through the control API of the worker serving at URL (http://HOST:PORT or
        /// unix:PATH, as `worker serve` prints it) instead of loading the plugins here: the way
        /// to call while `serve` holds the state directory.
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// With --server: the file holding the control API token [default:
        /// STATE_DIR/control-token].
        #[arg(
            long,
            value_name = "FILE",
            env = "WORKER_TOKEN_FILE",
            requires = "server"
        )]
        token_file: Option<PathBuf>,
    },
}

/// What `worker store` shows.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// The backend, whether it answers, the last flush, pending additions, plugins holding
    /// some, and errors.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the worker with the process's arguments; returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // An empty filter (`Environment=WORKER_LOG=` in a systemd unit) means the default.
    let log = if cli.log.trim().is_empty() {
        "warn"
    } else {
        cli.log.as_str()
    };
    let filter = match parse_log_filter(log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!(
                "error: invalid --log filter `{}`: {e}; use a level (error, warn, info, debug, trace, off) or comma-separated TARGET=LEVEL pairs such as `warn,plugin_host=debug`",
                plugin_host::text::escape_control(&cli.log)
            );
            return ExitCode::from(2);
        }
    };
    let (text, json) = match cli.log_format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(false)
                    .with_span_list(false),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    let mut out = Output {
        inner: std::io::stdout().lock(),
        closed: false,
    };
    match run(cli, &mut out) {
        Ok(code) => code,
        // The reader of the output went away (`worker report | head -1`): what it read is
        // what it wanted, as with any Unix tool.
        Err(_) if out.closed => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command's output, which notes whether its reader went away (a closed pipe).
struct Output<W> {
    inner: W,
    closed: bool,
}

impl<W: Write> Output<W> {
    fn noted<T>(&mut self, result: std::io::Result<T>) -> std::io::Result<T> {
        if result
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        {
            self.closed = true;
        }
        result
    }
}

impl<W: Write> Write for Output<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let result = self.inner.write(buf);
        self.noted(result)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let result = self.inner.flush();
        self.noted(result)
    }
}

/// Parses a `--log` filter: comma-separated directives, each a level, or `TARGET=LEVEL`.
///
/// Stricter than [`Targets`]' own parser, which takes any bare word as a target to log at
/// every level: a misspelt level (`warnn`) would silently switch every log line off.
fn parse_log_filter(text: &str) -> Result<Targets, String> {
    const LEVELS: [&str; 12] = [
        "off", "error", "warn", "info", "debug", "trace", "0", "1", "2", "3", "4", "5",
    ];
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word));
    let is_target = |word: &str| {
        !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_:-.".contains(c))
    };
    for directive in text.split(',') {
        let directive = directive.trim();
        let valid = match directive.split_once('=') {
            Some((target, level)) => is_target(target.trim()) && is_level(level.trim()),
            None => is_level(directive),
        };
        if !valid {
            return Err(format!(
                "`{}` is neither a level nor TARGET=LEVEL",
                plugin_host::text::escape_control(directive)
            ));
        }
    }
    text.parse::<Targets>().map_err(|e| e.to_string())
}

/// Runs one parsed command, writing its output to `out`.
///
/// # Errors
///
/// The plugins directory or the configuration cannot be read, or `out` cannot be written.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let mut store = None;
    let result = run_command(cli, out, &mut store);
    // Plugins may hold the store past the host's shutdown (threads of the control API): the
    // last flush happens here, after the plugins' last additions, before the process exits.
    if let Some(store) = store {
        store.close();
    }
    result
}

fn run_command(
    cli: Cli,
    out: &mut dyn Write,
    opened: &mut Option<plugin_host::store::Store>,
) -> anyhow::Result<ExitCode> {
    // Malformed params are a usage error, reported before anything is loaded.
    let params = match &cli.command {
        Command::Call {
            params: Some(text), ..
        } => match serde_json::from_str::<Value>(text) {
            Ok(params) => params,
            Err(e) => {
                eprintln!(
                    "error: PARAMS_JSON is not valid JSON ({e}); pass one JSON value, e.g. '{{\"key\": \"value\"}}'"
                );
                return Ok(ExitCode::from(2));
            }
        },
        _ => Value::Null,
    };
    if let Command::Completions { shell } = &cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        // Generated into memory: clap_complete panics when its writer fails (a closed pipe).
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut command, "worker", &mut script);
        out.write_all(&script)
            .context("writing the completion script")?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Quarantine { action } = &cli.command {
        return quarantine(&cli.state_dir, action, out);
    }
    if let Command::New { name, path } = &cli.command {
        let dir = crate::scaffold::new_plugin(name, path.as_deref())?;
        let lib = name.replace('-', "_");
        writeln!(
            out,
            "created plugin crate `{name}` in {}\nbuild it:  (cd {} && cargo build --release)\nload it:   cp {}/target/release/lib{lib}.so {}/",
            EscapePath(&dir),
            EscapePath(&dir),
            EscapePath(&dir),
            EscapePath(&cli.plugins),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::ExampleTasks { count, seed } = &cli.command {
        for task in crate::pipeline::example_tasks(*count, *seed) {
            writeln!(out, "{task}")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Call {
        plugin,
        method,
        strict,
        server: Some(server),
        token_file,
        ..
    } = &cli.command
    {
        let token_file = token_file
            .clone()
            .unwrap_or_else(|| cli.state_dir.join("control-token"));
        let token = Token::from_file(&token_file)?;
        // The server's own deadline, and time to spare for the exchange.
        let timeout = Duration::from_millis(cli.call_timeout_ms) + Duration::from_secs(30);
        let remote = crate::remote::call(server, token.secret(), plugin, method, &params, timeout)?;
        let code = match (&remote.noop_reason, strict, remote.missing) {
            (None, _, _) | (Some(_), false, _) => ExitCode::SUCCESS,
            (Some(_), true, true) => ExitCode::from(EXIT_CALL_MISSING),
            (Some(_), true, false) => ExitCode::from(EXIT_CALL_FAILED),
        };
        if let Some(reason) = &remote.noop_reason {
            eprintln!("note: the call answered nothing: {}", EscapeControl(reason));
        }
        writeln!(out, "{}", serde_json::to_string(&remote.answer)?)
            .context("writing the answer")?;
        return Ok(code);
    }
    let mut builder = crate::hooks::host_builder(&cli.plugins)
        .with_insecure_permissions(cli.insecure_permissions)
        .with_max_plugin_size(cli.max_plugin_size_mb << 20)
        .with_call_timeout(std::time::Duration::from_millis(cli.call_timeout_ms))
        .with_isolation(cli.isolation);
    if let Some(sample) = cli.call_timing_sample {
        builder = builder.with_call_timing_sample(sample);
    }
    if let Some(config) = &cli.config {
        // Only the default path may be absent: a file named on the command line must exist.
        match std::fs::metadata(config) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "the configuration file {} given with --config does not exist; give an existing file, or leave --config out to use DIR/plugins.json (which may be absent)",
                config.display()
            ),
            _ => {}
        }
        builder = builder.with_config_file(config);
    }
    // `list` and `hooks` only read: they never create or touch the state directory. `call`
    // can do without one for a plugin that keeps no state (checked before the call).
    match cli.command {
        Command::Run { .. } | Command::Serve { .. } => {
            builder = builder.with_state_dir(&cli.state_dir);
        }
        Command::Call { .. } => builder = builder.with_state_dir_best_effort(&cli.state_dir),
        _ => {}
    }
    let store = if matches!(
        cli.command,
        Command::Run { .. }
            | Command::Serve { .. }
            | Command::Call { .. }
            | Command::Store { .. }
            | Command::Report { .. }
    ) {
        let config_file = cli
            .config
            .clone()
            .unwrap_or_else(|| cli.plugins.join(plugin_host::config::CONFIG_FILE_NAME));
        match crate::fleet::open_store(
            cli.store.as_deref(),
            cli.store_flush_ms,
            &config_file,
            &cli.state_dir,
        ) {
            Ok(store) => store,
            // `call` answers without a store as it answers without a state directory: a
            // plugin that needs neither still answers.
            Err(e) if matches!(cli.command, Command::Call { .. }) => {
                tracing::warn!(error = %format!("{e:#}"), "no store for this call: plugins see none");
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    opened.clone_from(&store);
    if let (Some(store), Command::Run { .. } | Command::Serve { .. }) = (&store, &cli.command) {
        // Seen by `worker store status` anywhere in the fleet.
        store.publish_as_worker();
    }
    if let Command::Store {
        action: StoreCommand::Status { json },
    } = &cli.command
    {
        // A failure when the store or the workers' statuses cannot be read: a health check.
        let healthy = crate::fleet::status(store.as_ref(), *json, out)?;
        return Ok(if healthy {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if let Some(store) = &store {
        builder = builder.with_store(store.clone());
    }
    if let Command::Serve { listen, .. } = &cli.command {
        // Said before any plugin loads.
        crate::http::check_listen_address(listen)?;
        if !cli.plugins.exists() {
            std::fs::create_dir_all(&cli.plugins).with_context(|| {
                format!(
                    "creating the plugins directory {}",
                    EscapePath(&cli.plugins)
                )
            })?;
            tracing::info!(dir = %EscapePath(&cli.plugins), "created the plugins directory");
        }
    }
    let token_given = matches!(
        cli.command,
        Command::Serve {
            token_file: Some(_),
            ..
        }
    );
    builder = builder.with_quarantine_dir(&cli.state_dir);
    let host = builder.build()?;
    // One writer per state directory, taken before any plugin loads (and restores its state).
    let mut state_lock = match &cli.command {
        Command::Run { .. } => Some(StateLock::take(&cli.state_dir, "run")?),
        Command::Serve { .. } => Some(StateLock::take(&cli.state_dir, "serve")?),
        Command::Call { .. } if host.state_dir_error().is_none() => {
            Some(StateLock::take(&cli.state_dir, "call")?)
        }
        _ => None,
    };
    if matches!(
        cli.command,
        Command::Run { .. } | Command::Serve { .. } | Command::Call { .. }
    ) {
        // Before any plugin runs: a crash from here on leaves a record naming the plugin.
        if let Err(e) = plugin_host::crash::record_crashes_in(&cli.state_dir) {
            tracing::warn!(error = %format!("{e:#}"), "crash records off: a plugin that crashes the worker will not be quarantined");
        }
    }
    match (&cli.command, host.scan()) {
        (_, Ok(_)) => {}
        // The task pipeline runs on its defaults without any plugin.
        (Command::Run { .. }, Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "no plugins; running on the defaults");
        }
        (_, Err(e)) => return Err(e.into()),
    }
    crate::config_check::warn_unknown_entries(&host);
    match cli.command {
        Command::ExampleTasks { .. }
        | Command::Completions { .. }
        | Command::Quarantine { .. }
        | Command::Store { .. }
        | Command::New { .. } => {}
        Command::Report { json } => {
            crate::fleet::report(&host, json, out)?;
            host.shutdown();
        }
        Command::Run {
            tasks,
            out: out_file,
            max_line_bytes,
            summary_json,
            strict,
        } => {
            let options = RunOptions {
                tasks,
                out_file,
                max_line_bytes: usize::try_from(max_line_bytes).unwrap_or(usize::MAX),
                summary_json,
                strict,
            };
            return run_tasks(&host, &options, out);
        }
        Command::Serve {
            listen,
            no_watch,
            token_file,
            metrics_public,
            checkpoint_interval,
            shutdown_timeout,
        } => {
            let token_file = token_file.unwrap_or_else(|| cli.state_dir.join("control-token"));
            let serving = Serving {
                listen,
                watch: !no_watch,
                token_file,
                user_token: token_given,
                metrics_public,
                checkpoint_interval: Duration::from_secs(checkpoint_interval),
                shutdown_timeout: Duration::from_secs(shutdown_timeout),
            };
            return serve(&host, serving, state_lock.as_mut(), out);
        }
        Command::List { json } => {
            let plugins = host.plugins();
            let refused = host.refused();
            if json {
                let report = serde_json::json!({ "plugins": plugins, "refused": refused });
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                write_list(out, &host, &plugins, &refused)?;
            }
        }
        Command::Hooks { json } => {
            let points = host.hook_points();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&points)?)?;
            } else {
                for point in points {
                    writeln!(out, "{}  {}", point.name, point.description)?;
                    let fields: Vec<&str> = point.payload.iter().map(|f| f.name).collect();
                    writeln!(out, "    payload: {{{}}}", fields.join(", "))?;
                    if !point.writable.is_empty() {
                        writeln!(out, "    writable: {}", point.writable.join(", "))?;
                    }
                    if point.subscribers.is_empty() {
                        writeln!(out, "    (no subscribers)")?;
                    }
                    for (i, s) in point.subscribers.iter().enumerate() {
                        writeln!(
                            out,
                            "    {}. {} ({}) {} priority {}",
                            i + 1,
                            EscapeControl(&s.name),
                            s.kind,
                            s.mode,
                            s.priority
                        )?;
                    }
                }
            }
        }
        Command::Call {
            plugin,
            method,
            strict,
            ..
        } => {
            if let Some(error) = host.state_dir_error()
                && host.keeps_state(&plugin)
            {
                anyhow::bail!(
                    "plugin `{}` keeps state, and {error}; without it the call would run on fresh state and lose what it changes",
                    EscapeControl(&plugin)
                );
            }
            let (answer, code) = match host.call(&plugin, &method, &params) {
                Ok(answer) => (answer, ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("note: the call answered nothing: {e}");
                    let code = match (strict, e.is_missing()) {
                        (false, _) => ExitCode::SUCCESS,
                        (true, true) => ExitCode::from(EXIT_CALL_MISSING),
                        (true, false) => ExitCode::from(EXIT_CALL_FAILED),
                    };
                    (None, code)
                }
            };
            let answer = answer.unwrap_or(Value::Null);
            writeln!(out, "{}", serde_json::to_string(&answer)?).context("writing the answer")?;
            // Saves what the call changed (an outcome recorded, say) for the next command.
            host.shutdown();
            return Ok(code);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_list(
    out: &mut dyn Write,
    host: &PluginHost,
    plugins: &[LoadedPlugin],
    refused: &[Refusal],
) -> anyhow::Result<()> {
    writeln!(
        out,
        "{}: {} plugin(s) loaded, {} file(s) refused",
        EscapePath(host.plugins_dir()),
        plugins.len(),
        refused.len()
    )?;
    for plugin in plugins {
        writeln!(out)?;
        // Everything but the counts comes from the plugin (its manifest) or a file name:
        // control characters are escaped, so no line can be forged and no terminal driven.
        writeln!(
            out,
            "{} {}  ({})",
            EscapeControl(&plugin.name),
            EscapeControl(&plugin.version),
            EscapePath(&plugin.file)
        )?;
        if !plugin.description.is_empty() {
            writeln!(out, "    {}", EscapeControl(&plugin.description))?;
        }
        let health = &plugin.health;
        writeln!(
            out,
            "    breaker {} ({} failure(s) in a row, opened {} time(s), {} call(s) refused), {} timeout(s), deadline {} ms",
            health.breaker,
            health.consecutive_failures,
            health.times_opened,
            health.calls_refused,
            health.timeouts,
            health.timeout_ms
        )?;
        let isolation = &plugin.isolation;
        match isolation.pid {
            None if isolation.mode == "in-process" => writeln!(out, "    isolation in-process")?,
            pid => writeln!(
                out,
                "    isolation process (pid {}), {} crash(es), {} restart(s), {} timeout(s){}",
                pid.map_or_else(|| "none".to_owned(), |p| p.to_string()),
                isolation.crashes,
                isolation.restarts,
                isolation.timeouts,
                if isolation.restarts_suspended {
                    ", restarts suspended (crash loop): reset or reload it"
                } else {
                    ""
                }
            )?,
        }
        if let Some(reason) = &isolation.quarantined {
            writeln!(
                out,
                "    quarantined: {} (runs isolated until `worker quarantine clear {}`)",
                EscapeControl(reason),
                EscapeControl(&plugin.name)
            )?;
        }
        for method in &plugin.methods {
            writeln!(
                out,
                "    - {}: {}",
                EscapeControl(&method.name),
                EscapeControl(&method.description)
            )?;
        }
        // As configured, the same as `worker hooks` shows them.
        for hook in &plugin.hooks {
            if hook.off {
                writeln!(out, "    @ {} off", EscapeControl(&hook.hook))?;
            } else {
                writeln!(
                    out,
                    "    @ {} ({}, priority {})",
                    EscapeControl(&hook.hook),
                    hook.mode,
                    hook.priority
                )?;
            }
        }
    }
    if !refused.is_empty() {
        writeln!(out)?;
        writeln!(out, "refused:")?;
        for refusal in refused {
            // The reason names the file, whose name anyone who can write the directory chose:
            // it is escaped as one string, so a refusal is always one line (a layout mismatch
            // shows its line breaks as `\n`).
            writeln!(out, "  {}", EscapeControl(&refusal.reason()))?;
        }
    }
    Ok(())
}

/// `worker quarantine ...`.
#[derive(Debug, Subcommand)]
pub enum QuarantineAction {
    /// List the quarantined plugins: each crash record (plugin, method, cause, time).
    List {
        /// Print JSON instead of text: [{"plugin", "method", "cause", "time"}, ...].
        #[arg(long)]
        json: bool,
    },
    /// Clear a plugin's quarantine (remove its crash records): it loads again at the next
    /// start, reload or rescan (SIGHUP).
    Clear {
        /// The plugin's name.
        plugin: String,
    },
}

/// `worker quarantine list|clear`.
fn quarantine(
    state_dir: &std::path::Path,
    action: &QuarantineAction,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    use plugin_host::quarantine;
    match action {
        QuarantineAction::List { json } => {
            let records = quarantine::records(state_dir)?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&records)?)?;
            } else if records.is_empty() {
                writeln!(out, "no plugin is quarantined")?;
            } else {
                for record in &records {
                    writeln!(
                        out,
                        "{}: {} in `{}` at {} (unix time); clear with `worker quarantine clear {}`",
                        EscapeControl(&record.plugin),
                        EscapeControl(&record.cause),
                        EscapeControl(&record.method),
                        record.time,
                        EscapeControl(&record.plugin)
                    )?;
                }
            }
        }
        QuarantineAction::Clear { plugin } => {
            let removed = quarantine::clear(state_dir, plugin)?;
            if removed == 0 {
                writeln!(out, "{} is not quarantined", EscapeControl(plugin))?;
            } else {
                writeln!(
                    out,
                    "{}: {removed} crash record(s) removed; it loads again at the next start or rescan",
                    EscapeControl(plugin)
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `serve` serves.
struct Serving {
    listen: String,
    watch: bool,
    token_file: PathBuf,
    /// Whether the token file was given (`--token-file`) rather than our own in the state dir.
    user_token: bool,
    metrics_public: bool,
    /// Zero: no periodic checkpoints.
    checkpoint_interval: Duration,
    shutdown_timeout: Duration,
}

/// Saves the plugins' state every `interval` until the returned sender is dropped.
fn start_checkpoints(
    host: &PluginHost,
    interval: Duration,
) -> anyhow::Result<Option<std::sync::mpsc::Sender<()>>> {
    use std::sync::mpsc::RecvTimeoutError;
    if interval.is_zero() {
        return Ok(None);
    }
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let host = host.clone();
    std::thread::Builder::new()
        .name("checkpoints".to_owned())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                let saved = host.checkpoint();
                tracing::debug!(plugins = saved.len(), "checkpoint written");
            }
        })
        .context("starting the checkpoint thread")?;
    Ok(Some(stop))
}

/// The long-running worker: control API, watcher, signals, graceful shutdown.
fn serve(
    host: &PluginHost,
    serving: Serving,
    state_lock: Option<&mut StateLock>,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Serving {
        listen,
        watch,
        token_file,
        user_token,
        metrics_public,
        checkpoint_interval,
        shutdown_timeout,
    } = serving;
    // Registered before anything is announced, so a signal sent right after start is handled.
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .context("installing the signal handlers")?;
    let token = if user_token {
        Token::from_file(&token_file)?
    } else {
        Token::load_or_create(&token_file)?
    };
    let options = ControlOptions::new(token).with_metrics_public(metrics_public);
    let server = ControlServer::start(host.clone(), &listen, options)?;
    if let Some(lock) = state_lock {
        lock.announce(&server.address().to_string(), &token_file);
    }
    let watcher = if watch {
        Some(Watcher::start(host.clone(), WatchOptions::default())?)
    } else {
        None
    };
    let worker = Worker::start(host.clone());
    let checkpoints = start_checkpoints(host, checkpoint_interval)?;
    writeln!(
        out,
        "worker: {} plugin(s) loaded from {}{}; control API on {}",
        host.plugins().len(),
        EscapePath(host.plugins_dir()),
        if watch { ", watching for changes" } else { "" },
        server.address()
    )?;
    writeln!(
        out,
        "worker: control API token in {} (send `Authorization: Bearer <token>`)",
        EscapePath(&token_file)
    )?;
    out.flush()?;
    let mut stopped_by = "signal";
    for signal in signals.forever() {
        if signal == SIGHUP {
            match &watcher {
                Some(watcher) => watcher.rescan(),
                None => {
                    if let Err(e) = host.reload_config() {
                        tracing::warn!(error = %format!("{e:#}"), "rescan failed");
                    }
                }
            }
        } else {
            tracing::info!(signal, "shutting down");
            stopped_by = if signal == SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            break;
        }
    }
    drop(checkpoints);
    let abandoned = stop_within(host, server, watcher, worker, stopped_by, shutdown_timeout);
    if abandoned.is_empty() {
        writeln!(out, "worker: stopped")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "worker: stopped after {} s, abandoning {}",
        shutdown_timeout.as_secs(),
        abandoned.join(", ")
    )?;
    out.flush()?;
    // Threads are still running plugin code: exit without running destructors, which would
    // wait for them or unmap code they run.
    std::process::exit(1);
}

/// Stops serving within `timeout`: the control API finishes its requests (for at most half the
/// time), the watcher stops, `worker.stop` fires, and the host saves and unloads its plugins in
/// what is left. Returns the names of what was abandoned (each logged with the reason).
fn stop_within(
    host: &PluginHost,
    server: ControlServer,
    watcher: Option<Watcher>,
    worker: Worker,
    stopped_by: &'static str,
    timeout: Duration,
) -> Vec<String> {
    let started = Instant::now();
    let deadline = started + timeout;
    let (api_done, api_stopped) = std::sync::mpsc::channel::<()>();
    let stopping_api = std::thread::Builder::new()
        .name("stopping-control-api".to_owned())
        .spawn(move || {
            server.stop();
            drop(watcher);
            let _ = api_done.send(());
        });
    let api_finished = stopping_api.is_ok() && api_stopped.recv_timeout(timeout / 2).is_ok();
    if !api_finished {
        tracing::warn!(
            waited_ms = (timeout / 2).as_millis(),
            "control API: requests still running; shutting the plugins down without them"
        );
    }
    let (report_sender, reports) = std::sync::mpsc::channel();
    let stopping_host = host.clone();
    let stopping = std::thread::Builder::new()
        .name("stopping-plugins".to_owned())
        .spawn(move || {
            worker.stop(stopped_by);
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = report_sender.send(stopping_host.shutdown_within(left));
        });
    // shutdown_within keeps to its deadline; a little more for the report to arrive.
    let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(200);
    let report = match stopping {
        Ok(_) => reports.recv_timeout(wait).ok(),
        Err(_) => None,
    };
    let mut abandoned: Vec<String> = Vec::new();
    match &report {
        Some(report) => {
            for left in &report.abandoned {
                tracing::error!(plugin = left.plugin.as_str(), reason = %left.reason, "shutdown: plugin abandoned");
                abandoned.push(left.plugin.clone());
            }
        }
        None => {
            tracing::error!(
                "shutdown: the worker.stop hooks or the plugins' unloading did not finish in time"
            );
            abandoned.push("worker.stop".to_owned());
        }
    }
    for call in host.calls_in_flight() {
        tracing::error!(
            plugin = call.plugin.as_str(),
            method = %EscapeControl(&call.method),
            elapsed_ms = call.elapsed.as_millis(),
            "shutdown: plugin abandoned in a call still running"
        );
        if !abandoned.contains(&call.plugin) {
            abandoned.push(call.plugin.clone());
        }
    }
    if !api_finished && abandoned.is_empty() {
        tracing::error!("shutdown: control API requests abandoned");
        abandoned.push("control API requests".to_owned());
    }
    tracing::info!(
        took_ms = started.elapsed().as_millis(),
        saved = report.map_or(0, |r| r.saved.len()),
        "worker stopped"
    );
    abandoned
}

/// `worker call --strict`: the plugin or the method is missing.
pub const EXIT_CALL_MISSING: u8 = 3;
/// `worker call --strict`: the plugin failed (an error, invalid params, a panic, an answer that
/// is not JSON).
pub const EXIT_CALL_FAILED: u8 = 4;

/// What `worker run` was asked.
struct RunOptions {
    tasks: String,
    out_file: Option<PathBuf>,
    max_line_bytes: usize,
    summary_json: Option<PathBuf>,
    strict: bool,
}

/// `worker run`: the task pipeline over a file or stdin. Plugin state is saved even when
/// reading the tasks or writing the results fails.
fn run_tasks(
    host: &PluginHost,
    options: &RunOptions,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    use std::io::BufReader;
    let RunOptions {
        tasks,
        out_file,
        max_line_bytes,
        ..
    } = options;
    let (tasks, out_file, max_line_bytes) = (tasks.as_str(), out_file.as_deref(), *max_line_bytes);
    let (input, total): (Box<dyn std::io::BufRead>, Option<u64>) = if tasks == "-" {
        (Box::new(BufReader::new(std::io::stdin().lock())), None)
    } else {
        let file = std::fs::File::open(tasks)
            .with_context(|| format!("opening the tasks file {tasks}"))?;
        let len = file.metadata().map(|m| m.len()).ok();
        (Box::new(BufReader::new(file)), len)
    };
    let mut progress = Progress::new(total);
    let run = || -> anyhow::Result<crate::pipeline::Summary> {
        match out_file {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .with_context(|| format!("creating the results file {}", EscapePath(path)))?;
                let mut writer = std::io::BufWriter::new(file);
                let worker = Worker::start(host.clone());
                let summary =
                    worker.run_tasks(input, &mut writer, max_line_bytes, |b| progress.update(b))?;
                worker.stop("tasks done");
                progress.done();
                writeln!(out, "{summary}")?;
                Ok(summary)
            }
            None => {
                let worker = Worker::start(host.clone());
                let summary =
                    worker.run_tasks(input, out, max_line_bytes, |b| progress.update(b))?;
                worker.stop("tasks done");
                progress.done();
                eprintln!("{summary}");
                Ok(summary)
            }
        }
    };
    let summary = run();
    host.shutdown();
    let summary = summary?;
    tracing::info!(
        completed = summary.completed,
        failed = summary.failed,
        "run finished"
    );
    if let Some(path) = &options.summary_json {
        let text = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing the summary to {}", path.display()))?;
    }
    if options.strict && summary.failed > 0 {
        eprintln!(
            "error: --strict: {} task(s) did not complete ({} blocked, {} bad lines); see their error records",
            summary.failed, summary.blocked, summary.bad_lines
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on stderr (indicatif): bytes of the tasks file read, the rate and the time
/// left. Drawn only when stderr is a terminal and the input's size is known.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(total: Option<u64>) -> Self {
        let bar = match total.filter(|t| *t > 0 && std::io::stderr().is_terminal()) {
            Some(total) => {
                let bar = indicatif::ProgressBar::with_draw_target(
                    Some(total),
                    indicatif::ProgressDrawTarget::stderr(),
                );
                // A template of our own: it cannot fail to parse, but a failure would only
                // lose the bar, never the run.
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "[{bar:25}] {percent:>3}%  {bytes}/{total_bytes}  {binary_bytes_per_sec}  eta {eta}",
                ) {
                    bar.set_style(style.progress_chars("#>-"));
                }
                bar
            }
            None => indicatif::ProgressBar::hidden(),
        };
        Self { bar }
    }

    fn update(&mut self, bytes: u64) {
        self.bar.set_position(bytes);
    }

    fn done(&mut self) {
        self.bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_are_levels_or_target_level_pairs() {
        for good in [
            "warn",
            "WARN",
            "off",
            "3",
            "warn,plugin_host=debug",
            "worker::cli=info",
            " info , plugin-x=trace",
        ] {
            assert!(parse_log_filter(good).is_ok(), "{good}");
        }
        for bad in [
            "warnn",
            "",
            "host",
            "info,host=loud",
            "=debug",
            "a b=info",
            "warn,",
        ] {
            assert!(parse_log_filter(bad).is_err(), "{bad}");
        }
    }
}
