//! Span export over OTLP/gRPC (`[tracing]` in the daemons' configs, and
//! `--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` everywhere). Off unless
//! an endpoint is set. Spans are batched on the SDK's own thread and sent with
//! the tonic channel of the workspace; the batch is flushed on shutdown.

use std::path::PathBuf;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use serde::{Deserialize, Serialize};

/// How long shutdown waits for the last batch to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector, `http://HOST:PORT` (e.g. `http://127.0.0.1:4317`)
    /// or `https://HOST:PORT` (then `otlp_ca` is required). None: no export.
    pub otlp_endpoint: Option<String>,
    /// The CA certificate (PEM) trusted for an https collector.
    pub otlp_ca: Option<PathBuf>,
    /// `service.name` of the exported spans; default: the program's name.
    pub service_name: Option<String>,
    /// The fraction of traces started here that are exported (0 to 1). A
    /// request that arrives with a trace context follows its caller's decision.
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self { otlp_endpoint: None, otlp_ca: None, service_name: None, sample_ratio: 1.0 }
    }
}

impl TracingConfig {
    /// The problem with these settings, in words naming the key, if any.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!("tracing.sample_ratio {} must be between 0 and 1", self.sample_ratio));
        }
        if self.service_name.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err("tracing.service_name must not be empty".to_owned());
        }
        let Some(endpoint) = self.otlp_endpoint.as_deref() else { return Ok(()) };
        match endpoint.parse::<tonic::transport::Uri>() {
            Ok(uri) if uri.host().is_some() && uri.scheme_str() == Some("http") => Ok(()),
            Ok(uri) if uri.host().is_some() && uri.scheme_str() == Some("https") => match &self.otlp_ca {
                Some(_) => Ok(()),
                None => Err(format!(
                    "tracing.otlp_endpoint {endpoint:?} is https: set tracing.otlp_ca to the collector's CA \
                     certificate (PEM), or use http:// to a local collector"
                )),
            },
            _ => Err(format!(
                "tracing.otlp_endpoint {endpoint:?} must be http://HOST:PORT or https://HOST:PORT (OTLP over gRPC)"
            )),
        }
    }
}

/// Why span export cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Invalid(String),
    #[error("tracing.otlp_ca {path}: {source}")]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Build { endpoint: String, reason: String },
}

/// Builds the provider and its tracer. Must run inside a tokio runtime (the
/// gRPC channel spawns its connection task there), which must outlive it.
pub(super) fn provider(
    config: &TracingConfig,
    endpoint: &str,
    default_service: &str,
) -> Result<(SdkTracerProvider, SdkTracer), ExportError> {
    config.validate().map_err(ExportError::Invalid)?;
    let build = |reason: String| ExportError::Build { endpoint: endpoint.to_owned(), reason };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint);
    if let Some(path) = &config.otlp_ca {
        let pem = std::fs::read(path).map_err(|source| ExportError::Ca { path: path.clone(), source })?;
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
        exporter = exporter.with_tls_config(tls);
    }
    let exporter = exporter.build().map_err(|e| build(e.to_string()))?;
    let service = config.service_name.clone().unwrap_or_else(|| default_service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer(default_service.to_owned());
    Ok((provider, tracer))
}

/// Flushes and stops `provider`, logging (not failing) when the collector is unreachable.
pub(super) fn shutdown(provider: SdkTracerProvider) {
    if let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
        tracing::warn!(%error, "could not flush the last spans to the OTLP collector");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_endpoint(endpoint: &str) -> TracingConfig {
        TracingConfig { otlp_endpoint: Some(endpoint.to_owned()), ..TracingConfig::default() }
    }

    #[test]
    fn endpoints_are_checked_before_anything_starts() {
        assert!(TracingConfig::default().validate().is_ok(), "off by default");
        assert!(with_endpoint("http://127.0.0.1:4317").validate().is_ok());
        let https = with_endpoint("https://collector.example:4317").validate().unwrap_err();
        assert!(https.contains("tracing.otlp_ca"), "{https}");
        let trusted = TracingConfig { otlp_ca: Some("ca.pem".into()), ..with_endpoint("https://collector:4317") };
        assert!(trusted.validate().is_ok());
        for bad in ["127.0.0.1:4317", "ftp://x:1", "http://", "not a url"] {
            assert!(with_endpoint(bad).validate().is_err(), "{bad}");
        }
        for ratio in [-0.1, 1.5, f64::NAN] {
            let config = TracingConfig { sample_ratio: ratio, ..TracingConfig::default() };
            assert!(config.validate().is_err(), "{ratio}");
        }
    }
}
