//! The in-memory view of the fleet: each node's inventory and newest batch, kept
//! current by the committer so that scrapes and reads need no store scan.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use flotilla_common::NodeId;
use flotilla_common::model::{ContainerReport, Inventory, TelemetryBatch};

use crate::store::{Store, StoreError};

/// One node's newest known state.
#[derive(Debug, Clone, Default)]
pub struct NodeLatest {
    pub inventory: Inventory,
    /// Shared with the committer and the alert engine's intake: a batch is
    /// decoded once and never copied on its way in.
    pub latest: Option<Arc<TelemetryBatch>>,
    /// The containers the agent last reported. In memory only: every agent
    /// reports them again when it connects, so after a controller restart a
    /// node shows none until it is back.
    pub containers: Option<ContainerReport>,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    inner: Arc<RwLock<BTreeMap<NodeId, NodeLatest>>>,
}

impl FleetView {
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<NodeId, NodeLatest>> {
        // Writers only insert or replace whole values: a poisoned lock holds consistent data.
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<NodeId, NodeLatest>> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads every node and its newest batch from the store (at start-up).
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let view = Self::default();
        {
            let mut map = view.write();
            for record in store.nodes()? {
                let latest = store.latest_batch(&record.id)?.map(Arc::new);
                map.insert(record.id, NodeLatest { inventory: record.inventory, latest, containers: None });
            }
        }
        Ok(view)
    }

    /// Records a node's inventory (on hello).
    pub fn set_inventory(&self, node: &NodeId, inventory: Inventory) {
        self.write().entry(node.clone()).or_default().inventory = inventory;
    }

    /// Records the containers a node reported (on hello, `None` from an agent
    /// that does not report them, and on every change).
    pub fn set_containers(&self, node: &NodeId, containers: Option<ContainerReport>) {
        self.write().entry(node.clone()).or_default().containers = containers;
    }

    /// A copy of the containers a node last reported.
    pub fn containers(&self, node: &NodeId) -> Option<ContainerReport> {
        self.read().get(node).and_then(|n| n.containers.clone())
    }

    /// Records a committed batch if it is newer than what is known; returns
    /// whether it was (a resent or late batch is not).
    pub fn observe(&self, node: &NodeId, batch: &Arc<TelemetryBatch>) -> bool {
        let mut map = self.write();
        match map.get_mut(node) {
            Some(entry) => {
                let newer = entry.latest.as_ref().is_none_or(|b| b.seq < batch.seq);
                if newer {
                    entry.latest = Some(Arc::clone(batch));
                }
                newer
            }
            None => {
                let latest = NodeLatest { latest: Some(Arc::clone(batch)), ..NodeLatest::default() };
                map.insert(node.clone(), latest);
                true
            }
        }
    }

    /// A copy of one node's newest committed batch (what the store would return
    /// as its latest, without reading it).
    pub fn latest(&self, node: &NodeId) -> Option<TelemetryBatch> {
        self.read().get(node).and_then(|n| n.latest.as_deref().cloned())
    }

    /// A copy of one node's inventory.
    pub fn inventory(&self, node: &NodeId) -> Option<Inventory> {
        self.read().get(node).map(|n| n.inventory.clone())
    }

    /// Every known node id, ordered.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.read().keys().cloned().collect()
    }

    /// A copy of every node's state, ordered by id.
    pub fn snapshot(&self) -> Vec<(NodeId, NodeLatest)> {
        self.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
