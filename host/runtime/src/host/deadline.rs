//! Deadlines for a plugin's lifecycle entries (`destroy`, `save_state`, `restore_state`): each
//! runs on a thread of its own, and the caller (often holding the admin lock) waits at most the
//! plugin's deadline. In-process code cannot be stopped, so an overrun is abandoned: the thread
//! runs on and drops its result if it ever returns, and the load, unload, reload, checkpoint or
//! shutdown goes on without it.

use std::sync::atomic::AtomicU8;
use std::time::Duration;

use super::*;

const RUNNING: u8 = 0;
const RETURNED: u8 = 1;
const ABANDONED: u8 = 2;

/// An entry abandoned past its deadline.
#[derive(Debug, Clone, Copy)]
pub(super) struct Overran;

/// Runs `work` (the plugin's `entry`) on a thread of its own and waits at most `timeout_ms` for
/// it. An overrun is logged with the plugin, the entry and the elapsed time, counted as a
/// timeout on `health` and opens its breaker; the plugin counts as stuck there until the
/// abandoned entry returns.
pub(super) fn within<T: Send + 'static>(
    plugin: &str,
    entry: &'static str,
    timeout_ms: u64,
    health: Option<&Arc<StatsCell>>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Overran> {
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    let state = Arc::new(AtomicU8::new(RUNNING));
    let started = Instant::now();
    let spawned = {
        let state = Arc::clone(&state);
        let health = health.cloned();
        let name = plugin.to_owned();
        std::thread::Builder::new()
            .name(format!("plugin-{entry}"))
            .spawn(move || {
                let site = crate::crash::EntryGuard::new(&name, entry);
                let result = work();
                drop(site);
                let ran =
                    state.compare_exchange(RUNNING, RETURNED, Ordering::AcqRel, Ordering::Acquire);
                if ran.is_ok() {
                    let _ = sender.send(result);
                } else {
                    if let Some(health) = health {
                        health
                            .health
                            .entry_returned(&name, entry, elapsed_ms(started));
                    }
                    drop(result);
                }
            })
    };
    if let Err(e) = spawned {
        // The work went with the failed spawn and did not run (what it owned was dropped here:
        // for `release`, that drop is the `destroy`, without a deadline).
        tracing::warn!(plugin, entry, error = %e, "no thread to run the plugin entry on; skipped");
        return Err(Overran);
    }
    if let Ok(result) = receiver.recv_timeout(Duration::from_millis(timeout_ms)) {
        return Ok(result);
    }
    // Counted stuck before the thread can see it abandoned, so its count back never comes first.
    if let Some(cell) = health {
        cell.health.stuck_more();
    }
    if state
        .compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // It returned just now: take the result after all.
        if let Some(cell) = health {
            cell.health.stuck_less();
        }
        return receiver.recv().map_err(|_| Overran);
    }
    let elapsed = elapsed_ms(started);
    match health {
        Some(cell) => cell
            .health
            .entry_overran(plugin, entry, elapsed, timeout_ms),
        None => tracing::warn!(
            plugin,
            entry,
            elapsed_ms = elapsed,
            timeout_ms,
            "plugin entry overran its deadline; abandoned: it runs on in the background, and the worker goes on without it"
        ),
    }
    Err(Overran)
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl PluginHost {
    /// The host's default deadline of a call (`with_call_timeout`), in milliseconds.
    pub(crate) fn call_timeout_ms(&self) -> u64 {
        self.inner.call_timeout_ms
    }

    /// The deadline of `plugin`'s calls and lifecycle entries, in milliseconds.
    pub(super) fn timeout_ms(&self, plugin: &str) -> u64 {
        self.settings(plugin)
            .timeout_ms
            .unwrap_or(self.inner.call_timeout_ms)
            .max(1)
    }

    /// Lets go of a generation taken out of the registry: when this is its last holder, its
    /// instance is destroyed and its library closed, within the plugin's deadline (a `destroy`
    /// that overruns is abandoned and keeps its library mapped). When calls still hold it, the
    /// last of them destroys it.
    pub(super) fn release(
        &self,
        plugin: &str,
        generation: Arc<Generation>,
        health: Option<&Arc<StatsCell>>,
    ) {
        let _ = within(
            plugin,
            "destroy",
            self.timeout_ms(plugin),
            health,
            move || {
                drop(generation);
            },
        );
    }
}

/// Joins `thread` (`what`, for the log), waiting at most `bound`; a thread still running then
/// is abandoned (detached) with a warning. Whether it finished.
pub(crate) fn join_within(
    thread: std::thread::JoinHandle<()>,
    bound: Duration,
    what: &str,
) -> bool {
    let started = Instant::now();
    while !thread.is_finished() {
        if started.elapsed() >= bound {
            tracing::warn!(
                thread = what,
                waited_ms = started.elapsed().as_millis(),
                "a thread did not finish within its bound; abandoned, the worker goes on without it"
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(5).min(bound));
    }
    let _ = thread.join();
    true
}
