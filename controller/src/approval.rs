//! The two-person rule: destructive verbs, configured per verb under
//! `[approvals]`, are held until a second admin approves them.
//!
//! A held call is stored as an [`ApprovalRecord`] (the encoded request and who
//! asked), audited, and answered with its id. A different admin's approval runs
//! the stored request as its requester asked; a rejection, the requester's
//! withdrawal or the approval window's end closes it. The decisions here are
//! pure; `service::fleet::approvals` stores and runs them.
//!
//! Architecture Invariant: a held action runs only after [`decide`] moved its
//! record from pending to running, and the store's compare-and-swap lets only
//! one decision win.

use std::time::Duration;

use flotilla_common::Role;
use serde::{Deserialize, Serialize};

/// The verbs the rule can hold: the `ExecCommand` commands that change a node,
/// the `OperateRollout` operations, and `RevokeNode`.
pub const HOLDABLE_VERBS: &[&str] =
    &["stop", "restart", "drain", "deploy", "gateway-set", "pause", "resume", "abort", "undo", "revoke"];

/// `[approvals]` in the controller config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalPolicy {
    /// Verbs that wait for a second admin (e.g. `["stop", "undo", "revoke"]`);
    /// empty (the default) turns the rule off.
    pub require: Vec<String>,
    /// How long a held action waits for a decision before it expires.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self { require: Vec::new(), ttl: Duration::from_secs(3600) }
    }
}

impl ApprovalPolicy {
    /// Checks the verbs and the window.
    pub fn validate(&self) -> Result<(), String> {
        for verb in &self.require {
            if !HOLDABLE_VERBS.contains(&verb.as_str()) {
                return Err(format!(
                    "approvals.require: {verb:?} is not a verb the two-person rule can hold; use some of: {}",
                    HOLDABLE_VERBS.join(", ")
                ));
            }
        }
        if self.ttl < Duration::from_secs(60) || self.ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err("approvals.ttl must be within 1m..7days".to_owned());
        }
        Ok(())
    }

    /// Whether `verb` waits for a second admin.
    pub fn holds(&self, verb: &str) -> bool {
        self.require.iter().any(|v| v == verb)
    }
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApprovalState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Rejected,
    Expired,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }

    /// Still open: waiting for a decision or running.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Running)
    }
}

/// One held action as stored (postcard: fields by position, append only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub id: String,
    pub verb: String,
    pub target: String,
    pub summary: String,
    /// The Fleet method to call, and its request message, encoded.
    pub method: String,
    pub request: Vec<u8>,
    /// The requester: audit identity, certificate name and role.
    pub requested_by: String,
    pub requester_name: String,
    pub requester_role: Role,
    pub requested_unix_ms: i64,
    pub expires_unix_ms: i64,
    pub state: ApprovalState,
    pub decided_by: String,
    pub decided_unix_ms: i64,
    pub reason: String,
    pub finished_unix_ms: i64,
    /// The method's encoded response (succeeded) or its status (failed).
    pub response: Vec<u8>,
    pub error_code: i32,
    pub error: String,
}

/// Who decides: the caller of `DecideApproval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decider {
    pub name: String,
    pub role: Role,
    /// The audit identity.
    pub actor: String,
}

/// Why a decision is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("approval {id} is {state}, not pending: nothing to decide")]
    NotPending { id: String, state: &'static str },
    #[error(
        "approval {id} was requested by {requester}: the two-person rule needs a different admin to approve it (you may reject it to withdraw it)"
    )]
    SamePerson { id: String, requester: String },
    #[error("approving needs role admin; {name} has role {role}")]
    NotAdmin { name: String, role: Role },
    #[error("only an admin or its requester may reject approval {id}")]
    MayNotReject { id: String },
    #[error("a reason is required to reject: it goes to the audit log and to the requester")]
    NoReason,
}

impl ApprovalRecord {
    /// The state as of `now`: a pending record past its window is expired.
    pub fn state_at(&self, now_unix_ms: i64) -> ApprovalState {
        if self.state == ApprovalState::Pending && now_unix_ms >= self.expires_unix_ms {
            ApprovalState::Expired
        } else {
            self.state
        }
    }
}

/// The record after `decider` approves (`approve`) or rejects it at `now`.
pub fn decide(
    record: &ApprovalRecord,
    decider: &Decider,
    approve: bool,
    reason: &str,
    now_unix_ms: i64,
) -> Result<ApprovalRecord, Refusal> {
    let state = record.state_at(now_unix_ms);
    if state != ApprovalState::Pending {
        return Err(Refusal::NotPending { id: record.id.clone(), state: state.as_str() });
    }
    let reason = reason.trim();
    let mut next = record.clone();
    if approve {
        if decider.role < Role::Admin {
            return Err(Refusal::NotAdmin { name: decider.name.clone(), role: decider.role });
        }
        if decider.name == record.requester_name {
            return Err(Refusal::SamePerson { id: record.id.clone(), requester: record.requested_by.clone() });
        }
        next.state = ApprovalState::Running;
    } else {
        if decider.role < Role::Admin && decider.name != record.requester_name {
            return Err(Refusal::MayNotReject { id: record.id.clone() });
        }
        if reason.is_empty() {
            return Err(Refusal::NoReason);
        }
        next.state = ApprovalState::Rejected;
    }
    next.decided_by = decider.actor.clone();
    next.decided_unix_ms = now_unix_ms;
    next.reason = reason.to_owned();
    Ok(next)
}

