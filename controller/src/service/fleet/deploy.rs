//! The Fleet methods for deployments and rollouts. Reads need any operator
//! certificate; apply and the rollout operations need the operator or admin
//! role and are written to the audit log before they act.

use flotilla_proto::pb;
use tonic::{Request, Response, Status};

use super::ops::{actor_for_action, audit};
use crate::rollout::model::{Action, Phase, Plan, Replica, Rollout};
use crate::rollout::{Deployment, Operation, RolloutError};
use crate::service::Context;

impl From<RolloutError> for Status {
    fn from(error: RolloutError) -> Self {
        match error {
            RolloutError::Spec(_) => Status::invalid_argument(error.to_string()),
            RolloutError::Plan(_) | RolloutError::Conflict(_) => Status::failed_precondition(error.to_string()),
            RolloutError::NotFound(_) => Status::not_found(error.to_string()),
            RolloutError::Stopped => Status::unavailable(error.to_string()),
            RolloutError::Store(_) => {
                tracing::error!(%error, "rollout store error");
                Status::internal("the deployment store failed; see the controller log")
            }
        }
    }
}

/// Runs a store read of the rollout handle off the async workers.
async fn read<T: Send + 'static>(
    ctx: &Context,
    f: impl FnOnce(&crate::rollout::Rollouts) -> Result<T, RolloutError> + Send + 'static,
) -> Result<T, Status> {
    let rollouts = ctx.rollouts.clone();
    match tokio::task::spawn_blocking(move || f(&rollouts)).await {
        Ok(result) => result.map_err(Status::from),
        Err(error) => {
            tracing::error!(%error, "deployment read task failed");
            Err(Status::internal("reading deployments failed; see the controller log"))
        }
    }
}

pub async fn apply(
    ctx: &Context,
    request: Request<pb::ApplyDeploymentRequest>,
) -> Result<Response<pb::ApplyDeploymentResponse>, Status> {
    let actor = actor_for_action(&request)?;
    let req = request.into_inner();
    if !req.dry_run {
        // The spec's name is read for the record only; the driver validates it all.
        let name = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&req.spec_yaml)
            .ok()
            .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned))
            .unwrap_or_default();
        let detail = serde_json::json!({ "spec_bytes": req.spec_yaml.len() });
        audit(ctx, &actor, "deploy.apply", &name, detail).await?;
    }
    let outcome = ctx.rollouts.apply(req.spec_yaml, actor, req.dry_run).await?;
    Ok(Response::new(pb::ApplyDeploymentResponse {
        deployment: outcome.deployment,
        revision: outcome.revision,
        unchanged: outcome.unchanged,
        rollout: outcome.rollout.unwrap_or_default(),
        plan: Some(plan_to_wire(&outcome.plan)),
    }))
}

pub async fn list(
    ctx: &Context,
    request: Request<pb::ListDeploymentsRequest>,
) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let all = read(ctx, |r| r.list()).await?;
    let deployments = all
        .into_iter()
        .map(|(dep, latest)| {
            let spec = dep.active.or(dep.revisions.last().map(|r| r.number)).and_then(|n| dep.revision(n));
            pb::DeploymentSummary {
                name: dep.name.clone(),
                active_revision: dep.active.unwrap_or_default(),
                latest_revision: dep.revisions.last().map(|r| r.number).unwrap_or_default(),
                replicas: dep.replicas.iter().map(replica_to_wire).collect(),
                rollout: latest.as_ref().map(rollout_to_wire),
                model: spec.map(|r| r.spec.model.name.clone()).unwrap_or_default(),
                image: spec.map(|r| r.spec.runtime.image.clone()).unwrap_or_default(),
            }
        })
        .collect();
    Ok(Response::new(pb::ListDeploymentsResponse { deployments }))
}

pub async fn history(
    ctx: &Context,
    request: Request<pb::GetDeploymentHistoryRequest>,
) -> Result<Response<pb::GetDeploymentHistoryResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let name = request.into_inner().name;
    let (dep, rollouts) = read(ctx, move |r| r.history(&name)).await?;
    Ok(Response::new(history_to_wire(&dep, &rollouts)))
}

pub async fn get(
    ctx: &Context,
    request: Request<pb::GetRolloutRequest>,
) -> Result<Response<pb::RolloutStatus>, Status> {
    crate::auth::require_operator(&request)?;
    let req = request.into_inner();
    let name = req.name.clone();
    let (_, rollouts) = read(ctx, move |r| r.history(&name)).await?;
    let found = if req.number == 0 { rollouts.last() } else { rollouts.iter().find(|r| r.number == req.number) };
    let r = found.ok_or_else(|| {
        Status::not_found(if req.number == 0 {
            format!("{} has had no rollout yet", req.name)
        } else {
            format!("{} has no rollout {}", req.name, req.number)
        })
    })?;
    Ok(Response::new(rollout_to_wire(r)))
}

pub async fn operate(
    ctx: &Context,
    request: Request<pb::OperateRolloutRequest>,
) -> Result<Response<pb::OperateRolloutResponse>, Status> {
    let actor = actor_for_action(&request)?;
    let op = match pb::RolloutOperation::try_from(request.get_ref().operation) {
        Ok(pb::RolloutOperation::Pause) => Operation::Pause,
        Ok(pb::RolloutOperation::Resume) => Operation::Resume,
        Ok(pb::RolloutOperation::Abort) => Operation::Abort,
        Ok(pb::RolloutOperation::Undo) => Operation::Undo,
        _ => return Err(Status::invalid_argument("operation must be pause, resume, abort or undo")),
    };
    let name = request.get_ref().name.clone();
    let summary = format!("{} of deployment {name}'s rollout", op.as_str());
    super::approvals::hold(ctx, &request, "OperateRollout", op.as_str(), &name, summary).await?;
    let req = request.into_inner();
    audit(ctx, &actor, &format!("rollout.{}", op.as_str()), &req.name, serde_json::json!({})).await?;
    let message = ctx.rollouts.operate(req.name.clone(), op, actor).await?;
    let name = req.name.clone();
    let (_, rollouts) = read(ctx, move |r| r.history(&name)).await?;
    Ok(Response::new(pb::OperateRolloutResponse { message, rollout: rollouts.last().map(rollout_to_wire) }))
}

