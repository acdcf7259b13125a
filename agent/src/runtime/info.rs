//! What the runtime reports about a container, in the agent's own types so that
//! callers never see the engine API's models.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};

use super::render::{LABEL_DEPLOYMENT, LABEL_REVISION, LABEL_SPEC_HASH};
use super::spec::Protocol;

/// One container as the engine sees it now.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerInfo {
    /// The engine's full container id.
    pub id: String,
    /// The container name, without the engine's leading `/`.
    pub name: String,
    /// The image reference it was created from.
    pub image: String,
    /// `flotilla.deployment`, when the agent created it.
    pub deployment: Option<String>,
    /// `flotilla.revision`, when the agent created it.
    pub revision: Option<String>,
    /// `flotilla.spec-hash`, when the agent created it.
    pub spec_hash: Option<String>,
    pub state: ContainerState,
    pub health: HealthState,
    /// The exit code of the last run, once it has exited.
    pub exit_code: Option<i64>,
    /// The engine's error for the last start, if any (e.g. a missing GPU driver).
    pub error: Option<String>,
    /// Published ports as bound now (only while running); with an engine-chosen
    /// host port this is where to find it.
    pub ports: Vec<BoundPort>,
    /// Every label, the agent's included.
    pub labels: BTreeMap<String, String>,
    /// When the engine created it (`None` when the engine's time does not parse).
    pub created_unix_ms: Option<i64>,
}

impl ContainerInfo {
    /// The host port bound to `container_port`/tcp, preferring IPv4.
    pub fn host_port(&self, container_port: u16) -> Option<u16> {
        let mut matching: Vec<&BoundPort> =
            self.ports.iter().filter(|p| p.container_port == container_port && p.protocol == Protocol::Tcp).collect();
        matching.sort_by_key(|p| !p.host_ip.is_ipv4());
        matching.first().map(|p| p.host_port)
    }

    pub(crate) fn from_inspect(c: ContainerInspectResponse) -> Self {
        let labels: BTreeMap<String, String> =
            c.config.as_ref().and_then(|cfg| cfg.labels.clone()).unwrap_or_default().into_iter().collect();
        let state = c.state.as_ref();
        let status = state.and_then(|s| s.status);
        let health =
            state.and_then(|s| s.health.as_ref()).and_then(|h| h.status).map_or(HealthState::None, |h| match h {
                HealthStatusEnum::STARTING => HealthState::Starting,
                HealthStatusEnum::HEALTHY => HealthState::Healthy,
                HealthStatusEnum::UNHEALTHY => HealthState::Unhealthy,
                HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => HealthState::None,
            });
        let state_kind = ContainerState::from(status);
        let exit_code = match state_kind {
            ContainerState::Exited | ContainerState::Dead => state.and_then(|s| s.exit_code),
            _ => None,
        };
        let error = state.and_then(|s| s.error.clone()).filter(|e| !e.is_empty());
        let mut ports = Vec::new();
        if let Some(map) = c.network_settings.as_ref().and_then(|n| n.ports.as_ref()) {
            for (key, bindings) in map {
                let Some((port, proto)) = parse_port_key(key) else { continue };
                for b in bindings.iter().flatten() {
                    let host_ip = b.host_ip.as_deref().and_then(|ip| ip.parse().ok());
                    let host_port = b.host_port.as_deref().and_then(|p| p.parse().ok());
                    if let (Some(host_ip), Some(host_port)) = (host_ip, host_port) {
                        ports.push(BoundPort { container_port: port, protocol: proto, host_ip, host_port });
                    }
                }
            }
        }
        ports.sort_by_key(|p| (p.container_port, p.host_port, p.host_ip));
        Self {
            id: c.id.unwrap_or_default(),
            name: c.name.unwrap_or_default().trim_start_matches('/').to_owned(),
            image: c.config.as_ref().and_then(|cfg| cfg.image.clone()).unwrap_or_default(),
            deployment: labels.get(LABEL_DEPLOYMENT).cloned(),
            revision: labels.get(LABEL_REVISION).cloned(),
            spec_hash: labels.get(LABEL_SPEC_HASH).cloned(),
            state: state_kind,
            health,
            exit_code,
            error,
            ports,
            labels,
            created_unix_ms: c.created.as_deref().and_then(unix_ms_from_rfc3339),
        }
    }
}

