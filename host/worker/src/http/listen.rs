//! Where the control API listens (a TCP address or a Unix socket) and which `Host` and
//! `Origin` headers it answers.

use plugin_host::text::EscapePath;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Where a running control API can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlAddress {
    /// HTTP over TCP on this address.
    Tcp(SocketAddr),
    /// HTTP over the Unix socket at this path.
    Unix(PathBuf),
}

impl std::fmt::Display for ControlAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "http://{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", EscapePath(path)),
        }
    }
}

/// A bound listener, not yet handed to the runtime.
pub(super) enum Bound {
    Tcp(std::net::TcpListener),
    Unix(UnixListener, OwnedSocket),
}

/// The socket file we created, identified by device and inode so that we remove only it.
#[derive(Debug)]
pub(super) struct OwnedSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnedSocket {
    /// Removes the socket file if it is still the one we bound.
    pub(super) fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %EscapePath(&self.path), error = %e, "could not remove the control API socket");
                }
            }
            _ => {
                tracing::debug!(socket = %EscapePath(&self.path), "the control API socket was replaced or removed; leaving it");
            }
        }
    }
}

/// Checks the form of a `--listen` address without binding: a port alone (`7879`, `:7879`)
/// has no host, and the error says to give `HOST:PORT`.
///
/// # Errors
///
/// The address is a port without a host.
pub fn check_address(listen: &str) -> anyhow::Result<()> {
    let port = listen.strip_prefix(':').unwrap_or(listen);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "--listen {listen} has no host: give HOST:PORT, for example 127.0.0.1:{port} (this machine only) or 0.0.0.0:{port} (every interface), or unix:PATH"
        );
    }
    Ok(())
}

/// Binds `listen`: `unix:/path/to/socket`, or a TCP address such as `127.0.0.1:7878`.
pub(super) fn bind(listen: &str) -> anyhow::Result<(Bound, ControlAddress, Option<HostPolicy>)> {
    check_address(listen)?;
    if let Some(path) = listen.strip_prefix("unix:") {
        if path.is_empty() {
            bail!("--listen unix: needs a path, for example unix:/run/worker/control.sock");
        }
        let path = PathBuf::from(path);
        let (listener, owned) = bind_unix(&path)?;
        return Ok((
            Bound::Unix(listener, owned),
            ControlAddress::Unix(path),
            None,
        ));
    }
    let listener = std::net::TcpListener::bind(listen).with_context(|| {
        format!("listening on {listen} (give HOST:PORT, for example 127.0.0.1:7878, or unix:PATH)")
    })?;
    let local = listener
        .local_addr()
        .with_context(|| format!("reading the address bound for {listen}"))?;
    let policy = HostPolicy::new(listen, local);
    Ok((
        Bound::Tcp(listener),
        ControlAddress::Tcp(local),
        Some(policy),
    ))
}

/// Binds a Unix socket at `path` with mode 0600, leaving no moment in which it has wider
/// permissions: it is bound inside a fresh private (0700) directory beside `path`, its mode set,
/// and then hard-linked into place (which fails rather than replace anything that appeared at
/// `path` meanwhile).
fn bind_unix(path: &Path) -> anyhow::Result<(UnixListener, OwnedSocket)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => bail!(
                "another process is serving on the socket {}; stop it or choose another path",
                EscapePath(path)
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", EscapePath(path)))?;
                tracing::info!(socket = %EscapePath(path), "removed a stale control API socket");
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "checking whether the socket {} is still in use; remove it if it is stale",
                        EscapePath(path)
                    )
                });
            }
        },
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to remove it: choose another path or remove it yourself",
            EscapePath(path)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", EscapePath(path))),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".worker-control-")
        .tempdir_in(parent)
        .with_context(|| {
            format!(
                "creating a private directory in {} to bind the socket",
                EscapePath(parent)
            )
        })?;
    let temp = private.path().join("s");
    let listener = UnixListener::bind(&temp).with_context(|| {
        format!(
            "binding a Unix socket at {} (a socket path must be shorter than about 100 bytes)",
            EscapePath(&temp)
        )
    })?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", EscapePath(&temp)))?;
    std::fs::hard_link(&temp, path).with_context(|| {
        format!(
            "putting the control API socket at {} (something else appeared there?)",
            EscapePath(path)
        )
    })?;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("checking the socket {}", EscapePath(path)))?;
    let owned = OwnedSocket {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    // Removes the private directory and the temporary name; the socket lives on at `path`.
    if let Err(e) = private.close() {
        tracing::warn!(error = %e, "could not remove the temporary socket directory");
    }
    Ok((listener, owned))
}

