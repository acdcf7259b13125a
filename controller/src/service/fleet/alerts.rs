//! The Fleet methods for alerts, silences and rules. Reads need any operator
//! certificate; acks, silences and reloads need the operator or admin role and
//! are written to the audit log first.

use std::time::Duration;

use flotilla_proto::pb;
use tonic::{Request, Response, Status};

use super::ops::{actor_for_action, audit};
use crate::alert::engine::{AlertError, AlertView, RuleView};
use crate::alert::state::{AlertState, Silence};
use crate::service::Context;

impl From<AlertError> for Status {
    fn from(error: AlertError) -> Self {
        match error {
            AlertError::NoSuchAlert(_) | AlertError::NoSuchSilence(_) => Status::not_found(error.to_string()),
            AlertError::BadRequest(_) | AlertError::Rules(_) => Status::invalid_argument(error.to_string()),
            AlertError::NoRuleFile => Status::failed_precondition(error.to_string()),
            AlertError::Store(_) | AlertError::Task(_) => {
                tracing::error!(%error, "alert store error");
                Status::internal("the alert store failed; see the controller log")
            }
        }
    }
}

fn state_to_wire(s: AlertState) -> pb::AlertState {
    match s {
        AlertState::Pending => pb::AlertState::Pending,
        AlertState::Firing => pb::AlertState::Firing,
        AlertState::Resolved => pb::AlertState::Resolved,
    }
}

fn alert_to_wire(v: AlertView) -> pb::Alert {
    let a = v.record;
    pb::Alert {
        id: a.id,
        name: a.name,
        state: state_to_wire(a.state).into(),
        labels: a.labels.into_iter().collect(),
        annotations: a.annotations.into_iter().collect(),
        value: a.value,
        active_since_unix_ms: a.active_since_unix_ms,
        firing_since_unix_ms: a.firing_since_unix_ms.unwrap_or(0),
        resolved_unix_ms: a.resolved_unix_ms.unwrap_or(0),
        rule: a.rule,
        ack: a.ack.map(|k| pb::Acknowledgement { by: k.by, at_unix_ms: k.at_unix_ms, comment: k.comment }),
        silenced_by: v.silenced_by,
        inhibited: v.inhibited,
        last_notified_unix_ms: a.last_notified_unix_ms.unwrap_or(0),
    }
}

fn silence_to_wire(s: Silence) -> pb::Silence {
    let active = s.active_at(flotilla_common::time::now_unix_ms());
    pb::Silence {
        id: s.id,
        matchers: s.matchers,
        starts_unix_ms: s.starts_unix_ms,
        ends_unix_ms: s.ends_unix_ms,
        created_by: s.created_by,
        comment: s.comment,
        active,
    }
}

fn rule_to_wire(r: RuleView) -> pb::RuleInfo {
    pb::RuleInfo {
        group: r.group,
        name: r.name,
        expr: r.expr,
        for_ms: i64::try_from(r.for_.as_millis()).unwrap_or(i64::MAX),
        keep_firing_for_ms: i64::try_from(r.keep_firing_for.as_millis()).unwrap_or(i64::MAX),
        labels: r.labels.into_iter().collect(),
        last_error: r.last_error.unwrap_or_default(),
        last_evaluation_unix_ms: r.last_evaluation_unix_ms,
        pending: r.pending,
        firing: r.firing,
    }
}

pub async fn list_alerts(
    ctx: &Context,
    request: Request<pb::ListAlertsRequest>,
) -> Result<Response<pb::ListAlertsResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let state = match pb::AlertState::try_from(request.get_ref().state) {
        Ok(pb::AlertState::Unspecified) => None,
        Ok(pb::AlertState::Pending) => Some(AlertState::Pending),
        Ok(pb::AlertState::Firing) => Some(AlertState::Firing),
        Ok(pb::AlertState::Resolved) => Some(AlertState::Resolved),
        Err(_) => return Err(Status::invalid_argument(format!("unknown alert state {}", request.get_ref().state))),
    };
    let alerts = ctx.alerts.alerts(state).await.into_iter().map(alert_to_wire).collect();
    Ok(Response::new(pb::ListAlertsResponse { alerts }))
}

pub async fn ack_alert(
    ctx: &Context,
    request: Request<pb::AckAlertRequest>,
) -> Result<Response<pb::AckAlertResponse>, Status> {
    let actor = actor_for_action(&request)?;
    let req = request.into_inner();
    if req.id.trim().is_empty() {
        return Err(Status::invalid_argument("give the alert id to acknowledge (see `flotctl alerts ls`)"));
    }
    audit(ctx, &actor, "alert.ack", &req.id, serde_json::json!({ "comment": req.comment })).await?;
    let view = ctx.alerts.ack(&req.id, &actor, &req.comment).await?;
    tracing::info!(alert = %req.id, by = %actor, "alert acknowledged");
    Ok(Response::new(pb::AckAlertResponse { alert: Some(alert_to_wire(view)) }))
}

