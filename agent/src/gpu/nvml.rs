//! Real GPUs through NVML. `nvml-wrapper` loads `libnvidia-ml.so.1` when the
//! source opens, not at link time, so the agent builds and runs on hosts without
//! a driver and reports "no NVIDIA driver" instead of GPU data there.
//!
//! The GPU set is read once at open: NVML indices can change only across a driver
//! reload, which restarts the agent's view anyway. Samples look each GPU up by
//! UUID so that a GPU that disappeared fails the sample by name instead of
//! silently reporting another GPU's values under its index.

mod convert;
mod field;
mod sample;
mod xid;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_common::model::{GpuInfo, GpuSample, GpuSourceKind};
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

pub use self::field::FieldErrors;
use self::xid::{SharedXidCounts, XidWatcher};
use super::{GpuError, GpuInventory, GpuSource};

/// The name GPU errors of this source carry.
const SOURCE_NAME: &str = "nvml";

/// The prefix of every note and error that means "this host has no usable driver".
const NO_DRIVER: &str = "no NVIDIA driver";

/// NVML could not be opened; the agent runs on without GPU data.
#[derive(Debug, thiserror::Error)]
pub enum NvmlOpenError {
    /// `libnvidia-ml` is not installed or the kernel driver is not loaded: the
    /// normal state of a host without NVIDIA GPUs.
    #[error("no NVIDIA driver: {source}")]
    NoDriver {
        #[source]
        source: NvmlError,
    },
    /// NVML is present but refused to start (permissions, a library that does
    /// not match the kernel driver, ...): worth an operator's attention.
    #[error("NVML initialisation failed: {source}")]
    Init {
        #[source]
        source: NvmlError,
    },
    /// NVML started but could not count the GPUs.
    #[error("NVML cannot count the GPUs: {source}")]
    DeviceCount {
        #[source]
        source: NvmlError,
    },
}

impl NvmlOpenError {
    /// Sorts an error of `nvmlInit` into "no driver" or "driver present but broken".
    fn from_init(source: NvmlError) -> Self {
        match source {
            NvmlError::LibloadingError(_)
            | NvmlError::LibraryNotFound
            | NvmlError::DriverNotLoaded
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::FunctionNotFound => Self::NoDriver { source },
            source => Self::Init { source },
        }
    }

    /// True when the host simply has no driver, as opposed to a broken one.
    pub fn is_no_driver(&self) -> bool {
        matches!(self, Self::NoDriver { .. })
    }

    /// The inventory to report instead of GPUs, with this error as its note.
    pub fn to_inventory(&self) -> GpuInventory {
        match self {
            Self::NoDriver { source } => no_driver_inventory(&source.to_string()),
            other => GpuInventory { kind: GpuSourceKind::None, note: other.to_string(), ..Default::default() },
        }
    }
}

/// The inventory of a host where NVML cannot load: no GPUs, and a note saying
/// why. `reason` is NVML's reason; a reason that already says "no NVIDIA driver"
/// (an [`NvmlOpenError`]'s message) is not prefixed twice.
pub fn no_driver_inventory(reason: &str) -> GpuInventory {
    let reason = reason.strip_prefix(NO_DRIVER).map_or(reason, |rest| rest.trim_start_matches([':', ' ']));
    GpuInventory { kind: GpuSourceKind::None, note: format!("{NO_DRIVER}: {reason}"), ..Default::default() }
}

/// The GPUs of this host, read through NVML.
#[derive(Debug)]
pub struct NvmlGpus {
    nvml: Arc<Nvml>,
    inventory: GpuInventory,
    xid_counts: SharedXidCounts,
    /// Stops and joins the XID thread when the source is dropped; `None` when the
    /// thread could not be started or the platform has no NVML events.
    _xid_watcher: Option<XidWatcher>,
    field_errors: FieldErrors,
    /// Where process names are read from: `/proc`, or a fake tree in tests.
    proc_root: PathBuf,
}

impl NvmlGpus {
    /// Initialises NVML from the library on the loader path (`libnvidia-ml.so.1`),
    /// reads the inventory and starts watching for XID events.
    pub fn open() -> Result<Self, NvmlOpenError> {
        Self::start(Nvml::init())
    }

