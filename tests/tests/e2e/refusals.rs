//! Every reason a file is refused, each with an error that names the file and the reason; the
//! other files in the directory load regardless.

use host::LoadError;
use serde_json::json;
use tests::{PluginDir, built_plugin, fixture_build, header_offset, patched};

/// Loads `file` and returns the refusal, checking that its message names the file.
fn refusal(dir: &PluginDir, file: &std::path::Path) -> LoadError {
    let host = dir.host();
    let err = host.load(file).expect_err("the file must be refused");
    let message = format!("{err:#}");
    assert!(
        message.contains(&file.display().to_string()),
        "message does not name the file: {message}"
    );
    assert!(host.plugins().is_empty());
    assert_eq!(host.refused().len(), 1);
    assert_eq!(host.refused()[0].file, file);
    assert!(
        dir.shadow_files().is_empty(),
        "a refused file left a shadow copy behind"
    );
    err.downcast_ref::<LoadError>()
        .cloned()
        .expect("a LoadError")
}

#[test]
fn not_a_shared_library() {
    let dir = PluginDir::new();
    let file = dir.write("libnotes.so", b"these are my notes, not a plugin\n");
    let err = refusal(&dir, &file);
    assert!(matches!(err, LoadError::NotSharedLibrary { .. }), "{err:?}");
}

#[test]
fn empty_file() {
    let dir = PluginDir::new();
    let file = dir.write("libempty.so", b"");
    assert_eq!(refusal(&dir, &file), LoadError::Empty);
}

#[test]
fn truncated_file() {
    let dir = PluginDir::new();
    let whole = std::fs::read(built_plugin("echo")).unwrap();
    for fraction in [10, 50, 99] {
        let file = dir.write("libhalf.so", &whole[..whole.len() * fraction / 100]);
        let err = refusal(&dir, &file);
        assert!(
            matches!(err, LoadError::Truncated { .. }),
            "{fraction}%: {err:?}"
        );
    }
}

#[test]
fn executable_is_not_a_shared_library() {
    let dir = PluginDir::new();
    let exe = std::env::current_exe().unwrap();
    let file = dir.add_file(&exe, "libexe.so");
    let err = refusal(&dir, &file);
    // Test binaries are position-independent executables, which are ET_DYN too: whatever the
    // loader or the header check says, it must be refused with a reason.
    assert!(
        matches!(
            err,
            LoadError::NotSharedLibrary { .. }
                | LoadError::NotLoadable { .. }
                | LoadError::NoHeader
        ),
        "{err:?}"
    );
}

#[test]
fn no_header_symbol() {
    let dir = PluginDir::new();
    let bytes = patched(
        &built_plugin("echo"),
        b"PLUGIN_HOST_HEADER",
        b"PLUGIN_HOST_HEADEX",
    );
    let file = dir.write("libnoheader.so", &bytes);
    assert_eq!(refusal(&dir, &file), LoadError::NoHeader);
}

#[test]
fn wrong_magic() {
    let dir = PluginDir::new();
    let mut bytes = std::fs::read(built_plugin("echo")).unwrap();
    let at = header_offset(&bytes);
    bytes[at] ^= 0xff;
    let file = dir.write("libmagic.so", &bytes);
    assert_eq!(refusal(&dir, &file), LoadError::BadMagic);
}

#[test]
fn wrong_header_version() {
    let dir = PluginDir::new();
    let mut bytes = std::fs::read(built_plugin("echo")).unwrap();
    let at = header_offset(&bytes) + 8;
    bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let file = dir.write("libversion.so", &bytes);
    let err = refusal(&dir, &file);
    assert_eq!(
        err,
        LoadError::HeaderVersion {
            found: 99,
            supported: 1
        }
    );
    assert!(err.to_string().contains("rebuild the plugin"), "{err}");
}

