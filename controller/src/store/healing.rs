//! Keeps the store writable after a failed write. sled turns the first I/O
//! error of a write (a full disk, most often) into an error that every later
//! write returns, until the database is opened again: without help a controller
//! whose disk filled up once would refuse telemetry until restarted, however
//! much space came back. [`HealingStore`] wraps [`SledStore`]: it names a full
//! disk plainly, and once a probe write succeeds again (tried before a write,
//! at most once a second) it reopens the database, so writes resume without
//! a restart. Reopening loses nothing that was acknowledged: every
//! acknowledgement waited for a flush that succeeded, and what failed was
//! never acknowledged (agents resend it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use flotilla_common::NodeId;
use flotilla_common::model::TelemetryBatch;

use super::{AlertChanges, Committed, EntryVisitor, NodeRecord, SledStore, Store, StoreError, StoreOptions};
use crate::alert::state::{AlertEvent, AlertRecord, Silence};
use crate::rollup::{Aggregate, MinuteRollup, SeriesKey};

/// How often a broken store tries the disk (a probe write) and reopens.
const RETRY: Duration = Duration::from_secs(1);
/// Bytes the probe writes: more than sled's segment (512 KiB) and a flush need.
const PROBE_BYTES: usize = 2 * 1024 * 1024;
/// How soon a reopen is tried again when calls were still running on the old database.
const BUSY_RETRY: Duration = Duration::from_millis(50);

