//! Counters of alert delivery, per target kind, for the controller's `/metrics`.

use prometheus::{IntCounterVec, Opts, Registry};

use super::TargetKind;

/// Why alert states were lost (the `reason` label of the drop counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// The target's queue was full.
    QueueFull,
    /// Every attempt failed.
    GaveUp,
    /// The target refused the request (4xx other than 429), or Alertmanager would have.
    Rejected,
    /// Still queued, or not delivered by the final flush, at shutdown.
    Shutdown,
}

impl DropReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::GaveUp => "gave_up",
            Self::Rejected => "rejected",
            Self::Shutdown => "shutdown",
        }
    }

    const ALL: [Self; 4] = [Self::QueueFull, Self::GaveUp, Self::Rejected, Self::Shutdown];
}

/// Handles to the delivery counters; cheap to clone. Created unregistered so that
/// tests can read them; [`DeliveryMetrics::register`] adds them to a registry.
#[derive(Clone)]
pub struct DeliveryMetrics {
    delivered: IntCounterVec,
    failed_attempts: IntCounterVec,
    dropped: IntCounterVec,
    coalesced: IntCounterVec,
}

impl std::fmt::Debug for DeliveryMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryMetrics").finish_non_exhaustive()
    }
}

/// A reading of the counters of one target kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    /// Alert states in requests the target accepted (Alertmanager re-posts included).
    pub delivered: u64,
    /// Requests that failed (each retry counts).
    pub failed_attempts: u64,
    /// Alert states lost, for any reason.
    pub dropped: u64,
    /// Alert states replaced in a queue by a newer state of the same alert.
    pub coalesced: u64,
}

impl DeliveryMetrics {
    /// Creates the counters (names are constants: an error is a programming error).
    pub fn new() -> Result<Self, prometheus::Error> {
        let vec = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
        Ok(Self {
            delivered: vec(
                "flotilla_controller_alerts_delivered_total",
                "Alert states accepted by a delivery target (Alertmanager re-posts included).",
                &["kind"],
            )?,
            failed_attempts: vec(
                "flotilla_controller_alert_delivery_failures_total",
                "Alert delivery requests that failed; each retry counts.",
                &["kind"],
            )?,
            dropped: vec(
                "flotilla_controller_alerts_dropped_total",
                "Alert states never delivered, by reason (queue_full, gave_up, rejected, shutdown).",
                &["kind", "reason"],
            )?,
            coalesced: vec(
                "flotilla_controller_alerts_coalesced_total",
                "Queued alert states replaced by a newer state of the same alert.",
                &["kind"],
            )?,
        })
    }

    /// Adds every counter to `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        for counter in [&self.delivered, &self.failed_attempts, &self.dropped, &self.coalesced] {
            registry.register(Box::new(counter.clone()))?;
        }
        Ok(())
    }

    /// The current counts of one target kind.
    pub fn counts(&self, kind: TargetKind) -> DeliveryCounts {
        let k = kind.as_str();
        DeliveryCounts {
            delivered: self.delivered.with_label_values(&[k]).get(),
            failed_attempts: self.failed_attempts.with_label_values(&[k]).get(),
            dropped: DropReason::ALL.iter().map(|r| self.dropped.with_label_values(&[k, r.as_str()]).get()).sum(),
            coalesced: self.coalesced.with_label_values(&[k]).get(),
        }
    }

    pub(crate) fn delivered(&self, kind: TargetKind, alerts: usize) {
        self.delivered.with_label_values(&[kind.as_str()]).inc_by(as_u64(alerts));
    }

    pub(crate) fn failed_attempt(&self, kind: TargetKind) {
        self.failed_attempts.with_label_values(&[kind.as_str()]).inc();
    }

    pub(crate) fn dropped(&self, kind: TargetKind, reason: DropReason, alerts: usize) {
        if alerts > 0 {
            self.dropped.with_label_values(&[kind.as_str(), reason.as_str()]).inc_by(as_u64(alerts));
        }
    }

    pub(crate) fn coalesced(&self, kind: TargetKind, alerts: usize) {
        if alerts > 0 {
            self.coalesced.with_label_values(&[kind.as_str()]).inc_by(as_u64(alerts));
        }
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn counts_are_per_kind_and_register() {
        let metrics = DeliveryMetrics::new().unwrap();
        metrics.delivered(TargetKind::Webhook, 3);
        metrics.dropped(TargetKind::Webhook, DropReason::GaveUp, 2);
        metrics.dropped(TargetKind::Webhook, DropReason::QueueFull, 1);
        metrics.failed_attempt(TargetKind::Alertmanager);
        metrics.coalesced(TargetKind::Alertmanager, 4);
        assert_eq!(
            metrics.counts(TargetKind::Webhook),
            DeliveryCounts { delivered: 3, failed_attempts: 0, dropped: 3, coalesced: 0 }
        );
        assert_eq!(
            metrics.counts(TargetKind::Alertmanager),
            DeliveryCounts { delivered: 0, failed_attempts: 1, dropped: 0, coalesced: 4 }
        );
        let registry = Registry::new();
        metrics.register(&registry).unwrap();
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_owned()).collect();
        assert!(names.contains(&"flotilla_controller_alerts_dropped_total".to_owned()), "{names:?}");
    }
}