fn replica_to_wire(r: &Replica) -> pb::DeploymentReplica {
    pb::DeploymentReplica {
        node: r.node.clone(),
        revision: r.revision,
        container: r.container.clone(),
        gpus: r.gpus.clone(),
        server: r.server(),
    }
}

fn weights_to_wire(w: &flotilla_common::command::GatewayWeights) -> Vec<pb::GatewayServer> {
    w.servers.iter().map(|s| pb::GatewayServer { address: s.address.clone(), weight: u32::from(s.weight) }).collect()
}

fn plan_to_wire(plan: &Plan) -> pb::RolloutPlan {
    pb::RolloutPlan {
        strategy: plan.strategy.clone(),
        notes: plan.notes.clone(),
        steps: plan
            .steps
            .iter()
            .map(|s| {
                let mut step = pb::RolloutStep { label: s.label.clone(), ..Default::default() };
                match &s.action {
                    Action::Start { replicas, .. } => {
                        step.kind = "start".into();
                        step.replicas = replicas.iter().map(replica_to_wire).collect();
                    }
                    Action::Retire { replicas } => {
                        step.kind = "retire".into();
                        step.replicas = replicas.iter().map(replica_to_wire).collect();
                    }
                    Action::Traffic { weights, new_share, bake_ms } => {
                        step.kind = "traffic".into();
                        step.weights = weights_to_wire(weights);
                        step.new_share = u32::from(*new_share);
                        step.bake_ms = *bake_ms;
                    }
                    Action::AwaitPromotion => step.kind = "await_promotion".into(),
                }
                step
            })
            .collect(),
    }
}

fn rollout_to_wire(r: &Rollout) -> pb::RolloutStatus {
    let running = r.running_plan();
    let (phase, commands) = match &r.phase {
        Phase::Ready => ("ready", Vec::new()),
        Phase::Acting { issued } => (
            "acting",
            issued
                .iter()
                .map(|i| pb::RolloutCommand {
                    id: i.id.clone(),
                    node: i.node.clone(),
                    command: i.command.name().to_owned(),
                    status: i.result.as_ref().map_or("pending", |x| x.status.as_str()).to_owned(),
                    detail: i.result.as_ref().map(|x| x.detail.clone()).unwrap_or_default(),
                })
                .collect(),
        ),
        Phase::Settling { .. } => ("settling", Vec::new()),
        Phase::Baking { .. } => ("baking", Vec::new()),
    };
    let step = if r.state.is_final() { running.steps.len() } else { (r.step + 1).min(running.steps.len()) };
    pb::RolloutStatus {
        deployment: r.deployment.clone(),
        number: r.number,
        state: r.state.as_str().to_owned(),
        from_revision: r.from.unwrap_or_default(),
        to_revision: r.to,
        step: step as u32,
        steps: running.steps.len() as u32,
        step_label: r.current_step().map(|s| s.label.clone()).unwrap_or_default(),
        phase: phase.to_owned(),
        weights: r.weights.as_ref().map(weights_to_wire).unwrap_or_default(),
        new_share: u32::from(r.share),
        gates: r
            .readings
            .iter()
            .map(|g| pb::GateReading {
                gate: g.gate.clone(),
                value: g.value,
                baseline: g.baseline,
                limit: g.limit,
                verdict: g.verdict.clone(),
                detail: g.detail.clone(),
            })
            .collect(),
        plan: Some(plan_to_wire(&r.plan)),
        revert_plan: r.revert.as_ref().map(|(_, p)| plan_to_wire(p)),
        reverting: r.revert.is_some(),
        error: r.error.clone().unwrap_or_default(),
        events: r.events.iter().map(|e| pb::RolloutEvent { at_unix_ms: e.at_unix_ms, text: e.text.clone() }).collect(),
        started_unix_ms: r.started_unix_ms,
        finished_unix_ms: r.finished_unix_ms.unwrap_or_default(),
        started_by: r.started_by.clone(),
        trigger: r.trigger.clone(),
        commands,
    }
}

fn history_to_wire(dep: &Deployment, rollouts: &[Rollout]) -> pb::GetDeploymentHistoryResponse {
    pb::GetDeploymentHistoryResponse {
        name: dep.name.clone(),
        active_revision: dep.active.unwrap_or_default(),
        revisions: dep
            .revisions
            .iter()
            .map(|r| pb::RevisionInfo {
                number: r.number,
                applied_unix_ms: r.applied_unix_ms,
                applied_by: r.applied_by.clone(),
                outcome: match r.outcome {
                    Some(crate::rollout::model::RevisionOutcome::Stable) => "stable".into(),
                    Some(crate::rollout::model::RevisionOutcome::Failed) => "failed".into(),
                    None => String::new(),
                },
                image: r.spec.runtime.image.clone(),
                model: r.spec.model.name.clone(),
                model_revision: r.spec.model.revision.clone().unwrap_or_default(),
                spec_yaml: r.spec_yaml.clone(),
            })
            .collect(),
        rollouts: rollouts.iter().map(rollout_to_wire).collect(),
    }
}
