//! The link to the controller: one bidirectional stream, reconnected with
//! jittered exponential backoff. Every batch stays in `pending` until the
//! controller acknowledges it (after flushing it to disk), and is resent on the
//! next stream if the link breaks first.

use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::model::{ContainerReport, Inventory, TelemetryBatch};
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb::agent_message::Body as Up;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::controller_message::Body as Down;
use flotilla_proto::{PROTOCOL_VERSION, pb};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Endpoint;

use crate::buffer::DiskBuffer;
use crate::config::UplinkConfig;
use crate::executor::{Admission, Gate, Host, Outcome};
use crate::seq::SeqAllocator;
use flotilla_common::command::CommandStatus;
use flotilla_common::envelope::SignedEnvelope;

/// How long to wait for the controller's welcome after opening the stream.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a clean shutdown waits for the last acknowledgements.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(2);

/// The uplink's state on disk: the seq counter and the telemetry buffer with
/// what it held at start-up.
#[derive(Debug)]
pub struct Durable {
    pub seq: SeqAllocator,
    pub buffer: DiskBuffer,
    pub buffered: Vec<TelemetryBatch>,
    /// The signed-command gate (its seen ids are on disk too) and the host it acts on.
    pub gate: Gate,
    pub host: Host,
}

struct Pending {
    batch: TelemetryBatch,
    sent_at: Option<Instant>,
    /// Loaded from the disk buffer at start-up (made by an earlier run).
    from_disk: bool,
}

/// An open stream.
struct Link {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::ControllerMessage>,
}

/// Why a link ended.
#[derive(Debug)]
enum LinkEnd {
    Shutdown,
    Broken(String),
}

/// The uplink state; owned by one task.
pub struct Uplink {
    node: NodeId,
    inventory: Inventory,
    endpoint: Endpoint,
    heartbeat: Duration,
    config: UplinkConfig,
    seq: SeqAllocator,
    pending: VecDeque<Pending>,
    buffer: DiskBuffer,
    dropped: u64,
    ack_log: Option<std::fs::File>,
    welcomed_once: bool,
    /// Where `SimInject` from the controller goes (simulated GPU sources only).
    simulation: Option<crate::gpu::simulated::SimHandle>,
    /// Signed commands: verification, execution and results on their way back.
    commands: Commands,
    /// The container report last sent to the controller (kept across links,
    /// so that a runtime going away or coming back is logged once).
    reported: Option<ContainerReport>,
    /// Certificate renewal over the stream, when enabled.
    renewal: Option<crate::enroll::Renewal>,
}

/// The command path of the uplink.
struct Commands {
    gate: Gate,
    host: Host,
    results_tx: mpsc::Sender<Outcome>,
    results_rx: mpsc::Receiver<Outcome>,
    /// Results finished while the link was down, sent on the next link.
    unsent: VecDeque<Outcome>,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink").field("node", &self.node).field("pending", &self.pending.len()).finish_non_exhaustive()
    }
}

