//! Controller configuration: defaults < TOML file < environment < flags, then one
//! `validate()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_common::config::{ConfigError, load_toml};
use flotilla_common::logging::{LogFormat, TracingConfig};
use flotilla_common::tls::TlsFiles;
use serde::Deserialize;

/// Everything the controller needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the mTLS gRPC port (agents, flotctl, external tools).
    pub listen: SocketAddr,
    /// Address of the HTTPS (mTLS) endpoint with `/metrics`, `/healthz` and `/readyz`; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Address of the enrollment port: TLS with server authentication only,
    /// serving only `flotilla.v1.Enrollment` (agents with a join token and no
    /// certificate yet). Off when unset; needs `tls.ca_key`.
    pub enroll_listen: Option<SocketAddr>,
    /// Where the sled store lives.
    pub data_dir: PathBuf,
    /// sled's page cache in bytes: most of a busy controller's memory (default 1 GiB).
    pub store_cache_bytes: u64,
    /// Whether a new store compresses what it writes (zstd, fastest level; default
    /// off): a quarter to a half of the disk, for much more CPU on the commit path
    /// (BENCHMARKS.md). sled fixes it when the store is created; an existing
    /// store keeps its own.
    pub store_compression: bool,
    /// The fleet CA and the controller's server certificate (and, for
    /// enrollment and renewal, the CA key).
    pub tls: ControllerTls,
    /// Log output format.
    pub log_format: LogFormat,
    /// Span export over OTLP (`[tracing]`); off without `otlp_endpoint`.
    pub tracing: TracingConfig,
    pub agents: AgentPolicy,
    pub telemetry: TelemetryPolicy,
    pub limits: Limits,
    pub alerting: crate::alert::engine::AlertingConfig,
    /// The two-person rule: verbs held until a second admin approves them.
    pub approvals: crate::approval::ApprovalPolicy,
}

/// How agents are judged alive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentPolicy {
    /// A node is down after this many heartbeat intervals of silence.
    pub missed_heartbeats: u32,
    /// How long a new stream may take to send its hello.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Bounds on the heartbeat interval an agent may announce.
    #[serde(with = "humantime_serde")]
    pub min_heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_heartbeat_interval: Duration,
    /// Validity of the certificates the controller signs for agents (enrollment
    /// and renewal); agents renew two thirds into it.
    #[serde(with = "humantime_serde")]
    pub cert_ttl: Duration,
    /// How far an agent's clock may be from the controller's (measured from its
    /// heartbeats) before its node is degraded and its batches are stored
    /// shifted to controller time (see `clock.rs`).
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

/// The controller's TLS files: [`TlsFiles`] plus the CA key, which only the
/// controller may hold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerTls {
    /// The fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// The controller's server certificate (PEM).
    pub cert: PathBuf,
    /// The controller's private key (PEM).
    pub key: PathBuf,
    /// The fleet CA's private key (`ca.key` of `flotctl ca init`). With it the
    /// controller signs the certificates of enrolling and renewing agents;
    /// without it enrollment is off and renewals are refused.
    pub ca_key: Option<PathBuf>,
}

impl Default for ControllerTls {
    /// What `flotctl ca init --dir /etc/flotilla/pki` writes; no CA key.
    fn default() -> Self {
        let pki = Path::new("/etc/flotilla/pki");
        Self { ca: pki.join("ca.pem"), cert: pki.join("controller.pem"), key: pki.join("controller.key"), ca_key: None }
    }
}

impl ControllerTls {
    /// The CA, certificate and key, as the TLS helpers take them.
    pub fn files(&self) -> TlsFiles {
        TlsFiles { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone() }
    }
}

impl From<TlsFiles> for ControllerTls {
    fn from(files: TlsFiles) -> Self {
        Self { ca: files.ca, cert: files.cert, key: files.key, ca_key: None }
    }
}

/// Telemetry storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryPolicy {
    /// The raw window: batches older than this are deleted once rolled up, and
    /// queries reaching further back are answered from rollups.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// One-minute rollups older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub rollup_retention: Duration,
    /// Most batches written under one flush (group commit).
    pub max_commit_group: usize,
    /// How long the committer waits after a batch arrives for others to join
    /// its flush. Every flush wakes sled's writer threads and syncs the log, so
    /// on a busy controller a few milliseconds here save far more CPU than they
    /// add to an ack; zero flushes as soon as anything is queued.
    #[serde(with = "humantime_serde")]
    pub commit_linger: Duration,
    /// Depth of the queue in front of the committer; a full queue slows agents down.
    pub commit_queue: usize,
}

