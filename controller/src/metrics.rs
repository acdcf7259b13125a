//! The controller's own metrics (connected agents, commits, flush latency, store
//! size), on the `prometheus` crate's registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

/// Handles to every self-metric; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub agents_connected: IntGauge,
    pub batches_committed: IntCounter,
    pub batches_duplicate: IntCounter,
    pub commit_failures: IntCounter,
    pub flush_seconds: Histogram,
    pub commit_group_batches: Histogram,
    pub store_size_bytes: IntGauge,
    pub handshakes_refused: IntCounter,
    pub alert_evaluations: IntCounter,
    pub alert_evaluation_seconds: Histogram,
    pub rule_evaluation_failures: IntCounter,
    pub alerts_firing: IntGauge,
    pub alerts_pending: IntGauge,
    pub alert_window_series: IntGauge,
    pub alert_window_samples: IntGauge,
    pub requests_rate_limited: IntCounter,
    pub requests_shed: IntCounter,
    pub requests_timed_out: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates and registers every metric (names are constants: a failure here is
    /// a programming error, reported at start-up rather than as a panic).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        Ok(Self {
            agents_connected: gauge("flotilla_controller_agents_connected", "Agents with a live stream.")?,
            batches_committed: counter(
                "flotilla_controller_batches_committed_total",
                "Telemetry batches written durably and acknowledged.",
            )?,
            batches_duplicate: counter(
                "flotilla_controller_batches_duplicate_total",
                "Resent telemetry batches that were already stored (acknowledged again).",
            )?,
            commit_failures: counter(
                "flotilla_controller_commit_failures_total",
                "Group commits that failed; their batches were not acknowledged.",
            )?,
            flush_seconds: histogram(
                "flotilla_controller_commit_flush_seconds",
                "Time to write and flush one group commit.",
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
            )?,
            commit_group_batches: histogram(
                "flotilla_controller_commit_group_batches",
                "Batches per group commit.",
                vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0],
            )?,
            store_size_bytes: gauge("flotilla_controller_store_size_bytes", "Size of the sled store on disk.")?,
            handshakes_refused: counter(
                "flotilla_controller_tls_handshakes_refused_total",
                "TLS handshakes refused (foreign CA, no certificate, not TLS, timeout).",
            )?,
            alert_evaluations: counter(
                "flotilla_controller_alert_evaluations_total",
                "Passes of the alert engine over every rule.",
            )?,
            alert_evaluation_seconds: histogram(
                "flotilla_controller_alert_evaluation_seconds",
                "Time to evaluate every rule once.",
                vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0],
            )?,
            rule_evaluation_failures: counter(
                "flotilla_controller_rule_evaluation_failures_total",
                "Rule evaluations that failed (see flotctl rules ls for the error).",
            )?,
            alerts_firing: gauge("flotilla_controller_alerts_firing", "Alerts firing now.")?,
            alerts_pending: gauge("flotilla_controller_alerts_pending", "Alerts pending (waiting out their for).")?,
            alert_window_series: gauge(
                "flotilla_controller_alert_window_series",
                "Series kept in memory for rule evaluation.",
            )?,
            alert_window_samples: gauge(
                "flotilla_controller_alert_window_samples",
                "Samples kept in memory for rule evaluation.",
            )?,
            requests_rate_limited: counter(
                "flotilla_controller_requests_rate_limited_total",
                "gRPC requests refused because their client was over limits.requests_per_second_per_client.",
            )?,
            requests_shed: counter(
                "flotilla_controller_requests_shed_total",
                "gRPC requests refused because limits.max_concurrent_requests were in progress.",
            )?,
            requests_timed_out: counter(
                "flotilla_controller_requests_timed_out_total",
                "gRPC requests cut off after limits.request_timeout.",
            )?,
            registry,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_registers() {
        let m = super::Metrics::new().unwrap();
        assert!(m.registry.gather().len() >= 8);
    }
}