pub async fn create_silence(
    ctx: &Context,
    request: Request<pb::CreateSilenceRequest>,
) -> Result<Response<pb::CreateSilenceResponse>, Status> {
    let actor = actor_for_action(&request)?;
    let req = request.into_inner();
    let ms = u64::try_from(req.duration_ms)
        .map_err(|_| Status::invalid_argument(format!("duration_ms {} is negative", req.duration_ms)))?;
    // Check before auditing, so the log records only silences that exist.
    crate::alert::state::SilenceMatcher::new(&req.matchers).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let detail = serde_json::json!({ "matchers": req.matchers, "duration_ms": ms, "comment": req.comment });
    audit(ctx, &actor, "alert.silence", &req.matchers.join(","), detail).await?;
    let (silence, ids) = ctx.alerts.silence(req.matchers, Duration::from_millis(ms), &actor, &req.comment).await?;
    tracing::info!(silence = %silence.id, by = %actor, matchers = ?silence.matchers, "silence created");
    Ok(Response::new(pb::CreateSilenceResponse { silence: Some(silence_to_wire(silence)), alert_ids: ids }))
}

pub async fn expire_silence(
    ctx: &Context,
    request: Request<pb::ExpireSilenceRequest>,
) -> Result<Response<pb::ExpireSilenceResponse>, Status> {
    let actor = actor_for_action(&request)?;
    let id = request.into_inner().id;
    audit(ctx, &actor, "alert.unsilence", &id, serde_json::json!({})).await?;
    let silence = ctx.alerts.expire_silence(&id).await?;
    tracing::info!(silence = %id, by = %actor, "silence expired");
    Ok(Response::new(pb::ExpireSilenceResponse { silence: Some(silence_to_wire(silence)) }))
}

pub async fn list_silences(
    ctx: &Context,
    request: Request<pb::ListSilencesRequest>,
) -> Result<Response<pb::ListSilencesResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let silences = ctx.alerts.silences(request.get_ref().include_expired).await;
    Ok(Response::new(pb::ListSilencesResponse { silences: silences.into_iter().map(silence_to_wire).collect() }))
}

pub async fn list_rules(
    ctx: &Context,
    request: Request<pb::ListRulesRequest>,
) -> Result<Response<pb::ListRulesResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let (source, loaded, rules) = ctx.alerts.rule_views().await;
    Ok(Response::new(pb::ListRulesResponse {
        source,
        rules: rules.into_iter().map(rule_to_wire).collect(),
        loaded_unix_ms: loaded,
    }))
}

pub async fn reload_rules(
    ctx: &Context,
    request: Request<pb::ReloadRulesRequest>,
) -> Result<Response<pb::ReloadRulesResponse>, Status> {
    let actor = actor_for_action(&request)?;
    let path = ctx.config.alerting.rules.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    audit(ctx, &actor, "rules.reload", &path, serde_json::json!({})).await?;
    let rules = match ctx.alerts.reload().await {
        Ok(rules) => rules,
        Err(error) => {
            tracing::warn!(by = %actor, %error, "rule reload refused; the running rules stay");
            return Err(match error {
                AlertError::Rules(e) => {
                    Status::invalid_argument(format!("the running rules stay as they were; the new file has:\n{e}"))
                }
                other => other.into(),
            });
        }
    };
    tracing::info!(by = %actor, rules = rules.rules().count(), "rules reloaded");
    Ok(Response::new(pb::ReloadRulesResponse {
        source: rules.source.clone(),
        groups: u32::try_from(rules.groups.len()).unwrap_or(u32::MAX),
        rules: u32::try_from(rules.rules().count()).unwrap_or(u32::MAX),
    }))
}

pub async fn check_rules(
    _ctx: &Context,
    request: Request<pb::CheckRulesRequest>,
) -> Result<Response<pb::CheckRulesResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let req = request.into_inner();
    let name = if req.file_name.is_empty() { "rules.yml".to_owned() } else { req.file_name };
    Ok(Response::new(match crate::alert::engine::check(&name, &req.content) {
        Ok(set) => pb::CheckRulesResponse {
            problems: Vec::new(),
            groups: u32::try_from(set.groups.len()).unwrap_or(u32::MAX),
            rules: u32::try_from(set.rules().count()).unwrap_or(u32::MAX),
        },
        Err(e) => {
            pb::CheckRulesResponse { problems: e.to_string().lines().map(str::to_owned).collect(), groups: 0, rules: 0 }
        }
    }))
}

pub async fn list_alert_history(
    ctx: &Context,
    request: Request<pb::ListAlertHistoryRequest>,
) -> Result<Response<pb::ListAlertHistoryResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let req = request.into_inner();
    let limit = match req.limit {
        0 => 100,
        n if n <= 10_000 => n as usize,
        n => return Err(Status::invalid_argument(format!("limit {n} is above 10000"))),
    };
    let id = (!req.alert_id.is_empty()).then_some(req.alert_id);
    let events = ctx.alerts.history(limit, id).await?;
    let state = |s: Option<AlertState>| s.map_or(pb::AlertState::Unspecified, state_to_wire).into();
    Ok(Response::new(pb::ListAlertHistoryResponse {
        events: events
            .into_iter()
            .map(|e| pb::AlertEvent {
                at_unix_ms: e.at_unix_ms,
                alert_id: e.id,
                name: e.name,
                labels: e.labels.into_iter().collect(),
                from: state(e.from),
                to: state(e.to),
                value: e.value,
                by: e.by,
            })
            .collect(),
    }))
}
