//! Helpers for plugins that split traffic: a stable hash for sticky assignment and a
//! thread-safe random source. The same inputs give the same results on every run, build and
//! machine, so a key stays with its variant across restarts and reloads.
//!
//! ```
//! use plugin_api::assign::{Random, stable_hash, unit};
//!
//! // Sticky: the same experiment and key always land on the same point of [0, 1).
//! let point = unit(stable_hash(&["tone", "user-42"]));
//! assert_eq!(point, unit(stable_hash(&["tone", "user-42"])));
//! assert!((0.0..1.0).contains(&point));
//!
//! // Random, shareable between threads (`&self`), reproducible from a seed.
//! let random = Random::new(7);
//! assert!((0.0..1.0).contains(&random.next_unit()));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's finalizer: a well-mixed 64-bit value from any 64-bit input.
pub fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over the parts (each followed by a separator byte), then [`mix`]ed.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    mix(h)
}

/// A uniform value in [0, 1) from 64 random bits.
pub fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform value in the open interval (0, 1) from 64 random bits: safe for logarithms.
pub fn open_unit(x: u64) -> f64 {
    ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A splitmix64 random source that many threads can draw from at once (lock-free).
#[derive(Debug)]
pub struct Random(AtomicU64);

impl Random {
    /// A source that gives the same sequence for the same seed.
    pub fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed))
    }

    /// A source seeded from the clock.
    pub fn from_time() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::new(seed)
    }

    /// `seed` when given, else [`from_time`](Self::from_time).
    pub fn seeded(seed: Option<u64>) -> Self {
        seed.map_or_else(Self::from_time, Self::new)
    }

    /// 64 random bits.
    pub fn next_u64(&self) -> u64 {
        mix(self.0.fetch_add(GOLDEN, Ordering::Relaxed))
    }

    /// A uniform value in [0, 1).
    pub fn next_unit(&self) -> f64 {
        unit(self.next_u64())
    }
}
