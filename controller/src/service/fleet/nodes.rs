//! The Fleet methods about a node's membership: revoking it. A revocation is
//! audited, then stored, then applied (the live stream closed at once); from
//! then on every stream from the node's identity is refused with the reason.

use flotilla_common::NodeId;
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use tonic::{Request, Response, Status};

use super::ops::{actor_for_action, audit};
use crate::registry::Revocation;
use crate::service::{Context, blocking};

/// The longest reason kept: it is repeated in every refusal the node gets.
const MAX_REASON_CHARS: usize = 512;

fn to_wire(r: Revocation, stream_closed: bool, already_revoked: bool) -> pb::RevokeNodeResponse {
    pb::RevokeNodeResponse {
        node_id: r.node.to_string(),
        revoked_at_unix_ms: r.at_unix_ms,
        revoked_by: r.by,
        reason: r.reason,
        certificate_serials: r.serials,
        stream_closed,
        already_revoked,
    }
}

#[tracing::instrument(skip_all, fields(caller, node_id))]
pub async fn revoke(
    ctx: &Context,
    request: Request<pb::RevokeNodeRequest>,
) -> Result<Response<pb::RevokeNodeResponse>, Status> {
    let actor = actor_for_action(&request)?;
    tracing::Span::current().record("caller", actor.as_str());
    let req = request.get_ref();
    let node = NodeId::new(req.node_id.clone())
        .map_err(|e| Status::invalid_argument(format!("node id {:?}: {e}", req.node_id)))?;
    tracing::Span::current().record("node_id", node.as_str());
    let reason = req.reason.trim();
    if reason.is_empty() {
        return Err(Status::invalid_argument(
            "a reason is required: it goes to the audit log and into every refusal the node gets",
        ));
    }
    if reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "the reason must be one line of at most {MAX_REASON_CHARS} characters"
        )));
    }
    // Idempotent: a second revoke changes nothing and says who revoked it first.
    if let Some(earlier) = ctx.registry.revocation(&node) {
        return Ok(Response::new(to_wire(earlier, false, true)));
    }
    let summary = format!("revocation of node {node} ({reason})");
    super::approvals::hold(ctx, &request, "RevokeNode", "revoke", node.as_str(), summary).await?;
    let serials: Vec<String> = ctx.registry.session(&node).and_then(|s| s.cert_serial).into_iter().collect();
    let revocation = Revocation {
        node: node.clone(),
        at_unix_ms: now_unix_ms(),
        by: actor.clone(),
        reason: reason.to_owned(),
        serials,
    };
    let detail = serde_json::json!({ "reason": revocation.reason, "certificate_serials": revocation.serials });
    audit(ctx, &actor, "node.revoke", node.as_str(), detail).await?;
    let store = ctx.store.clone();
    let stored = revocation.clone();
    blocking("storing the revocation", move || store.commit_revocation(&stored)).await?;
    let closed = ctx.registry.revoke(revocation.clone());
    tracing::warn!(reason = %revocation.reason, stream_closed = closed.is_some(), "node revoked");
    Ok(Response::new(to_wire(revocation, closed.is_some(), false)))
}
