//! The task behind one target: takes alert states from its inbox, posts them
//! with retries, re-posts firing alerts to Alertmanager, and on shutdown makes one
//! bounded last attempt at the queued resolutions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Client, Url};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::backoff::Backoff;
use super::config::{DeliveryConfig, redact};
use super::inbox::Inbox;
use super::metrics::{DeliveryMetrics, DropReason};
use super::outbox::Outbox;
use super::transport::{Attempt, post_json};
use super::{OutgoingAlert, TargetKind, payload};

/// One delivery target: where to POST and the queue in front of it.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) kind: TargetKind,
    pub(crate) url: Url,
    /// The URL without credentials or query, for logs.
    pub(crate) shown: String,
    pub(crate) inbox: Inbox,
}

impl Target {
    pub(crate) fn new(kind: TargetKind, url: Url, capacity: usize) -> Arc<Self> {
        let shown = redact(&url);
        Arc::new(Self { kind, url, shown, inbox: Inbox::new(capacity) })
    }
}

/// How one request ended, after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Delivered,
    Lost(DropReason),
    Cancelled,
}

/// A body ready to post and the alerts in it.
struct Request {
    alerts: Vec<OutgoingAlert>,
    body: Vec<u8>,
}

/// The state of one target's task.
pub(crate) struct Worker {
    target: Arc<Target>,
    client: Client,
    backoff: Backoff,
    timeout: Duration,
    resend_interval: Duration,
    max_batch: usize,
    external_url: String,
    metrics: DeliveryMetrics,
    cancel: CancellationToken,
}

