//! The two-person rule's gRPC side: holding a call ([`hold`]), listing and
//! deciding approvals, and running an approved call as its requester asked.

use flotilla_common::Identity;
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

use super::ops::audit;
use crate::approval::{ApprovalRecord, ApprovalState, Decider, decide, finish, new_id};
use crate::auth::Caller;
use crate::service::{Context, blocking};

/// The response metadata key that carries a held call's approval id.
pub const APPROVAL_ID_HEADER: &str = "flotilla-approval-id";

/// Marks a request a second admin approved: [`hold`] lets it through.
#[derive(Debug, Clone)]
struct Approved;

/// Holds the call if the two-person rule covers `verb`: stores and audits it
/// (or finds the same requester's identical pending one) and fails the call
/// with its id. `Ok(())` lets the call go on: the verb is not held, or this is
/// the approved call running.
pub async fn hold<T: Message>(
    ctx: &Context,
    request: &Request<T>,
    method: &str,
    verb: &str,
    target: &str,
    summary: String,
) -> Result<(), Status> {
    if !ctx.config.approvals.holds(verb) || request.extensions().get::<Approved>().is_some() {
        return Ok(());
    }
    let (name, role) = crate::auth::require_operator(request)?;
    let requested_by = Identity::Operator { name: name.clone(), role }.to_string();
    let encoded = request.get_ref().encode_to_vec();
    let now = now_unix_ms();
    let store = ctx.store.clone();
    let existing = blocking("reading approvals", move || store.approvals()).await?.into_iter().find(|a| {
        a.state_at(now) == ApprovalState::Pending
            && a.requester_name == name
            && a.method == method
            && a.request == encoded
    });
    let record = match existing {
        Some(record) => record,
        None => {
            let record = ApprovalRecord {
                id: new_id(now),
                verb: verb.to_owned(),
                target: target.to_owned(),
                summary,
                method: method.to_owned(),
                request: encoded,
                requested_by: requested_by.clone(),
                requester_name: name,
                requester_role: role,
                requested_unix_ms: now,
                expires_unix_ms: now.saturating_add(i64::try_from(ctx.config.approvals.ttl.as_millis()).unwrap_or(0)),
                state: ApprovalState::Pending,
                decided_by: String::new(),
                decided_unix_ms: 0,
                reason: String::new(),
                finished_unix_ms: 0,
                response: Vec::new(),
                error_code: 0,
                error: String::new(),
            };
            let detail = serde_json::json!({
                "approval_id": record.id, "verb": verb, "method": method, "summary": record.summary,
            });
            audit(ctx, &requested_by, "approval.request", target, detail).await?;
            let store = ctx.store.clone();
            let stored = record.clone();
            blocking("storing the approval", move || store.commit_approval(&stored)).await?;
            tracing::info!(approval_id = %record.id, verb, target, requested_by, "action held for a second admin");
            record
        }
    };
    let mut metadata = MetadataMap::new();
    if let Ok(value) = MetadataValue::try_from(record.id.as_str()) {
        metadata.insert(APPROVAL_ID_HEADER, value);
    }
    Err(Status::with_metadata(
        Code::FailedPrecondition,
        format!(
            "{} needs a second admin's approval (two-person rule for {verb}): approval {} is pending until {}; \
             another admin runs `flotctl approve {}`",
            record.summary,
            record.id,
            rfc3339(record.expires_unix_ms),
            record.id
        ),
        metadata,
    ))
}

