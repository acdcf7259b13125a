//! The bad-input battery against the real controller binary: every kind of
//! hostile or broken input gets a clear refusal, and after each one the
//! controller still answers its health check and nothing it stores has changed
//! (the audit log only gains the records of refused actions it audits first).
//!
//! `security.rs` already covers a foreign CA, an agent claiming another node's
//! id, garbage and plaintext HTTP on the port, a node certificate on flotctl,
//! and a NaN ratio, seq 0, a second hello and a 5 MiB message on an agent
//! stream; `commands.rs` and `command_refusals.rs` cover forged and replayed
//! command envelopes. This file adds what they do not: TLS without a client
//! certificate, an expired certificate, HTTP/1.1 inside TLS, certificates used
//! on the wrong service, raw gRPC frames (lying lengths, compression flags,
//! invalid UTF-8, deep nesting, truncation), the remaining wire validation, and
//! the operator inputs (deployment specs, rule files, selectors, silence
//! matchers, huge fields and metadata). The request limits (`[limits]`) are
//! exercised at the end with a controller configured tight.

// Helpers here fail the test on setup errors, as the #[test] bodies do, and
// print what the controller answered to each case into the test's output.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stderr)]

use std::time::{Duration, Instant};

use flotilla_common::pki::CertPaths;
use flotilla_common::tls::TlsFiles;
use flotilla_common::{Identity, Role};
use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body as Up;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::controller_message::Body as Down;
use flotilla_proto::pb::fleet_client::FleetClient;
use flotilla_tests::{Controller, Pki};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codegen::{Bytes, http};
use tonic::transport::Channel;

/// A hang guard for each call, not a speed claim.
const PATIENCE: Duration = Duration::from_secs(30);

/// The node whose stored state every agent-side case must leave alone.
const NODE: &str = "gpu-raw";

async fn channel(pki: &Pki, url: &str, cert: &CertPaths) -> Channel {
    flotilla_common::tls::install_crypto_provider();
    let tls = TlsFiles { ca: pki.ca(), cert: cert.cert.clone(), key: cert.key.clone() };
    flotilla_common::client::endpoint(url, &tls).unwrap().connect().await.unwrap()
}

async fn admin(pki: &Pki, url: &str) -> FleetClient<Channel> {
    FleetClient::new(channel(pki, url, &pki.admin()).await).max_encoding_message_size(64 << 20)
}

/// The controller answers its health check over a fresh connection.
async fn assert_healthy(pki: &Pki, url: &str, after: &str) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(pki, url, &pki.admin()).await);
    let reply = tokio::time::timeout(PATIENCE, health.check(tonic_health::pb::HealthCheckRequest::default()))
        .await
        .unwrap_or_else(|_| panic!("health check hung after {after}"))
        .unwrap_or_else(|s| panic!("health check failed after {after}: {s:?}"));
    assert_eq!(
        reply.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "after {after}"
    );
}

/// What the controller stores that bad input must not change.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    /// (id, hostname, newest stored seq) per node.
    nodes: Vec<(String, String, u64)>,
    deployments: Vec<String>,
    silences: usize,
    /// (seq, action) of every audit record.
    audit: Vec<(u64, String)>,
}

async fn stored(fleet: &mut FleetClient<Channel>) -> Stored {
    let nodes = fleet.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    let mut nodes: Vec<(String, String, u64)> = nodes
        .into_iter()
        .map(|n| {
            let host = n.inventory.map(|i| i.hostname).unwrap_or_default();
            (n.id, host, n.latest.map_or(0, |b| b.seq))
        })
        .collect();
    nodes.sort();
    let deployments = fleet.list_deployments(pb::ListDeploymentsRequest {}).await.unwrap().into_inner().deployments;
    let silences = fleet.list_silences(pb::ListSilencesRequest { include_expired: true }).await.unwrap().into_inner();
    let audit = fleet.list_audit(pb::ListAuditRequest { since_unix_ms: 0, limit: 0 }).await.unwrap().into_inner();
    Stored {
        nodes,
        deployments: deployments.into_iter().map(|d| d.name).collect(),
        silences: silences.silences.len(),
        audit: audit.records.into_iter().map(|r| (r.seq, r.action)).collect(),
    }
}

/// Prints what the controller answered, for the test's output.
fn report(what: &str, status: &tonic::Status) {
    let said: String = status.message().chars().take(160).collect();
    eprintln!("{what}: {:?}: {said}", status.code());
}

