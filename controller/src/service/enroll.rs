//! `flotilla.v1.Enrollment` (on the enrollment port only) and certificate
//! renewal on the AgentService stream: both sign an agent's certificate request
//! with the fleet CA key. Every refusal is logged and (within a bound) audited;
//! a join token never appears in either, only its public id.

use std::net::SocketAddr;

use flotilla_common::enroll::JoinSecret;
use flotilla_common::time::now_unix_ms;
use flotilla_common::{Identity, NodeId};
use flotilla_proto::pb;
use flotilla_proto::pb::enrollment_server::Enrollment as EnrollmentService;
use tonic::{Request, Response, Status};

use super::{Context, blocking};
use crate::audit::AuditEntry;
use crate::enroll::RefusalAudit;

/// The Enrollment implementation.
#[derive(Debug, Clone)]
pub struct EnrollmentApi {
    ctx: Context,
}

impl EnrollmentApi {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

/// The audit log's name for an anonymous caller holding a join token.
fn token_actor(token_id: &str) -> String {
    if token_id.is_empty() { "enrollment (no valid token)".to_owned() } else { format!("join token {token_id}") }
}

/// One refused enrollment: logged, audited within the bound, answered with `status`.
async fn refuse(ctx: &Context, peer: Option<SocketAddr>, node: &str, token_id: &str, status: Status) -> Status {
    let reason = status.message().to_owned();
    tracing::warn!(?peer, node_id = node, token_id, %reason, "refused an enrollment");
    if let RefusalAudit::Audit { suppressed } = ctx.enrollment.audit_refusal(tokio::time::Instant::now()) {
        let mut detail = serde_json::json!({ "reason": reason, "peer": peer.map(|p| p.to_string()) });
        if suppressed > 0 {
            detail["earlier_refusals_not_audited"] = suppressed.into();
        }
        let entry = AuditEntry::now(&token_actor(token_id), "node.enroll.refused", node, &detail);
        let store = ctx.store.clone();
        // A refusal is answered even if the audit write fails; the failure is logged.
        let _ = blocking("writing the audit log", move || store.append_audit(entry)).await;
    }
    status
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    #[tracing::instrument(skip_all, fields(node_id, peer))]
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let ctx = &self.ctx;
        let peer = request.remote_addr();
        tracing::Span::current().record("peer", tracing::field::debug(&peer));
        let req = request.into_inner();
        // Bound what an anonymous caller can make us log or audit.
        let claimed: String = req.node_id.chars().take(80).collect();
        tracing::Span::current().record("node_id", claimed.as_str());
        let Ok(secret) = JoinSecret::parse(&req.token_secret) else {
            return Err(refuse(ctx, peer, &claimed, "", Status::unauthenticated("malformed join token")).await);
        };
        let hash = secret.hash();
        let token_id = hash.id();
        let node = match NodeId::new(claimed.clone()) {
            Ok(node) => node,
            Err(e) => {
                let status = Status::invalid_argument(format!("node id {claimed:?}: {e}"));
                return Err(refuse(ctx, peer, &claimed, &token_id, status).await);
            }
        };
        let Some(authority) = ctx.enrollment.authority() else {
            let status = Status::failed_precondition("enrollment is disabled: the controller has no tls.ca_key");
            return Err(refuse(ctx, peer, &claimed, &token_id, status).await);
        };
        if let Some(revoked) = ctx.registry.revocation(&node) {
            return Err(refuse(ctx, peer, &claimed, &token_id, Status::permission_denied(revoked.to_string())).await);
        }
        // Sign first: a bad request must not cost the token a use. The
        // certificate leaves only once the use is stored.
        let identity = Identity::Node(node.clone());
        let signed = match authority.sign_request(&req.csr_der, &identity, ctx.enrollment.cert_ttl) {
            Ok(signed) => signed,
            Err(e) => {
                return Err(refuse(ctx, peer, &claimed, &token_id, Status::invalid_argument(e.to_string())).await);
            }
        };
        let _one_at_a_time = ctx.enrollment.gate.lock().await;
        let store = ctx.store.clone();
        let id = node.clone();
        let now = now_unix_ms();
        let outcome = blocking("enrolling a node", move || {
            // A token enrolls new nodes only: taking over a known node's identity
            // needs its key, not a token.
            let known = store.node(&id)?.is_some() || store.join_tokens()?.iter().any(|t| t.enrolled.contains(&id));
            if known {
                return Ok(Err(None));
            }
            Ok(store.spend_join_token(&hash, &id, now)?.map_err(Some))
        })
        .await?;
        let record = match outcome {
            Ok(record) => record,
            Err(None) => {
                let status = Status::already_exists(format!(
                    "node {node} is already known to this controller: a join token enrolls a new node id only \
                     (choose another node_id, or issue this node a certificate by hand)"
                ));
                return Err(refuse(ctx, peer, &claimed, &token_id, status).await);
            }
            Err(Some(refusal)) => {
                let status = Status::permission_denied(refusal.to_string());
                return Err(refuse(ctx, peer, &claimed, &token_id, status).await);
            }
        };
        let detail = serde_json::json!({
            "token_id": token_id,
            "uses_left": record.uses_left,
            "not_after_unix_ms": signed.not_after_unix_ms,
            "peer": peer.map(|p| p.to_string()),
        });
        let entry = AuditEntry::now(&token_actor(&token_id), "node.enroll", node.as_str(), &detail);
        let store = ctx.store.clone();
        blocking("writing the audit log", move || store.append_audit(entry)).await?;
        tracing::info!(token_id, uses_left = record.uses_left, "node enrolled with a join token");
        Ok(Response::new(pb::EnrollResponse {
            certificate_pem: signed.cert_pem,
            ca_pem: authority.ca_pem().to_owned(),
            command_key_pem: ctx.enrollment.command_key_pem.clone(),
            labels: record.labels.into_iter().collect(),
            not_after_unix_ms: signed.not_after_unix_ms,
        }))
    }
}