/// The record once its action finished at `now`: `Ok(encoded response)` or
/// `Err((gRPC code, message))`.
pub fn finish(record: &ApprovalRecord, outcome: Result<Vec<u8>, (i32, String)>, now_unix_ms: i64) -> ApprovalRecord {
    let mut next = record.clone();
    next.finished_unix_ms = now_unix_ms;
    match outcome {
        Ok(response) => {
            next.state = ApprovalState::Succeeded;
            next.response = response;
        }
        Err((code, message)) => {
            next.state = ApprovalState::Failed;
            next.error_code = code;
            next.error = message;
        }
    }
    next
}

/// A short id: the requested time and a random suffix, unique in practice and
/// easy to type (`flotctl approve 01kf3c-7d2a`).
pub fn new_id(now_unix_ms: i64) -> String {
    let secs = u64::try_from(now_unix_ms / 1000).unwrap_or(0);
    format!("{:x}-{:04x}", secs & 0xff_ffff, rand::random::<u16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> ApprovalRecord {
        ApprovalRecord {
            id: "a1".into(),
            verb: "stop".into(),
            target: "gpu-a".into(),
            summary: "stop on gpu-a".into(),
            method: "ExecCommand".into(),
            request: vec![1, 2],
            requested_by: "operator:alice (operator)".into(),
            requester_name: "alice".into(),
            requester_role: Role::Operator,
            requested_unix_ms: 1_000,
            expires_unix_ms: 61_000,
            state: ApprovalState::Pending,
            decided_by: String::new(),
            decided_unix_ms: 0,
            reason: String::new(),
            finished_unix_ms: 0,
            response: Vec::new(),
            error_code: 0,
            error: String::new(),
        }
    }

    fn who(name: &str, role: Role) -> Decider {
        Decider { name: name.into(), role, actor: format!("operator:{name} ({role})") }
    }

    #[test]
    fn a_second_admin_approves() {
        let next = decide(&pending(), &who("bob", Role::Admin), true, "", 2_000).unwrap();
        assert_eq!(next.state, ApprovalState::Running);
        assert_eq!(next.decided_by, "operator:bob (admin)");
        assert_eq!(next.decided_unix_ms, 2_000);
    }

    #[test]
    fn the_requester_cannot_approve_their_own_even_as_admin() {
        let mut record = pending();
        record.requester_role = Role::Admin;
        let err = decide(&record, &who("alice", Role::Admin), true, "", 2_000).unwrap_err();
        assert!(matches!(err, Refusal::SamePerson { .. }), "{err}");
        assert!(err.to_string().contains("different admin"));
    }

    #[test]
    fn operators_cannot_approve() {
        let err = decide(&pending(), &who("carol", Role::Operator), true, "", 2_000).unwrap_err();
        assert!(matches!(err, Refusal::NotAdmin { .. }), "{err}");
    }

    #[test]
    fn rejections_need_an_admin_or_the_requester_and_a_reason() {
        assert!(matches!(
            decide(&pending(), &who("carol", Role::Operator), false, "no", 2_000),
            Err(Refusal::MayNotReject { .. })
        ));
        assert_eq!(decide(&pending(), &who("bob", Role::Admin), false, "  ", 2_000), Err(Refusal::NoReason));
        let withdrawn = decide(&pending(), &who("alice", Role::Operator), false, "wrong node", 2_000).unwrap();
        assert_eq!(withdrawn.state, ApprovalState::Rejected);
        assert_eq!(withdrawn.reason, "wrong node");
    }

    #[test]
    fn a_pending_record_expires_and_cannot_be_decided_after() {
        let record = pending();
        assert_eq!(record.state_at(60_999), ApprovalState::Pending);
        assert_eq!(record.state_at(61_000), ApprovalState::Expired);
        let err = decide(&record, &who("bob", Role::Admin), true, "", 61_000).unwrap_err();
        assert_eq!(err, Refusal::NotPending { id: "a1".into(), state: "expired" });
    }

    #[test]
    fn only_one_decision() {
        let approved = decide(&pending(), &who("bob", Role::Admin), true, "", 2_000).unwrap();
        assert!(matches!(
            decide(&approved, &who("dave", Role::Admin), false, "late", 3_000),
            Err(Refusal::NotPending { state: "running", .. })
        ));
        let done = finish(&approved, Ok(vec![9]), 4_000);
        assert_eq!(
            (done.state, done.response.as_slice(), done.finished_unix_ms),
            (ApprovalState::Succeeded, &[9][..], 4_000)
        );
        let failed = finish(&approved, Err((9, "node is not connected".into())), 4_000);
        assert_eq!((failed.state, failed.error_code), (ApprovalState::Failed, 9));
    }

    #[test]
    fn policy_names_only_holdable_verbs() {
        let mut policy =
            ApprovalPolicy { require: vec!["stop".into(), "undo".into(), "revoke".into()], ..Default::default() };
        assert!(policy.validate().is_ok());
        assert!(policy.holds("undo") && !policy.holds("drain"));
        policy.require.push("logs".into());
        let err = policy.validate().unwrap_err();
        assert!(err.contains("\"logs\"") && err.contains("stop, restart"), "{err}");
        policy.require.pop();
        policy.ttl = Duration::from_secs(10);
        assert!(policy.validate().is_err());
    }

    #[test]
    fn records_survive_the_store_codec() {
        let record = pending();
        let bytes = postcard::to_stdvec(&record).unwrap();
        assert_eq!(postcard::from_bytes::<ApprovalRecord>(&bytes).unwrap(), record);
    }
}
