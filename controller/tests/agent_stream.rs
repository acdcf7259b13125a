//! Tier 2: the controller in-process on 127.0.0.1:0 with a temp-dir store,
//! driven by the generated clients over real mTLS.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use flotilla_common::pki::{self, CaInit};
use flotilla_common::tls::TlsFiles;
use flotilla_common::{Identity, NodeId, Role};
use flotilla_controller::store::{SledStore, Store};
use flotilla_controller::{Config, Controller};
use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body as Up;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::controller_message::Body as Down;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

struct Running {
    _dir: tempfile::TempDir,
    pki: std::path::PathBuf,
    data: std::path::PathBuf,
    url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start() -> Running {
    flotilla_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init_ca(&pki_dir, &CaInit::default()).unwrap();
    let data = dir.path().join("data");
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.clone(),
        tls: TlsFiles::from_pki_dir(&pki_dir, &pki::leaf_paths(&pki_dir, &Identity::Controller)),
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
    fn tls(&self, identity: &Identity) -> TlsFiles {
        let paths = pki::leaf_paths(&self.pki, identity);
        if !paths.cert.exists() {
            pki::issue(&self.pki, identity, pki::LEAF_VALIDITY, false).unwrap();
        }
        TlsFiles::from_pki_dir(&self.pki, &paths)
    }

    async fn channel(&self, identity: &Identity) -> tonic::transport::Channel {
        flotilla_common::client::endpoint(&self.url, &self.tls(identity)).unwrap().connect().await.unwrap()
    }

    /// Opens an agent stream and returns it after the welcome.
    async fn agent(
        &self,
        node: &str,
        heartbeat_ms: u32,
    ) -> (mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::ControllerMessage>, pb::Welcome) {
        let channel = self.channel(&Identity::Node(NodeId::new(node).unwrap())).await;
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::AgentMessage {
            body: Some(Up::Hello(pb::Hello {
                protocol_version: flotilla_proto::PROTOCOL_VERSION,
                node_id: node.into(),
                inventory: Some(pb::Inventory { hostname: node.into(), ..Default::default() }),
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
    async fn shutdown(self) -> (tempfile::TempDir, std::path::PathBuf) {
        self.stop.cancel();
        self.task.await.unwrap();
        (self._dir, self.data)
    }
}

fn batch(seq: u64) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(Up::Telemetry(pb::TelemetryBatch {
            seq,
            created_unix_ms: 1_800_000_000_000 + seq as i64,
            ..Default::default()
        })),
    }
}

async fn next_ack(inbound: &mut tonic::Streaming<pb::ControllerMessage>) -> Vec<u64> {
    loop {
        match inbound.message().await.unwrap() {
            Some(pb::ControllerMessage { body: Some(Down::Ack(a)) }) => return a.seqs,
            Some(_) => continue,
            None => panic!("stream ended"),
        }
    }
}

#[tokio::test]
async fn resent_batches_are_acked_again_and_stored_once() {
    let c = start().await;
    let (tx, mut inbound, welcome) = c.agent("n1", 1000).await;
    assert_eq!(welcome.last_stored_seq, 0);
    for seq in [1, 2] {
        tx.send(batch(seq)).await.unwrap();
    }
    let mut acked = Vec::new();
    while acked.len() < 2 {
        acked.extend(next_ack(&mut inbound).await);
    }
    drop(tx);

    // The agent lost the acks and resends 2, then continues with 3.
    let (tx, mut inbound, welcome) = c.agent("n1", 1000).await;
    assert_eq!(welcome.last_stored_seq, 2, "the welcome tells what is already stored");
    tx.send(batch(2)).await.unwrap();
    tx.send(batch(3)).await.unwrap();
    let mut acked = Vec::new();
    while acked.len() < 2 {
        acked.extend(next_ack(&mut inbound).await);
    }
    assert_eq!(acked, [2, 3]);
    drop(tx);

    let (_dir, data) = c.shutdown().await;
    let store = SledStore::open(&data.join("store")).unwrap();
    let seqs: Vec<u64> = store.batches(&NodeId::new("n1").unwrap(), 0, 100).unwrap().iter().map(|b| b.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test]
async fn a_reconnect_closes_the_previous_stream() {
    let c = start().await;
    let (_tx_a, mut a, _) = c.agent("n1", 1000).await;
    let (_tx_b, _b, _) = c.agent("n1", 1000).await;
    let status = loop {
        match a.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("closed without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    c.shutdown().await;
}

#[tokio::test]
async fn a_silent_agent_is_cut_off() {
    let c = start().await;
    let (_tx, mut inbound, _) = c.agent("quiet", 100).await;
    // No heartbeats: after three intervals the controller closes the stream.
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("closed without a status"),
                Err(s) => break s,
            }
        }
    })
    .await
    .expect("hang guard");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    c.shutdown().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let c = start().await;
    let admin = Identity::Operator { name: "admin".into(), role: Role::Admin };
    let channel = c.channel(&admin).await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "flotilla.v1.Fleet", "flotilla.v1.AgentService"] {
        let resp =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(resp.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "{service:?}");
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(resp) = stream.message().await.unwrap() else { panic!("no reflection answer") };
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["flotilla.v1.Fleet", "flotilla.v1.AgentService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    c.shutdown().await;
}