impl Uplink {
    pub fn new(
        node: NodeId,
        inventory: Inventory,
        endpoint: Endpoint,
        heartbeat: Duration,
        config: UplinkConfig,
        durable: Durable,
    ) -> Result<Self, std::io::Error> {
        let Durable { mut seq, buffer, buffered, .. } = durable;
        let ack_log = match &config.ack_log {
            Some(path) => Some(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
            None => None,
        };
        // Batches an earlier run left unacknowledged go first, with their own seqs.
        if let Some(last) = buffered.last() {
            seq.skip_past(last.seq).map_err(std::io::Error::other)?;
            tracing::info!(batches = buffered.len(), "resending telemetry buffered by an earlier run");
        }
        let skip = buffered.len().saturating_sub(config.max_pending_batches);
        let pending: VecDeque<Pending> =
            buffered.into_iter().skip(skip).map(|batch| Pending { batch, sent_at: None, from_disk: true }).collect();
        Ok(Self {
            node,
            inventory,
            endpoint,
            heartbeat,
            config,
            seq,
            pending,
            buffer,
            dropped: skip as u64,
            ack_log,
            welcomed_once: false,
            simulation: None,
            commands: {
                let (results_tx, results_rx) = mpsc::channel(64);
                Commands { gate: durable.gate, host: durable.host, results_tx, results_rx, unsent: VecDeque::new() }
            },
            reported: None,
            renewal: None,
        })
    }

    /// Lets the controller inject faults into these simulated GPUs.
    pub fn with_simulation(mut self, handle: Option<crate::gpu::simulated::SimHandle>) -> Self {
        self.simulation = handle;
        self
    }

    /// Renews the agent's certificate over the stream when it is due.
    pub fn with_renewal(mut self, renewal: crate::enroll::Renewal) -> Self {
        self.renewal = Some(renewal);
        self
    }

    /// Sends a renewal request on the live stream.
    async fn request_renewal(&mut self, link: &Link) -> Result<(), String> {
        let Some(renewal) = self.renewal.as_mut() else { return Ok(()) };
        match renewal.request() {
            Ok(csr_der) => {
                tracing::info!("certificate two thirds through its life; asking the controller to renew it");
                let msg = pb::AgentMessage { body: Some(Up::Renew(pb::RenewRequest { csr_der })) };
                self.send_msg(link, msg).await
            }
            Err(error) => {
                tracing::warn!(%error, "cannot make a renewal request; retrying later");
                Ok(())
            }
        }
    }

    /// Installs a renewed certificate: the stream goes on with the old one, the
    /// next connection uses the new one.
    fn on_renewed(&mut self, answer: &pb::RenewResponse) {
        let Some(renewal) = self.renewal.as_mut() else { return };
        match renewal.answer(&answer.certificate_pem, &answer.error) {
            crate::enroll::renew::Renewed::Done { endpoint, not_after_unix_ms } => {
                self.endpoint = *endpoint;
                tracing::info!(not_after_unix_ms, "certificate renewed; the next connection uses it");
            }
            crate::enroll::renew::Renewed::Failed(reason) => {
                tracing::warn!(%reason, "certificate renewal failed; retrying later");
            }
        }
    }

    /// Applies a `SimInject` from the controller.
    fn on_sim_inject(&self, inject: &pb::SimInject) {
        let Some(handle) = &self.simulation else {
            tracing::warn!(fault = %inject.fault, "ignoring a fault injection: this agent's GPUs are not simulated");
            return;
        };
        let outcome =
            inject.fault.parse::<flotilla_common::model::SimFault>().and_then(|fault| handle.inject(fault, inject.gpu));
        if let Err(error) = outcome {
            tracing::warn!(%error, "refused a fault injection");
        }
    }

    /// Runs until `cancel` fires, then syncs the disk buffer.
    pub async fn run(mut self, batches: mpsc::Receiver<TelemetryBatch>, cancel: CancellationToken) {
        self.run_links(batches, cancel).await;
        self.close_buffer();
    }

    async fn run_links(&mut self, mut batches: mpsc::Receiver<TelemetryBatch>, cancel: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            match self.connect().await {
                Ok(link) => {
                    failures = 0;
                    match self.serve(link, &mut batches, &cancel).await {
                        LinkEnd::Shutdown => return,
                        LinkEnd::Broken(reason) => {
                            tracing::warn!(%reason, pending = self.pending.len(), "link to controller lost; reconnecting");
                        }
                    }
                }
                Err(reason) => {
                    tracing::warn!(%reason, attempt = failures + 1, pending = self.pending.len(), "cannot reach controller");
                }
            }
            failures = failures.saturating_add(1);
            let delay = backoff(self.config.backoff_initial, self.config.backoff_max, failures);
            let deadline = Instant::now() + delay;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    Some(outcome) = self.commands.results_rx.recv() => self.commands.unsent.push_back(outcome),
                    batch = batches.recv() => match batch {
                        Some(b) => { self.enqueue(b); }
                        None => return,
                    },
                    () = cancel.cancelled() => return,
                }
            }
        }
    }

    /// Numbers a new batch and queues it; drops the oldest past the bound.
    fn enqueue(&mut self, mut batch: TelemetryBatch) -> Option<usize> {
        batch.seq = match self.seq.allocate() {
            Ok(seq) => seq,
            Err(error) => {
                tracing::error!(%error, "cannot persist the sequence counter; batch dropped");
                self.dropped += 1;
                return None;
            }
        };
        let mut dropped = Vec::new();
        if self.pending.len() >= self.config.max_pending_batches
            && let Some(oldest) = self.pending.pop_front()
        {
            dropped.push(oldest.batch.seq);
        }
        // The agent's own health rides along with the data it concerns.
        batch.samples.extend([
            agent_sample("flotilla_agent_buffer_dropped_batches_total", self.dropped as f64),
            agent_sample("flotilla_agent_buffer_pending_batches", self.pending.len() as f64),
            agent_sample("flotilla_agent_buffer_bytes", self.buffer.bytes() as f64),
        ]);
        match self.buffer.append(&batch) {
            Ok(over) => {
                self.pending.retain(|p| !over.contains(&p.batch.seq));
                dropped.extend(over);
            }
            Err(error) => {
                // Still sent from memory; only an agent restart would lose it.
                tracing::warn!(%error, seq = batch.seq, "cannot write the telemetry buffer");
            }
        }
        if !dropped.is_empty() {
            if let Err(error) = self.buffer.remove(&dropped) {
                tracing::warn!(%error, "cannot trim the telemetry buffer");
            }
            let before = self.dropped;
            self.dropped += dropped.len() as u64;
            if before == 0 || before / 100 != self.dropped / 100 {
                tracing::warn!(
                    dropped_total = self.dropped,
                    max_batches = self.config.max_pending_batches,
                    max_bytes = self.config.buffer_max_bytes,
                    "telemetry buffer full; dropping the oldest unacknowledged batches"
                );
            }
        }
        self.pending.push_back(Pending { batch, sent_at: None, from_disk: false });
        Some(self.pending.len() - 1)
    }

    async fn connect(&mut self) -> Result<Link, String> {
        let channel = self.endpoint.connect().await.map_err(|e| flotilla_common::client::describe(&e))?;
        let mut client = AgentServiceClient::new(channel)
            .max_decoding_message_size(4 * 1024 * 1024)
            .max_encoding_message_size(4 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(256);
        // Listed afresh on every connect: after a restart this is how the
        // controller learns which containers the agent re-found by label.
        let containers = crate::containers::report(
            self.commands.host.runtime.as_ref(),
            crate::containers::LIST_TIMEOUT,
            &self.commands.host.servers,
        )
        .await;
        self.note_runtime(&containers);
        let mut inventory = pb::Inventory::from(self.inventory.clone());
        inventory.containers = Some(containers.clone().into());
        self.reported = Some(containers);
        let hello = pb::AgentMessage {
            body: Some(Up::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: self.node.to_string(),
                inventory: Some(inventory),
                heartbeat_interval_ms: u32::try_from(self.heartbeat.as_millis()).unwrap_or(u32::MAX),
            })),
        };
        tx.send(hello).await.map_err(|_| "stream closed before hello".to_owned())?;
        let mut inbound = client.connect(ReceiverStream::new(rx)).await.map_err(refusal)?.into_inner();
        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
            Err(_) => return Err("no welcome from the controller in time".to_owned()),
            Ok(Err(status)) => return Err(refusal(status)),
            Ok(Ok(Some(pb::ControllerMessage { body: Some(Down::Welcome(w)) }))) => w,
            Ok(Ok(_)) => return Err("the controller's first message was not a welcome".to_owned()),
        };
        self.on_welcome(&welcome);
        tracing::info!(controller_version = %welcome.controller_version, pending = self.pending.len(), "connected to controller");
        Ok(Link { tx, inbound })
    }

    /// On the first welcome after a start without sequence state, continue above
    /// what the controller already holds, renumbering batches not yet sent.
    fn on_welcome(&mut self, welcome: &pb::Welcome) {
        if self.welcomed_once {
            return;
        }
        self.welcomed_once = true;
        if !self.seq.fresh() || welcome.last_stored_seq == 0 {
            return;
        }
        if let Err(error) = self.seq.skip_past(welcome.last_stored_seq) {
            tracing::error!(%error, "cannot persist the sequence counter");
            return;
        }
        let mut renumbered = 0;
        for p in self.pending.iter_mut() {
            // Batches from the disk buffer keep their seqs: they may be stored already.
            if !p.from_disk
                && p.batch.seq <= welcome.last_stored_seq
                && let Ok(seq) = self.seq.allocate()
            {
                p.batch.seq = seq;
                renumbered += 1;
            }
        }
        // Renumbering keeps order only if every pending seq moved; re-sort to be sure.
        self.pending.make_contiguous().sort_by_key(|p| p.batch.seq);
        tracing::warn!(
            last_stored_seq = welcome.last_stored_seq,
            renumbered,
            "sequence state was missing; continuing above the controller's last stored seq"
        );
    }

    async fn serve(
        &mut self,
        mut link: Link,
        batches: &mut mpsc::Receiver<TelemetryBatch>,
        cancel: &CancellationToken,
    ) -> LinkEnd {
        // A heartbeat first: the controller measures this agent's clock from it
        // before any batch arrives, and stores them at its time if the clock is off.
        if let Err(reason) = self.send_msg(&link, heartbeat_message()).await {
            return LinkEnd::Broken(reason);
        }
        // Resend everything not yet acknowledged, oldest first; then results
        // of commands that finished while the link was down.
        for i in 0..self.pending.len() {
            if let Err(reason) = self.send(&link, i).await {
                return LinkEnd::Broken(reason);
            }
        }
        while let Some(mut outcome) = self.commands.unsent.pop_front() {
            // Listed before this link's hello, which carried a fresher list.
            outcome.containers = None;
            if let Err(reason) = self.send_result(&link, &outcome).await {
                self.commands.unsent.push_front(outcome);
                return LinkEnd::Broken(reason);
            }
        }
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut watchdog = tokio::time::interval(self.config.ack_timeout / 4);
        // Containers change on their own too (a crash, an OOM kill, `docker stop`).
        let runtime = &self.commands.host.runtime;
        let mut relister = crate::containers::Relister::new(
            std::sync::Arc::clone(runtime),
            self.commands.host.servers.clone(),
            runtime.config().relist_interval,
            crate::containers::LIST_TIMEOUT,
        );
        loop {
            // Without renewal the arm below is disabled; the instant is never reached.
            let renew_due = self.renewal.as_ref().map(crate::enroll::Renewal::due);
            tokio::select! {
                () = cancel.cancelled() => {
                    self.drain_acks(&mut link).await;
                    return LinkEnd::Shutdown;
                }
                () = tokio::time::sleep_until(renew_due.unwrap_or_else(Instant::now)), if renew_due.is_some() => {
                    if let Err(reason) = self.request_renewal(&link).await {
                        return LinkEnd::Broken(reason);
                    }
                }
                Some(outcome) = self.commands.results_rx.recv() => {
                    if let Err(reason) = self.send_result(&link, &outcome).await {
                        self.commands.unsent.push_back(outcome);
                        return LinkEnd::Broken(reason);
                    }
                }
                batch = batches.recv() => {
                    let Some(batch) = batch else { return LinkEnd::Shutdown };
                    if let Some(i) = self.enqueue(batch)
                        && let Err(reason) = self.send(&link, i).await
                    {
                        return LinkEnd::Broken(reason);
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(reason) = self.send_msg(&link, heartbeat_message()).await {
                        return LinkEnd::Broken(reason);
                    }
                }
                msg = link.inbound.message() => match msg {
                    Ok(Some(pb::ControllerMessage { body: Some(Down::Ack(ack)) })) => self.on_ack(&ack.seqs),
                    Ok(Some(pb::ControllerMessage { body: Some(Down::SimInject(inject)) })) => self.on_sim_inject(&inject),
                    Ok(Some(pb::ControllerMessage { body: Some(Down::Renewed(answer)) })) => self.on_renewed(&answer),
                    Ok(Some(pb::ControllerMessage { body: Some(Down::Command(signed)) })) => {
                        if let Err(reason) = self.on_command(&link, signed).await {
                            return LinkEnd::Broken(reason);
                        }
                    }
                    Ok(Some(_)) => tracing::debug!("ignoring unexpected controller message"),
                    Ok(None) => return LinkEnd::Broken("controller closed the stream".to_owned()),
                    Err(status) => return LinkEnd::Broken(refusal(status)),
                },
                report = relister.next() => {
                    if let Err(reason) = self.offer_containers(&link, &report).await {
                        return LinkEnd::Broken(reason);
                    }
                }
                _ = watchdog.tick() => {
                    if let Some(sent) = self.pending.front().and_then(|p| p.sent_at)
                        && sent.elapsed() > self.config.ack_timeout
                    {
                        return LinkEnd::Broken(format!("no acknowledgement within {}s", self.config.ack_timeout.as_secs()));
                    }
                }
            }
        }
    }

    async fn send(&mut self, link: &Link, index: usize) -> Result<(), String> {
        let Some(p) = self.pending.get_mut(index) else {
            return Ok(());
        };
        p.sent_at = Some(Instant::now());
        let msg = pb::AgentMessage { body: Some(Up::Telemetry(p.batch.clone().into())) };
        self.send_msg(link, msg).await
    }

    async fn send_msg(&self, link: &Link, msg: pb::AgentMessage) -> Result<(), String> {
        match tokio::time::timeout(self.config.ack_timeout, link.tx.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("stream closed".to_owned()),
            Err(_) => Err("controller not reading the stream".to_owned()),
        }
    }

    /// Verifies a signed command; answers refusals (and resends) at once, runs the rest.
    async fn on_command(&mut self, link: &Link, signed: pb::SignedCommand) -> Result<(), String> {
        let signed = SignedEnvelope { bytes: signed.envelope, signature: signed.signature };
        match self.commands.gate.admit(&signed) {
            Admission::Answer(outcome) => {
                if outcome.status == CommandStatus::Refused {
                    tracing::warn!(reason = %outcome.detail, "refused a command; nothing was executed");
                }
                self.send_result(link, &outcome).await
            }
            Admission::Run { id, command, trace } => {
                let host = self.commands.host.clone();
                let tx = self.commands.results_tx.clone();
                // Commands run beside the stream (a drain takes minutes); results come back through the channel.
                tokio::spawn(async move {
                    let outcome = crate::executor::execute(&host, id, command, trace).await;
                    let _ = tx.send(outcome).await;
                });
                Ok(())
            }
        }
    }

    /// Sends `report` if it says something new since the one last sent on
    /// this stream (see [`crate::containers::is_news`]).
    async fn offer_containers(&mut self, link: &Link, report: &ContainerReport) -> Result<(), String> {
        if !crate::containers::is_news(self.reported.as_ref(), report) {
            return Ok(());
        }
        self.note_runtime(report);
        self.reported = Some(report.clone());
        let msg = pb::AgentMessage { body: Some(Up::Containers(report.clone().into())) };
        self.send_msg(link, msg).await
    }

    /// Logs the container runtime going away or coming back, once each time.
    fn note_runtime(&self, report: &ContainerReport) {
        let before = self.reported.as_ref().map(|r| r.runtime_error.is_some());
        match (&report.runtime_error, before) {
            (Some(error), None | Some(false)) => {
                tracing::info!(%error, "container runtime unavailable; reporting no containers");
            }
            (None, Some(true)) => {
                tracing::info!(containers = report.containers.len(), "container runtime reachable again");
            }
            _ => {}
        }
    }

    async fn send_result(&mut self, link: &Link, outcome: &Outcome) -> Result<(), String> {
        // The containers first: the controller holds them by the time the
        // operator gets the result.
        if let Some(report) = &outcome.containers {
            self.offer_containers(link, report).await?;
        }
        self.commands.gate.finish(outcome);
        let status = match outcome.status {
            CommandStatus::Succeeded => pb::CommandStatus::Succeeded,
            CommandStatus::Failed => pb::CommandStatus::Failed,
            CommandStatus::Refused => pb::CommandStatus::Refused,
        };
        let msg = pb::AgentMessage {
            body: Some(Up::CommandResult(pb::CommandResult {
                command_id: outcome.id.map(|id| id.as_bytes().to_vec()).unwrap_or_default(),
                status: status.into(),
                detail: outcome.detail.clone(),
                output_json: outcome.output.to_string(),
            })),
        };
        self.send_msg(link, msg).await
    }

    fn on_ack(&mut self, seqs: &[u64]) {
        let acked: BTreeSet<u64> = seqs.iter().copied().collect();
        self.pending.retain(|p| !acked.contains(&p.batch.seq));
        if let Err(error) = self.buffer.remove(seqs) {
            tracing::warn!(%error, "cannot trim the telemetry buffer");
        }
        if let Some(log) = self.ack_log.as_mut() {
            let text: String = seqs.iter().map(|s| format!("{s}\n")).collect();
            if let Err(error) = log.write_all(text.as_bytes()).and_then(|()| log.flush()) {
                tracing::warn!(%error, "cannot write the ack log");
            }
        }
    }

    /// On shutdown, give the controller a moment to acknowledge what was sent.
    async fn drain_acks(&mut self, link: &mut Link) {
        let deadline = Instant::now() + SHUTDOWN_ACK_WAIT;
        while self.pending.iter().any(|p| p.sent_at.is_some()) {
            match tokio::time::timeout_at(deadline, link.inbound.message()).await {
                Ok(Ok(Some(pb::ControllerMessage { body: Some(Down::Ack(ack)) }))) => self.on_ack(&ack.seqs),
                Ok(Ok(Some(_))) => {}
                _ => break,
            }
        }
    }

    /// Syncs the disk buffer; what is still unacknowledged is sent by the next run.
    fn close_buffer(&mut self) {
        if let Err(error) = self.buffer.sync() {
            tracing::warn!(%error, "cannot sync the telemetry buffer");
        }
        if !self.pending.is_empty() {
            tracing::info!(
                unacknowledged = self.pending.len(),
                "stopping; unacknowledged telemetry stays in the disk buffer"
            );
        }
    }
}

