//! Tracing setup shared by the daemons and flotctl: text or JSON logs on
//! stderr, the ring of recent warnings, and optional OTLP span export.

mod otlp;
mod recent;

pub use otlp::{ExportError, TracingConfig};
pub use recent::{RecentEvent, RecentEvents, RecentEventsLayer};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

/// The crates whose spans are exported: ours. The HTTP/2 and gRPC stack below
/// (also the exporter's own) is left out, so exporting never traces itself.
const EXPORTED: [&str; 5] = ["flotilla_common", "flotilla_agent", "flotilla_controller", "flotilla_ctl", "flotctl"];

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
/// Logs go to stderr so that stdout stays clean for command output. WARN and
/// ERROR events are also kept in [`RecentEvents::global`] (whatever `RUST_LOG`
/// says), for the agent's diagnostics. With `export.otlp_endpoint` set, our
/// spans (INFO and up, whatever `RUST_LOG` says) are also exported over OTLP as
/// `service_name` (default `default_service`); call it inside the tokio runtime
/// that will drive the export, and call [`Tracing::shutdown`] before that
/// runtime ends.
pub fn init(
    format: LogFormat,
    default_filter: &str,
    export: &TracingConfig,
    default_service: &str,
) -> Result<Tracing, ExportError> {
    let exporter = match export.otlp_endpoint.as_deref() {
        Some(endpoint) => Some(otlp::provider(export, endpoint, default_service)?),
        None => None,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (provider, otel) = match exporter {
        Some((provider, tracer)) => {
            let ours = EXPORTED.iter().fold(Targets::new(), |t, target| t.with_target(*target, LevelFilter::INFO));
            (Some(provider), Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours)))
        }
        None => (None, None),
    };
    // A second init (tests, the in-process demo) is harmless: keep the first
    // (and drop this one's exporter).
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(RecentEvents::global().layer().with_filter(LevelFilter::WARN))
        .with(otel)
        .try_init()
        .is_ok();
    let provider = provider.filter(|_| installed);
    if let Some(endpoint) = export.otlp_endpoint.as_deref().filter(|_| provider.is_some()) {
        tracing::info!(endpoint, sample_ratio = export.sample_ratio, "exporting spans over OTLP");
    }
    Ok(Tracing { provider })
}

/// The span exporter of this process, if any.
#[derive(Debug, Default)]
#[must_use = "call shutdown() before the runtime ends, or the last spans are lost"]
pub struct Tracing {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Tracing {
    /// Flushes the spans still batched and stops the exporter (bounded wait).
    /// Call it from outside async code while the runtime still runs.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            otlp::shutdown(provider);
        }
    }
}
