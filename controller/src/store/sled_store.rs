//! The sled implementation of [`Store`].

use std::path::Path;

use flotilla_common::NodeId;
use flotilla_common::model::TelemetryBatch;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::{AlertChanges, Committed, EntryVisitor, NodeRecord, SCHEMA_VERSION, Store, StoreError, codec, keys};
use crate::alert::state::{AlertEvent, AlertRecord, Silence};
use crate::rollup::{Aggregate, MinuteRollup, SeriesKey, minute_of};

/// sled's own default page cache, 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1024 * 1024 * 1024;

/// The zstd level of a compressed store: the fastest. The committer pays for
/// every page it writes: at 5,000 agents it cost 70 % more controller CPU and
/// took the p99 ack from 26 to 139 ms, for a store a quarter the size
/// (BENCHMARKS.md), which is why it is off unless asked for.
const COMPRESSION_LEVEL: i32 = 1;

/// How a [`SledStore`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// sled's page cache in bytes.
    pub cache_bytes: u64,
    /// Whether a store created now compresses what it writes (zstd). sled fixes
    /// this when a store is created: an existing store keeps its own choice.
    pub compress_new: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { cache_bytes: DEFAULT_CACHE_BYTES, compress_new: false }
    }
}

/// Whether the sled database at `path` was created compressed: `None` when
/// there is none yet (or its `conf` file does not say, which sled itself refuses).
pub fn created_compressed(path: &Path) -> Option<bool> {
    // Text lines, then a 4-byte checksum (not text).
    let conf = std::fs::read(path.join("conf")).ok()?;
    String::from_utf8_lossy(&conf).lines().find_map(|line| match line.trim().strip_prefix("use_compression:")?.trim() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    })
}

/// sled's settings for the database at `path`: compressed as it was created,
/// or as `options` ask for a new one (sled refuses to open a database with the
/// other setting).
pub fn sled_config(path: &Path, options: StoreOptions) -> sled::Config {
    let compress = created_compressed(path).unwrap_or(options.compress_new);
    sled::Config::new()
        .path(path)
        .cache_capacity(options.cache_bytes)
        .use_compression(compress)
        .compression_factor(COMPRESSION_LEVEL)
}

