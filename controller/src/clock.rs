//! Agent clock skew: how far an agent's wall clock is from the controller's,
//! measured from the send time its heartbeats carry, and what follows from it.
//!
//! A heartbeat sent at agent time `s` and handled at controller time `r` gives
//! `s - r` = offset − delay, where the delay (network, queueing behind other
//! messages of the stream) is never negative: each reading is at most the true
//! offset, so the estimate is the largest of the last few readings (the one
//! that waited least, as NTP's clock filter keeps the least-delayed sample).
//!
//! Beyond `agents.max_clock_skew` the node is degraded (its state says why) and
//! its batches are stored shifted to controller time: samples from the future
//! would confuse rules (`for` timers, `absent()`), rollups (the wrong minute)
//! and retention, and refusing them would jam the agent's resend loop. Every
//! batch stored with a reading carries it as the sample
//! `flotilla_agent_clock_skew_seconds` (positive: the agent is ahead), so a
//! shifted batch's own time is `created_unix_ms` + that many seconds.

use std::collections::VecDeque;
use std::time::Duration;

use flotilla_common::model::{Sample, TelemetryBatch};

/// The sample each batch carries once the agent's clock has been measured.
pub const SKEW_METRIC: &str = "flotilla_agent_clock_skew_seconds";

/// How many readings the estimate looks back over.
const WINDOW: usize = 8;

/// One agent's clock against the controller's, from the readings of one stream.
#[derive(Debug, Clone, Default)]
pub struct ClockEstimate {
    readings: VecDeque<i64>,
}

/// What the controller concludes about an agent's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// Agent clock minus controller clock, in ms (positive: the agent is ahead).
    pub offset_ms: i64,
    /// Whether the offset is beyond `agents.max_clock_skew`.
    pub skewed: bool,
}

impl ClockEstimate {
    /// Adds the reading of a message the agent sent at `sent_unix_ms` (its
    /// clock) and the controller handled at `received_unix_ms`; returns the
    /// estimate judged against `max_skew`.
    pub fn observe(&mut self, sent_unix_ms: i64, received_unix_ms: i64, max_skew: Duration) -> ClockReading {
        if self.readings.len() == WINDOW {
            self.readings.pop_front();
        }
        self.readings.push_back(sent_unix_ms.saturating_sub(received_unix_ms));
        let offset_ms = self.readings.iter().copied().max().unwrap_or_default();
        let limit = i64::try_from(max_skew.as_millis()).unwrap_or(i64::MAX);
        ClockReading { offset_ms, skewed: offset_ms.unsigned_abs() > limit.unsigned_abs() }
    }
}

impl ClockReading {
    /// Why the node is degraded, for its state reason; `None` when the clock is fine.
    pub fn reason(&self) -> Option<String> {
        if !self.skewed {
            return None;
        }
        let secs = self.offset_ms.unsigned_abs() as f64 / 1000.0;
        let side = if self.offset_ms > 0 { "ahead of" } else { "behind" };
        Some(format!(
            "agent clock {secs:.1}s {side} the controller's (beyond agents.max_clock_skew): \
             its samples are stored at controller time and its commands signed in its own; \
             fix the node's time sync"
        ))
    }

    /// Puts the reading on `batch` and, when skewed, moves the batch to controller time.
    pub fn apply(&self, batch: &mut TelemetryBatch) {
        batch.samples.push(Sample {
            name: SKEW_METRIC.to_owned(),
            labels: Default::default(),
            value: self.offset_ms as f64 / 1000.0,
        });
        if self.skewed {
            // Wire validation keeps the time positive; so does a shift from a sane clock.
            batch.created_unix_ms = batch.created_unix_ms.saturating_sub(self.offset_ms).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn the_estimate_is_the_least_delayed_of_the_recent_readings() {
        let mut c = ClockEstimate::default();
        // An agent 10 minutes ahead; readings delayed by 5 ms to 3 s.
        let ahead = 600_000;
        let r = c.observe(1_000_000 + ahead, 1_003_000, MAX);
        assert_eq!(r, ClockReading { offset_ms: ahead - 3000, skewed: true });
        let r = c.observe(2_000_000 + ahead, 2_000_005, MAX);
        assert_eq!(r.offset_ms, ahead - 5);
        let r = c.observe(3_000_000 + ahead, 3_001_000, MAX);
        assert_eq!(r.offset_ms, ahead - 5, "a delayed reading does not pull the estimate down");
        // The good reading leaves the window after WINDOW more.
        for i in 0..WINDOW as i64 {
            c.observe(4_000_000 + i + ahead, 4_000_000 + i + 20, MAX);
        }
        assert_eq!(c.observe(5_000_000 + ahead, 5_000_020, MAX).offset_ms, ahead - 20);
    }

    #[test]
    fn skew_is_judged_both_ways_against_the_limit() {
        let judge = |offset: i64| ClockEstimate::default().observe(1_000_000 + offset, 1_000_000, MAX).skewed;
        assert!(!judge(0));
        assert!(!judge(30_000));
        assert!(!judge(-30_000));
        assert!(judge(30_001));
        assert!(judge(-45_000));
    }

    #[test]
    fn a_skewed_batch_is_shifted_and_says_by_how_much() {
        let reading = ClockReading { offset_ms: 600_000, skewed: true };
        let mut batch = TelemetryBatch { seq: 1, created_unix_ms: 1_700_000_600_000, ..Default::default() };
        reading.apply(&mut batch);
        assert_eq!(batch.created_unix_ms, 1_700_000_000_000);
        let sample = batch.samples.iter().find(|s| s.name == SKEW_METRIC).unwrap();
        assert_eq!(sample.value, 600.0);
        assert_eq!(batch.created_unix_ms + (sample.value * 1000.0) as i64, 1_700_000_600_000, "the agent's own time");

        let fine = ClockReading { offset_ms: -1_200, skewed: false };
        let mut batch = TelemetryBatch { seq: 2, created_unix_ms: 1_700_000_000_000, ..Default::default() };
        fine.apply(&mut batch);
        assert_eq!(batch.created_unix_ms, 1_700_000_000_000, "within the limit nothing moves");
        assert_eq!(batch.samples[0].value, -1.2);
        assert_eq!(fine.reason(), None);
        let why = reading.reason().unwrap();
        assert!(why.contains("600.0s ahead of") && why.contains("max_clock_skew"), "{why}");
        let behind = ClockReading { offset_ms: -90_000, skewed: true }.reason().unwrap();
        assert!(behind.contains("90.0s behind"), "{behind}");
    }
}
