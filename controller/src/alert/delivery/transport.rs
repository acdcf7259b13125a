//! The HTTP client of alert delivery and how one POST's outcome is judged:
//! delivered, worth retrying, or refused for good.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};

use super::DeliveryError;

/// Most bytes of a refusal's body kept for the log.
const BODY_EXCERPT: usize = 512;

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    Delivered,
    /// 5xx, 429, timeout or connection error; `retry_after` is the server's hint.
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Any other status: a bug on our side or the target's configuration; retrying
    /// the same body cannot help.
    Rejected {
        reason: String,
    },
}

/// Builds the client: rustls with the ring provider chosen here (not a
/// process-wide default, so that tests and `flotctl demo` need no set-up), the
/// system's roots plus `ca_file`, no redirects (a POST should not wander), and
/// `timeout` on every request.
pub(crate) fn client(ca_file: Option<&Path>, timeout: Duration, needs_tls: bool) -> Result<Client, DeliveryError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let extra_roots = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| DeliveryError::CaFile {
                source: flotilla_common::tls::TlsError::Io { path: path.to_owned(), source },
            })?;
            flotilla_common::tls::certs_from_pem(path, &pem).map_err(|source| DeliveryError::CaFile { source })?
        }
        None => Vec::new(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(DeliveryError::Tls)?;
    let has_extra_roots = !extra_roots.is_empty();
    let mut tls = match rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider) {
        Ok(verifier) => builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth(),
        // A host without CA certificates can still deliver over plain http.
        Err(_) if !needs_tls && !has_extra_roots => {
            builder.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
        }
        Err(e) => return Err(DeliveryError::Tls(e)),
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("flotilla-controller/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(DeliveryError::Client)
}

/// POSTs a JSON body once and judges the outcome.
pub(crate) async fn post_json(client: &Client, url: &Url, body: Vec<u8>) -> Attempt {
    let sent = client.post(url.clone()).header(CONTENT_TYPE, "application/json").body(body).send().await;
    let response = match sent {
        Ok(response) => response,
        Err(e) if e.is_builder() => return Attempt::Rejected { reason: error_chain(&e) },
        Err(e) => return Attempt::Retryable { reason: error_chain(&e), retry_after: None },
    };
    let status = response.status();
    if status.is_success() {
        return Attempt::Delivered;
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let reason = format!("HTTP {status}: {}", body_excerpt(response).await);
    if retryable(status) { Attempt::Retryable { reason, retry_after } } else { Attempt::Rejected { reason } }
}

/// 5xx and 429 are the target's passing trouble; the rest of 3xx/4xx is not.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// The start of a response body as one line of text, read no further than needed.
async fn body_excerpt(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < BODY_EXCERPT {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(BODY_EXCERPT);
    let text = String::from_utf8_lossy(&bytes);
    let line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    line.trim().to_owned()
}

/// reqwest's error with its causes (the top level alone often says only "error sending request").
fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_trouble_is_retried() {
        for code in [500, 502, 503, 504, 429] {
            assert!(retryable(StatusCode::from_u16(code).unwrap_or_default()), "{code}");
        }
        for code in [301, 400, 401, 403, 404, 408, 413, 422] {
            assert!(!retryable(StatusCode::from_u16(code).unwrap_or_default()), "{code}");
        }
    }
}
