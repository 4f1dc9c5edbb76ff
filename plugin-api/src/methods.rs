//! Method registration and dispatch inside a plugin.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::PluginError;

type RawFn<P> = dyn Fn(&P, &str) -> Result<Option<String>, PluginError> + Send + Sync;

struct Method<P> {
    /// [`tag`] of the name: compared first, so a lookup compares one integer per method and the
    /// bytes of the one that matches.
    tag: u64,
    name: &'static str,
    description: &'static str,
    call: Box<RawFn<P>>,
}

/// A name's length and its first, middle and last bytes in one integer, read without a copy:
/// two names with different tags differ, so a lookup compares one integer per entry and the
/// bytes only of the entry whose tag matches.
#[inline]
pub(crate) fn tag(name: &str) -> u64 {
    let bytes = name.as_bytes();
    match bytes {
        [] => 0,
        [first, ..] => {
            let middle = bytes[bytes.len() / 2];
            let last = bytes[bytes.len() - 1];
            (bytes.len() as u64)
                | u64::from(*first) << 32
                | u64::from(middle) << 40
                | u64::from(last) << 48
        }
    }
}

/// The methods a plugin offers, registered once in [`Plugin::methods`](crate::Plugin::methods).
///
/// Each method has a name, a one-line description (shown by the host's `list`), and a function.
/// Typed methods take any `Deserialize` params and return any `Serialize` value; the JSON work is
/// done for you. A method that returns JSON `null` (for example `()` or `None`) answers "nothing".
///
/// # Examples
///
/// ```
/// use plugin_api::{Methods, PluginError};
/// use serde::Deserialize;
///
/// struct Counter;
///
/// #[derive(Deserialize)]
/// struct Add {
///     a: i64,
///     b: i64,
/// }
///
/// let mut methods = Methods::<Counter>::new();
/// methods.method("add", "Adds a and b", |_counter, p: Add| Ok(p.a + p.b));
/// methods.method("ping", "Answers nothing", |_counter, (): ()| Ok(()));
/// assert_eq!(methods.names().collect::<Vec<_>>(), ["add", "ping"]);
/// # let _ = PluginError::new("unused");
/// ```
pub struct Methods<P> {
    methods: Vec<Method<P>>,
}

impl<P> Default for Methods<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> fmt::Debug for Methods<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl<P> Methods<P> {
    /// An empty set of methods.
    pub fn new() -> Self {
        Self {
            methods: Vec::new(),
        }
    }

    /// Registers a typed method. Params that do not deserialize into `A` give an
    /// "invalid params" error naming the method; a missing params object reads as JSON `null`.
    ///
    /// Registering a name twice replaces the earlier method.
    pub fn method<A, R, F>(
        &mut self,
        name: &'static str,
        description: &'static str,
        f: F,
    ) -> &mut Self
    where
        A: DeserializeOwned,
        R: Serialize,
        F: Fn(&P, A) -> Result<R, PluginError> + Send + Sync + 'static,
    {
        self.raw_method(name, description, move |plugin, params| {
            let params = if params.is_empty() { "null" } else { params };
            let args: A = serde_json::from_str(params).map_err(|e| {
                PluginError::invalid_params(format!("method `{name}`: params do not match: {e}"))
            })?;
            let result = f(plugin, args)?;
            let json = serde_json::to_string(&result).map_err(|e| {
                PluginError::new(format!("method `{name}`: result is not JSON: {e}"))
            })?;
            Ok((json != "null").then_some(json))
        })
    }

    /// Registers a method that works on JSON text directly: it receives the params as JSON text
    /// (empty when there are none) and answers JSON text, or `None` for "nothing".
    ///
    /// For plugins that produce JSON faster than through `serde`. The host parses what comes
    /// back; text that is not JSON makes that call a no-op on the host's side.
    pub fn raw_method<F>(
        &mut self,
        name: &'static str,
        description: &'static str,
        f: F,
    ) -> &mut Self
    where
        F: Fn(&P, &str) -> Result<Option<String>, PluginError> + Send + Sync + 'static,
    {
        let method = Method {
            tag: tag(name),
            name,
            description,
            call: Box::new(f),
        };
        match self.methods.iter_mut().find(|m| m.name == name) {
            Some(existing) => *existing = method,
            None => self.methods.push(method),
        }
        self
    }

    /// The registered method names, in registration order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.methods.iter().map(|m| m.name)
    }

    pub(crate) fn describe(&self) -> Vec<crate::MethodInfo> {
        self.methods
            .iter()
            .map(|m| crate::MethodInfo {
                name: m.name.to_owned(),
                description: m.description.to_owned(),
            })
            .collect()
    }

    /// Calls the method `name` with JSON params.
    ///
    /// # Errors
    ///
    /// An unknown method, params that do not fit, or whatever the method returns.
    pub fn call(
        &self,
        plugin: &P,
        name: &str,
        params: &str,
    ) -> Result<Option<String>, PluginError> {
        let tag = tag(name);
        match self.methods.iter().find(|m| m.tag == tag && m.name == name) {
            Some(method) => (method.call)(plugin, params),
            None => Err(PluginError::unknown_method(name)),
        }
    }

    /// Calls the method registered `index`-th (the order of [`names`](Self::names) and of the
    /// manifest), which must be named `name`; when it is not (or there is none), the method
    /// `name` as [`call`](Self::call) finds it.
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call).
    #[inline]
    pub fn call_at(
        &self,
        plugin: &P,
        index: u32,
        name: &str,
        params: &str,
    ) -> Result<Option<String>, PluginError> {
        match usize::try_from(index)
            .ok()
            .and_then(|i| self.methods.get(i))
        {
            Some(method) if same_name(method.name, name) => (method.call)(plugin, params),
            _ => self.call(plugin, name, params),
        }
    }
}

/// Whether two names are equal, compared byte by byte: the names are short, and a call to
/// `memcmp` costs more than the loop.
#[inline]
fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names with the same tag (same length, same first, middle and last bytes) or told apart
    /// by the tag alone each reach their own method; a prefix or an extension of a name reaches none.
    #[test]
    fn lookup_tells_every_name_apart() {
        let names = [
            "a",
            "b",
            "ab",
            "noop",
            "echo",
            "summarize_a",
            "summarize_b",
            "sxxxxrxxx_a",
            "summariz",
            "summarize",
        ];
        let mut methods = Methods::<()>::new();
        for name in names {
            methods.raw_method(name, "", move |(), _| Ok(Some(format!("\"{name}\""))));
        }
        for name in names {
            assert_eq!(
                methods.call(&(), name, "").unwrap(),
                Some(format!("\"{name}\""))
            );
        }
        for missing in ["", "summarize_", "summarize_ab", "noo", "noops", "A"] {
            assert!(methods.call(&(), missing, "").is_err(), "{missing}");
        }
        for (index, name) in names.iter().enumerate() {
            let index = u32::try_from(index).unwrap();
            assert_eq!(
                methods.call_at(&(), index, name, "").unwrap(),
                Some(format!("\"{name}\""))
            );
            // A stale index (another method there, or past the end) finds the method by name.
            assert_eq!(
                methods.call_at(&(), index + 1, name, "").unwrap(),
                Some(format!("\"{name}\""))
            );
        }
        assert!(methods.call_at(&(), 0, "missing", "").is_err());
        assert_ne!(tag("summarize_a"), tag("summarize_b"));
        assert_eq!(tag("summarize_a"), tag("sxxxxrxxx_a"));
    }
}
