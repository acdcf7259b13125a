//! The container runtime driver: runs model-server containers through the Docker
//! Engine API (Docker itself, or Podman's Docker-compatible socket) with `bollard`.
//!
//! The pieces, in the order a deployment uses them:
//! - [`ContainerSpec`] (`spec`): what to run, as loaded from YAML by the caller;
//!   [`ContainerSpec::validate`] checks it against this host's GPUs and returns a
//!   [`ValidatedSpec`], the only thing [`Runtime::deploy`] accepts, so nothing
//!   reaches the engine unchecked;
//! - `flotilla_common::command::image_ref`: the image reference grammar `validate`
//!   applies (shared with the controller's deployment specs);
//! - `render`: a validated spec as the engine's create request (pure, unit-tested);
//! - [`Runtime`]: the operations the command executor needs, as a trait so the
//!   executor can be tested with a fake (`fake::FakeRuntime`, test builds only);
//! - [`DockerRuntime`] (`docker`): the implementation against a real engine.
//!
//! Containers are named `NAME-REVISION` and carry the labels `flotilla.managed=true`,
//! `flotilla.deployment`, `flotilla.revision`, `flotilla.spec-hash` and
//! `flotilla.node` (the creating agent's node id), so an agent that restarts finds
//! its containers again by label ([`Runtime::list_managed`]), and deploying a
//! revision that already runs is a no-op. `flotilla.gpus` records
//! the GPUs asked for (with simulated GPUs no device is requested, see
//! [`GpuDevices`]); `flotilla.inference-port` (and `flotilla.inference-engine`)
//! mark a model server the inference collector scrapes while it runs.
//!
//! Several agents may share one engine (the end-to-end tests run three against one
//! Docker; a lab may too): give each a `[runtime] name_prefix` ([`NamePrefix`],
//! `names`). The engine then knows a container as `{name_prefix}NAME-REVISION`,
//! while the agent speaks of it as `NAME-REVISION` everywhere else: a
//! [`Runtime`]'s methods take and return that name (container reports, command
//! results, the `endpoint` label of a scraped model server), so the controller
//! never sees a prefix. Listing returns only the managed containers named with the
//! agent's prefix (and, with a prefix, not labelled for another node), so no agent
//! reports or acts on another's. With the default empty prefix the engine's names
//! are the agent's and every managed container is listed, as when the agent has
//! the engine to itself.
//!
//! Spec example (every field but `name`, `revision` and `image` is optional):
//! ```yaml
//! name: llama-8b
//! revision: "7"
//! image: vllm/vllm-openai:v0.8.5
//! command: ["python3", "-m", "vllm.entrypoints.openai.api_server"]  # replaces the entrypoint
//! args: ["--model", "/models/llama-8b", "--port", "8000"]          # replaces the image's CMD
//! env: { HF_HUB_OFFLINE: "1" }
//! ports:
//!   - { container: 8000, host: 18000 }  # host_ip defaults to 127.0.0.1; omit host to let the engine choose
//! volumes:
//!   - { host: /srv/models/llama-8b, container: /models/llama-8b }  # read_only defaults to true
//! gpus: [0, "GPU-5f0a6c3e-1b2d-4c5e-8f9a-0b1c2d3e4f5a"]             # index or UUID
//! shm_size: 16GiB
//! restart: unless-stopped    # no | always | unless-stopped | on-failure[:N]
//! health:
//!   http: { port: 8000, path: /health }  # or `command: [...]` or `shell: "..."`
//!   interval: 10s
//!   timeout: 5s
//!   retries: 3
//!   start_period: 10m
//! labels: { team: search }
//! inference: { port: 8000, engine: vllm }  # scraped as endpoint "llama-8b-7"; the port must be in ports
//! ```

mod docker;
mod error;
#[cfg(test)]
pub mod fake;
mod info;
mod names;
mod render;
mod spec;
mod validate;

use std::future::Future;
use std::time::Duration;

pub use docker::{DockerRuntime, RuntimeConfig};
pub use error::{RuntimeError, SpecError};
pub use info::{BoundPort, ContainerInfo, ContainerState, HealthState, LogLine, LogStream};
pub use names::{MAX_NAME_PREFIX_LEN, NamePrefix, NamePrefixError};
pub use render::{
    GpuDevices, LABEL_DEPLOYMENT, LABEL_GPUS, LABEL_INFERENCE_ENGINE, LABEL_INFERENCE_PORT, LABEL_MANAGED, LABEL_NODE,
    LABEL_PREFIX, LABEL_REVISION, LABEL_SPEC_HASH,
};
pub use spec::{
    ByteSize, ContainerSpec, GpuRef, HealthCheck, HttpProbe, InferenceServer, PortMapping, Protocol, RestartPolicy,
    ValidatedSpec, VolumeMount,
};

/// How [`Runtime::remove`] treats a container that is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse to remove a running container (the engine says why).
    IfStopped,
    /// Kill it first if it runs.
    Force,
}

/// The container operations the agent's command executor needs. Every method is
/// safe to repeat: commands are retried by id, so a second `deploy` of what runs
/// returns it, a `stop` of a stopped container reports it stopped, and a `remove`
/// of a missing one succeeds.
///
/// A `container` argument is the agent's name for it, `NAME-REVISION`, and every
/// [`ContainerInfo::name`] returned is too: the runtime adds and strips the
/// configured [`NamePrefix`]. (With an empty prefix the engine's id works as well,
/// since the name goes to the engine as it is.)
pub trait Runtime: Send + Sync {
    /// Creates and starts the container of `spec`, or returns the one that already
    /// runs this deployment and revision with the same spec.
    fn deploy(&self, spec: &ValidatedSpec) -> impl Future<Output = Result<ContainerInfo, RuntimeError>> + Send;

    /// Sends SIGTERM (or the image's stop signal), waits up to `timeout`, then kills.
    fn stop(
        &self,
        container: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<ContainerInfo, RuntimeError>> + Send;

    /// Stops (as [`Runtime::stop`]) and starts the container again.
    fn restart(
        &self,
        container: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<ContainerInfo, RuntimeError>> + Send;

    /// Removes the container; a container that does not exist counts as removed.
    fn remove(&self, container: &str, mode: RemoveMode) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// The last `tail` lines the container wrote to stdout and stderr, oldest first.
    fn logs(&self, container: &str, tail: usize) -> impl Future<Output = Result<Vec<LogLine>, RuntimeError>> + Send;

    /// The container's current state, health and port bindings.
    fn inspect(&self, container: &str) -> impl Future<Output = Result<ContainerInfo, RuntimeError>> + Send;

    /// Every container labelled `flotilla.managed=true` that is this agent's (see
    /// [`NamePrefix`]), running or not.
    fn list_managed(&self) -> impl Future<Output = Result<Vec<ContainerInfo>, RuntimeError>> + Send;

    /// Whether `image` is present locally (nothing is ever pulled).
    fn image_present(&self, image: &str) -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// Checks that the engine answers.
    fn ping(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}