/// Checks that `now` equals `before` but for audit records of `audited` actions appended.
fn assert_unchanged(before: &Stored, now: &Stored, audited: &[&str], after: &str) {
    assert_eq!(now.nodes, before.nodes, "nodes changed after {after}");
    assert_eq!(now.deployments, before.deployments, "deployments changed after {after}");
    assert_eq!(now.silences, before.silences, "silences changed after {after}");
    assert!(now.audit.starts_with(&before.audit), "the audit log was rewritten after {after}");
    for (_, action) in &now.audit[before.audit.len()..] {
        assert!(audited.contains(&action.as_str()), "unexpected audit record {action:?} after {after}");
    }
}

fn hello(node: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(Up::Hello(pb::Hello {
            protocol_version: flotilla_proto::PROTOCOL_VERSION,
            node_id: node.into(),
            inventory: Some(pb::Inventory { hostname: format!("{node}.example"), ..Default::default() }),
            heartbeat_interval_ms: 1000,
        })),
    }
}

fn batch(seq: u64) -> pb::TelemetryBatch {
    pb::TelemetryBatch {
        seq,
        created_unix_ms: flotilla_common::time::now_unix_ms(),
        gpus: vec![pb::GpuSample {
            index: 0,
            utilization_ratio: Some(0.5),
            memory_used_bytes: Some(1 << 30),
            memory_total_bytes: Some(80 << 30),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn telemetry(b: pb::TelemetryBatch) -> pb::AgentMessage {
    pb::AgentMessage { body: Some(Up::Telemetry(b)) }
}

/// Opens an agent stream with the generated client, sends `first` (a hello
/// unless a case says otherwise) and returns the sender and the inbound stream;
/// `Err` is the status the call itself failed with.
async fn open(
    ch: Channel,
    first: pb::AgentMessage,
) -> Result<(mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::ControllerMessage>), tonic::Status> {
    let mut client = AgentServiceClient::new(ch).max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let inbound =
        tokio::time::timeout(PATIENCE, client.connect(ReceiverStream::new(rx))).await.expect("connect hung")?;
    Ok((tx, inbound.into_inner()))
}

/// The status a stream ends with after `msg` (messages before it are skipped).
async fn refusal_of(ch: Channel, msg: pb::AgentMessage) -> tonic::Status {
    let (tx, mut inbound) = match open(ch, hello(NODE)).await {
        Ok(pair) => pair,
        Err(status) => return status,
    };
    let _ = tx.send(msg).await;
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Status::ok("the stream ended without a refusal"),
                Err(status) => return status,
            }
        }
    });
    end.await.expect("no refusal in time")
}

/// A gRPC frame around `payload`: compression flag, big-endian length, bytes.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Sends `body` as the raw HTTP/2 request body of `path` and returns the gRPC
/// status the controller ends the call with (a reset stream or a refused
/// connection counts as a status too).
async fn raw_call(mut ch: Channel, path: &str, body: Vec<u8>) -> tonic::Status {
    use http_body_util::BodyExt;
    use tonic::codegen::Service;
    let request = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(Bytes::from(body))))
        .unwrap();
    std::future::poll_fn(|cx| ch.poll_ready(cx)).await.unwrap();
    let call = async {
        let response = match ch.call(request).await {
            Ok(r) => r,
            Err(e) => return tonic::Status::unavailable(format!("transport: {e}")),
        };
        if let Some(status) = tonic::Status::from_header_map(response.headers()) {
            return status;
        }
        match response.into_body().collect().await {
            Ok(collected) => collected
                .trailers()
                .and_then(tonic::Status::from_header_map)
                .unwrap_or_else(|| tonic::Status::unknown("no grpc-status")),
            Err(e) => tonic::Status::unavailable(format!("stream reset: {e}")),
        }
    };
    tokio::time::timeout(PATIENCE, call).await.expect("raw call hung")
}

const CONNECT: &str = "/flotilla.v1.AgentService/Connect";

/// The batteries check every case with a health check and a snapshot of the
/// store (five calls as admin), hundreds a second: far over the default
/// per-client rate, which is exercised on its own at the end.
const UNLIMITED: &str = "[limits]\nrequests_per_second_per_client = 1000000.0\nburst_per_client = 1000000\n";

