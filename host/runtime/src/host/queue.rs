//! The fire-and-forget queue: a bounded queue of hook events and the thread that runs them.

use super::deadline;
use super::*;

/// A queued fire-and-forget event: the payload as a value for a host hook, as text for a plugin.
pub(super) struct Job {
    pub(super) subscriber: Subscriber,
    pub(super) point: At,
    pub(super) value: Option<Arc<Value>>,
    pub(super) text: Option<Arc<str>>,
}

/// The bounded queue of fire-and-forget events and the thread that runs them.
#[derive(Debug)]
pub(super) struct FireQueue {
    pub(super) sender: Option<SyncSender<Job>>,
    pub(super) dropped: AtomicU64,
    pub(super) thread: Option<JoinHandle<()>>,
}

impl FireQueue {
    /// Starts the queue's thread, which times the deliveries it runs like any other (counted
    /// in their hook point's histogram, the ones picked timed, the others reaching the
    /// maximum from the watchdog's ticks).
    pub(super) fn start(
        capacity: usize,
        timing: Option<crate::stats::Timing>,
    ) -> anyhow::Result<Self> {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Job>(capacity);
        let thread = std::thread::Builder::new()
            .name("hook-fire-and-forget".into())
            .spawn(move || {
                while let Ok(job) = receiver.recv() {
                    run_subscriber(
                        &job.subscriber,
                        job.point,
                        job.value.as_deref(),
                        job.text.as_deref(),
                        &mut Timer::new(timing.as_ref()),
                    );
                }
            })?;
        Ok(Self {
            sender: Some(sender),
            dropped: AtomicU64::new(0),
            thread: Some(thread),
        })
    }

    pub(super) fn push(&self, job: Job) {
        let Some(sender) = &self.sender else {
            return;
        };
        if let Err(TrySendError::Full(job)) = sender.try_send(job) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Counted always; logged at 1, 2, 4, 8, ... so a flood does not flood the log too.
            if dropped.is_power_of_two() {
                tracing::warn!(
                    hook = %job.point,
                    subscriber = %job.subscriber.name,
                    dropped_total = dropped,
                    "the fire-and-forget queue is full; event dropped"
                );
            }
        }
    }

    /// Runs what is queued, then stops the thread, waiting for it at most `bound`: a
    /// subscriber still running then is abandoned with the thread (and keeps the generation it
    /// runs in alive).
    pub(super) fn stop(&mut self, bound: std::time::Duration) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            deadline::join_within(thread, bound, "hook-fire-and-forget");
        }
    }
}

impl PluginHost {
    /// Fire-and-forget events dropped because the queue was full, since the host started.
    pub fn dropped_hook_events(&self) -> u64 {
        self.inner.fire_queue.dropped.load(Ordering::Relaxed)
    }
}
