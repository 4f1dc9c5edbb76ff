//! How a file in `plugins/` becomes a loaded plugin, against hostile files and hostile local
//! users: the shadow directory, the ELF pre-check before any code of the file runs, the header
//! pointers, file types, ownership and permissions, size, writers still at work, names, and two
//! files claiming one name. Hostile C libraries are compiled by the tests with the system's C
//! compiler (`cc`, or `$CC`).

use crate::worker;
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugin_host::LoadErrorKind;
use serde_json::{Value, json};
use tests::{PluginDir, built_plugin, drop_in, eventually};

const PATIENCE: Duration = Duration::from_secs(20);

/// A user id that is neither root nor the tests' user.
const OTHER_USER: u32 = 65534;

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `worker list --json`, which must succeed: (loaded plugin names, refused (file name, reason)).
fn list(
    dir: &PluginDir,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vec<String>, Vec<(String, String)>) {
    let mut args = extra.to_vec();
    args.extend(["list", "--json"]);
    let output = worker(dir, &args, env);
    assert!(
        output.status.success(),
        "worker list failed ({}): {}",
        output.status,
        stderr(&output)
    );
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let loaded = report["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    let refused = report["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let file = Path::new(r["file"].as_str().unwrap());
            (
                file.file_name().unwrap().to_string_lossy().into_owned(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (loaded, refused)
}

/// The reason `file_name` was refused, or a panic listing what was.
fn reason_for<'a>(refused: &'a [(String, String)], file_name: &str) -> &'a str {
    refused
        .iter()
        .find(|(f, _)| f == file_name)
        .map(|(_, r)| r.as_str())
        .unwrap_or_else(|| panic!("{file_name} is not listed as refused: {refused:#?}"))
}

/// Compiles C `source` into the shared library `<out>/<name>.so`.
fn cc(out: &Path, name: &str, source: &str, defines: &[String]) -> PathBuf {
    let src = out.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let so = out.join(format!("{name}.so"));
    let compiler = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let output = Command::new(compiler)
        .args(["-shared", "-fPIC", "-O0", "-o"])
        .arg(&so)
        .arg(&src)
        .args(defines)
        .output()
        .expect("a C compiler (cc) runs");
    assert!(
        output.status.success(),
        "compiling {name}.c failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    so
}

/// A constructor that writes `MARKER`: proof that the library's code ran.
const MARKER_CONSTRUCTOR: &str = r#"
#include <stdio.h>
static void mark(const char *what) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fputs(what, f); fclose(f); }
}
__attribute__((constructor)) static void constructor(void) { mark("constructor ran\n"); }
"#;

fn marker_define(marker: &Path) -> String {
    format!("-DMARKER=\"{}\"", marker.display())
}

fn header_size() -> usize {
    std::mem::size_of::<plugin_api::abi::PluginHeader>()
}

/// The path of the C library this process runs with.
fn system_libc() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let path = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))
        })
        .expect("this process maps libc");
    PathBuf::from(path)
}

/// Lines of the dynamic loader's debug output (`LD_DEBUG=files`) saying it ran the
/// initializers of a library loaded from a shadow directory.
fn initializers_run(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("calling init:") && l.contains("plugin-host-"))
        .collect()
}

