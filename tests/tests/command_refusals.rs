//! The agent binary against a hostile controller (a fake one in this test that
//! holds a key the agent pins): tampered, mis-targeted, expired, older-version,
//! unsigned and foreign-key envelopes — each a real `deploy` of the stand-in —
//! are refused with their reason and the engine shows no new container; a
//! resent command does not run twice, also after the agent restarts.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::command::Command as Cmd;
use flotilla_common::envelope::{CommandId, CommandKey, DEFAULT_TTL, Envelope, SignedEnvelope};
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body as Up;
use flotilla_proto::pb::agent_service_server::{AgentService, AgentServiceServer};
use flotilla_proto::pb::controller_message::Body as Down;
use flotilla_tests::{Agent, AgentOpts, Pki, eventually_within, free_port, standin_image};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// A fake controller: welcomes the agent, acks its telemetry, sends whatever
/// envelopes the test queues, and records the results.
#[derive(Clone, Default)]
struct FakeController {
    to_send: Arc<Mutex<Vec<SignedEnvelope>>>,
    results: Arc<Mutex<Vec<pb::CommandResult>>>,
}

#[tonic::async_trait]
impl AgentService for FakeController {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            let welcome = pb::Welcome { protocol_version: 1, ..Default::default() };
            let _ = tx.send(Ok(pb::ControllerMessage { body: Some(Down::Welcome(welcome)) })).await;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(pb::AgentMessage { body: Some(Up::Telemetry(b)) })) => {
                            let ack = pb::Ack { seqs: vec![b.seq] };
                            let _ = tx.send(Ok(pb::ControllerMessage { body: Some(Down::Ack(ack)) })).await;
                        }
                        Ok(Some(pb::AgentMessage { body: Some(Up::CommandResult(r)) })) => me.results.lock().unwrap().push(r),
                        Ok(Some(_)) => {}
                        _ => return,
                    },
                    _ = tick.tick() => {
                        let queued: Vec<SignedEnvelope> = std::mem::take(&mut *me.to_send.lock().unwrap());
                        for s in queued {
                            let cmd = pb::SignedCommand { envelope: s.bytes, signature: s.signature };
                            let _ = tx.send(Ok(pb::ControllerMessage { body: Some(Down::Command(cmd)) })).await;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn deploy(name: &str, image: &str) -> Cmd {
    Cmd::Deploy { spec_yaml: format!("name: {name}\nrevision: \"1\"\nimage: {image}\n") }
}

fn containers_named(prefix: &str) -> usize {
    let out = Command::new("docker").args(["ps", "-a", "-q", "--filter", &format!("name={prefix}")]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_envelopes_never_run() {
    let image = standin_image();
    flotilla_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let key = CommandKey::generate();
    let pub_path = dir.path().join("command-signing.pub");
    key.public().write(&pub_path).unwrap();

    let fake = FakeController::default();
    let port = free_port();
    let c = pki.controller();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(std::fs::read(&c.cert).unwrap(), std::fs::read(&c.key).unwrap()))
        .client_ca_root(Certificate::from_pem(std::fs::read(pki.ca()).unwrap()));
    let server = Server::builder().tls_config(tls).unwrap().add_service(AgentServiceServer::new(fake.clone()));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::spawn(async move { server.serve(addr).await.unwrap() });

    let url = format!("https://127.0.0.1:{port}");
    let config = format!("command_key = \"{}\"\n", pub_path.display());
    let mut agent = tokio::task::spawn_blocking({
        let (dir, pki, url) = (dir.path().to_owned(), Pki { dir: pki.dir.clone() }, url.clone());
        move || {
            Agent::start(
                &dir,
                &pki,
                &url,
                "gpu-a",
                AgentOpts { gpus: 1, config_toml: Some(config), ..Default::default() },
            )
        }
    })
    .await
    .unwrap();

    let me = NodeId::new("gpu-a").unwrap();
    let prefix = format!("flotilla-test-forged-{}", std::process::id());
    let now = now_unix_ms();
    let sign = |k: &CommandKey, target: &NodeId, name: &str, ttl: Duration, at: i64| {
        k.sign(CommandId::new(), target, deploy(&format!("{prefix}-{name}"), &image), ttl, at).unwrap()
    };
    let mut tampered = sign(&key, &me, "tampered", DEFAULT_TTL, now);
    let i = tampered.bytes.len() / 2;
    tampered.bytes[i] ^= 0x20;
    let wrong_target = sign(&key, &NodeId::new("gpu-b").unwrap(), "target", DEFAULT_TTL, now);
    let expired = sign(&key, &me, "expired", Duration::from_secs(1), now - 120_000);
    let older = key
        .sign_envelope(&Envelope {
            version: 0,
            id: CommandId::new(),
            target: me.clone(),
            issued_at_unix_ms: now,
            expires_at_unix_ms: now + 10_000,
            key_id: key.key_id().to_owned(),
            payload: deploy(&format!("{prefix}-older"), &image),
        })
        .unwrap();
    let mut unsigned = sign(&key, &me, "unsigned", DEFAULT_TTL, now);
    unsigned.signature.clear();
    let foreign = sign(&CommandKey::generate(), &me, "foreign", DEFAULT_TTL, now);
    let noop = key.sign(CommandId::new(), &me, Cmd::Noop, DEFAULT_TTL, now).unwrap();
    let forged = [tampered, wrong_target, expired, older, unsigned, foreign];
    fake.to_send.lock().unwrap().extend(forged.iter().cloned().chain([noop.clone()]));

    let results = eventually_within_async(&fake, 7).await;
    let refused: Vec<&pb::CommandResult> =
        results.iter().filter(|r| r.status == pb::CommandStatus::Refused as i32).collect();
    assert_eq!(refused.len(), 6, "{results:#?}");
    let reasons: Vec<&str> = refused.iter().map(|r| r.detail.as_str()).collect();
    for want in ["signature", "targets node gpu-b", "expired", "version 0"] {
        assert!(reasons.iter().any(|r| r.contains(want)), "no refusal mentions {want:?}: {reasons:?}");
    }
    let ran = results.iter().find(|r| r.command_id == noop_id(&noop)).expect("the valid noop answered");
    assert_eq!(ran.status, pb::CommandStatus::Succeeded as i32);
    assert_eq!(containers_named(&prefix), 0, "the engine shows no container from a forged envelope");

    // The same envelope again: answered with the stored result, not run twice.
    fake.results.lock().unwrap().clear();
    fake.to_send.lock().unwrap().push(noop.clone());
    let resent = eventually_within_async(&fake, 1).await;
    assert_eq!(resent[0].status, pb::CommandStatus::Succeeded as i32);

    // After a restart the agent still knows the id: the resend is answered, not run again.
    agent.proc.kill9();
    agent.restart();
    fake.results.lock().unwrap().clear();
    fake.to_send.lock().unwrap().push(noop.clone());
    let again = eventually_within_async(&fake, 1).await;
    assert_eq!(again[0].command_id, noop_id(&noop));
    assert_eq!(again[0].status, pb::CommandStatus::Succeeded as i32);
    let log = agent.proc.log_text();
    assert_eq!(log.matches("executing signed command").count(), 1, "the noop ran once in all: {log}");
    assert!(log.contains("refused a command"));
}

fn noop_id(s: &SignedEnvelope) -> Vec<u8> {
    let e: Envelope<Cmd> = postcard::from_bytes(&s.bytes[2..]).unwrap();
    e.id.as_bytes().to_vec()
}

async fn eventually_within_async(fake: &FakeController, n: usize) -> Vec<pb::CommandResult> {
    let fake = fake.clone();
    tokio::task::spawn_blocking(move || {
        eventually_within(Duration::from_secs(60), &format!("{n} command results"), |last| {
            let r = fake.results.lock().unwrap().clone();
            *last = format!("{} results", r.len());
            (r.len() >= n).then_some(r)
        })
    })
    .await
    .unwrap()
}
