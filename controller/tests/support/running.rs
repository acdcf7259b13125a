//! Shared equipment of the tier-2 tests: the controller in-process on
//! 127.0.0.1:0 with a temp-dir store and PKI, and agent streams driven by the
//! generated client. Included by each test file with `#[path]`.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use flotilla_common::pki::{self, CaInit};
use flotilla_common::tls::TlsFiles;
use flotilla_common::{Identity, NodeId, Role};
use flotilla_controller::{Config, Controller};
use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body as Up;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::controller_message::Body as Down;
use flotilla_proto::pb::fleet_client::FleetClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// A controller serving in this process.
pub struct Running {
    _dir: tempfile::TempDir,
    pub pki: std::path::PathBuf,
    pub data: std::path::PathBuf,
    pub url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A controller with a new CA and an empty store.
pub async fn start() -> Running {
    start_in(tempfile::tempdir().unwrap()).await
}

/// A controller on the CA and store in `dir`, creating them if new (a restart
/// passes the directory [`Running::shutdown`] returned).
pub async fn start_in(dir: tempfile::TempDir) -> Running {
    flotilla_common::tls::install_crypto_provider();
    let pki_dir = dir.path().join("pki");
    if !pki::ca_cert_path(&pki_dir).exists() {
        pki::init_ca(&pki_dir, &CaInit::default()).unwrap();
    }
    let data = dir.path().join("data");
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.clone(),
        tls: TlsFiles::from_pki_dir(&pki_dir, &pki::leaf_paths(&pki_dir, &Identity::Controller)).into(),
        ..Default::default()
    };
    let controller = Controller::bind(config).await.unwrap();
    let url = format!("https://127.0.0.1:{}", controller.local_addr().port());
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { controller.serve(token).await.unwrap() });
    Running { _dir: dir, pki: pki_dir, data, url, stop, task }
}

impl Running {
    pub fn tls(&self, identity: &Identity) -> TlsFiles {
        let paths = pki::leaf_paths(&self.pki, identity);
        if !paths.cert.exists() {
            pki::issue(&self.pki, identity, pki::LEAF_VALIDITY, false).unwrap();
        }
        TlsFiles::from_pki_dir(&self.pki, &paths)
    }

    pub async fn channel(&self, identity: &Identity) -> tonic::transport::Channel {
        flotilla_common::client::endpoint(&self.url, &self.tls(identity)).unwrap().connect().await.unwrap()
    }

    /// A Fleet client with the admin operator's certificate.
    pub async fn fleet(&self) -> FleetClient<tonic::transport::Channel> {
        FleetClient::new(self.channel(&Identity::Operator { name: "admin".into(), role: Role::Admin }).await)
    }

    /// Opens an agent stream and returns it after the welcome.
    pub async fn agent(
        &self,
        node: &str,
        heartbeat_ms: u32,
    ) -> (mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::ControllerMessage>, pb::Welcome) {
        self.agent_with(node, heartbeat_ms, pb::Inventory { hostname: node.into(), ..Default::default() }).await
    }

    /// Like [`Running::agent`], announcing `inventory`.
    pub async fn agent_with(
        &self,
        node: &str,
        heartbeat_ms: u32,
        inventory: pb::Inventory,
    ) -> (mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::ControllerMessage>, pb::Welcome) {
        let channel = self.channel(&Identity::Node(NodeId::new(node).unwrap())).await;
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::AgentMessage {
            body: Some(Up::Hello(pb::Hello {
                protocol_version: flotilla_proto::PROTOCOL_VERSION,
                node_id: node.into(),
                inventory: Some(inventory),
                heartbeat_interval_ms: heartbeat_ms,
            })),
        })
        .await
        .unwrap();
        let mut inbound = AgentServiceClient::new(channel).connect(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let Some(pb::ControllerMessage { body: Some(Down::Welcome(w)) }) = inbound.message().await.unwrap() else {
            panic!("no welcome")
        };
        (tx, inbound, w)
    }

    /// Stops the controller; returns the temp dir (alive while held) and the data dir.
    pub async fn shutdown(self) -> (tempfile::TempDir, std::path::PathBuf) {
        self.stop.cancel();
        self.task.await.unwrap();
        (self._dir, self.data)
    }
}

/// An empty batch.
pub fn batch(seq: u64) -> pb::AgentMessage {
    telemetry(pb::TelemetryBatch { seq, created_unix_ms: 1_800_000_000_000 + seq as i64, ..Default::default() })
}

/// An agent message carrying `batch`.
pub fn telemetry(batch: pb::TelemetryBatch) -> pb::AgentMessage {
    pb::AgentMessage { body: Some(Up::Telemetry(batch)) }
}

/// The seqs of the next ack on the stream.
pub async fn next_ack(inbound: &mut tonic::Streaming<pb::ControllerMessage>) -> Vec<u64> {
    loop {
        match inbound.message().await.unwrap() {
            Some(pb::ControllerMessage { body: Some(Down::Ack(a)) }) => return a.seqs,
            Some(_) => continue,
            None => panic!("stream ended"),
        }
    }
}

/// Waits until `count` seqs were acknowledged on the stream.
pub async fn acked(inbound: &mut tonic::Streaming<pb::ControllerMessage>, count: usize) -> Vec<u64> {
    let mut acked = Vec::new();
    while acked.len() < count {
        acked.extend(next_ack(inbound).await);
    }
    acked
}
