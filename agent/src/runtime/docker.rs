//! [`DockerRuntime`]: the [`Runtime`] against a Docker Engine API socket, Docker's
//! own or Podman's compatible one (`podman system service`), through `bollard`.
//!
//! The connection is made on first use, not at construction, so an agent starts
//! while the engine is down and its first command reports `Unreachable`; a failed
//! connection is tried again on the next call. The API version is negotiated once
//! (the engine's, when older than bollard's), since Docker 20.10 refuses newer
//! versions and Docker 29 refuses versions below 1.44.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bollard::errors::Error as EngineError;
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    RestartContainerOptions, StopContainerOptions,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use flotilla_common::NodeId;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::OnceCell;

use super::error::RuntimeError;
use super::info::{ContainerInfo, ContainerState, LogLine, LogStream};
use super::names::NamePrefix;
use super::render::{self, GpuDevices, LABEL_MANAGED};
use super::spec::ValidatedSpec;
use super::{RemoveMode, Runtime};

/// Where the engine is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The engine's Unix socket: `/var/run/docker.sock`, or for Podman
    /// `/run/podman/podman.sock` (rootful) or `$XDG_RUNTIME_DIR/podman/podman.sock`.
    pub socket: PathBuf,
    /// Limit for one request; `stop` and `restart` add their own grace period to it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often the uplink lists the managed containers again while connected,
    /// so that a container that changes on its own (crashes, is OOM-killed, is
    /// stopped with `docker stop`) reaches the controller without a command.
    /// A listing is sent only when it differs from the last one sent. Short by
    /// default (5 s), since during a rollout the controller waits on these
    /// changes (a new revision turning healthy, an old one exiting); a listing is
    /// one engine request per managed container.
    #[serde(with = "humantime_serde")]
    pub relist_interval: Duration,
    /// Whether a spec's `gpus` become a device request. Not read from the file:
    /// the agent sets it from `[gpu] source` (simulated GPUs are bookkeeping only).
    #[serde(skip)]
    pub gpu_devices: GpuDevices,
    /// Put before every container name given to the engine, so that several agents
    /// can share one engine (end-to-end tests, a lab): each agent then creates,
    /// acts on and lists only the containers named with its own prefix. Reports,
    /// command results and scrape endpoints use the name without it.
    pub name_prefix: NamePrefix,
    /// This agent's node id, put on every container it creates as `flotilla.node`.
    /// Not read from the file: the agent sets it from its identity.
    #[serde(skip)]
    pub node: Option<NodeId>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            request_timeout: Duration::from_secs(60),
            relist_interval: Duration::from_secs(5),
            gpu_devices: GpuDevices::Nvidia,
            name_prefix: NamePrefix::default(),
            node: None,
        }
    }
}

/// Log lines fetched when a container exits right after starting, to say why.
const EXIT_LOG_LINES: usize = 5;

/// How many times `deploy` looks again when the container changes under it
/// (another deploy of the same revision racing this one).
const DEPLOY_ROUNDS: usize = 3;

/// The runtime over a Docker Engine API socket.
#[derive(Debug)]
pub struct DockerRuntime {
    config: RuntimeConfig,
    client: OnceCell<Docker>,
}

impl DockerRuntime {
    /// A runtime for the engine at `config.socket`; nothing is contacted yet.
    pub fn new(config: RuntimeConfig) -> Self {
        Self { config, client: OnceCell::new() }
    }

    /// The configuration this runtime was made with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The engine's name for the agent's container `container` (`NAME-REVISION`).
    fn engine_name(&self, container: &str) -> String {
        self.config.name_prefix.to_engine(container)
    }

    fn socket(&self) -> String {
        self.config.socket.display().to_string()
    }

    async fn client(&self) -> Result<&Docker, RuntimeError> {
        self.client
            .get_or_try_init(|| async {
                let socket = self.socket();
                let secs = self.config.request_timeout.as_secs().max(1);
                let docker = Docker::connect_with_unix(&socket, secs, API_DEFAULT_VERSION)
                    .map_err(|source| RuntimeError::Unreachable { socket: socket.clone(), source })?;
                let docker = docker.negotiate_version().await.map_err(|e| self.classify("connect", &socket, e))?;
                let version = docker.client_version();
                tracing::debug!(socket = %socket, api_version = %version, "connected to the container engine");
                Ok(docker)
            })
            .await
    }

