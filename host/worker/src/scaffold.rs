//! `worker new NAME [--path DIR]`: a plugin crate that builds and loads as it is.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, bail};
use plugin_host::text::EscapePath;

/// This repository's root, where the worker was built from (its `plugin-api` is the one the
/// worker loads).
fn repository_root() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = std::fs::canonicalize(root).ok()?;
    root.join("plugin-api/Cargo.toml").is_file().then_some(root)
}

/// The path from directory `from` to `to`, both absolute and resolved.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part.as_os_str());
    }
    path
}

/// The `plugin-api` dependency line for a crate in `dir` (absolute, resolved).
fn plugin_api_dependency(dir: &Path) -> anyhow::Result<String> {
    let root = repository_root();
    if let Some(root) = &root
        && dir.starts_with(root)
    {
        let path = relative(dir, &root.join("plugin-api"));
        return Ok(format!(
            "plugin-api = {{ path = {} }}",
            toml_string(&path.display().to_string())
        ));
    }
    if let Some(url) = option_env!("CARGO_PKG_REPOSITORY").filter(|u| !u.is_empty()) {
        return Ok(format!("plugin-api = {{ git = {} }}", toml_string(url)));
    }
    match root {
        Some(root) => Ok(format!(
            "# This repository declares no `repository` URL to depend on with `git`: the checkout the\n# worker was built from, by path.\nplugin-api = {{ path = {} }}",
            toml_string(&root.join("plugin-api").display().to_string())
        )),
        None => bail!(
            "cannot tell where plugin-api is: the checkout this worker was built from is gone and the workspace declares no `repository` URL; create the crate inside a checkout of this repository (--path), or set the plugin-api dependency by hand"
        ),
    }
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `rate-limiter` -> `RateLimiter`.
fn type_name(name: &str) -> String {
    // Suffixed, so that no name makes a type that is a keyword (`Self`) or one the template
    // imports (`Plugin`, `Hooks`, ...).
    let base: String = name
        .split(['-', '_'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect();
    format!("{base}Plugin")
}

/// Names cargo or rustc refuse for a crate (keywords, the standard crates) or that would clash
/// with the crate's own dependency.
const RESERVED: [&str; 58] = [
    "as",
    "async",
    "await",
    "break",
    "const",
    "continue",
    "crate",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "fn",
    "for",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "match",
    "mod",
    "move",
    "mut",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "struct",
    "super",
    "trait",
    "true",
    "type",
    "unsafe",
    "use",
    "where",
    "while",
    "abstract",
    "become",
    "box",
    "do",
    "final",
    "gen",
    "macro",
    "override",
    "priv",
    "try",
    "typeof",
    "unsized",
    "virtual",
    "yield",
    "std",
    "core",
    "alloc",
    "test",
    "proc_macro",
    "plugin-api",
    "plugin_api",
];

/// Writes the crate `name` into `dir` (default `./NAME`); answers the directory.
///
/// # Errors
///
/// The name is not a crate name, the directory exists and is not empty, or a file cannot be
/// written.
pub(crate) fn new_plugin(name: &str, dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "`{}` is not a plugin name: use lowercase ASCII letters, digits, `-` and `_`, starting with a letter (at most 64 characters)",
            plugin_host::text::escape_control(name)
        );
    }
    if RESERVED.contains(&name) {
        bail!(
            "`{name}` cannot name a crate (a Rust keyword, a standard crate, or this crate's own dependency): choose another name"
        );
    }
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if dir
        .read_dir()
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false)
    {
        bail!(
            "{} exists and is not empty; give another --path",
            EscapePath(&dir)
        );
    }
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", EscapePath(&dir)))?;
    let absolute =
        std::fs::canonicalize(&dir).with_context(|| format!("resolving {}", EscapePath(&dir)))?;
    let dependency = plugin_api_dependency(&absolute)?;
    let manifest = CARGO_TOML
        .replace("{name}", name)
        .replace("{plugin_api}", &dependency);
    let lib = LIB_RS
        .replace("{name}", name)
        .replace("{Type}", &type_name(name));
    let write = |file: &str, text: &str| {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", EscapePath(&path)))
    };
    write("Cargo.toml", &manifest)?;
    write("src/lib.rs", &lib)?;
    write(".gitignore", "/target\n")?;
    Ok(dir)
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the .so the worker loads; rlib: lets the tests link the plugin directly.
crate-type = ["cdylib", "rlib"]

[dependencies]
{plugin_api}
serde = { version = "1", features = ["derive"] }
tracing = "0.1"

# A workspace of its own: the crate builds where it is, inside another workspace's directory
# too. To make it a member of an existing workspace instead, remove this and add it there.
[workspace]
"#;

const LIB_RS: &str = r##"//! The `{name}` plugin: one typed method, one hook, state kept across reloads and restarts.
//!
//! Build: `cargo build --release`, then drop `target/release/lib*.so` into the worker's plugins
//! directory (copy it under a temporary name and rename it into place while a worker runs).

use std::sync::atomic::{AtomicU64, Ordering};

use plugin_api::{
    HookMode, HookResult, Hooks, Methods, Plugin, PluginError, PluginInfo, export_plugin,
};
use serde::{Deserialize, Serialize};

/// The plugin: counts greetings and scored tasks.
#[derive(Debug)]
pub struct {Type} {
    greeting: String,
    greeted: AtomicU64,
    scored: AtomicU64,
}

/// The configuration (`plugins.json`: `{"plugins": {"{name}": {"config": {"greeting": "Hi"}}}}`);
/// every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    greeting: Option<String>,
}