/// The embedded default store: one sled database in the controller's data dir.
pub struct SledStore {
    db: sled::Db,
    nodes: sled::Tree,
    telemetry: sled::Tree,
    rollup_series: sled::Tree,
    rollups: sled::Tree,
    rollup_watermarks: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    alerts: sled::Tree,
    alert_history: sled::Tree,
    silences: sled::Tree,
    deployments: sled::Tree,
    rollouts: sled::Tree,
    revoked_nodes: sled::Tree,
    join_tokens: sled::Tree,
    approvals: sled::Tree,
    /// Writes to the state trees hold it shared; a backup holds it exclusively
    /// while it copies them, so the copy is one consistent moment.
    write_gate: std::sync::RwLock<()>,
    /// Serialises audit appends: each record chains to the one before it.
    audit_lock: std::sync::Mutex<()>,
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
    /// Schema 2 added `Inventory::gateway`: node records are rewritten with it
    /// empty (postcard reads fields by position, so an old record cannot be read
    /// as a new one). Every record is rewritten in one batch.
    fn migrate_1_to_2(&self) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut count = 0usize;
        for item in self.nodes.iter() {
            let (k, v) = item.map_err(sled_err("scan nodes for migration"))?;
            let old: migration::NodeRecordV1 = codec::decode(&k, &v)?;
            batch.insert(k, codec::encode(&NodeRecord::from(old))?);
            count += 1;
        }
        self.nodes.apply_batch(batch).map_err(sled_err("migrate nodes to schema 2"))?;
        self.db.flush().map_err(sled_err("flush the schema 2 migration"))?;
        tracing::info!(nodes = count, "store migrated from schema 1 to 2 (inventory gained the gateway role)");
        Ok(())
    }

    /// Shared hold on the state trees (see `write_gate`); a poisoned lock guards
    /// no data, so it is taken anyway.
    fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.write_gate.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tree_named(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(name).map_err(sled_err("open a tree to copy"))
    }

    /// Opens (or creates) the store at `path` with the default [`StoreOptions`],
    /// checking and migrating the schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// [`SledStore::open`] with `options` (sled's cache is most of a busy
    /// controller's memory).
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let db =
            sled_config(path, options).open().map_err(|source| StoreError::Open { path: shown.clone(), source })?;
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
            rollup_series: db.open_tree(keys::ROLLUP_SERIES).map_err(sled_err("open rollup series tree"))?,
            rollups: db.open_tree(keys::ROLLUPS).map_err(sled_err("open rollups tree"))?,
            rollup_watermarks: db
                .open_tree(keys::ROLLUP_WATERMARKS)
                .map_err(sled_err("open rollup watermarks tree"))?,
            audit: db.open_tree(keys::AUDIT).map_err(sled_err("open audit tree"))?,
            meta: meta.clone(),
            alerts: db.open_tree(keys::ALERTS).map_err(sled_err("open alerts tree"))?,
            alert_history: db.open_tree(keys::ALERT_HISTORY).map_err(sled_err("open alert history tree"))?,
            silences: db.open_tree(keys::SILENCES).map_err(sled_err("open silences tree"))?,
            deployments: db.open_tree(keys::DEPLOYMENTS).map_err(sled_err("open deployments tree"))?,
            rollouts: db.open_tree(keys::ROLLOUTS).map_err(sled_err("open rollouts tree"))?,
            revoked_nodes: db.open_tree(keys::REVOKED_NODES).map_err(sled_err("open revoked nodes tree"))?,
            join_tokens: db.open_tree(keys::JOIN_TOKENS).map_err(sled_err("open join tokens tree"))?,
            approvals: db.open_tree(keys::APPROVALS).map_err(sled_err("open approvals tree"))?,
            audit_lock: std::sync::Mutex::new(()),
            write_gate: std::sync::RwLock::new(()),
            db,
        };
        // Migrations run in order from the version found; version 0 is a new store.
        // The rollup and alert trees were added within schema 1 (they start empty,
        // and an older build ignores them); so were the deployment trees of schema 2
        // and the revoked nodes (an older build would not enforce them: do not downgrade)
        // and the join tokens and approvals.
        if found == 1 {
            store.migrate_1_to_2()?;
        }
        if found < SCHEMA_VERSION {
            meta.insert(keys::SCHEMA_VERSION_KEY, &SCHEMA_VERSION.to_be_bytes())
                .map_err(sled_err("write schema version"))?;
            store.db.flush().map_err(sled_err("flush schema version"))?;
        }
        Ok(store)
    }
}

impl Store for SledStore {
    fn commit_alerts(&self, changes: &AlertChanges) -> Result<(), StoreError> {
        let _gate = self.writing();
        if changes.is_empty() {
            return Ok(());
        }
        let mut events = Vec::with_capacity(changes.events.len());
        for e in &changes.events {
            let id = self.db.generate_id().map_err(sled_err("number an alert event"))?;
            let mut key = Vec::with_capacity(16);
            key.extend_from_slice(&u64::try_from(e.at_unix_ms).unwrap_or(0).to_be_bytes());
            key.extend_from_slice(&id.to_be_bytes());
            events.push((key, codec::encode(e)?));
        }
        let upserts = changes
            .upsert
            .iter()
            .map(|r| Ok((r.id.clone(), codec::encode(r)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let result = (&self.alerts, &self.alert_history).transaction(|(alerts, history)| {
            for (id, value) in &upserts {
                alerts.insert(id.as_bytes(), value.as_slice())?;
            }
            for id in &changes.remove {
                alerts.remove(id.as_bytes())?;
            }
            for (key, value) in &events {
                history.insert(key.as_slice(), value.as_slice())?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(error)) => return Err(error),
            Err(TransactionError::Storage(source)) => return Err(StoreError::Sled { op: "write alerts", source }),
        }
        self.db.flush().map_err(sled_err("flush alerts"))?;
        Ok(())
    }

    fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        self.alerts
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan alerts"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn alert_history(&self, limit: usize) -> Result<Vec<AlertEvent>, StoreError> {
        let mut out = self
            .alert_history
            .iter()
            .rev()
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan alert history"))?;
                codec::decode(&k, &v)
            })
            .collect::<Result<Vec<AlertEvent>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }

    fn prune_alert_history(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError> {
        let _gate = self.writing();
        let end = u64::try_from(cutoff_unix_ms).unwrap_or(0).to_be_bytes();
        let mut removed = 0;
        for item in self.alert_history.range(..end.as_slice()) {
            let (k, _) = item.map_err(sled_err("scan alert history for pruning"))?;
            self.alert_history.remove(k).map_err(sled_err("prune alert history"))?;
            removed += 1;
        }
        Ok(removed)
    }

    fn set_alerts_evaluated(&self, unix_ms: i64) -> Result<(), StoreError> {
        let _gate = self.writing();
        self.meta.insert(keys::ALERTS_EVALUATED_KEY, &unix_ms.to_be_bytes()).map_err(sled_err("write meta"))?;
        Ok(())
    }

    fn alerts_evaluated(&self) -> Result<Option<i64>, StoreError> {
        match self.meta.get(keys::ALERTS_EVALUATED_KEY).map_err(sled_err("read meta"))? {
            Some(bytes) => {
                let raw: [u8; 8] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: "meta/alerts_evaluated".into(),
                    reason: format!("{} bytes, expected 8", bytes.len()),
                })?;
                Ok(Some(i64::from_be_bytes(raw)))
            }
            None => Ok(None),
        }
    }

