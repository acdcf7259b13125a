//! One inference server to scrape, as written in the agent config, and the checked
//! form of its URL that requests are built from.

use std::time::Duration;

use hyper::Uri;
use serde::Deserialize;

use super::engine::Engine;
use super::error::InferenceError;

/// The per-request timeout when the config gives none: well under the default
/// 5 s collection interval, so a hung server cannot delay the next round.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest per-request timeout accepted; past this a stuck server would hold
/// a collection round for longer than any sensible interval.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// An inference server the agent scrapes, e.g.
/// `{ name = "llama-8b", url = "http://127.0.0.1:8000", engine = "vllm", timeout = "2s" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceEndpoint {
    /// Short unique name; becomes the `endpoint` label of every series.
    pub name: String,
    /// Base URL, `http://host:port` (an optional path prefix is kept; no TLS: the
    /// servers listen on localhost or the node's private network).
    pub url: String,
    /// The engine behind the URL; detected from the page when absent.
    #[serde(default)]
    pub engine: Option<Engine>,
    /// Limit for each request (connect, headers and body together).
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

impl InferenceEndpoint {
    /// An endpoint with the default timeout and engine detection.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self { name: name.into(), url: url.into(), engine: None, timeout: DEFAULT_TIMEOUT }
    }

    /// Checks what deserialising cannot: the name, the URL's shape, the timeout.
    pub fn validate(&self) -> Result<(), InferenceError> {
        Origin::parse(self).map(|_| ())
    }
}

/// A validated `http://host:port[/prefix]` to send requests to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Host name or IP address as the socket API wants it (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    /// Path prefix without a trailing slash; empty for most servers.
    pub prefix: String,
}

impl Origin {
    pub fn parse(endpoint: &InferenceEndpoint) -> Result<Self, InferenceError> {
        let bad = |reason: &str| InferenceError::BadEndpoint {
            name: endpoint.name.clone(),
            url: endpoint.url.clone(),
            reason: reason.to_owned(),
        };
        if endpoint.name.trim().is_empty() {
            return Err(bad("name must not be empty"));
        }
        if endpoint.timeout.is_zero() || endpoint.timeout > MAX_TIMEOUT {
            return Err(bad(&format!(
                "timeout {} is outside (0s, {}]",
                humantime::format_duration(endpoint.timeout),
                humantime::format_duration(MAX_TIMEOUT)
            )));
        }
        let uri: Uri = endpoint.url.parse().map_err(|e| bad(&format!("is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "scheme {other}:// is not supported; use http:// (inference servers are scraped on localhost or the private network)"
                )));
            }
            None => return Err(bad("must start with http://")),
        }
        if uri.query().is_some() {
            return Err(bad("must not have a query string"));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not carry credentials"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        Ok(Self {
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The full URL of `path` (which starts with `/`), for requests and messages.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority, self.prefix, path)
    }

    /// The request target of `path` on this origin.
    pub fn request_path(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(url: &str) -> Result<Origin, String> {
        Origin::parse(&InferenceEndpoint::new("e", url)).map_err(|e| e.to_string())
    }

    #[test]
    fn plain_urls_are_accepted() {
        let o = origin("http://127.0.0.1:8000").unwrap();
        assert_eq!((o.host.as_str(), o.port, o.prefix.as_str()), ("127.0.0.1", 8000, ""));
        assert_eq!(o.url("/metrics"), "http://127.0.0.1:8000/metrics");
        let o = origin("http://[::1]:30000/").unwrap();
        assert_eq!((o.host.as_str(), o.port), ("::1", 30000));
        let o = origin("http://gpu-node-3/llm/").unwrap();
        assert_eq!((o.port, o.request_path("/health").as_str()), (80, "/llm/health"));
    }

    #[test]
    fn bad_urls_are_explained() {
        for (url, why) in [
            ("https://x:1", "use http://"),
            ("x:1", "http://"),
            ("http://x:1/?a=b", "query"),
            ("http://u:p@x:1", "credentials"),
            ("not a url", "not a URL"),
        ] {
            let err = origin(url).unwrap_err();
            assert!(err.contains(why) && err.contains(url), "{url}: {err}");
        }
    }

    #[test]
    fn config_is_strict_and_uses_humantime() {
        let e: InferenceEndpoint =
            toml::from_str("name = \"a\"\nurl = \"http://h:1\"\nengine = \"sglang\"\ntimeout = \"750ms\"").unwrap();
        assert_eq!(e.engine, Some(Engine::Sglang));
        assert_eq!(e.timeout, Duration::from_millis(750));
        let e: InferenceEndpoint = toml::from_str("name = \"a\"\nurl = \"http://h:1\"").unwrap();
        assert_eq!((e.engine, e.timeout), (None, DEFAULT_TIMEOUT));
        let err = toml::from_str::<InferenceEndpoint>("name = \"a\"\nurl = \"http://h:1\"\ntimout = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("timout"), "{err}");
        let slow = InferenceEndpoint { timeout: Duration::from_secs(61), ..InferenceEndpoint::new("a", "http://h:1") };
        assert!(slow.validate().unwrap_err().to_string().contains("timeout"));
        assert!(InferenceEndpoint::new(" ", "http://h:1").validate().is_err());
    }
}