#[test]
fn non_plugins_are_refused_before_any_of_their_code_runs() {
    let dir = PluginDir::new();
    let build = tempfile::tempdir().unwrap();
    let marker = build.path().join("marker");
    let with_marker = [marker_define(&marker)];
    let constructor = cc(
        build.path(),
        "constructor",
        MARKER_CONSTRUCTOR,
        &with_marker,
    );
    dir.add_file(&constructor, "libconstructor.so");
    let aborts = cc(
        build.path(),
        "aborts",
        "#include <stdlib.h>\n__attribute__((constructor)) static void constructor(void) { abort(); }\n",
        &[],
    );
    dir.add_file(&aborts, "libaborts.so");
    dir.add_file(&system_libc(), "libc.so");
    dir.add("echo", "libecho.so");

    let output = worker(&dir, &["list", "--json"], &[("LD_DEBUG", "files")]);
    assert!(
        output.status.success(),
        "worker list did not survive ({}): {}",
        output.status,
        stderr(&output)
    );
    assert!(
        !marker.exists(),
        "a constructor ran: {}",
        std::fs::read_to_string(&marker).unwrap_or_default()
    );
    let log = stderr(&output);
    let ran = initializers_run(&log);
    assert_eq!(ran.len(), 1, "only echo's initializers may run: {ran:#?}");
    assert!(ran[0].contains("libecho."), "{ran:#?}");

    let (loaded, refused) = list(&dir, &[], &[]);
    assert_eq!(loaded, ["echo"]);
    assert_eq!(refused.len(), 3, "{refused:#?}");
    for file in ["libconstructor.so", "libaborts.so", "libc.so"] {
        let reason = reason_for(&refused, file);
        assert!(
            reason.contains("no plugin header symbol `PLUGIN_HOST_HEADER`"),
            "{file}: {reason}"
        );
    }
}

#[test]
fn a_header_symbol_that_is_not_a_header_object_is_refused_before_loading() {
    let dir = PluginDir::new();
    let build = tempfile::tempdir().unwrap();
    let marker = build.path().join("marker");
    let defines = [marker_define(&marker)];
    let absolute = format!(
        "{MARKER_CONSTRUCTOR}\n__asm__(\".globl PLUGIN_HOST_HEADER\\n.type PLUGIN_HOST_HEADER, @object\\n.size PLUGIN_HOST_HEADER, {size}\\n.set PLUGIN_HOST_HEADER, 0\\n\");\n",
        size = header_size()
    );
    let function =
        format!("{MARKER_CONSTRUCTOR}\nvoid PLUGIN_HOST_HEADER(void) {{ mark(\"called\\n\"); }}\n");
    let ifunc = format!(
        "{MARKER_CONSTRUCTOR}\nstatic void target(void) {{}}\nstatic void *resolve(void) {{ mark(\"resolver ran\\n\"); return (void *)target; }}\nvoid PLUGIN_HOST_HEADER(void) __attribute__((ifunc(\"resolve\")));\n"
    );
    let small = format!(
        "{MARKER_CONSTRUCTOR}\nconst unsigned char PLUGIN_HOST_HEADER[16] = {{'P','l','g','H','o','s','t',1, 1,0,0,0, 1,0,0,0}};\n"
    );
    for (name, source) in [
        ("absolute", absolute),
        ("function", function),
        ("ifunc", ifunc),
        ("small", small),
    ] {
        let so = cc(build.path(), name, &source, &defines);
        dir.add_file(&so, &format!("lib{name}.so"));
    }
    let output = worker(&dir, &["list"], &[("LD_DEBUG", "files")]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        !marker.exists(),
        "library code ran: {}",
        std::fs::read_to_string(&marker).unwrap_or_default()
    );
    assert_eq!(initializers_run(&stderr(&output)), Vec::<&str>::new());
    let (loaded, refused) = list(&dir, &[], &[]);
    assert!(loaded.is_empty());
    for (file, why) in [
        ("libabsolute.so", "absolute symbol"),
        ("libfunction.so", "a function"),
        ("libifunc.so", "an IFUNC"),
        ("libsmall.so", "it is 16 bytes"),
    ] {
        let reason = reason_for(&refused, file);
        assert!(
            reason.contains(why) && reason.contains("none of its code ran"),
            "{file}: {reason}"
        );
    }
}

