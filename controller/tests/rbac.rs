//! Tier 2: who may call what. Every Fleet method is called with a viewer, an
//! operator, an admin and an agent certificate over real mTLS; the allow-list
//! admits or refuses each before its handler runs. And a revoked node is cut
//! off at once and refused from then on, also after a restart.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/running.rs"]
mod running;

use std::time::Duration;

use flotilla_common::{Identity, NodeId, Role};
use flotilla_controller::auth::{FLEET_METHODS, fleet_min_role};
use flotilla_proto::pb;
use flotilla_proto::pb::fleet_client::FleetClient;
use running::{Running, start, start_in};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Every Fleet method, called with an empty request, with the least role the
/// issue asks for: (method, least role, outcome).
async fn call_every_method(c: &mut FleetClient<Channel>) -> Vec<(&'static str, Role, Result<(), Status>)> {
    use Role::{Admin, Operator, Viewer};
    let mut out = Vec::new();
    out.push(("ListNodes", Viewer, c.list_nodes(pb::ListNodesRequest::default()).await.map(drop)));
    out.push(("GetNode", Viewer, c.get_node(pb::GetNodeRequest::default()).await.map(drop)));
    out.push(("ListAudit", Viewer, c.list_audit(pb::ListAuditRequest::default()).await.map(drop)));
    out.push(("VerifyAudit", Viewer, c.verify_audit(pb::VerifyAuditRequest::default()).await.map(drop)));
    out.push(("QueryMetrics", Viewer, c.query_metrics(pb::QueryMetricsRequest::default()).await.map(drop)));
    out.push(("WatchTelemetry", Viewer, c.watch_telemetry(pb::WatchTelemetryRequest::default()).await.map(drop)));
    out.push(("ListAlerts", Viewer, c.list_alerts(pb::ListAlertsRequest::default()).await.map(drop)));
    out.push(("ListSilences", Viewer, c.list_silences(pb::ListSilencesRequest::default()).await.map(drop)));
    out.push(("ListRules", Viewer, c.list_rules(pb::ListRulesRequest::default()).await.map(drop)));
    out.push(("CheckRules", Viewer, c.check_rules(pb::CheckRulesRequest::default()).await.map(drop)));
    let history = c.list_alert_history(pb::ListAlertHistoryRequest::default()).await.map(drop);
    out.push(("ListAlertHistory", Viewer, history));
    out.push(("ListDeployments", Viewer, c.list_deployments(pb::ListDeploymentsRequest::default()).await.map(drop)));
    let history = c.get_deployment_history(pb::GetDeploymentHistoryRequest::default()).await.map(drop);
    out.push(("GetDeploymentHistory", Viewer, history));
    out.push(("GetRollout", Viewer, c.get_rollout(pb::GetRolloutRequest::default()).await.map(drop)));
    out.push(("CapacityReport", Viewer, c.capacity_report(pb::CapacityReportRequest::default()).await.map(drop)));
    out.push(("Diagnose", Viewer, c.diagnose(pb::DiagnoseRequest::default()).await.map(drop)));
    out.push(("ExecCommand", Operator, c.exec_command(pb::ExecCommandRequest::default()).await.map(drop)));
    out.push(("InjectFault", Operator, c.inject_fault(pb::InjectFaultRequest::default()).await.map(drop)));
    out.push(("AckAlert", Operator, c.ack_alert(pb::AckAlertRequest::default()).await.map(drop)));
    out.push(("CreateSilence", Operator, c.create_silence(pb::CreateSilenceRequest::default()).await.map(drop)));
    out.push(("ExpireSilence", Operator, c.expire_silence(pb::ExpireSilenceRequest::default()).await.map(drop)));
    let apply = c.apply_deployment(pb::ApplyDeploymentRequest::default()).await.map(drop);
    out.push(("ApplyDeployment", Operator, apply));
    out.push(("OperateRollout", Operator, c.operate_rollout(pb::OperateRolloutRequest::default()).await.map(drop)));
    out.push(("ReloadRules", Admin, c.reload_rules(pb::ReloadRulesRequest::default()).await.map(drop)));
    out.push(("RevokeNode", Admin, c.revoke_node(pb::RevokeNodeRequest::default()).await.map(drop)));
    let token = c.create_join_token(pb::CreateJoinTokenRequest::default()).await.map(drop);
    out.push(("CreateJoinToken", Admin, token));
    out.push(("ListJoinTokens", Admin, c.list_join_tokens(pb::ListJoinTokensRequest::default()).await.map(drop)));
    let revoked = c.revoke_join_token(pb::RevokeJoinTokenRequest::default()).await.map(drop);
    out.push(("RevokeJoinToken", Admin, revoked));
    out.push(("ListApprovals", Viewer, c.list_approvals(pb::ListApprovalsRequest::default()).await.map(drop)));
    out.push(("GetApproval", Viewer, c.get_approval(pb::GetApprovalRequest::default()).await.map(drop)));
    out.push(("GetVersion", Viewer, c.get_version(pb::GetVersionRequest::default()).await.map(drop)));
    let decided = c.decide_approval(pb::DecideApprovalRequest::default()).await.map(drop);
    out.push(("DecideApproval", Operator, decided));
    out.push(("CreateBackup", Admin, c.create_backup(pb::CreateBackupRequest::default()).await.map(drop)));
    out
}