    fn commit_silence(&self, silence: &Silence) -> Result<(), StoreError> {
        let _gate = self.writing();
        self.silences.insert(silence.id.as_bytes(), codec::encode(silence)?).map_err(sled_err("write silence"))?;
        self.db.flush().map_err(sled_err("flush silence"))?;
        Ok(())
    }

    fn silences(&self) -> Result<Vec<Silence>, StoreError> {
        self.silences
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan silences"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn commit_deployment(
        &self,
        deployment: &crate::rollout::Deployment,
        rollout: Option<&crate::rollout::Rollout>,
    ) -> Result<(), StoreError> {
        let _gate = self.writing();
        let dep_value = codec::encode(deployment)?;
        let roll = rollout
            .map(|r| Ok::<_, StoreError>((keys::rollout(&r.deployment, r.number), codec::encode(r)?)))
            .transpose()?;
        let result = (&self.deployments, &self.rollouts).transaction(|(deployments, rollouts)| {
            deployments.insert(deployment.name.as_bytes(), dep_value.as_slice())?;
            if let Some((key, value)) = &roll {
                rollouts.insert(key.as_slice(), value.as_slice())?;
            }
            Ok::<(), ConflictableTransactionError<StoreError>>(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(error)) => return Err(error),
            Err(TransactionError::Storage(source)) => return Err(StoreError::Sled { op: "write deployment", source }),
        }
        self.db.flush().map_err(sled_err("flush deployment"))?;
        Ok(())
    }

    fn deployments(&self) -> Result<Vec<crate::rollout::Deployment>, StoreError> {
        self.deployments
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan deployments"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn rollouts(&self, deployment: &str) -> Result<Vec<crate::rollout::Rollout>, StoreError> {
        let mut prefix = deployment.as_bytes().to_vec();
        prefix.push(0);
        self.rollouts
            .scan_prefix(prefix)
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan rollouts"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn commit_revocation(&self, revocation: &crate::registry::Revocation) -> Result<(), StoreError> {
        let _gate = self.writing();
        let key = revocation.node.as_str().as_bytes();
        self.revoked_nodes.insert(key, codec::encode(revocation)?).map_err(sled_err("write revocation"))?;
        self.db.flush().map_err(sled_err("flush revocation"))?;
        Ok(())
    }

    fn revocations(&self) -> Result<Vec<crate::registry::Revocation>, StoreError> {
        self.revoked_nodes
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan revoked nodes"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn scan_trees(&self, trees: &[&str], consistent: bool, each: &mut EntryVisitor<'_>) -> Result<(), StoreError> {
        let _gate = consistent.then(|| self.write_gate.write().unwrap_or_else(std::sync::PoisonError::into_inner));
        for name in trees {
            for item in self.tree_named(name)?.iter() {
                let (k, v) = item.map_err(sled_err("copy a tree"))?;
                each(name, &k, &v)?;
            }
        }
        Ok(())
    }

    fn commit_approval(&self, approval: &crate::approval::ApprovalRecord) -> Result<(), StoreError> {
        let _gate = self.writing();
        self.approvals.insert(approval.id.as_bytes(), codec::encode(approval)?).map_err(sled_err("write approval"))?;
        self.db.flush().map_err(sled_err("flush approval"))?;
        Ok(())
    }

    fn swap_approval(
        &self,
        old: &crate::approval::ApprovalRecord,
        new: &crate::approval::ApprovalRecord,
    ) -> Result<bool, StoreError> {
        let _gate = self.writing();
        // postcard encodes a value one way, so comparing bytes compares records.
        let swapped = self
            .approvals
            .compare_and_swap(old.id.as_bytes(), Some(codec::encode(old)?), Some(codec::encode(new)?))
            .map_err(sled_err("decide approval"))?;
        if swapped.is_ok() {
            self.db.flush().map_err(sled_err("flush approval"))?;
        }
        Ok(swapped.is_ok())
    }

    fn approval(&self, id: &str) -> Result<Option<crate::approval::ApprovalRecord>, StoreError> {
        let key = id.as_bytes();
        self.approvals.get(key).map_err(sled_err("read approval"))?.map(|v| codec::decode(key, &v)).transpose()
    }

    fn approvals(&self) -> Result<Vec<crate::approval::ApprovalRecord>, StoreError> {
        self.approvals
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan approvals"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn commit_join_token(&self, token: &crate::enroll::token::JoinTokenRecord) -> Result<(), StoreError> {
        let _gate = self.writing();
        self.join_tokens.insert(token.hash, codec::encode(token)?).map_err(sled_err("write join token"))?;
        self.db.flush().map_err(sled_err("flush join token"))?;
        Ok(())
    }

    fn remove_join_token(&self, id: &str) -> Result<Option<crate::enroll::token::JoinTokenRecord>, StoreError> {
        let _gate = self.writing();
        let Some(record) = self.join_tokens()?.into_iter().find(|t| t.id() == id) else {
            return Ok(None);
        };
        self.join_tokens.remove(record.hash).map_err(sled_err("delete join token"))?;
        self.db.flush().map_err(sled_err("flush join token"))?;
        Ok(Some(record))
    }

    fn join_tokens(&self) -> Result<Vec<crate::enroll::token::JoinTokenRecord>, StoreError> {
        self.join_tokens
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan join tokens"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn spend_join_token(
        &self,
        hash: &flotilla_common::enroll::TokenHash,
        node: &NodeId,
        now_unix_ms: i64,
    ) -> Result<Result<crate::enroll::token::JoinTokenRecord, crate::enroll::token::Refusal>, StoreError> {
        let _gate = self.writing();
        // Compare-and-swap until no other spend came in between: two agents
        // racing for the last use cannot both get it.
        loop {
            let Some(old) = self.join_tokens.get(hash.0).map_err(sled_err("read join token"))? else {
                return Ok(Err(crate::enroll::token::Refusal::Unknown));
            };
            let record: crate::enroll::token::JoinTokenRecord = codec::decode(&hash.0, &old)?;
            let next = match crate::enroll::token::spend(&record, node, now_unix_ms) {
                Ok(next) => next,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let swapped = self
                .join_tokens
                .compare_and_swap(hash.0, Some(old), Some(codec::encode(&next)?))
                .map_err(sled_err("spend join token"))?;
            if swapped.is_ok() {
                self.db.flush().map_err(sled_err("flush join token"))?;
                return Ok(Ok(next));
            }
        }
    }

    fn commit_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        let _gate = self.writing();
        self.nodes.insert(node.id.as_str().as_bytes(), codec::encode(node)?).map_err(sled_err("write node"))?;
        self.db.flush().map_err(sled_err("flush node"))?;
        Ok(())
    }

    fn save_last_seen(&self, id: &NodeId, last_seen_unix_ms: i64) -> Result<(), StoreError> {
        let _gate = self.writing();
        let key = id.as_str().as_bytes();
        // Compare-and-swap, so that a record written meanwhile (the agent
        // reconnected) is never overwritten with this older copy.
        loop {
            let Some(old) = self.nodes.get(key).map_err(sled_err("read node"))? else { return Ok(()) };
            let mut record: NodeRecord = codec::decode(key, &old)?;
            if record.last_seen_unix_ms >= last_seen_unix_ms {
                return Ok(());
            }
            record.last_seen_unix_ms = last_seen_unix_ms;
            let new = codec::encode(&record)?;
            match self.nodes.compare_and_swap(key, Some(old), Some(new)).map_err(sled_err("write node"))? {
                Ok(()) => return Ok(()),
                Err(_) => continue,
            }
        }
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
                .compare_and_swap(key, None as Option<&[u8]>, Some(codec::encode(batch)?))
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

    fn append_audit(&self, entry: crate::audit::AuditEntry) -> Result<crate::audit::AuditRecord, StoreError> {
        let _gate = self.writing();
        let _guard = self.audit_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let last: Option<crate::audit::AuditRecord> = match self.audit.last().map_err(sled_err("read audit head"))? {
            Some((k, v)) => Some(codec::decode(&k, &v)?),
            None => None,
        };
        let record = crate::audit::AuditRecord::chain(last.as_ref(), entry);
        self.audit.insert(record.seq.to_be_bytes(), codec::encode(&record)?).map_err(sled_err("write audit record"))?;
        self.db.flush().map_err(sled_err("flush audit record"))?;
        Ok(record)
    }

    fn audit_records(&self) -> Result<Vec<crate::audit::AuditRecord>, StoreError> {
        self.audit
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan audit"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn batches_between(
        &self,
        node: &NodeId,
        from_unix_ms: i64,
        to_unix_ms: i64,
    ) -> Result<Vec<TelemetryBatch>, StoreError> {
        let mut out = Vec::new();
        // Seqs grow with time: walk back from the newest until the range is passed.
        for item in self.telemetry.scan_prefix(keys::telemetry_prefix(node)).rev() {
            let (k, v) = item.map_err(sled_err("scan telemetry by time"))?;
            let batch: TelemetryBatch = codec::decode(&k, &v)?;
            if batch.created_unix_ms < from_unix_ms {
                break;
            }
            if batch.created_unix_ms <= to_unix_ms {
                out.push(batch);
            }
        }
        out.reverse();
        Ok(out)
    }

    fn prune_batches(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for node in self.nodes()? {
            let rolled_up = self.rollup_watermark(&node.id)?;
            for item in self.telemetry.scan_prefix(keys::telemetry_prefix(&node.id)) {
                let (k, v) = item.map_err(sled_err("scan telemetry for pruning"))?;
                let batch: BatchHead = codec::decode(&k, &v)?;
                // Seqs grow with time, so the first batch young enough (or not yet
                // rolled up) ends the scan.
                if batch.created_unix_ms >= cutoff_unix_ms || batch.seq > rolled_up {
                    break;
                }
                self.telemetry.remove(k).map_err(sled_err("prune telemetry"))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn rollup_watermark(&self, node: &NodeId) -> Result<u64, StoreError> {
        let key = node.as_str().as_bytes();
        match self.rollup_watermarks.get(key).map_err(sled_err("read rollup watermark"))? {
            Some(bytes) => {
                let raw: [u8; 8] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: format!("rollup_watermarks/{node}"),
                    reason: format!("{} bytes, expected 8", bytes.len()),
                })?;
                Ok(u64::from_be_bytes(raw))
            }
            None => Ok(0),
        }
    }

    fn commit_rollups(&self, node: &NodeId, through_seq: u64, rollups: &[MinuteRollup]) -> Result<(), StoreError> {
        // Register the series first, outside the transaction: an entry whose
        // minutes never land is harmless (queries skip it, pruning removes it).
        let mut entries = Vec::with_capacity(rollups.len());
        let mut known: std::collections::HashMap<&SeriesKey, Option<u64>> = std::collections::HashMap::new();
        for r in rollups {
            let id = match known.get(&r.series) {
                Some(id) => *id,
                None => {
                    let id = self.register_series(node, &r.series)?;
                    known.insert(&r.series, id);
                    id
                }
            };
            if let Some(id) = id {
                entries.push((keys::rollup_key(node, id, r.minute_unix_ms), r.aggregate));
            }
        }
        let result = (&self.rollups, &self.rollup_watermarks).transaction(|(minutes, watermarks)| {
            for (key, aggregate) in &entries {
                let merged = match minutes.get(key)? {
                    Some(old) => codec::decode::<Aggregate>(key, &old)
                        .map_err(ConflictableTransactionError::Abort)?
                        .merge(*aggregate),
                    None => *aggregate,
                };
                minutes.insert(key.as_slice(), codec::encode(&merged).map_err(ConflictableTransactionError::Abort)?)?;
            }
            let wkey = node.as_str().as_bytes();
            let current =
                watermarks.get(wkey)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes);
            // The watermark only moves forward, so a stale pass cannot re-open rolled-up seqs.
            watermarks.insert(wkey, &through_seq.max(current.unwrap_or(0)).to_be_bytes())?;
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(error)) => return Err(error),
            Err(TransactionError::Storage(source)) => return Err(StoreError::Sled { op: "write rollups", source }),
        }
        self.db.flush().map_err(sled_err("flush rollups"))?;
        Ok(())
    }

    fn rollup_series(&self, node: &NodeId) -> Result<Vec<SeriesKey>, StoreError> {
        self.rollup_series
            .scan_prefix(keys::telemetry_prefix(node))
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan rollup series"))?;
                codec::decode(&k, &v)
            })
            .collect()
    }

