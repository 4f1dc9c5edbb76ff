//! Entry points of the fuzz targets in `tests/fuzz` (cargo-fuzz), one per target, each taking
//! the fuzzer's bytes. Not an API: it exists only with the `fuzzing` feature (and in this
//! crate's unit tests, which run every entry point over the committed seeds).
//!
//! Each entry point panics only when it finds a bug: a panic or hang in the code under test,
//! or a broken invariant that it checks (named in its docs).

use std::sync::OnceLock;

use serde_json::{Map, Value};

use crate::config::PluginsConfig;
use crate::hooks::{HookPoint, HookSpec, parse_answer};
use crate::{HookMode, HookResult};

/// Longest input an entry point looks at; past it, the input is cut (the parsers under test
/// have no size limit of their own that a longer input would reach more of).
const MAX_INPUT: usize = 64 * 1024;

fn cut(data: &[u8]) -> &[u8] {
    &data[..data.len().min(MAX_INPUT)]
}

/// Hook points with each kind of write policy the hook engine enforces: none, several fields,
/// one field (the worker's `task.received`, `task.before_handle` and `task.after_handle`).
const FUZZ_POINTS: &[HookSpec] = &[
    HookSpec {
        name: "read.only",
        description: "",
        payload: &[],
        writable: &[],
    },
    HookSpec {
        name: "input.meta",
        description: "",
        payload: &[],
        writable: &["input", "meta"],
    },
    HookSpec {
        name: "before.handle",
        description: "",
        payload: &[],
        writable: &["handler", "variant", "input", "meta"],
    },
    HookSpec {
        name: "output",
        description: "",
        payload: &[],
        writable: &["output"],
    },
];

/// The configuration file parser: `data` as the text of `plugins.json`, then the settings and
/// hook settings of every plugin it names.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(cut(data)) else {
        return;
    };
    let Ok(config) = PluginsConfig::parse(text) else {
        return;
    };
    let names = config
        .plugins
        .keys()
        .chain(config.sets.values().flat_map(|set| set.plugins.iter()));
    for name in names {
        let settings = config.settings(name);
        for hook in settings.hooks.keys() {
            let _ = config.hook_settings(&settings, name, hook, (0, HookMode::Sequential));
        }
    }
}

/// A plugin's hook answer and its modification applied to a payload.
///
/// `data` is: one byte choosing the hook point, then the payload as JSON text, a NUL byte, and
/// the answer as the plugin would return it (not necessarily JSON or UTF-8). A payload that is
/// not JSON is replaced by an object with every field of the point.
///
/// Checks that a modification changes only the point's writable fields, and that a field it
/// may write ends up with the value the plugin gave.
///
/// # Panics
///
/// When the check fails.
pub fn hook_answer(data: &[u8]) {
    let data = cut(data);
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let spec = &FUZZ_POINTS[usize::from(selector) % FUZZ_POINTS.len()];
    let point = crate::host::At {
        point: HookPoint::declared(FUZZ_POINTS, spec.name),
        spec,
    };
    let (payload, answer) = match rest.iter().position(|&b| b == 0) {
        Some(nul) => (&rest[..nul], &rest[nul + 1..]),
        None => (&rest[..0], rest),
    };
    let mut payload = serde_json::from_slice(payload).unwrap_or_else(|_| {
        let fields = [
            "id", "type", "input", "meta", "handler", "variant", "output",
        ];
        Value::Object(
            fields
                .into_iter()
                .map(|f| (f.to_owned(), Value::from(f)))
                .collect(),
        )
    });
    // The host hands plugin answers to `parse_answer` only once they are valid UTF-8.
    let answer = std::str::from_utf8(answer).ok();
    let Ok(HookResult::Modify(fields)) = parse_answer(answer) else {
        return;
    };
    let before = payload.clone();
    let changed = crate::host::apply_patch(point, "fuzz", &mut payload, fields.clone());
    check_patch(point, &before, &payload, &fields, changed);
}

