//! How long to wait before the next attempt: exponential, capped, with jitter so
//! that targets recovering from an outage are not hit by every sender at once.

use std::time::Duration;

/// The retry policy of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
    pub(crate) max_attempts: u32,
}

impl Backoff {
    /// The wait after `failures` failed attempts (1 for the first failure), for a
    /// `jitter` in `[0, 1)`: between half and all of `initial × 2^(failures-1)`,
    /// capped at `max`. A server's `Retry-After` lengthens it, still within `max`.
    pub(crate) fn delay(&self, failures: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        let base = self.initial.saturating_mul(1 << doublings).min(self.max);
        // Integer arithmetic: float multiplication of a huge configured duration could overflow.
        let parts_per_million = (jitter.clamp(0.0, 1.0) * 1_000_000.0) as u128;
        let jittered = from_nanos(base.as_nanos() * (1_000_000 + parts_per_million) / 2_000_000);
        jittered.max(retry_after.unwrap_or_default()).min(self.max)
    }

    /// Whether another attempt follows `failures` failed ones.
    pub(crate) fn retries_after(&self, failures: u32) -> bool {
        failures < self.max_attempts
    }

    /// The wait after `failures` failures with a random jitter.
    pub(crate) fn random_delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        self.delay(failures, rand::random::<f64>(), retry_after)
    }
}

fn from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10^9, so it fits a u32.
        Ok(secs) => Duration::new(secs, u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0)),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff =
        Backoff { initial: Duration::from_millis(500), max: Duration::from_secs(30), max_attempts: 4 };

    #[test]
    fn doubles_from_initial_to_max() {
        let full: Vec<u128> = (1..=9).map(|n| POLICY.delay(n, 1.0, None).as_millis()).collect();
        assert_eq!(full, [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]);
        let half: Vec<u128> = (1..=3).map(|n| POLICY.delay(n, 0.0, None).as_millis()).collect();
        assert_eq!(half, [250, 500, 1000]);
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        for n in 1..=40 {
            for _ in 0..20 {
                let d = POLICY.random_delay(n, None);
                let full = POLICY.delay(n, 1.0, None);
                assert!(d >= full / 2 && d <= full, "failure {n}: {d:?} outside [{:?}, {full:?}]", full / 2);
            }
        }
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        assert_eq!(POLICY.delay(u32::MAX, 1.0, None), POLICY.max);
        let slow = Backoff { initial: Duration::MAX, max: Duration::MAX, max_attempts: 1 };
        assert_eq!(slow.delay(7, 1.0, None), Duration::MAX);
        assert!(slow.delay(7, 0.0, None) >= Duration::MAX / 2 - Duration::from_secs(1));
    }

    #[test]
    fn retry_after_lengthens_within_max() {
        assert_eq!(POLICY.delay(1, 1.0, Some(Duration::from_secs(5))), Duration::from_secs(5));
        assert_eq!(POLICY.delay(1, 1.0, Some(Duration::from_secs(3600))), POLICY.max);
        assert_eq!(POLICY.delay(3, 1.0, Some(Duration::from_millis(1))), Duration::from_secs(2));
    }

    #[test]
    fn attempts_stop_at_the_limit() {
        assert!(POLICY.retries_after(1));
        assert!(POLICY.retries_after(3));
        assert!(!POLICY.retries_after(4));
    }
}
