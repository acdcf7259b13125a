//! Agent configuration: defaults < TOML file < environment < flags, then one
//! `validate()`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::config::{ConfigError, load_toml};
use flotilla_common::enroll::{CaFingerprint, JoinToken};
use flotilla_common::logging::{LogFormat, TracingConfig};
use flotilla_common::tls::TlsFiles;
use serde::Deserialize;

/// Everything the agent needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The controller's address, `https://host:port`.
    pub controller: String,
    /// This node's id. Defaults to the identity in the agent certificate; when set
    /// it must match it (the controller refuses a mismatch).
    pub node_id: Option<NodeId>,
    /// The fleet CA and this agent's client certificate. With `join_token` and no
    /// certificate yet, enrollment writes all three (the key with mode 0600).
    pub tls: TlsFiles,
    /// A join token (`flotctl token create`): used once, when `tls.cert` does not
    /// exist, to enroll with the controller at `enroll_url`. Needs `node_id`.
    /// Prefer the file or FLOTILLA_JOIN_TOKEN to the flag (`ps` shows flags).
    pub join_token: Option<JoinToken>,
    /// The fleet CA's SHA-256 (`sha256:HEX`), pinned for enrollment when the
    /// token does not carry it; when both are given they must agree.
    pub ca_fingerprint: Option<CaFingerprint>,
    /// The controller's enrollment port, `https://host:port` (its `enroll_listen`).
    pub enroll_url: Option<String>,
    /// Where the agent keeps its state (sequence counter).
    pub data_dir: PathBuf,
    /// How often telemetry is collected and sent.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How often a heartbeat is sent (defaults to `interval`, at most
    /// [`DEFAULT_HEARTBEAT_CAP`]).
    #[serde(with = "humantime_serde", default)]
    pub heartbeat_interval: Option<Duration>,
    /// The directory models are loaded from: its filesystem is reported by name
    /// (`flotilla_node_model_dir_avail_bytes`), since that is the disk that fills up.
    pub model_dir: Option<PathBuf>,
    /// Labels reported in the inventory (e.g. `rack = "r1"`, `role = "gateway"`).
    pub labels: BTreeMap<String, String>,
    pub gpu: GpuConfig,
    /// The controller's command-signing public key (`command-signing.pub` in the
    /// controller's data dir). Without it every command is refused.
    pub command_key: Option<PathBuf>,
    /// The container engine (Docker, or Podman's Docker-compatible socket).
    pub runtime: crate::runtime::RuntimeConfig,
    /// Inference servers on this host to scrape (`[[inference]]` tables).
    pub inference: Vec<crate::inference::InferenceEndpoint>,
    pub uplink: UplinkConfig,
    pub log_format: LogFormat,
    /// Span export over OTLP (`[tracing]`); off without `otlp_endpoint`.
    pub tracing: TracingConfig,
    /// The gateway role (`[gateway]`): without it the agent refuses `gateway-set`.
    pub gateway: Option<crate::gateway::GatewayConfig>,
}

/// Which GPU source feeds telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GpuSourceChoice {
    /// Real GPUs through NVML; a host without the NVIDIA driver runs without GPU data.
    #[default]
    Nvml,
    /// No GPU data.
    None,
    /// Simulated GPUs (demo, tests): deterministic curves, no hardware needed.
    Simulated,
}

/// GPU collection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    pub source: GpuSourceChoice,
    /// Number of simulated GPUs.
    pub simulated_count: u32,
    /// Seed of the simulated curves (defaults to one derived from the node id).
    pub simulated_seed: Option<u64>,
}

/// Link to the controller.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Unacknowledged batches kept in memory; past this the oldest are dropped (and counted).
    pub max_pending_batches: usize,
    /// Bytes of unacknowledged batches kept on disk (`data_dir/buffer`); past this
    /// the oldest are dropped (and counted).
    pub buffer_max_bytes: u64,
    /// First reconnect delay; doubles per failure up to `backoff_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// If the oldest sent batch is not acknowledged within this, reconnect and resend.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Diagnostics: append every acknowledged seq to this file, one a line.
    pub ack_log: Option<PathBuf>,
}

/// The heartbeat interval when none is set and `interval` is longer: the
/// controller calls a node down after `missed_heartbeats` (3) silent intervals,
/// and a silent agent must be seen within 10 s (a heartbeat is a few bytes).
pub const DEFAULT_HEARTBEAT_CAP: Duration = Duration::from_secs(2);

