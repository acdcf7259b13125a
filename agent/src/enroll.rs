//! Enrollment: an agent started with a join token and no certificate makes its
//! key here, sends a certificate request with the token's secret to the
//! controller's enrollment port (pinning the CA fingerprint, see [`pinned`]),
//! and writes what comes back: its certificate, the CA, and the controller's
//! command-signing key. Then it starts as any agent does. The token and the key
//! are never logged; the key file is created with mode 0600.
//!
//! Like the uplink, this is a client of the controller, so it touches `pb::*`.

mod pinned;
pub mod renew;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_common::enroll::{CaFingerprint, JoinToken};
use flotilla_common::pki::{self, KeyAndRequest};
use flotilla_common::{Identity, NodeId};
use flotilla_proto::pb;
use flotilla_proto::pb::enrollment_client::EnrollmentClient;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint, Uri};

pub use renew::{Renewal, finish_interrupted_swap};

use crate::config::Config;

/// How long enrollment may take, connection included.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why enrollment failed; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enroll_url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach the controller's enrollment port {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the controller refused enrollment: {0}")]
    Refused(String),
    #[error("the controller's answer is unusable: {0}")]
    BadAnswer(String),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making a key and certificate request: {0}")]
    Key(#[from] pki::PkiError),
    #[error("{0}")]
    Config(String),
}

/// What enrollment leaves in the data dir besides the TLS files: the token's
/// labels and where the command key went. JSON, read at every start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub node_id: String,
    pub enrolled_unix_ms: i64,
    /// Labels from the join token; the agent's own `labels` win over them.
    pub labels: BTreeMap<String, String>,
    /// Where the command-signing key was written.
    pub command_key: PathBuf,
}

impl Enrolled {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("enrollment.json")
    }

    /// The record of an earlier enrollment, if this agent enrolled.
    pub fn load(data_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(Self::path(data_dir)).ok()?;
        match serde_json::from_str(&text) {
            Ok(record) => Some(record),
            Err(error) => {
                tracing::warn!(%error, path = %Self::path(data_dir).display(), "ignoring an unreadable enrollment record");
                None
            }
        }
    }

    /// Fills in what enrollment provided and the config leaves open: the token's
    /// labels under the config's own, and the pinned command key.
    pub fn apply(&self, config: &mut Config) {
        let mut labels = self.labels.clone();
        labels.extend(std::mem::take(&mut config.labels));
        config.labels = labels;
        if config.command_key.is_none() && self.command_key.exists() {
            config.command_key = Some(self.command_key.clone());
        }
    }
}

/// Enrolls when a join token is configured and there is no certificate yet;
/// otherwise does nothing. Afterwards the config's TLS files exist.
pub async fn enroll_if_needed(config: &mut Config) -> Result<(), EnrollError> {
    let Some(token) = config.join_token.clone() else { return Ok(()) };
    if config.tls.cert.exists() {
        tracing::info!(cert = %config.tls.cert.display(), "certificate present; the join token is not needed");
        return Ok(());
    }
    let node = config.node_id.clone().ok_or_else(|| EnrollError::Config("join_token needs node_id".into()))?;
    let url = config.enroll_url.clone().ok_or_else(|| EnrollError::Config("join_token needs enroll_url".into()))?;
    let pin = token
        .ca
        .or(config.ca_fingerprint)
        .ok_or_else(|| EnrollError::Config("join_token carries no CA fingerprint: pass ca_fingerprint".into()))?;
    tracing::info!(node_id = %node, %url, ca_fingerprint = %pin, "no certificate yet: enrolling with the join token");
    let key = KeyAndRequest::generate(&Identity::Node(node.clone()))?;
    let answer = tokio::time::timeout(ENROLL_TIMEOUT, ask(&url, pin, &token, &node, &key))
        .await
        .map_err(|_| EnrollError::Connect { url: url.clone(), reason: "no answer within 30s".into() })??;
    let command_key = config.command_key.clone().unwrap_or_else(|| config.data_dir.join("command-signing.pub"));
    let record = store(config, &node, pin, &key, answer, &command_key)?;
    record.apply(config);
    tracing::info!(node_id = %node, cert = %config.tls.cert.display(), "enrolled: certificate, CA and command key written");
    Ok(())
}