    /// Like [`NvmlGpus::open`], with the NVML library at `library`: for hosts
    /// where the driver's library is not on the loader path.
    pub fn open_library(library: &Path) -> Result<Self, NvmlOpenError> {
        Self::start(Nvml::builder().lib_path(library.as_os_str()).init())
    }

    fn start(init: Result<Nvml, NvmlError>) -> Result<Self, NvmlOpenError> {
        let nvml = Arc::new(init.map_err(NvmlOpenError::from_init)?);
        let inventory = read_inventory(&nvml)?;
        let xid_counts = SharedXidCounts::default();
        let gpus = inventory.gpus.iter().map(|g| g.index).collect();
        let xid_watcher = watch_xids(Arc::clone(&nvml), gpus, Arc::clone(&xid_counts));
        tracing::info!(
            gpus = inventory.gpus.len(),
            driver = %inventory.driver_version,
            cuda = %inventory.cuda_version,
            "NVML opened"
        );
        Ok(Self {
            nvml,
            inventory,
            xid_counts,
            _xid_watcher: xid_watcher,
            field_errors: FieldErrors::default(),
            proc_root: PathBuf::from("/proc"),
        })
    }

    /// The per-field read failures counted so far (fields NVML does not support
    /// on a GPU are not failures and are not counted).
    pub fn field_errors(&self) -> &FieldErrors {
        &self.field_errors
    }
}

impl GpuSource for NvmlGpus {
    fn inventory(&self) -> GpuInventory {
        self.inventory.clone()
    }

    /// Samples every GPU. A GPU that stopped answering does not hide the
    /// others: the error names it and carries the other GPUs' samples.
    fn sample(&mut self, _elapsed: Duration) -> Result<Vec<GpuSample>, GpuError> {
        let mut samples = Vec::with_capacity(self.inventory.gpus.len());
        let mut gone = Vec::new();
        for gpu in &self.inventory.gpus {
            let device = match self.nvml.device_by_uuid(gpu.uuid.as_str()) {
                Ok(device) => device,
                Err(error) => {
                    gone.push(not_answering(gpu, "device handle", &error));
                    continue;
                }
            };
            let mut reader = sample::Reader::new(gpu.index, &mut self.field_errors);
            match sample::read(&device, gpu, &mut reader, &self.proc_root) {
                Ok(mut sample) => {
                    sample.xid_events = xid::counts_for(&self.xid_counts, gpu.index);
                    samples.push(sample);
                }
                Err(vanished) => gone.push(not_answering(gpu, vanished.field, &vanished.source)),
            }
        }
        if gone.is_empty() {
            return Ok(samples);
        }
        Err(GpuError { source_name: SOURCE_NAME, message: gone.join("; "), partial: samples })
    }
}

/// Names a GPU that stopped answering by index and UUID, with NVML's reason.
fn not_answering(gpu: &GpuInfo, what: &str, error: &NvmlError) -> String {
    format!("GPU {} ({}) is not answering ({what}): {error}", gpu.index, gpu.uuid)
}

/// Driver and CUDA versions and every GPU NVML can open. A GPU that cannot be
/// opened is left out and named in the note, so one broken GPU does not hide
/// the others.
fn read_inventory(nvml: &Nvml) -> Result<GpuInventory, NvmlOpenError> {
    let driver_version = nvml.sys_driver_version().unwrap_or_else(|error| {
        tracing::warn!(error = %error, "NVML cannot tell the driver version");
        String::new()
    });
    let cuda_version = nvml.sys_cuda_driver_version().map(convert::cuda_version).unwrap_or_else(|error| {
        tracing::warn!(error = %error, "NVML cannot tell the CUDA version");
        String::new()
    });
    let count = nvml.device_count().map_err(|source| NvmlOpenError::DeviceCount { source })?;
    let mut gpus = Vec::new();
    let mut notes = Vec::new();
    for index in 0..count {
        match describe(nvml, index) {
            Ok(info) => gpus.push(info),
            Err(error) => {
                tracing::warn!(gpu = index, error = %error, "GPU cannot be opened; leaving it out");
                notes.push(format!("GPU {index} cannot be opened: {error}"));
            }
        }
    }
    if count == 0 {
        notes.push("the NVIDIA driver is loaded but shows no GPUs".to_owned());
    }
    Ok(GpuInventory { kind: GpuSourceKind::Nvml, gpus, driver_version, cuda_version, note: notes.join("; ") })
}

