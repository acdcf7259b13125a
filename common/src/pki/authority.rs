//! Signing at a distance: the controller holds the CA key and signs certificate
//! requests (enrollment, renewal); the agent makes its key locally and sends only
//! a request, so no private key ever crosses the wire.

use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateParams, CertificateSigningRequestParams, Issuer, KeyPair, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{PkiError, leaf_params, read};
use crate::enroll::CaFingerprint;
use crate::identity::Identity;

/// The largest certificate request accepted, in bytes (a P-384 or RSA-4096
/// request is well under this).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// The fleet CA, loaded with its key, able to sign requests.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    fingerprint: CaFingerprint,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

/// A certificate just signed.
#[derive(Debug, Clone)]
pub struct Signed {
    pub cert_pem: String,
    pub not_after_unix_ms: i64,
}

impl Authority {
    /// Loads the CA certificate and its key (e.g. `ca.pem` and `ca.key` of `flotctl ca init`).
    pub fn load(ca_cert: &Path, ca_key: &Path) -> Result<Self, PkiError> {
        let key_pem = read(ca_key)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::BadCa { path: ca_key.to_owned(), source })?;
        let ca_pem = read(ca_cert)?;
        let der = crate::tls::certs_from_pem(ca_cert, ca_pem.as_bytes())
            .map_err(|e| PkiError::BadCsr(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::BadCsr(format!("{}: no certificate", ca_cert.display())))?;
        let fingerprint = CaFingerprint::of_der(&der);
        // The key must be the certificate's: otherwise every certificate signed
        // here would fail verification far away, at the agents.
        let (_, parsed) = X509Certificate::from_der(&der).map_err(|e| PkiError::BadCsr(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch { cert: ca_cert.to_owned(), key: ca_key.to_owned() });
        }
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(|source| PkiError::BadCa { path: ca_cert.to_owned(), source })?;
        Ok(Self { issuer, ca_pem, fingerprint })
    }

    /// The CA certificate (PEM), as agents should store it.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The SHA-256 of the CA certificate, which join tokens carry.
    pub fn fingerprint(&self) -> CaFingerprint {
        self.fingerprint
    }

    /// Signs a client certificate for `identity` over the public key of the
    /// request `csr_der`, valid for `validity`. Only the request's key is used
    /// (after its self-signature is checked): names, usages and constraints come
    /// from [`leaf_params`], never from the requester.
    pub fn sign_request(&self, csr_der: &[u8], identity: &Identity, validity: Duration) -> Result<Signed, PkiError> {
        if matches!(identity, Identity::Controller) {
            return Err(PkiError::BadCsr("only client certificates are signed from requests".to_owned()));
        }
        if csr_der.len() > MAX_CSR_BYTES {
            return Err(PkiError::BadCsr(format!("{} bytes; the limit is {MAX_CSR_BYTES}", csr_der.len())));
        }
        let request = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let params: CertificateParams = leaf_params(identity, Vec::<SanType>::new(), validity)?;
        let not_after_unix_ms = i64::try_from(params.not_after.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        let cert = params.signed_by(&request.public_key, &self.issuer)?;
        Ok(Signed { cert_pem: cert.pem(), not_after_unix_ms })
    }
}

/// A private key made here and a request for it, ready to send.
pub struct KeyAndRequest {
    /// The private key (PEM); write it with mode 0600, never log it.
    pub key_pem: String,
    /// The request (DER), signed by the key.
    pub csr_der: Vec<u8>,
    /// The raw public key (the bit string of the SubjectPublicKeyInfo).
    public_key: Vec<u8>,
}

impl std::fmt::Debug for KeyAndRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndRequest").field("csr_bytes", &self.csr_der.len()).finish_non_exhaustive()
    }
}

impl KeyAndRequest {
    /// A new ECDSA P-256 key and a request naming `identity`. The controller
    /// decides what the certificate says; the names here are only a courtesy.
    pub fn generate(identity: &Identity) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        // Only what a request can carry: the name and the identity URI.
        let full = leaf_params(identity, Vec::new(), Duration::from_secs(1))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = full.distinguished_name;
        params.subject_alt_names = full.subject_alt_names;
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_der: csr.der().to_vec(),
            public_key: key.public_key_raw().to_vec(),
        })
    }

    /// Whether `cert_der` certifies this key.
    pub fn certified_by(&self, cert_der: &[u8]) -> bool {
        X509Certificate::from_der(cert_der)
            .is_ok_and(|(_, c)| c.public_key().subject_public_key.data.as_ref() == self.public_key.as_slice())
    }
}

