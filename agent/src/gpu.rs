//! GPU sources behind one trait: the agent does not care whether samples come
//! from NVML or from the simulator.

pub mod nvml;
pub mod simulated;

use flotilla_common::model::{GpuInfo, GpuSample, GpuSourceKind};

/// What a GPU source knows about the host's GPUs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuInventory {
    pub kind: GpuSourceKind,
    pub gpus: Vec<GpuInfo>,
    pub driver_version: String,
    pub cuda_version: String,
    /// Why there is no GPU data, when there is none.
    pub note: String,
}

/// A GPU source failed to sample some or all GPUs.
#[derive(Debug, thiserror::Error)]
#[error("GPU source {source_name}: {message}")]
pub struct GpuError {
    pub source_name: &'static str,
    pub message: String,
    /// Samples of the GPUs that did answer (e.g. all but a GPU that fell off the bus).
    pub partial: Vec<GpuSample>,
}

impl GpuError {
    /// An error with no partial samples.
    pub fn new(source_name: &'static str, message: impl Into<String>) -> Self {
        Self { source_name, message: message.into(), partial: Vec::new() }
    }
}

/// A source of GPU inventory and samples.
pub trait GpuSource: Send {
    /// The GPUs present.
    fn inventory(&self) -> GpuInventory;
    /// One sample per GPU at `elapsed` since the agent started.
    fn sample(&mut self, elapsed: std::time::Duration) -> Result<Vec<GpuSample>, GpuError>;
    /// The fault-injection handle, for simulated sources only.
    fn simulation(&self) -> Option<simulated::SimHandle> {
        None
    }
}

/// The source for hosts without GPU data: collection disabled, or no driver.
#[derive(Debug, Default)]
pub struct NoGpus {
    inventory: GpuInventory,
}

impl NoGpus {
    /// Collection turned off in the config.
    pub fn disabled() -> Self {
        Self::with(GpuInventory {
            kind: GpuSourceKind::None,
            note: "GPU collection disabled (gpu.source = \"none\")".to_owned(),
            ..Default::default()
        })
    }

    /// No GPUs, with `inventory` explaining why (e.g. no NVIDIA driver).
    pub fn with(inventory: GpuInventory) -> Self {
        Self { inventory }
    }
}

impl GpuSource for NoGpus {
    fn inventory(&self) -> GpuInventory {
        self.inventory.clone()
    }

    fn sample(&mut self, _elapsed: std::time::Duration) -> Result<Vec<GpuSample>, GpuError> {
        Ok(Vec::new())
    }
}

/// A GPU source that could not start although a driver is present: every
/// sample reports the failure, so the node shows degraded until it is fixed.
#[derive(Debug)]
pub struct FailedGpus {
    inventory: GpuInventory,
}

impl FailedGpus {
    pub fn new(inventory: GpuInventory) -> Self {
        Self { inventory }
    }
}

impl GpuSource for FailedGpus {
    fn inventory(&self) -> GpuInventory {
        self.inventory.clone()
    }

    fn sample(&mut self, _elapsed: std::time::Duration) -> Result<Vec<GpuSample>, GpuError> {
        Err(GpuError::new("nvml", self.inventory.note.clone()))
    }
}
