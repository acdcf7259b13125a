//! `flotilla.v1.AgentService`: one bidirectional stream per agent. The hello is
//! checked against the certificate, then each message goes through small
//! handlers (liveness, telemetry) and durable batches are acknowledged.

use std::pin::Pin;
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::model::{ContainerReport, Inventory, TelemetryBatch};
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb::agent_message::Body as Up;
use flotilla_proto::pb::agent_service_server::AgentService;
use flotilla_proto::pb::controller_message::Body as Down;
use flotilla_proto::{Limits, PROTOCOL_VERSION, pb};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{Context, blocking};
use crate::ingest::Job;
use crate::registry::{Downlink, Session};
use crate::store::{NodeRecord, StoreError};

/// The AgentService implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    ctx: Context,
}

impl AgentApi {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

type Outbound = mpsc::Sender<Result<pb::ControllerMessage, Status>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(node_id, peer))]
    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = request.remote_addr();
        let cert_node = crate::auth::require_node(&request)?;
        tracing::Span::current().record("node_id", tracing::field::display(&cert_node));
        tracing::Span::current().record("peer", tracing::field::debug(&peer));
        if let Some(revoked) = self.ctx.registry.revocation(&cert_node) {
            return Err(refuse_revoked(&revoked));
        }
        let cert_serial = crate::auth::certificate_serial(&request);
        let mut inbound = request.into_inner();

        let hello = read_hello(&mut inbound, self.ctx.config.agents.hello_timeout).await?;
        let (inventory, containers, interval) = check_hello(&self.ctx, &cert_node, hello)?;

        // Save the inventory durably before welcoming the agent. While the
        // store takes no writes (disk full), a node it already knows is welcomed
        // anyway with its new inventory in memory only: its batches are not
        // acknowledged until writes resume, but it is not called down meanwhile
        // (the record is saved on its next connection). A new node waits.
        let store = self.ctx.store.clone();
        let id = cert_node.clone();
        let (record, last_seq) = blocking("saving node inventory", move || {
            let now = now_unix_ms();
            let known = store.node(&id)?;
            let first_seen = known.as_ref().map_or(now, |r| r.first_seen_unix_ms);
            let record =
                NodeRecord { id: id.clone(), inventory, first_seen_unix_ms: first_seen, last_seen_unix_ms: now };
            match store.commit_node(&record) {
                Ok(()) => {}
                Err(error @ (StoreError::DiskFull { .. } | StoreError::Reopening { .. })) if known.is_some() => {
                    tracing::warn!(%error, "welcoming a known node without saving its inventory");
                }
                Err(error) => return Err(error),
            }
            let last_seq = store.latest_batch(&id)?.map_or(0, |b| b.seq);
            Ok((record, last_seq))
        })
        .await?;

        let (down_tx, down_rx) = mpsc::channel(64);
        self.ctx.view.set_inventory(&cert_node, record.inventory.clone());
        self.ctx.view.set_containers(&cert_node, containers);
        // Checked again here, atomically with registering: a revocation may have come meanwhile.
        let session = self
            .ctx
            .registry
            .open(&cert_node, peer, cert_serial, interval, &self.ctx.shutdown, down_tx)
            .map_err(|revoked| refuse_revoked(&revoked))?;
        let (out_tx, out_rx) = mpsc::channel(64);
        let welcome = pb::ControllerMessage {
            body: Some(Down::Welcome(pb::Welcome {
                protocol_version: PROTOCOL_VERSION,
                controller_version: env!("CARGO_PKG_VERSION").to_owned(),
                last_stored_seq: last_seq,
                max_batch_gpus: Limits::DEFAULT.max_gpus as u32,
                max_batch_samples: Limits::DEFAULT.max_samples as u32,
            })),
        };
        out_tx.send(Ok(welcome)).await.map_err(|_| Status::unavailable("stream closed before welcome"))?;
        tracing::info!(
            gpus = record.inventory.gpus.len(),
            hostname = %record.inventory.hostname,
            heartbeat_ms = interval.as_millis() as u64,
            last_stored_seq = last_seq,
            "agent connected"
        );

        let stream = StreamSession {
            ctx: self.ctx.clone(),
            node: cert_node,
            session,
            out: out_tx,
            last_seq: 0,
            clock: crate::clock::ClockEstimate::default(),
            reading: None,
        };
        self.ctx.tracker.spawn(stream.run(inbound, down_rx).instrument(tracing::Span::current()));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