/// Which `Host` and `Origin` headers a TCP listener answers: a defence against DNS rebinding
/// (a web page whose name resolves to 127.0.0.1 sends its own name as `Host`) and against web
/// pages of other origins.
#[derive(Debug)]
pub(super) struct HostPolicy {
    /// Host names (lower case, IPv6 in brackets) accepted with any port.
    names: Vec<String>,
    /// The port we listen on: an `Origin` must name it.
    port: u16,
}

impl HostPolicy {
    pub(super) fn new(listen: &str, local: SocketAddr) -> Self {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        if let Some((host, _)) = split_host_port(listen) {
            names.push(host.to_ascii_lowercase());
        }
        names.push(ip_literal(local.ip()));
        names.sort();
        names.dedup();
        Self {
            names,
            port: local.port(),
        }
    }

    fn name_allowed(&self, name: &str, local_ip: Option<IpAddr>) -> bool {
        let name = name.to_ascii_lowercase();
        // The IP literal the client connected to cannot be a rebinding: that needs a DNS name.
        self.names.contains(&name) || local_ip.is_some_and(|ip| ip_literal(ip) == name)
    }

    /// Whether a `Host` header names us.
    pub(super) fn host_allowed(&self, host: &str, local_ip: Option<IpAddr>) -> bool {
        split_host_port(host).is_some_and(|(name, _)| self.name_allowed(name, local_ip))
    }

    /// Whether an `Origin` header is our own origin: http(s), one of our names, our port.
    pub(super) fn origin_allowed(&self, origin: &str, local_ip: Option<IpAddr>) -> bool {
        let (rest, default_port) = if let Some(rest) = origin.strip_prefix("http://") {
            (rest, 80)
        } else if let Some(rest) = origin.strip_prefix("https://") {
            (rest, 443)
        } else {
            return false;
        };
        match split_host_port(rest) {
            Some((name, port)) => {
                self.name_allowed(name, local_ip) && port.unwrap_or(default_port) == self.port
            }
            None => false,
        }
    }
}

fn ip_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("[{v6}]"),
        },
    }
}

/// `name[:port]` or `[v6][:port]` → (name, port). `None` when malformed.
fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = if text.starts_with('[') {
        let end = text.find(']')?;
        let (name, rest) = text.split_at(end + 1);
        match rest {
            "" => (name, None),
            _ => (name, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match text.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (text, None),
        }
    };
    let well_formed = match name.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        }
    };
    if !well_formed {
        return None;
    }
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    Some((name, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn host_and_origin_policy() {
        let policy = HostPolicy::new("127.0.0.1:0", "127.0.0.1:7878".parse().unwrap());
        for ok in [
            "localhost",
            "LOCALHOST:1",
            "127.0.0.1:7878",
            "[::1]:7878",
            "[::1]",
        ] {
            assert!(policy.host_allowed(ok, None), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7878",
            "127.0.0.1.evil.example",
            "localhost:x",
            "",
            "[::1",
            "user@localhost",
        ] {
            assert!(!policy.host_allowed(bad, None), "{bad}");
        }
        let lan: IpAddr = "192.168.1.5".parse().unwrap();
        assert!(policy.host_allowed("192.168.1.5:7878", Some(lan)));
        assert!(policy.origin_allowed("http://localhost:7878", None));
        assert!(policy.origin_allowed("http://[::1]:7878", None));
        assert!(!policy.origin_allowed("http://localhost:3000", None));
        assert!(!policy.origin_allowed("http://evil.example:7878", None));
        assert!(!policy.origin_allowed("null", None));
    }
}