impl Default for Config {
    fn default() -> Self {
        let pki = Path::new("/etc/flotilla/pki");
        Self {
            controller: "https://localhost:7443".to_owned(),
            node_id: None,
            tls: TlsFiles { ca: pki.join("ca.pem"), cert: pki.join("agent.pem"), key: pki.join("agent.key") },
            join_token: None,
            ca_fingerprint: None,
            enroll_url: None,
            data_dir: PathBuf::from("/var/lib/flotilla/agent"),
            interval: Duration::from_secs(5),
            heartbeat_interval: None,
            model_dir: None,
            labels: BTreeMap::new(),
            gpu: GpuConfig::default(),
            inference: Vec::new(),
            command_key: None,
            runtime: crate::runtime::RuntimeConfig::default(),
            uplink: UplinkConfig::default(),
            log_format: LogFormat::Text,
            tracing: TracingConfig::default(),
            gateway: None,
        }
    }
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self { source: GpuSourceChoice::Nvml, simulated_count: 8, simulated_seed: None }
    }
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            max_pending_batches: 3600,
            buffer_max_bytes: 256 * 1024 * 1024,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(30),
            ack_log: None,
        }
    }
}

/// Values from the environment or flags; each `Some` wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub controller: Option<String>,
    pub node_id: Option<NodeId>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub interval: Option<Duration>,
    pub gpu_source: Option<GpuSourceChoice>,
    pub simulated_gpus: Option<u32>,
    pub ack_log: Option<PathBuf>,
    pub command_key: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub join_token: Option<JoinToken>,
    pub ca_fingerprint: Option<CaFingerprint>,
    pub enroll_url: Option<String>,
    pub otlp_endpoint: Option<String>,
}

impl Config {
    /// Loads `file` (if any) over the defaults, applies `overrides`, validates.
    pub fn load(file: Option<&Path>, o: Overrides) -> Result<Self, ConfigError> {
        let mut c: Config = match file {
            Some(path) => load_toml(path)?,
            None => Config::default(),
        };
        c.controller = o.controller.unwrap_or(c.controller);
        c.node_id = o.node_id.or(c.node_id);
        c.tls.ca = o.ca.unwrap_or(c.tls.ca);
        c.tls.cert = o.cert.unwrap_or(c.tls.cert);
        c.tls.key = o.key.unwrap_or(c.tls.key);
        c.data_dir = o.data_dir.unwrap_or(c.data_dir);
        c.interval = o.interval.unwrap_or(c.interval);
        c.gpu.source = o.gpu_source.unwrap_or(c.gpu.source);
        c.gpu.simulated_count = o.simulated_gpus.unwrap_or(c.gpu.simulated_count);
        c.uplink.ack_log = o.ack_log.or(c.uplink.ack_log);
        c.command_key = o.command_key.or(c.command_key);
        c.log_format = o.log_format.unwrap_or(c.log_format);
        c.join_token = o.join_token.or(c.join_token);
        c.ca_fingerprint = o.ca_fingerprint.or(c.ca_fingerprint);
        c.enroll_url = o.enroll_url.or(c.enroll_url);
        c.tracing.otlp_endpoint = o.otlp_endpoint.or(c.tracing.otlp_endpoint);
        let origin = file.map_or_else(|| "agent config".to_owned(), |p| p.display().to_string());
        c.validate(&origin)?;
        Ok(c)
    }

