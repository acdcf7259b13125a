//! The two-person rule from the requester's side: a held call fails with its
//! approval id in the `flotilla-approval-id` metadata; flotctl then says so and
//! waits for a second admin's decision, and prints the action's result as if
//! the call had gone through at once.

use std::time::Duration;

use flotilla_proto::pb;
use prost::Message;

use crate::client::{Fleet, call, status_error};

/// The response metadata key of a held call (the controller's `APPROVAL_ID_HEADER`).
pub const APPROVAL_ID_HEADER: &str = "flotilla-approval-id";

/// How often a waiting flotctl asks about the approval.
const POLL: Duration = Duration::from_secs(1);

/// The approval id a held call's status carries, if it was held.
pub fn held_id(status: &tonic::Status) -> Option<String> {
    (status.code() == tonic::Code::FailedPrecondition)
        .then(|| status.metadata().get(APPROVAL_ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned))
        .flatten()
}

/// Unwraps the answer of a call the two-person rule may hold: a held call
/// waits for the decision (telling the user on stderr) and returns the held
/// action's own response once a second admin approved it and it ran.
pub async fn call_held<T: Message + Default>(
    what: &str,
    client: &mut Fleet,
    result: Result<tonic::Response<T>, tonic::Status>,
) -> anyhow::Result<T> {
    let status = match result {
        Ok(response) => return Ok(response.into_inner()),
        Err(status) => status,
    };
    let Some(id) = held_id(&status) else { return Err(status_error(what, &status)) };
    eprintln!("flotctl: {}", status.message());
    eprintln!("flotctl: waiting for the decision (Ctrl-C stops waiting; the request stays pending)");
    let done = wait(client, &id).await?;
    outcome(what, &done)
}

/// Polls approval `id` until it is decided and, if approved, finished.
pub async fn wait(client: &mut Fleet, id: &str) -> anyhow::Result<pb::Approval> {
    loop {
        let approval =
            call(&format!("approval {id}"), client.get_approval(pb::GetApprovalRequest { id: id.to_owned() }).await)?;
        match pb::ApprovalState::try_from(approval.state) {
            Ok(pb::ApprovalState::Pending | pb::ApprovalState::Running) => tokio::time::sleep(POLL).await,
            _ => return Ok(approval),
        }
    }
}

/// The held action's response, or why there is none.
pub fn outcome<T: Message + Default>(what: &str, approval: &pb::Approval) -> anyhow::Result<T> {
    let id = &approval.id;
    match pb::ApprovalState::try_from(approval.state) {
        Ok(pb::ApprovalState::Succeeded) => {
            eprintln!("flotctl: approval {id}: approved by {}; the action ran", approval.decided_by);
            T::decode(approval.response.as_slice())
                .map_err(|e| anyhow::anyhow!("{what}: approval {id} ran, but its answer does not decode ({e}): is flotctl older than the controller?"))
        }
        Ok(pb::ApprovalState::Failed) => {
            let status = tonic::Status::new(tonic::Code::from_i32(approval.error_code), approval.error.clone());
            Err(status_error(&format!("{what} (approved by {}, approval {id})", approval.decided_by), &status))
        }
        Ok(pb::ApprovalState::Rejected) => {
            Err(anyhow::anyhow!("{what}: approval {id} was rejected by {}: {}", approval.decided_by, approval.reason))
        }
        Ok(pb::ApprovalState::Expired) => Err(anyhow::anyhow!(
            "{what}: approval {id} expired before a second admin decided; ask again when one is available"
        )),
        _ => Err(anyhow::anyhow!("{what}: approval {id} is in an unknown state; `flotctl approvals show {id}`")),
    }
}