/// The validity window of a DER certificate, in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before_unix_ms: i64,
    pub not_after_unix_ms: i64,
}

impl Validity {
    /// Reads the window of `der`.
    pub fn of_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let v = cert.validity();
        Some(Self {
            not_before_unix_ms: v.not_before.timestamp().saturating_mul(1000),
            not_after_unix_ms: v.not_after.timestamp().saturating_mul(1000),
        })
    }

    /// When to renew: two thirds into the window.
    pub fn renew_at_unix_ms(&self) -> i64 {
        let life = self.not_after_unix_ms.saturating_sub(self.not_before_unix_ms).max(0);
        self.not_before_unix_ms.saturating_add(life / 3 * 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;
    use crate::pki::{CaInit, ca_cert_path, init_ca};

    fn authority(dir: &Path) -> Authority {
        init_ca(dir, &CaInit::default()).unwrap();
        Authority::load(&ca_cert_path(dir), &dir.join("ca.key")).unwrap()
    }

    #[test]
    fn a_request_is_signed_with_the_identity_the_controller_chooses() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        let asked = Identity::Node(NodeId::new("claimed").unwrap());
        let request = KeyAndRequest::generate(&asked).unwrap();
        let given = Identity::Node(NodeId::new("gpu-7").unwrap());
        let signed = ca.sign_request(&request.csr_der, &given, Duration::from_secs(72 * 3600)).unwrap();
        let der = crate::tls::certs_from_pem(Path::new("x"), signed.cert_pem.as_bytes()).unwrap().remove(0);
        assert_eq!(Identity::from_der(&der).unwrap(), given);
        assert!(request.certified_by(&der));
        assert!(!KeyAndRequest::generate(&given).unwrap().certified_by(&der));
        let v = Validity::of_der(&der).unwrap();
        assert_eq!(v.not_after_unix_ms / 1000, signed.not_after_unix_ms / 1000);
        assert_eq!(v.not_after_unix_ms - v.not_before_unix_ms, (72 * 3600 + 300) * 1000, "backdated 5 min");
        assert_eq!(
            ca.fingerprint(),
            CaFingerprint::of_der(&crate::tls::certs_from_pem(Path::new("x"), ca.ca_pem().as_bytes()).unwrap()[0])
        );
    }

    #[test]
    fn short_certificates_are_backdated_by_a_tenth_and_renewed_two_thirds_in() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        let node = Identity::Node(NodeId::new("gpu-7").unwrap());
        let request = KeyAndRequest::generate(&node).unwrap();
        let signed = ca.sign_request(&request.csr_der, &node, Duration::from_secs(30)).unwrap();
        let der = crate::tls::certs_from_pem(Path::new("x"), signed.cert_pem.as_bytes()).unwrap().remove(0);
        let v = Validity::of_der(&der).unwrap();
        assert_eq!(v.not_after_unix_ms - v.not_before_unix_ms, 33_000);
        assert_eq!(v.renew_at_unix_ms(), v.not_before_unix_ms + 22_000);
    }

    #[test]
    fn bad_requests_and_server_identities_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        let node = Identity::Node(NodeId::new("gpu-7").unwrap());
        let mut request = KeyAndRequest::generate(&node).unwrap();
        let day = Duration::from_secs(86_400);
        assert!(matches!(ca.sign_request(&request.csr_der, &Identity::Controller, day), Err(PkiError::BadCsr(_))));
        let last = request.csr_der.len() - 1;
        request.csr_der[last] ^= 1;
        assert!(matches!(ca.sign_request(&request.csr_der, &node, day), Err(PkiError::BadCsr(_))), "signature");
        assert!(matches!(ca.sign_request(b"garbage", &node, day), Err(PkiError::BadCsr(_))));
        assert!(matches!(ca.sign_request(&vec![0; MAX_CSR_BYTES + 1], &node, day), Err(PkiError::BadCsr(_))));
    }

    #[test]
    fn a_key_that_is_not_the_cas_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), &CaInit::default()).unwrap();
        let err = Authority::load(&files.ca_cert, &files.admin.key).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    }
}