    fn rollups(
        &self,
        node: &NodeId,
        series: &SeriesKey,
        from_unix_ms: i64,
        to_unix_ms: i64,
    ) -> Result<Vec<(i64, Aggregate)>, StoreError> {
        let id = keys::series_id(series);
        self.rollups
            .range(keys::rollup_key(node, id, from_unix_ms)..keys::rollup_key(node, id, to_unix_ms))
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scan rollups"))?;
                let minute = keys::rollup_minute(&k)
                    .ok_or_else(|| StoreError::Corrupt { key: keys::display(&k), reason: "short rollup key".into() })?;
                Ok((minute, codec::decode(&k, &v)?))
            })
            .collect()
    }

    fn prune_rollups(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&u64::try_from(minute_of(cutoff_unix_ms)).unwrap_or(0).to_be_bytes());
        for item in self.rollup_series.iter() {
            let (series_key, _) = item.map_err(sled_err("scan rollup series for pruning"))?;
            let mut end = series_key.to_vec();
            end.extend_from_slice(&tail);
            for old in self.rollups.range(series_key.to_vec()..end) {
                let (k, _) = old.map_err(sled_err("scan rollups for pruning"))?;
                self.rollups.remove(k).map_err(sled_err("prune rollups"))?;
                removed += 1;
            }
            // Rolling up and pruning run in the same task, so no minute can land
            // between this check and the removal.
            if self.rollups.scan_prefix(&series_key).next().is_none() {
                self.rollup_series.remove(&series_key).map_err(sled_err("prune rollup series"))?;
            }
        }
        Ok(removed)
    }
}

