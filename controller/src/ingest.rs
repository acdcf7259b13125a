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

    /// Queues a batch if the queue has room; otherwise hands it back, saying
    /// whether the queue was full or closed (the controller is shutting down).
    // The job comes back by value so the caller can wait with it (`submit`)
    // without a copy; boxing the error would allocate per batch on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn try_submit(&self, job: Job) -> Result<(), mpsc::error::TrySendError<Job>> {
        self.tx.try_send(job)
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
    let group = Grouping { max: policy.max_commit_group, linger: policy.commit_linger };
    tracker.spawn(run(Shared { store, view, feed, metrics, alerts }, rx, group, cancel));
    Committer { tx }
}

/// How batches are grouped under one flush.
#[derive(Debug, Clone, Copy)]
struct Grouping {
    /// Most batches in one group.
    max: usize,
    /// How long the first batch of a group waits for more.
    linger: std::time::Duration,
}

/// What the committer loop needs besides its queue.
struct Shared {
    store: Arc<dyn Store>,
    view: FleetView,
    feed: TelemetryFeed,
    metrics: Metrics,
    alerts: Engine,
}

async fn run(shared: Shared, mut rx: mpsc::Receiver<Job>, group: Grouping, cancel: CancellationToken) {
    loop {
        let first = tokio::select! {
            job = rx.recv() => job,
            () = cancel.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        if !group.linger.is_zero() && !cancel.is_cancelled() {
            // Let the batches of other streams join this flush (group commit).
            tokio::select! {
                () = tokio::time::sleep(group.linger) => {}
                () = cancel.cancelled() => {}
            }
        }
        let mut jobs = vec![first];
        while jobs.len() < group.max {
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
            if let Some(left_out) = failure_report_due() {
                tracing::error!(%error, batches = count, left_out, "telemetry commit failed; batches not acknowledged");
            }
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
    if duplicates > 0 {
        tracing::debug!(duplicates, "resent batches already stored; acknowledging again");
    }
    // From here a batch is shared, never copied: the view keeps each node's
    // newest, and watchers and the alert engine read the same allocation.
    let mut new: Vec<(NodeId, Arc<TelemetryBatch>)> = Vec::with_capacity(count - duplicates);
    // Group the seqs per stream (by session id: linear in the batches, however
    // many streams share the commit) so each stream gets one Ack per commit.
    let mut grouped: std::collections::HashMap<u64, (AckSink, Vec<u64>)> = std::collections::HashMap::new();
    for (((node, batch), c), (stream, sink)) in keys.into_iter().zip(outcome).zip(sinks) {
        grouped.entry(stream).or_insert_with(|| (sink, Vec::new())).1.push(batch.seq);
        if c == Committed::New {
            let batch = Arc::new(batch);
            // Only a node's newest batch is published: a late resend is stored but old news.
            if shared.view.observe(&node, &batch) {
                shared.feed.publish(&node, &batch);
            }
            new.push((node, batch));
        }
    }
    for (sink, seqs) in grouped.into_values() {
        // A full or closed sink means the stream is gone or not reading; the agent
        // resends unacknowledged batches, and the store de-duplicates them.
        if sink.try_send(seqs).is_err() {
            tracing::debug!("ack dropped: stream closed or not reading");
        }
    }
    // The alert engine reads new batches after the acks are out, on its own task.
    if !new.is_empty() {
        shared.alerts.submit(new).await;
    }
}

/// Commit failures come in runs (a full disk fails every commit until space
/// returns, and the log may be on that disk): one line every 10 s at most.
/// `Some(n)` when this failure is to be logged, `n` failures having been left
/// out since the last one logged.
fn failure_report_due() -> Option<u64> {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    static LAST_MS: AtomicI64 = AtomicI64::new(i64::MIN);
    static LEFT_OUT: AtomicU64 = AtomicU64::new(0);
    let now = flotilla_common::time::now_unix_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST_MS.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        return Some(LEFT_OUT.swap(0, Ordering::Relaxed));
    }
    LEFT_OUT.fetch_add(1, Ordering::Relaxed);
    None
}
