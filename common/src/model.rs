//! The domain model of what agents report: inventory and telemetry batches.
//! The store, the fleet state and (later) the alert engine work on these types;
//! `flotilla-proto` converts them to and from the wire, validating on the way in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where an agent's GPU data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GpuSourceKind {
    /// Real GPUs through NVML.
    Nvml,
    /// Simulated GPUs (demo and tests).
    Simulated,
    /// No GPU data (no driver, or disabled).
    #[default]
    None,
}

impl GpuSourceKind {
    /// The lowercase name used on the wire and in config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nvml => "nvml",
            Self::Simulated => "simulated",
            Self::None => "none",
        }
    }
}

/// What an agent reports about its host when it connects.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Inventory {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpu_cores: u32,
    pub memory_total_bytes: u64,
    pub gpus: Vec<GpuInfo>,
    pub gpu_source: GpuSourceKind,
    /// Why there is no GPU data, when there is none.
    pub gpu_source_note: String,
    pub driver_version: String,
    pub cuda_version: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    /// The gateway role, when the agent has one (a `[gateway]` section).
    pub gateway: Option<GatewayInfo>,
}

/// An agent's gateway role: it runs nginx and accepts `gateway-set`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// `nginx -v`'s version (`nginx/1.22.1`); empty when nginx could not be run
    /// at agent startup.
    pub nginx_version: String,
}

/// The containers an agent manages, as it last listed them. Kept apart from
/// [`Inventory`] (which the controller stores) because it is live state: the
/// agent reports it again on every connect and whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerReport {
    /// Ordered by name.
    pub containers: Vec<Container>,
    /// Why the runtime could not be asked, when it could not; the list is then
    /// unknown rather than empty.
    pub runtime_error: Option<String>,
    /// When the agent listed them.
    pub listed_unix_ms: i64,
}

impl ContainerReport {
    /// Whether `other` says the same about the containers (the listing time aside).
    pub fn same_as(&self, other: &ContainerReport) -> bool {
        self.containers == other.containers && self.runtime_error == other.runtime_error
    }
}

/// One managed container.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    /// The engine's id, shortened to [`Container::SHORT_ID_LEN`] hex digits.
    pub id: String,
    pub image: String,
    /// The engine's state name: created, running, paused, restarting, removing,
    /// exited, dead or unknown.
    pub state: String,
    /// starting, healthy or unhealthy; `None` without a health check.
    pub health: Option<String>,
    /// The `flotilla.deployment` label.
    pub deployment: Option<String>,
    /// The `flotilla.revision` label.
    pub revision: Option<String>,
    /// When the engine created it.
    pub created_unix_ms: Option<i64>,
}

impl Container {
    /// How many hex digits of the engine's id are kept (as `docker ps` shows).
    pub const SHORT_ID_LEN: usize = 12;
    /// The state names a container may report.
    pub const STATES: [&'static str; 8] =
        ["created", "running", "paused", "restarting", "removing", "exited", "dead", "unknown"];
    /// The health names a container may report.
    pub const HEALTHS: [&'static str; 3] = ["starting", "healthy", "unhealthy"];
}

/// One GPU in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_total_bytes: u64,
}

/// One sample of one GPU; `None` where the source cannot read a value.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub utilization_ratio: Option<f64>,
    pub memory_utilization_ratio: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub power_limit_watts: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub memory_reserved_bytes: Option<u64>,
    pub memory_temperature_celsius: Option<f64>,
    /// Energy since the driver loaded.
    pub energy_joules_total: Option<f64>,
    /// NVML clock-event (throttle) reason bits; see [`clock_event_reason_names`].
    pub clock_event_reasons: Option<u64>,
    pub pcie_rx_bytes_per_second: Option<f64>,
    pub pcie_tx_bytes_per_second: Option<f64>,
    pub pcie_replay_total: Option<u64>,
    pub ecc_corrected_volatile_total: Option<u64>,
    pub ecc_uncorrected_volatile_total: Option<u64>,
    pub ecc_corrected_aggregate_total: Option<u64>,
    pub ecc_uncorrected_aggregate_total: Option<u64>,
    pub remapped_rows_correctable: Option<u64>,
    pub remapped_rows_uncorrectable: Option<u64>,
    pub remapped_rows_pending: Option<bool>,
    pub remapped_rows_failed: Option<bool>,
    pub retired_pages_single_bit: Option<u64>,
    pub retired_pages_double_bit: Option<u64>,
    /// XID events seen since the agent started, counted per code, sorted by code.
    pub xid_events: Vec<XidCount>,
    pub processes: Vec<GpuProcess>,
}

/// How many XID events of one code a GPU has raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct XidCount {
    pub code: u64,
    pub count: u64,
}

/// A process using a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub name: String,
    pub used_memory_bytes: Option<u64>,
}

