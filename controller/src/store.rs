//! Durable fleet state behind the narrow [`Store`] trait. The embedded default is
//! sled ([`SledStore`]); a replicated backend can implement the same trait.
//!
//! Architecture Invariant: anything acknowledged to an agent or operator has been
//! flushed to disk by a `commit_*` method first.

pub mod backup;
pub(crate) mod codec;
mod healing;
mod keys;
mod sled_store;

use flotilla_common::NodeId;
use flotilla_common::model::{Inventory, TelemetryBatch};
use serde::{Deserialize, Serialize};

use crate::alert::state::{AlertEvent, AlertRecord, Silence};
use crate::rollup::{Aggregate, MinuteRollup, SeriesKey};

pub use healing::HealingStore;
pub use sled_store::{DEFAULT_CACHE_BYTES, SledStore, StoreOptions, created_compressed, sled_config};

/// The schema this build writes. Bump it with a migration in `sled_store`.
pub const SCHEMA_VERSION: u32 = 2;

/// What the controller keeps about a node across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub inventory: Inventory,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// Store failures; each names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("store: {op}: {source}")]
    Sled {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
    #[error(
        "store at {path} has schema version {found}; this controller understands up to {supported}: upgrade the controller"
    )]
    SchemaTooNew { path: String, found: u32, supported: u32 },
    #[error("store: cannot encode a value: {0}")]
    Encode(String),
    #[error("store: corrupt value under {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "store at {path}: no space left on its disk ({op}): writes are refused and nothing is acknowledged until space is freed"
    )]
    DiskFull { path: String, op: &'static str },
    #[error("store at {path} is closed after a failed write and not open again yet: {reason}")]
    Reopening { path: String, reason: String },
}

/// What [`Store::scan_trees`] calls per entry: tree name, key, value.
pub type EntryVisitor<'a> = dyn FnMut(&str, &[u8], &[u8]) -> Result<(), StoreError> + 'a;

/// The outcome of committing one telemetry batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Newly stored.
    New,
    /// Already stored before (a resend); nothing written.
    Duplicate,
}

