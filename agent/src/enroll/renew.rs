//! Certificate renewal over the running stream. Two thirds into the current
//! certificate's life the uplink sends a request for a new key; the answer
//! comes back on the same stream, which goes on undisturbed. The new key and
//! certificate replace the old ones on disk as a pair, and the next connection
//! uses them.
//!
//! The swap: the key goes to `KEY.next`, the certificate to `CERT.next`, then
//! the key is renamed over `KEY` and the certificate over `CERT`. A crash in
//! between leaves files that [`finish_interrupted_swap`] completes at the next
//! start: `CERT.next` is written only after `KEY.next` is complete, so its
//! presence means the new pair is whole.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_common::pki::{self, KeyAndRequest, Validity};
use flotilla_common::time::now_unix_ms;
use flotilla_common::tls::TlsFiles;
use flotilla_common::{Identity, NodeId};
use tokio::time::Instant;
use tonic::transport::Endpoint;

/// Retries come at least this far apart (the controller refuses faster ones).
const MIN_RETRY: Duration = Duration::from_secs(5);
/// And at most this far, however long the certificate still lives.
const MAX_RETRY: Duration = Duration::from_secs(600);

/// The renewal state of one agent; owned by the uplink.
pub struct Renewal {
    tls: TlsFiles,
    controller: String,
    node: NodeId,
    due: Instant,
    /// The key of the request in flight, if any.
    pending: Option<KeyAndRequest>,
}

impl std::fmt::Debug for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewal").field("node", &self.node).field("due", &self.due).finish_non_exhaustive()
    }
}

/// What became of a renewal answer.
#[derive(Debug)]
pub enum Renewed {
    /// New files are in place; the next connection uses this endpoint.
    Done { endpoint: Box<Endpoint>, not_after_unix_ms: i64 },
    /// Refused or unusable; retried later.
    Failed(String),
}

impl Renewal {
    /// Renewal of the certificate in `tls` for `node`; the endpoint of the next
    /// connection is built for `controller` from the renewed files.
    pub fn new(tls: TlsFiles, controller: String, node: NodeId) -> Self {
        let mut renewal = Self { tls, controller, node, due: Instant::now(), pending: None };
        renewal.schedule_from_certificate();
        renewal
    }

    /// When to ask next.
    pub fn due(&self) -> Instant {
        self.due
    }

    /// A new key and a request for it (DER), kept until the answer comes. The
    /// next attempt is scheduled in case none does (the link may break).
    pub fn request(&mut self) -> Result<Vec<u8>, String> {
        // Scheduled first, so that a failure here is retried later, not at once.
        self.due = Instant::now() + self.retry_delay();
        let key = KeyAndRequest::generate(&Identity::Node(self.node.clone())).map_err(|e| e.to_string())?;
        let csr = key.csr_der.clone();
        self.pending = Some(key);
        Ok(csr)
    }

    /// Takes the controller's answer: an error text, or a certificate for the
    /// pending key, which is then written with it.
    pub fn answer(&mut self, certificate_pem: &str, error: &str) -> Renewed {
        if !error.is_empty() {
            self.pending = None;
            return Renewed::Failed(format!("the controller refused: {error}"));
        }
        match self.install(certificate_pem) {
            Ok(renewed) => {
                self.pending = None;
                self.schedule_from_certificate();
                renewed
            }
            Err(reason) => Renewed::Failed(reason),
        }
    }

