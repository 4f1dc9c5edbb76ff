//! What process isolation costs a call, measured in one run against its baselines:
//!
//! - `empty/in_process` and `empty/isolated`: the `echo` plugin's `noop` (no JSON either way)
//!   through `PluginHost::execute`, in-process and with `"isolation": "process"`.
//! - `json_work/in_process` and `json_work/isolated`: `echo.summarize` over 64 readings.
//! - `pipe_round_trip`: the floor of any process hop: 16 bytes written to a child process over
//!   a pipe and read back, with the same length prefix as the host's frames.
//!
//! The benchmark binary is its own child: its `main` calls
//! `plugin_host::isolation::run_child_if_requested()` first, as an embedder's does.
//!
//! Run: `cargo bench -p tests --bench isolation`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use criterion::Criterion;
use serde_json::{Value, json};
use tests::PluginDir;

/// Set in the pipe baseline's child: it echoes framed messages from stdin to stdout.
const PIPE_ECHO: &str = "ISOLATION_BENCH_PIPE_ECHO";

fn readings() -> Value {
    let values: Vec<f64> = (0..64).map(|i| f64::from(i) * 1.5 - 20.0).collect();
    json!({"source": "sensor-7", "values": values})
}

fn pipe_echo() -> ! {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut buffer = Vec::new();
    loop {
        let mut length = [0u8; 4];
        if input.read_exact(&mut length).is_err() {
            std::process::exit(0);
        }
        buffer.resize(u32::from_le_bytes(length) as usize, 0);
        if input.read_exact(&mut buffer).is_err() {
            std::process::exit(0);
        }
        let _ = output.write_all(&length);
        let _ = output.write_all(&buffer);
        let _ = output.flush();
    }
}

fn host(isolated: bool) -> (PluginDir, plugin_host::PluginHost) {
    let dir = PluginDir::new();
    dir.add("echo", "libecho.so");
    let isolation = if isolated {
        plugin_host::Isolation::Process
    } else {
        plugin_host::Isolation::InProcess
    };
    let host = plugin_host::PluginHost::builder(dir.path())
        .with_shadow_dir(dir.shadow())
        .with_isolation(isolation)
        .build()
        .unwrap();
    host.scan().unwrap();
    assert_eq!(
        host.plugin("echo").unwrap().isolation.mode,
        if isolated { "process" } else { "in-process" }
    );
    (dir, host)
}

fn bench(c: &mut Criterion) {
    let (_in_dir, in_process) = host(false);
    let (_iso_dir, isolated) = host(true);
    let params = readings();
    assert_eq!(
        in_process.execute("echo", "summarize", &params),
        isolated.execute("echo", "summarize", &params)
    );
    assert_eq!(isolated.execute("echo", "noop", &Value::Null), None);

    let mut group = c.benchmark_group("empty");
    group.bench_function("in_process", |b| {
        b.iter(|| in_process.execute(black_box("echo"), "noop", black_box(&Value::Null)));
    });
    group.bench_function("isolated", |b| {
        b.iter(|| isolated.execute(black_box("echo"), "noop", black_box(&Value::Null)));
    });
    group.finish();

    let mut group = c.benchmark_group("json_work");
    group.bench_function("in_process", |b| {
        b.iter(|| in_process.execute(black_box("echo"), "summarize", black_box(&params)));
    });
    group.bench_function("isolated", |b| {
        b.iter(|| isolated.execute(black_box("echo"), "summarize", black_box(&params)));
    });
    group.finish();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(PIPE_ECHO, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = child.stdout.take().unwrap();
    let message = [7u8; 16];
    let mut answer = [0u8; 20];
    c.bench_function("pipe_round_trip", |b| {
        b.iter(|| {
            let mut frame = Vec::with_capacity(20);
            frame.extend_from_slice(&16u32.to_le_bytes());
            frame.extend_from_slice(black_box(&message));
            to_child.write_all(&frame).unwrap();
            from_child.read_exact(&mut answer).unwrap();
            black_box(&answer);
        });
    });
    paired(&isolated, &mut to_child, &mut from_child);
    drop(to_child);
    let _ = child.wait();
}

/// Criterion's groups run one after the other while the shared machine's load drifts; this
/// interleaves an isolated empty call and a pipe round trip (101 rounds of 200 each) and prints
/// the medians per call and of the per-round ratio.
fn paired(
    isolated: &plugin_host::PluginHost,
    to_child: &mut impl Write,
    from_child: &mut impl Read,
) {
    use std::time::Instant;
    let (mut ratios, mut calls, mut pipes) = (Vec::new(), Vec::new(), Vec::new());
    let mut frame = Vec::with_capacity(20);
    frame.extend_from_slice(&16u32.to_le_bytes());
    frame.extend_from_slice(&[7u8; 16]);
    let mut answer = [0u8; 20];
    for _ in 0..101 {
        let started = Instant::now();
        for _ in 0..200 {
            black_box(isolated.execute(black_box("echo"), "noop", black_box(&Value::Null)));
        }
        let call = started.elapsed().as_secs_f64() / 200.0;
        let started = Instant::now();
        for _ in 0..200 {
            to_child.write_all(black_box(&frame)).unwrap();
            from_child.read_exact(&mut answer).unwrap();
        }
        let pipe = started.elapsed().as_secs_f64() / 200.0;
        ratios.push(call / pipe);
        calls.push(call);
        pipes.push(pipe);
    }
    for v in [&mut ratios, &mut calls, &mut pipes] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "paired, median of 101 interleaved rounds: isolated empty call {:.1} us, pipe round trip {:.1} us, ratio {:.2} (quartiles {:.2} .. {:.2})",
        calls[50] * 1e6,
        pipes[50] * 1e6,
        ratios[50],
        ratios[25],
        ratios[75]
    );
}

fn main() {
    plugin_host::isolation::run_child_if_requested();
    if std::env::var_os(PIPE_ECHO).is_some() {
        pipe_echo();
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
