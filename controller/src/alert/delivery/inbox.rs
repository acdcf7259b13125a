//! One target's queue of alert states waiting to be sent: bounded by distinct
//! alerts, coalesced by fingerprint so that only the newest state of an alert
//! waits, and never blocking the engine that fills it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

use super::OutgoingAlert;

/// What became of one pushed alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued behind the others.
    Queued,
    /// Replaced an older queued state of the same alert, keeping its place in line.
    Coalesced,
    /// Queued, but the queue was full: another alert's queued state was dropped.
    Evicted,
}

/// The queue proper (synchronous, tested on its own).
#[derive(Debug)]
pub(crate) struct Queue {
    capacity: usize,
    next_seq: u64,
    /// Arrival order: sequence number → fingerprint.
    order: BTreeMap<u64, String>,
    /// Fingerprint → (sequence number, newest state).
    entries: HashMap<String, (u64, OutgoingAlert)>,
}

impl Queue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), next_seq: 0, order: BTreeMap::new(), entries: HashMap::new() }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds the newest state of an alert. When the queue is full, the oldest queued
    /// firing state is dropped (a firing alert is notified again; a resolution is
    /// not), else the oldest resolution.
    pub(crate) fn push(&mut self, alert: OutgoingAlert) -> Pushed {
        if let Some((_, queued)) = self.entries.get_mut(&alert.fingerprint) {
            *queued = alert;
            return Pushed::Coalesced;
        }
        let mut outcome = Pushed::Queued;
        if self.entries.len() >= self.capacity {
            let victim = self
                .order
                .iter()
                .find(|(_, fp)| self.entries.get(*fp).is_some_and(|(_, a)| !a.is_resolved()))
                .or_else(|| self.order.iter().next())
                .map(|(seq, _)| *seq);
            if let Some(seq) = victim
                && let Some(fp) = self.order.remove(&seq)
            {
                self.entries.remove(&fp);
                outcome = Pushed::Evicted;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, alert.fingerprint.clone());
        self.entries.insert(alert.fingerprint.clone(), (seq, alert));
        outcome
    }

    /// Removes and returns up to `max` alerts, oldest first.
    pub(crate) fn take(&mut self, max: usize) -> Vec<OutgoingAlert> {
        let mut out = Vec::with_capacity(max.min(self.order.len()));
        while out.len() < max {
            let Some((_, fp)) = self.order.pop_first() else { break };
            if let Some((_, alert)) = self.entries.remove(&fp) {
                out.push(alert);
            }
        }
        out
    }

    /// Removes every queued alert, oldest first.
    pub(crate) fn drain(&mut self) -> Vec<OutgoingAlert> {
        self.take(usize::MAX)
    }
}

/// A [`Queue`] shared between the engine (which pushes) and one target's worker.
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: Mutex<Queue>,
    ready: Notify,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { queue: Mutex::new(Queue::new(capacity)), ready: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue stays consistent even if a holder panicked: every method
        // finishes its changes before it could fail.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues alerts and wakes the worker; returns what became of each.
    pub(crate) fn push_all(&self, alerts: impl IntoIterator<Item = OutgoingAlert>) -> Vec<Pushed> {
        let outcomes: Vec<Pushed> = {
            let mut queue = self.lock();
            alerts.into_iter().map(|alert| queue.push(alert)).collect()
        };
        if !outcomes.is_empty() {
            self.ready.notify_one();
        }
        outcomes
    }

    pub(crate) fn take(&self, max: usize) -> Vec<OutgoingAlert> {
        self.lock().take(max)
    }

    pub(crate) fn drain(&self) -> Vec<OutgoingAlert> {
        self.lock().drain()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Resolves when something may have been pushed since the last call (a stored
    /// permit makes a push between `take` and this call count).
    pub(crate) async fn ready(&self) {
        self.ready.notified().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn alert(fp: &str, resolved: bool, summary: &str) -> OutgoingAlert {
        OutgoingAlert {
            fingerprint: fp.to_owned(),
            labels: [("alertname".to_owned(), fp.to_owned())].into_iter().collect(),
            annotations: [("summary".to_owned(), summary.to_owned())].into_iter().collect(),
            starts_at_unix_ms: 1,
            ends_at_unix_ms: resolved.then_some(2),
            generator_url: String::new(),
        }
    }

    fn fps(alerts: &[OutgoingAlert]) -> Vec<&str> {
        alerts.iter().map(|a| a.fingerprint.as_str()).collect()
    }

    #[test]
    fn takes_in_arrival_order_up_to_max() {
        let mut queue = Queue::new(10);
        for fp in ["a", "b", "c"] {
            assert_eq!(queue.push(alert(fp, false, "")), Pushed::Queued);
        }
        assert_eq!(fps(&queue.take(2)), ["a", "b"]);
        assert_eq!(fps(&queue.take(2)), ["c"]);
        assert!(queue.take(2).is_empty());
    }

    #[test]
    fn coalesces_to_the_newest_state_in_the_old_place() {
        let mut queue = Queue::new(10);
        queue.push(alert("a", false, "first"));
        queue.push(alert("b", false, ""));
        assert_eq!(queue.push(alert("a", true, "second")), Pushed::Coalesced);
        let taken = queue.take(10);
        assert_eq!(fps(&taken), ["a", "b"]);
        assert!(taken[0].is_resolved());
        assert_eq!(taken[0].annotations["summary"], "second");
    }

    #[test]
    fn full_queue_drops_oldest_firing_before_any_resolution() {
        let mut queue = Queue::new(3);
        queue.push(alert("r1", true, ""));
        queue.push(alert("f1", false, ""));
        queue.push(alert("f2", false, ""));
        assert_eq!(queue.push(alert("new", true, "")), Pushed::Evicted);
        assert_eq!(queue.len(), 3);
        assert_eq!(fps(&queue.drain()), ["r1", "f2", "new"]);
    }

    #[test]
    fn full_queue_of_resolutions_drops_the_oldest() {
        let mut queue = Queue::new(2);
        queue.push(alert("r1", true, ""));
        queue.push(alert("r2", true, ""));
        assert_eq!(queue.push(alert("f", false, "")), Pushed::Evicted);
        assert_eq!(fps(&queue.drain()), ["r2", "f"]);
    }

    #[test]
    fn a_full_queue_still_takes_a_newer_state_of_a_queued_alert() {
        let mut queue = Queue::new(1);
        queue.push(alert("a", false, ""));
        assert_eq!(queue.push(alert("a", true, "")), Pushed::Coalesced);
        assert!(queue.drain()[0].is_resolved());
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_before_waiting_is_not_missed() {
        let inbox = Inbox::new(4);
        inbox.push_all([alert("a", false, "")]);
        tokio::time::timeout(std::time::Duration::from_secs(1), inbox.ready()).await.unwrap();
        assert_eq!(inbox.len(), 1);
    }
}