/// Binds the enrollment port (when `enroll_listen` is set) and serves only the
/// Enrollment service there until shutdown. The TLS handshake runs through the
/// same bounded accept loop as the mTLS port, without client authentication.
pub async fn serve_port(
    ctx: Context,
    tracker: &tokio_util::task::TaskTracker,
    refused: prometheus::IntCounter,
) -> Result<(), crate::ControllerError> {
    use crate::enroll::limits;
    let Some((listener, addr)) = crate::enroll::bind(&ctx.config).await? else {
        return Ok(());
    };
    let tls = crate::enroll::server_tls(&ctx.config)?;
    let fingerprint = ctx.enrollment.authority().map(|a| a.fingerprint().to_string()).unwrap_or_default();
    let incoming = crate::listener::incoming(
        listener,
        tls,
        ctx.config.limits.handshake_timeout,
        limits::MAX_HANDSHAKES,
        ctx.shutdown.clone(),
        tracker,
        refused,
    );
    let shutdown = ctx.shutdown.clone();
    let service = pb::enrollment_server::EnrollmentServer::new(EnrollmentApi::new(ctx))
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);
    let server = tonic::transport::Server::builder()
        // One small unary call per agent: a slow or greedy caller is cut off.
        .timeout(limits::CALL_TIMEOUT)
        .concurrency_limit_per_connection(limits::PER_CONNECTION)
        .max_concurrent_streams(Some(4))
        .add_service(service);
    tracker.spawn(async move {
        if let Err(error) = server.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await {
            tracing::error!(%error, "enrollment port failed");
        }
    });
    tracing::info!(enroll_addr = %addr, ca_fingerprint = %fingerprint, "enrollment listening (TLS, server authentication only)");
    Ok(())
}

/// Renews the certificate of `node` (the identity of the stream's certificate)
/// over the request's public key. The answer goes back on the same stream.
pub async fn renew(ctx: &Context, node: &NodeId, request: pb::RenewRequest) -> pb::RenewResponse {
    let refused = |error: String| {
        tracing::warn!(node_id = %node, %error, "refused a certificate renewal");
        pb::RenewResponse { certificate_pem: String::new(), error, not_after_unix_ms: 0 }
    };
    let Some(authority) = ctx.enrollment.authority() else {
        return refused("renewal is disabled: the controller has no tls.ca_key".to_owned());
    };
    if let Err(ago) = ctx.enrollment.admit_renewal(node, tokio::time::Instant::now()) {
        return refused(format!(
            "renewed {} ms ago; at most one renewal every {}s",
            ago.as_millis(),
            crate::enroll::MIN_RENEW_INTERVAL.as_secs()
        ));
    }
    let identity = Identity::Node(node.clone());
    let signed = match authority.sign_request(&request.csr_der, &identity, ctx.enrollment.cert_ttl) {
        Ok(signed) => signed,
        Err(e) => return refused(e.to_string()),
    };
    let detail = serde_json::json!({ "not_after_unix_ms": signed.not_after_unix_ms });
    let entry = AuditEntry::now(&identity.to_string(), "node.renew", node.as_str(), &detail);
    let store = ctx.store.clone();
    if blocking("writing the audit log", move || store.append_audit(entry)).await.is_err() {
        return refused("the controller could not write its audit log; see its log".to_owned());
    }
    tracing::info!(node_id = %node, not_after_unix_ms = signed.not_after_unix_ms, "renewed a node certificate");
    pb::RenewResponse {
        certificate_pem: signed.cert_pem,
        error: String::new(),
        not_after_unix_ms: signed.not_after_unix_ms,
    }
}
