//! Why a spec is refused ([`SpecError`], before anything runs) and why an engine
//! operation failed ([`RuntimeError`], with the engine's own message). Each spec
//! variant names the field, in the path form `ports[1].host`, so a refusal alone
//! says what to fix.

/// Why a container spec is refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not valid YAML, or a field that does not exist, or a value of the wrong type;
    /// the parser's message has the field's path and line.
    #[error("container spec: {0}")]
    Parse(#[source] serde_yaml_ng::Error),
    /// A required value is empty.
    #[error("{field}: must not be empty")]
    Empty { field: String },
    /// A name that the engine or the labels cannot carry.
    #[error("{field}: {value:?} {reason}")]
    BadName { field: String, value: String, reason: &'static str },
    /// Not an image reference (`[registry[:port]/]path[:tag][@digest]` or `sha256:ID`).
    #[error("image: {image:?} is not an image reference: {reason}")]
    BadImage { image: String, reason: &'static str },
    /// A port number outside 1..=65535.
    #[error("{field}: port {value} is outside 1..=65535")]
    PortOutOfRange { field: String, value: u32 },
    /// Two mappings want the same host port.
    #[error("{field}: host port {host_ip}:{port}/{protocol} is already mapped by {other}")]
    PortClash { field: String, other: String, host_ip: std::net::IpAddr, port: u32, protocol: &'static str },
    /// A mount path that is not absolute, or that climbs with `..`.
    #[error("{field}: {path:?} {reason}")]
    BadPath { field: String, path: String, reason: &'static str },
    /// Two mounts at one container path.
    #[error("{field}: container path {path:?} is already mounted by {other}")]
    DuplicateMount { field: String, other: String, path: String },
    /// A GPU this host does not have.
    #[error("{field}: GPU {gpu} does not exist on this host ({available})")]
    GpuNotFound { field: String, gpu: String, available: String },
    /// The same GPU asked for twice (perhaps once by index and once by UUID).
    #[error("{field}: GPU {gpu} is already requested by {other}")]
    DuplicateGpu { field: String, other: String, gpu: String },
    /// An environment variable the engine cannot pass.
    #[error("env: {key:?} {reason}")]
    BadEnv { key: String, reason: &'static str },
    /// A label under the agent's own `flotilla.` prefix.
    #[error("labels: {key:?}: the \"flotilla.\" prefix is reserved for the agent's own labels")]
    ReservedLabel { key: String },
    /// A health check that is ambiguous or cannot run.
    #[error("health: {reason}")]
    BadHealthCheck { reason: String },
    /// The inference port is not among the published ports, so the agent could not reach it.
    #[error(
        "inference.port: container port {port} is not published; add `{{ container: {port} }}` to ports (protocol tcp)"
    )]
    InferencePortNotPublished { port: u32 },
    /// A `/dev/shm` size that is zero.
    #[error("shm_size: must be above zero (omit it for the engine's default)")]
    ZeroShmSize,
}

/// Why an engine operation failed. Engine refusals keep the engine's message.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine's socket is missing, refuses connections or is not readable by us.
    #[error("container engine at {socket}: unreachable: {source}")]
    Unreachable {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// The image is not on this host; the agent never pulls, so it must be loaded first.
    #[error("image {image:?} is not present on this host (the agent does not pull; load or pull it first)")]
    ImageNotPresent { image: String },
    /// No container by this name or id.
    #[error("container {container:?}: no such container")]
    NotFound { container: String },
    /// The container name is taken by a container that is not this deployment's.
    #[error("container name {name:?} is taken by a container the agent does not manage for this deployment: {message}")]
    NameConflict { name: String, message: String },
    /// This revision already runs with a different spec; revisions are immutable.
    #[error(
        "deployment {deployment:?} revision {revision:?} already runs as {container:?} with a different spec; deploy a new revision instead"
    )]
    RevisionConflict { deployment: String, revision: String, container: String },
    /// The container stopped right after it was started.
    #[error("container {container:?} exited with code {exit_code}{}", detail(.message))]
    Exited { container: String, exit_code: i64, message: String },
    /// The engine refused the operation; `message` is the engine's.
    #[error("{op} {target:?}: engine answered {status}: {message}")]
    Engine { op: &'static str, target: String, status: u16, message: String },
    /// The exchange with the engine failed (timeout, broken stream, bad JSON).
    #[error("{op} {target:?}: {source}")]
    Transport {
        op: &'static str,
        target: String,
        #[source]
        source: bollard::errors::Error,
    },
}

fn detail(message: &str) -> String {
    if message.is_empty() { String::new() } else { format!(": {message}") }
}

impl RuntimeError {
    /// Whether the error says the engine could not be reached at all (retry later),
    /// as opposed to a refusal of this one operation.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RuntimeError::Unreachable { .. })
    }
}
