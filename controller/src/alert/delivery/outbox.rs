//! What one Alertmanager target has been told: the alerts firing now and when each
//! was last posted, so that they are re-posted every resend interval until they
//! resolve. Pure bookkeeping; the worker supplies `now`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::OutgoingAlert;

#[derive(Debug)]
struct Firing {
    alert: OutgoingAlert,
    /// When it was last in a request (delivered or not); `None` until the first.
    last_attempt: Option<Instant>,
}

/// The firing alerts of one Alertmanager target.
#[derive(Debug)]
pub(crate) struct Outbox {
    resend_interval: Duration,
    firing: HashMap<String, Firing>,
}

impl Outbox {
    pub(crate) fn new(resend_interval: Duration) -> Self {
        Self { resend_interval, firing: HashMap::new() }
    }

    /// Takes in newer alert states: a firing one (re)joins the resend set with its
    /// newest labels and annotations, a resolved one leaves it for good.
    pub(crate) fn record(&mut self, alerts: &[OutgoingAlert]) {
        for alert in alerts {
            if alert.is_resolved() {
                self.firing.remove(&alert.fingerprint);
            } else {
                let last_attempt = self.firing.get(&alert.fingerprint).and_then(|f| f.last_attempt);
                self.firing.insert(alert.fingerprint.clone(), Firing { alert: alert.clone(), last_attempt });
            }
        }
    }

    /// Firing alerts due for a re-post at `now` (never posted, or last posted a resend
    /// interval ago), longest waiting first, at most `limit`, skipping `exclude`.
    pub(crate) fn due(&self, now: Instant, exclude: &HashSet<&str>, limit: usize) -> Vec<OutgoingAlert> {
        let mut due: Vec<&Firing> = self
            .firing
            .values()
            .filter(|f| !exclude.contains(f.alert.fingerprint.as_str()))
            .filter(|f| f.last_attempt.is_none_or(|at| at + self.resend_interval <= now))
            .collect();
        due.sort_by_key(|f| (f.last_attempt, f.alert.fingerprint.as_str()));
        due.into_iter().take(limit).map(|f| f.alert.clone()).collect()
    }

    /// Notes that these alerts were in a request at `now`, whatever its outcome: a
    /// dead target is tried again at the next resend, not in a tight loop.
    pub(crate) fn attempted<'a>(&mut self, fingerprints: impl IntoIterator<Item = &'a str>, now: Instant) {
        for fp in fingerprints {
            if let Some(firing) = self.firing.get_mut(fp) {
                firing.last_attempt = Some(now);
            }
        }
    }

    /// When the next re-post falls due, if anything fires.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for firing in self.firing.values() {
            let at = match firing.last_attempt {
                Some(at) => at + self.resend_interval,
                // Never posted (its first request was cut short): due at once.
                None => return Some(Instant::now()),
            };
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        next
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.firing.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const RESEND: Duration = Duration::from_secs(60);

    fn alert(fp: &str, resolved: bool) -> OutgoingAlert {
        OutgoingAlert {
            fingerprint: fp.to_owned(),
            labels: [("alertname".to_owned(), fp.to_owned())].into_iter().collect(),
            annotations: Default::default(),
            starts_at_unix_ms: 1,
            ends_at_unix_ms: resolved.then_some(2),
            generator_url: String::new(),
        }
    }

    fn fps(alerts: &[OutgoingAlert]) -> Vec<&str> {
        alerts.iter().map(|a| a.fingerprint.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn firing_alerts_fall_due_every_resend_interval() {
        let mut outbox = Outbox::new(RESEND);
        let t0 = Instant::now();
        outbox.record(&[alert("a", false), alert("b", false)]);
        outbox.attempted(["a", "b"], t0);
        assert!(outbox.due(t0 + RESEND - Duration::from_millis(1), &HashSet::new(), 64).is_empty());
        assert_eq!(outbox.next_due(), Some(t0 + RESEND));
        assert_eq!(fps(&outbox.due(t0 + RESEND, &HashSet::new(), 64)), ["a", "b"]);
        outbox.attempted(["a"], t0 + RESEND);
        assert_eq!(fps(&outbox.due(t0 + RESEND, &HashSet::new(), 64)), ["b"]);
        assert_eq!(outbox.next_due(), Some(t0 + RESEND));
    }

    #[tokio::test(start_paused = true)]
    async fn resolved_alerts_are_never_resent() {
        let mut outbox = Outbox::new(RESEND);
        let t0 = Instant::now();
        outbox.record(&[alert("a", false)]);
        outbox.attempted(["a"], t0);
        outbox.record(&[alert("a", true)]);
        assert_eq!(outbox.len(), 0);
        assert!(outbox.due(t0 + RESEND * 10, &HashSet::new(), 64).is_empty());
        assert_eq!(outbox.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renotification_keeps_the_resend_clock_and_updates_the_alert() {
        let mut outbox = Outbox::new(RESEND);
        let t0 = Instant::now();
        outbox.record(&[alert("a", false)]);
        outbox.attempted(["a"], t0);
        let mut newer = alert("a", false);
        newer.annotations.insert("summary".to_owned(), "hotter".to_owned());
        outbox.record(&[newer]);
        assert_eq!(outbox.next_due(), Some(t0 + RESEND));
        assert_eq!(outbox.due(t0 + RESEND, &HashSet::new(), 64)[0].annotations["summary"], "hotter");
    }

    #[tokio::test(start_paused = true)]
    async fn due_respects_limit_exclusions_and_waiting_order() {
        let mut outbox = Outbox::new(RESEND);
        let t0 = Instant::now();
        outbox.record(&[alert("a", false), alert("b", false), alert("c", false), alert("d", false)]);
        outbox.attempted(["c"], t0);
        outbox.attempted(["a", "b"], t0 + Duration::from_secs(1));
        let later = t0 + RESEND * 2;
        assert_eq!(fps(&outbox.due(later, &HashSet::new(), 2)), ["d", "c"]);
        assert_eq!(fps(&outbox.due(later, &HashSet::from(["d"]), 2)), ["c", "a"]);
    }
}