    /// Sorts an engine error into the variants callers act on.
    fn classify(&self, op: &'static str, target: &str, error: EngineError) -> RuntimeError {
        match error {
            EngineError::DockerResponseServerError { status_code: 404, .. } => {
                RuntimeError::NotFound { container: target.to_owned() }
            }
            EngineError::DockerResponseServerError { status_code, message } => {
                RuntimeError::Engine { op, target: target.to_owned(), status: status_code, message }
            }
            e if is_unreachable(&e) => RuntimeError::Unreachable { socket: self.socket(), source: e },
            e => RuntimeError::Transport { op, target: target.to_owned(), source: e },
        }
    }

    /// Inspects the agent's container `container` (`NAME-REVISION`), and tells of it
    /// by that name.
    async fn inspect_with(&self, docker: &Docker, container: &str) -> Result<ContainerInfo, RuntimeError> {
        docker
            .inspect_container(&self.engine_name(container), None::<InspectContainerOptions>)
            .await
            .map(|c| self.config.name_prefix.agent_view(ContainerInfo::from_inspect(c)))
            .map_err(|e| self.classify("inspect", container, e))
    }

    /// Inspects the container with the engine's id `id`, named as the engine names it.
    async fn inspect_id(&self, docker: &Docker, id: &str) -> Result<ContainerInfo, RuntimeError> {
        docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map(ContainerInfo::from_inspect)
            .map_err(|e| self.classify("inspect", id, e))
    }

    /// Removes `target` (an engine name or id); errors and logs name it `shown`.
    async fn remove_target(
        &self,
        docker: &Docker,
        target: &str,
        shown: &str,
        mode: RemoveMode,
    ) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions { force: mode == RemoveMode::Force, ..Default::default() };
        match docker.remove_container(target, Some(options)).await {
            Ok(()) => {
                tracing::info!(container = %shown, "container removed");
                Ok(())
            }
            Err(EngineError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(self.classify("remove", shown, e)),
        }
    }

    /// Inspects a container that was just started and turns a quick exit into
    /// [`RuntimeError::Exited`] with its last log lines.
    async fn started(&self, docker: &Docker, container: &str) -> Result<ContainerInfo, RuntimeError> {
        let info = self.inspect_with(docker, container).await?;
        if !matches!(info.state, ContainerState::Exited | ContainerState::Dead) {
            return Ok(info);
        }
        let message = match &info.error {
            Some(error) => error.clone(),
            None => {
                let lines = self.logs(container, EXIT_LOG_LINES).await.unwrap_or_default();
                lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join(" | ")
            }
        };
        Err(RuntimeError::Exited { container: info.name, exit_code: info.exit_code.unwrap_or(-1), message })
    }

    /// Creates the container the agent calls `name`; `None` when a container of that
    /// name appeared since we looked (a racing deploy), so the caller looks again.
    async fn create(&self, docker: &Docker, spec: &ValidatedSpec, name: &str) -> Result<Option<String>, RuntimeError> {
        // Asked first so the usual failure has its own clear error; a create that
        // still finds no image (removed in between) maps to the same error below.
        if !self.image_present(&spec.image).await? {
            return Err(RuntimeError::ImageNotPresent { image: spec.image.clone() });
        }
        let options = CreateContainerOptions { name: Some(self.engine_name(name)), ..Default::default() };
        let body = render::create_body(spec, self.config.gpu_devices, self.config.node.as_ref());
        match docker.create_container(Some(options), body).await {
            Ok(created) => {
                for warning in &created.warnings {
                    tracing::warn!(container = %name, warning = %warning, "engine warning on create");
                }
                Ok(Some(created.id))
            }
            Err(EngineError::DockerResponseServerError { status_code: 409, .. }) => Ok(None),
            Err(EngineError::DockerResponseServerError { status_code: 404, .. }) => {
                Err(RuntimeError::ImageNotPresent { image: spec.image.clone() })
            }
            Err(e) => Err(self.classify("create", name, e)),
        }
    }