/// `unix_ms` as an RFC 3339 UTC time, for people.
fn rfc3339(unix_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

fn to_wire(a: &ApprovalRecord, now: i64) -> pb::Approval {
    let state = match a.state_at(now) {
        ApprovalState::Pending => pb::ApprovalState::Pending,
        ApprovalState::Running => pb::ApprovalState::Running,
        ApprovalState::Succeeded => pb::ApprovalState::Succeeded,
        ApprovalState::Failed => pb::ApprovalState::Failed,
        ApprovalState::Rejected => pb::ApprovalState::Rejected,
        ApprovalState::Expired => pb::ApprovalState::Expired,
    };
    pb::Approval {
        id: a.id.clone(),
        verb: a.verb.clone(),
        target: a.target.clone(),
        summary: a.summary.clone(),
        method: a.method.clone(),
        requested_by: a.requested_by.clone(),
        requested_unix_ms: a.requested_unix_ms,
        expires_unix_ms: a.expires_unix_ms,
        state: state.into(),
        decided_by: a.decided_by.clone(),
        decided_unix_ms: a.decided_unix_ms,
        reason: a.reason.clone(),
        finished_unix_ms: a.finished_unix_ms,
        response: a.response.clone(),
        error_code: a.error_code,
        error: a.error.clone(),
    }
}

/// How many decided approvals `ListApprovals { all }` returns.
const MAX_LISTED: usize = 1000;

pub async fn list(
    ctx: &Context,
    request: Request<pb::ListApprovalsRequest>,
) -> Result<Response<pb::ListApprovalsResponse>, Status> {
    let all = request.get_ref().all;
    let store = ctx.store.clone();
    let mut records = blocking("reading approvals", move || store.approvals()).await?;
    let now = now_unix_ms();
    records.sort_by_key(|a| (a.requested_unix_ms, a.id.clone()));
    let approvals: Vec<pb::Approval> = if all {
        let skip = records.len().saturating_sub(MAX_LISTED);
        records.iter().skip(skip).map(|a| to_wire(a, now)).collect()
    } else {
        records.iter().filter(|a| a.state_at(now).is_open()).map(|a| to_wire(a, now)).collect()
    };
    Ok(Response::new(pb::ListApprovalsResponse { approvals }))
}

async fn load(ctx: &Context, id: &str) -> Result<ApprovalRecord, Status> {
    let store = ctx.store.clone();
    let key = id.to_owned();
    blocking("reading the approval", move || store.approval(&key))
        .await?
        .ok_or_else(|| Status::not_found(format!("no approval {id:?}; `flotctl approvals ls --all` lists them")))
}

pub async fn get(ctx: &Context, request: Request<pb::GetApprovalRequest>) -> Result<Response<pb::Approval>, Status> {
    let record = load(ctx, &request.get_ref().id).await?;
    Ok(Response::new(to_wire(&record, now_unix_ms())))
}

#[tracing::instrument(skip_all, fields(approval_id = %request.get_ref().id))]
pub async fn decide_call(
    ctx: &Context,
    request: Request<pb::DecideApprovalRequest>,
) -> Result<Response<pb::Approval>, Status> {
    let (name, role) = crate::auth::require_operator(&request)?;
    let actor = Identity::Operator { name: name.clone(), role }.to_string();
    let req = request.into_inner();
    let record = load(ctx, &req.id).await?;
    let decider = Decider { name, role, actor: actor.clone() };
    let now = now_unix_ms();
    let next = decide(&record, &decider, req.approve, &req.reason, now).map_err(|refusal| match refusal {
        crate::approval::Refusal::NotAdmin { .. }
        | crate::approval::Refusal::MayNotReject { .. }
        | crate::approval::Refusal::SamePerson { .. } => Status::permission_denied(refusal.to_string()),
        crate::approval::Refusal::NoReason => Status::invalid_argument(refusal.to_string()),
        crate::approval::Refusal::NotPending { .. } => Status::failed_precondition(refusal.to_string()),
    })?;
    let action = if req.approve { "approval.approve" } else { "approval.reject" };
    let detail = serde_json::json!({
        "approval_id": record.id, "verb": record.verb, "requested_by": record.requested_by,
        "summary": record.summary, "reason": next.reason,
    });
    audit(ctx, &actor, action, &record.target, detail).await?;
    let store = ctx.store.clone();
    let (old, new) = (record.clone(), next.clone());
    if !blocking("deciding the approval", move || store.swap_approval(&old, &new)).await? {
        return Err(Status::aborted(format!(
            "approval {} was decided by someone else a moment ago; `flotctl approvals show {}` says how",
            record.id, record.id
        )));
    }
    tracing::warn!(%actor, verb = %record.verb, target = %record.target, decision = action, "approval decided");
    if next.state == ApprovalState::Running {
        // The action may wait long (a drain): it runs on its own task and its
        // outcome is stored; both people wait for it with GetApproval.
        let ctx = ctx.clone();
        let running = next.clone();
        tokio::spawn(async move { run_approved(ctx, running).await });
    }
    Ok(Response::new(to_wire(&next, now)))
}

/// Runs an approved call as its requester asked, and stores the outcome.
async fn run_approved(ctx: Context, record: ApprovalRecord) {
    let outcome = tokio::select! {
        result = call_held(&ctx, &record) => result.map_err(|s| (s.code() as i32, s.message().to_owned())),
        () = ctx.shutdown.cancelled() => Err((Code::Unavailable as i32, INTERRUPTED.to_owned())),
    };
    let done = finish(&record, outcome, now_unix_ms());
    tracing::info!(approval_id = %done.id, state = done.state.as_str(), "approved action finished");
    let store = ctx.store.clone();
    let stored = done.clone();
    if let Err(status) = blocking("storing the approval's outcome", move || store.commit_approval(&stored)).await {
        tracing::error!(approval_id = %done.id, %status, "the approved action finished but its outcome was not stored");
    }
}

/// What a held action that was running when the controller stopped says.
const INTERRUPTED: &str = "the controller stopped while the approved action ran, so its outcome is unknown; \
                           check `flotctl audit ls` and the target before asking again";

/// The approved request, rebuilt with its requester as the caller.
fn rebuilt<T>(record: &ApprovalRecord, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Caller { name: record.requester_name.clone(), role: record.requester_role });
    request.extensions_mut().insert(Approved);
    request
}

