//! Where `flotctl top`'s data comes from: the `WatchTelemetry` stream, kept open
//! and reopened with backoff when it drops, and `ListNodes`/`ListAlerts` polled
//! every few seconds. Both run as tasks that send [`Update`]s to the event loop
//! and end when their cancellation token is cancelled or the loop is gone.

use std::sync::Arc;
use std::time::Duration;

use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::model::Link;
use crate::client::status_error;

/// How long a unary call or the opening of the stream may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before reopening the stream; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// What the tasks tell the event loop.
#[derive(Debug)]
pub enum Update {
    Telemetry {
        node_id: String,
        batch: pb::TelemetryBatch,
    },
    MissedUpdates(u64),
    Link(Link),
    Nodes(Vec<pb::Node>),
    Alerts(Vec<pb::Alert>),
    /// A poll failed (`Some`) or went through (`None`).
    Poll(Option<String>),
}

/// The wait before reopening the stream after `failures` failures in a row.
pub fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(2u32.saturating_pow(failures.min(16))).min(MAX_BACKOFF)
}

/// Keeps `WatchTelemetry` open until `cancel`, forwarding each batch.
pub async fn watch(mut client: crate::client::Fleet, tx: mpsc::Sender<Update>, cancel: CancellationToken) {
    let mut failures = 0u32;
    loop {
        if tx.send(Update::Link(Link::Connecting)).await.is_err() {
            return;
        }
        let opened = tokio::select! {
            () = cancel.cancelled() => return,
            r = tokio::time::timeout(CALL_TIMEOUT, client.watch_telemetry(pb::WatchTelemetryRequest::default())) => r,
        };
        let error = match opened {
            Err(_) => format!("opening the telemetry stream took over {}s", CALL_TIMEOUT.as_secs()),
            Ok(Err(status)) => status_error("watch telemetry", &status).to_string(),
            Ok(Ok(response)) => {
                if tx.send(Update::Link(Link::Live)).await.is_err() {
                    return;
                }
                let mut stream = response.into_inner();
                loop {
                    let message = tokio::select! {
                        () = cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let update = match message {
                        Ok(Some(pb::WatchTelemetryResponse { event: Some(event) })) => match event {
                            pb::watch_telemetry_response::Event::Telemetry(t) => {
                                let Some(batch) = t.batch else { continue };
                                Update::Telemetry { node_id: t.node_id, batch }
                            }
                            pb::watch_telemetry_response::Event::MissedUpdates(n) => Update::MissedUpdates(n),
                        },
                        Ok(Some(_)) => continue,
                        Ok(None) => break "the controller ended the telemetry stream".to_owned(),
                        Err(status) => break status_error("telemetry stream", &status).to_string(),
                    };
                    // The stream works again: the next failure starts from the first wait.
                    failures = 0;
                    if tx.send(update).await.is_err() {
                        return;
                    }
                }
            }
        };
        let wait = backoff(failures);
        failures = failures.saturating_add(1);
        let retry_at_ms = now_unix_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
        if tx.send(Update::Link(Link::Down { error, retry_at_ms })).await.is_err() {
            return;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Lists nodes and alerts every `every`, and at once when `now` is notified.
pub async fn poll(
    mut client: crate::client::Fleet,
    every: Duration,
    now: Arc<Notify>,
    tx: mpsc::Sender<Update>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            () = now.notified() => {}
        }
        let nodes = tokio::select! {
            () = cancel.cancelled() => return,
            r = tokio::time::timeout(CALL_TIMEOUT, client.list_nodes(pb::ListNodesRequest {})) => r,
        };
        let alerts = tokio::select! {
            () = cancel.cancelled() => return,
            r = tokio::time::timeout(CALL_TIMEOUT, client.list_alerts(pb::ListAlertsRequest::default())) => r,
        };
        let mut errors = Vec::new();
        let mut updates = Vec::new();
        match nodes {
            Ok(Ok(r)) => updates.push(Update::Nodes(r.into_inner().nodes)),
            Ok(Err(status)) => errors.push(status_error("list nodes", &status).to_string()),
            Err(_) => errors.push(format!("list nodes: no answer in {}s", CALL_TIMEOUT.as_secs())),
        }
        match alerts {
            Ok(Ok(r)) => updates.push(Update::Alerts(r.into_inner().alerts)),
            Ok(Err(status)) => errors.push(status_error("list alerts", &status).to_string()),
            Err(_) => errors.push(format!("list alerts: no answer in {}s", CALL_TIMEOUT.as_secs())),
        }
        updates.push(Update::Poll((!errors.is_empty()).then(|| errors.join("; "))));
        for u in updates {
            if tx.send(u).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(5), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
