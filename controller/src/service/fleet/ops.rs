//! The Fleet methods that act: signed commands and the audit log. Every action
//! is written to the audit log before it is sent.

use flotilla_common::command::{Command, CommandStatus};
use flotilla_common::time::now_unix_ms;
use flotilla_common::{Identity, NodeId};
use flotilla_proto::pb;
use tonic::{Request, Response, Status};

use crate::audit::{AuditEntry, ChainCheck};
use crate::commands::{DispatchError, deliver, result_wait};
use crate::service::{Context, blocking};

/// The caller's identity as the audit log names it. Whether its role may act
/// was decided by the Fleet allow-list (`auth::FLEET_METHODS`) before the handler ran.
pub fn actor_for_action<T>(request: &Request<T>) -> Result<String, Status> {
    let (name, role) = crate::auth::require_operator(request)?;
    Ok(Identity::Operator { name, role }.to_string())
}

/// Appends to the audit log (flushed) before the action it records.
pub async fn audit(
    ctx: &Context,
    actor: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<(), Status> {
    let entry = AuditEntry::now(actor, action, target, &detail);
    let store = ctx.store.clone();
    blocking("writing the audit log", move || store.append_audit(entry)).await.map(|_| ())
}

/// A command in words for the two-person rule, e.g. "stop of container vllm-a".
fn describe(command: &Command) -> String {
    match command {
        Command::Stop { container, .. } => format!("stop of container {container}"),
        Command::Restart { container, .. } => format!("restart of container {container}"),
        Command::Drain { container, .. } => format!("drain of container {container}"),
        other => other.name().to_owned(),
    }
}

fn wire_status(s: CommandStatus) -> pb::CommandStatus {
    match s {
        CommandStatus::Succeeded => pb::CommandStatus::Succeeded,
        CommandStatus::Failed => pb::CommandStatus::Failed,
        CommandStatus::Refused => pb::CommandStatus::Refused,
    }
}

pub async fn exec(
    ctx: &Context,
    request: Request<pb::ExecCommandRequest>,
) -> Result<Response<pb::ExecCommandResponse>, Status> {
    let actor = actor_for_action(&request)?;
    let req = request.get_ref();
    let node = NodeId::new(req.node_id.clone())
        .map_err(|e| Status::invalid_argument(format!("node id {:?}: {e}", req.node_id)))?;
    let command = Command::parse(&req.command, &req.args, &req.spec_yaml).map_err(Status::invalid_argument)?;
    let summary = format!("{} on node {node}", describe(&command));
    super::approvals::hold(ctx, &request, "ExecCommand", command.name(), node.as_str(), summary).await?;
    let req = request.into_inner();
    if ctx.registry.session(&node).is_none() {
        return Err(Status::failed_precondition(format!(
            "node {node} is not connected; `flotctl nodes ls` shows its state"
        )));
    }
    let prepared =
        ctx.commands.prepare(&node, &command, ctx.registry.agent_time(&node, now_unix_ms())).map_err(|e| {
            tracing::error!(error = %e, "signing a command failed");
            Status::internal("signing the command failed; see the controller log")
        })?;
    let id = prepared.0;
    let mut args: Vec<(&String, &String)> = req.args.iter().collect();
    args.sort();
    let detail = serde_json::json!({ "command_id": id.to_string(), "command": command.name(), "args": args });
    if let Err(status) = audit(ctx, &actor, "command.issue", node.as_str(), detail).await {
        ctx.commands.abandon(&id);
        return Err(status);
    }
    tracing::info!(node_id = %node, command_id = %id, command = command.name(), %actor, "sending signed command");
    let reply = match deliver(&ctx.registry, &ctx.commands, &node, prepared, result_wait(&command)).await {
        Ok(reply) => reply,
        Err(e @ DispatchError::NoResult { .. }) => {
            let detail = serde_json::json!({ "command_id": id.to_string(), "status": "no result" });
            audit(ctx, &actor, "command.result", node.as_str(), detail).await?;
            return Err(Status::deadline_exceeded(e.to_string()));
        }
        Err(e @ DispatchError::Sign(_)) => {
            tracing::error!(error = %e, "signing a command failed");
            return Err(Status::internal("signing the command failed; see the controller log"));
        }
        Err(e) => return Err(Status::unavailable(e.to_string())),
    };
    let detail = serde_json::json!({
        "command_id": id.to_string(),
        "status": reply.status.as_str(),
        "detail": reply.detail,
    });
    audit(ctx, &actor, "command.result", node.as_str(), detail).await?;
    Ok(Response::new(pb::ExecCommandResponse {
        command_id: id.to_string(),
        node_id: node.to_string(),
        status: wire_status(reply.status).into(),
        detail: reply.detail,
        output_json: reply.output_json,
    }))
}

pub async fn list_audit(
    ctx: &Context,
    request: Request<pb::ListAuditRequest>,
) -> Result<Response<pb::ListAuditResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let req = request.into_inner();
    let limit = if req.limit == 0 { 1000 } else { req.limit.min(100_000) } as usize;
    let store = ctx.store.clone();
    let records = blocking("reading the audit log", move || store.audit_records()).await?;
    let matching: Vec<_> = records.into_iter().filter(|r| r.entry.at_unix_ms >= req.since_unix_ms).collect();
    let skip = matching.len().saturating_sub(limit);
    let records = matching
        .into_iter()
        .skip(skip)
        .map(|r| pb::AuditRecord {
            seq: r.seq,
            at_unix_ms: r.entry.at_unix_ms,
            actor: r.entry.actor,
            action: r.entry.action,
            target: r.entry.target,
            detail_json: r.entry.detail_json,
            hash: r.hash,
        })
        .collect();
    Ok(Response::new(pb::ListAuditResponse { records }))
}

pub async fn verify_audit(
    ctx: &Context,
    request: Request<pb::VerifyAuditRequest>,
) -> Result<Response<pb::VerifyAuditResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let store = ctx.store.clone();
    let check =
        blocking("reading the audit log", move || store.audit_records().map(|r| crate::audit::verify(&r))).await?;
    Ok(Response::new(match check {
        ChainCheck::Intact { records } => {
            pb::VerifyAuditResponse { intact: true, records, first_broken_seq: 0, detail: String::new() }
        }
        ChainCheck::Broken { records, first_broken_seq, reason } => {
            tracing::error!(first_broken_seq, %reason, "audit log chain is broken");
            pb::VerifyAuditResponse { intact: false, records, first_broken_seq, detail: reason }
        }
    }))
}
