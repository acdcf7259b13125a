//! What can go wrong when configuring or scraping an inference endpoint. Every
//! variant about a request names the URL, so a status line alone says which server
//! and which path failed.

use std::time::Duration;

/// Why an inference endpoint could not be configured or scraped.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The endpoint's configuration is unusable.
    #[error("inference endpoint {name:?} ({url}): {reason}")]
    BadEndpoint { name: String, url: String, reason: String },
    /// Two endpoints share a name, so their series would collide.
    #[error("inference endpoint name {name:?} is used twice")]
    DuplicateEndpoint { name: String },
    /// The TCP connection could not be made (server down, wrong port).
    #[error("{url}: connect: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// The request could not be built from the endpoint's URL.
    #[error("{url}: building the request: {source}")]
    Request {
        url: String,
        #[source]
        source: hyper::http::Error,
    },
    /// The HTTP exchange failed after connecting.
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    /// No complete response within the endpoint's timeout.
    #[error("{url}: no complete response within {}", humantime::format_duration(*.timeout))]
    Timeout { url: String, timeout: Duration },
    /// The server answered with a non-2xx status.
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    /// The body passed the size cap; reading stopped there.
    #[error("{url}: body is larger than {limit} bytes; stopped reading")]
    BodyTooLarge { url: String, limit: usize },
    /// The body could not be read to its end.
    #[error("{url}: reading the body: {source}")]
    Body {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The body is not UTF-8, so it cannot be Prometheus text.
    #[error("{url}: body is not UTF-8 text")]
    NotUtf8 { url: String },
    /// The body is not valid Prometheus text exposition format 0.0.4.
    #[error("{url}: not Prometheus text format 0.0.4: {message}")]
    Parse { url: String, message: String },
    /// The page has no series of any known engine and no engine was configured.
    #[error(
        "{url}: cannot tell the inference engine: the page has no vllm:, sglang:, tgi_ or llamacpp: samples; set `engine` for this endpoint"
    )]
    UnknownEngine { url: String },
    /// The mapping table compiled into the agent is inconsistent (a build defect).
    #[error("inference mapping table: {message}")]
    MappingTable { message: String },
    /// The parse-and-map task died; it should not, and the next scrape tries again.
    #[error("{url}: parsing task failed: {source}")]
    Task {
        url: String,
        #[source]
        source: tokio::task::JoinError,
    },
}