/// A hand-built `AgentMessage{telemetry}` whose one sample has label `k` with a
/// value that is not UTF-8: a `string` field prost must refuse.
fn invalid_utf8_label() -> Vec<u8> {
    let label = [&[0x0a, 0x01, b'k', 0x12, 0x02][..], &[0xc3, 0x28]].concat();
    let entry = [&[0x12, label.len() as u8][..], &label].concat();
    let sample = [&[0x0a, 0x01, b'x'][..], &entry].concat();
    let batch = [&[0x08, 0x09, 0x10, 0x01, 0x2a, sample.len() as u8][..], &sample].concat();
    [&[0x12, batch.len() as u8][..], &batch].concat()
}

#[test]
fn transport_level_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(assert_healthy(&pki, &url, "start"));
    let before = rt.block_on(async { stored(&mut admin(&pki, &url).await).await });

    // TLS without a client certificate: the handshake is refused, with the reason logged.
    flotilla_common::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(pki.ca()).unwrap();
    for cert in <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(&ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let served = tls_exchange(&controller.addr, config, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(served.is_err(), "a connection without a client certificate got an answer: {served:?}");
    controller.proc.wait_for_log("presented no client certificate");
    rt.block_on(assert_healthy(&pki, &url, "TLS without a client certificate"));

    // An expired certificate issued by the fleet's own CA.
    let expired = expired_node_cert(&pki, dir.path(), "gpu-old");
    let tls = TlsFiles { ca: pki.ca(), cert: expired.cert.clone(), key: expired.key.clone() };
    let attempt = rt.block_on(async {
        let ch = flotilla_common::client::endpoint(&url, &tls).unwrap().connect().await;
        match ch {
            Err(e) => Err(format!("{e:?}")),
            Ok(ch) => {
                FleetClient::new(ch).list_nodes(pb::ListNodesRequest {}).await.map(|_| ()).map_err(|s| format!("{s:?}"))
            }
        }
    });
    assert!(attempt.is_err(), "an expired certificate was accepted");
    controller.proc.wait_for_log("has expired");
    rt.block_on(assert_healthy(&pki, &url, "an expired certificate"));

    // HTTP/1.1 inside a valid mTLS connection: no answer but a closed connection.
    let http1 = flotilla_tests::https_get(&controller.addr, "/flotilla.v1.Fleet/ListNodes", &pki.ca(), &pki.admin());
    assert!(!matches!(http1, Ok((200, _))), "HTTP/1.1 got an answer: {http1:?}");
    rt.block_on(assert_healthy(&pki, &url, "HTTP/1.1 inside TLS"));

    // Garbage after a valid mTLS handshake instead of the HTTP/2 preface.
    let admin_cert = pki.admin();
    let mut config =
        (*TlsFiles { ca: pki.ca(), cert: admin_cert.cert, key: admin_cert.key }.client_config().unwrap()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let noise: Vec<u8> = (0..65_536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let answer = tls_exchange(&controller.addr, config, &noise);
    assert!(!answer.as_ref().is_ok_and(|a| a.windows(4).any(|w| w == b"HTTP")), "{answer:?}");
    rt.block_on(assert_healthy(&pki, &url, "garbage inside TLS"));
    let after = rt.block_on(async { stored(&mut admin(&pki, &url).await).await });
    assert_unchanged(&before, &after, &[], "the transport cases");
}

/// Connects with `config`, writes `bytes`, and reads until the peer closes;
/// `Err` when the handshake or the read failed.
fn tls_exchange(addr: &str, config: rustls::ClientConfig, bytes: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::{Read, Write};
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(out),
        Err(e) => Err(e.to_string()),
    }
}

/// A node certificate from the fleet's CA whose validity ended a year ago.
fn expired_node_cert(pki: &Pki, dir: &std::path::Path, node: &str) -> CertPaths {
    let key_pem = std::fs::read_to_string(pki.dir.join("ca.key")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let ca_pem = std::fs::read_to_string(pki.ca()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, node);
    let uri = Identity::Node(flotilla_common::NodeId::new(node).unwrap()).to_uri();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths =
        CertPaths { cert: dir.join(format!("{node}-expired.pem")), key: dir.join(format!("{node}-expired.key")) };
    std::fs::write(&paths.cert, cert.pem()).unwrap();
    std::fs::write(&paths.key, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_side_bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = tokio::task::spawn_blocking({
        let (dir, pki) = (dir.path().to_owned(), Pki { dir: pki.dir.clone() });
        move || Controller::start_configured(&dir, &pki, UNLIMITED)
    })
    .await
    .unwrap();
    let url = controller.url();
    let node = channel(&pki, &url, &pki.node(NODE)).await;
    let mut fleet = admin(&pki, &url).await;

    // The baseline: one good batch stored and acknowledged.
    let (tx, mut inbound) = open(node.clone(), hello(NODE)).await.unwrap();
    assert!(matches!(inbound.message().await.unwrap().unwrap().body, Some(Down::Welcome(_))));
    tx.send(telemetry(batch(1))).await.unwrap();
    assert!(matches!(inbound.message().await.unwrap().unwrap().body, Some(Down::Ack(ref a)) if a.seqs == [1]));
    drop((tx, inbound));
    let before = stored(&mut fleet).await;
    assert_eq!(before.nodes, vec![(NODE.to_owned(), format!("{NODE}.example"), 1)]);

    // Certificates on the wrong service.
    let Err(as_operator) = open(channel(&pki, &url, &pki.admin()).await, hello(NODE)).await else {
        panic!("an operator certificate opened an agent stream");
    };
    assert_eq!(as_operator.code(), Code::PermissionDenied, "{as_operator:?}");
    assert!(as_operator.message().contains("AgentService is for agents"), "{as_operator:?}");
    let mut node_on_fleet = FleetClient::new(node.clone());
    for status in [
        node_on_fleet.list_nodes(pb::ListNodesRequest {}).await.err(),
        node_on_fleet.apply_deployment(pb::ApplyDeploymentRequest::default()).await.err(),
        node_on_fleet.check_rules(pb::CheckRulesRequest::default()).await.err(),
        node_on_fleet
            .exec_command(pb::ExecCommandRequest { node_id: NODE.into(), command: "noop".into(), ..Default::default() })
            .await
            .err(),
    ] {
        let status = status.expect("a node certificate is refused on Fleet");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    assert_healthy(&pki, &url, "certificates on the wrong service").await;

    // Semantic refusals through the generated client: (what, message, code, words the reason has).
    let mut hot = batch(2);
    hot.gpus[0].utilization_ratio = Some(-0.5);
    let mut inf = batch(2);
    inf.gpus[0].power_watts = Some(f64::INFINITY);
    let mut nan = batch(2);
    nan.gpus[0].temperature_celsius = Some(f64::NAN);
    let mut over = batch(2);
    over.gpus[0].memory_used_bytes = Some(81 << 30);
    let mut twice = batch(2);
    twice.gpus.push(twice.gpus[0].clone());
    let mut before_1970 = batch(2);
    before_1970.created_unix_ms = -1;
    let mut crowded = batch(2);
    crowded.samples = vec![pb::Sample { name: "flotilla_x".into(), ..Default::default() }; 10_001];
    let mut bad_label = batch(2);
    bad_label.samples =
        vec![pb::Sample { name: "flotilla_x".into(), labels: [("bad label!".into(), "v".into())].into(), value: 1.0 }];
    let mut control = batch(2);
    control.samples =
        vec![pb::Sample { name: "flotilla_x".into(), labels: [("node".into(), "a\u{7}b".into())].into(), value: 1.0 }];
    let mut long_uuid = batch(2);
    long_uuid.gpus[0].uuid = "G".repeat(300);
    let bad_state = pb::ContainerReport {
        containers: vec![pb::Container {
            name: "c".into(),
            id: "abc".into(),
            state: "exploded".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let cases: Vec<(&str, pb::AgentMessage, Code, &str)> = vec![
        ("a negative ratio", telemetry(hot), Code::InvalidArgument, "outside 0..=1"),
        ("an infinite power reading", telemetry(inf), Code::InvalidArgument, "not a finite number"),
        ("a NaN temperature", telemetry(nan), Code::InvalidArgument, "not a finite number"),
        ("more memory used than the GPU has", telemetry(over), Code::InvalidArgument, "exceeds memory_total_bytes"),
        ("a GPU index twice", telemetry(twice), Code::InvalidArgument, "telemetry.gpus"),
        ("a time before 1970", telemetry(before_1970), Code::InvalidArgument, "positive Unix time"),
        ("10 001 samples", telemetry(crowded), Code::InvalidArgument, "at most 10000"),
        ("an invalid label name", telemetry(bad_label), Code::InvalidArgument, "not a valid Prometheus name"),
        ("a control character in a label", telemetry(control), Code::InvalidArgument, "control characters"),
        ("a 300-byte GPU uuid", telemetry(long_uuid), Code::InvalidArgument, "at most 256"),
        (
            "an unknown container state",
            pb::AgentMessage { body: Some(Up::Containers(bad_state)) },
            Code::InvalidArgument,
            "unknown state",
        ),
        ("an empty message", pb::AgentMessage { body: None }, Code::InvalidArgument, "empty agent message"),
    ];
    for (what, msg, code, words) in cases {
        let status = refusal_of(node.clone(), msg).await;
        report(what, &status);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(words), "{what}: {status:?}");
        assert_healthy(&pki, &url, what).await;
        assert_unchanged(&before, &stored(&mut fleet).await, &[], what);
    }

    // Hellos that are not acceptable.
    let mut old_protocol = hello(NODE);
    let mut no_heartbeat = hello(NODE);
    if let Some(Up::Hello(h)) = &mut old_protocol.body {
        h.protocol_version = 0;
    }
    if let Some(Up::Hello(h)) = &mut no_heartbeat.body {
        h.heartbeat_interval_ms = 0;
    }
    for (what, first, code, words) in [
        ("telemetry before the hello", telemetry(batch(2)), Code::FailedPrecondition, "must be a hello"),
        ("an unsupported protocol version", old_protocol, Code::FailedPrecondition, "protocol version 0"),
        ("a heartbeat interval of 0", no_heartbeat, Code::InvalidArgument, "heartbeat_interval_ms"),
    ] {
        let status = match open(node.clone(), first).await {
            Err(status) => status,
            Ok((_tx, mut inbound)) => loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break tonic::Status::ok("no refusal"),
                    Err(status) => break status,
                }
            },
        };
        report(what, &status);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(words), "{what}: {status:?}");
        assert_healthy(&pki, &url, what).await;
        assert_unchanged(&before, &stored(&mut fleet).await, &[], what);
    }

    // Raw frames after a good hello: what the generated client cannot send.
    let good_hello = frame(&hello(NODE).encode_to_vec());
    let raw_cases: Vec<(&str, Vec<u8>, &[Code], &str)> = vec![
        (
            "a label value that is not UTF-8",
            frame(&invalid_utf8_label()),
            &[Code::Internal, Code::InvalidArgument],
            "UTF-8",
        ),
        (
            "unknown fields nested 100 000 groups deep",
            frame(&[0x9b, 0x06].repeat(100_000)),
            &[Code::Internal, Code::InvalidArgument],
            "decode",
        ),
        (
            "an inner length past the end",
            frame(&[0x12, 0xff, 0xff, 0x03, 0x08, 0x01]),
            &[Code::Internal, Code::InvalidArgument],
            "decode",
        ),
        ("bytes that are not protobuf", frame(&[0xff; 64]), &[Code::Internal, Code::InvalidArgument], "decode"),
        (
            "a frame claiming 2 GiB",
            vec![0, 0x7f, 0xff, 0xff, 0xff, 1, 2, 3],
            &[Code::OutOfRange, Code::ResourceExhausted],
            "too large",
        ),
        (
            "a frame just over the size limit",
            {
                let mut f = vec![0];
                f.extend_from_slice(&(4 * 1024 * 1024 + 1u32).to_be_bytes());
                f.extend(std::iter::repeat_n(0u8, 1024));
                f
            },
            &[Code::OutOfRange, Code::ResourceExhausted],
            "too large",
        ),
        (
            "a compressed frame without an encoding",
            [&[1u8, 0, 0, 0, 2][..], &[0x1a, 0x00]].concat(),
            &[Code::Internal, Code::Unimplemented, Code::InvalidArgument],
            "compress",
        ),
        (
            "a frame cut short",
            vec![0, 0, 0, 0, 100, 0x12, 0x02],
            &[Code::Internal, Code::InvalidArgument, Code::Unknown],
            "",
        ),
    ];
    for (what, bad, codes, words) in raw_cases {
        let status = raw_call(node.clone(), CONNECT, [good_hello.clone(), bad].concat()).await;
        report(what, &status);
        assert!(codes.contains(&status.code()), "{what}: {status:?}");
        assert!(status.message().to_lowercase().contains(&words.to_lowercase()), "{what}: {status:?}");
        assert_healthy(&pki, &url, what).await;
        assert_unchanged(&before, &stored(&mut fleet).await, &[], what);
    }
    // A method that does not exist.
    let status = raw_call(node.clone(), "/flotilla.v1.AgentService/Explode", frame(&[])).await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    controller.proc.wait_for_log("refused malformed message from agent");
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_side_bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = tokio::task::spawn_blocking({
        let (dir, pki) = (dir.path().to_owned(), Pki { dir: pki.dir.clone() });
        move || Controller::start_configured(&dir, &pki, UNLIMITED)
    })
    .await
    .unwrap();
    let url = controller.url();
    let mut fleet = admin(&pki, &url).await;
    let before = stored(&mut fleet).await;

    // Deployment specs: each refused with INVALID_ARGUMENT (or the size limit);
    // an apply is audited before its spec is read, a dry run is not.
    let nested = format!("name: {}1{}\n", "[".repeat(20_000), "]".repeat(20_000));
    let mut bomb = String::from("a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for level in 1..10 {
        bomb.push_str(&format!("a{level}: &a{level} [{}]\n", vec![format!("*a{}", level - 1); 9].join(",")));
    }
    bomb.push_str("name: *a9\n");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/blue-green.yaml")).unwrap();
    let specs: Vec<(&str, String, &[Code], &str)> = vec![
        ("YAML that does not parse", "name: [unclosed\nmodel: {".into(), &[Code::InvalidArgument], "spec"),
        ("an unknown field", format!("{example}\nsurprise: 1\n"), &[Code::InvalidArgument], "surprise"),
        (
            "an image the agents would refuse",
            example.replace("vllm/vllm-openai:v0.8.5", "Vllm/Bad Image"),
            &[Code::InvalidArgument],
            "image",
        ),
        ("YAML nested 20 000 deep", nested, &[Code::InvalidArgument], ""),
        ("an alias bomb", bomb, &[Code::InvalidArgument], ""),
        (
            "a spec over 256 KiB",
            format!("{example}\n#{}\n", "x".repeat(300 * 1024)),
            &[Code::InvalidArgument],
            "262144",
        ),
        (
            "a spec over the message limit",
            format!("{example}\n#{}\n", "x".repeat(5 << 20)),
            &[Code::OutOfRange, Code::ResourceExhausted],
            "",
        ),
        ("a string that is not UTF-8 (as text)", "name: \u{FFFD}\u{0}\n".into(), &[Code::InvalidArgument], ""),
    ];
    for (what, spec, codes, words) in specs {
        for dry_run in [true, false] {
            let started = Instant::now();
            let status = fleet
                .apply_deployment(pb::ApplyDeploymentRequest { spec_yaml: spec.clone(), dry_run })
                .await
                .err()
                .unwrap_or_else(|| panic!("{what} was accepted"));
            report(&format!("{what} (dry run: {dry_run})"), &status);
            assert!(codes.contains(&status.code()), "{what}: {status:?}");
            let said: String = status.message().chars().take(300).collect();
            assert!(status.message().contains(words), "{what}: {said}");
            assert!(started.elapsed() < PATIENCE, "{what} took {:?}", started.elapsed());
            assert_healthy(&pki, &url, what).await;
            assert_unchanged(&before, &stored(&mut fleet).await, &["deploy.apply"], what);
        }
    }

    // Rule files: CheckRules answers with the problems (the call itself succeeds).
    let rule = |expr: &str| format!("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: '{expr}'\n");
    let rules: Vec<(&str, String, &str)> = vec![
        ("YAML that does not parse", "groups: [\n".into(), ""),
        ("an unknown key", "groups:\n- name: g\n  rules: []\n  surprise: 1\n".into(), "surprise"),
        ("PromQL that does not parse", rule("rate(x[5m]"), "does not parse"),
        // Each of these aborted the controller with a stack overflow before the nesting bounds.
        ("PromQL nested 10 000 deep", rule(&format!("{}x{}", "(".repeat(10_000), ")".repeat(10_000))), "at most 2048"),
        ("PromQL nested 1 000 calls deep", rule(&format!("{}x{}", "abs(".repeat(1_000), ")".repeat(1_000))), "tokens"),
        ("PromQL nested 500 deep", rule(&format!("{}x{}", "(".repeat(500), ")".repeat(500))), "nests deeper"),
        ("a 5 000-term sum", rule(&vec!["x"; 5_000].join(" + ")), "at most 2048"),
        ("YAML nested 20 000 deep", format!("groups: {}1{}\n", "[".repeat(20_000), "]".repeat(20_000)), ""),
        (
            "a 1 MiB template",
            format!("{}    annotations:\n      s: '{{{{ {} }}}}'\n", rule("up == 0"), "x".repeat(1 << 20)),
            "",
        ),
    ];
    for (what, content, words) in rules {
        let reply = tokio::time::timeout(
            PATIENCE,
            fleet.check_rules(pb::CheckRulesRequest { file_name: "bad.yml".into(), content }),
        )
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
        .unwrap_or_else(|s| panic!("{what}: {s:?}"))
        .into_inner();
        eprintln!(
            "{what}: {:?}",
            reply.problems.iter().map(|p| p.chars().take(120).collect::<String>()).collect::<Vec<_>>()
        );
        assert!(!reply.problems.is_empty(), "{what} passed the check");
        assert!(reply.problems.iter().any(|p| p.contains(words)), "{what}: {:?}", reply.problems);
        assert_healthy(&pki, &url, what).await;
        assert_unchanged(&before, &stored(&mut fleet).await, &["deploy.apply"], what);
    }

    // Selectors and silence matchers, each of which reached a parser that recursed without bound.
    let deep_calls = format!("{}x{}", "sum(".repeat(20_000), ")".repeat(20_000));
    let chain = vec!["x"; 100_000].join("+");
    for (what, selector) in
        [("a selector nested 20 000 calls deep", deep_calls.clone()), ("a 100 000-term selector", chain)]
    {
        let status = fleet
            .query_metrics(pb::QueryMetricsRequest { selector, ..Default::default() })
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} was accepted"));
        report(what, &status);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_healthy(&pki, &url, what).await;
    }
    let status = fleet
        .create_silence(pb::CreateSilenceRequest {
            matchers: vec![deep_calls],
            duration_ms: 60_000,
            comment: "x".into(),
        })
        .await
        .expect_err("a nested silence matcher is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_healthy(&pki, &url, "a nested silence matcher").await;

    // Oversized fields: a 3 MiB node id, 3 MiB of command arguments.
    let huge = "n".repeat(3 << 20);
    let status = fleet.get_node(pb::GetNodeRequest { node_id: huge.clone() }).await.expect_err("refused");
    report("a 3 MiB node id", &status);
    assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status.code());
    let status = fleet
        .exec_command(pb::ExecCommandRequest { node_id: NODE.into(), command: huge.clone(), ..Default::default() })
        .await
        .expect_err("refused");
    report("a 3 MiB command name", &status);
    assert!(matches!(status.code(), Code::InvalidArgument | Code::FailedPrecondition), "{:?}", status.code());
    assert_healthy(&pki, &url, "oversized fields").await;

    // 64 KiB of metadata, over the HTTP/2 header list limit (16 KiB).
    let mut request = tonic::Request::new(pb::ListNodesRequest {});
    for i in 0..64 {
        request.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(format!("x-junk-{i}").as_bytes()).unwrap(),
            "j".repeat(1024).parse().unwrap(),
        );
    }
    let status = fleet.list_nodes(request).await.expect_err("oversized metadata is refused");
    report("64 KiB of metadata", &status);
    assert_ne!(status.code(), Code::Ok);
    assert_healthy(&pki, &url, "oversized metadata").await;

    let after = stored(&mut fleet).await;
    assert_unchanged(&before, &after, &["deploy.apply"], "the whole battery");
    // One record per refused apply that reached the service: not the dry runs, and
    // not the spec over the message limit, which tonic refused before decoding it.
    let applies = after.audit.len() - before.audit.len();
    assert_eq!(applies, 7, "{:?}", after.audit);
    let verify = fleet.verify_audit(pb::VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(verify.intact, "{verify:?}");
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limits_refuse_clearly_and_spare_streams() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let config = "[limits]\nrequests_per_second_per_client = 1.0\nburst_per_client = 5\nmax_concurrent_requests = 1\nrequest_timeout = \"2s\"\n";
    let controller = tokio::task::spawn_blocking({
        let (dir, pki) = (dir.path().to_owned(), Pki { dir: pki.dir.clone() });
        move || Controller::start_configured(&dir, &pki, config)
    })
    .await
    .unwrap();
    let url = controller.url();

    // Per client: alice's sixth call at once is over her burst; bob is not affected.
    let mut alice = FleetClient::new(channel(&pki, &url, &pki.operator("alice", Role::Admin)).await);
    let mut bob = FleetClient::new(channel(&pki, &url, &pki.operator("bob", Role::Admin)).await);
    for _ in 0..5 {
        alice.list_nodes(pb::ListNodesRequest {}).await.unwrap();
    }
    let status = alice.list_nodes(pb::ListNodesRequest {}).await.expect_err("over the burst");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("may make 1 requests per second (burst 5); retry in"), "{status:?}");
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some(), "{status:?}");
    bob.list_nodes(pb::ListNodesRequest {}).await.unwrap();
    controller.proc.wait_for_log("client over its request rate");
    // The bucket refills: alice gets through again.
    let deadline = Instant::now() + PATIENCE;
    while alice.list_nodes(pb::ListNodesRequest {}).await.is_err() {
        assert!(Instant::now() < deadline, "alice never got through again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A silent agent: commands to it wait for a result that never comes.
    let (silent_tx, mut silent_in) =
        open(channel(&pki, &url, &pki.node("gpu-silent")).await, hello("gpu-silent")).await.unwrap();
    assert!(matches!(silent_in.message().await.unwrap().unwrap().body, Some(Down::Welcome(_))));

    // A watcher (carol) opened before: its stream must outlive the request timeout.
    let mut carol = FleetClient::new(channel(&pki, &url, &pki.operator("carol", Role::Viewer)).await);
    let mut watch = carol.watch_telemetry(pb::WatchTelemetryRequest::default()).await.unwrap().into_inner();
    let opened = Instant::now();

    // Bob's command holds the one request slot while it waits...
    let waiting = tokio::spawn({
        let mut bob = bob.clone();
        async move {
            bob.exec_command(pb::ExecCommandRequest {
                node_id: "gpu-silent".into(),
                command: "noop".into(),
                ..Default::default()
            })
            .await
        }
    });
    // ...so dave is shed at once rather than queued.
    let mut dave = FleetClient::new(channel(&pki, &url, &pki.operator("dave", Role::Admin)).await);
    let deadline = Instant::now() + PATIENCE;
    let shed = loop {
        match dave.list_nodes(pb::ListNodesRequest {}).await {
            Err(s) if s.code() == Code::ResourceExhausted && s.message().contains("overloaded") => break s,
            other => {
                assert!(Instant::now() < deadline, "never shed: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(shed.message().contains("limits.max_concurrent_requests"), "{shed:?}");
    assert!(shed.message().contains("retry in"), "{shed:?}");

    // The command is cut off at the request timeout (2 s), long before its own 60 s wait.
    let status = tokio::time::timeout(PATIENCE, waiting).await.unwrap().unwrap().expect_err("cut off");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("limits.request_timeout"), "{status:?}");
    controller.proc.wait_for_log("request cut off at limits.request_timeout");

    // The silent agent now sends telemetry: the watch, open for longer than the
    // timeout, still delivers it.
    for seq in 1..=3 {
        silent_tx.send(telemetry(batch(seq))).await.unwrap();
    }
    let update = tokio::time::timeout(PATIENCE, async {
        loop {
            match watch.message().await {
                Ok(Some(pb::WatchTelemetryResponse {
                    event: Some(pb::watch_telemetry_response::Event::Telemetry(t)),
                })) if t.node_id == "gpu-silent" => {
                    return t;
                }
                Ok(Some(_)) => continue,
                other => panic!("the watch ended: {other:?}"),
            }
        }
    })
    .await
    .expect("an update on the watch");
    assert!(opened.elapsed() > Duration::from_secs(2), "the update came before the timeout could have cut the stream");
    assert!(update.batch.is_some());
    // The agent stream is older still, and its batches are acknowledged.
    let acked = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(Down::Ack(a)) = silent_in.message().await.unwrap().unwrap().body {
                return a.seqs;
            }
        }
    })
    .await
    .unwrap();
    assert!(!acked.is_empty());
    drop(controller);
}
