//! The mTLS gRPC channel to the controller, used by agents, flotctl and tools.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::tls::{TlsError, TlsFiles};

/// Why a channel to the controller cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("controller address {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
}

/// A lazily connecting channel to `url` (`https://host:port`) that presents our
/// certificate and trusts only the fleet CA. The server name checked against the
/// controller certificate is the URL's host.
pub fn endpoint(url: &str, tls: &TlsFiles) -> Result<Endpoint, ClientError> {
    let bad = |reason: String| ClientError::BadUrl { url: url.to_owned(), reason };
    let normalized = if url.contains("://") { url.to_owned() } else { format!("https://{url}") };
    if !normalized.starts_with("https://") {
        return Err(bad("use https://HOST:PORT: every Flotilla port is mTLS".to_owned()));
    }
    let pem = tls.pem_bytes()?;
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem.ca))
        .identity(Identity::from_pem(pem.cert, pem.key));
    let endpoint = Endpoint::from_shared(normalized)
        .map_err(|e| bad(e.to_string()))?
        .tls_config(config)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(endpoint)
}

/// A channel from [`endpoint`] that connects on first use.
pub fn lazy_channel(url: &str, tls: &TlsFiles) -> Result<Channel, ClientError> {
    Ok(endpoint(url, tls)?.connect_lazy())
}

/// Renders a transport error with its causes on one line (tonic's own text is
/// often just "transport error").
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let s = cause.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = cause.source();
    }
    text
}
