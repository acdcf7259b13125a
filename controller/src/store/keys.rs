//! Key encoding. Telemetry keys are `node_id 0x00 seq(u64 big-endian)`, so a
//! prefix scan yields one node's batches in seq order; node ids cannot contain
//! 0x00 (see `NodeId`), so prefixes never overlap. Rollup keys are
//! `node_id 0x00 series_id(u64 BE) minute(u64 BE)`, so one series' minutes are a
//! contiguous range in time order.

use flotilla_common::NodeId;

use crate::rollup::SeriesKey;

/// Tree names.
pub const META: &str = "meta";
pub const NODES: &str = "nodes";
pub const TELEMETRY: &str = "telemetry";
/// Rollup series of each node: `node_id 0x00 series_id` → [`SeriesKey`].
pub const ROLLUP_SERIES: &str = "rollup_series";
/// One-minute rollups: [`rollup_key`] → `Aggregate`.
pub const ROLLUPS: &str = "rollups";
/// Per node, the highest seq folded into rollups (u64 big-endian).
pub const ROLLUP_WATERMARKS: &str = "rollup_watermarks";
/// The hash-chained audit log: seq (u64 big-endian) → `AuditRecord`.
pub const AUDIT: &str = "audit";

/// Alert instances by id → `AlertRecord` (pending, firing, recently resolved).
pub const ALERTS: &str = "alerts";
/// Alert transitions: at_unix_ms (u64 BE) + sled id (u64 BE) → `AlertEvent`.
pub const ALERT_HISTORY: &str = "alert_history";
/// Silences by id → `Silence` (kept after they expire, for the record).
pub const SILENCES: &str = "silences";
/// Deployments by name → `rollout::Deployment` (revisions, replicas, the rollout running).
pub const DEPLOYMENTS: &str = "deployments";
/// Rollouts: deployment name, 0x00, rollout number (u64 BE) → `rollout::Rollout`.
pub const ROLLOUTS: &str = "rollouts";
/// Revoked nodes: node id → `registry::Revocation` (who, when, why, certificate serials).
pub const REVOKED_NODES: &str = "revoked_nodes";
/// Join tokens: SHA-256 of the secret (32 bytes) → `enroll::token::JoinTokenRecord`.
pub const JOIN_TOKENS: &str = "join_tokens";
/// The two-person rule's held actions: approval id → `approval::ApprovalRecord`.
pub const APPROVALS: &str = "approvals";

/// The key of rollout `number` of `deployment`; a prefix scan on `deployment 0x00` lists them in order.
pub fn rollout(deployment: &str, number: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(deployment.len() + 9);
    key.extend_from_slice(deployment.as_bytes());
    key.push(0);
    key.extend_from_slice(&number.to_be_bytes());
    key
}

/// Key in META holding when the alert engine last evaluated (i64 big-endian Unix ms).
pub const ALERTS_EVALUATED_KEY: &[u8] = b"alerts_evaluated";

/// Key in META holding the schema version (u32 big-endian).
pub const SCHEMA_VERSION_KEY: &[u8] = b"schema_version";

/// The prefix of every telemetry, rollup series or rollup key of `node`.
pub fn telemetry_prefix(node: &NodeId) -> Vec<u8> {
    let mut key = Vec::with_capacity(node.as_str().len() + 17);
    key.extend_from_slice(node.as_str().as_bytes());
    key.push(0);
    key
}

/// A stable 64-bit id of a series (FNV-1a). Stored keys depend on it: never
/// change it. Names and labels are UTF-8, which never contains the bytes 0xFE
/// and 0xFF, so the separators make the input unambiguous.
pub fn series_id(series: &SeriesKey) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    feed(series.name.as_bytes());
    for (k, v) in &series.labels {
        feed(&[0xFF]);
        feed(k.as_bytes());
        feed(&[0xFE]);
        feed(v.as_bytes());
    }
    hash
}

/// The key of a series of `node` in [`ROLLUP_SERIES`], and the prefix of its minutes in [`ROLLUPS`].
pub fn rollup_series_key(node: &NodeId, series_id: u64) -> Vec<u8> {
    let mut key = telemetry_prefix(node);
    key.extend_from_slice(&series_id.to_be_bytes());
    key
}

/// The key of one minute (its start, Unix ms) of a series in [`ROLLUPS`].
/// Minutes before the epoch sort first, as 0: batches are validated to be later.
pub fn rollup_key(node: &NodeId, series_id: u64, minute_unix_ms: i64) -> Vec<u8> {
    let mut key = rollup_series_key(node, series_id);
    key.extend_from_slice(&u64::try_from(minute_unix_ms).unwrap_or(0).to_be_bytes());
    key
}

/// The minute (Unix ms) a [`rollup_key`] names.
pub fn rollup_minute(key: &[u8]) -> Option<i64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    i64::try_from(u64::from_be_bytes(tail)).ok()
}

/// The key of one batch.
pub fn telemetry_key(node: &NodeId, seq: u64) -> Vec<u8> {
    let mut key = telemetry_prefix(node);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Printable form of a key for error messages.
pub fn display(key: &[u8]) -> String {
    String::from_utf8_lossy(key).replace('\0', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_seq_within_a_node() {
        let n = NodeId::new("a").unwrap();
        assert!(telemetry_key(&n, 9) < telemetry_key(&n, 10));
        assert!(telemetry_key(&n, 255) < telemetry_key(&n, 256));
        let ab = NodeId::new("ab").unwrap();
        assert!(!telemetry_key(&ab, 1).starts_with(&telemetry_prefix(&n)));
    }

    #[test]
    fn rollup_keys_sort_by_minute_within_a_series() {
        let n = NodeId::new("a").unwrap();
        let s = SeriesKey { name: "x".into(), labels: vec![("node".into(), "a".into())] };
        let id = series_id(&s);
        assert!(rollup_key(&n, id, 60_000) < rollup_key(&n, id, 120_000));
        assert!(rollup_key(&n, id, 60_000).starts_with(&rollup_series_key(&n, id)));
        assert_eq!(rollup_minute(&rollup_key(&n, id, 120_000)), Some(120_000));
    }

    #[test]
    fn series_ids_are_stable_and_separate_names_from_labels() {
        let a = SeriesKey { name: "ab".into(), labels: vec![] };
        let b = SeriesKey { name: "a".into(), labels: vec![("b".into(), String::new())] };
        assert_ne!(series_id(&a), series_id(&b));
        // Pinned: stored keys depend on this value.
        let x = SeriesKey { name: "x".into(), labels: vec![("node".into(), "a".into())] };
        assert_eq!(series_id(&x), 0x907d_6507_32a4_9e8d);
    }
}