async fn fleet_as(c: &Running, identity: &Identity) -> FleetClient<Channel> {
    FleetClient::new(c.channel(identity).await)
}

#[tokio::test]
async fn every_fleet_method_admits_exactly_the_roles_in_the_table() {
    let c = start().await;
    for role in [Role::Viewer, Role::Operator, Role::Admin] {
        let identity = Identity::Operator { name: format!("{role}-user"), role };
        let mut client = fleet_as(&c, &identity).await;
        let outcomes = call_every_method(&mut client).await;
        let called: Vec<&str> = outcomes.iter().map(|(m, _, _)| *m).collect();
        for (method, _) in FLEET_METHODS {
            assert!(
                called.contains(method),
                "{method} is in the allow-list but this test does not call it: add it to call_every_method"
            );
        }
        for (method, least, outcome) in outcomes {
            assert_eq!(fleet_min_role(method), Some(least), "{method}: the allow-list disagrees with the issue");
            match outcome {
                Err(status) if role < least => {
                    assert_eq!(status.code(), Code::PermissionDenied, "{method} as {role}: {status:?}");
                    assert!(status.message().contains(&format!("needs role {least}")), "{method}: {status:?}");
                }
                Ok(()) if role < least => panic!("{method} admitted {role}, below {least}"),
                Err(status) => assert!(
                    !matches!(status.code(), Code::PermissionDenied | Code::Unauthenticated),
                    "{method} refused {role}: {status:?}"
                ),
                Ok(()) => {}
            }
        }
    }

    // An agent's certificate may call no Fleet method at all.
    let agent = Identity::Node(NodeId::new("gpu-a").unwrap());
    let mut client = fleet_as(&c, &agent).await;
    for (method, _, outcome) in call_every_method(&mut client).await {
        let status = outcome.expect_err(method);
        assert_eq!(status.code(), Code::PermissionDenied, "{method}: {status:?}");
        assert!(status.message().contains("the Fleet API is for operators"), "{method}: {status:?}");
    }

    // And an operator's certificate may not stream as an agent.
    let admin = Identity::Operator { name: "admin".into(), role: Role::Admin };
    let mut agent_api = pb::agent_service_client::AgentServiceClient::new(c.channel(&admin).await);
    let status = agent_api.connect(tokio_stream::iter(Vec::<pb::AgentMessage>::new())).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    c.shutdown().await;
}

/// The status that ends `inbound`, skipping messages before it.
async fn end_of(inbound: &mut tonic::Streaming<pb::ControllerMessage>) -> Status {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream closed without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("hang guard")
}