impl Worker {
    pub(crate) fn new(
        target: Arc<Target>,
        client: Client,
        config: &DeliveryConfig,
        metrics: DeliveryMetrics,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            target,
            client,
            backoff: Backoff {
                initial: config.backoff_initial,
                max: config.backoff_max,
                max_attempts: config.max_attempts,
            },
            timeout: config.timeout,
            resend_interval: config.resend_interval,
            max_batch: config.max_batch,
            external_url: config.external_url.clone(),
            metrics,
            cancel,
        }
    }

    pub(crate) async fn run(self) {
        let leftover = match self.target.kind {
            TargetKind::Alertmanager => self.run_alertmanager().await,
            TargetKind::Webhook => self.run_webhook().await,
        };
        self.final_flush(leftover).await;
        debug!(target = %self.target.shown, "alert delivery stopped");
    }

    /// Posts new states as they come and due re-posts of firing alerts, batched;
    /// returns the alerts of the request cut short by shutdown.
    async fn run_alertmanager(&self) -> Vec<OutgoingAlert> {
        let mut outbox = Outbox::new(self.resend_interval);
        loop {
            let mut batch = self.take_for_alertmanager();
            outbox.record(&batch);
            let now = Instant::now();
            let room = self.max_batch.saturating_sub(batch.len());
            let due = {
                let taken: HashSet<&str> = batch.iter().map(|a| a.fingerprint.as_str()).collect();
                outbox.due(now, &taken, room)
            };
            batch.extend(due);
            if batch.is_empty() {
                let next_resend = outbox.next_due();
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => return Vec::new(),
                    () = self.target.inbox.ready() => {}
                    () = sleep_until(next_resend) => {}
                }
                continue;
            }
            let fingerprints: Vec<String> = batch.iter().map(|a| a.fingerprint.clone()).collect();
            let sent = match self.requests(batch).pop() {
                Some(request) => Some((self.send(&request).await, request)),
                None => None,
            };
            outbox.attempted(fingerprints.iter().map(String::as_str), Instant::now());
            let Some((sent, request)) = sent else { continue };
            match sent {
                Sent::Delivered => {}
                Sent::Lost(reason) => self.metrics.dropped(self.target.kind, reason, request.alerts.len()),
                Sent::Cancelled => return request.alerts,
            }
        }
    }

    /// Up to a batch of queued states, less those Alertmanager would refuse (one
    /// refused alert fails the whole request, again at every re-post).
    fn take_for_alertmanager(&self) -> Vec<OutgoingAlert> {
        let (valid, refused): (Vec<_>, Vec<_>) =
            self.target.inbox.take(self.max_batch).into_iter().partition(payload::alertmanager_accepts);
        for alert in &refused {
            warn!(
                target = %self.target.shown,
                fingerprint = %alert.fingerprint,
                labels = ?alert.labels,
                "alert not sent: Alertmanager accepts only non-empty label sets with names like [a-zA-Z_][a-zA-Z0-9_]*",
            );
        }
        self.metrics.dropped(self.target.kind, DropReason::Rejected, refused.len());
        valid
    }

    /// Posts each batch as it comes, one notification per `alertname`; returns the
    /// alerts not yet delivered when shutdown cut in.
    async fn run_webhook(&self) -> Vec<OutgoingAlert> {
        loop {
            let batch = self.target.inbox.take(self.max_batch);
            if batch.is_empty() {
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => return Vec::new(),
                    () = self.target.inbox.ready() => {}
                }
                continue;
            }
            let mut requests = self.requests(batch).into_iter();
            while let Some(request) = requests.next() {
                match self.send(&request).await {
                    Sent::Delivered => {}
                    Sent::Lost(reason) => self.metrics.dropped(self.target.kind, reason, request.alerts.len()),
                    Sent::Cancelled => {
                        let mut leftover = request.alerts;
                        leftover.extend(requests.flat_map(|r| r.alerts));
                        return leftover;
                    }
                }
            }
        }
    }

    /// Request bodies for alerts: Alertmanager takes batches of up to `max_batch`;
    /// a webhook gets one notification per `alertname` group.
    fn requests(&self, alerts: Vec<OutgoingAlert>) -> Vec<Request> {
        let groups = match self.target.kind {
            TargetKind::Alertmanager => vec![alerts],
            TargetKind::Webhook => payload::group_by_alertname(alerts),
        };
        let mut requests = Vec::new();
        for group in groups {
            for chunk in group.chunks(self.max_batch.max(1)) {
                let body = match self.target.kind {
                    TargetKind::Alertmanager => {
                        payload::alertmanager_body(chunk, payload::now_unix_ms(), self.resend_interval)
                    }
                    TargetKind::Webhook => payload::webhook_body(chunk, &self.external_url),
                };
                match body {
                    Ok(body) => requests.push(Request { alerts: chunk.to_vec(), body }),
                    Err(e) => {
                        // Maps of strings always serialize; this is only a guard.
                        error!(target = %self.target.shown, error = %e, "alert payload not serializable");
                        self.metrics.dropped(self.target.kind, DropReason::Rejected, chunk.len());
                    }
                }
            }
        }
        requests
    }

    /// Posts one request until it is delivered, refused, out of attempts, or cancelled.
    async fn send(&self, request: &Request) -> Sent {
        let target = &self.target.shown;
        let alerts = request.alerts.len();
        let mut failures = 0u32;
        loop {
            let attempt = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Sent::Cancelled,
                attempt = post_json(&self.client, &self.target.url, request.body.clone()) => attempt,
            };
            match attempt {
                Attempt::Delivered => {
                    self.metrics.delivered(self.target.kind, alerts);
                    debug!(%target, alerts, attempt = failures + 1, "alerts delivered");
                    return Sent::Delivered;
                }
                Attempt::Rejected { reason } => {
                    self.metrics.failed_attempt(self.target.kind);
                    warn!(%target, alerts, attempt = failures + 1, error = %reason, "alert delivery refused; not retried");
                    return Sent::Lost(DropReason::Rejected);
                }
                Attempt::Retryable { reason, retry_after } => {
                    self.metrics.failed_attempt(self.target.kind);
                    failures += 1;
                    if !self.backoff.retries_after(failures) {
                        warn!(%target, alerts, attempt = failures, error = %reason, "alert delivery failed; giving up");
                        return Sent::Lost(DropReason::GaveUp);
                    }
                    let delay = self.backoff.random_delay(failures, retry_after);
                    warn!(%target, alerts, attempt = failures, retry_in = ?delay, error = %reason, "alert delivery failed");
                    tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => return Sent::Cancelled,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One attempt per request, within one request timeout in all, at the
    /// resolutions still to be delivered: those of the request shutdown cut short and
    /// those queued. Queued firing states are dropped (the next controller notifies
    /// them again; Alertmanager keeps the last posted ones until their `endsAt`).
    async fn final_flush(&self, leftover: Vec<OutgoingAlert>) {
        let kind = self.target.kind;
        // Queued states are newer than the interrupted request's.
        let mut newest: HashMap<String, OutgoingAlert> =
            leftover.into_iter().map(|a| (a.fingerprint.clone(), a)).collect();
        newest.extend(self.target.inbox.drain().into_iter().map(|a| (a.fingerprint.clone(), a)));
        let (mut resolved, firing): (Vec<_>, Vec<_>) = newest.into_values().partition(OutgoingAlert::is_resolved);
        self.metrics.dropped(kind, DropReason::Shutdown, firing.len());
        if kind == TargetKind::Alertmanager {
            let before = resolved.len();
            resolved.retain(payload::alertmanager_accepts);
            self.metrics.dropped(kind, DropReason::Rejected, before - resolved.len());
        }
        if resolved.is_empty() {
            return;
        }
        resolved.sort_by_key(|a| a.ends_at_unix_ms);
        let total = resolved.len();
        let mut delivered = 0usize;
        let flush = async {
            for request in self.requests(resolved) {
                match post_json(&self.client, &self.target.url, request.body).await {
                    Attempt::Delivered => {
                        self.metrics.delivered(kind, request.alerts.len());
                        delivered += request.alerts.len();
                    }
                    Attempt::Retryable { reason, .. } | Attempt::Rejected { reason } => {
                        self.metrics.failed_attempt(kind);
                        warn!(target = %self.target.shown, error = %reason, "final delivery of resolved alerts failed");
                    }
                }
            }
        };
        if tokio::time::timeout(self.timeout, flush).await.is_err() {
            warn!(target = %self.target.shown, timeout = ?self.timeout, "final delivery of resolved alerts timed out");
        }
        self.metrics.dropped(kind, DropReason::Shutdown, total - delivered);
        debug!(target = %self.target.shown, delivered, total, "final delivery of resolved alerts");
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