/// A [`SledStore`] that is reopened after a write failed, once the disk takes writes again.
pub struct HealingStore {
    path: PathBuf,
    options: StoreOptions,
    /// `None` only between closing the broken database and a reopen that failed.
    current: RwLock<Option<Arc<SledStore>>>,
    /// While broken: when the disk was last tried. Locked only with `try_lock`
    /// by callers, so one caller heals while the others go on.
    broken: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for HealingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealingStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl HealingStore {
    /// Opens the store at `path` (see [`SledStore::open_with`]).
    pub fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let store = SledStore::open_with(path, options)?;
        Ok(Self {
            path: path.to_owned(),
            options,
            current: RwLock::new(Some(Arc::new(store))),
            broken: Mutex::new(None),
        })
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// A write: heals first when due. Writes run on the blocking pool (they
    /// flush), so the probe write and the reopen may happen here.
    fn write<T>(&self, f: impl FnOnce(&SledStore) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.heal_if_due();
        self.with(f)
    }

    /// Runs `f` on the open database; an I/O error marks the store broken.
    fn with<T>(&self, f: impl FnOnce(&SledStore) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let store = self.current.read().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(store) = store else {
            return Err(StoreError::Reopening { path: self.shown(), reason: "the last reopen failed".into() });
        };
        let result = f(&store);
        drop(store);
        result.map_err(|error| self.on_error(error))
    }

    /// Notes an I/O failure (logged once per breakage) and says plainly when the disk is full.
    fn on_error(&self, error: StoreError) -> StoreError {
        let StoreError::Sled { source: sled::Error::Io(io), .. } = &error else { return error };
        let full = is_disk_full(io);
        let mut broken = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
        if broken.is_none() {
            *broken = Some(Instant::now());
            if full {
                tracing::error!(path = %self.shown(), %error, "the store's disk is full: writes are refused and nothing is acknowledged until space is freed; the store reopens itself then");
            } else {
                tracing::error!(path = %self.shown(), %error, "a store write failed; sled refuses further writes until the store is reopened, which is tried every second");
            }
        }
        if full { StoreError::DiskFull { path: self.shown(), op: op_of(&error) } } else { error }
    }

    /// While broken, at most every [`RETRY`]: if the disk takes a probe write, reopen.
    fn heal_if_due(&self) {
        let Ok(mut broken) = self.broken.try_lock() else { return };
        let Some(tried) = *broken else { return };
        if tried.elapsed() < RETRY {
            return;
        }
        *broken = Some(Instant::now());
        if let Err(error) = probe(&self.path) {
            tracing::debug!(%error, "the store's disk still refuses writes");
            return;
        }
        match self.reopen() {
            Reopen::Done => *broken = None,
            // Nothing waits here (callers may be on async workers): a later call tries again soon.
            Reopen::Busy => *broken = Some(Instant::now().checked_sub(RETRY - BUSY_RETRY).unwrap_or_else(Instant::now)),
            Reopen::Failed => {}
        }
    }

    /// Closes the database, unless calls still use it, and opens it again.
    fn reopen(&self) -> Reopen {
        let mut slot = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = slot.take() {
            if Arc::strong_count(&old) > 1 {
                *slot = Some(old);
                return Reopen::Busy;
            }
            // sled's lock on its files goes with the last handle.
            drop(old);
        }
        match SledStore::open_with(&self.path, self.options) {
            Ok(store) => {
                *slot = Some(Arc::new(store));
                tracing::info!(path = %self.shown(), "store reopened after a failed write; writes resume");
                Reopen::Done
            }
            Err(error) => {
                tracing::error!(path = %self.shown(), %error, "cannot reopen the store; trying again in a second");
                Reopen::Failed
            }
        }
    }

    /// Marks the store broken as a failed write would (tests of the reopen path).
    #[cfg(test)]
    fn break_for_test(&self) {
        *self.broken.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now().checked_sub(RETRY);
    }
}

/// How a reopen went.
enum Reopen {
    Done,
    /// Calls were still running on the old database; it stays.
    Busy,
    /// The old database is closed, the new one did not open.
    Failed,
}

/// Whether an I/O error means the disk (or the quota) is full.
fn is_disk_full(io: &std::io::Error) -> bool {
    matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

fn op_of(error: &StoreError) -> &'static str {
    match error {
        StoreError::Sled { op, .. } => op,
        _ => "write",
    }
}

/// Writes, syncs and removes a file beside the store: whether its disk takes writes again.
fn probe(store: &Path) -> std::io::Result<()> {
    let path = store.with_extension("space-probe");
    let result = (|| {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&vec![0u8; PROBE_BYTES])?;
        file.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result
}

impl Store for HealingStore {
    fn commit_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.write(|s| s.commit_node(node))
    }
    fn save_last_seen(&self, id: &NodeId, last_seen_unix_ms: i64) -> Result<(), StoreError> {
        self.write(|s| s.save_last_seen(id, last_seen_unix_ms))
    }
    fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        self.with(|s| s.node(id))
    }
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.with(|s| s.nodes())
    }
    fn commit_batches(&self, batches: &[(NodeId, TelemetryBatch)]) -> Result<Vec<Committed>, StoreError> {
        self.write(|s| s.commit_batches(batches))
    }
    fn latest_batch(&self, node: &NodeId) -> Result<Option<TelemetryBatch>, StoreError> {
        self.with(|s| s.latest_batch(node))
    }
    fn batches(&self, node: &NodeId, from_seq: u64, limit: usize) -> Result<Vec<TelemetryBatch>, StoreError> {
        self.with(|s| s.batches(node, from_seq, limit))
    }
    fn batches_between(&self, node: &NodeId, from: i64, to: i64) -> Result<Vec<TelemetryBatch>, StoreError> {
        self.with(|s| s.batches_between(node, from, to))
    }
    fn size_on_disk(&self) -> u64 {
        self.with(|s| Ok(s.size_on_disk())).unwrap_or(0)
    }
    fn append_audit(&self, entry: crate::audit::AuditEntry) -> Result<crate::audit::AuditRecord, StoreError> {
        self.write(|s| s.append_audit(entry))
    }
    fn audit_records(&self) -> Result<Vec<crate::audit::AuditRecord>, StoreError> {
        self.with(|s| s.audit_records())
    }
    fn prune_batches(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError> {
        self.write(|s| s.prune_batches(cutoff_unix_ms))
    }
    fn rollup_watermark(&self, node: &NodeId) -> Result<u64, StoreError> {
        self.with(|s| s.rollup_watermark(node))
    }
    fn commit_rollups(&self, node: &NodeId, through_seq: u64, rollups: &[MinuteRollup]) -> Result<(), StoreError> {
        self.write(|s| s.commit_rollups(node, through_seq, rollups))
    }
    fn rollup_series(&self, node: &NodeId) -> Result<Vec<SeriesKey>, StoreError> {
        self.with(|s| s.rollup_series(node))
    }
    fn rollups(
        &self,
        node: &NodeId,
        series: &SeriesKey,
        from_unix_ms: i64,
        to_unix_ms: i64,
    ) -> Result<Vec<(i64, Aggregate)>, StoreError> {
        self.with(|s| s.rollups(node, series, from_unix_ms, to_unix_ms))
    }
    fn prune_rollups(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError> {
        self.write(|s| s.prune_rollups(cutoff_unix_ms))
    }
    fn commit_alerts(&self, changes: &AlertChanges) -> Result<(), StoreError> {
        self.write(|s| s.commit_alerts(changes))
    }
    fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        self.with(|s| s.alerts())
    }
    fn alert_history(&self, limit: usize) -> Result<Vec<AlertEvent>, StoreError> {
        self.with(|s| s.alert_history(limit))
    }
    fn prune_alert_history(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError> {
        self.write(|s| s.prune_alert_history(cutoff_unix_ms))
    }
    fn set_alerts_evaluated(&self, unix_ms: i64) -> Result<(), StoreError> {
        self.write(|s| s.set_alerts_evaluated(unix_ms))
    }
    fn alerts_evaluated(&self) -> Result<Option<i64>, StoreError> {
        self.with(|s| s.alerts_evaluated())
    }
    fn commit_silence(&self, silence: &Silence) -> Result<(), StoreError> {
        self.write(|s| s.commit_silence(silence))
    }
    fn silences(&self) -> Result<Vec<Silence>, StoreError> {
        self.with(|s| s.silences())
    }
    fn commit_deployment(
        &self,
        deployment: &crate::rollout::Deployment,
        rollout: Option<&crate::rollout::Rollout>,
    ) -> Result<(), StoreError> {
        self.write(|s| s.commit_deployment(deployment, rollout))
    }
    fn deployments(&self) -> Result<Vec<crate::rollout::Deployment>, StoreError> {
        self.with(|s| s.deployments())
    }
    fn rollouts(&self, deployment: &str) -> Result<Vec<crate::rollout::Rollout>, StoreError> {
        self.with(|s| s.rollouts(deployment))
    }
    fn commit_revocation(&self, revocation: &crate::registry::Revocation) -> Result<(), StoreError> {
        self.write(|s| s.commit_revocation(revocation))
    }
    fn revocations(&self) -> Result<Vec<crate::registry::Revocation>, StoreError> {
        self.with(|s| s.revocations())
    }
    fn scan_trees(&self, trees: &[&str], consistent: bool, each: &mut EntryVisitor<'_>) -> Result<(), StoreError> {
        self.with(|s| s.scan_trees(trees, consistent, each))
    }
    fn commit_approval(&self, approval: &crate::approval::ApprovalRecord) -> Result<(), StoreError> {
        self.write(|s| s.commit_approval(approval))
    }
    fn swap_approval(
        &self,
        old: &crate::approval::ApprovalRecord,
        new: &crate::approval::ApprovalRecord,
    ) -> Result<bool, StoreError> {
        self.write(|s| s.swap_approval(old, new))
    }
    fn approval(&self, id: &str) -> Result<Option<crate::approval::ApprovalRecord>, StoreError> {
        self.with(|s| s.approval(id))
    }
    fn approvals(&self) -> Result<Vec<crate::approval::ApprovalRecord>, StoreError> {
        self.with(|s| s.approvals())
    }
    fn remove_join_token(&self, id: &str) -> Result<Option<crate::enroll::token::JoinTokenRecord>, StoreError> {
        self.write(|s| s.remove_join_token(id))
    }
    fn commit_join_token(&self, token: &crate::enroll::token::JoinTokenRecord) -> Result<(), StoreError> {
        self.write(|s| s.commit_join_token(token))
    }
    fn join_tokens(&self) -> Result<Vec<crate::enroll::token::JoinTokenRecord>, StoreError> {
        self.with(|s| s.join_tokens())
    }
    fn spend_join_token(
        &self,
        hash: &flotilla_common::enroll::TokenHash,
        node: &NodeId,
        now_unix_ms: i64,
    ) -> Result<Result<crate::enroll::token::JoinTokenRecord, crate::enroll::token::Refusal>, StoreError> {
        self.write(|s| s.spend_join_token(hash, node, now_unix_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64) -> (NodeId, TelemetryBatch) {
        (NodeId::new("gpu-1").unwrap(), TelemetryBatch { seq, created_unix_ms: 1, ..Default::default() })
    }

    #[test]
    fn a_full_disk_is_named_plainly() {
        let io = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert!(is_disk_full(&io));
        assert!(!is_disk_full(&std::io::Error::from(std::io::ErrorKind::PermissionDenied)));
        let dir = tempfile::tempdir().unwrap();
        let store = HealingStore::open(
            &dir.path().join("store"),
            StoreOptions { cache_bytes: 16 * 1024 * 1024, compress_new: true },
        )
        .unwrap();
        let error = StoreError::Sled { op: "flush telemetry", source: sled::Error::Io(io) };
        let shown = store.on_error(error).to_string();
        assert!(shown.contains("no space left") && shown.contains("flush telemetry"), "{shown}");
        assert!(store.broken.lock().unwrap().is_some(), "the store is marked broken");
        let other = StoreError::Encode("x".into());
        assert_eq!(store.on_error(other).to_string(), "store: cannot encode a value: x", "other errors pass through");
    }

    #[test]
    fn a_broken_store_is_reopened_with_what_was_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let store = HealingStore::open(
            &dir.path().join("store"),
            StoreOptions { cache_bytes: 16 * 1024 * 1024, compress_new: true },
        )
        .unwrap();
        store.commit_batches(&[batch(1), batch(2)]).unwrap();
        let node = NodeId::new("gpu-1").unwrap();
        // A call still running on the old database (`held`): the reopen waits for a later write.
        let held = store.current.read().unwrap().clone().unwrap();
        store.break_for_test();
        assert_eq!(store.commit_batches(&[batch(2)]).unwrap(), [Committed::Duplicate], "the old database");
        assert!(store.broken.lock().unwrap().is_some(), "not reopened under a running call");
        assert!(Arc::ptr_eq(&held, store.current.read().unwrap().as_ref().unwrap()));
        drop(held);
        // Reads never heal (they may run on async workers); the next write does.
        store.break_for_test();
        assert_eq!(store.latest_batch(&node).unwrap().map(|b| b.seq), Some(2));
        assert!(store.broken.lock().unwrap().is_some());
        assert_eq!(store.commit_batches(&[batch(1)]).unwrap(), [Committed::Duplicate], "the reopened database");
        assert!(store.broken.lock().unwrap().is_none(), "healed");
        assert!(!dir.path().join("store.space-probe").exists(), "the probe file is removed");
        assert_eq!(store.commit_batches(&[batch(2), batch(3)]).unwrap(), [Committed::Duplicate, Committed::New]);
    }
}