async fn read_hello(inbound: &mut Streaming<pb::AgentMessage>, timeout: Duration) -> Result<pb::Hello, Status> {
    let first = tokio::time::timeout(timeout, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded(format!("no hello within {}s", timeout.as_secs())))?
        .map_err(|s| {
            tracing::warn!(error = %s, "agent stream failed before hello");
            s
        })?;
    match first.and_then(|m| m.body) {
        Some(Up::Hello(hello)) => Ok(hello),
        Some(_) => Err(Status::failed_precondition("the first message on the stream must be a hello")),
        None => Err(Status::cancelled("stream ended before hello")),
    }
}

/// Validates the hello against the certificate and the policy.
fn check_hello(
    ctx: &Context,
    cert_node: &NodeId,
    hello: pb::Hello,
) -> Result<(Inventory, Option<ContainerReport>, Duration), Status> {
    if hello.protocol_version != PROTOCOL_VERSION {
        tracing::warn!(version = hello.protocol_version, "refused agent: unsupported protocol version");
        return Err(Status::failed_precondition(format!(
            "protocol version {} is not supported; this controller speaks {PROTOCOL_VERSION}",
            hello.protocol_version
        )));
    }
    if hello.node_id != cert_node.as_str() {
        tracing::warn!(claimed = %hello.node_id, "refused agent: it claims another node's id than its certificate names");
        return Err(Status::permission_denied(format!(
            "hello claims node {:?} but the client certificate names node {cert_node:?}; a node's id is its certificate identity",
            hello.node_id
        )));
    }
    let mut inventory = hello.inventory.ok_or_else(|| Status::invalid_argument("hello carries no inventory"))?;
    let containers =
        inventory.containers.take().map(ContainerReport::try_from).transpose().map_err(|e| invalid(cert_node, &e))?;
    let inventory = Inventory::try_from(inventory).map_err(|e| invalid(cert_node, &e))?;
    let policy = &ctx.config.agents;
    let interval = Duration::from_millis(u64::from(hello.heartbeat_interval_ms));
    if interval < policy.min_heartbeat_interval || interval > policy.max_heartbeat_interval {
        return Err(Status::invalid_argument(format!(
            "heartbeat_interval_ms {} is outside {}..={} ms",
            hello.heartbeat_interval_ms,
            policy.min_heartbeat_interval.as_millis(),
            policy.max_heartbeat_interval.as_millis()
        )));
    }
    Ok((inventory, containers, interval))
}

/// The refusal a revoked node gets, logged with the same words.
fn refuse_revoked(revoked: &crate::registry::Revocation) -> Status {
    tracing::warn!(reason = %revoked, "refused a revoked node");
    Status::permission_denied(revoked.to_string())
}

fn to_wire(down: Downlink) -> pb::ControllerMessage {
    let body = match down {
        Downlink::InjectFault { fault, gpu } => Down::SimInject(pb::SimInject { fault: fault.to_string(), gpu }),
        Downlink::Command(signed) => {
            Down::Command(pb::SignedCommand { envelope: signed.bytes, signature: signed.signature })
        }
    };
    pb::ControllerMessage { body: Some(body) }
}

fn invalid(node: &NodeId, error: &flotilla_proto::WireError) -> Status {
    tracing::warn!(node_id = %node, %error, "refused malformed message from agent");
    Status::invalid_argument(format!("malformed message: {error}"))
}

/// One live stream after the hello.
struct StreamSession {
    ctx: Context,
    node: NodeId,
    session: Session,
    out: Outbound,
    /// The highest seq seen on this stream: seqs must increase within a stream.
    last_seq: u64,
    /// The agent's clock, from the send times of its heartbeats.
    clock: crate::clock::ClockEstimate,
    reading: Option<crate::clock::ClockReading>,
}

