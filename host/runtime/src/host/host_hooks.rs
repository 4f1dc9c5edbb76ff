//! Hooks written in Rust by the embedder, registered for the life of the host or of a
//! [`HookSession`].

use super::*;

/// A hook registered from Rust.
#[derive(Clone)]
pub(super) struct HostHook {
    pub(super) point: HookPoint,
    pub(super) name: Arc<str>,
    pub(super) priority: i32,
    pub(super) mode: HookMode,
    pub(super) f: HostHookFn,
}

impl std::fmt::Debug for HostHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostHook")
            .field("point", &self.point)
            .field("name", &self.name)
            .finish()
    }
}

/// Host-side hooks registered through a session; all are unregistered when it is dropped.
///
/// ```no_run
/// use plugin_host::{HookPoint, PluginHost};
/// use plugin_api::{HookMode, HookResult};
///
/// let host = PluginHost::builder("plugins").build()?;
/// let session = host.hook_session();
/// session.register(HookPoint::PLUGIN_LOADED, "print-loads", 0, HookMode::Audit, |event| {
///     println!("loaded: {}", event.payload["plugin"]);
///     HookResult::Continue
/// });
/// // ... run tasks ...
/// drop(session); // the hook is gone
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Debug)]
pub struct HookSession {
    pub(super) host: PluginHost,
    pub(super) ids: std::sync::Mutex<Vec<u64>>,
}

impl HookSession {
    /// Registers a hook for as long as this session lives. See
    /// [`PluginHost::register_hook`].
    pub fn register(
        &self,
        point: HookPoint,
        name: &str,
        priority: i32,
        mode: HookMode,
        f: impl Fn(&HookEvent<'_>) -> HookResult + Send + Sync + 'static,
    ) {
        let id = self.host.register_hook(point, name, priority, mode, f);
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).push(id);
    }
}

impl Drop for HookSession {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|p| p.into_inner()));
        for id in ids {
            self.host.unregister_hook(id);
        }
    }
}

impl PluginHost {
    /// Registers a hook written in Rust, for the life of the host (see
    /// [`hook_session`](Self::hook_session) for a scoped one). It runs like a plugin
    /// subscriber of that priority and mode; `name` identifies it in listings, logs and
    /// violations. Returns an id for [`unregister_hook`](Self::unregister_hook).
    pub fn register_hook(
        &self,
        point: HookPoint,
        name: &str,
        priority: i32,
        mode: HookMode,
        f: impl Fn(&HookEvent<'_>) -> HookResult + Send + Sync + 'static,
    ) -> u64 {
        if self.hook_spec(point).is_none() {
            tracing::warn!(
                name,
                point = point.index(),
                "a host hook registered for a hook point this host does not have; it will never run (build the host with the hook points its handles come from)"
            );
        }
        let _admin = self.admin();
        let id = self.inner.next_hook_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .host_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                HostHook {
                    point,
                    name: Arc::from(name),
                    priority,
                    mode,
                    f: Arc::new(f),
                },
            );
        self.republish();
        id
    }

    /// Removes a hook registered with [`register_hook`](Self::register_hook).
    pub fn unregister_hook(&self, id: u64) {
        let _admin = self.admin();
        let removed = self
            .inner
            .host_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if removed.is_some() {
            self.republish();
        }
    }

    /// A session: hooks registered through it are unregistered when it is dropped.
    pub fn hook_session(&self) -> HookSession {
        HookSession {
            host: self.clone(),
            ids: std::sync::Mutex::new(Vec::new()),
        }
    }
}
