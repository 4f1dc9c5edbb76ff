//! The worker's side of the shared store: which store a command opens, `worker store status`
//! and `worker report` (the fleet-wide experiment table).

use std::io::Write;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use plugin_host::PluginHost;
use plugin_host::store::{Store, StoreOptions};
use serde_json::{Value, json};

/// The file name of the default store in the state directory.
pub const DEFAULT_STORE_FILE: &str = "store.db";

/// Opens the store for a command: `url` (from `--store`), else `store` in the configuration
/// file, else SQLite in the state directory. `none` means no store.
///
/// # Errors
///
/// The URL is not a store URL, or the SQLite file cannot be opened.
pub fn open_store(
    url: Option<&str>,
    flush_ms: Option<u64>,
    config_file: &Path,
    state_dir: &Path,
) -> anyhow::Result<Option<Store>> {
    // An invalid configuration file is an error here too (`store status` builds no host): the
    // store it names must not silently become the default one.
    let config = plugin_host::PluginsConfig::read(config_file)?;
    let url = match url.map(str::to_owned).or(config.store) {
        Some(url) if url == "none" => return Ok(None),
        Some(url) => url,
        None => {
            // Made as the state directory would be (owner only), before the host makes it.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
            format!("sqlite://{}", state_dir.join(DEFAULT_STORE_FILE).display())
        }
    };
    let mut options = StoreOptions::default();
    if let Some(ms) = flush_ms.or(config.store_flush_ms) {
        if !(10..=3_600_000).contains(&ms) {
            anyhow::bail!("storeFlushMs: {ms} is out of range; give 10 to 3600000 milliseconds");
        }
        options.flush_interval = Duration::from_millis(ms);
    }
    Store::open(&url, options).map(Some)
}

/// `worker store status`: the backend, whether it answers (this command's own flush), and
/// what each worker on the store published (see [`Store::publish_as_worker`]): its last flush,
/// pending additions, the plugins holding some, and errors. Answers whether the store and the
/// statuses could be read (`true` without a store).
///
/// # Errors
///
/// `out` cannot be written.
pub fn status(store: Option<&Store>, json: bool, out: &mut dyn Write) -> anyhow::Result<bool> {
    let Some(store) = store else {
        writeln!(
            out,
            "{}",
            if json {
                "{\"store\": null}"
            } else {
                "no store (--store none): each plugin keeps its own state file"
            }
        )?;
        return Ok(true);
    };
    // An error is in the status.
    let _ = store.flush();
    let status = store.status();
    // Not asked again of a store that did not answer the flush: that would wait again.
    let workers = if status.reachable {
        store.workers().map_err(|e| format!("{e:#}"))
    } else {
        Err(status
            .last_error
            .clone()
            .unwrap_or_else(|| "the store cannot be reached".to_owned()))
    };
    // Text from the store (a worker's, a server's) is written by whoever can write to it: no
    // control character reaches the terminal.
    let text = |t: &str| plugin_host::text::escape_control(t).into_owned();
    if json {
        let (list, unreadable, left_out, error) = match &workers {
            Ok(w) => (
                json!(w.workers),
                json!(w.unreadable),
                json!(w.left_out),
                Value::Null,
            ),
            Err(e) => (Value::Null, Value::Null, Value::Null, json!(e)),
        };
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&json!({
                "store": status,
                "workers": list,
                "unreadableWorkers": unreadable,
                "workersLeftOut": left_out,
                "workersError": error,
            }))?
        )?;
        return Ok(workers.is_ok());
    }
    writeln!(out, "backend:   {}", status.backend)?;
    writeln!(
        out,
        "reachable: {}",
        if status.reachable { "yes" } else { "no" }
    )?;
    let listed = match workers {
        Ok(listed) => listed,
        Err(e) => {
            writeln!(out, "error:     {}", text(&e))?;
            writeln!(out, "workers:   unknown (their statuses cannot be read)")?;
            return Ok(false);
        }
    };
    let now = plugin_host::store::now_ms();
    let secs = |ms: u64| now.saturating_sub(ms) as f64 / 1000.0;
    writeln!(
        out,
        "workers:   {}",
        if listed.workers.is_empty() {
            "none running (a worker publishes its status after its first flush)".to_owned()
        } else {
            listed.workers.len().to_string()
        }
    )?;
    for w in &listed.workers {
        let holding = if w.holding.is_empty() {
            "no plugin".to_owned()
        } else {
            text(&w.holding.join(", "))
        };
        writeln!(out, "  {}", text(&w.worker))?;
        writeln!(
            out,
            "    seen {:.1} s ago, last flush {}, every {} ms",
            secs(w.updated_ms),
            w.last_flush_ms
                .map_or_else(|| "never".to_owned(), |ms| format!("{:.1} s ago", secs(ms))),
            w.flush_interval_ms
        )?;
        writeln!(
            out,
            "    pending {}, holding {holding}, errors {}",
            w.pending, w.errors
        )?;
        if let Some(e) = &w.last_error {
            let when = w
                .last_error_ms
                .map(|ms| format!(" ({:.1} s ago)", secs(ms)))
                .unwrap_or_default();
            writeln!(out, "    last error{when}: {}", text(e))?;
        }
        // A worker writes its status after each round that reached the store, at least every
        // few seconds: one much older is of a worker that cannot reach the store, or that
        // stopped without removing it.
        let late_after = w.flush_interval_ms.max(1000).saturating_mul(3) + 2000;
        if now.saturating_sub(w.updated_ms) > late_after {
            writeln!(
                out,
                "    not updated for {:.0} s: cut off from the store, or stopped without removing its status (it drops out {:.0} s after its last update)",
                secs(w.updated_ms),
                w.ttl_ms as f64 / 1000.0
            )?;
        }
    }
    if listed.unreadable > 0 {
        writeln!(
            out,
            "           and {} status(es) that are not a worker's (written by something else); left out",
            listed.unreadable
        )?;
    }
    if listed.left_out > 0 {
        writeln!(
            out,
            "           and {} more not read (only the first 1000, by id)",
            listed.left_out
        )?;
    }
    Ok(true)
}