/// Protective limits on connections and messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How long a client may take to complete the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; more wait in the accept queue.
    pub max_concurrent_handshakes: usize,
    /// Sustained requests per second one client (one certificate identity) may make.
    pub requests_per_second_per_client: f64,
    /// Requests one client may make at once above its sustained rate.
    pub burst_per_client: u32,
    /// Requests being handled at once across all clients; more are refused at once
    /// (RESOURCE_EXHAUSTED), not queued. A stream holds its slot only until its
    /// response starts.
    pub max_concurrent_requests: usize,
    /// Longest a request may take until its response starts (a unary call's whole
    /// life); streams are not cut once they run.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP/2 streams (calls) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Largest HTTP/2 header block (gRPC metadata) a request may carry, in bytes.
    pub max_header_list_bytes: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            metrics_listen: None,
            enroll_listen: None,
            data_dir: PathBuf::from("/var/lib/flotilla/controller"),
            store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            store_compression: false,
            tls: ControllerTls::default(),
            log_format: LogFormat::Text,
            tracing: TracingConfig::default(),
            agents: AgentPolicy::default(),
            telemetry: TelemetryPolicy::default(),
            limits: Limits::default(),
            alerting: crate::alert::engine::AlertingConfig::default(),
            approvals: crate::approval::ApprovalPolicy::default(),
        }
    }
}

impl Default for AgentPolicy {
    fn default() -> Self {
        Self {
            missed_heartbeats: 3,
            hello_timeout: Duration::from_secs(10),
            min_heartbeat_interval: Duration::from_millis(100),
            max_heartbeat_interval: Duration::from_secs(60),
            cert_ttl: Duration::from_secs(72 * 3600),
            max_clock_skew: Duration::from_secs(30),
        }
    }
}

impl Default for TelemetryPolicy {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(3600),
            rollup_retention: Duration::from_secs(30 * 24 * 3600),
            max_commit_group: 4096,
            commit_linger: Duration::from_millis(2),
            commit_queue: 16_384,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_handshakes: 256,
            requests_per_second_per_client: 50.0,
            burst_per_client: 100,
            max_concurrent_requests: 1024,
            // Above the longest command wait: a drain (deadline up to 60 min, then a
            // stop of up to 10 min, plus the envelope's life), 71 min.
            request_timeout: Duration::from_secs(75 * 60),
            max_concurrent_streams: 256,
            max_header_list_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// Checks the request limits (the connection limits are checked by [`Config::validate`]).
    fn validate(&self) -> Result<(), String> {
        let rate = self.requests_per_second_per_client;
        if !rate.is_finite() || rate <= 0.0 {
            return Err(format!("limits.requests_per_second_per_client must be above 0 (got {rate})"));
        }
        if self.burst_per_client == 0 {
            return Err("limits.burst_per_client must be at least 1".to_owned());
        }
        if self.max_concurrent_requests == 0 {
            return Err("limits.max_concurrent_requests must be at least 1".to_owned());
        }
        if self.request_timeout < Duration::from_secs(1) {
            return Err("limits.request_timeout must be at least 1s".to_owned());
        }
        if self.max_concurrent_streams == 0 {
            return Err("limits.max_concurrent_streams must be at least 1".to_owned());
        }
        if self.max_header_list_bytes < 1024 {
            return Err("limits.max_header_list_bytes must be at least 1024".to_owned());
        }
        Ok(())
    }
}

/// Values from the environment or flags; each `Some` wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub enroll_listen: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub rules: Option<PathBuf>,
    pub otlp_endpoint: Option<String>,
}