    fn install(&mut self, certificate_pem: &str) -> Result<Renewed, String> {
        let key = self.pending.as_ref().ok_or("an answer to no request in flight")?;
        let certs = flotilla_common::tls::certs_from_pem(&self.tls.cert, certificate_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        let leaf = certs.first().ok_or("no certificate")?;
        if Identity::from_der(leaf).ok() != Some(Identity::Node(self.node.clone())) {
            return Err(format!("the certificate does not identify node {}", self.node));
        }
        if !key.certified_by(leaf) {
            return Err("the certificate is not for the key of the request in flight".to_owned());
        }
        let validity = Validity::of_der(leaf).ok_or("the certificate's validity is unreadable")?;
        swap(&self.tls, key.key_pem.as_bytes(), certificate_pem.as_bytes())?;
        let endpoint = flotilla_common::client::endpoint(&self.controller, &self.tls).map_err(|e| e.to_string())?;
        Ok(Renewed::Done { endpoint: Box::new(endpoint), not_after_unix_ms: validity.not_after_unix_ms })
    }

    /// Two thirds into the current certificate's life (now, if past that).
    fn schedule_from_certificate(&mut self) {
        let validity = self.tls.chain().ok().and_then(|c| c.first().and_then(|leaf| Validity::of_der(leaf)));
        let Some(validity) = validity else {
            tracing::warn!(cert = %self.tls.cert.display(), "cannot read the certificate's validity; renewal retried later");
            self.due = Instant::now() + MAX_RETRY;
            return;
        };
        let wait_ms = validity.renew_at_unix_ms().saturating_sub(now_unix_ms()).max(0);
        self.due = Instant::now() + Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0));
    }

    /// A tenth of what the certificate has left, within [MIN_RETRY, MAX_RETRY].
    fn retry_delay(&self) -> Duration {
        let left_ms = self
            .tls
            .chain()
            .ok()
            .and_then(|c| c.first().and_then(|leaf| Validity::of_der(leaf)))
            .map_or(0, |v| v.not_after_unix_ms.saturating_sub(now_unix_ms()).max(0));
        Duration::from_millis(u64::try_from(left_ms / 10).unwrap_or(0)).clamp(MIN_RETRY, MAX_RETRY)
    }
}

fn next(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".next");
    PathBuf::from(name)
}

/// Replaces the key and certificate of `tls` as a pair (see the module docs).
fn swap(tls: &TlsFiles, key_pem: &[u8], cert_pem: &[u8]) -> Result<(), String> {
    let (key_next, cert_next) = (next(&tls.key), next(&tls.cert));
    let shown = |path: &Path, e: std::io::Error| format!("{}: {e}", path.display());
    pki::write_private(&key_next, key_pem).map_err(|e| shown(&key_next, e))?;
    pki::write_public(&cert_next, cert_pem).map_err(|e| shown(&cert_next, e))?;
    std::fs::rename(&key_next, &tls.key).map_err(|e| shown(&tls.key, e))?;
    std::fs::rename(&cert_next, &tls.cert).map_err(|e| shown(&tls.cert, e))?;
    Ok(())
}

