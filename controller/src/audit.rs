//! The append-only, hash-chained audit log: every command and every `Fleet`
//! mutation is recorded, with the certificate identity that caused it, before
//! it is sent or applied. Each record's hash covers the previous record's hash,
//! so altering, removing or reordering any record breaks the chain from there
//! on, and `flotctl audit verify` says where.

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// What is being recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_unix_ms: i64,
    /// The caller's certificate identity (e.g. "operator alice (admin)").
    pub actor: String,
    /// e.g. `command.issue`, `command.result`, `sim.inject`.
    pub action: String,
    /// The node (or object) acted on.
    pub target: String,
    /// Details as a JSON object.
    pub detail_json: String,
}

impl AuditEntry {
    /// An entry stamped now.
    pub fn now(actor: &str, action: &str, target: &str, detail: &serde_json::Value) -> Self {
        Self {
            at_unix_ms: flotilla_common::time::now_unix_ms(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail_json: detail.to_string(),
        }
    }
}

/// A stored record: the entry, its place in the chain and the chain hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub entry: AuditEntry,
    /// Hex SHA-256 of the previous record (64 zeros for the first).
    pub prev_hash: String,
    /// Hex SHA-256 over `prev_hash`, `seq` and the entry.
    pub hash: String,
}

/// The result of recomputing the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    Intact { records: u64 },
    Broken { records: u64, first_broken_seq: u64, reason: String },
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn digest(prev_hash: &str, seq: u64, entry: &AuditEntry) -> String {
    let mut h = sha2::Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(seq.to_be_bytes());
    // Length-prefixed fields: no two different entries hash the same bytes.
    for field in [&entry.actor, &entry.action, &entry.target, &entry.detail_json] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.update(entry.at_unix_ms.to_be_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl AuditRecord {
    /// The record that follows `last` (or starts the chain).
    pub fn chain(last: Option<&AuditRecord>, entry: AuditEntry) -> Self {
        let seq = last.map_or(1, |r| r.seq + 1);
        let prev_hash = last.map_or_else(|| GENESIS.to_owned(), |r| r.hash.clone());
        let hash = digest(&prev_hash, seq, &entry);
        Self { seq, entry, prev_hash, hash }
    }
}

/// Recomputes the chain over `records` (oldest first).
pub fn verify(records: &[AuditRecord]) -> ChainCheck {
    let mut prev = GENESIS.to_owned();
    for (expected_seq, r) in (1u64..).zip(records) {
        let broken =
            |reason: String| ChainCheck::Broken { records: records.len() as u64, first_broken_seq: r.seq, reason };
        if r.seq != expected_seq {
            return broken(format!("expected record {expected_seq}, found {} (a record is missing)", r.seq));
        }
        if r.prev_hash != prev {
            return broken("its link to the previous record does not match".to_owned());
        }
        if digest(&r.prev_hash, r.seq, &r.entry) != r.hash {
            return broken("its content does not match its hash (altered)".to_owned());
        }
        prev = r.hash.clone();
    }
    ChainCheck::Intact { records: records.len() as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: i64) -> AuditEntry {
        AuditEntry {
            at_unix_ms: i,
            actor: "operator a (admin)".into(),
            action: "command.issue".into(),
            target: "gpu-1".into(),
            detail_json: format!("{{\"n\":{i}}}"),
        }
    }

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let r = AuditRecord::chain(out.last(), entry(i));
            out.push(r);
        }
        out
    }

    #[test]
    fn an_untouched_chain_verifies() {
        assert_eq!(verify(&chain(5)), ChainCheck::Intact { records: 5 });
        assert_eq!(verify(&[]), ChainCheck::Intact { records: 0 });
    }

    #[test]
    fn alteration_removal_and_reordering_are_found() {
        let mut altered = chain(5);
        altered[2].entry.target = "gpu-2".into();
        assert!(matches!(verify(&altered), ChainCheck::Broken { first_broken_seq: 3, .. }));

        let mut removed = chain(5);
        removed.remove(1);
        assert!(matches!(verify(&removed), ChainCheck::Broken { first_broken_seq: 3, .. }));

        let mut rehashed = chain(5);
        rehashed[1].entry.actor = "mallory".into();
        rehashed[1].hash = digest(&rehashed[1].prev_hash, 2, &rehashed[1].entry);
        assert!(matches!(verify(&rehashed), ChainCheck::Broken { first_broken_seq: 3, .. }), "the next link breaks");
    }
}