/// Opens an agent stream as `node` with an ordinary hello and waits for the
/// first answer; the sender keeps the stream open while held.
async fn try_connect(
    c: &Running,
    node: &str,
) -> Result<(tokio::sync::mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::ControllerMessage>), Status> {
    use flotilla_proto::pb::agent_message::Body as Up;
    let channel = c.channel(&Identity::Node(NodeId::new(node).unwrap())).await;
    let hello = pb::AgentMessage {
        body: Some(Up::Hello(pb::Hello {
            protocol_version: flotilla_proto::PROTOCOL_VERSION,
            node_id: node.into(),
            inventory: Some(pb::Inventory { hostname: node.into(), ..Default::default() }),
            heartbeat_interval_ms: 1000,
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello).await.unwrap();
    let mut inbound = pb::agent_service_client::AgentServiceClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    inbound.message().await?;
    Ok((tx, inbound))
}

#[tokio::test]
async fn a_revoked_node_is_cut_off_and_refused_also_after_a_restart() {
    let c = start().await;
    let (_tx, mut inbound, _) = c.agent("gpu-a", 1000).await;
    let (_other_tx, _other, _) = c.agent("gpu-b", 1000).await;

    // Only an admin may revoke.
    for role in [Role::Viewer, Role::Operator] {
        let mut client = fleet_as(&c, &Identity::Operator { name: "eve".into(), role }).await;
        let req = pb::RevokeNodeRequest { node_id: "gpu-a".into(), reason: "no".into() };
        assert_eq!(client.revoke_node(req).await.unwrap_err().code(), Code::PermissionDenied);
    }
    let mut admin = c.fleet().await;
    let req = pb::RevokeNodeRequest { node_id: "gpu-a".into(), reason: "".into() };
    assert_eq!(admin.revoke_node(req).await.unwrap_err().code(), Code::InvalidArgument, "a reason is required");
    let req = pb::RevokeNodeRequest { node_id: "gpu-a".into(), reason: "disk sold on eBay".into() };
    let revoked = admin.revoke_node(req.clone()).await.unwrap().into_inner();
    assert!(revoked.stream_closed && !revoked.already_revoked, "{revoked:?}");
    assert_eq!(revoked.revoked_by, "operator admin (admin)");
    assert_eq!(revoked.certificate_serials.len(), 1, "the live stream's certificate: {revoked:?}");

    // The live stream ends at once, with the reason.
    let status = end_of(&mut inbound).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node gpu-a was revoked at"), "{status:?}");
    assert!(status.message().contains("by operator admin (admin): disk sold on eBay"), "{status:?}");
    // Reconnecting is refused with the same words.
    let status = try_connect(&c, "gpu-a").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("was revoked"), "{status:?}");
    // A second revoke changes nothing.
    let again = admin.revoke_node(req).await.unwrap().into_inner();
    assert!(again.already_revoked && again.revoked_at_unix_ms == revoked.revoked_at_unix_ms, "{again:?}");

    let node = admin.get_node(pb::GetNodeRequest { node_id: "gpu-a".into() }).await.unwrap().into_inner();
    assert_eq!(node.state(), pb::NodeState::Revoked);
    assert!(node.state_reason.contains("disk sold on eBay"), "{node:?}");
    let node = admin.get_node(pb::GetNodeRequest { node_id: "gpu-b".into() }).await.unwrap().into_inner();
    assert_eq!(node.state(), pb::NodeState::Up, "other nodes carry on");

    let audit = admin.list_audit(pb::ListAuditRequest::default()).await.unwrap().into_inner();
    let entry = audit.records.iter().find(|r| r.action == "node.revoke").expect("the revocation is audited");
    assert_eq!((entry.target.as_str(), entry.actor.as_str()), ("gpu-a", "operator admin (admin)"));
    assert_eq!(audit.records.iter().filter(|r| r.action == "node.revoke").count(), 1);
    drop(admin);

    // After a restart the revocation still holds: it is loaded from the store.
    let (dir, _) = c.shutdown().await;
    let c = start_in(dir).await;
    let status = try_connect(&c, "gpu-a").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("disk sold on eBay"), "{status:?}");
    assert!(try_connect(&c, "gpu-b").await.is_ok(), "only the revoked node is refused");
    c.shutdown().await;
}
