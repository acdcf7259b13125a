//! Enrollment and renewal: the controller signs agents' certificate requests
//! with the fleet CA key (`tls.ca_key`). An agent with a join token and no
//! certificate enrolls on a port of its own (`enroll_listen`: TLS, server
//! authentication only, serving only `flotilla.v1.Enrollment`); an agent with a
//! certificate renews over its AgentService stream.
//!
//! Why a separate port rather than optional client certificates on the mTLS
//! port: the mTLS port keeps refusing certificate-less handshakes before tonic
//! sees a byte, so no mistake in a handler can expose `Fleet`, `AgentService`,
//! health or reflection to an anonymous caller; the enrollment port serves one
//! method, with its own small limits, and can be closed by leaving it unset.
//!
//! Architecture Invariant: nothing on the enrollment port is reachable without
//! a join token whose hash is stored and which is neither expired nor spent; a
//! token's uses are decremented atomically and flushed before a certificate
//! leaves the controller.

pub mod token;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::pki::Authority;
use tokio::time::Instant;

use crate::config::Config;

/// Refused enrollment attempts audited per minute; past this they are only
/// logged and counted, and the next window's first refusal says how many were
/// left out: an anonymous caller cannot grow the audit log without bound.
pub const AUDITED_REFUSALS_PER_MINUTE: u32 = 30;
/// A node renews at most this often: each renewal costs a signature and an
/// audit record, and a well-behaved agent renews two thirds into a certificate
/// that lives at least 10 s.
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// Why enrollment cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum EnrollSetupError {
    #[error("tls.ca_key: {0}")]
    CaKey(#[from] flotilla_common::pki::PkiError),
    #[error("command-signing public key {path}: {source}")]
    CommandKey {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What enrollment and renewal need, loaded once at start.
pub struct Enrollment {
    authority: Option<Authority>,
    /// Validity of the certificates signed here.
    pub cert_ttl: Duration,
    /// The public key agents pin (`command-signing.pub`), sent to enrolling agents.
    pub command_key_pem: String,
    /// Serialises enrollments: the check that a node id is new and the spend of
    /// the token must not interleave with another enrollment of the same id.
    pub gate: tokio::sync::Mutex<()>,
    refusals: Mutex<RefusalWindow>,
    /// When each node last renewed.
    renewals: Mutex<HashMap<NodeId, Instant>>,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment").field("enabled", &self.authority.is_some()).finish_non_exhaustive()
    }
}

impl Enrollment {
    /// Loads the CA key (when configured) and the command-signing public key.
    /// Call after the command-signing key exists.
    pub fn load(config: &Config) -> Result<Self, EnrollSetupError> {
        let authority = match &config.tls.ca_key {
            Some(key) => Some(Authority::load(&config.tls.ca, key)?),
            None => None,
        };
        let path = crate::commands::public_key_path(&config.data_dir);
        let command_key_pem = std::fs::read_to_string(&path)
            .map_err(|source| EnrollSetupError::CommandKey { path: path.display().to_string(), source })?;
        Ok(Self {
            authority,
            cert_ttl: config.agents.cert_ttl,
            command_key_pem,
            gate: tokio::sync::Mutex::new(()),
            refusals: Mutex::new(RefusalWindow::default()),
            renewals: Mutex::new(HashMap::new()),
        })
    }

    /// The CA able to sign, when `tls.ca_key` is set.
    pub fn authority(&self) -> Option<&Authority> {
        self.authority.as_ref()
    }

    /// Notes a renewal by `node` at `now`, unless its last one was under
    /// [`MIN_RENEW_INTERVAL`] ago: then says how long ago that was.
    pub fn admit_renewal(&self, node: &NodeId, now: Instant) -> Result<(), Duration> {
        let mut last = self.renewals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(at) = last.get(node)
            && now.duration_since(*at) < MIN_RENEW_INTERVAL
        {
            return Err(now.duration_since(*at));
        }
        last.insert(node.clone(), now);
        Ok(())
    }

    /// Whether a refusal now should be audited, and how many before it were not.
    pub fn audit_refusal(&self, now: Instant) -> RefusalAudit {
        self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner).note(now)
    }
}

/// The answer of [`RefusalWindow::note`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalAudit {
    /// Audit it; `suppressed` refusals of the last window were not.
    Audit { suppressed: u32 },
    /// Log it only.
    Skip,
}

/// A fixed one-minute window counting audited refusals.
#[derive(Debug, Default)]
struct RefusalWindow {
    started: Option<Instant>,
    audited: u32,
    suppressed: u32,
}

impl RefusalWindow {
    fn note(&mut self, now: Instant) -> RefusalAudit {
        let fresh = self.started.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(60));
        let mut carried = 0;
        if fresh {
            carried = std::mem::take(&mut self.suppressed);
            self.started = Some(now);
            self.audited = 0;
        }
        if self.audited < AUDITED_REFUSALS_PER_MINUTE {
            self.audited += 1;
            RefusalAudit::Audit { suppressed: carried }
        } else {
            self.suppressed += 1;
            RefusalAudit::Skip
        }
    }
}

/// The enrollment port's TLS: the controller's certificate followed by the CA
/// certificate (the agent has no CA yet: it finds the CA in the chain by the
/// fingerprint it pinned and verifies the controller's certificate against it),
/// and no client authentication.
pub fn server_tls(config: &Config) -> Result<Arc<rustls::ServerConfig>, flotilla_common::tls::TlsError> {
    let files = config.tls.files();
    let mut chain = files.chain()?;
    let ca = flotilla_common::tls::certs_from_pem(
        &files.ca,
        &std::fs::read(&files.ca)
            .map_err(|source| flotilla_common::tls::TlsError::Io { path: files.ca.clone(), source })?,
    )?;
    chain.extend(ca);
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, files.private_key()?)
        .map_err(|e| flotilla_common::tls::TlsError::Config(format!("{}: {e}", files.cert.display())))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}

/// Limits of the enrollment port: one small call per connection.
pub mod limits {
    use std::time::Duration;

    /// Largest request or answer (a certificate request, then a chain and a key).
    pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
    /// Handshakes in progress at once.
    pub const MAX_HANDSHAKES: usize = 32;
    /// Calls in progress on one connection.
    pub const PER_CONNECTION: usize = 2;
    /// How long one call may take.
    pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
}

/// Binds the enrollment port, when configured.
pub async fn bind(config: &Config) -> Result<Option<(tokio::net::TcpListener, SocketAddr)>, crate::ControllerError> {
    let Some(addr) = config.enroll_listen else { return Ok(None) };
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| crate::ControllerError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| crate::ControllerError::Bind { addr, source })?;
    Ok(Some((listener, bound)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_audited_up_to_the_limit_then_summed_up_in_the_next_window() {
        let mut w = RefusalWindow::default();
        let t0 = Instant::now();
        for _ in 0..AUDITED_REFUSALS_PER_MINUTE {
            assert_eq!(w.note(t0), RefusalAudit::Audit { suppressed: 0 });
        }
        assert_eq!(w.note(t0 + Duration::from_secs(1)), RefusalAudit::Skip);
        assert_eq!(w.note(t0 + Duration::from_secs(59)), RefusalAudit::Skip);
        assert_eq!(w.note(t0 + Duration::from_secs(60)), RefusalAudit::Audit { suppressed: 2 });
        assert_eq!(w.note(t0 + Duration::from_secs(61)), RefusalAudit::Audit { suppressed: 0 });
    }
}
