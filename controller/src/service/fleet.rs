//! `flotilla.v1.Fleet`: the operator API. Everything flotctl does goes through here.

use flotilla_common::NodeId;
use flotilla_common::model::{GpuSourceKind, SimFault};
use flotilla_proto::pb;
use flotilla_proto::pb::fleet_server::Fleet;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{Context, blocking};
use crate::registry::{Downlink, node_state, unix_ms_at};
use crate::store::NodeRecord;

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
        let (state, reason) =
            node_state(session.as_ref(), latest.as_ref(), Instant::now(), self.ctx.config.agents.missed_heartbeats);
        let last_seen = session.as_ref().map_or(record.last_seen_unix_ms, |s| unix_ms_at(s.last_heard));
        pb::Node {
            id: record.id.to_string(),
            state: pb::NodeState::from(state).into(),
            state_reason: reason,
            inventory: Some(record.inventory.into()),
            first_seen_unix_ms: record.first_seen_unix_ms,
            last_seen_unix_ms: last_seen,
            latest: latest.map(Into::into),
            peer_addr: session.and_then(|s| s.peer).map(|p| p.to_string()).unwrap_or_default(),
        }
    }
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    #[tracing::instrument(skip_all, fields(caller))]
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let (caller, _role) = crate::auth::require_operator(&request)?;
        tracing::Span::current().record("caller", caller.as_str());
        let store = self.ctx.store.clone();
        let rows = blocking("listing nodes", move || {
            store
                .nodes()?
                .into_iter()
                .map(|r| {
                    let latest = store.latest_batch(&r.id)?;
                    Ok((r, latest))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let nodes = rows.into_iter().map(|(r, latest)| self.view(r, latest)).collect();
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
        let (caller, _role) = crate::auth::require_operator(&request)?;
        tracing::Span::current().record("caller", caller.as_str());
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
        session
            .downlink
            .try_send(Downlink::InjectFault { fault, gpu: req.gpu })
            .map_err(|_| Status::unavailable(format!("node {id}'s stream is busy or closing; retry")))?;
        let target = req.gpu.map_or_else(|| "every GPU".to_owned(), |g| format!("GPU {g}"));
        tracing::info!(node_id = %id, %fault, %target, "fault injection sent");
        Ok(Response::new(pb::InjectFaultResponse { message: format!("{fault} sent to {target} of {id}") }))
    }
}