/// A heartbeat with this agent's wall-clock time.
fn heartbeat_message() -> pb::AgentMessage {
    pb::AgentMessage { body: Some(Up::Heartbeat(pb::Heartbeat { sent_unix_ms: now_unix_ms() })) }
}

fn agent_sample(name: &str, value: f64) -> flotilla_common::model::Sample {
    flotilla_common::model::Sample { name: name.to_owned(), labels: Default::default(), value }
}

/// Turns a refusal into words; a refusal by policy is logged loudly once here.
fn refusal(status: tonic::Status) -> String {
    use tonic::Code;
    let text = match status.code() {
        Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition | Code::InvalidArgument => {
            format!("controller refused this agent ({:?}): {}", status.code(), status.message())
        }
        _ => format!("{:?}: {}", status.code(), status.message()),
    };
    if matches!(status.code(), Code::PermissionDenied | Code::Unauthenticated) {
        tracing::error!(reason = %text, "refused by the controller; check this agent's certificate and node_id");
    }
    text
}

/// Exponential backoff with "equal jitter": half fixed, half random, so that a
/// fleet reconnecting after a controller restart spreads out.
pub fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(max);
    let half = capped / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(5));
        for f in 1..40 {
            let d = backoff(i, m, f);
            assert!(d <= m);
            let ceiling = i.saturating_mul(1 << (f - 1).min(16)).min(m);
            assert!(d >= ceiling / 2 && d <= ceiling, "{f}: {d:?}");
        }
    }
}