impl StreamSession {
    async fn run(mut self, mut inbound: Streaming<pb::AgentMessage>, mut downlink: mpsc::Receiver<Downlink>) {
        let (ack_tx, mut ack_rx) = mpsc::channel::<Vec<u64>>(1024);
        let cancel = self.session.cancel.clone();
        let end: Result<(), Status> = loop {
            tokio::select! {
                () = cancel.cancelled() => break Err(self.cancel_reason()),
                Some(down) = downlink.recv() => {
                    if self.out.send(Ok(to_wire(down))).await.is_err() {
                        break Ok(());
                    }
                }
                Some(seqs) = ack_rx.recv() => {
                    let ack = pb::ControllerMessage { body: Some(Down::Ack(pb::Ack { seqs })) };
                    if self.out.send(Ok(ack)).await.is_err() {
                        break Ok(());
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => {
                        if let Err(status) = self.handle(msg, &ack_tx).await {
                            break Err(status);
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(status) => {
                        // Decode failures (too large, malformed protobuf) are the
                        // agent's fault: say so on the stream. Anything else is the
                        // connection going away.
                        use tonic::Code;
                        if matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted | Code::Internal | Code::InvalidArgument) {
                            break Err(status);
                        }
                        tracing::info!(error = %status, "agent stream broke");
                        break Ok(());
                    }
                },
            }
        };
        if let Err(status) = end {
            if self.ctx.shutdown.is_cancelled() {
                tracing::debug!("closing agent stream: controller shutting down");
            } else {
                tracing::warn!(error = %status, "closing agent stream");
            }
            let _ = self.out.try_send(Err(status));
        }
        self.finish().await;
    }

    fn cancel_reason(&self) -> Status {
        if self.ctx.shutdown.is_cancelled() {
            Status::unavailable("controller shutting down")
        } else if let Some(revoked) = self.ctx.registry.revocation(&self.node) {
            Status::permission_denied(revoked.to_string())
        } else if self.ctx.registry.session(&self.node).is_some_and(|s| s.id != self.session.id) {
            Status::aborted("replaced by a newer stream from the same node")
        } else {
            Status::deadline_exceeded("no heartbeat within the allowed window")
        }
    }

    /// The handler chain: liveness first, then the message's own handler.
    async fn handle(&mut self, msg: pb::AgentMessage, acks: &mpsc::Sender<Vec<u64>>) -> Result<(), Status> {
        self.ctx.registry.touch(&self.node, self.session.id);
        match msg.body {
            Some(Up::Heartbeat(hb)) => {
                self.on_heartbeat(&hb);
                Ok(())
            }
            Some(Up::Telemetry(batch)) => self.on_telemetry(batch, acks).await,
            Some(Up::Hello(_)) => Err(Status::failed_precondition("hello may be sent only once per stream")),
            Some(Up::CommandResult(result)) => {
                self.on_command_result(result);
                Ok(())
            }
            Some(Up::Containers(report)) => {
                let report = ContainerReport::try_from(report).map_err(|e| invalid(&self.node, &e))?;
                tracing::debug!(containers = report.containers.len(), "agent reported its containers");
                self.ctx.view.set_containers(&self.node, Some(report));
                Ok(())
            }
            Some(Up::Renew(request)) => {
                // Answered on this stream, which goes on: no telemetry waits for a reconnect.
                let answer = super::enroll::renew(&self.ctx, &self.node, request).await;
                let msg = pb::ControllerMessage { body: Some(Down::Renewed(answer)) };
                self.out.send(Ok(msg)).await.map_err(|_| Status::cancelled("agent stream closed"))
            }
            None => Err(Status::invalid_argument("empty agent message")),
        }
    }

    /// Measures the agent's clock (the agent sends a heartbeat first on every
    /// stream, so batches find a reading) and logs when it crosses the limit.
    fn on_heartbeat(&mut self, hb: &pb::Heartbeat) {
        if hb.sent_unix_ms <= 0 {
            return;
        }
        let max = self.ctx.config.agents.max_clock_skew;
        let reading = self.clock.observe(hb.sent_unix_ms, now_unix_ms(), max);
        let was = self.reading.is_some_and(|r| r.skewed);
        if reading.skewed != was {
            if reading.skewed {
                tracing::warn!(
                    offset_ms = reading.offset_ms,
                    max_ms = max.as_millis() as u64,
                    "agent clock skewed; node degraded, its batches stored at controller time"
                );
            } else if self.reading.is_some() {
                tracing::info!(offset_ms = reading.offset_ms, "agent clock back within the allowed skew");
            }
        }
        // The registry (one lock for every stream) hears of changes that show.
        let shows =
            self.reading.is_none_or(|r| r.skewed != reading.skewed || (r.offset_ms - reading.offset_ms).abs() >= 100);
        self.reading = Some(reading);
        if shows {
            self.ctx.registry.set_clock(&self.node, self.session.id, reading);
        }
    }

    fn on_command_result(&self, r: pb::CommandResult) {
        use flotilla_common::command::CommandStatus;
        let Some(id) = flotilla_common::envelope::CommandId::from_slice(&r.command_id) else {
            tracing::warn!("ignoring a command result without a valid id");
            return;
        };
        let status = match pb::CommandStatus::try_from(r.status) {
            Ok(pb::CommandStatus::Succeeded) => CommandStatus::Succeeded,
            Ok(pb::CommandStatus::Refused) => CommandStatus::Refused,
            _ => CommandStatus::Failed,
        };
        // Bound what an agent can make the controller hold.
        let detail: String = r.detail.chars().take(4096).collect();
        let output_json = if r.output_json.len() > 1024 * 1024 { "{}".to_owned() } else { r.output_json };
        if status == CommandStatus::Refused {
            tracing::warn!(command_id = %id, %detail, "agent refused a command");
        }
        let reply = crate::commands::CommandReply { status, detail, output_json };
        if !self.ctx.commands.complete(&self.node, id, reply) {
            tracing::debug!(command_id = %id, "result for a command nobody waits for");
        }
    }

    async fn on_telemetry(&mut self, wire: pb::TelemetryBatch, acks: &mpsc::Sender<Vec<u64>>) -> Result<(), Status> {
        let mut batch = TelemetryBatch::try_from(wire).map_err(|e| invalid(&self.node, &e))?;
        if batch.seq <= self.last_seq {
            tracing::warn!(seq = batch.seq, last = self.last_seq, "refused out-of-order batch");
            return Err(Status::invalid_argument(format!(
                "batch seq {} after {} on the same stream: seqs must increase",
                batch.seq, self.last_seq
            )));
        }
        self.last_seq = batch.seq;
        if let Some(reading) = self.reading {
            reading.apply(&mut batch);
        }
        let job = Job { node: self.node.clone(), batch, stream: self.session.id, acks: acks.clone() };
        let shutting_down = |_| Status::unavailable("controller shutting down");
        let job = match self.ctx.committer.try_submit(job) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(job)) => job,
            Err(mpsc::error::TrySendError::Closed(job)) => return Err(shutting_down(job)),
        };
        // The commit queue is full: until it has room this stream reads nothing,
        // heartbeats included. The wait is the controller's, not the agent's
        // silence, so the session is kept alive meanwhile (else a busy controller
        // would call healthy agents down and close their streams).
        let submit = self.ctx.committer.submit(job);
        tokio::pin!(submit);
        loop {
            tokio::select! {
                done = &mut submit => return done.map_err(shutting_down),
                () = tokio::time::sleep(self.session.heartbeat_interval) => {
                    self.ctx.registry.touch(&self.node, self.session.id);
                }
            }
        }
    }

    async fn finish(self) {
        let Some(closed) = self.ctx.registry.close(&self.node, self.session.id) else {
            return; // replaced by a newer stream, which owns the record now
        };
        let last_seen = crate::registry::unix_ms_at(closed.last_heard);
        let store = self.ctx.store.clone();
        let node = self.node.clone();
        let saved = blocking("saving last seen", move || store.save_last_seen(&node, last_seen)).await;
        if saved.is_ok() {
            tracing::info!("agent disconnected");
        }
    }
}