/// One GPU's inventory entry. Without a UUID a GPU cannot be told apart from the
/// others across restarts, so that is an error; name and memory are best effort.
fn describe(nvml: &Nvml, index: u32) -> Result<GpuInfo, NvmlError> {
    let device = nvml.device_by_index(index)?;
    let uuid = device.uuid()?;
    let model = device.name().unwrap_or_else(|error| {
        tracing::warn!(gpu = index, error = %error, "NVML cannot tell the GPU model");
        String::new()
    });
    let memory_total_bytes = device.memory_info().map_or_else(
        |error| {
            tracing::warn!(gpu = index, error = %error, "NVML cannot tell the GPU memory size");
            0
        },
        |m| m.total,
    );
    Ok(GpuInfo { index, uuid, model, memory_total_bytes })
}

/// Starts the XID event thread; without it samples carry no XID counts, which is
/// logged once rather than failing the source.
fn watch_xids(nvml: Arc<Nvml>, gpus: Vec<u32>, counts: SharedXidCounts) -> Option<XidWatcher> {
    if gpus.is_empty() {
        return None;
    }
    XidWatcher::spawn(nvml, gpus, counts)
        .map_err(|error| {
            tracing::warn!(error = %error, "cannot start the XID event thread; XID counts will stay empty");
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_inventory_says_so_once() {
        let inventory = no_driver_inventory("libnvidia-ml.so.1: cannot open shared object file");
        assert_eq!(inventory.kind, GpuSourceKind::None);
        assert!(inventory.gpus.is_empty());
        assert_eq!(inventory.note, "no NVIDIA driver: libnvidia-ml.so.1: cannot open shared object file");
        let error = NvmlOpenError::NoDriver { source: NvmlError::DriverNotLoaded };
        assert_eq!(no_driver_inventory(&error.to_string()).note, "no NVIDIA driver: NVIDIA driver is not loaded");
        assert_eq!(error.to_inventory(), no_driver_inventory(&error.to_string()));
    }

    #[test]
    fn init_errors_split_into_missing_and_broken_drivers() {
        assert!(NvmlOpenError::from_init(NvmlError::DriverNotLoaded).is_no_driver());
        assert!(NvmlOpenError::from_init(NvmlError::LibraryNotFound).is_no_driver());
        let broken = NvmlOpenError::from_init(NvmlError::LibRmVersionMismatch);
        assert!(!broken.is_no_driver());
        assert_eq!(
            broken.to_inventory().note,
            "NVML initialisation failed: RM detects a driver/library version mismatch"
        );
    }

    #[test]
    fn a_missing_library_is_no_driver() {
        let error = NvmlGpus::open_library(Path::new("/nonexistent/libnvidia-ml.so.1"))
            .expect_err("there is no library at that path");
        assert!(error.is_no_driver(), "{error}");
        assert!(error.to_string().starts_with("no NVIDIA driver: "), "{error}");
    }

    /// On a machine without a driver (CI, this workspace's build hosts) opening
    /// must fail with the no-driver error; on a GPU host it must give a usable
    /// source. Either way it must not panic.
    #[test]
    fn open_reports_no_driver_or_works() {
        match NvmlGpus::open() {
            Err(error) => {
                assert!(error.is_no_driver(), "unexpected NVML error: {error}");
                let note = error.to_inventory().note;
                assert!(note.starts_with("no NVIDIA driver: "), "{note}");
            }
            Ok(mut gpus) => {
                let inventory = gpus.inventory();
                assert_eq!(inventory.kind, GpuSourceKind::Nvml);
                let samples = gpus.sample(Duration::ZERO).expect("a sample");
                assert_eq!(samples.len(), inventory.gpus.len());
                for (sample, info) in samples.iter().zip(&inventory.gpus) {
                    assert_eq!(sample.uuid, info.uuid);
                    assert!(sample.memory_total_bytes.is_some());
                }
            }
        }
    }
}
