//! The live feed of committed telemetry behind `Fleet.WatchTelemetry`. The
//! committer publishes each node's newest batch on a broadcast channel, and each
//! watcher reads it at its own pace. Publishing never waits: a watcher that falls
//! behind loses the oldest updates and is told how many it missed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use flotilla_common::NodeId;
use flotilla_common::model::TelemetryBatch;
use tokio::sync::broadcast;

/// How many updates the feed holds for its slowest watcher.
pub const FEED_CAPACITY: usize = 1024;

/// One node's newest committed batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub node: NodeId,
    pub batch: TelemetryBatch,
}

/// The publishing side of the feed; cheap to clone.
#[derive(Debug, Clone)]
pub struct TelemetryFeed {
    tx: broadcast::Sender<Arc<Update>>,
}

impl Default for TelemetryFeed {
    fn default() -> Self {
        Self::new(FEED_CAPACITY)
    }
}

impl TelemetryFeed {
    /// A feed that holds `capacity` updates for lagging watchers.
    pub fn new(capacity: usize) -> Self {
        Self { tx: broadcast::channel(capacity.max(1)).0 }
    }

    /// Publishes a node's newest batch. Never blocks; with nobody watching it
    /// does not even copy the batch.
    pub fn publish(&self, node: &NodeId, batch: &TelemetryBatch) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        // Sending fails only when every watcher left since the check: nothing to do.
        let _ = self.tx.send(Arc::new(Update { node: node.clone(), batch: batch.clone() }));
    }

    /// A watcher of `nodes` (empty: every node). Updates published from now on
    /// reach it; [`Watcher::prime`] adds what was already known.
    pub fn watch(&self, nodes: BTreeSet<NodeId>) -> Watcher {
        Watcher { rx: self.tx.subscribe(), nodes, sent: HashMap::new(), pending: VecDeque::new() }
    }
}

/// What a watcher sees next.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A node's newest batch.
    Update(Arc<Update>),
    /// The watcher fell behind and this many updates were dropped for it.
    Missed(u64),
}

/// One watcher's view of the feed: filtered by node, never repeating or going
/// back on a node's seq.
#[derive(Debug)]
pub struct Watcher {
    rx: broadcast::Receiver<Arc<Update>>,
    nodes: BTreeSet<NodeId>,
    /// The last seq handed out per node.
    sent: HashMap<NodeId, u64>,
    /// Known batches to hand out before the live ones.
    pending: VecDeque<Arc<Update>>,
}

impl Watcher {
    /// Queues the batches known before the watcher subscribed (its starting
    /// point). One that also arrives on the feed is handed out once.
    pub fn prime(&mut self, known: impl IntoIterator<Item = Update>) {
        self.pending.extend(known.into_iter().map(Arc::new));
    }

    /// Whether `update` is for this watcher and newer than what it was given.
    fn take(&mut self, update: &Update) -> bool {
        if !self.nodes.is_empty() && !self.nodes.contains(&update.node) {
            return false;
        }
        let last = self.sent.entry(update.node.clone()).or_default();
        if update.batch.seq <= *last {
            return false;
        }
        *last = update.batch.seq;
        true
    }

    /// The next event; `None` once the feed is gone (the controller is stopping).
    pub async fn next(&mut self) -> Option<Event> {
        while let Some(update) = self.pending.pop_front() {
            if self.take(&update) {
                return Some(Event::Update(update));
            }
        }
        loop {
            match self.rx.recv().await {
                Ok(update) if self.take(&update) => return Some(Event::Update(update)),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => return Some(Event::Missed(missed)),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn batch(seq: u64) -> TelemetryBatch {
        TelemetryBatch { seq, created_unix_ms: 1, ..Default::default() }
    }

    fn seq(e: Option<Event>) -> u64 {
        match e {
            Some(Event::Update(u)) => u.batch.seq,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_slow_watcher_is_told_what_it_missed_and_the_publisher_never_waits() {
        let feed = TelemetryFeed::new(2);
        let mut w = feed.watch(BTreeSet::new());
        for s in 1..=5 {
            feed.publish(&node("a"), &batch(s));
        }
        assert_eq!(w.next().await, Some(Event::Missed(3)));
        assert_eq!(seq(w.next().await), 4);
        assert_eq!(seq(w.next().await), 5);
    }

    #[tokio::test]
    async fn watchers_see_their_nodes_once_starting_from_what_is_known() {
        let feed = TelemetryFeed::new(16);
        let mut w = feed.watch([node("a")].into());
        w.prime([Update { node: node("a"), batch: batch(3) }, Update { node: node("b"), batch: batch(9) }]);
        feed.publish(&node("a"), &batch(3));
        feed.publish(&node("b"), &batch(10));
        feed.publish(&node("a"), &batch(4));
        assert_eq!(seq(w.next().await), 3);
        assert_eq!(seq(w.next().await), 4, "b is filtered out and a's seq 3 is not repeated");
        drop(feed);
        assert_eq!(w.next().await, None);
    }
}