    /// The effective heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat_interval.unwrap_or(self.interval.min(DEFAULT_HEARTBEAT_CAP))
    }

    /// Checks the values that parsing cannot.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::invalid(origin, m));
        self.tracing.validate().or_else(bad)?;
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(3600) {
            return bad(format!("interval {} is outside 100ms..1h", humantime::format_duration(self.interval)));
        }
        let hb = self.heartbeat();
        if hb < Duration::from_millis(100) || hb > Duration::from_secs(60) {
            return bad(format!("heartbeat_interval {} is outside 100ms..60s", humantime::format_duration(hb)));
        }
        if self.gpu.simulated_count > 64 {
            return bad(format!("gpu.simulated_count {} is above 64", self.gpu.simulated_count));
        }
        if self.uplink.buffer_max_bytes < 1024 * 1024 {
            return bad("uplink.buffer_max_bytes must be at least 1048576 (1 MiB)".to_owned());
        }
        if self.uplink.max_pending_batches == 0 {
            return bad("uplink.max_pending_batches must be at least 1".to_owned());
        }
        if self.uplink.backoff_initial.is_zero() || self.uplink.backoff_initial > self.uplink.backoff_max {
            return bad("uplink.backoff_initial must be above zero and at most uplink.backoff_max".to_owned());
        }
        let relist = self.runtime.relist_interval;
        if relist < Duration::from_secs(1) || relist > Duration::from_secs(3600) {
            return bad(format!("runtime.relist_interval {} is outside 1s..1h", humantime::format_duration(relist)));
        }
        for endpoint in &self.inference {
            if let Err(e) = endpoint.validate() {
                return bad(format!("[[inference]] {:?}: {e}", endpoint.name));
            }
        }
        if let Some(gateway) = &self.gateway
            && let Err(e) = gateway.validate()
        {
            return bad(e);
        }
        if let Some(token) = &self.join_token {
            if self.node_id.is_none() {
                return bad("join_token needs node_id: the enrolled certificate names it".to_owned());
            }
            if self.enroll_url.is_none() {
                return bad(
                    "join_token needs enroll_url: the controller's enrollment port, https://HOST:PORT".to_owned()
                );
            }
            match (token.ca, self.ca_fingerprint) {
                (None, None) => {
                    return bad(
                        "join_token carries no CA fingerprint: pass ca_fingerprint (sha256:HEX of the fleet CA)"
                            .to_owned(),
                    );
                }
                (Some(a), Some(b)) if a != b => {
                    return bad(format!(
                        "ca_fingerprint {b} differs from the one in join_token ({a}): which CA is the controller's?"
                    ));
                }
                _ => {}
            }
        }
        for key in self.labels.keys() {
            let ok = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return bad(format!("label name {key:?} must match [a-zA-Z_][a-zA-Z0-9_]*"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let c = Config::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(c.runtime, crate::runtime::RuntimeConfig::default());
        assert_eq!(c.heartbeat(), Duration::from_secs(2), "a 5 s interval heartbeats every 2 s");
    }

    #[test]
    fn the_heartbeat_follows_a_short_interval_and_an_explicit_setting() {
        let at = |interval: u64, heartbeat: Option<u64>| Config {
            interval: Duration::from_millis(interval),
            heartbeat_interval: heartbeat.map(Duration::from_millis),
            ..Config::default()
        };
        assert_eq!(at(1000, None).heartbeat(), Duration::from_secs(1));
        assert_eq!(at(30_000, None).heartbeat(), DEFAULT_HEARTBEAT_CAP);
        assert_eq!(at(30_000, Some(10_000)).heartbeat(), Duration::from_secs(10), "an explicit setting wins");
    }

    #[test]
    fn unknown_key_is_named_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, "controller = \"https://x:1\"\n[gpu]\nsorce = \"none\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("a.toml:3") && err.contains("sorce"), "{err}");
    }

    #[test]
    fn a_gateway_section_is_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let nginx_conf = dir.path().join("nginx.conf");
        std::fs::write(&nginx_conf, "events {}\n").unwrap();
        let section = |extra: &str| {
            format!(
                "[gateway]\nnginx = \"/bin/sh\"\nconfig = \"{}\"\nupstreams_dir = \"{}\"\n{extra}",
                nginx_conf.display(),
                dir.path().display()
            )
        };
        let load = |text: String| {
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, text).unwrap();
            Config::load(Some(&path), Overrides::default()).map_err(|e| e.to_string())
        };
        let c = load(section("")).unwrap();
        let g = c.gateway.unwrap();
        assert_eq!(g.reload_timeout, Duration::from_secs(10));
        assert_eq!(g.confirm_url, "http://127.0.0.1:8099/flotilla-gateway");
        assert!(load(section("confirm_url = \"http://10.1.1.1:80/x\"\n")).unwrap_err().contains("confirm_url"));
        assert!(load(section("reload_timeout = \"1m\"\n")).unwrap_err().contains("reload_timeout"));
        assert!(load(section("nginx = \"/nope\"\n")).is_err());
        assert_eq!(g.access_log, None);
        let log = dir.path().join("flotilla-gateway.log");
        let c = load(section(&format!("access_log = \"{}\"\n", log.display()))).unwrap();
        assert_eq!(c.gateway.unwrap().access_log, Some(log), "the file itself need not exist yet");
        assert!(load(section("access_log = \"gw.log\"\n")).unwrap_err().contains("gateway.access_log"));
        assert!(load(section("access_log = \"/nope/gw.log\"\n")).unwrap_err().contains("gateway.access_log"));
        assert!(load(section("upstream_dir = \"/x\"\n")).unwrap_err().contains("upstream_dir"));
        let missing = load("[gateway]\nconfig = \"/etc/nginx/nginx.conf\"\n".to_owned()).unwrap_err();
        assert!(missing.contains("upstreams_dir"), "{missing}");
        let no_dir =
            section("").replace(&format!("upstreams_dir = \"{}\"", dir.path().display()), "upstreams_dir = \"/nope\"");
        assert!(load(no_dir).unwrap_err().contains("gateway.upstreams_dir"));
    }

    #[test]
    fn a_join_token_needs_a_node_id_an_enrollment_url_and_one_ca_fingerprint() {
        use flotilla_common::enroll::{CaFingerprint, JoinSecret, JoinToken};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        let pin = CaFingerprint::of_der(b"ca");
        let token = JoinToken { secret: JoinSecret::generate(), ca: Some(pin) };
        let load = |text: String| {
            std::fs::write(&path, text).unwrap();
            Config::load(Some(&path), Overrides::default()).map_err(|e| e.to_string())
        };
        let t = token.reveal();
        let ok = load(format!("node_id = \"gpu-7\"\nenroll_url = \"https://c:7444\"\njoin_token = \"{t}\"\n")).unwrap();
        assert_eq!(ok.join_token, Some(token.clone()));
        assert!(
            load(format!("enroll_url = \"https://c:7444\"\njoin_token = \"{t}\"\n")).unwrap_err().contains("node_id")
        );
        assert!(load(format!("node_id = \"gpu-7\"\njoin_token = \"{t}\"\n")).unwrap_err().contains("enroll_url"));
        let other = CaFingerprint::of_der(b"other");
        let err = load(format!(
            "node_id = \"gpu-7\"\nenroll_url = \"https://c:7444\"\njoin_token = \"{t}\"\nca_fingerprint = \"{other}\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("differs"), "{err}");
        let bare = JoinToken { ca: None, ..token }.reveal();
        let err = load(format!("node_id = \"gpu-7\"\nenroll_url = \"https://c:7444\"\njoin_token = \"{bare}\"\n"))
            .unwrap_err();
        assert!(err.contains("ca_fingerprint"), "{err}");
        let err = load("join_token = \"flt1.nope\"\n".to_owned()).unwrap_err();
        assert!(err.contains("a.toml:1") && err.contains("64 hex digits"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        let o = Overrides { interval: Some(Duration::from_millis(1)), ..Default::default() };
        assert!(Config::load(None, o).unwrap_err().to_string().contains("interval"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, "[runtime]\nrelist_interval = \"100ms\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("runtime.relist_interval"), "{err}");
        std::fs::write(&path, "[runtime]\nrelist_interval = \"2s\"\n").unwrap();
        let c = Config::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(c.runtime.relist_interval, Duration::from_secs(2));
    }
}

#[cfg(test)]
mod name_prefix_tests {
    use super::*;

    fn load(runtime: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("controller = \"https://x:1\"\n[runtime]\n{runtime}")).unwrap();
        Config::load(Some(&path), Overrides::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_name_prefix_defaults_to_none_and_must_be_a_container_name_start() {
        assert!(load("").unwrap().runtime.name_prefix.is_empty());
        assert!(load("name_prefix = \"\"\n").unwrap().runtime.name_prefix.is_empty());
        assert_eq!(load("name_prefix = \"gpu-1.\"\n").unwrap().runtime.name_prefix.as_str(), "gpu-1.");
        for bad in ["-x", "a b", "x/y", "é"] {
            let err = load(&format!("name_prefix = {bad:?}\n")).unwrap_err();
            assert!(err.contains("agent.toml:3") && err.contains("runtime.name_prefix"), "{bad:?}: {err}");
            assert!(err.contains("[a-zA-Z0-9][a-zA-Z0-9_.-]*"), "{err}");
        }
        let err = load(&format!("name_prefix = \"{}\"\n", "a".repeat(65))).unwrap_err();
        assert!(err.contains("runtime.name_prefix") && err.contains("the limit is 64"), "{err}");
        assert!(load("name_prefix = 1\n").unwrap_err().contains("agent.toml:3"));
        assert!(load("node = \"gpu-1\"\n").is_err(), "the node label comes from the agent's identity only");
    }
}

#[cfg(test)]
mod example_spec_tests {
    #[test]
    fn the_example_container_spec_in_deploy_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/model-server.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let spec = crate::runtime::ContainerSpec::from_yaml(&text).unwrap();
        assert_eq!(spec.name, "llama-8b");
        let gpu = flotilla_common::model::GpuInfo {
            index: 0,
            uuid: "GPU-x".into(),
            model: "H100".into(),
            memory_total_bytes: 1,
        };
        spec.validate(&[gpu]).unwrap();
    }
}
