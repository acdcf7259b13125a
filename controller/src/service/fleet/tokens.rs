//! Join tokens (admin only, by the Fleet allow-list): `CreateJoinToken` returns
//! the secret once and stores only its hash; `ListJoinTokens` never shows one.

use std::time::Duration;

use flotilla_common::enroll::JoinToken;
use flotilla_common::time::now_unix_ms;
use flotilla_common::{Identity, Role};
use flotilla_proto::pb;
use tonic::{Request, Response, Status};

use crate::enroll::token::{JoinTokenRecord, TokenRequest, create};
use crate::service::{Context, blocking};

fn info(record: JoinTokenRecord, now_unix_ms: i64) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        id: record.id(),
        state: record.state(now_unix_ms).as_str().to_owned(),
        created_by: record.created_by,
        created_unix_ms: record.created_unix_ms,
        expires_unix_ms: record.expires_unix_ms,
        uses: record.uses,
        uses_left: record.uses_left,
        labels: record.labels.into_iter().collect(),
        enrolled: record.enrolled.into_iter().map(|n| n.to_string()).collect(),
    }
}

/// The caller as the audit log names them; only admins get here (the allow-list),
/// and the check is repeated so that this handler is safe on its own.
fn admin<T>(request: &Request<T>) -> Result<String, Status> {
    let (name, role) = crate::auth::require_operator(request)?;
    if role < Role::Admin {
        return Err(Status::permission_denied(format!("operator {name} has role {role}; join tokens need role admin")));
    }
    Ok(Identity::Operator { name, role }.to_string())
}

pub async fn create_token(
    ctx: &Context,
    request: Request<pb::CreateJoinTokenRequest>,
) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
    let actor = admin(&request)?;
    let Some(authority) = ctx.enrollment.authority() else {
        return Err(Status::failed_precondition(
            "enrollment is disabled: set tls.ca_key (the fleet CA key) and enroll_listen in the controller config",
        ));
    };
    if ctx.config.enroll_listen.is_none() {
        return Err(Status::failed_precondition(
            "enrollment is disabled: set enroll_listen in the controller config (agents enroll on that port)",
        ));
    }
    let req = request.into_inner();
    let wanted = TokenRequest {
        ttl: Duration::from_millis(req.ttl_ms),
        uses: req.uses,
        labels: req.labels.into_iter().collect(),
    };
    let now = now_unix_ms();
    let (secret, record) = create(&wanted, &actor, now).map_err(Status::invalid_argument)?;
    let id = record.id();
    // Audit before the token exists: it is an action on who may join the fleet.
    let detail = serde_json::json!({
        "expires_unix_ms": record.expires_unix_ms,
        "uses": record.uses,
        "labels": record.labels,
    });
    super::ops::audit(ctx, &actor, "token.create", &id, detail).await?;
    let stored = record.clone();
    let store = ctx.store.clone();
    blocking("storing the join token", move || store.commit_join_token(&stored)).await?;
    tracing::info!(token_id = %id, uses = record.uses, expires_unix_ms = record.expires_unix_ms, %actor, "join token created");
    let token = JoinToken { secret, ca: Some(authority.fingerprint()) };
    Ok(Response::new(pb::CreateJoinTokenResponse { token: token.reveal(), info: Some(info(record, now)) }))
}

pub async fn list_tokens(
    ctx: &Context,
    request: Request<pb::ListJoinTokensRequest>,
) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
    admin(&request)?;
    let store = ctx.store.clone();
    let mut records = blocking("reading join tokens", move || store.join_tokens()).await?;
    records.sort_by_key(|r| r.created_unix_ms);
    let now = now_unix_ms();
    Ok(Response::new(pb::ListJoinTokensResponse { tokens: records.into_iter().map(|r| info(r, now)).collect() }))
}

#[tracing::instrument(skip_all, fields(token_id = %request.get_ref().id))]
pub async fn revoke_token(
    ctx: &Context,
    request: Request<pb::RevokeJoinTokenRequest>,
) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
    let actor = admin(&request)?;
    let req = request.into_inner();
    let reason = req.reason.trim().to_owned();
    if reason.is_empty() || reason.chars().count() > 512 || reason.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "a reason (one line, at most 512 characters) is required: it goes to the audit log",
        ));
    }
    let store = ctx.store.clone();
    let id = req.id.clone();
    let known = blocking("reading join tokens", move || store.join_tokens()).await?.into_iter().any(|t| t.id() == id);
    if !known {
        return Err(Status::not_found(format!("no join token {:?}; `flotctl token ls` lists them", req.id)));
    }
    super::ops::audit(ctx, &actor, "token.revoke", &req.id, serde_json::json!({ "reason": reason })).await?;
    let store = ctx.store.clone();
    let id = req.id.clone();
    let removed = blocking("deleting the join token", move || store.remove_join_token(&id)).await?;
    let Some(record) = removed else {
        return Err(Status::not_found(format!("join token {:?} was deleted a moment ago", req.id)));
    };
    tracing::warn!(%actor, %reason, "join token revoked");
    Ok(Response::new(pb::RevokeJoinTokenResponse { token: Some(info(record, now_unix_ms())) }))
}
