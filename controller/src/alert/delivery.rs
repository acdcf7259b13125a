//! Delivery of alert notifications to Alertmanager (API v2) and plain webhooks
//! (Alertmanager's webhook payload), with a bounded coalescing queue, retries with
//! jittered exponential backoff, and periodic re-posting of firing alerts to
//! Alertmanager.
//!
//! Each target has its own queue and its own task, so a dead target never delays
//! another. The engine hands over alert states with [`Dispatcher::notify`], which
//! never blocks: a queue keeps only the newest state of each alert and, when full,
//! drops the oldest firing state first.
//!
//! Alertmanager targets remember which alerts fire and post them again every
//! `resend_interval` with `endsAt = now + 4 × resend_interval`, as Prometheus does:
//! Alertmanager keeps them active while we live and resolves them by itself if we
//! stop. A resolution is posted once (with retries) and never re-sent; should every
//! attempt fail, Alertmanager still resolves the alert when the last posted
//! `endsAt` passes. Webhook
//! targets get one notification per state handed over; re-notification is the
//! engine's decision.

mod backoff;
mod config;
mod inbox;
mod metrics;
mod outbox;
mod payload;
mod transport;
mod worker;

#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, warn};

pub use config::DeliveryConfig;
pub use metrics::{DeliveryCounts, DeliveryMetrics};

use inbox::Pushed;
use metrics::DropReason;
use worker::{Target, Worker};

/// One alert as sent out (Alertmanager's postable alert / webhook alert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingAlert {
    /// Stable id of the alert instance (the engine computes it); queues coalesce on it.
    pub fingerprint: String,
    /// Includes `alertname`, `severity`, `node`, ...
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at_unix_ms: i64,
    /// `Some(resolve time)` once resolved.
    pub ends_at_unix_ms: Option<i64>,
    pub generator_url: String,
}

impl OutgoingAlert {
    /// Whether this state is a resolution.
    pub fn is_resolved(&self) -> bool {
        self.ends_at_unix_ms.is_some()
    }
}

/// The two kinds of delivery target (the `kind` label of the delivery metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    Alertmanager,
    Webhook,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alertmanager => "alertmanager",
            Self::Webhook => "webhook",
        }
    }
}

/// Why delivery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("alert delivery config: {0}")]
    Config(String),
    #[error("alert delivery ca_file: {source}")]
    CaFile {
        #[source]
        source: flotilla_common::tls::TlsError,
    },
    #[error("alert delivery TLS set-up: {0} (install the ca-certificates package or set ca_file)")]
    Tls(#[source] rustls::Error),
    #[error("alert delivery HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("alert delivery metrics: {0}")]
    Metrics(#[source] prometheus::Error),
}

/// The engine's handle on delivery: cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    targets: Arc<[Arc<Target>]>,
    metrics: DeliveryMetrics,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<&str> = self.targets.iter().map(|t| t.shown.as_str()).collect();
        f.debug_struct("Dispatcher").field("targets", &shown).finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// Validates `config` and starts one task per target on `tracker`; each stops
    /// when `cancel` fires, after one last attempt, bounded by the request timeout,
    /// to deliver the resolutions still queued.
    pub fn spawn(
        config: DeliveryConfig,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Self, DeliveryError> {
        config.validate().map_err(DeliveryError::Config)?;
        let metrics = DeliveryMetrics::new().map_err(DeliveryError::Metrics)?;
        let mut targets = Vec::new();
        for base in &config.alertmanagers {
            let base = config::parse_target(base).map_err(DeliveryError::Config)?;
            targets.push(Target::new(TargetKind::Alertmanager, alertmanager_alerts_url(&base), config.queue_capacity));
        }
        for url in &config.webhooks {
            let url = config::parse_target(url).map_err(DeliveryError::Config)?;
            targets.push(Target::new(TargetKind::Webhook, url, config.queue_capacity));
        }
        if !targets.is_empty() {
            let needs_tls = targets.iter().any(|t| t.url.scheme() == "https");
            let client = transport::client(config.ca_file.as_deref(), config.timeout, needs_tls)?;
            for target in &targets {
                let span = tracing::info_span!("alert_delivery", kind = target.kind.as_str(), target = %target.shown);
                let worker = Worker::new(target.clone(), client.clone(), &config, metrics.clone(), cancel.clone());
                tracker.spawn(worker.run().instrument(span));
            }
        }
        Ok(Self { targets: targets.into(), metrics })
    }

    /// Hands over alert state changes (newly firing, resolved, re-notified) to every
    /// target. Never blocks; a full queue drops the oldest firing state it holds.
    pub fn notify(&self, alerts: Vec<OutgoingAlert>) {
        self.push(alerts, |_| true);
    }

    /// Hands alerts that were already delivered before a restart to the
    /// Alertmanager targets only: their re-post schedule lives in memory, and
    /// Alertmanager would otherwise let them lapse at their last `endsAt`.
    /// Webhooks are not told again (that would page twice).
    pub fn resume(&self, alerts: Vec<OutgoingAlert>) {
        self.push(alerts, |kind| kind == TargetKind::Alertmanager);
    }

    fn push(&self, alerts: Vec<OutgoingAlert>, to: impl Fn(TargetKind) -> bool) {
        if alerts.is_empty() {
            return;
        }
        for target in self.targets.iter().filter(|t| to(t.kind)) {
            let outcomes = target.inbox.push_all(alerts.iter().cloned());
            let coalesced = outcomes.iter().filter(|o| **o == Pushed::Coalesced).count();
            let evicted = outcomes.iter().filter(|o| **o == Pushed::Evicted).count();
            self.metrics.coalesced(target.kind, coalesced);
            if evicted > 0 {
                self.metrics.dropped(target.kind, DropReason::QueueFull, evicted);
                warn!(target = %target.shown, dropped = evicted, "alert queue full: dropped the oldest queued states");
            }
        }
    }

    /// The delivery counters (register them with [`DeliveryMetrics::register`]).
    pub fn metrics(&self) -> &DeliveryMetrics {
        &self.metrics
    }
}

/// `{base}/api/v2/alerts`, keeping any path prefix of the base (Alertmanager behind
/// `--web.route-prefix`).
fn alertmanager_alerts_url(base: &reqwest::Url) -> reqwest::Url {
    let mut url = base.clone();
    url.set_path(&format!("{}/api/v2/alerts", base.path().trim_end_matches('/')));
    url
}
