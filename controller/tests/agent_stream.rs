//! Tier 2: the controller in-process on 127.0.0.1:0 with a temp-dir store,
//! driven by the generated clients over real mTLS.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/running.rs"]
mod running;

use std::time::Duration;

use flotilla_common::{Identity, NodeId, Role};
use flotilla_controller::store::{SledStore, Store};
use running::{acked, batch, start};

#[tokio::test]
async fn resent_batches_are_acked_again_and_stored_once() {
    let c = start().await;
    let (tx, mut inbound, welcome) = c.agent("n1", 1000).await;
    assert_eq!(welcome.last_stored_seq, 0);
    for seq in [1, 2] {
        tx.send(batch(seq)).await.unwrap();
    }
    acked(&mut inbound, 2).await;
    drop(tx);

    // The agent lost the acks and resends 2, then continues with 3.
    let (tx, mut inbound, welcome) = c.agent("n1", 1000).await;
    assert_eq!(welcome.last_stored_seq, 2, "the welcome tells what is already stored");
    tx.send(batch(2)).await.unwrap();
    tx.send(batch(3)).await.unwrap();
    assert_eq!(acked(&mut inbound, 2).await, [2, 3]);
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