/// The leading fields of a stored [`TelemetryBatch`], read without decoding its
/// samples: pruning looks at every batch past retention and needs only these.
/// postcard writes fields in declaration order, and these are the first two.
#[derive(serde::Deserialize)]
struct BatchHead {
    seq: u64,
    created_unix_ms: i64,
}

impl SledStore {
    /// The id under which `series` of `node` is stored, registering it if new;
    /// `None` (logged) if another series already holds its hash.
    fn register_series(&self, node: &NodeId, series: &SeriesKey) -> Result<Option<u64>, StoreError> {
        let id = keys::series_id(series);
        let key = keys::rollup_series_key(node, id);
        let swapped = self
            .rollup_series
            .compare_and_swap(&key, None as Option<&[u8]>, Some(codec::encode(series)?))
            .map_err(sled_err("register rollup series"))?;
        let Err(existing) = swapped else { return Ok(Some(id)) };
        let Some(current) = existing.current else { return Ok(Some(id)) };
        let holder: SeriesKey = codec::decode(&key, &current)?;
        if &holder == series {
            return Ok(Some(id));
        }
        // Two series with one 64-bit hash: never mix their minutes.
        tracing::warn!(node_id = %node, series = %series.name, holder = %holder.name, "rollup series id collision; series not rolled up");
        Ok(None)
    }
}

