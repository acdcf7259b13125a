//! Identifier newtypes, validated once at the boundary.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest node id accepted: fits a DNS label, a file name and a table column.
pub const MAX_NODE_ID_LEN: usize = 63;

/// A node's identity: the name in its agent certificate.
///
/// Lowercase ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit,
/// at most 63 characters, so that it is safe as a file name, a store key and a label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// Why a string is not a valid node id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeIdError {
    #[error("node id is empty")]
    Empty,
    #[error("node id is {0} characters long; the limit is {MAX_NODE_ID_LEN}")]
    TooLong(usize),
    #[error(
        "node id {0:?} has a character other than a-z, 0-9, '-', '_', '.' or does not start with a letter or digit"
    )]
    BadCharacter(String),
}

impl NodeId {
    /// Validates and wraps `id`.
    pub fn new(id: impl Into<String>) -> Result<Self, NodeIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(NodeIdError::Empty);
        }
        if id.len() > MAX_NODE_ID_LEN {
            return Err(NodeIdError::TooLong(id.len()));
        }
        let first_ok = id.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok =
            id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.');
        if !first_ok || !rest_ok {
            return Err(NodeIdError::BadCharacter(id));
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeId {
    type Error = NodeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostname_like_ids() {
        for ok in ["gpu-01", "a", "node_7.rack2", "0abc"] {
            assert!(NodeId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_unsafe_ids() {
        assert_eq!(NodeId::new(""), Err(NodeIdError::Empty));
        assert!(matches!(NodeId::new("x".repeat(64)), Err(NodeIdError::TooLong(64))));
        for bad in ["-a", ".a", "A", "a/b", "a b", "../etc", "é"] {
            assert!(matches!(NodeId::new(bad), Err(NodeIdError::BadCharacter(_))), "{bad}");
        }
    }
}
