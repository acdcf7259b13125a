//! The telemetry committer: batches from every agent stream queue here, are
//! written to the store many at a time under one flush (group commit), and only
//! then acknowledged to their streams and published to watchers.

use std::sync::Arc;

use flotilla_common::NodeId;
use flotilla_common::model::TelemetryBatch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::alert::engine::Engine;
use crate::fleetview::FleetView;
use crate::metrics::Metrics;
use crate::store::{Committed, Store};
use crate::watch::TelemetryFeed;

/// Where the committer sends the seqs it has made durable for one stream.
pub type AckSink = mpsc::Sender<Vec<u64>>;

/// A stream's session id and where its acks go.
type StreamSink = (u64, AckSink);

/// One batch waiting to be made durable.
#[derive(Debug)]
pub struct Job {
    pub node: NodeId,
    pub batch: TelemetryBatch,
    /// The stream's session id: acks are grouped per stream by it.
    pub stream: u64,
    pub acks: AckSink,
}

/// The sending side of the commit queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl Committer {
    /// Queues a batch; waits while the queue is full (backpressure on the stream).
    pub async fn submit(&self, job: Job) -> Result<(), Job> {
        self.tx.send(job).await.map_err(|e| e.0)
    }
}

/// Starts the committer loop. It ends when `cancel` fires, after committing and
/// acknowledging everything already queued.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    store: Arc<dyn Store>,
    view: FleetView,
    feed: TelemetryFeed,
    metrics: Metrics,
    alerts: Engine,
    policy: &crate::config::TelemetryPolicy,
    cancel: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Committer {
    let (tx, rx) = mpsc::channel(policy.commit_queue);
    tracker.spawn(run(Shared { store, view, feed, metrics, alerts }, rx, policy.max_commit_group, cancel));
    Committer { tx }
}

/// What the committer loop needs besides its queue.
struct Shared {
    store: Arc<dyn Store>,
    view: FleetView,
    feed: TelemetryFeed,
    metrics: Metrics,
    alerts: Engine,
}

async fn run(shared: Shared, mut rx: mpsc::Receiver<Job>, max_group: usize, cancel: CancellationToken) {
    loop {
        let first = tokio::select! {
            job = rx.recv() => job,
            () = cancel.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut jobs = vec![first];
        while jobs.len() < max_group {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        commit(&shared, jobs).await;
    }
    tracing::debug!("telemetry committer stopped");
}

async fn commit(shared: &Shared, jobs: Vec<Job>) {
    let (keys, sinks): (Vec<(NodeId, TelemetryBatch)>, Vec<StreamSink>) =
        jobs.into_iter().map(|j| ((j.node, j.batch), (j.stream, j.acks))).unzip();
    let store = Arc::clone(&shared.store);
    let count = keys.len();
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let outcome = store.commit_batches(&keys);
        (keys, outcome)
    })
    .await;
    shared.metrics.flush_seconds.observe(started.elapsed().as_secs_f64());
    shared.metrics.commit_group_batches.observe(count as f64);
    let (keys, outcome) = match result {
        Ok((keys, Ok(outcome))) => (keys, outcome),
        Ok((_, Err(error))) => {
            shared.metrics.commit_failures.inc();
            // Nothing is acknowledged; agents keep the batches and resend them.
            tracing::error!(%error, batches = count, "telemetry commit failed; batches not acknowledged");
            return;
        }
        Err(error) => {
            shared.metrics.commit_failures.inc();
            tracing::error!(%error, batches = count, "telemetry commit task failed; batches not acknowledged");
            return;
        }
    };
    let duplicates = outcome.iter().filter(|c| **c == Committed::Duplicate).count();
    shared.metrics.batches_duplicate.inc_by(duplicates as u64);
    shared.metrics.batches_committed.inc_by((count - duplicates) as u64);
    for ((node, batch), c) in keys.iter().zip(&outcome) {
        // Only a node's newest batch is published: a late resend is stored but old news.
        if *c == Committed::New && shared.view.observe(node, batch) {
            shared.feed.publish(node, batch);
        }
    }
    if duplicates > 0 {
        tracing::debug!(duplicates, "resent batches already stored; acknowledging again");
    }
    // Group the seqs per stream (by session id: linear in the batches, however
    // many streams share the commit) so each stream gets one Ack per commit.
    let mut grouped: std::collections::HashMap<u64, (AckSink, Vec<u64>)> = std::collections::HashMap::new();
    for ((_, batch), (stream, sink)) in keys.iter().zip(sinks) {
        grouped.entry(stream).or_insert_with(|| (sink, Vec::new())).1.push(batch.seq);
    }
    for (sink, seqs) in grouped.into_values() {
        // A full or closed sink means the stream is gone or not reading; the agent
        // resends unacknowledged batches, and the store de-duplicates them.
        if sink.try_send(seqs).is_err() {
            tracing::debug!("ack dropped: stream closed or not reading");
        }
    }
    // The alert engine reads new batches after the acks are out, on its own task.
    let new: Vec<(NodeId, TelemetryBatch)> =
        keys.into_iter().zip(outcome).filter(|(_, c)| *c == Committed::New).map(|(k, _)| k).collect();
    if !new.is_empty() {
        shared.alerts.submit(new).await;
    }
}
