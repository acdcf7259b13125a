//! Who the caller is and what it may call. The certificate chain was verified
//! against the fleet CA during the handshake; here we read which identity it
//! proves and decide, from one table, whether that identity may call the method.
//!
//! Architecture Invariant: every `Fleet` call passes [`FleetAuthorized`] before
//! any handler runs; a method missing from [`FLEET_METHODS`] is refused.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use flotilla_common::{Identity, NodeId, Role};
use futures::future::{Either, Ready, ready};
use rustls::pki_types::CertificateDer;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

/// The full name of the operator API.
pub const FLEET_SERVICE: &str = "flotilla.v1.Fleet";

/// Every `Fleet` method and the least role that may call it (roles are ordered
/// viewer < operator < admin). Default deny: a method not listed here is refused
/// for everyone, and a unit test fails while any RPC of the service is unlisted.
pub const FLEET_METHODS: &[(&str, Role)] = &[
    // Reads.
    ("ListNodes", Role::Viewer),
    ("GetNode", Role::Viewer),
    ("ListAudit", Role::Viewer),
    ("VerifyAudit", Role::Viewer),
    ("QueryMetrics", Role::Viewer),
    ("WatchTelemetry", Role::Viewer),
    ("ListAlerts", Role::Viewer),
    ("ListSilences", Role::Viewer),
    ("ListRules", Role::Viewer),
    ("CheckRules", Role::Viewer),
    ("ListAlertHistory", Role::Viewer),
    ("ListDeployments", Role::Viewer),
    ("GetDeploymentHistory", Role::Viewer),
    ("GetRollout", Role::Viewer),
    ("CapacityReport", Role::Viewer),
    ("Diagnose", Role::Viewer),
    ("ListApprovals", Role::Viewer),
    ("GetApproval", Role::Viewer),
    ("GetVersion", Role::Viewer),
    // Actions on nodes, alerts and deployments.
    ("ExecCommand", Role::Operator),
    ("InjectFault", Role::Operator),
    ("AckAlert", Role::Operator),
    ("CreateSilence", Role::Operator),
    ("ExpireSilence", Role::Operator),
    ("ApplyDeployment", Role::Operator),
    ("OperateRollout", Role::Operator),
    // Approving needs admin and rejecting admin or the requester: the handler decides.
    ("DecideApproval", Role::Operator),
    // What changes the controller's policy or who belongs to the fleet.
    ("ReloadRules", Role::Admin),
    ("RevokeNode", Role::Admin),
    // Join tokens (enrollment).
    ("CreateJoinToken", Role::Admin),
    ("ListJoinTokens", Role::Admin),
    ("RevokeJoinToken", Role::Admin),
    // The whole store, secrets' hashes and the audit log included.
    ("CreateBackup", Role::Admin),
];

/// The least role that may call `method` of the Fleet service, if it is listed.
pub fn fleet_min_role(method: &str) -> Option<Role> {
    FLEET_METHODS.iter().find(|(m, _)| *m == method).map(|(_, role)| *role)
}

/// The operator a Fleet call was admitted for; [`FleetAuthorized`] puts it in
/// the request's extensions, and handlers read it with [`require_operator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The caller as the audit log names it.
    pub fn actor(&self) -> String {
        Identity::Operator { name: self.name.clone(), role: self.role }.to_string()
    }
}

/// Decides whether `identity` may call Fleet `method`: the one allow-list check.
pub fn authorize_fleet(method: &str, identity: Identity) -> Result<Caller, Status> {
    let (name, role) = match identity {
        Identity::Operator { name, role } => (name, role),
        other => {
            return Err(Status::permission_denied(format!(
                "the Fleet API is for operators; this certificate identifies {other}"
            )));
        }
    };
    let Some(needed) = fleet_min_role(method) else {
        return Err(Status::permission_denied(format!(
            "{FLEET_SERVICE}/{method} is not in the controller's allow-list, so no role may call it"
        )));
    };
    if role < needed {
        return Err(Status::permission_denied(format!(
            "operator {name} has role {role}; {method} needs role {needed} or higher: ask an admin for such a certificate"
        )));
    }
    Ok(Caller { name, role })
}

/// Reads the identity from a verified peer certificate chain.
fn identity_of(certs: Option<&[CertificateDer<'static>]>, peer: Option<SocketAddr>) -> Result<Identity, Status> {
    let missing = || Status::unauthenticated("a client certificate from the fleet CA is required");
    let leaf = certs.and_then(<[_]>::first).ok_or_else(missing)?;
    Identity::from_der(leaf).map_err(|e| {
        tracing::warn!(?peer, error = %e, "refused a certificate without a usable identity");
        Status::unauthenticated(format!("client certificate: {e}"))
    })
}

/// The identity of the caller of `request`.
pub fn identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    identity_of(request.peer_certs().as_deref().map(Vec::as_slice), request.remote_addr())
}

/// The serial number (lowercase hex) of the caller's certificate, if readable.
pub fn certificate_serial<T>(request: &Request<T>) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let certs = request.peer_certs()?;
    let (_, cert) = X509Certificate::from_der(certs.first()?).ok()?;
    Some(cert.raw_serial_as_string().replace(':', ""))
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

/// The name and role of the operator that [`FleetAuthorized`] admitted for this
/// call. Without its mark the call is refused: the allow-list cannot be skipped.
pub fn require_operator<T>(request: &Request<T>) -> Result<(String, Role), Status> {
    match request.extensions().get::<Caller>() {
        Some(caller) => Ok((caller.name.clone(), caller.role)),
        None => {
            tracing::error!("a Fleet handler ran without the allow-list; refusing the call");
            Err(Status::permission_denied("this call was not authorized by the Fleet allow-list"))
        }
    }
}