/// NVML clock-event (throttle) reason bits (`nvmlClocksEventReason*`) and their names.
pub const CLOCK_EVENT_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// The names of the reasons set in `mask`.
pub fn clock_event_reason_names(mask: u64) -> impl Iterator<Item = &'static str> {
    CLOCK_EVENT_REASONS.iter().filter(move |(bit, _)| mask & bit != 0).map(|(_, name)| *name)
}

/// XID codes that mean the GPU or its memory needs attention now (NVIDIA's XID
/// catalogue: 48 double-bit ECC, 63/64 row remapping, 74 NVLink, 79 fallen off
/// the bus, 92-95 ECC and containment, 119/120 GSP errors).
pub const CRITICAL_XIDS: [u64; 10] = [48, 63, 64, 74, 79, 92, 94, 95, 119, 120];

/// Host metrics of one sample.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HostSample {
    pub cpu_utilization_ratio: f64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
    pub filesystems: Vec<FilesystemSample>,
    pub networks: Vec<NetworkSample>,
}

/// Size and free space of one mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FilesystemSample {
    pub mount_point: String,
    pub device: String,
    pub fs_type: String,
    pub size_bytes: u64,
    pub avail_bytes: u64,
}

/// Byte counters of one network interface.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkSample {
    pub interface: String,
    pub receive_bytes_total: u64,
    pub transmit_bytes_total: u64,
}

/// A named sample for series with no typed field.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Health of one collector at the time of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CollectorStatus {
    pub name: String,
    pub healthy: bool,
    pub error: String,
}

/// One collection round of one agent, numbered by the agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// Strictly increasing per agent, never reused, starting at 1.
    pub seq: u64,
    /// When the agent made the batch (Unix ms).
    pub created_unix_ms: i64,
    pub gpus: Vec<GpuSample>,
    pub host: Option<HostSample>,
    pub samples: Vec<Sample>,
    pub collectors: Vec<CollectorStatus>,
}

impl TelemetryBatch {
    /// The collectors that reported a failure in this batch.
    pub fn failing_collectors(&self) -> impl Iterator<Item = &CollectorStatus> {
        self.collectors.iter().filter(|c| !c.healthy)
    }
}

/// The lifecycle state of a node as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Connected, heartbeating, every collector healthy.
    Up,
    /// Connected, but a collector is failing.
    Degraded,
    /// Taken out of scheduling by an operator.
    Cordoned,
    /// Traffic is being drained.
    Draining,
    /// No heartbeat within the allowed window, or disconnected.
    Down,
    /// Revoked by an admin: the controller refuses its streams.
    Revoked,
}

impl NodeState {
    /// The lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Degraded => "degraded",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
            Self::Down => "down",
            Self::Revoked => "revoked",
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fault to inject into a simulated GPU (`flotctl sim inject`). Real GPUs are
/// never touched: agents with an NVML source refuse these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SimFault {
    /// The cooling fails: temperature climbs, clocks throttle.
    Overheat,
    /// A process leaks GPU memory until the card is full.
    MemoryCreep,
    /// More load than the card serves: utilisation pinned near 100 %.
    Saturate,
    /// The GPU raises an XID error with this code (79: falls off the bus).
    Xid(u64),
    /// The GPU disappears from the bus.
    GpuLost,
    /// Back to normal (cumulative counters are kept, like real hardware).
    Clear,
}

impl std::fmt::Display for SimFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Overheat => f.write_str("overheat"),
            Self::MemoryCreep => f.write_str("memory-creep"),
            Self::Saturate => f.write_str("saturate"),
            Self::Xid(code) => write!(f, "xid={code}"),
            Self::GpuLost => f.write_str("gpu-lost"),
            Self::Clear => f.write_str("clear"),
        }
    }
}

impl std::str::FromStr for SimFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "overheat" => Ok(Self::Overheat),
            "memory-creep" => Ok(Self::MemoryCreep),
            "saturate" => Ok(Self::Saturate),
            "gpu-lost" => Ok(Self::GpuLost),
            "clear" => Ok(Self::Clear),
            other => match other.strip_prefix("xid=").map(str::parse::<u64>) {
                Some(Ok(code)) if (1..=1000).contains(&code) => Ok(Self::Xid(code)),
                _ => Err(format!(
                    "unknown fault {other:?}: use overheat, memory-creep, saturate, xid=CODE (1-1000), gpu-lost or clear"
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_print() {
        for f in ["overheat", "memory-creep", "saturate", "xid=79", "gpu-lost", "clear"] {
            assert_eq!(f.parse::<SimFault>().unwrap().to_string(), f);
        }
        assert!("xid=0".parse::<SimFault>().is_err());
        assert!("xid=abc".parse::<SimFault>().is_err());
        assert!("melt".parse::<SimFault>().unwrap_err().contains("overheat"));
    }

    #[test]
    fn clock_event_names() {
        assert_eq!(clock_event_reason_names(0x20 | 0x1).collect::<Vec<_>>(), ["gpu_idle", "sw_thermal_slowdown"]);
    }
}