/// C source of a library exporting a header that is right in everything (magic, version,
/// panic strategy, abi_stable's header) but its pointers, which are `layout` and `table` (C
/// expressions). A host that checks the abi_stable header and then follows the layout pointer
/// crashes on it.
fn header_source(layout: &str, table: &str) -> String {
    use abi_stable::library::AbiHeader;
    use plugin_api::abi::PluginHeader;
    let layout_at = std::mem::offset_of!(PluginHeader, table_layout);
    let table_at = std::mem::offset_of!(PluginHeader, table);
    let abi_at = std::mem::offset_of!(PluginHeader, abi);
    let pointer = std::mem::size_of::<usize>();
    assert_eq!(table_at, layout_at + pointer, "the header layout changed");
    assert_eq!(
        header_size(),
        table_at + pointer,
        "the header layout changed"
    );
    // The bytes between `panic_unwind` (at 12) and `table_layout`: padding and abi_stable's
    // header, as this very abi_stable writes it.
    let abi = AbiHeader::VALUE;
    let mut abi_bytes = abi.magic_string.to_vec();
    abi_bytes.extend_from_slice(&abi.abi_major.to_ne_bytes());
    abi_bytes.extend_from_slice(&abi.abi_minor.to_ne_bytes());
    let mut middle = vec![0u8; layout_at - 13];
    middle[abi_at - 13..abi_at - 13 + abi_bytes.len()].copy_from_slice(&abi_bytes);
    let middle: Vec<String> = middle.iter().map(u8::to_string).collect();
    let middle_bytes = middle.join(", ");
    format!(
        r#"
#include <stdint.h>
struct header {{
    unsigned char magic[8];
    uint32_t version;
    unsigned char panic_unwind;
    unsigned char middle[{middle}];
    const void *table_layout;
    const void *table;
}};
_Static_assert(sizeof(struct header) == {size}, "header size");
extern const struct header PLUGIN_HOST_HEADER;
const struct header PLUGIN_HOST_HEADER = {{
    {{'P', 'l', 'g', 'H', 'o', 's', 't', 1}}, {version}, 1, {{{middle_bytes}}}, {layout}, {table}
}};
"#,
        middle = layout_at - 13,
        size = header_size(),
        version = plugin_api::abi::HEADER_VERSION,
    )
}

#[test]
fn header_pointers_outside_the_library_are_refused_not_followed() {
    let dir = PluginDir::new();
    let build = tempfile::tempdir().unwrap();
    for (name, layout, table) in [
        ("badlayout", "(const void *)0x10", "(const void *)0x10"),
        (
            "badtable",
            "(const void *)&PLUGIN_HOST_HEADER",
            "(const void *)0xdead0000",
        ),
        // A pointer into another library (the C library's `abort`) is not the plugin's either.
        ("foreign", "(const void *)&abort", "(const void *)&abort"),
    ] {
        let mut source = header_source(layout, table);
        source.insert_str(0, "#include <stdlib.h>\n");
        let so = cc(build.path(), name, &source, &[]);
        dir.add_file(&so, &format!("lib{name}.so"));
    }
    dir.add("echo", "libecho.so");
    let (loaded, refused) = list(&dir, &[], &[]);
    assert_eq!(loaded, ["echo"], "{refused:#?}");
    for (file, field) in [
        ("libbadlayout.so", "`table_layout` pointer"),
        ("libbadtable.so", "`table` pointer"),
        ("libforeign.so", "`table_layout` pointer"),
    ] {
        let reason = reason_for(&refused, file);
        assert!(
            reason.contains(field) && reason.contains("does not point into the library"),
            "{file}: {reason}"
        );
    }
}