/// The stored forms of earlier schemas, kept only to migrate from.
mod migration {
    use std::collections::BTreeMap;

    use flotilla_common::NodeId;
    use flotilla_common::model::{GpuInfo, GpuSourceKind, Inventory};
    use serde::{Deserialize, Serialize};

    use crate::store::NodeRecord;

    /// `Inventory` up to schema 1 (before `gateway`).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct InventoryV1 {
        pub hostname: String,
        pub os: String,
        pub kernel: String,
        pub cpu_model: String,
        pub cpu_cores: u32,
        pub memory_total_bytes: u64,
        pub gpus: Vec<GpuInfo>,
        pub gpu_source: GpuSourceKind,
        pub gpu_source_note: String,
        pub driver_version: String,
        pub cuda_version: String,
        pub labels: BTreeMap<String, String>,
        pub agent_version: String,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct NodeRecordV1 {
        pub id: NodeId,
        pub inventory: InventoryV1,
        pub first_seen_unix_ms: i64,
        pub last_seen_unix_ms: i64,
    }

    impl From<NodeRecordV1> for NodeRecord {
        fn from(old: NodeRecordV1) -> Self {
            let i = old.inventory;
            Self {
                id: old.id,
                inventory: Inventory {
                    hostname: i.hostname,
                    os: i.os,
                    kernel: i.kernel,
                    cpu_model: i.cpu_model,
                    cpu_cores: i.cpu_cores,
                    memory_total_bytes: i.memory_total_bytes,
                    gpus: i.gpus,
                    gpu_source: i.gpu_source,
                    gpu_source_note: i.gpu_source_note,
                    driver_version: i.driver_version,
                    cuda_version: i.cuda_version,
                    labels: i.labels,
                    agent_version: i.agent_version,
                    gateway: None,
                },
                first_seen_unix_ms: old.first_seen_unix_ms,
                last_seen_unix_ms: old.last_seen_unix_ms,
            }
        }
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
    fn last_seen_only_moves_forward_and_never_creates_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeId::new("a").unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.save_last_seen(&a, 50).unwrap();
            assert_eq!(store.node(&a).unwrap(), None, "an unknown node stays unknown");
            store.commit_node(&node("a")).unwrap();
            store.save_last_seen(&a, 50).unwrap();
            store.save_last_seen(&a, 40).unwrap();
            assert_eq!(store.node(&a).unwrap().unwrap().last_seen_unix_ms, 50, "an older time never wins");
        }
        // Dropping the store flushes it.
        let store = SledStore::open(dir.path()).unwrap();
        let record = store.node(&a).unwrap().unwrap();
        assert_eq!((record.first_seen_unix_ms, record.last_seen_unix_ms), (1, 50));
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
    fn a_store_keeps_the_compression_it_was_created_with() {
        let a = NodeId::new("a").unwrap();
        let on = StoreOptions { compress_new: true, ..StoreOptions::default() };
        let plain = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(plain.path()).unwrap();
            store.commit_batches(&[(a.clone(), batch(1, 10))]).unwrap();
        }
        assert_eq!(created_compressed(plain.path()), Some(false), "new stores are plain by default");
        // Opened again asking for compression: sled would refuse the other setting.
        let store = SledStore::open_with(plain.path(), on).unwrap();
        assert_eq!(store.batches(&a, 1, 10).unwrap().len(), 1);
        drop(store);
        assert_eq!(created_compressed(plain.path()), Some(false));

