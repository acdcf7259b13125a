//! Join tokens as the controller keeps them: the hash of the secret, the expiry,
//! the uses left, the labels and who made it. Creating and spending are pure
//! functions of the record and the clock; the store applies a spend atomically.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::enroll::{JoinSecret, TokenHash};
use serde::{Deserialize, Serialize};

/// The lifetime of a token when none is asked for: short, like Nomad's
/// introduction tokens, because a token is only needed while a node is set up.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
/// The longest lifetime a token may have.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The most agents one token may enroll.
pub const MAX_USES: u32 = 1000;
/// The most labels one token may carry, and their sizes.
const MAX_LABELS: usize = 32;
const MAX_LABEL_VALUE: usize = 256;

/// A stored join token. Stored as postcard (fields by position): every field is
/// always written, none is ever skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// SHA-256 of the secret: the store key. The secret itself is never kept.
    pub hash: [u8; 32],
    /// The admin who made it, as the audit log names them.
    pub created_by: String,
    pub created_unix_ms: i64,
    pub expires_unix_ms: i64,
    /// Uses it was made with.
    pub uses: u32,
    pub uses_left: u32,
    /// Labels the enrolled nodes report.
    pub labels: BTreeMap<String, String>,
    /// The nodes enrolled with it, in order.
    pub enrolled: Vec<NodeId>,
}

/// What a token can still do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Active,
    Expired,
    Spent,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::Expired => "expired",
            TokenState::Spent => "spent",
        }
    }
}

/// Why a token was not accepted; the text goes back to the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown join token (mistyped, or never made by this controller): `flotctl token create` makes one")]
    Unknown,
    #[error("join token {id} expired {ago}s ago: make a new one with `flotctl token create`")]
    Expired { id: String, ago: i64 },
    #[error("join token {id} is spent (all {uses} of its uses are taken): make a new one with `flotctl token create`")]
    Spent { id: String, uses: u32 },
}

/// What an admin asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRequest {
    /// Zero: [`DEFAULT_TTL`].
    pub ttl: Duration,
    /// Zero: one.
    pub uses: u32,
    pub labels: BTreeMap<String, String>,
}

impl JoinTokenRecord {
    /// The token's public name (see [`TokenHash::id`]).
    pub fn id(&self) -> String {
        TokenHash(self.hash).id()
    }

    /// Its state at `now_unix_ms`.
    pub fn state(&self, now_unix_ms: i64) -> TokenState {
        if self.uses_left == 0 {
            TokenState::Spent
        } else if now_unix_ms >= self.expires_unix_ms {
            TokenState::Expired
        } else {
            TokenState::Active
        }
    }
}

/// Makes a token from `request`: the secret (returned once, never stored) and
/// the record to store. Refuses what is out of bounds, saying why.
pub fn create(
    request: &TokenRequest,
    created_by: &str,
    now_unix_ms: i64,
) -> Result<(JoinSecret, JoinTokenRecord), String> {
    let ttl = if request.ttl.is_zero() { DEFAULT_TTL } else { request.ttl };
    if ttl > MAX_TTL {
        return Err(format!(
            "ttl {} is above the limit of {}h: join tokens are for setting nodes up, not for keeping",
            humantime::format_duration(ttl),
            MAX_TTL.as_secs() / 3600
        ));
    }
    if ttl < Duration::from_secs(1) {
        return Err("ttl must be at least 1s".to_owned());
    }
    let uses = if request.uses == 0 { 1 } else { request.uses };
    if uses > MAX_USES {
        return Err(format!("uses {uses} is above the limit of {MAX_USES}"));
    }
    check_labels(&request.labels)?;
    let secret = JoinSecret::generate();
    let record = JoinTokenRecord {
        hash: secret.hash().0,
        created_by: created_by.to_owned(),
        created_unix_ms: now_unix_ms,
        expires_unix_ms: now_unix_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
        uses,
        uses_left: uses,
        labels: request.labels.clone(),
        enrolled: Vec::new(),
    };
    Ok((secret, record))
}

