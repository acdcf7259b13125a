//! The sled implementation of [`Store`].

use std::path::Path;

use flotilla_common::NodeId;
use flotilla_common::model::TelemetryBatch;

use super::{Committed, NodeRecord, SCHEMA_VERSION, Store, StoreError, codec, keys};

/// The embedded default store: one sled database in the controller's data dir.
pub struct SledStore {
    db: sled::Db,
    nodes: sled::Tree,
    telemetry: sled::Tree,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Sled { op, source }
}

impl SledStore {
    /// Opens (or creates) the store at `path`, checking and migrating the schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let db =
            sled::Config::new().path(path).open().map_err(|source| StoreError::Open { path: shown.clone(), source })?;
        let meta = db.open_tree(keys::META).map_err(sled_err("open meta tree"))?;
        let found = match meta.get(keys::SCHEMA_VERSION_KEY).map_err(sled_err("read schema version"))? {
            Some(bytes) => {
                let raw: [u8; 4] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: "meta/schema_version".into(),
                    reason: format!("{} bytes, expected 4", bytes.len()),
                })?;
                u32::from_be_bytes(raw)
            }
            None => 0,
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { path: shown, found, supported: SCHEMA_VERSION });
        }
        let store = Self {
            nodes: db.open_tree(keys::NODES).map_err(sled_err("open nodes tree"))?,
            telemetry: db.open_tree(keys::TELEMETRY).map_err(sled_err("open telemetry tree"))?,
            db,
        };
        // Migrations run in order from the version found; version 0 is a new store.
        // There are none yet: schema 1 is the first.
        if found < SCHEMA_VERSION {
            meta.insert(keys::SCHEMA_VERSION_KEY, &SCHEMA_VERSION.to_be_bytes())
                .map_err(sled_err("write schema version"))?;
            store.db.flush().map_err(sled_err("flush schema version"))?;
        }
        Ok(store)
    }
}

impl Store for SledStore {
    fn commit_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.nodes.insert(node.id.as_str().as_bytes(), codec::encode(node)).map_err(sled_err("write node"))?;
        self.db.flush().map_err(sled_err("flush node"))?;
        Ok(())
    }

    fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        let key = id.as_str().as_bytes();
        self.nodes.get(key).map_err(sled_err("read node"))?.map(|v| codec::decode(key, &v)).transpose()
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.nodes
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan nodes"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn commit_batches(&self, batches: &[(NodeId, TelemetryBatch)]) -> Result<Vec<Committed>, StoreError> {
        let mut outcome = Vec::with_capacity(batches.len());
        for (node, batch) in batches {
            let key = keys::telemetry_key(node, batch.seq);
            let swapped = self
                .telemetry
                .compare_and_swap(key, None as Option<&[u8]>, Some(codec::encode(batch)))
                .map_err(sled_err("write telemetry"))?;
            outcome.push(if swapped.is_ok() { Committed::New } else { Committed::Duplicate });
        }
        if outcome.contains(&Committed::New) {
            self.db.flush().map_err(sled_err("flush telemetry"))?;
        }
        Ok(outcome)
    }

    fn latest_batch(&self, node: &NodeId) -> Result<Option<TelemetryBatch>, StoreError> {
        match self.telemetry.scan_prefix(keys::telemetry_prefix(node)).next_back() {
            Some(item) => {
                let (k, v) = item.map_err(sled_err("read latest telemetry"))?;
                codec::decode(&k, &v).map(Some)
            }
            None => Ok(None),
        }
    }

    fn batches(&self, node: &NodeId, from_seq: u64, limit: usize) -> Result<Vec<TelemetryBatch>, StoreError> {
        // One past every key of this node: its id followed by 0x01 instead of 0x00.
        let mut end = node.as_str().as_bytes().to_vec();
        end.push(1);
        self.telemetry
            .range(keys::telemetry_key(node, from_seq)..end)
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan telemetry"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn prune_batches(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for node in self.nodes()? {
            for item in self.telemetry.scan_prefix(keys::telemetry_prefix(&node.id)) {
                let (k, v) = item.map_err(sled_err("scan telemetry for pruning"))?;
                let batch: TelemetryBatch = codec::decode(&k, &v)?;
                // Seqs grow with time, so the first batch young enough ends the scan.
                if batch.created_unix_ms >= cutoff_unix_ms {
                    break;
                }
                self.telemetry.remove(k).map_err(sled_err("prune telemetry"))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, at: i64) -> TelemetryBatch {
        TelemetryBatch { seq, created_unix_ms: at, ..Default::default() }
    }

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            id: NodeId::new(id).unwrap(),
            inventory: Default::default(),
            first_seen_unix_ms: 1,
            last_seen_unix_ms: 2,
        }
    }

    #[test]
    fn batches_are_deduplicated_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeId::new("a").unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.commit_node(&node("a")).unwrap();
            let out = store
                .commit_batches(&[(a.clone(), batch(1, 10)), (a.clone(), batch(2, 20)), (a.clone(), batch(1, 10))])
                .unwrap();
            assert_eq!(out, [Committed::New, Committed::New, Committed::Duplicate]);
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.nodes().unwrap(), vec![node("a")]);
        assert_eq!(store.latest_batch(&a).unwrap().unwrap().seq, 2);
        assert_eq!(store.batches(&a, 1, 10).unwrap().len(), 2);
        assert_eq!(store.commit_batches(&[(a.clone(), batch(2, 20))]).unwrap(), [Committed::Duplicate]);
    }

    #[test]
    fn node_prefixes_do_not_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = NodeId::new("a").unwrap();
        let ab = NodeId::new("ab").unwrap();
        store.commit_batches(&[(a.clone(), batch(5, 1)), (ab.clone(), batch(9, 1))]).unwrap();
        assert_eq!(store.latest_batch(&a).unwrap().unwrap().seq, 5);
        assert_eq!(store.batches(&a, 0, 100).unwrap().len(), 1);
    }

    #[test]
    fn prune_removes_only_old_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.commit_node(&node("a")).unwrap();
        let a = NodeId::new("a").unwrap();
        store
            .commit_batches(&[(a.clone(), batch(1, 10)), (a.clone(), batch(2, 20)), (a.clone(), batch(3, 30))])
            .unwrap();
        assert_eq!(store.prune_batches(25).unwrap(), 2);
        assert_eq!(store.batches(&a, 0, 10).unwrap().iter().map(|b| b.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree(keys::META).unwrap().insert(keys::SCHEMA_VERSION_KEY, &99u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(SledStore::open(dir.path()), Err(StoreError::SchemaTooNew { found: 99, .. })));
    }
}
