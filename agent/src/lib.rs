//! The Flotilla agent: collects GPU and host telemetry and streams it to the
//! controller over one mTLS gRPC stream that it dials out (so it works behind
//! NAT), keeping every batch until the controller has made it durable.
//!
//! `main.rs` is thin: it parses flags and calls [`run`]; tests and `flotctl demo`
//! call [`run`] in-process.

pub mod buffer;
pub mod collector;
pub mod config;
pub mod containers;
pub mod enroll;
pub mod executor;
pub mod gateway;
pub mod gpu;
pub mod host;
pub mod inference;
pub mod runtime;
pub mod seq;
pub mod uplink;

use flotilla_common::model::Inventory;
use flotilla_common::{Identity, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use config::GpuSourceChoice;
use gpu::GpuSource;

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("TLS: {0}")]
    Tls(#[from] flotilla_common::tls::TlsError),
    #[error("{0}")]
    Client(#[from] flotilla_common::client::ClientError),
    #[error("{0}")]
    Seq(#[from] seq::SeqError),
    #[error("{0}")]
    Buffer(#[from] buffer::BufferError),
    #[error(
        "agent certificate {path}: it identifies {identity}, not a node; issue one with `flotctl cert issue --node ID`"
    )]
    NotANodeCertificate { path: String, identity: String },
    #[error("command key: {0}")]
    CommandKey(#[from] flotilla_common::envelope::KeyError),
    #[error("command state in {path}: {source}")]
    CommandState {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ack log: {0}")]
    AckLog(std::io::Error),
    #[error("inference collector: {0}")]
    Inference(#[from] inference::InferenceError),
    #[error("gateway: {0}")]
    Gateway(#[from] gateway::GatewayError),
    #[error("enrollment: {0}")]
    Enroll(#[from] enroll::EnrollError),
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(mut config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    enroll::finish_interrupted_swap(&config.tls);
    enroll::enroll_if_needed(&mut config).await?;
    if let Some(enrolled) = enroll::Enrolled::load(&config.data_dir) {
        enrolled.apply(&mut config);
    }
    let cert_node = match config.tls.identity()? {
        Identity::Node(id) => id,
        other => {
            return Err(AgentError::NotANodeCertificate {
                path: config.tls.cert.display().to_string(),
                identity: other.to_string(),
            });
        }
    };
    // Renewal asks for the certificate's own identity: the controller signs no other.
    let cert_node_for_renewal = cert_node.clone();
    let node = match &config.node_id {
        Some(configured) if *configured != cert_node => {
            tracing::warn!(configured = %configured, certificate = %cert_node, "node_id differs from the certificate identity; the controller will refuse this agent");
            configured.clone()
        }
        _ => cert_node,
    };
    let endpoint = flotilla_common::client::endpoint(&config.controller, &config.tls)?;
    let seq = seq::SeqAllocator::open(&config.data_dir)?;
    let (buffer, buffered) = buffer::DiskBuffer::open(&config.data_dir.join("buffer"), config.uplink.buffer_max_bytes)?;

    let gpu_source: Box<dyn GpuSource> = match config.gpu.source {
        GpuSourceChoice::None => Box::new(gpu::NoGpus::disabled()),
        GpuSourceChoice::Nvml => match gpu::nvml::NvmlGpus::open() {
            Ok(nvml) => Box::new(nvml),
            Err(error) if error.is_no_driver() => {
                // Said once, here; the inventory carries the note from now on.
                tracing::warn!(%error, "no NVIDIA driver on this host; running without GPU data");
                Box::new(gpu::NoGpus::with(error.to_inventory()))
            }
            Err(error) => {
                // A driver that is there but broken is worth an alarm: the GPU
                // collector reports it on every batch, so the node shows degraded.
                tracing::error!(%error, "NVML failed to start; GPU data unavailable");
                Box::new(gpu::FailedGpus::new(error.to_inventory()))
            }
        },
        GpuSourceChoice::Simulated => {
            let seed = config.gpu.simulated_seed.unwrap_or_else(|| gpu::simulated::seed_from(node.as_str()));
            Box::new(gpu::simulated::SimulatedGpus::new(config.gpu.simulated_count, seed))
        }
    };
    let mut host = host::HostCollector::new().with_model_dir(config.model_dir.clone());
    let gateway_info = match &config.gateway {
        Some(g) => Some(gateway::info(g).await),
        None => None,
    };
    let inventory = build_inventory(&config, &mut host, gpu_source.as_ref(), gateway_info);
    tracing::info!(node_id = %node, controller = %config.controller, gpus = inventory.gpus.len(), gpu_source = inventory.gpu_source.as_str(), "agent starting");

    let simulation = gpu_source.simulation();
    let pinned = match &config.command_key {
        Some(path) => Some(flotilla_common::envelope::PinnedKey::load(path)?),
        None => {
            tracing::warn!("no command_key configured: this agent refuses every command");
            None
        }
    };
    let commands_dir = config.data_dir.join("commands");
    let gate = executor::Gate::open(node.clone(), pinned, &commands_dir)
        .map_err(|source| AgentError::CommandState { path: commands_dir.display().to_string(), source })?;
    let mut runtime_config = config.runtime.clone();
    // Labels every container this agent creates with its node (`flotilla.node`).
    runtime_config.node = Some(node.clone());
    if config.gpu.source == GpuSourceChoice::Simulated {
        // Said once, here: deploys still check `gpus` against the simulated ones.
        tracing::info!(
            "simulated GPUs are bookkeeping only: a container spec's gpus are checked and labelled (flotilla.gpus), \
             but no device is requested from the container engine"
        );
        runtime_config.gpu_devices = runtime::GpuDevices::Bookkeeping;
    }
    // Filled by the container listings, read by the inference collector.
    let managed_servers = inference::ManagedServers::default();
    let command_host = executor::Host {
        gpus: inventory.gpus.clone(),
        runtime: std::sync::Arc::new(runtime::DockerRuntime::new(runtime_config)),
        recent: flotilla_common::logging::RecentEvents::global().clone(),
        gateway: match config.gateway.clone() {
            Some(g) => Some(std::sync::Arc::new(gateway::Gateway::new(g)?)),
            None => None,
        },
        servers: managed_servers.clone(),
    };
    let uplink = uplink::Uplink::new(
        node,
        inventory,
        endpoint,
        config.heartbeat(),
        config.uplink.clone(),
        uplink::Durable { seq, buffer, buffered, gate, host: command_host },
    )
    .map_err(AgentError::AckLog)?
    .with_simulation(simulation)
    .with_renewal(enroll::Renewal::new(config.tls.clone(), config.controller.clone(), cert_node_for_renewal));
    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::channel(1024);
    let inference =
        inference::InferenceCollector::new(config.inference.clone())?.with_managed(managed_servers.subscribe());
    let traffic =
        config.gateway.as_ref().and_then(|g| g.access_log.as_deref()).map(gateway::traffic::TrafficCounters::new);
    let sources = collector::Sources { gpu: gpu_source, host, inference, traffic };
    tracker.spawn(collector::run(sources, config.interval, tx, shutdown.child_token()));
    tracker.spawn(uplink.run(rx, shutdown.child_token()));
    tracker.close();
    tracker.wait().await;
    tracing::info!("agent stopped");
    Ok(())
}

fn build_inventory(
    config: &Config,
    host: &mut host::HostCollector,
    gpu: &dyn GpuSource,
    gateway: Option<flotilla_common::model::GatewayInfo>,
) -> Inventory {
    let facts = host.facts();
    let g = gpu.inventory();
    Inventory {
        hostname: facts.hostname,
        os: facts.os,
        kernel: facts.kernel,
        cpu_model: facts.cpu_model,
        cpu_cores: facts.cpu_cores,
        memory_total_bytes: facts.memory_total_bytes,
        gpus: g.gpus,
        gpu_source: g.kind,
        gpu_source_note: g.note,
        driver_version: g.driver_version,
        cuda_version: g.cuda_version,
        labels: config.labels.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        gateway,
    }
}

/// The node id an agent with this configuration will claim.
pub fn node_id(config: &Config) -> Result<NodeId, AgentError> {
    if let Some(id) = &config.node_id {
        return Ok(id.clone());
    }
    match config.tls.identity()? {
        Identity::Node(id) => Ok(id),
        other => Err(AgentError::NotANodeCertificate {
            path: config.tls.cert.display().to_string(),
            identity: other.to_string(),
        }),
    }
}