        let packed = tempfile::tempdir().unwrap();
        assert_eq!(created_compressed(packed.path()), None);
        {
            let store = SledStore::open_with(packed.path(), on).unwrap();
            store.commit_batches(&[(a.clone(), batch(1, 10))]).unwrap();
        }
        assert_eq!(created_compressed(packed.path()), Some(true));
        let store = SledStore::open(packed.path()).unwrap();
        assert_eq!(store.latest_batch(&a).unwrap().unwrap().seq, 1);
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
    fn a_batch_head_reads_the_first_fields_of_a_stored_batch() {
        let mut b = batch(7, 1_700_000_000_123);
        b.gpus.push(flotilla_common::model::GpuSample { uuid: "GPU-0".into(), ..Default::default() });
        let bytes = codec::encode(&b).unwrap();
        let head: BatchHead = codec::decode(b"k", &bytes).unwrap();
        assert_eq!((head.seq, head.created_unix_ms), (7, 1_700_000_000_123));
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
        assert_eq!(store.prune_batches(25).unwrap(), 0, "nothing is pruned before it is rolled up");
        store.commit_rollups(&a, 1, &[]).unwrap();
        assert_eq!(store.prune_batches(25).unwrap(), 1, "only what is rolled up is pruned");
        crate::rollup::roll_up(&store, &Default::default()).unwrap();
        assert_eq!(store.prune_batches(25).unwrap(), 1);
        assert_eq!(store.batches(&a, 0, 10).unwrap().iter().map(|b| b.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn batches_between_selects_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = NodeId::new("a").unwrap();
        store.commit_batches(&(1..=5).map(|s| (a.clone(), batch(s, s as i64 * 10))).collect::<Vec<_>>()).unwrap();
        let seqs = |v: Vec<TelemetryBatch>| v.iter().map(|b| b.seq).collect::<Vec<_>>();
        assert_eq!(seqs(store.batches_between(&a, 20, 40).unwrap()), [2, 3, 4]);
        assert_eq!(seqs(store.batches_between(&a, 41, 45).unwrap()), Vec::<u64>::new());
    }

    #[test]
    fn rollup_retention_removes_old_minutes_and_empty_series() {
        use crate::rollup::{Aggregate, MinuteRollup, SeriesKey};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = NodeId::new("a").unwrap();
        let key = |name: &str| SeriesKey { name: name.into(), labels: vec![("node".into(), "a".into())] };
        let minute = |series: &SeriesKey, m: i64| MinuteRollup {
            series: series.clone(),
            minute_unix_ms: m * 60_000,
            aggregate: Aggregate::Gauge { min: 1.0, max: 1.0, sum: 1.0, count: 1 },
        };
        let (old, live) = (key("old"), key("live"));
        store.commit_rollups(&a, 1, &[minute(&old, 1), minute(&live, 1), minute(&live, 3)]).unwrap();
        assert_eq!(store.prune_rollups(2 * 60_000 + 5).unwrap(), 2);
        assert_eq!(
            store.rollup_series(&a).unwrap(),
            std::slice::from_ref(&live),
            "a series with no minute left is forgotten"
        );
        assert_eq!(store.rollups(&a, &live, 0, i64::MAX).unwrap().len(), 1);
    }

    #[test]
    fn a_schema_1_store_is_migrated_and_its_nodes_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let old = migration::NodeRecordV1 {
            id: NodeId::new("gpu-1").unwrap(),
            inventory: migration::InventoryV1 {
                hostname: "h".into(),
                os: "linux".into(),
                kernel: "6".into(),
                cpu_model: "c".into(),
                cpu_cores: 8,
                memory_total_bytes: 1 << 30,
                gpus: vec![flotilla_common::model::GpuInfo {
                    index: 0,
                    uuid: "GPU-0".into(),
                    model: "H200".into(),
                    memory_total_bytes: 1 << 37,
                }],
                gpu_source: flotilla_common::model::GpuSourceKind::default(),
                gpu_source_note: String::new(),
                driver_version: "560".into(),
                cuda_version: "12.6".into(),
                labels: [("rack".to_owned(), "r1".to_owned())].into(),
                agent_version: "0.1.0".into(),
            },
            first_seen_unix_ms: 1,
            last_seen_unix_ms: 2,
        };
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree(keys::META).unwrap().insert(keys::SCHEMA_VERSION_KEY, &1u32.to_be_bytes()).unwrap();
            db.open_tree(keys::NODES).unwrap().insert(b"gpu-1", codec::encode(&old).unwrap()).unwrap();
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let nodes = store.nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].inventory.labels["rack"], "r1");
        assert_eq!(nodes[0].inventory.gpus[0].model, "H200");
        assert_eq!(nodes[0].inventory.gateway, None);
        drop(store);
        let again = SledStore::open(dir.path()).unwrap();
        assert_eq!(again.nodes().unwrap().len(), 1, "opening a migrated store again changes nothing");
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