#[test]
fn only_regular_files_are_plugins_and_symlinks_are_checked_as_their_target() {
    let dir = PluginDir::new();
    let plugins = dir.path();
    std::fs::create_dir(plugins.join("libdir.so")).unwrap();
    let fifo = Command::new("mkfifo")
        .arg(plugins.join("libfifo.so"))
        .status()
        .unwrap();
    assert!(fifo.success());
    let _socket = std::os::unix::net::UnixListener::bind(plugins.join("libsocket.so")).unwrap();
    std::os::unix::fs::symlink("/dev/null", plugins.join("libnull.so")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/libgone.so", plugins.join("libdangling.so")).unwrap();
    // A symlink to a good plugin in a safe directory loads.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::set_permissions(elsewhere.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let good = elsewhere.path().join("libecho.so");
    std::fs::copy(built_plugin("echo"), &good).unwrap();
    std::os::unix::fs::symlink(&good, plugins.join("libecho.so")).unwrap();
    // One into a directory anyone can write is refused, as that file would be.
    let open_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let exposed = open_dir.path().join("libfaulty.so");
    std::fs::copy(built_plugin("faulty"), &exposed).unwrap();
    std::os::unix::fs::symlink(&exposed, plugins.join("libfaulty.so")).unwrap();

    let (loaded, refused) = list(&dir, &[], &[]);
    assert_eq!(loaded, ["echo"], "{refused:#?}");
    for (file, why) in [
        ("libdir.so", "not a regular file but a directory"),
        ("libfifo.so", "not a regular file but a named pipe"),
        ("libsocket.so", "not a regular file but a socket"),
        ("libnull.so", "a symbolic link to a character device"),
        ("libdangling.so", "target does not exist"),
        ("libfaulty.so", "chmod go-w"),
    ] {
        let reason = reason_for(&refused, file);
        assert!(reason.contains(why), "{file}: {reason}");
    }
    assert_eq!(refused.len(), 6, "{refused:#?}");
}

#[test]
fn files_and_directories_other_users_can_write_are_refused_unless_allowed() {
    let dir = PluginDir::new();
    let writable = dir.add("echo", "libecho.so");
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666)).unwrap();
    let foreign = dir.add("faulty", "libfaulty.so");
    std::os::unix::fs::chown(&foreign, Some(OTHER_USER), None).unwrap();
    let (loaded, refused) = list(&dir, &[], &[]);
    assert!(loaded.is_empty(), "{loaded:?}");
    let reason = reason_for(&refused, "libecho.so");
    assert!(
        reason.contains("writable by group and others")
            && reason.contains(&format!("chmod go-w {}", writable.display()))
            && reason.contains("--insecure-permissions"),
        "{reason}"
    );
    let reason = reason_for(&refused, "libfaulty.so");
    assert!(
        reason.contains(&format!("owned by uid {OTHER_USER}")),
        "{reason}"
    );

    // The option turns the refusals into warnings.
    let output = worker(&dir, &["--insecure-permissions", "list", "--json"], &[]);
    assert!(output.status.success());
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["plugins"].as_array().unwrap().len(), 2, "{report}");
    assert!(
        stderr(&output).contains("insecure permissions allowed"),
        "{}",
        stderr(&output)
    );

    // A plugins directory others can write makes every file in it unsafe.
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&foreign, Some(0), None).unwrap();
    assert_eq!(list(&dir, &[], &[]).0, ["echo", "faulty"]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (loaded, refused) = list(&dir, &[], &[]);
    assert!(loaded.is_empty());
    let reason = reason_for(&refused, "libecho.so");
    assert!(
        reason.contains("plugins directory")
            && reason.contains(&format!("chmod go-w {}", dir.path().display())),
        "{reason}"
    );
}

#[test]
fn files_over_the_size_limit_are_refused_without_being_copied() {
    let dir = PluginDir::new();
    let sparse = dir.path().join("x.so");
    let file = std::fs::File::create(&sparse).unwrap();
    file.write_all_at(b"\x7fELF", 0).unwrap();
    file.set_len(2 << 30).unwrap();
    drop(file);
    let host = dir.host();
    let started = std::time::Instant::now();
    let report = host.scan().unwrap();
    assert!(report.loaded.is_empty());
    assert_eq!(
        report.refused[0].kind,
        LoadErrorKind::TooLarge {
            size: 2 << 30,
            max: 256 << 20
        }
    );
    assert!(dir.shadow_files().is_empty());
    // Not read either: a 2 GiB read would take far longer.
    assert!(started.elapsed() < Duration::from_secs(10));
    std::fs::remove_file(&sparse).unwrap();

    // The limit is configurable: echo (a debug build, over 1 MiB) is refused under 1 MiB.
    dir.add("echo", "libecho.so");
    let (loaded, refused) = list(&dir, &["--max-plugin-size-mb", "1"], &[]);
    assert!(loaded.is_empty());
    let reason = reason_for(&refused, "libecho.so");
    assert!(
        reason.contains("more than the maximum plugin size of 1048576 bytes"),
        "{reason}"
    );
    let limited = plugin_host::PluginHost::builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_max_plugin_size(1 << 20)
        .build()
        .unwrap();
    assert!(limited.scan().unwrap().loaded.is_empty());
    assert_eq!(list(&dir, &[], &[]).0, ["echo"]);
}

