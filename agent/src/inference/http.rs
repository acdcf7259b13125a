//! A minimal HTTP/1.1 GET for scraping, on the hyper 1 already in the tree through
//! tonic: one connection per request (a scrape is three small requests every few
//! seconds, to a server on the same host or network), one timeout over connect,
//! headers and body, and a hard cap on the body that stops reading past it.

use std::pin::pin;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::endpoint::Origin;
use super::error::InferenceError;

const USER_AGENT: &str = concat!("flotilla-agent/", env!("CARGO_PKG_VERSION"));

/// A response whose body was read completely.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub status: StatusCode,
    pub body: Bytes,
}

/// What one GET asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Get<'a> {
    pub path: &'a str,
    /// The `Accept` header.
    pub accept: &'a str,
    pub timeout: Duration,
    /// The most body bytes read; a longer body fails the request.
    pub limit: usize,
}

/// GETs `get.path` from `origin`. Any status is returned; the caller decides what a
/// non-2xx means for its path.
pub(crate) async fn get(origin: &Origin, get: Get<'_>) -> Result<Fetched, InferenceError> {
    let url = origin.url(get.path);
    match tokio::time::timeout(get.timeout, exchange(origin, get, &url)).await {
        Ok(result) => result,
        Err(_) => Err(InferenceError::Timeout { url, timeout: get.timeout }),
    }
}

async fn exchange(origin: &Origin, get: Get<'_>, url: &str) -> Result<Fetched, InferenceError> {
    let http = |source| InferenceError::Http { url: url.to_owned(), source };
    let stream = TcpStream::connect((origin.host.as_str(), origin.port))
        .await
        .map_err(|source| InferenceError::Connect { url: url.to_owned(), source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    let request = Request::get(origin.request_path(get.path))
        .header(header::HOST, origin.authority.as_str())
        .header(header::ACCEPT, get.accept)
        .header(header::USER_AGENT, USER_AGENT)
        // One request per connection: nothing to pool, and the server frees the
        // socket at once.
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|source| InferenceError::Request { url: url.to_owned(), source })?;
    let response = async {
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let too_large = || InferenceError::BodyTooLarge { url: url.to_owned(), limit: get.limit };
        // A declared length past the cap fails before any body byte is read.
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > get.limit as u64) {
            return Err(too_large());
        }
        let body = Limited::new(response.into_body(), get.limit)
            .collect()
            .await
            .map_err(|source| {
                if source.downcast_ref::<LengthLimitError>().is_some() {
                    too_large()
                } else {
                    InferenceError::Body { url: url.to_owned(), source }
                }
            })?
            .to_bytes();
        Ok(Fetched { status, body })
    };
    // The connection future moves the bytes; it is driven here, beside the request,
    // instead of on a spawned task that could outlive the timeout.
    let mut conn = pin!(conn);
    let mut response = pin!(response);
    tokio::select! {
        result = &mut response => result,
        closed = &mut conn => {
            closed.map_err(http)?;
            response.await
        }
    }
}