/// Sends the request over a connection that trusts only the pinned CA.
async fn ask(
    url: &str,
    pin: CaFingerprint,
    token: &JoinToken,
    node: &NodeId,
    key: &KeyAndRequest,
) -> Result<pb::EnrollResponse, EnrollError> {
    let channel = connect(url, pin).await?;
    let request = pb::EnrollRequest {
        token_secret: token.secret.reveal(),
        node_id: node.to_string(),
        csr_der: key.csr_der.clone(),
    };
    match EnrollmentClient::new(channel).enroll(request).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => {
            use tonic::Code;
            match status.code() {
                Code::PermissionDenied
                | Code::Unauthenticated
                | Code::InvalidArgument
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::ResourceExhausted => Err(EnrollError::Refused(status.message().to_owned())),
                _ => Err(EnrollError::Connect {
                    url: url.to_owned(),
                    reason: flotilla_common::client::describe(&status),
                }),
            }
        }
    }
}

/// A channel to `url` over TLS that verifies the server with [`pinned::PinnedCa`]
/// and presents no client certificate.
async fn connect(url: &str, pin: CaFingerprint) -> Result<Channel, EnrollError> {
    let bad = |reason: &str| EnrollError::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL; use https://HOST:PORT"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("use https://HOST:PORT: enrollment is TLS"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?.to_owned();
    let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let name = ServerName::try_from(bare).map_err(|_| bad("the host is neither a DNS name nor an IP address"))?;
    let mut tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(pinned::PinnedCa::new(pin)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let addr = format!("{host}:{port}");
    // gRPC over HTTP/2 on the TLS stream this connector makes; the URI's scheme
    // only tells tonic not to add TLS of its own.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| bad(&e.to_string()))?
        .connect_timeout(Duration::from_secs(10));
    let dial = tower::service_fn(move |_: Uri| {
        let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            let stream = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(dial)
        .await
        .map_err(|e| EnrollError::Connect { url: url.to_owned(), reason: flotilla_common::client::describe(&e) })
}

/// Checks the answer and writes it: the key first (0600), then the CA and the
/// command key, the record, and the certificate last, since its presence is what
/// tells the next start that this agent is enrolled.
fn store(
    config: &Config,
    node: &NodeId,
    pin: CaFingerprint,
    key: &KeyAndRequest,
    answer: pb::EnrollResponse,
    command_key: &Path,
) -> Result<Enrolled, EnrollError> {
    let bad = EnrollError::BadAnswer;
    let cert = flotilla_common::tls::certs_from_pem(&config.tls.cert, answer.certificate_pem.as_bytes())
        .map_err(|e| bad(format!("certificate: {e}")))?;
    let leaf = cert.first().ok_or_else(|| bad("no certificate".into()))?;
    match Identity::from_der(leaf) {
        Ok(Identity::Node(id)) if id == *node => {}
        Ok(other) => return Err(bad(format!("the certificate identifies {other}, not node {node}"))),
        Err(e) => return Err(bad(format!("certificate: {e}"))),
    }
    if !key.certified_by(leaf) {
        return Err(bad("the certificate is not for the key this agent made".into()));
    }
    let ca = flotilla_common::tls::certs_from_pem(&config.tls.ca, answer.ca_pem.as_bytes())
        .map_err(|e| bad(format!("CA: {e}")))?;
    if ca.first().map(|c| CaFingerprint::of_der(c)) != Some(pin) {
        return Err(bad(format!("the CA sent is not the pinned one ({pin})")));
    }

    let write = |path: &Path, bytes: &[u8], private: bool| {
        let written = if private { pki::write_private(path, bytes) } else { pki::write_public(path, bytes) };
        written.map_err(|source| EnrollError::Write { path: path.to_owned(), source })
    };
    write(&config.tls.key, key.key_pem.as_bytes(), true)?;
    write(&config.tls.ca, answer.ca_pem.as_bytes(), false)?;
    write(command_key, answer.command_key_pem.as_bytes(), false)?;
    flotilla_common::envelope::PinnedKey::load(command_key).map_err(|e| bad(format!("command-signing key: {e}")))?;
    let record = Enrolled {
        node_id: node.to_string(),
        enrolled_unix_ms: flotilla_common::time::now_unix_ms(),
        labels: answer.labels.into_iter().collect(),
        command_key: command_key.to_owned(),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| bad(e.to_string()))?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| EnrollError::Write { path: config.data_dir.clone(), source })?;
    write(&Enrolled::path(&config.data_dir), &json, false)?;
    write(&config.tls.cert, answer.certificate_pem.as_bytes(), false)?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_labels_sit_under_the_configs_own() {
        let record = Enrolled {
            labels: [("rack".to_owned(), "r9".to_owned()), ("zone".to_owned(), "a".to_owned())].into(),
            command_key: PathBuf::from("/nonexistent/command-signing.pub"),
            ..Default::default()
        };
        let mut config = Config::default();
        config.labels.insert("rack".into(), "r1".into());
        record.apply(&mut config);
        assert_eq!(config.labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(config.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(config.command_key, None, "a missing key file is not pinned");
    }
}