/// Middleware around the Fleet service: reads the caller's certificate, checks
/// the method against [`FLEET_METHODS`] and refuses before the handler runs.
#[derive(Debug, Clone)]
pub struct FleetAuthorized<S> {
    inner: S,
}

impl<S> FleetAuthorized<S> {
    /// Wraps the generated Fleet server.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for FleetAuthorized<S> {
    const NAME: &'static str = S::NAME;
}

/// The allow-list's answer for one HTTP request: the admitted caller or a refusal.
fn admit(request: &http::Request<Body>) -> Result<Caller, Status> {
    let path = request.uri().path();
    let method = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(FLEET_SERVICE))
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or(path);
    let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
    let peer = tls.and_then(|t| t.get_ref().remote_addr());
    let certs: Option<Arc<Vec<CertificateDer<'static>>>> = tls.and_then(TlsConnectInfo::peer_certs);
    let identity = identity_of(certs.as_deref().map(Vec::as_slice), peer)?;
    let shown = identity.to_string();
    authorize_fleet(method, identity).inspect_err(|status| {
        tracing::warn!(?peer, identity = %shown, method, reason = status.message(), "refused a Fleet call");
    })
}

impl<S> Service<http::Request<Body>> for FleetAuthorized<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match admit(&request) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Either::Left(self.inner.call(request))
            }
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operator(role: Role) -> Identity {
        Identity::Operator { name: "ann".into(), role }
    }

    /// The methods of `flotilla.v1.Fleet` as the compiled descriptor set lists
    /// them: the generated service, not a list kept by hand.
    fn fleet_rpcs() -> Vec<String> {
        use prost::Message;
        #[derive(Clone, PartialEq, prost::Message)]
        struct FileSet {
            #[prost(message, repeated, tag = "1")]
            file: Vec<File>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct File {
            #[prost(string, optional, tag = "2")]
            package: Option<String>,
            #[prost(message, repeated, tag = "6")]
            service: Vec<ServiceDesc>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct ServiceDesc {
            #[prost(string, optional, tag = "1")]
            name: Option<String>,
            #[prost(message, repeated, tag = "2")]
            method: Vec<MethodDesc>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct MethodDesc {
            #[prost(string, optional, tag = "1")]
            name: Option<String>,
        }
        let set = FileSet::decode(flotilla_proto::FILE_DESCRIPTOR_SET).unwrap();
        let rpcs: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| (f.package.clone().unwrap_or_default(), s)))
            .filter(|(package, s)| format!("{package}.{}", s.name.clone().unwrap_or_default()) == FLEET_SERVICE)
            .flat_map(|(_, s)| s.method.iter().map(|m| m.name.clone().unwrap_or_default()))
            .collect();
        assert!(rpcs.len() > 20, "the descriptor set lists the Fleet service: {rpcs:?}");
        rpcs
    }

    #[test]
    fn every_fleet_rpc_has_a_role() {
        let unlisted: Vec<String> = fleet_rpcs().into_iter().filter(|m| fleet_min_role(m).is_none()).collect();
        assert!(unlisted.is_empty(), "add these Fleet RPCs to auth::FLEET_METHODS: {unlisted:?}");
    }

    #[test]
    fn the_table_names_only_fleet_rpcs_and_each_once() {
        let rpcs = fleet_rpcs();
        for (i, (method, _)) in FLEET_METHODS.iter().enumerate() {
            assert!(rpcs.iter().any(|r| r == method), "{method} is in the allow-list but not in the Fleet service");
            assert!(!FLEET_METHODS[..i].iter().any(|(m, _)| m == method), "{method} is listed twice");
        }
    }

    #[test]
    fn the_generated_server_is_named_as_the_table_expects() {
        use flotilla_proto::pb::fleet_server::FleetServer;
        assert_eq!(<FleetServer<crate::service::fleet::FleetApi> as NamedService>::NAME, FLEET_SERVICE);
    }

    #[test]
    fn roles_are_checked_against_the_least_role() {
        for (method, needed) in FLEET_METHODS {
            for role in [Role::Viewer, Role::Operator, Role::Admin] {
                let decided = authorize_fleet(method, operator(role));
                assert_eq!(decided.is_ok(), role >= *needed, "{method} as {role}");
                if let Err(status) = decided {
                    assert_eq!(status.code(), tonic::Code::PermissionDenied);
                    assert!(status.message().contains(&format!("needs role {needed}")), "{}", status.message());
                }
            }
        }
        assert_eq!(authorize_fleet("ListNodes", operator(Role::Viewer)).unwrap().actor(), "operator ann (viewer)");
    }

    #[test]
    fn unlisted_methods_and_non_operators_are_refused() {
        let status = authorize_fleet("DropEverything", operator(Role::Admin)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("not in the controller's allow-list"), "{}", status.message());
        for other in [Identity::Node(NodeId::new("gpu-a").unwrap()), Identity::Controller] {
            let status = authorize_fleet("ListNodes", other).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
            assert!(status.message().contains("the Fleet API is for operators"), "{}", status.message());
        }
    }

    #[test]
    fn a_request_without_a_certificate_is_unauthenticated() {
        let request = http::Request::builder().uri("/flotilla.v1.Fleet/ListNodes").body(Body::empty()).unwrap();
        assert_eq!(admit(&request).unwrap_err().code(), tonic::Code::Unauthenticated);
        let call = Request::new(());
        assert_eq!(require_operator(&call).unwrap_err().code(), tonic::Code::PermissionDenied);
    }
}