/// What survives a reload and a restart (saved in the worker's state directory).
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    greeted: u64,
    scored: u64,
}

/// The params of `hello`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Who to greet.
    pub name: String,
}

/// The answer of `hello`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Greeting {
    /// The greeting.
    pub text: String,
    /// How many greetings so far, this one included.
    pub number: u64,
}

/// The fields of the `task.scored` payload this plugin reads (the others are skipped).
#[derive(Debug, Deserialize)]
struct Scored {
    #[serde(default)]
    score: Option<f64>,
}

impl Plugin for {Type} {
    type Config = Config;
    type State = State;

    fn info() -> PluginInfo {
        PluginInfo::new("{name}", env!("CARGO_PKG_VERSION"), "Greets people; counts scored tasks")
    }

    fn create(config: Config) -> Result<Self, PluginError> {
        let greeting = config.greeting.unwrap_or_else(|| "Hello".to_owned());
        if greeting.is_empty() {
            return Err(PluginError::new("greeting: must not be empty"));
        }
        Ok(Self {
            greeting,
            greeted: AtomicU64::new(0),
            scored: AtomicU64::new(0),
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods.method("hello", "Greets {\"name\"}", |this: &Self, p: Hello| {
            let number = this.greeted.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(name = %p.name, number, "greeting");
            Ok(Greeting {
                text: format!("{}, {}!", this.greeting, p.name),
                number,
            })
        });
        methods.method(
            "scored",
            "How many scored tasks it has seen",
            |this: &Self, _: serde::de::IgnoredAny| Ok(this.scored.load(Ordering::Relaxed)),
        );
    }

    fn hooks(hooks: &mut Hooks<Self>) {
        // Audit: sees each scored task read-only, after the sequential subscribers.
        hooks.on("task.scored", 100, HookMode::Audit, |this: &Self, task: Scored| {
            if task.score.is_some() {
                this.scored.fetch_add(1, Ordering::Relaxed);
            }
            Ok(HookResult::Continue)
        });
    }

    fn save_state(&self) -> Result<Option<State>, PluginError> {
        Ok(Some(State {
            greeted: self.greeted.load(Ordering::Relaxed),
            scored: self.scored.load(Ordering::Relaxed),
        }))
    }

    fn restore_state(&self, state: State) -> Result<(), PluginError> {
        self.greeted.store(state.greeted, Ordering::Relaxed);
        self.scored.store(state.scored, Ordering::Relaxed);
        Ok(())
    }
}

export_plugin!({Type});

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::Harness;

    #[test]
    fn greets_counts_and_keeps_its_counts_across_a_reload() -> Result<(), PluginError> {
        let plugin = Harness::<{Type}>::new(())?;
        let ada = Hello { name: "Ada".to_owned() };
        let first: Greeting = plugin.call("hello", &ada)?;
        assert_eq!(first.text, "Hello, Ada!");
        assert_eq!(first.number, 1);

        plugin.hook("task.scored", r#"{"id": "t1", "score": 0.5}"#)?;
        assert_eq!(plugin.call::<u64>("scored", &())?, 1);

        let reloaded = plugin.reload()?;
        let second: Greeting = reloaded.call("hello", &ada)?;
        assert_eq!(second.number, 2);
        assert_eq!(reloaded.call::<u64>("scored", &())?, 1);
        Ok(())
    }

    #[test]
    fn an_empty_greeting_is_refused() {
        #[derive(Serialize)]
        struct Raw {
            greeting: &'static str,
        }
        let refused = Harness::<{Type}>::new(Raw { greeting: "" });
        assert!(refused.is_err());
    }
}
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_and_type_names() {
        assert_eq!(
            relative(Path::new("/a/b/c"), Path::new("/a/plugin-api")),
            PathBuf::from("../../plugin-api")
        );
        assert_eq!(type_name("rate-limiter"), "RateLimiterPlugin");
        assert_eq!(type_name("echo_2"), "Echo2Plugin");
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