    async fn start_new(&self, docker: &Docker, name: &str, id: &str) -> Result<ContainerInfo, RuntimeError> {
        if let Err(e) = docker.start_container(id, None).await {
            // A container that never started is removed, so the next deploy starts
            // clean rather than tripping over a half-made one.
            let force = RemoveContainerOptions { force: true, ..Default::default() };
            if let Err(error) = docker.remove_container(id, Some(force)).await {
                tracing::warn!(container = %name, %error, "could not remove a container that failed to start");
            }
            return Err(self.classify("start", name, e));
        }
        tracing::info!(container = %name, id = %id, "container started");
        self.started(docker, name).await
    }
}

/// Whether the engine could not be reached at all: no socket, nobody listening,
/// or no permission to connect.
fn is_unreachable(error: &EngineError) -> bool {
    if matches!(error, EngineError::SocketNotFoundError(_)) {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), NotFound | ConnectionRefused | PermissionDenied | ConnectionReset);
        }
        source = e.source();
    }
    false
}

fn whole_seconds(d: Duration) -> i32 {
    // Round up: a 1.5 s grace period must not become 1 s.
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

impl Runtime for DockerRuntime {
    async fn deploy(&self, spec: &ValidatedSpec) -> Result<ContainerInfo, RuntimeError> {
        let docker = self.client().await?;
        let name = spec.container_name();
        let hash = spec.spec_hash();
        for _ in 0..DEPLOY_ROUNDS {
            match self.inspect_with(docker, &name).await {
                Ok(existing) => {
                    let ours = existing.labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                        && existing.deployment.as_deref() == Some(spec.name.as_str())
                        && existing.revision.as_deref() == Some(spec.revision.as_str());
                    if !ours {
                        return Err(RuntimeError::NameConflict {
                            name,
                            message: format!(
                                "container {} has deployment {:?}, revision {:?}",
                                existing.id, existing.deployment, existing.revision
                            ),
                        });
                    }
                    let same = existing.spec_hash.as_deref() == Some(hash.as_str());
                    match (existing.state.is_up(), same) {
                        (true, true) => {
                            tracing::info!(container = %name, id = %existing.id, "already running; nothing to do");
                            return Ok(existing);
                        }
                        (true, false) => {
                            return Err(RuntimeError::RevisionConflict {
                                deployment: spec.name.clone(),
                                revision: spec.revision.clone(),
                                container: name,
                            });
                        }
                        (false, true) => {
                            docker
                                .start_container(&existing.id, None)
                                .await
                                .map_err(|e| self.classify("start", &name, e))?;
                            tracing::info!(container = %name, id = %existing.id, "stopped container started again");
                            return self.started(docker, &name).await;
                        }
                        // Stopped, from another spec of this revision: nothing to keep.
                        (false, false) => self.remove_target(docker, &existing.id, &name, RemoveMode::Force).await?,
                    }
                }
                Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            if let Some(id) = self.create(docker, spec, &name).await? {
                return self.start_new(docker, &name, &id).await;
            }
        }
        Err(RuntimeError::NameConflict { name, message: "the container kept changing while deploying".into() })
    }

    async fn stop(&self, container: &str, timeout: Duration) -> Result<ContainerInfo, RuntimeError> {
        let docker = self.client().await?;
        // The engine waits `t` for the process before killing it; the request must outlive that.
        let patient = docker.clone().with_timeout(self.config.request_timeout + timeout);
        let options = StopContainerOptions { t: Some(whole_seconds(timeout)), signal: None };
        // A container already stopped answers 304, which bollard counts as success.
        patient
            .stop_container(&self.engine_name(container), Some(options))
            .await
            .map_err(|e| self.classify("stop", container, e))?;
        tracing::info!(container = %container, "container stopped");
        self.inspect_with(docker, container).await
    }

    async fn restart(&self, container: &str, timeout: Duration) -> Result<ContainerInfo, RuntimeError> {
        let docker = self.client().await?;
        let patient = docker.clone().with_timeout(self.config.request_timeout + timeout);
        let options = RestartContainerOptions { t: Some(whole_seconds(timeout)), signal: None };
        patient
            .restart_container(&self.engine_name(container), Some(options))
            .await
            .map_err(|e| self.classify("restart", container, e))?;
        tracing::info!(container = %container, "container restarted");
        self.started(docker, container).await
    }

    async fn remove(&self, container: &str, mode: RemoveMode) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        self.remove_target(docker, &self.engine_name(container), container, mode).await
    }

    async fn logs(&self, container: &str, tail: usize) -> Result<Vec<LogLine>, RuntimeError> {
        let docker = self.client().await?;
        let options = LogsOptions { stdout: true, stderr: true, tail: tail.to_string(), ..Default::default() };
        let mut stream = docker.logs(&self.engine_name(container), Some(options));
        let mut lines = Vec::new();
        // Frames usually hold whole lines, but a long line may span frames: keep the
        // unfinished end of each stream until its newline arrives.
        let mut pending: [(LogStream, String); 2] =
            [(LogStream::Stdout, String::new()), (LogStream::Stderr, String::new())];
        while let Some(frame) = stream.next().await {
            let (slot, bytes) = match frame.map_err(|e| self.classify("logs", container, e))? {
                bollard::container::LogOutput::StdOut { message }
                | bollard::container::LogOutput::Console { message } => (0, message),
                bollard::container::LogOutput::StdErr { message } => (1, message),
                bollard::container::LogOutput::StdIn { .. } => continue,
            };
            let (kind, buffer) = &mut pending[slot];
            buffer.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = buffer.find('\n') {
                let text = buffer[..end].trim_end_matches('\r').to_owned();
                buffer.drain(..=end);
                lines.push(LogLine { stream: *kind, text });
            }
        }
        for (stream, rest) in pending {
            if !rest.is_empty() {
                lines.push(LogLine { stream, text: rest });
            }
        }
        Ok(lines)
    }

    async fn inspect(&self, container: &str) -> Result<ContainerInfo, RuntimeError> {
        let docker = self.client().await?;
        self.inspect_with(docker, container).await
    }

    async fn list_managed(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let docker = self.client().await?;
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_MANAGED}=true")])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let summaries =
            docker.list_containers(Some(options)).await.map_err(|e| self.classify("list", LABEL_MANAGED, e))?;
        let prefix = &self.config.name_prefix;
        // Another agent's containers (on an engine shared by several) are not
        // inspected at all: their names lack this agent's prefix.
        let named_ours = |s: &bollard::models::ContainerSummary| {
            prefix.is_empty() || s.names.iter().flatten().any(|n| prefix.to_agent(n.trim_start_matches('/')).is_some())
        };
        let mut found = Vec::with_capacity(summaries.len());
        // The list's summaries lack health and exact port bindings; inspect each.
        for id in summaries.into_iter().filter(named_ours).filter_map(|s| s.id) {
            match self.inspect_id(docker, &id).await {
                Ok(info) => found.extend(prefix.claim(self.config.node.as_ref(), info)),
                // Removed between the list and the inspect: it is not there any more.
                Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        let docker = self.client().await?;
        match docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(EngineError::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
            Err(e) => Err(self.classify("inspect image", image, e)),
        }
    }

    async fn ping(&self) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        docker.ping().await.map(|_| ()).map_err(|e| self.classify("ping", &self.socket(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_periods_round_up() {
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(10)), 10);
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_secs(u64::MAX)), i32::MAX);
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_on_use_not_on_construction() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("no-engine.sock");
        let runtime = DockerRuntime::new(RuntimeConfig { socket: socket.clone(), ..Default::default() });
        let err = runtime.ping().await.unwrap_err();
        assert!(err.is_unreachable(), "{err:?}");
        assert!(err.to_string().contains(&socket.display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("dead.sock");
        // Bound and closed: the file exists but connections are refused.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let runtime = DockerRuntime::new(RuntimeConfig { socket, ..Default::default() });
        let err = runtime.list_managed().await.unwrap_err();
        assert!(err.is_unreachable(), "{err:?}");
    }

    #[test]
    fn config_defaults_to_docker_and_reads_podman() {
        assert_eq!(RuntimeConfig::default().socket, PathBuf::from("/var/run/docker.sock"));
        let c: RuntimeConfig =
            toml::from_str("socket = \"/run/podman/podman.sock\"\nrequest_timeout = \"30s\"\n").unwrap();
        assert_eq!((c.socket.to_str(), c.request_timeout), (Some("/run/podman/podman.sock"), Duration::from_secs(30)));
        assert!(toml::from_str::<RuntimeConfig>("sock = \"x\"").is_err());
        assert_eq!(c.relist_interval, Duration::from_secs(5));
        assert!(
            toml::from_str::<RuntimeConfig>("gpu_devices = \"bookkeeping\"").is_err(),
            "set from [gpu] source only"
        );
    }
}