/// The file range of `.text` in a plugin file.
fn text_range(bytes: &[u8]) -> std::ops::Range<usize> {
    use object::{Object as _, ObjectSection as _};
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(bytes).unwrap();
    let (start, len) = file.section_by_name(".text").unwrap().file_range().unwrap();
    start as usize..(start + len) as usize
}

#[test]
fn a_file_held_open_for_writing_is_loaded_only_after_its_writer_closes_it() {
    let dir = PluginDir::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
        .arg("--plugins")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.shadow().join("state"))
        .args(["--log", "info", "serve", "--listen", "127.0.0.1:0"])
        .env_remove("WORKER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    {
        let log = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
            }
        });
    }
    let mut started = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut started).unwrap();
    assert!(started.contains("watching for changes"), "{started}");
    // Keep reading what `serve` prints, so its stdout never becomes a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let loaded = || log.lock().unwrap().contains("plugin loaded");

    // The writer preallocates the whole file and writes everything but the code, which comes
    // last: stable, complete ELF headers, a valid plugin header, and zeros for code.
    let whole = std::fs::read(built_plugin("echo")).unwrap();
    let text = text_range(&whole);
    let path = dir.path().join("libecho.so");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(whole.len() as u64).unwrap();
    file.write_all_at(&whole[..text.start], 0).unwrap();
    file.write_all_at(&whole[text.end..], text.end as u64)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the worker died: {}",
        log.lock().unwrap()
    );
    assert!(!loaded(), "loaded while its code was still zeros");
    file.write_all_at(&whole[text.clone()], text.start as u64)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!loaded(), "loaded before its writer closed it");
    drop(file);
    let done = eventually(PATIENCE, loaded);
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "the worker died: {}", log.lock().unwrap());
    assert!(
        done,
        "not loaded after the writer closed it: {}",
        log.lock().unwrap()
    );
}

#[test]
fn invalid_plugin_names_are_refused() {
    let dir = PluginDir::new();
    dir.add("fixture", "libfixture.so");
    let long = "x".repeat(10 * 1024);
    for (name, why) in [
        ("../x", "it starts with `.`"),
        ("/etc/passwd", "it contains '/'"),
        ("a\nb", "it contains '\\n'"),
        (long.as_str(), "it is 10240 bytes long, the limit is 64"),
        (".hidden", "it starts with `.`"),
        ("Echo", "it contains 'E'"),
    ] {
        let (loaded, refused) = list(&dir, &[], &[("FIXTURE_PLUGIN_NAME", name)]);
        assert!(loaded.is_empty(), "{name:?} loaded");
        let reason = reason_for(&refused, "libfixture.so");
        assert!(
            reason.contains("invalid plugin name") && reason.contains(why),
            "{name:?}: {reason}"
        );
        assert!(reason.len() < 1000, "the whole name is shown: {reason}");
        assert!(!reason.contains('\n'), "a raw newline: {reason:?}");
    }
    let (loaded, _) = list(&dir, &[], &[("FIXTURE_PLUGIN_NAME", "my-plugin.v2_x")]);
    assert_eq!(loaded, ["my-plugin.v2_x"]);
}