/// The controller's durable state. Methods are synchronous: sled calls are short,
/// and the `commit_*` methods, which flush, run on the blocking pool.
pub trait Store: Send + Sync + 'static {
    /// Saves a node record and flushes it.
    fn commit_node(&self, node: &NodeRecord) -> Result<(), StoreError>;
    /// Sets a node's `last_seen_unix_ms` when its agent disconnects, without a
    /// flush of its own: nothing was acknowledged, a crash only loses a little
    /// freshness, and a thousand agents leaving at once must not mean a thousand
    /// flushes. sled flushes it within its flush interval (500 ms) or with the next commit.
    fn save_last_seen(&self, id: &NodeId, last_seen_unix_ms: i64) -> Result<(), StoreError>;
    /// One node's record.
    fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError>;
    /// Every node record, ordered by id.
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Stores the batches not already stored (by node and seq) and flushes once
    /// for all of them (group commit). The result is in input order.
    fn commit_batches(&self, batches: &[(NodeId, TelemetryBatch)]) -> Result<Vec<Committed>, StoreError>;
    /// The batch of `node` with the highest seq.
    fn latest_batch(&self, node: &NodeId) -> Result<Option<TelemetryBatch>, StoreError>;
    /// Batches of `node` with seq ≥ `from_seq`, in seq order, at most `limit`.
    fn batches(&self, node: &NodeId, from_seq: u64, limit: usize) -> Result<Vec<TelemetryBatch>, StoreError>;
    /// Batches of `node` made within `from_unix_ms..=to_unix_ms`, oldest first.
    /// Reads from the newest end, so recent ranges are cheap.
    fn batches_between(
        &self,
        node: &NodeId,
        from_unix_ms: i64,
        to_unix_ms: i64,
    ) -> Result<Vec<TelemetryBatch>, StoreError>;
    /// Bytes the store occupies on disk (0 if unknown).
    fn size_on_disk(&self) -> u64;
    /// Appends to the hash-chained audit log and flushes; returns the record.
    fn append_audit(&self, entry: crate::audit::AuditEntry) -> Result<crate::audit::AuditRecord, StoreError>;
    /// Every audit record, oldest first.
    fn audit_records(&self) -> Result<Vec<crate::audit::AuditRecord>, StoreError>;
    /// Deletes batches made before `cutoff_unix_ms` that are already rolled up
    /// (seq at or below the node's rollup watermark); returns how many.
    fn prune_batches(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError>;
    /// The highest seq of `node` already folded into rollups (0: none).
    fn rollup_watermark(&self, node: &NodeId) -> Result<u64, StoreError>;
    /// Merges `rollups` into the stored minutes of `node` and raises its watermark
    /// to `through_seq`, in one transaction, then flushes.
    fn commit_rollups(&self, node: &NodeId, through_seq: u64, rollups: &[MinuteRollup]) -> Result<(), StoreError>;
    /// Every series of `node` that has rollups.
    fn rollup_series(&self, node: &NodeId) -> Result<Vec<SeriesKey>, StoreError>;
    /// The minutes of one series starting within `from_unix_ms..to_unix_ms`, in
    /// time order, as (minute start, aggregate).
    fn rollups(
        &self,
        node: &NodeId,
        series: &SeriesKey,
        from_unix_ms: i64,
        to_unix_ms: i64,
    ) -> Result<Vec<(i64, Aggregate)>, StoreError>;
    /// Deletes rollup minutes that end before the minute of `cutoff_unix_ms`, and
    /// series left without any; returns how many minutes.
    fn prune_rollups(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError>;
    /// Writes alert changes in one transaction (records upserted and removed,
    /// history appended), then flushes.
    fn commit_alerts(&self, changes: &AlertChanges) -> Result<(), StoreError>;
    /// Every kept alert record.
    fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError>;
    /// The newest `limit` alert events, oldest first.
    fn alert_history(&self, limit: usize) -> Result<Vec<AlertEvent>, StoreError>;
    /// Deletes alert events older than `cutoff_unix_ms`; returns how many.
    fn prune_alert_history(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError>;
    /// Records when the alert engine last evaluated (not flushed: a lost minute
    /// only makes the next start think the outage was a little longer).
    fn set_alerts_evaluated(&self, unix_ms: i64) -> Result<(), StoreError>;
    /// When the alert engine last recorded an evaluation, if ever.
    fn alerts_evaluated(&self) -> Result<Option<i64>, StoreError>;
    /// Saves a silence and flushes.
    fn commit_silence(&self, silence: &Silence) -> Result<(), StoreError>;
    /// Every silence, expired ones included.
    fn silences(&self) -> Result<Vec<Silence>, StoreError>;
    /// Saves a deployment and (when given) one of its rollouts in one
    /// transaction, and flushes: a rollout step is durable before its commands go.
    fn commit_deployment(
        &self,
        deployment: &crate::rollout::Deployment,
        rollout: Option<&crate::rollout::Rollout>,
    ) -> Result<(), StoreError>;
    /// Every deployment, by name.
    fn deployments(&self) -> Result<Vec<crate::rollout::Deployment>, StoreError>;
    /// The rollouts of `deployment`, oldest first.
    fn rollouts(&self, deployment: &str) -> Result<Vec<crate::rollout::Rollout>, StoreError>;
    /// Saves a node's revocation and flushes.
    fn commit_revocation(&self, revocation: &crate::registry::Revocation) -> Result<(), StoreError>;
    /// Every revoked node, by id.
    fn revocations(&self) -> Result<Vec<crate::registry::Revocation>, StoreError>;
    /// Saves a join token and flushes.
    /// Calls `each(tree, key, value)` for every entry of `trees`, tree by tree
    /// in key order. With `consistent`, writes to the state trees wait until it
    /// returns, so what it sees is one moment (keep `each` quick then).
    fn scan_trees(&self, trees: &[&str], consistent: bool, each: &mut EntryVisitor<'_>) -> Result<(), StoreError>;
    /// Writes (flushed) a held action of the two-person rule.
    fn commit_approval(&self, approval: &crate::approval::ApprovalRecord) -> Result<(), StoreError>;
    /// Replaces `old` with `new` only if the stored record is still `old`
    /// (flushed); `false` when another decision came first.
    fn swap_approval(
        &self,
        old: &crate::approval::ApprovalRecord,
        new: &crate::approval::ApprovalRecord,
    ) -> Result<bool, StoreError>;
    fn approval(&self, id: &str) -> Result<Option<crate::approval::ApprovalRecord>, StoreError>;
    /// Every held action, in id order.
    fn approvals(&self) -> Result<Vec<crate::approval::ApprovalRecord>, StoreError>;
    /// Deletes (flushed) the join token whose id is `id`, returning it; `None`
    /// when no token has that id.
    fn remove_join_token(&self, id: &str) -> Result<Option<crate::enroll::token::JoinTokenRecord>, StoreError>;
    fn commit_join_token(&self, token: &crate::enroll::token::JoinTokenRecord) -> Result<(), StoreError>;
    /// Every join token, by hash.
    fn join_tokens(&self) -> Result<Vec<crate::enroll::token::JoinTokenRecord>, StoreError>;
    /// Spends one use of the token whose secret hashes to `hash`, for `node`,
    /// atomically (see [`crate::enroll::token::spend`]), and flushes; the inner
    /// error says why the token was refused.
    fn spend_join_token(
        &self,
        hash: &flotilla_common::enroll::TokenHash,
        node: &NodeId,
        now_unix_ms: i64,
    ) -> Result<Result<crate::enroll::token::JoinTokenRecord, crate::enroll::token::Refusal>, StoreError>;
}

/// One atomic change to the alert trees.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertChanges {
    pub upsert: Vec<AlertRecord>,
    pub remove: Vec<String>,
    pub events: Vec<AlertEvent>,
}

impl AlertChanges {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty() && self.events.is_empty()
    }
}
