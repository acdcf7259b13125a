//! The enrollment connection's server check. The agent has no CA yet, only the
//! CA's SHA-256 from the join token (or `--ca-fingerprint`): it finds the CA
//! with that fingerprint in the chain the controller sends, verifies the
//! controller's certificate against it as any TLS client would (signature,
//! validity, server use, the host name of `enroll_url`), and then requires the
//! identity `urn:flotilla:controller`, so that no agent certificate, even one
//! from the same CA, can pose as the controller.

use std::sync::Arc;

use flotilla_common::Identity;
use flotilla_common::enroll::CaFingerprint;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

/// Verifies the controller against a pinned CA fingerprint.
#[derive(Debug)]
pub struct PinnedCa {
    pin: CaFingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedCa {
    pub fn new(pin: CaFingerprint) -> Self {
        Self { pin, provider: Arc::new(rustls::crypto::ring::default_provider()) }
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ca = intermediates.iter().find(|c| CaFingerprint::of_der(c) == self.pin).ok_or_else(|| {
            Error::General(format!(
                "the controller's certificate chain holds no CA with the pinned fingerprint {}: this is not the \
                 fleet the join token was made for, or the fingerprint is wrong",
                self.pin
            ))
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        match Identity::from_der(end_entity) {
            Ok(Identity::Controller) => Ok(ServerCertVerified::assertion()),
            Ok(other) => Err(Error::General(format!(
                "the server's certificate identifies {other}, not the controller (urn:flotilla:controller)"
            ))),
            Err(e) => Err(Error::General(format!("the server's certificate: {e}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use flotilla_common::pki::{self, CaInit};

    use super::*;

    fn der(path: &Path) -> CertificateDer<'static> {
        flotilla_common::tls::certs_from_pem(path, &std::fs::read(path).unwrap()).unwrap().remove(0)
    }

    #[test]
    fn only_the_controller_of_the_pinned_ca_passes() {
        flotilla_common::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let files = pki::init_ca(dir.path(), &CaInit::default()).unwrap();
        let ca = der(&files.ca_cert);
        let controller = der(&files.controller.cert);
        let pinned = PinnedCa::new(CaFingerprint::of_der(&ca));
        let name = ServerName::try_from("localhost").unwrap();
        let now = UnixTime::now();
        assert!(pinned.verify_server_cert(&controller, std::slice::from_ref(&ca), &name, &[], now).is_ok());

        let wrong = PinnedCa::new(CaFingerprint::of_der(b"another CA"));
        let err = wrong.verify_server_cert(&controller, std::slice::from_ref(&ca), &name, &[], now).unwrap_err();
        assert!(err.to_string().contains("pinned fingerprint"), "{err}");

        let other_host = ServerName::try_from("elsewhere.example").unwrap();
        assert!(pinned.verify_server_cert(&controller, std::slice::from_ref(&ca), &other_host, &[], now).is_err());

        // An agent certificate from the same CA cannot act as the controller.
        let node = flotilla_common::Identity::Node(flotilla_common::NodeId::new("gpu-1").unwrap());
        let agent = der(&pki::issue(dir.path(), &node, pki::LEAF_VALIDITY, false).unwrap().cert);
        assert!(pinned.verify_server_cert(&agent, std::slice::from_ref(&ca), &name, &[], now).is_err());
    }
}
