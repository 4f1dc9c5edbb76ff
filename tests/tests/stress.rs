//! Stress: hot swaps under load, and many load/unload cycles. A test binary of its own so that
//! its memory measurement is not disturbed by other tests running in the same process.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure should stop the test with its message"
)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::json;
use tests::{PluginDir, resident_bytes};

#[test]
fn stress() {
    // The memory measurement first: memory the allocator keeps after the swaps' millions of
    // answers were freed would absorb a leak without resident memory growing.
    load_unload_cycles();
    swaps_under_load();
}

/// 300 reloads while two threads call without pause: every answer right, none missing. Between
/// two reloads the callers get at least [`CALLS_BETWEEN_SWAPS`] answers, so every swap happens
/// while calls are in flight however fast or slow the machine is (a count of answers in a fixed
/// time would measure the machine, not the host).
fn swaps_under_load() {
    const SWAPS: u64 = 300;
    const CALLS_BETWEEN_SWAPS: u64 = 200;
    let dir = PluginDir::new();
    let file = dir.add("echo", "libecho.so");
    let host = dir.host();
    host.load(&file).unwrap();
    let stop = AtomicBool::new(false);
    let answers = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2 {
            let (host, stop, answers) = (&host, &stop, &answers);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let params = json!({"thread": t, "i": i});
                    let answer = host.execute("echo", "echo", &params);
                    assert_eq!(
                        answer,
                        Some(params),
                        "wrong or missing answer during a swap"
                    );
                    answers.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        for _ in 0..SWAPS {
            host.reload("echo").unwrap();
            let seen = answers.load(Ordering::Relaxed);
            let started = std::time::Instant::now();
            while answers.load(Ordering::Relaxed) < seen + CALLS_BETWEEN_SWAPS {
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(30),
                    "the callers stopped answering after a swap"
                );
                std::thread::yield_now();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let plugin = host.plugin("echo").unwrap();
    assert_eq!(plugin.stats.errors + plugin.stats.panics, 0);
    assert!(answers.load(Ordering::Relaxed) >= SWAPS * CALLS_BETWEEN_SWAPS);
    eprintln!(
        "{SWAPS} swaps, {} answers, all right",
        answers.load(Ordering::Relaxed)
    );
    drop(host);
    assert!(
        dir.shadow_files().is_empty(),
        "left behind: {:?}",
        dir.shadow_files()
    );
}

/// Load/unload cycles leave no shadow file, no mapping, and no growth in memory: after a
/// warm-up, resident memory grows by less than [`MAX_GROWTH_PER_CYCLE`] a cycle, which a leak
/// of 16 KiB per load (the size of a small allocation) would exceed fourfold.
fn load_unload_cycles() {
    const WARM_UP: usize = 100;
    const MEASURED: usize = 400;
    const MAX_GROWTH_PER_CYCLE: u64 = 4 << 10;
    let dir = PluginDir::new();
    let file = dir.add("echo", "libecho.so");
    let host = dir.host();
    let cycle = || {
        host.load(&file).unwrap();
        assert_eq!(host.execute("echo", "echo", &json!(1)), Some(json!(1)));
        host.unload("echo").unwrap();
    };
    for _ in 0..WARM_UP {
        cycle();
    }
    let before = resident_bytes();
    for _ in 0..MEASURED {
        cycle();
    }
    let after = resident_bytes();
    let shadow = dir.shadow().to_str().unwrap().to_owned();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        !maps.contains(&shadow),
        "shadow copies still mapped:\n{maps}"
    );
    assert!(
        dir.shadow_files().is_empty(),
        "left behind: {:?}",
        dir.shadow_files()
    );
    let growth = after.saturating_sub(before);
    let per_cycle = growth / MEASURED as u64;
    eprintln!(
        "{} cycles: resident {before} -> {after} bytes over the last {MEASURED}, {per_cycle} bytes a cycle",
        WARM_UP + MEASURED
    );
    assert!(
        per_cycle < MAX_GROWTH_PER_CYCLE,
        "resident memory grew by {growth} bytes over {MEASURED} load/unload cycles, \
         {per_cycle} bytes a cycle (at most {MAX_GROWTH_PER_CYCLE})"
    );
}