#[test]
fn a_name_claimed_by_two_files_goes_to_neither_unless_pinned() {
    let dir = PluginDir::new();
    let echo = dir.add("echo", "libecho.so");
    let dup = dir.add("echo", "libdup.so");
    let (loaded, refused) = list(&dir, &[], &[]);
    assert!(loaded.is_empty(), "{loaded:?}");
    assert!(
        reason_for(&refused, "libecho.so").contains(&format!(
            "plugin `echo` is also claimed by {}",
            dup.display()
        )),
        "{refused:#?}"
    );
    assert!(
        reason_for(&refused, "libdup.so").contains(&format!(
            "plugin `echo` is also claimed by {}",
            echo.display()
        )),
        "{refused:#?}"
    );

    // The watcher tries a file again when the other claimant goes away.
    let host = dir.host();
    assert!(host.scan().unwrap().loaded.is_empty());
    let watcher = plugin_host::watch::Watcher::start(
        host.clone(),
        plugin_host::watch::WatchOptions::default(),
    )
    .unwrap();
    std::fs::remove_file(&dup).unwrap();
    assert!(eventually(PATIENCE, || host.plugin("echo").is_some()));
    assert_eq!(host.plugin("echo").unwrap().file, echo);
    drop(watcher);
    drop(host);
    std::fs::copy(&echo, &dup).unwrap();

    // Pinned to a file, the name goes to that file only.
    dir.configure(&json!({"echo": {"file": "libecho.so"}}));
    let host = dir.host();
    let report = host.scan().unwrap();
    assert_eq!(report.loaded, ["echo"]);
    assert_eq!(host.plugin("echo").unwrap().file, echo);
    assert_eq!(
        report.refused[0].kind,
        LoadErrorKind::NamePinned {
            plugin: "echo".into(),
            pinned: "libecho.so".into()
        }
    );
    drop(host);

    // While serving, a newcomer claiming a loaded name is refused; the loaded one keeps it.
    std::fs::remove_file(dir.path().join("plugins.json")).unwrap();
    std::fs::remove_file(&dup).unwrap();
    let host = dir.host();
    assert_eq!(host.scan().unwrap().loaded, ["echo"]);
    let _watcher = plugin_host::watch::Watcher::start(
        host.clone(),
        plugin_host::watch::WatchOptions::default(),
    )
    .unwrap();
    let newcomer = drop_in(&built_plugin("echo"), &dir.path(), "libnewcomer.so");
    assert!(eventually(PATIENCE, || host
        .refused()
        .iter()
        .any(|r| r.file == newcomer)));
    assert_eq!(host.plugin("echo").unwrap().file, echo);
    assert_eq!(host.execute("echo", "echo", &json!(7)), Some(json!(7)));
}

#[test]
fn the_default_shadow_directory_is_fresh_private_and_unguessable() {
    use std::os::unix::fs::MetadataExt as _;
    // Another local user prepares every name the old scheme (`plugin-host-<pid>-<n>`) would
    // use, as links to a directory of theirs.
    let victim = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let planted: Vec<PathBuf> = (0..64)
        .map(|n| std::env::temp_dir().join(format!("plugin-host-{pid}-{n}")))
        .filter(|p| std::os::unix::fs::symlink(victim.path(), p).is_ok())
        .collect();
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let hosts: Vec<plugin_host::PluginHost> = (0..2)
        .map(|_| {
            plugin_host::PluginHost::builder(dir.path())
                .build()
                .unwrap()
        })
        .collect();
    for host in &hosts {
        host.scan().unwrap();
    }
    let victim_files = std::fs::read_dir(victim.path()).unwrap().count();
    for p in &planted {
        let _ = std::fs::remove_file(p);
    }
    assert_eq!(
        victim_files, 0,
        "a shadow copy went into another user's directory"
    );
    let a = hosts[0].shadow_dir().to_path_buf();
    let b = hosts[1].shadow_dir().to_path_buf();
    assert_ne!(a, b);
    for shadow in [&a, &b] {
        let name = shadow.file_name().unwrap().to_str().unwrap();
        let random = name
            .strip_prefix(&format!("plugin-host-{pid}-"))
            .unwrap_or_else(|| panic!("{name}"));
        assert!(
            random.len() >= 12 && random.chars().all(|c| c.is_ascii_alphanumeric()),
            "a guessable name: {name}"
        );
        let metadata = std::fs::symlink_metadata(shadow).unwrap();
        assert!(metadata.is_dir());
        assert_eq!(metadata.mode() & 0o777, 0o700);
        // Owned by this process's user: the owner of a file it just created.
        let mine = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(metadata.uid(), mine.as_file().metadata().unwrap().uid());
    }
}

