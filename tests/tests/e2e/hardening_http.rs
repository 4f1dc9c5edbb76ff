//! The control API against hostile clients: no token, a foreign `Host` or `Origin`, oversized
//! and malformed heads, slow clients, and a Unix socket; against the real `worker serve`.
