//! Wall-clock helpers: the protocol carries times as Unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now as milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}
