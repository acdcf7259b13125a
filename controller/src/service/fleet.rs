//! `flotilla.v1.Fleet`: the operator API. Everything flotctl does goes through here.

use std::collections::BTreeSet;
use std::pin::Pin;

use flotilla_common::NodeId;
use flotilla_common::model::{GpuSourceKind, NodeState, SimFault};
use flotilla_proto::pb;
use flotilla_proto::pb::fleet_server::Fleet;
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

mod alerts;
mod approvals;
mod backup;
mod capacity;
mod deploy;
mod nodes;
mod ops;
mod tokens;

pub use approvals::recover as recover_approvals;

use super::{Context, blocking};
use crate::query::{QueryError, RangeQuery, SeriesPoints};
use crate::registry::{Downlink, node_state, unix_ms_at};
use crate::store::NodeRecord;
use crate::watch::{Event, Update, Watcher};

/// The chunks of a backup as they are produced.
pub type CreateBackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

type Outbound<T> = mpsc::Sender<Result<T, Status>>;

/// The Fleet implementation.
#[derive(Debug, Clone)]
pub struct FleetApi {
    ctx: Context,
}

impl FleetApi {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }

    /// Builds the wire view of a node: stored record + live session + latest batch.
    fn view(&self, record: NodeRecord, latest: Option<flotilla_common::model::TelemetryBatch>) -> pb::Node {
        let session = self.ctx.registry.session(&record.id);
        let (state, reason) = match self.ctx.registry.revocation(&record.id) {
            Some(revoked) => (NodeState::Revoked, revoked.to_string()),
            None => {
                node_state(session.as_ref(), latest.as_ref(), Instant::now(), self.ctx.config.agents.missed_heartbeats)
            }
        };
        let last_seen = session.as_ref().map_or(record.last_seen_unix_ms, |s| unix_ms_at(s.last_heard));
        let mut inventory = pb::Inventory::from(record.inventory);
        inventory.containers = self.ctx.view.containers(&record.id).map(Into::into);
        pb::Node {
            id: record.id.to_string(),
            state: pb::NodeState::from(state).into(),
            state_reason: reason,
            inventory: Some(inventory),
            first_seen_unix_ms: record.first_seen_unix_ms,
            last_seen_unix_ms: last_seen,
            latest: latest.map(Into::into),
            peer_addr: session.and_then(|s| s.peer).map(|p| p.to_string()).unwrap_or_default(),
        }
    }
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        alerts::list_alerts(&self.ctx, request).await
    }

    async fn ack_alert(&self, request: Request<pb::AckAlertRequest>) -> Result<Response<pb::AckAlertResponse>, Status> {
        alerts::ack_alert(&self.ctx, request).await
    }

    async fn create_silence(
        &self,
        request: Request<pb::CreateSilenceRequest>,
    ) -> Result<Response<pb::CreateSilenceResponse>, Status> {
        alerts::create_silence(&self.ctx, request).await
    }

    async fn expire_silence(
        &self,
        request: Request<pb::ExpireSilenceRequest>,
    ) -> Result<Response<pb::ExpireSilenceResponse>, Status> {
        alerts::expire_silence(&self.ctx, request).await
    }

    async fn list_silences(
        &self,
        request: Request<pb::ListSilencesRequest>,
    ) -> Result<Response<pb::ListSilencesResponse>, Status> {
        alerts::list_silences(&self.ctx, request).await
    }

    async fn list_rules(
        &self,
        request: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        alerts::list_rules(&self.ctx, request).await
    }

    async fn reload_rules(
        &self,
        request: Request<pb::ReloadRulesRequest>,
    ) -> Result<Response<pb::ReloadRulesResponse>, Status> {
        alerts::reload_rules(&self.ctx, request).await
    }

    async fn list_alert_history(
        &self,
        request: Request<pb::ListAlertHistoryRequest>,
    ) -> Result<Response<pb::ListAlertHistoryResponse>, Status> {
        alerts::list_alert_history(&self.ctx, request).await
    }

    async fn check_rules(
        &self,
        request: Request<pb::CheckRulesRequest>,
    ) -> Result<Response<pb::CheckRulesResponse>, Status> {
        alerts::check_rules(&self.ctx, request).await
    }

    async fn apply_deployment(
        &self,
        request: Request<pb::ApplyDeploymentRequest>,
    ) -> Result<Response<pb::ApplyDeploymentResponse>, Status> {
        deploy::apply(&self.ctx, request).await
    }

    async fn list_deployments(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        deploy::list(&self.ctx, request).await
    }

    async fn get_deployment_history(
        &self,
        request: Request<pb::GetDeploymentHistoryRequest>,
    ) -> Result<Response<pb::GetDeploymentHistoryResponse>, Status> {
        deploy::history(&self.ctx, request).await
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        deploy::get(&self.ctx, request).await
    }

    async fn capacity_report(
        &self,
        request: Request<pb::CapacityReportRequest>,
    ) -> Result<Response<pb::CapacityReportResponse>, Status> {
        capacity::report(&self.ctx, request).await
    }

    async fn diagnose(&self, request: Request<pb::DiagnoseRequest>) -> Result<Response<pb::DiagnoseResponse>, Status> {
        capacity::diagnose(&self.ctx, request).await
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        tokens::create_token(&self.ctx, request).await
    }

    async fn list_join_tokens(
        &self,
        request: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        tokens::list_tokens(&self.ctx, request).await
    }

    async fn revoke_join_token(
        &self,
        request: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
        tokens::revoke_token(&self.ctx, request).await
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        nodes::revoke(&self.ctx, request).await
    }

    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        approvals::list(&self.ctx, request).await
    }

    async fn get_approval(&self, request: Request<pb::GetApprovalRequest>) -> Result<Response<pb::Approval>, Status> {
        approvals::get(&self.ctx, request).await
    }

    async fn decide_approval(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        approvals::decide_call(&self.ctx, request).await
    }

    async fn get_version(
        &self,
        _request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        Ok(Response::new(pb::GetVersionResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: flotilla_proto::PROTOCOL_VERSION,
            store_schema: crate::store::SCHEMA_VERSION,
            started_unix_ms: self.ctx.started_unix_ms,
        }))
    }

    type CreateBackupStream = CreateBackupStream;

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<Self::CreateBackupStream>, Status> {
        backup::create(&self.ctx, request).await
    }

    async fn operate_rollout(
        &self,
        request: Request<pb::OperateRolloutRequest>,
    ) -> Result<Response<pb::OperateRolloutResponse>, Status> {
        deploy::operate(&self.ctx, request).await
    }
    async fn exec_command(
        &self,
        request: Request<pb::ExecCommandRequest>,
    ) -> Result<Response<pb::ExecCommandResponse>, Status> {
        ops::exec(&self.ctx, request).await
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        ops::list_audit(&self.ctx, request).await
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        ops::verify_audit(&self.ctx, request).await
    }

    type WatchTelemetryStream = Pin<Box<dyn Stream<Item = Result<pb::WatchTelemetryResponse, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(caller))]
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let (caller, _role) = crate::auth::require_operator(&request)?;
        tracing::Span::current().record("caller", caller.as_str());
        let store = self.ctx.store.clone();
        let records = blocking("listing nodes", move || store.nodes()).await?;
        // Each node's newest batch comes from the in-memory view, not a store read per node.
        let nodes = records
            .into_iter()
            .map(|r| {
                let latest = self.ctx.view.latest(&r.id);
                self.view(r, latest)
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    #[tracing::instrument(skip_all, fields(caller))]
    async fn get_node(&self, request: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let (caller, _role) = crate::auth::require_operator(&request)?;
        tracing::Span::current().record("caller", caller.as_str());
        let raw = request.into_inner().node_id;
        let id = NodeId::new(raw.clone()).map_err(|e| Status::invalid_argument(format!("node id {raw:?}: {e}")))?;
        let store = self.ctx.store.clone();
        let lookup = id.clone();
        let found = blocking("reading node", move || {
            let Some(record) = store.node(&lookup)? else {
                return Ok(None);
            };
            let latest = store.latest_batch(&lookup)?;
            Ok(Some((record, latest)))
        })
        .await?;
        let (record, latest) = found
            .ok_or_else(|| Status::not_found(format!("no node {id}; `flotctl nodes ls` lists the known nodes")))?;
        Ok(Response::new(self.view(record, latest)))
    }

    #[tracing::instrument(skip_all, fields(caller))]
    async fn inject_fault(
        &self,
        request: Request<pb::InjectFaultRequest>,
    ) -> Result<Response<pb::InjectFaultResponse>, Status> {
        let actor = ops::actor_for_action(&request)?;
        tracing::Span::current().record("caller", actor.as_str());
        let req = request.into_inner();
        let id = NodeId::new(req.node_id.clone())
            .map_err(|e| Status::invalid_argument(format!("node id {:?}: {e}", req.node_id)))?;
        let fault: SimFault = req.fault.parse().map_err(Status::invalid_argument)?;
        let store = self.ctx.store.clone();
        let lookup = id.clone();
        let record = blocking("reading node", move || store.node(&lookup))
            .await?
            .ok_or_else(|| Status::not_found(format!("no node {id}; `flotctl nodes ls` lists the known nodes")))?;
        if record.inventory.gpu_source != GpuSourceKind::Simulated {
            return Err(Status::failed_precondition(format!(
                "node {id} reports {} GPUs; faults can only be injected into simulated GPUs",
                record.inventory.gpu_source.as_str()
            )));
        }
        if let Some(gpu) = req.gpu
            && !record.inventory.gpus.iter().any(|g| g.index == gpu)
        {
            return Err(Status::invalid_argument(format!(
                "node {id} has no GPU {gpu} ({} GPUs)",
                record.inventory.gpus.len()
            )));
        }
        let session = self
            .ctx
            .registry
            .session(&id)
            .ok_or_else(|| Status::failed_precondition(format!("node {id} is not connected")))?;
        let detail = serde_json::json!({ "fault": fault.to_string(), "gpu": req.gpu });
        ops::audit(&self.ctx, &actor, "sim.inject", id.as_str(), detail).await?;
        session
            .downlink
            .try_send(Downlink::InjectFault { fault, gpu: req.gpu })
            .map_err(|_| Status::unavailable(format!("node {id}'s stream is busy or closing; retry")))?;
        let target = req.gpu.map_or_else(|| "every GPU".to_owned(), |g| format!("GPU {g}"));
        tracing::info!(node_id = %id, %fault, %target, "fault injection sent");
        Ok(Response::new(pb::InjectFaultResponse { message: format!("{fault} sent to {target} of {id}") }))
    }

    #[tracing::instrument(skip_all, fields(caller, selector))]
    async fn query_metrics(
        &self,
        request: Request<pb::QueryMetricsRequest>,
    ) -> Result<Response<pb::QueryMetricsResponse>, Status> {
        let (caller, _role) = crate::auth::require_operator(&request)?;
        tracing::Span::current().record("caller", caller.as_str());
        let req = request.into_inner();
        tracing::Span::current().record("selector", req.selector.as_str());
        let now = flotilla_common::time::now_unix_ms();
        let query = RangeQuery::new(&req.selector, req.start_unix_ms, req.end_unix_ms, req.step_ms, now)?;
        let retention = i64::try_from(self.ctx.config.telemetry.retention.as_millis()).unwrap_or(i64::MAX);
        let raw_from = now.saturating_sub(retention);
        let store = self.ctx.store.clone();
        let answered = tokio::task::spawn_blocking(move || crate::query::run(store.as_ref(), &query, raw_from)).await;
        let series = answered.map_err(|error| {
            tracing::error!(%error, "query task failed");
            Status::internal("querying metrics failed; see the controller log")
        })??;
        Ok(Response::new(pb::QueryMetricsResponse { series: series.into_iter().map(series_to_wire).collect() }))
    }

    #[tracing::instrument(skip_all, fields(caller))]
    async fn watch_telemetry(
        &self,
        request: Request<pb::WatchTelemetryRequest>,
    ) -> Result<Response<Self::WatchTelemetryStream>, Status> {
        let (caller, _role) = crate::auth::require_operator(&request)?;
        tracing::Span::current().record("caller", caller.as_str());
        let nodes = request
            .into_inner()
            .node_ids
            .into_iter()
            .map(|raw| NodeId::new(raw.clone()).map_err(|e| Status::invalid_argument(format!("node id {raw:?}: {e}"))))
            .collect::<Result<BTreeSet<_>, _>>()?;
        // Subscribe before reading what is known, so that nothing falls in between.
        let mut watcher = self.ctx.feed.watch(nodes);
        watcher.prime(self.ctx.view.snapshot().into_iter().filter_map(|(node, n)| {
            n.latest.map(|batch| Update { node, batch: std::sync::Arc::unwrap_or_clone(batch) })
        }));
        let (tx, rx) = mpsc::channel(16);
        self.ctx.tracker.spawn(forward(watcher, tx, self.ctx.shutdown.clone()).instrument(tracing::Span::current()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        match error {
            QueryError::Store(error) => {
                tracing::error!(%error, "store error while querying metrics");
                Status::internal("querying metrics failed; see the controller log")
            }
            other => Status::invalid_argument(other.to_string()),
        }
    }
}

fn series_to_wire(s: SeriesPoints) -> pb::MetricSeries {
    pb::MetricSeries {
        name: s.series.name,
        labels: s.series.labels.into_iter().collect(),
        points: s.points.into_iter().map(|(unix_ms, value)| pb::MetricPoint { unix_ms, value }).collect(),
    }
}

/// Sends a watcher's events down its stream until the caller goes away or the
/// controller stops. A slow caller makes this task wait, never the committer:
/// the feed drops updates for it and the next event says how many.
async fn forward(mut watcher: Watcher, tx: Outbound<pb::WatchTelemetryResponse>, shutdown: CancellationToken) {
    use pb::watch_telemetry_response::Event as Wire;
    loop {
        let event = tokio::select! {
            event = watcher.next() => event,
            () = tx.closed() => return,
            () = shutdown.cancelled() => break,
        };
        let wire = match event {
            Some(Event::Update(u)) => {
                Wire::Telemetry(pb::NodeTelemetry { node_id: u.node.to_string(), batch: Some(u.batch.clone().into()) })
            }
            Some(Event::Missed(n)) => {
                tracing::debug!(missed = n, "telemetry watcher fell behind");
                Wire::MissedUpdates(n)
            }
            None => break,
        };
        tokio::select! {
            sent = tx.send(Ok(pb::WatchTelemetryResponse { event: Some(wire) })) => if sent.is_err() { return },
            () = shutdown.cancelled() => break,
        }
    }
    let _ = tx.try_send(Err(Status::unavailable("controller shutting down")));
}