impl Config {
    /// Loads `file` (if any) over the defaults, applies `overrides`, validates.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config: Config = match file {
            Some(path) => load_toml(path)?,
            None => Config::default(),
        };
        let Overrides {
            listen,
            metrics_listen,
            data_dir,
            ca,
            cert,
            key,
            ca_key,
            enroll_listen,
            log_format,
            rules,
            otlp_endpoint,
        } = overrides;
        config.tracing.otlp_endpoint = otlp_endpoint.or(config.tracing.otlp_endpoint);
        config.tls.ca_key = ca_key.or(config.tls.ca_key);
        config.enroll_listen = enroll_listen.or(config.enroll_listen);
        config.alerting.rules = rules.or(config.alerting.rules);
        config.metrics_listen = metrics_listen.or(config.metrics_listen);
        config.listen = listen.unwrap_or(config.listen);
        config.data_dir = data_dir.unwrap_or(config.data_dir);
        config.tls.ca = ca.unwrap_or(config.tls.ca);
        config.tls.cert = cert.unwrap_or(config.tls.cert);
        config.tls.key = key.unwrap_or(config.tls.key);
        config.log_format = log_format.unwrap_or(config.log_format);
        let origin = file.map_or_else(|| "controller config".to_owned(), |p| p.display().to_string());
        config.validate(&origin)?;
        Ok(config)
    }

    /// Checks the values that parsing cannot.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::invalid(origin, m));
        if self.agents.missed_heartbeats == 0 {
            return bad("agents.missed_heartbeats must be at least 1");
        }
        if self.agents.min_heartbeat_interval > self.agents.max_heartbeat_interval {
            return bad("agents.min_heartbeat_interval is above agents.max_heartbeat_interval");
        }
        if self.telemetry.retention < Duration::from_secs(60) {
            return bad("telemetry.retention must be at least 1m (rollups are per minute)");
        }
        if self.telemetry.rollup_retention < self.telemetry.retention {
            return bad("telemetry.rollup_retention is below telemetry.retention");
        }
        if self.telemetry.max_commit_group == 0 || self.telemetry.commit_queue == 0 {
            return bad("telemetry.max_commit_group and telemetry.commit_queue must be at least 1");
        }
        if self.telemetry.commit_linger > Duration::from_secs(1) {
            return bad("telemetry.commit_linger must be at most 1s (every ack waits for it)");
        }
        if self.store_cache_bytes < 16 * 1024 * 1024 {
            return bad("store_cache_bytes must be at least 16777216 (16 MiB)");
        }
        if self.limits.max_message_bytes < 64 * 1024 {
            return bad("limits.max_message_bytes must be at least 65536");
        }
        if self.limits.max_concurrent_handshakes == 0 {
            return bad("limits.max_concurrent_handshakes must be at least 1");
        }
        if let Err(message) = self.limits.validate() {
            return bad(&message);
        }
        if let Err(message) = self.tracing.validate() {
            return bad(&message);
        }
        if self.enroll_listen.is_some() && self.tls.ca_key.is_none() {
            return bad(
                "enroll_listen needs tls.ca_key: the controller signs enrolling agents' certificates with the CA key",
            );
        }
        if self.agents.max_clock_skew < Duration::from_secs(1) {
            return bad("agents.max_clock_skew must be at least 1s (heartbeats take time to arrive)");
        }
        if self.agents.cert_ttl < Duration::from_secs(10) || self.agents.cert_ttl > Duration::from_secs(366 * 24 * 3600)
        {
            return bad("agents.cert_ttl must be within 10s..366days");
        }
        if let Err(message) = self.alerting.validate() {
            return bad(&message);
        }
        if let Err(message) = self.approvals.validate() {
            return bad(&message);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller.toml");
        let config = Config::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(config.agents.missed_heartbeats, 3);
        assert_eq!(
            config.agents.max_clock_skew,
            AgentPolicy::default().max_clock_skew,
            "the example shows the default"
        );
        let defaults = TelemetryPolicy::default();
        assert_eq!(config.telemetry.retention, defaults.retention, "the example shows the defaults");
        assert_eq!(config.telemetry.rollup_retention, defaults.rollup_retention);
        let limits = Limits::default();
        assert_eq!(config.limits.requests_per_second_per_client, limits.requests_per_second_per_client);
        assert_eq!(config.limits.burst_per_client, limits.burst_per_client);
        assert_eq!(config.limits.max_concurrent_requests, limits.max_concurrent_requests);
        assert_eq!(config.limits.request_timeout, limits.request_timeout);
        assert_eq!(config.limits.max_concurrent_streams, limits.max_concurrent_streams);
        assert_eq!(config.limits.max_header_list_bytes, limits.max_header_list_bytes);
    }

    #[test]
    fn retention_windows_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[telemetry]\nretention = \"2h\"\nrollup_retention = \"1h\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("rollup_retention"), "{err}");
        std::fs::write(&path, "[telemetry]\nretention = \"10s\"\n").unwrap();
        assert!(Config::load(Some(&path), Overrides::default()).is_err());
    }

    #[test]
    fn request_limits_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for (bad, key) in [
            ("requests_per_second_per_client = 0.0", "requests_per_second_per_client"),
            ("requests_per_second_per_client = nan", "requests_per_second_per_client"),
            ("burst_per_client = 0", "burst_per_client"),
            ("max_concurrent_requests = 0", "max_concurrent_requests"),
            ("request_timeout = \"100ms\"", "request_timeout"),
            ("max_concurrent_streams = 0", "max_concurrent_streams"),
            ("max_header_list_bytes = 100", "max_header_list_bytes"),
        ] {
            std::fs::write(&path, format!("[limits]\n{bad}\n")).unwrap();
            let err = Config::load(Some(&path), Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\n").unwrap();
        let o = Overrides { listen: Some("127.0.0.1:2".parse().unwrap()), ..Default::default() };
        assert_eq!(Config::load(Some(&path), o).unwrap().listen.port(), 2);
    }

    #[test]
    fn enrollment_needs_the_ca_key_and_a_sane_certificate_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "enroll_listen = \"127.0.0.1:0\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("tls.ca_key"), "{err}");
        std::fs::write(&path, "enroll_listen = \"127.0.0.1:0\"\n[tls]\nca_key = \"/pki/ca.key\"\n").unwrap();
        let c = Config::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(c.tls.ca_key.as_deref(), Some(Path::new("/pki/ca.key")));
        assert_eq!(c.tls.ca, ControllerTls::default().ca, "the other TLS paths keep their defaults");
        assert_eq!(c.agents.cert_ttl, Duration::from_secs(72 * 3600));
        std::fs::write(&path, "[agents]\ncert_ttl = \"1s\"\n").unwrap();
        assert!(Config::load(Some(&path), Overrides::default()).unwrap_err().to_string().contains("cert_ttl"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[agents]\nmissed_heartbeat = 3\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("missed_heartbeat") && err.contains("c.toml:2"), "{err}");
    }
}
