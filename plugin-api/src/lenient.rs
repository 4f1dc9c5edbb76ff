//! Lenient field readers for `#[serde(deserialize_with = ...)]`: a field of another JSON type
//! than expected reads as absent instead of failing the whole payload. For hook payloads a
//! plugin only observes, where one odd field should not cost the whole event.
//!
//! ```
//! use serde::Deserialize;
//!
//! #[derive(Deserialize, Default)]
//! struct Scored {
//!     #[serde(default, deserialize_with = "plugin_api::lenient::text")]
//!     handler: Option<String>,
//!     #[serde(default, deserialize_with = "plugin_api::lenient::number")]
//!     score: Option<f64>,
//! }
//!
//! let odd: Scored = serde_json::from_str(r#"{"handler": 7, "score": 0.5, "other": [1]}"#)?;
//! assert_eq!((odd.handler, odd.score), (None, Some(0.5)));
//! # Ok::<(), serde_json::Error>(())
//! ```

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A string, or `None` for a value of any other type.
///
/// # Errors
///
/// Only when the input is not JSON at all.
pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// A number, or `None` for a value of any other type.
///
/// # Errors
///
/// Only when the input is not JSON at all.
pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Value::deserialize(d)?.as_f64())
}