fn num(v: &Value, precision: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |x| format!("{x:.precision$}"))
}

/// `worker report`: every experiment of the `experiment` plugin, as the whole fleet sees it in
/// the store.
///
/// # Errors
///
/// There is no store, it cannot be reached, or the `experiment` plugin is not loaded.
pub fn report(host: &PluginHost, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = host
        .store()
        .context("no store (--store none): there is no fleet-wide table to report")?;
    // Checked first: a table read from a store that does not answer would be empty, not
    // wrong-looking, and each of its reads would wait for the store.
    let backend = store.status().backend;
    let unreachable = || {
        format!(
            "the store {backend} cannot be reached, so the fleet's table cannot be read; `worker store status` says more"
        )
    };
    store.ping().with_context(unreachable)?;
    // The first call names the keys the plugin reads; the flush fetches them from the store.
    host.call("experiment", "stats", &json!({}))
        .context("asking the experiment plugin for its statistics")?;
    store.flush().context("reading the store")?;
    let status = store.status();
    if !status.reachable {
        let error = status.last_error.unwrap_or_default();
        return Err(anyhow::anyhow!(error).context(unreachable()));
    }
    let stats = host
        .call("experiment", "stats", &json!({}))
        .context("asking the experiment plugin for its statistics")?
        .unwrap_or(Value::Null);
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
        return Ok(());
    }
    writeln!(out, "store: {}", backend)?;
    writeln!(
        out,
        "{:<14} {:<10} {:>8} {:>7} {:>8} {:>7} {:>17} {:>8} {:>17} {:>8}",
        "experiment",
        "variant",
        "assigned",
        "units",
        "outcomes",
        "mean",
        "95% interval",
        "vs ctrl",
        "95% interval",
        "p-value"
    )?;
    let Some(experiments) = stats.as_object() else {
        return Ok(());
    };
    for (name, experiment) in experiments {
        let name = plugin_host::text::escape_control(name);
        let empty = serde_json::Map::new();
        let variants = experiment["variants"].as_object().unwrap_or(&empty);
        for (variant, v) in variants {
            let interval = |low: &Value, high: &Value| match (low.as_f64(), high.as_f64()) {
                (Some(l), Some(h)) => format!("[{l:.3}, {h:.3}]"),
                _ => "-".to_owned(),
            };
            let vs = &v["vsControl"];
            let p = vs["pValue"].as_f64().map_or_else(
                || "-".to_owned(),
                |p| {
                    if p < 0.001 {
                        "<0.001".to_owned()
                    } else {
                        format!("{p:.3}")
                    }
                },
            );
            writeln!(
                out,
                "{name:<14} {:<10} {:>8} {:>7} {:>8} {:>7} {:>17} {:>8} {:>17} {p:>8}",
                plugin_host::text::escape_control(variant),
                num(&v["assigned"], 0),
                num(&v["uniqueKeys"], 0),
                num(&v["outcomes"], 0),
                num(&v["meanScore"], 3),
                interval(&v["ciLow"], &v["ciHigh"]),
                vs["diff"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |d| format!("{d:+.3}")),
                interval(&vs["ciLow"], &vs["ciHigh"]),
            )?;
        }
        if experiment["sampleRatio"]["mismatch"].as_bool() == Some(true) {
            writeln!(
                out,
                "{name}: SAMPLE-RATIO MISMATCH (p = {}): the assignments do not fit the weights; do not trust this comparison",
                num(&experiment["sampleRatio"]["pValue"], 6)
            )?;
        }
    }
    Ok(())
}