fn check_patch(
    point: crate::host::At,
    before: &Value,
    after: &Value,
    fields: &Map<String, Value>,
    changed: bool,
) {
    let writable = point.spec.writable;
    let (Some(before), Some(after)) = (before.as_object(), after.as_object()) else {
        assert_eq!(before, after, "a payload that is not an object was changed");
        assert!(
            !changed,
            "a payload that is not an object reported a change"
        );
        return;
    };
    for (key, value) in before {
        if !writable.contains(&key.as_str()) {
            assert_eq!(
                after.get(key),
                Some(value),
                "{point}: read-only field `{key}` was changed"
            );
        }
    }
    for (key, value) in after {
        if writable.contains(&key.as_str()) && fields.contains_key(key) {
            assert_eq!(
                fields.get(key),
                Some(value),
                "{point}: `{key}` is not what the plugin wrote"
            );
        } else {
            assert_eq!(
                before.get(key),
                Some(value),
                "{point}: field `{key}` appeared or changed without a writable modification"
            );
        }
    }
    let expected = fields.keys().any(|k| writable.contains(&k.as_str()));
    assert_eq!(changed, expected, "{point}: wrong `changed` for {fields:?}");
}

fn fail(what: &str, e: &dyn std::fmt::Display) -> ! {
    panic!("setting up a fuzz target: {what}: {e:#}")
}

/// A scratch directory for the whole run, for files a target writes.
fn scratch() -> &'static tempfile::TempDir {
    static SCRATCH: OnceLock<tempfile::TempDir> = OnceLock::new();
    SCRATCH.get_or_init(|| tempfile::tempdir().unwrap_or_else(|e| fail("temporary directory", &e)))
}

/// The ELF pre-check of plugin files: `data` as the bytes of a file in `plugins/`.
///
/// Checks that a file the pre-check accepts is also complete by the watcher's check (which
/// reads only its head), so that an accepted file is never held back as half-written.
///
/// # Panics
///
/// When the check fails.
pub fn elf_precheck(data: &[u8]) {
    let data = cut(data);
    let checked = crate::loader::check_elf(data);
    // Every refusal is shown to users: writing it out must not fail either.
    let shown = match &checked {
        Ok(location) => format!("{:#x}", location.vaddr()),
        Err(e) => e.to_string(),
    };
    assert!(!shown.is_empty());
    if checked.is_ok() {
        let path = scratch().path().join("accepted.so");
        if std::fs::write(&path, data).is_ok() {
            let complete = crate::loader::check_complete(&path);
            assert!(
                complete.is_ok(),
                "the pre-check accepted a file the completeness check refuses: {complete:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every entry point over the committed seeds (`tests/fuzz/seeds/<target>/`), so that the
    //! targets keep compiling and the seeds keep passing without the fuzzer.

    use std::path::PathBuf;

    fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fuzz/seeds")
            .join(target);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                (path, data)
            })
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
        seeds
    }

    fn run(target: &str, entry: fn(&[u8])) {
        for (path, data) in seeds(target) {
            eprintln!("{target}: {}", path.display());
            entry(&data);
        }
    }

    #[test]
    fn config_seeds() {
        run("config", super::config);
    }

    #[test]
    fn hook_answer_seeds() {
        run("hook_answer", super::hook_answer);
    }

    #[test]
    fn elf_precheck_seeds() {
        run("elf_precheck", super::elf_precheck);
    }

    #[test]
    fn the_minimal_plugin_seed_passes_the_precheck() {
        // The fuzzer mutates from this seed; one the pre-check refuses would leave the accepting
        // paths unexplored.
        let seed = seeds("elf_precheck")
            .into_iter()
            .find(|(path, _)| path.ends_with("minimal.so"))
            .expect("the seed minimal.so");
        let checked = crate::loader::check_elf(&seed.1);
        assert!(checked.is_ok(), "{checked:?}");
    }

    #[test]
    #[should_panic(expected = "read-only field `id` was changed")]
    fn the_patch_check_catches_a_forged_read_only_field() {
        let before = serde_json::json!({"id": "1", "input": "x"});
        let after = serde_json::json!({"id": "forged", "input": "x"});
        let fields = serde_json::Map::new();
        let spec = &super::FUZZ_POINTS[1];
        super::check_patch(
            crate::host::At {
                point: crate::HookPoint::declared(super::FUZZ_POINTS, spec.name),
                spec,
            },
            &before,
            &after,
            &fields,
            false,
        );
    }
}
