//! Plugin-to-plugin calls: the callback a plugin's `call_plugin` reaches, with cycle and depth
//! limits.

use super::*;

thread_local! {
    /// The plugins waiting on this thread for a plugin-to-plugin call to return.
    static CALL_CHAIN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Deepest chain of plugin-to-plugin calls allowed.
pub(super) const MAX_CALL_DEPTH: usize = 16;

/// The plugins waiting on this thread, joined by `,`: an isolated plugin's call carries it to
/// its process, and the process's calls back through the host bring it back, so cycles and
/// depth are checked across processes too.
pub(crate) fn call_chain() -> String {
    CALL_CHAIN.with(|chain| {
        let chain = chain.borrow();
        // Most calls come from outside any plugin: nothing to join.
        if chain.is_empty() {
            String::new()
        } else {
            chain.join(",")
        }
    })
}

impl PluginHost {
    /// How an isolated plugin's process reaches other plugins through this host.
    pub(super) fn host_link(inner: Weak<Inner>) -> crate::isolation::HostLink {
        Arc::new(move |caller, chain, plugin, method, params| {
            let inner = inner
                .upgrade()
                .ok_or_else(|| PluginError::failed("the host is shutting down"))?;
            let host = PluginHost { inner };
            let outer: Vec<String> = chain
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect();
            let saved = CALL_CHAIN.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
            let result = host.call_from_plugin(caller, plugin, method, params);
            CALL_CHAIN.with(|c| *c.borrow_mut() = saved);
            result
        })
    }

    /// The function a plugin's `call_plugin` reaches: the same no-op safety as `execute`, plus
    /// cycle detection. `caller` is the plugin making the call.
    pub(super) fn plugin_call_back(inner: Weak<Inner>, caller: String) -> crate::dylib::CallBack {
        Box::new(move |plugin, method, params| {
            let inner = inner
                .upgrade()
                .ok_or_else(|| PluginError::failed("the host is shutting down"))?;
            let host = PluginHost { inner };
            host.call_from_plugin(&caller, plugin, method, params)
        })
    }

    pub(super) fn call_from_plugin(
        &self,
        caller: &str,
        plugin: &str,
        method: &str,
        params: &str,
    ) -> Result<Option<String>, PluginError> {
        let cycle = CALL_CHAIN.with(|chain| {
            let chain = chain.borrow();
            if chain.iter().any(|p| p == plugin) || caller == plugin {
                let mut path: Vec<&str> = chain.iter().map(String::as_str).collect();
                path.push(caller);
                path.push(plugin);
                Some(format!("call cycle cut: {}", path.join(" -> ")))
            } else if chain.len() >= MAX_CALL_DEPTH {
                Some(format!("plugin calls nested deeper than {MAX_CALL_DEPTH}"))
            } else {
                None
            }
        });
        if let Some(message) = cycle {
            tracing::warn!(caller, plugin = %EscapeControl(plugin), method = %EscapeControl(method), "{}", EscapeControl(&message));
            return Err(PluginError::failed(message));
        }
        CALL_CHAIN.with(|chain| chain.borrow_mut().push(caller.to_owned()));
        let result = self.dispatch_text(handle::Named(plugin, method), params, |answer| {
            Ok(answer.map(str::to_owned))
        });
        CALL_CHAIN.with(|chain| chain.borrow_mut().pop());
        result.map_err(|failure| failure.into_error(plugin, method).to_plugin_error())
    }
}
