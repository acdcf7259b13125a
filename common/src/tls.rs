//! TLS material loading and rustls configurations. Every Flotilla port is mutual
//! TLS against the fleet CA; these helpers are the only place that builds them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// The three files of a TLS identity: the fleet CA, our certificate, our key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The fleet CA certificate (PEM) that the peer must chain to.
    pub ca: PathBuf,
    /// Our certificate (PEM).
    pub cert: PathBuf,
    /// Our private key (PEM).
    pub key: PathBuf,
}

/// The PEM text of a [`TlsFiles`] set.
#[derive(Debug, Clone)]
pub struct PemBundle {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// Errors of loading TLS material; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate file ({reason})")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: not a PEM private key ({reason})")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path}: CA certificate rejected: {source}")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Parses every certificate in a PEM buffer read from `path`.
pub fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.to_owned(), source })
}

impl TlsFiles {
    /// The files `flotctl ca init` / `cert issue` wrote for a leaf in a PKI dir.
    pub fn from_pki_dir(dir: &Path, leaf: &crate::pki::CertPaths) -> Self {
        Self { ca: crate::pki::ca_cert_path(dir), cert: leaf.cert.clone(), key: leaf.key.clone() }
    }

    /// Loads the CA certificates into a root store.
    pub fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certs_from_pem(&self.ca, &read(&self.ca)?)? {
            roots.add(cert).map_err(|source| TlsError::BadCa { path: self.ca.clone(), source })?;
        }
        Ok(roots)
    }

    /// Our certificate chain.
    pub fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        certs_from_pem(&self.cert, &read(&self.cert)?)
    }

    /// Our private key.
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| TlsError::BadKey { path: self.key.clone(), reason: e.to_string() })
    }

    /// The identity our own certificate carries.
    pub fn identity(&self) -> Result<crate::Identity, TlsError> {
        let chain = self.chain()?;
        let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate { path: self.cert.clone() })?;
        crate::Identity::from_der(leaf)
            .map_err(|e| TlsError::BadCertificate { path: self.cert.clone(), reason: e.to_string() })
    }

    /// Raw PEM bytes, for clients that take PEM (tonic).
    pub fn pem_bytes(&self) -> Result<PemBundle, TlsError> {
        // Parse once so that a bad file fails here with its name, not deep in a handshake.
        self.roots()?;
        self.chain()?;
        self.private_key()?;
        Ok(PemBundle { ca: read(&self.ca)?, cert: read(&self.cert)?, key: read(&self.key)? })
    }

    /// A rustls server configuration that requires a client certificate from the
    /// fleet CA, speaking gRPC (ALPN h2).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.server_config_with_alpn(vec![b"h2".to_vec()])
    }

    /// The same for plain HTTP/1.1 endpoints (metrics, probes).
    pub fn http1_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.server_config_with_alpn(vec![b"http/1.1".to_vec()])
    }

    fn server_config_with_alpn(&self, alpn: Vec<Vec<u8>>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder(Arc::new(self.roots()?))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, self.private_key()?)
            .map_err(|e| TlsError::Config(format!("{}: {e}", self.cert.display())))?;
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    }

    /// A rustls client configuration that presents our certificate and trusts only the fleet CA.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain()?, self.private_key()?)
            .map_err(|e| TlsError::Config(format!("{}: {e}", self.cert.display())))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Installs the process-wide rustls crypto provider (ring). Call first thing in `main`;
/// calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Explains a rustls handshake error in words an operator can act on.
pub fn explain_handshake_error(error: &std::io::Error) -> String {
    let text = error.to_string();
    let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "the peer's certificate was not issued by this fleet's CA"
    } else if text.contains("Expired") || text.contains("certificate expired") {
        // rustls words it both ways: `Expired`, and with its times, "certificate expired: ...".
        "the peer's certificate has expired; issue a new one"
    } else if text.contains("NotValidYet") || text.contains("not valid yet") {
        "the peer's certificate is not valid yet; check the clocks"
    } else if text.contains("peer sent no certificates") || text.contains("NoCertificatesPresented") {
        "the peer presented no client certificate; every Flotilla port requires mTLS"
    } else if text.contains("fatal alert") {
        "the peer refused our certificate (it trusts another CA: check its --ca/--cacert)"
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") || text.contains("InvalidMessage")
    {
        "the peer does not speak TLS (plaintext or garbage on the port)"
    } else if text.contains("early eof") || text.contains("UnexpectedEof") {
        "the peer closed the connection during the handshake (it may distrust our certificate)"
    } else {
        "TLS handshake failed"
    };
    format!("{hint}: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_and_not_yet_valid_certificates_are_explained() {
        use rustls::pki_types::UnixTime;
        let at = |secs| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
        for (error, words) in [
            (rustls::CertificateError::ExpiredContext { time: at(2_000), not_after: at(1_000) }, "has expired"),
            (rustls::CertificateError::Expired, "has expired"),
            (rustls::CertificateError::NotValidYetContext { time: at(1_000), not_before: at(2_000) }, "not valid yet"),
        ] {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::InvalidCertificate(error));
            let explained = explain_handshake_error(&io);
            assert!(explained.contains(words), "{explained}");
        }
    }
}
