//! Controller configuration: defaults < TOML file < environment < flags, then one
//! `validate()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_common::config::{ConfigError, load_toml};
use flotilla_common::logging::LogFormat;
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
    /// Where the sled store lives.
    pub data_dir: PathBuf,
    /// sled's page cache in bytes: most of a busy controller's memory (default 1 GiB).
    pub store_cache_bytes: u64,
    /// The fleet CA and the controller's server certificate.
    pub tls: TlsFiles,
    /// Log output format.
    pub log_format: LogFormat,
    pub agents: AgentPolicy,
    pub telemetry: TelemetryPolicy,
    pub limits: Limits,
    pub alerting: crate::alert::engine::AlertingConfig,
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
}

impl Default for Config {
    fn default() -> Self {
        let pki = Path::new("/etc/flotilla/pki");
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            metrics_listen: None,
            data_dir: PathBuf::from("/var/lib/flotilla/controller"),
            store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            tls: TlsFiles { ca: pki.join("ca.pem"), cert: pki.join("controller.pem"), key: pki.join("controller.key") },
            log_format: LogFormat::Text,
            agents: AgentPolicy::default(),
            telemetry: TelemetryPolicy::default(),
            limits: Limits::default(),
            alerting: crate::alert::engine::AlertingConfig::default(),
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
        }
    }
}

impl Default for TelemetryPolicy {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(3600),
            rollup_retention: Duration::from_secs(30 * 24 * 3600),
            max_commit_group: 4096,
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
        }
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
    pub log_format: Option<LogFormat>,
    pub rules: Option<PathBuf>,
}

impl Config {
    /// Loads `file` (if any) over the defaults, applies `overrides`, validates.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config: Config = match file {
            Some(path) => load_toml(path)?,
            None => Config::default(),
        };
        let Overrides { listen, metrics_listen, data_dir, ca, cert, key, log_format, rules } = overrides;
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
        if self.store_cache_bytes < 16 * 1024 * 1024 {
            return bad("store_cache_bytes must be at least 16777216 (16 MiB)");
        }
        if self.limits.max_message_bytes < 64 * 1024 {
            return bad("limits.max_message_bytes must be at least 65536");
        }
        if self.limits.max_concurrent_handshakes == 0 {
            return bad("limits.max_concurrent_handshakes must be at least 1");
        }
        if let Err(message) = self.alerting.validate() {
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
        let defaults = TelemetryPolicy::default();
        assert_eq!(config.telemetry.retention, defaults.retention, "the example shows the defaults");
        assert_eq!(config.telemetry.rollup_retention, defaults.rollup_retention);
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
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\n").unwrap();
        let o = Overrides { listen: Some("127.0.0.1:2".parse().unwrap()), ..Default::default() };
        assert_eq!(Config::load(Some(&path), o).unwrap().listen.port(), 2);
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