/// The engine's RFC 3339 creation time (`2025-05-01T10:11:12.123456789Z`) in
/// milliseconds since the Unix epoch.
fn unix_ms_from_rfc3339(s: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339(s).ok()?;
    let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// `8000/tcp` → (8000, tcp).
fn parse_port_key(key: &str) -> Option<(u16, Protocol)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    Some((port.parse().ok()?, proto))
}

/// A published port as the engine bound it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundPort {
    pub container_port: u16,
    pub protocol: Protocol,
    pub host_ip: IpAddr,
    pub host_port: u16,
}

/// The container's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
    /// A state this agent does not know (a newer engine).
    Unknown,
}

impl ContainerState {
    /// Whether the container's process is up (running, paused or restarting
    /// counts: the engine holds it).
    pub fn is_up(self) -> bool {
        matches!(self, ContainerState::Running | ContainerState::Paused | ContainerState::Restarting)
    }

    /// The engine's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Paused => "paused",
            ContainerState::Restarting => "restarting",
            ContainerState::Removing => "removing",
            ContainerState::Exited => "exited",
            ContainerState::Dead => "dead",
            ContainerState::Unknown => "unknown",
        }
    }
}

impl From<Option<ContainerStateStatusEnum>> for ContainerState {
    fn from(s: Option<ContainerStateStatusEnum>) -> Self {
        match s {
            Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
            Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
            Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
            Some(ContainerStateStatusEnum::RESTARTING) => ContainerState::Restarting,
            Some(ContainerStateStatusEnum::REMOVING) => ContainerState::Removing,
            Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited,
            Some(ContainerStateStatusEnum::DEAD) => ContainerState::Dead,
            _ => ContainerState::Unknown,
        }
    }
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of the engine's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// No health check is configured.
    None,
    /// Within the start period, or not yet checked.
    Starting,
    Healthy,
    Unhealthy,
}

impl HealthState {
    /// The engine's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::None => "none",
            HealthState::Starting => "starting",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line a container wrote, without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: LogStream,
    pub text: String,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerConfig, ContainerState as EngineState, NetworkSettings, PortBinding};
    use std::collections::HashMap;

    #[test]
    fn inspect_output_becomes_container_info() {
        let mut ports = HashMap::new();
        ports.insert(
            "8000/tcp".to_owned(),
            Some(vec![
                PortBinding { host_ip: Some("::".into()), host_port: Some("49153".into()) },
                PortBinding { host_ip: Some("0.0.0.0".into()), host_port: Some("49153".into()) },
            ]),
        );
        ports.insert("9000/udp".to_owned(), None);
        let labels = HashMap::from([
            (LABEL_DEPLOYMENT.to_owned(), "llama".to_owned()),
            (LABEL_REVISION.to_owned(), "3".to_owned()),
        ]);
        let raw = ContainerInspectResponse {
            id: Some("abc".into()),
            name: Some("/llama-3".into()),
            created: Some("2025-05-01T10:11:12.123456789Z".into()),
            state: Some(EngineState {
                status: Some(ContainerStateStatusEnum::EXITED),
                exit_code: Some(137),
                error: Some(String::new()),
                ..Default::default()
            }),
            config: Some(ContainerConfig { image: Some("x:1".into()), labels: Some(labels), ..Default::default() }),
            network_settings: Some(NetworkSettings { ports: Some(ports), ..Default::default() }),
            ..Default::default()
        };
        let info = ContainerInfo::from_inspect(raw);
        assert_eq!((info.name.as_str(), info.image.as_str()), ("llama-3", "x:1"));
        assert_eq!(
            (info.state, info.health, info.exit_code, info.error.as_deref()),
            (ContainerState::Exited, HealthState::None, Some(137), None)
        );
        assert_eq!((info.deployment.as_deref(), info.revision.as_deref()), (Some("llama"), Some("3")));
        assert_eq!(info.ports.len(), 2);
        assert_eq!(info.host_port(8000), Some(49153));
        assert_eq!(info.host_port(9000), None);
        assert_eq!(info.created_unix_ms, Some(1_746_094_272_123));
        assert_eq!(unix_ms_from_rfc3339("yesterday"), None);
    }
}