#[test]
fn a_planted_link_in_the_shadow_directory_is_never_written_through() {
    let dir = PluginDir::new();
    let file = dir.add("echo", "libecho.so");
    let victim = dir.path().parent().unwrap().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    // The first generation's copy would be `libecho.<pid>.1.so`.
    let pid = std::process::id();
    std::os::unix::fs::symlink(&victim, dir.shadow().join(format!("libecho.{pid}.1.so"))).unwrap();
    let host = dir.host();
    let err = host.load(&file).unwrap_err();
    assert!(
        format!("{err:#}").contains("writing its shadow copy"),
        "{err:#}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // The next generation has another name and loads.
    host.load(&file).unwrap();
}

#[test]
fn stale_shadow_cleanup_removes_only_our_own_exactly_named_directories() {
    // A process that is gone.
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let temp = std::env::temp_dir();
    let ours = temp.join(format!("plugin-host-{pid}-ours0000000A"));
    let foreign = temp.join(format!("plugin-host-{pid}-theirs00000A"));
    let open = temp.join(format!("plugin-host-{pid}-open00000000"));
    let link = temp.join(format!("plugin-host-{pid}-link00000000"));
    let inexact = temp.join(format!("plugin-host-{pid}-0-mine"));
    let target = tempfile::tempdir().unwrap();
    std::fs::write(target.path().join("keep"), b"keep").unwrap();
    for dir in [&ours, &foreign, &open, &inexact] {
        std::fs::create_dir(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(dir.join("libecho.so"), b"left behind").unwrap();
    }
    std::os::unix::fs::chown(&foreign, Some(OTHER_USER), None).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(target.path(), &link).unwrap();
    // Left behind a while ago: a directory without a lock file younger than a minute may be a
    // host being created, and is kept.
    let ago = std::time::SystemTime::now() - Duration::from_secs(120);
    for dir in [&ours, &foreign, &open, &inexact] {
        std::fs::File::open(dir).unwrap().set_modified(ago).unwrap();
    }

    let dir = PluginDir::new();
    let _host = plugin_host::PluginHost::builder(dir.path())
        .build()
        .unwrap();
    let left: Vec<bool> = [&ours, &foreign, &open, &link, &inexact]
        .iter()
        .map(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    for p in [&foreign, &open, &inexact] {
        let _ = std::fs::remove_dir_all(p);
    }
    let _ = std::fs::remove_file(&link);
    assert_eq!(
        left,
        [false, true, true, true, true],
        "removed: ours (only); kept: another user's, a group/other-writable one, a link, an inexact name"
    );
    assert!(target.path().join("keep").exists());
}

#[test]
fn hosts_started_together_never_remove_each_others_shadow_directories() {
    // Each host sweeps the temporary directory for stale shadow directories as it starts; one
    // being made at that moment must not look stale.
    let dir = PluginDir::new();
    for round in 0..60 {
        let starting: Vec<_> = (0..8)
            .map(|k| {
                Command::new(env!("CARGO_BIN_EXE_worker-under-test"))
                    .arg("--plugins")
                    .arg(dir.path())
                    .arg("--state-dir")
                    .arg(dir.shadow().join(format!("state{k}")))
                    .args(["list", "--json"])
                    .env_remove("WORKER_LOG")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (k, child) in starting.into_iter().enumerate() {
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "round {round}, worker {k}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