#[test]
fn incompatible_abi_stable() {
    let dir = PluginDir::new();
    let mut bytes = std::fs::read(built_plugin("echo")).unwrap();
    // Header layout: magic [u8; 8], version u32, panic_unwind bool, then abi_stable's AbiHeader
    // (align 4): magic_string [u8; 32] at 16, abi_major u32 at 48.
    let at = header_offset(&bytes) + 48;
    bytes[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
    let file = dir.write("libabi.so", &bytes);
    let err = refusal(&dir, &file);
    assert!(
        matches!(err, LoadError::AbiStableMismatch { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("7."), "{err}");
}

#[test]
fn incompatible_function_table() {
    let dir = PluginDir::new();
    let file = dir.add_file(&fixture_build("table-incompatible"), "libincompatible.so");
    let err = refusal(&dir, &file);
    let LoadError::LayoutMismatch { details } = &err else {
        panic!("expected a layout mismatch, got {err:?}");
    };
    assert!(
        details.contains("execute"),
        "the message does not say which field differs: {details}"
    );
    assert!(
        details.contains("u64"),
        "the message does not say what differs: {details}"
    );
}

#[test]
fn built_with_panic_abort() {
    let dir = PluginDir::new();
    let file = dir.add_file(&fixture_build("panic-abort"), "libabort.so");
    assert_eq!(refusal(&dir, &file), LoadError::PanicAbort);
}

#[test]
fn create_fails() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {"create": "fail"}}}));
    let file = dir.add("fixture", "libfixture.so");
    let err = refusal(&dir, &file);
    assert_eq!(
        err,
        LoadError::CreateFailed {
            plugin: "fixture".into(),
            message: "configured to fail at create".into()
        }
    );
}

#[test]
fn create_panics() {
    let dir = PluginDir::new();
    dir.configure(&json!({"fixture": {"config": {"create": "panic"}}}));
    let file = dir.add("fixture", "libfixture.so");
    let err = refusal(&dir, &file);
    assert_eq!(
        err,
        LoadError::CreatePanicked {
            plugin: "fixture".into(),
            message: "configured to panic at create".into()
        }
    );
}

#[test]
fn disabled_in_configuration() {
    let dir = PluginDir::new();
    dir.configure(&json!({"echo": {"enabled": false}}));
    let file = dir.add("echo", "libecho.so");
    assert_eq!(
        refusal(&dir, &file),
        LoadError::Disabled {
            plugin: "echo".into()
        }
    );
}

#[test]
fn duplicate_name_the_loaded_file_keeps_it() {
    let dir = PluginDir::new();
    let first = dir.add("echo", "liba_echo.so");
    let host = dir.host();
    host.scan().unwrap();
    // A newcomer claiming a loaded plugin's name is refused; the loaded one keeps serving.
    let second = dir.add("echo", "libb_echo.so");
    let report = host.scan().unwrap();
    assert!(report.loaded.is_empty());
    assert_eq!(host.plugin("echo").unwrap().file, first);
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.refused[0].file, second);
    assert_eq!(
        report.refused[0].error,
        Some(LoadError::DuplicateName {
            plugin: "echo".into(),
            loaded_from: first
        })
    );
}

#[test]
fn one_bad_file_does_not_stop_the_others() {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    dir.add("faulty", "libfaulty.so");
    dir.write("libbroken.so", b"\x7fELF and then nothing useful");
    dir.write("readme.txt", b"not a plugin and not a .so: ignored");
    let host = dir.host();
    let report = host.scan().unwrap();
    assert_eq!(report.loaded, ["echo", "faulty"]);
    assert_eq!(report.refused.len(), 1);
    assert!(report.refused[0].reason.contains("libbroken.so"));
    assert_eq!(host.execute("echo", "echo", &json!(1)), Some(json!(1)));
}

#[test]
fn missing_directory_is_an_error_that_says_what_to_do() {
    let dir = PluginDir::new();
    let host = host::PluginHost::builder(dir.path().join("nope"))
        .with_shadow_dir(dir.shadow())
        .build()
        .unwrap();
    let message = format!("{:#}", host.scan().unwrap_err());
    assert!(
        message.contains("nope") && message.contains("--plugins"),
        "{message}"
    );
}

#[test]
fn invalid_configuration_file_names_file_and_field() {
    let dir = PluginDir::new();
    std::fs::write(
        dir.path().join("plugins.json"),
        r#"{"plugins": {"echo": {"enabled": "yes"}}}"#,
    )
    .unwrap();
    let err = host::PluginHost::builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .build()
        .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("plugins.json"), "{message}");
    assert!(message.contains("line 1"), "{message}");
}
