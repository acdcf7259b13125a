//! Key encoding. Telemetry keys are `node_id 0x00 seq(u64 big-endian)`, so a
//! prefix scan yields one node's batches in seq order; node ids cannot contain
//! 0x00 (see `NodeId`), so prefixes never overlap.

use flotilla_common::NodeId;

/// Tree names.
pub const META: &str = "meta";
pub const NODES: &str = "nodes";
pub const TELEMETRY: &str = "telemetry";

/// Key in META holding the schema version (u32 big-endian).
pub const SCHEMA_VERSION_KEY: &[u8] = b"schema_version";

/// The prefix of every telemetry key of `node`.
pub fn telemetry_prefix(node: &NodeId) -> Vec<u8> {
    let mut key = Vec::with_capacity(node.as_str().len() + 9);
    key.extend_from_slice(node.as_str().as_bytes());
    key.push(0);
    key
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
}