fn decoded<T: Message + Default>(record: &ApprovalRecord) -> Result<T, Status> {
    T::decode(record.request.as_slice())
        .map_err(|e| Status::internal(format!("approval {}: the stored request does not decode: {e}", record.id)))
}

async fn call_held(ctx: &Context, record: &ApprovalRecord) -> Result<Vec<u8>, Status> {
    match record.method.as_str() {
        "ExecCommand" => {
            let request = rebuilt(record, decoded::<pb::ExecCommandRequest>(record)?);
            Ok(super::ops::exec(ctx, request).await?.into_inner().encode_to_vec())
        }
        "OperateRollout" => {
            let request = rebuilt(record, decoded::<pb::OperateRolloutRequest>(record)?);
            Ok(super::deploy::operate(ctx, request).await?.into_inner().encode_to_vec())
        }
        "RevokeNode" => {
            let request = rebuilt(record, decoded::<pb::RevokeNodeRequest>(record)?);
            Ok(super::nodes::revoke(ctx, request).await?.into_inner().encode_to_vec())
        }
        other => Err(Status::internal(format!("approval {}: the method {other} cannot be held", record.id))),
    }
}

/// At startup: approvals left running by a stopped controller are failed
/// ("outcome unknown"), so nobody waits on them forever.
pub fn recover(store: &dyn crate::store::Store) -> Result<usize, crate::store::StoreError> {
    let mut failed = 0;
    for record in store.approvals()? {
        if record.state == ApprovalState::Running {
            let done = finish(&record, Err((Code::Unavailable as i32, INTERRUPTED.to_owned())), now_unix_ms());
            store.commit_approval(&done)?;
            failed += 1;
        }
    }
    if failed > 0 {
        tracing::warn!(failed, "approved actions were running when the controller stopped; marked failed");
    }
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SledStore, Store};

    fn record(id: &str, state: ApprovalState) -> ApprovalRecord {
        ApprovalRecord {
            id: id.into(),
            verb: "drain".into(),
            target: "gpu-a".into(),
            summary: "drain of container c on node gpu-a".into(),
            method: "ExecCommand".into(),
            request: Vec::new(),
            requested_by: "operator alice (operator)".into(),
            requester_name: "alice".into(),
            requester_role: flotilla_common::Role::Operator,
            requested_unix_ms: 1,
            expires_unix_ms: i64::MAX,
            state,
            decided_by: "operator bob (admin)".into(),
            decided_unix_ms: 2,
            reason: String::new(),
            finished_unix_ms: 0,
            response: Vec::new(),
            error_code: 0,
            error: String::new(),
        }
    }

    #[test]
    fn a_restart_fails_what_was_running_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.commit_approval(&record("run", ApprovalState::Running)).unwrap();
        store.commit_approval(&record("wait", ApprovalState::Pending)).unwrap();
        assert_eq!(recover(&store).unwrap(), 1);
        let failed = store.approval("run").unwrap().unwrap();
        assert_eq!(failed.state, ApprovalState::Failed);
        assert!(failed.error.contains("outcome is unknown"), "{}", failed.error);
        assert_eq!(store.approval("wait").unwrap().unwrap().state, ApprovalState::Pending);
    }

    #[test]
    fn only_one_decision_wins_the_swap() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let pending = record("x", ApprovalState::Pending);
        store.commit_approval(&pending).unwrap();
        let approved = ApprovalRecord { state: ApprovalState::Running, ..pending.clone() };
        let rejected = ApprovalRecord { state: ApprovalState::Rejected, ..pending.clone() };
        assert!(store.swap_approval(&pending, &approved).unwrap());
        assert!(!store.swap_approval(&pending, &rejected).unwrap(), "the second decision lost");
        assert_eq!(store.approval("x").unwrap().unwrap().state, ApprovalState::Running);
    }
}
