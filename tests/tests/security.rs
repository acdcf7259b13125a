//! Bad peers are refused with a clear status and log line while the controller
//! and every other agent carry on: a foreign CA, an agent claiming another
//! node's id, garbage on the port, a node certificate on the operator API, and
//! malformed or oversized messages.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use flotilla_common::tls::TlsFiles;
use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body as Up;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::controller_message::Body as Down;
use flotilla_tests::{Agent, AgentOpts, Controller, Pki, flotctl_as, nodes, state_of, wait_state};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[test]
fn a_foreign_ca_is_refused_and_others_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let foreign = Pki::new(&dir.path().join("foreign"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let _honest = Agent::start(dir.path(), &pki, &url, "gpu-a", AgentOpts::default());
    wait_state(&pki, &url, "gpu-a", "up");

    // An agent whose certificate comes from another CA (trusting ours, so it gets as far as it can).
    let intruder = Agent::start(
        dir.path(),
        &pki,
        &url,
        "intruder",
        AgentOpts { cert: Some(foreign.node("intruder")), ..Default::default() },
    );
    controller.proc.wait_for_log("not issued by this fleet's CA");
    // An operator from another fleet.
    let out = flotctl_as(&pki.ca(), &foreign.admin(), &url, &["nodes", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fleet's CA"), "{out:?}");

    let list = nodes(&pki, &url).unwrap();
    assert_eq!(state_of(&list, "gpu-a").as_deref(), Some("up"));
    assert_eq!(state_of(&list, "intruder"), None);
    drop(intruder);
}

#[test]
fn an_agent_cannot_claim_another_nodes_id() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let _honest = Agent::start(dir.path(), &pki, &url, "gpu-c", AgentOpts::default());
    let liar =
        Agent::start(dir.path(), &pki, &url, "gpu-a", AgentOpts { claim: Some("gpu-b".into()), ..Default::default() });
    controller.proc.wait_for_log("claims another node's id");
    liar.proc.wait_for_log("controller refused this agent");
    let list = wait_state(&pki, &url, "gpu-c", "up");
    assert_eq!(state_of(&list, "gpu-b"), None, "the claimed id was not registered");
    assert_eq!(state_of(&list, "gpu-a"), None, "nor the certificate's");
}

#[test]
fn garbage_and_plaintext_on_the_port_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let _honest = Agent::start(dir.path(), &pki, &url, "gpu-a", AgentOpts::default());
    wait_state(&pki, &url, "gpu-a", "up");

    flotilla_tests::send_garbage(&controller.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    flotilla_tests::send_garbage(&controller.addr, &noise);
    controller.proc.wait_for_log("does not speak TLS");
    assert!(controller.proc.log_text().contains("TLS handshake refused"));

    let list = wait_state(&pki, &url, "gpu-a", "up");
    assert_eq!(list.len(), 1);
}

#[test]
fn a_node_certificate_cannot_use_the_operator_api() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let out = flotctl_as(&pki.ca(), &pki.node("gpu-a"), &controller.url(), &["nodes", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the Fleet API is for operators"), "{err}");
}

/// Opens an agent stream as `node` and returns its sender and the welcome-checked receiver.
#[allow(clippy::unwrap_used)] // test helper: a setup failure fails the test
async fn stream(
    pki: &Pki,
    url: &str,
    node: &str,
) -> (mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::ControllerMessage>) {
    flotilla_common::tls::install_crypto_provider();
    let c = pki.node(node);
    let tls = TlsFiles { ca: pki.ca(), cert: c.cert, key: c.key };
    let channel = flotilla_common::client::endpoint(url, &tls).unwrap().connect().await.unwrap();
    let mut client = AgentServiceClient::new(channel).max_encoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::AgentMessage {
        body: Some(Up::Hello(pb::Hello {
            protocol_version: flotilla_proto::PROTOCOL_VERSION,
            node_id: node.into(),
            inventory: Some(pb::Inventory { hostname: "h".into(), ..Default::default() }),
            heartbeat_interval_ms: 1000,
        })),
    })
    .await
    .unwrap();
    let mut inbound = client.connect(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    assert!(matches!(first.body, Some(Down::Welcome(_))));
    (tx, inbound)
}

fn batch(seq: u64) -> pb::TelemetryBatch {
    pb::TelemetryBatch {
        seq,
        created_unix_ms: 1_800_000_000_000,
        gpus: vec![pb::GpuSample { index: 0, utilization_ratio: Some(0.5), ..Default::default() }],
        ..Default::default()
    }
}

/// Sends `msg` and returns the status the controller closes the stream with.
async fn refusal(
    tx: &mpsc::Sender<pb::AgentMessage>,
    inbound: &mut tonic::Streaming<pb::ControllerMessage>,
    msg: pb::AgentMessage,
) -> tonic::Status {
    let msg_debug = format!("{msg:?}").chars().take(200).collect::<String>();
    let _ = tx.send(msg).await;
    loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status after {msg_debug}"),
            Err(status) => return status,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let honest = Agent::start(dir.path(), &pki, &url, "gpu-ok", AgentOpts::default());

    // A good batch is acknowledged.
    let (tx, mut inbound) = stream(&pki, &url, "gpu-m").await;
    tx.send(pb::AgentMessage { body: Some(Up::Telemetry(batch(1))) }).await.unwrap();
    let ack = inbound.message().await.unwrap().unwrap();
    assert!(matches!(ack.body, Some(Down::Ack(ref a)) if a.seqs == [1]), "{ack:?}");

    // seq 0 is invalid.
    let status = refusal(&tx, &mut inbound, pb::AgentMessage { body: Some(Up::Telemetry(batch(0))) }).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("telemetry.seq"), "{status:?}");

    // A ratio that is not a number.
    let (tx, mut inbound) = stream(&pki, &url, "gpu-m").await;
    let mut b = batch(2);
    b.gpus[0].utilization_ratio = Some(f64::NAN);
    let status = refusal(&tx, &mut inbound, pb::AgentMessage { body: Some(Up::Telemetry(b)) }).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // A second hello.
    let (tx, mut inbound) = stream(&pki, &url, "gpu-m").await;
    let hello = pb::AgentMessage { body: Some(Up::Hello(pb::Hello::default())) };
    let status = refusal(&tx, &mut inbound, hello).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    // A message over the size limit.
    let (tx, mut inbound) = stream(&pki, &url, "gpu-m").await;
    let mut b = batch(3);
    b.samples.push(pb::Sample { name: "x".repeat(5 * 1024 * 1024), ..Default::default() });
    let status = refusal(&tx, &mut inbound, pb::AgentMessage { body: Some(Up::Telemetry(b)) }).await;
    assert!(
        matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal),
        "{status:?}"
    );

    // The controller and the honest agent carry on; what was stored is intact.
    let list = tokio::task::spawn_blocking({
        let url = url.clone();
        move || wait_state(&pki, &url, "gpu-ok", "up")
    })
    .await
    .unwrap();
    assert!(state_of(&list, "gpu-m").is_some());
    drop(honest);
    drop(controller);
}
