//! The watchdog: a thread per host that keeps the coarse clock going and looks at every
//! plugin's calls in flight, reporting each call past its deadline once (in-process code cannot
//! be interrupted: the report opens the plugin's breaker so that no new call enters it).

use super::*;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

/// How often the watchdog looks: the precision of deadlines and of the calls' start times.
pub(super) const TICK: Duration = Duration::from_millis(50);

/// The health cells the watchdog looks at, by plugin name: published with the registry, but
/// without the generations, so the watchdog never holds a plugin's library alive.
pub(super) type Watched = Arc<ArcSwap<Vec<(Box<str>, Arc<StatsCell>)>>>;

/// The running watchdog; dropping it stops the thread at once.
#[derive(Debug)]
pub(super) struct Watchdog {
    _stop: Sender<()>,
}

impl Watchdog {
    pub(super) fn start(watched: Watched) -> anyhow::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        crate::health::tick();
        std::thread::Builder::new()
            .name("plugin-watchdog".into())
            .spawn(move || watch(&watched, &stopped))?;
        Ok(Self { _stop: stop })
    }
}

fn watch(watched: &Watched, stopped: &Receiver<()>) {
    loop {
        match stopped.recv_timeout(TICK) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = crate::health::tick();
        for (name, cell) in watched.load().iter() {
            cell.health.watch(name, now);
        }
    }
}