/// Completes a swap a crash interrupted, or drops a half-written one.
pub fn finish_interrupted_swap(tls: &TlsFiles) {
    let (key_next, cert_next) = (next(&tls.key), next(&tls.cert));
    if cert_next.exists() {
        let done = (!key_next.exists() || std::fs::rename(&key_next, &tls.key).is_ok())
            && std::fs::rename(&cert_next, &tls.cert).is_ok();
        if done {
            tracing::info!(cert = %tls.cert.display(), "completed a certificate renewal interrupted by a restart");
        } else {
            tracing::warn!(cert = %tls.cert.display(), "cannot complete an interrupted certificate renewal");
        }
    } else if key_next.exists() {
        // The certificate never arrived on disk: the old pair is still whole.
        let _ = std::fs::remove_file(&key_next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::pki::{Authority, CaInit};

    struct Fixture {
        _dir: tempfile::TempDir,
        tls: TlsFiles,
        ca: Authority,
        node: NodeId,
    }

    fn fixture(ttl: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let files = pki::init_ca(dir.path(), &CaInit::default()).unwrap();
        let ca = Authority::load(&files.ca_cert, &dir.path().join("ca.key")).unwrap();
        let node = NodeId::new("gpu-1").unwrap();
        let agent = dir.path().join("agent");
        let tls = TlsFiles { ca: files.ca_cert.clone(), cert: agent.join("agent.pem"), key: agent.join("agent.key") };
        let first = KeyAndRequest::generate(&Identity::Node(node.clone())).unwrap();
        let signed = ca.sign_request(&first.csr_der, &Identity::Node(node.clone()), ttl).unwrap();
        pki::write_private(&tls.key, first.key_pem.as_bytes()).unwrap();
        pki::write_public(&tls.cert, signed.cert_pem.as_bytes()).unwrap();
        Fixture { _dir: dir, tls, ca, node }
    }

    #[tokio::test]
    async fn renewal_is_due_two_thirds_in_and_replaces_key_and_certificate() {
        flotilla_common::tls::install_crypto_provider();
        let f = fixture(Duration::from_secs(30));
        let mut renewal = Renewal::new(f.tls.clone(), "https://127.0.0.1:1".into(), f.node.clone());
        // 33 s of life from 3 s ago: due about 19 s from now.
        let wait = renewal.due().saturating_duration_since(Instant::now());
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20), "{wait:?}");

        let old_key = std::fs::read(&f.tls.key).unwrap();
        let csr = renewal.request().unwrap();
        assert!(renewal.due() >= Instant::now() + MIN_RETRY - Duration::from_millis(100), "a retry is scheduled");
        let signed = f.ca.sign_request(&csr, &Identity::Node(f.node.clone()), Duration::from_secs(30)).unwrap();
        assert!(matches!(renewal.answer(&signed.cert_pem, ""), Renewed::Done { .. }));
        assert_ne!(std::fs::read(&f.tls.key).unwrap(), old_key, "a new key");
        assert_eq!(std::fs::read_to_string(&f.tls.cert).unwrap(), signed.cert_pem);
        assert!(!next(&f.tls.key).exists() && !next(&f.tls.cert).exists());
        // The pair on disk works: a client config loads it.
        f.tls.client_config().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&f.tls.key).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[tokio::test]
    async fn answers_that_do_not_fit_the_request_change_nothing() {
        flotilla_common::tls::install_crypto_provider();
        let f = fixture(Duration::from_secs(3600));
        let before = (std::fs::read(&f.tls.key).unwrap(), std::fs::read(&f.tls.cert).unwrap());
        let mut renewal = Renewal::new(f.tls.clone(), "https://127.0.0.1:1".into(), f.node.clone());
        assert!(matches!(renewal.answer("x", ""), Renewed::Failed(_)), "no request in flight");
        renewal.request().unwrap();
        let other = KeyAndRequest::generate(&Identity::Node(f.node.clone())).unwrap();
        let signed =
            f.ca.sign_request(&other.csr_der, &Identity::Node(f.node.clone()), Duration::from_secs(60)).unwrap();
        assert!(matches!(renewal.answer(&signed.cert_pem, ""), Renewed::Failed(r) if r.contains("key")));
        assert!(matches!(renewal.answer("", "renewal is disabled"), Renewed::Failed(r) if r.contains("disabled")));
        assert_eq!((std::fs::read(&f.tls.key).unwrap(), std::fs::read(&f.tls.cert).unwrap()), before);
    }

    #[test]
    fn an_interrupted_swap_is_completed_or_dropped() {
        let f = fixture(Duration::from_secs(3600));
        // Crashed after both .next files were written and the key was renamed.
        std::fs::write(next(&f.tls.cert), b"new cert").unwrap();
        std::fs::write(&f.tls.key, b"new key").unwrap();
        finish_interrupted_swap(&f.tls);
        assert_eq!(std::fs::read(&f.tls.cert).unwrap(), b"new cert");
        // Crashed before the certificate was written: the half is dropped.
        std::fs::write(next(&f.tls.key), b"newer key").unwrap();
        finish_interrupted_swap(&f.tls);
        assert!(!next(&f.tls.key).exists());
        assert_eq!(std::fs::read(&f.tls.key).unwrap(), b"new key");
    }
}
