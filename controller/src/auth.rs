//! Caller identity from the verified client certificate of the TLS connection.
//! The certificate chain was verified against the fleet CA during the handshake;
//! here we only read which identity it proves.

use flotilla_common::{Identity, NodeId, Role};
use tonic::{Request, Status};

/// The identity of the caller of `request`.
pub fn identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate from the fleet CA is required"))?;
    let leaf =
        certs.first().ok_or_else(|| Status::unauthenticated("a client certificate from the fleet CA is required"))?;
    Identity::from_der(leaf).map_err(|e| {
        tracing::warn!(peer = ?request.remote_addr(), error = %e, "refused a certificate without a usable identity");
        Status::unauthenticated(format!("client certificate: {e}"))
    })
}

/// The node id of an agent caller; anyone else is refused.
pub fn require_node<T>(request: &Request<T>) -> Result<NodeId, Status> {
    match identity(request)? {
        Identity::Node(id) => Ok(id),
        other => {
            tracing::warn!(peer = ?request.remote_addr(), identity = %other, "non-agent identity called AgentService");
            Err(Status::permission_denied(format!("AgentService is for agents; this certificate identifies {other}")))
        }
    }
}

/// The name and role of an operator caller; agents are refused.
pub fn require_operator<T>(request: &Request<T>) -> Result<(String, Role), Status> {
    match identity(request)? {
        Identity::Operator { name, role } => Ok((name, role)),
        other => {
            tracing::warn!(peer = ?request.remote_addr(), identity = %other, "non-operator identity called Fleet");
            Err(Status::permission_denied(format!(
                "the Fleet API is for operators; this certificate identifies {other}"
            )))
        }
    }
}
