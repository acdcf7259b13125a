//! The telemetry committer: batches from every agent stream queue here, are
//! written to the store many at a time under one flush (group commit), and only
//! then acknowledged to their streams.

use std::sync::Arc;

use flotilla_common::NodeId;
use flotilla_common::model::TelemetryBatch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{Committed, Store};

/// Where the committer sends the seqs it has made durable for one stream.
pub type AckSink = mpsc::Sender<Vec<u64>>;

/// One batch waiting to be made durable.
#[derive(Debug)]
pub struct Job {
    pub node: NodeId,
    pub batch: TelemetryBatch,
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
pub fn spawn(
    store: Arc<dyn Store>,
    queue: usize,
    max_group: usize,
    cancel: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Committer {
    let (tx, rx) = mpsc::channel(queue);
    tracker.spawn(run(store, rx, max_group, cancel));
    Committer { tx }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Job>,
    max_group: usize,
    cancel: CancellationToken,
) {
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
        commit(&store, jobs).await;
    }
    tracing::debug!("telemetry committer stopped");
}

async fn commit(store: &Arc<dyn Store>, jobs: Vec<Job>) {
    let (keys, sinks): (Vec<(NodeId, TelemetryBatch)>, Vec<AckSink>) = jobs
        .into_iter()
        .map(|j| ((j.node, j.batch), j.acks))
        .unzip();
    let store = Arc::clone(store);
    let count = keys.len();
    let result = tokio::task::spawn_blocking(move || {
        let outcome = store.commit_batches(&keys);
        (keys, outcome)
    })
    .await;
    let (keys, outcome) = match result {
        Ok((keys, Ok(outcome))) => (keys, outcome),
        Ok((_, Err(error))) => {
            // Nothing is acknowledged; agents keep the batches and resend them.
            tracing::error!(%error, batches = count, "telemetry commit failed; batches not acknowledged");
            return;
        }
        Err(error) => {
            tracing::error!(%error, batches = count, "telemetry commit task failed; batches not acknowledged");
            return;
        }
    };
    let duplicates = outcome
        .iter()
        .filter(|c| **c == Committed::Duplicate)
        .count();
    if duplicates > 0 {
        tracing::debug!(
            duplicates,
            "resent batches already stored; acknowledging again"
        );
    }
    // Group the seqs per stream so each stream gets one Ack per commit.
    let mut grouped: Vec<(AckSink, Vec<u64>)> = Vec::new();
    for ((_, batch), sink) in keys.iter().zip(sinks) {
        match grouped.iter_mut().find(|(s, _)| s.same_channel(&sink)) {
            Some((_, seqs)) => seqs.push(batch.seq),
            None => grouped.push((sink, vec![batch.seq])),
        }
    }
    for (sink, seqs) in grouped {
        // A full or closed sink means the stream is gone or not reading; the agent
        // resends unacknowledged batches, and the store de-duplicates them.
        if sink.try_send(seqs).is_err() {
            tracing::debug!("ack dropped: stream closed or not reading");
        }
    }
}
