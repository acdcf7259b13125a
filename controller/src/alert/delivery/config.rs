//! Where alerts go and how hard we try: the `[alerting.delivery]` table of the
//! controller's config.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

/// Alert delivery targets and retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Alertmanager base URLs (`http://127.0.0.1:9093`); alerts are posted to `{base}/api/v2/alerts`.
    pub alertmanagers: Vec<String>,
    /// Full webhook URLs; each receives Alertmanager's webhook payload (version "4").
    pub webhooks: Vec<String>,
    /// An extra PEM root (or several) trusted for https targets, besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Limit on one request, connect to response.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Firing alerts are posted to each Alertmanager again this often, so that it never
    /// expires them while they still fire (Prometheus' `resend_delay`).
    #[serde(with = "humantime_serde")]
    pub resend_interval: Duration,
    /// Wait after the first failed attempt; it doubles per failure up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Attempts per request before it is given up (firing alerts are still re-sent to
    /// Alertmanager at the next resend).
    pub max_attempts: u32,
    /// Distinct alerts queued per target; past it the oldest firing one is dropped.
    pub queue_capacity: usize,
    /// Most alerts in one request.
    pub max_batch: usize,
    /// This controller's URL, given to webhooks as `externalURL`: set from
    /// `alerting.external_url` (one setting for it, not two).
    #[serde(skip)]
    pub external_url: String,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            alertmanagers: Vec::new(),
            webhooks: Vec::new(),
            ca_file: None,
            timeout: Duration::from_secs(10),
            resend_interval: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_attempts: 10,
            queue_capacity: 10_000,
            max_batch: 64,
            external_url: String::new(),
        }
    }
}

impl DeliveryConfig {
    /// Checks URLs and limits; the message names the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for (field, urls) in [("alertmanagers", &self.alertmanagers), ("webhooks", &self.webhooks)] {
            for url in urls {
                let parsed = parse_target(url).map_err(|e| format!("alerting.delivery.{field}: {e}"))?;
                if !seen.insert(parsed.clone()) {
                    return Err(format!("alerting.delivery.{field}: {} is listed twice", redact(&parsed)));
                }
            }
        }
        if !self.external_url.is_empty() {
            parse_target(&self.external_url).map_err(|e| format!("alerting.delivery.external_url: {e}"))?;
        }
        let positive = [
            ("timeout", self.timeout),
            ("resend_interval", self.resend_interval),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err(format!("alerting.delivery.{field} must be greater than zero"));
            }
        }
        if self.backoff_max < self.backoff_initial {
            return Err("alerting.delivery.backoff_max must not be less than backoff_initial".to_owned());
        }
        if self.max_attempts == 0 {
            return Err("alerting.delivery.max_attempts must be at least 1".to_owned());
        }
        if self.queue_capacity == 0 {
            return Err("alerting.delivery.queue_capacity must be at least 1".to_owned());
        }
        if !(1..=10_000).contains(&self.max_batch) {
            return Err("alerting.delivery.max_batch must be between 1 and 10000".to_owned());
        }
        Ok(())
    }
}

/// Parses an http(s) URL with a host.
pub(crate) fn parse_target(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{url:?} must start with http:// or https://"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if parsed.fragment().is_some() {
        return Err(format!("{url:?} must not have a #fragment"));
    }
    Ok(parsed)
}

/// The URL without credentials or query (webhook tokens often live there), for logs.
pub(crate) fn redact(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn with(f: impl FnOnce(&mut DeliveryConfig)) -> DeliveryConfig {
        let mut config = DeliveryConfig::default();
        f(&mut config);
        config
    }

    #[test]
    fn defaults_are_valid() {
        DeliveryConfig::default().validate().unwrap();
    }

    #[test]
    fn parses_toml_with_humantime_durations() {
        let text = r#"
            alertmanagers = ["http://127.0.0.1:9093"]
            timeout = "3s"
            resend_interval = "30s"
            backoff_initial = "100ms"
        "#;
        let config: DeliveryConfig =
            flotilla_common::config::parse_toml(std::path::Path::new("controller.toml"), text).unwrap();
        assert_eq!(config.timeout, Duration::from_secs(3));
        assert_eq!(config.resend_interval, Duration::from_secs(30));
        assert_eq!(config.backoff_initial, Duration::from_millis(100));
        assert_eq!(config.max_batch, 64);
        config.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let parsed: Result<DeliveryConfig, _> =
            flotilla_common::config::parse_toml(std::path::Path::new("controller.toml"), "alertmanager = []");
        assert!(parsed.is_err());
    }

    #[test]
    fn bad_urls_are_named() {
        let cases = [
            (with(|c| c.alertmanagers = vec!["ftp://am:21".into()]), "alerting.delivery.alertmanagers"),
            (with(|c| c.webhooks = vec!["not a url".into()]), "is not a URL"),
            (with(|c| c.webhooks = vec!["unix:/run/hook.sock".into()]), "http:// or https://"),
            (with(|c| c.webhooks = vec!["http://h/x#frag".into()]), "#fragment"),
            (with(|c| c.external_url = "mailto:ops@example.invalid".into()), "external_url"),
            (with(|c| c.alertmanagers = vec!["http://am:9093".into(), "http://am:9093/".into()]), "listed twice"),
        ];
        for (config, want) in cases {
            let error = config.validate().unwrap_err();
            assert!(error.contains(want), "{error:?} should mention {want:?}");
        }
    }

    #[test]
    fn bad_limits_are_named() {
        let cases = [
            (with(|c| c.timeout = Duration::ZERO), "timeout"),
            (with(|c| c.resend_interval = Duration::ZERO), "resend_interval"),
            (with(|c| c.backoff_max = Duration::from_millis(1)), "backoff_max"),
            (with(|c| c.max_attempts = 0), "max_attempts"),
            (with(|c| c.queue_capacity = 0), "queue_capacity"),
            (with(|c| c.max_batch = 0), "max_batch"),
        ];
        for (config, want) in cases {
            let error = config.validate().unwrap_err();
            assert!(error.contains(want), "{error:?} should mention {want:?}");
        }
    }

    #[test]
    fn redaction_hides_credentials_and_query() {
        let url = Url::parse("https://user:secret@hooks.example.invalid:8443/notify?token=abc").unwrap();
        assert_eq!(redact(&url), "https://hooks.example.invalid:8443/notify");
    }
}