    #[test]
    fn revocations_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let revoked = crate::registry::Revocation {
            node: NodeId::new("a").unwrap(),
            at_unix_ms: 5,
            by: "operator root (admin)".into(),
            reason: String::new(),
            serials: vec![],
        };
        SledStore::open(dir.path()).unwrap().commit_revocation(&revoked).unwrap();
        assert_eq!(SledStore::open(dir.path()).unwrap().revocations().unwrap(), vec![revoked]);
    }

    #[test]
    fn join_tokens_are_spent_atomically_and_survive_reopen() {
        use crate::enroll::token::{Refusal, TokenRequest, create};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (secret, record) = create(&TokenRequest { uses: 3, ..Default::default() }, "admin", 0).unwrap();
        store.commit_join_token(&record).unwrap();
        let hash = secret.hash();
        // Eight threads race for three uses: exactly three win.
        let store = std::sync::Arc::new(store);
        let wins: usize = std::thread::scope(|scope| {
            (0..8)
                .map(|i| {
                    let store = store.clone();
                    scope.spawn(move || {
                        let node = NodeId::new(format!("n{i}")).unwrap();
                        store.spend_join_token(&hash, &node, 1).unwrap().is_ok()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(wins, 3);
        let unknown = flotilla_common::enroll::JoinSecret::generate().hash();
        let n = NodeId::new("x").unwrap();
        assert_eq!(store.spend_join_token(&unknown, &n, 1).unwrap(), Err(Refusal::Unknown));
        drop(store);
        let reopened = SledStore::open(dir.path()).unwrap();
        let tokens = reopened.join_tokens().unwrap();
        assert_eq!(tokens.len(), 1);
        assert_eq!((tokens[0].uses_left, tokens[0].enrolled.len()), (0, 3));
        assert!(matches!(reopened.spend_join_token(&hash, &n, 2).unwrap(), Err(Refusal::Spent { .. })));
    }
}