/// Label names as the agent's config takes them; values bounded.
fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("{} labels; the limit is {MAX_LABELS}", labels.len()));
    }
    for (key, value) in labels {
        let ok = key.len() <= 64
            && key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!("label name {key:?} must match [a-zA-Z_][a-zA-Z0-9_]* (at most 64)"));
        }
        if value.len() > MAX_LABEL_VALUE || value.chars().any(char::is_control) {
            return Err(format!("label {key}: the value must be printable and at most {MAX_LABEL_VALUE} bytes"));
        }
    }
    Ok(())
}

/// Spends one use of `record` for `node` at `now_unix_ms`: the new record, or
/// why the token is refused. Spent is checked before expired, so that a used-up
/// token says so even after it would have expired.
pub fn spend(record: &JoinTokenRecord, node: &NodeId, now_unix_ms: i64) -> Result<JoinTokenRecord, Refusal> {
    match record.state(now_unix_ms) {
        TokenState::Spent => Err(Refusal::Spent { id: record.id(), uses: record.uses }),
        TokenState::Expired => {
            Err(Refusal::Expired { id: record.id(), ago: (now_unix_ms - record.expires_unix_ms) / 1000 })
        }
        TokenState::Active => {
            let mut next = record.clone();
            next.uses_left -= 1;
            next.enrolled.push(node.clone());
            Ok(next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn defaults_are_one_use_for_thirty_minutes_and_the_secret_is_not_kept() {
        let (secret, record) = create(&TokenRequest::default(), "operator root (admin)", 1_000).unwrap();
        assert_eq!(record.uses, 1);
        assert_eq!(record.expires_unix_ms, 1_000 + 30 * 60 * 1000);
        assert_eq!(record.hash, secret.hash().0);
        let stored = postcard::to_stdvec(&record).unwrap();
        let needle = secret.reveal();
        assert!(!String::from_utf8_lossy(&stored).contains(&needle));
        assert!(!stored.windows(32).any(|w| hex(w) == needle), "the raw secret bytes are not stored either");
    }

    fn hex(bytes: &[u8]) -> String {
        flotilla_common::enroll::encode_hex(bytes)
    }

    #[test]
    fn out_of_bounds_requests_are_refused() {
        let too_long = TokenRequest { ttl: MAX_TTL + Duration::from_secs(1), ..Default::default() };
        assert!(create(&too_long, "a", 0).unwrap_err().contains("24h"));
        let too_many = TokenRequest { uses: MAX_USES + 1, ..Default::default() };
        assert!(create(&too_many, "a", 0).is_err());
        let bad_label = TokenRequest { labels: [("a-b".into(), "x".into())].into(), ..Default::default() };
        assert!(create(&bad_label, "a", 0).unwrap_err().contains("a-b"));
        let sub_second = TokenRequest { ttl: Duration::from_millis(10), ..Default::default() };
        assert!(create(&sub_second, "a", 0).is_err());
    }

    #[test]
    fn a_token_is_spent_use_by_use_and_then_refused() {
        let request = TokenRequest { uses: 2, ..Default::default() };
        let (_, record) = create(&request, "a", 0).unwrap();
        let once = spend(&record, &node("a"), 1).unwrap();
        assert_eq!(once.uses_left, 1);
        let twice = spend(&once, &node("b"), 2).unwrap();
        assert_eq!(twice.enrolled, vec![node("a"), node("b")]);
        assert_eq!(twice.state(2), TokenState::Spent);
        let refused = spend(&twice, &node("c"), 3).unwrap_err();
        assert!(matches!(refused, Refusal::Spent { uses: 2, .. }));
        assert!(refused.to_string().contains("spent"), "{refused}");
    }

    #[test]
    fn an_expired_token_is_refused_at_its_expiry_exactly() {
        let request = TokenRequest { ttl: Duration::from_secs(1), ..Default::default() };
        let (_, record) = create(&request, "a", 10_000).unwrap();
        assert!(spend(&record, &node("a"), 10_999).is_ok());
        let refused = spend(&record, &node("a"), 11_000).unwrap_err();
        assert!(matches!(refused, Refusal::Expired { ago: 0, .. }));
        assert!(refused.to_string().contains("expired"), "{refused}");
        // Used up and expired: the more useful reason is that it is spent.
        let spent = spend(&record, &node("a"), 10_500).unwrap();
        assert!(matches!(spend(&spent, &node("b"), 99_000), Err(Refusal::Spent { .. })));
    }
}
