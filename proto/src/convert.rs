//! Conversions between `pb::*` and `flotilla_common::model`. Everything coming
//! off the wire is validated here, so the rest of the code can trust the domain
//! types: sizes are bounded, numbers are finite, names are well-formed.

use std::collections::BTreeMap;
use std::fmt::Display;

use flotilla_common::model::{
    CollectorStatus, FilesystemSample, GatewayInfo, GpuInfo, GpuProcess, GpuSample, GpuSourceKind, HostSample,
    Inventory, NetworkSample, NodeState, Sample, TelemetryBatch, XidCount,
};

use crate::pb;

mod containers;

/// Bounds on what one message may carry. Generous for real hosts (a DGX has 8
/// GPUs, a big host a few hundred mounts), tight enough that one agent cannot
/// exhaust the controller's memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_gpus: usize,
    pub max_samples: usize,
    pub max_list: usize,
    pub max_labels: usize,
    pub max_string: usize,
}

impl Limits {
    /// The limits the controller enforces (announced to agents in `Welcome`).
    pub const DEFAULT: Limits =
        Limits { max_gpus: 64, max_samples: 10_000, max_list: 512, max_labels: 64, max_string: 256 };
}

/// A wire message that does not satisfy the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct WireError {
    pub field: String,
    pub problem: String,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> WireError {
    WireError { field: field.into(), problem: problem.into() }
}

// The checks take a field path as anything displayable and format it only when
// they fail: a batch is checked field by field, and building every path as a
// `String` up front was the costliest part of decoding a batch.

/// A field of the `index`th element of a list: `telemetry.gpus[3].power_watts`.
#[derive(Debug, Clone, Copy)]
struct Indexed {
    list: &'static str,
    index: u32,
    field: &'static str,
}

impl Display for Indexed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}].{}", self.list, self.index, self.field)
    }
}

fn check_len<F: Display + ?Sized>(field: &F, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(err(field.to_string(), format!("{len} entries; at most {max} are allowed")));
    }
    Ok(())
}

fn check_str<F: Display + ?Sized>(field: &F, s: &str, limits: &Limits) -> Result<(), WireError> {
    if s.len() > limits.max_string {
        return Err(err(field.to_string(), format!("{} bytes; at most {} are allowed", s.len(), limits.max_string)));
    }
    if s.chars().any(char::is_control) {
        return Err(err(field.to_string(), "contains control characters"));
    }
    Ok(())
}

fn check_finite<F: Display + ?Sized>(field: &F, v: f64) -> Result<f64, WireError> {
    if !v.is_finite() {
        return Err(err(field.to_string(), format!("{v} is not a finite number")));
    }
    Ok(v)
}

fn check_ratio<F: Display + ?Sized>(field: &F, v: Option<f64>) -> Result<Option<f64>, WireError> {
    match v {
        Some(r) if !(0.0..=1.0).contains(&check_finite(field, r)?) => {
            Err(err(field.to_string(), format!("{r} is outside 0..=1")))
        }
        other => Ok(other),
    }
}

fn check_opt<F: Display + ?Sized>(field: &F, v: Option<f64>) -> Result<Option<f64>, WireError> {
    v.map(|x| check_finite(field, x)).transpose()
}

/// Prometheus metric and label names: `[a-zA-Z_:][a-zA-Z0-9_:]*` (no colon in labels).
fn check_name<F: Display + ?Sized>(field: &F, s: &str, allow_colon: bool) -> Result<(), WireError> {
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (allow_colon && c == ':');
    let ok_rest = |c: char| ok_first(c) || c.is_ascii_digit();
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if ok_first(c) && chars.all(ok_rest) => Ok(()),
        _ => Err(err(field.to_string(), format!("{s:?} is not a valid Prometheus name"))),
    }
}

fn labels_from_wire<F: Display + ?Sized>(
    field: &F,
    labels: std::collections::HashMap<String, String>,
    limits: &Limits,
) -> Result<BTreeMap<String, String>, WireError> {
    check_len(field, labels.len(), limits.max_labels)?;
    for (k, v) in &labels {
        check_name(&format_args!("{field}.key"), k, false)?;
        check_str(&format_args!("{field}[{k}]"), v, limits)?;
    }
    Ok(labels.into_iter().collect())
}

impl TryFrom<pb::Inventory> for Inventory {
    type Error = WireError;
    fn try_from(w: pb::Inventory) -> Result<Self, WireError> {
        let l = Limits::DEFAULT;
        for (field, value) in [
            ("inventory.hostname", &w.hostname),
            ("inventory.os", &w.os),
            ("inventory.kernel", &w.kernel),
            ("inventory.cpu_model", &w.cpu_model),
            ("inventory.gpu_source_note", &w.gpu_source_note),
            ("inventory.driver_version", &w.driver_version),
            ("inventory.cuda_version", &w.cuda_version),
            ("inventory.agent_version", &w.agent_version),
        ] {
            check_str(field, value, &l)?;
        }
        check_len("inventory.gpus", w.gpus.len(), l.max_gpus)?;
        let mut gpus = Vec::with_capacity(w.gpus.len());
        for (i, g) in w.gpus.into_iter().enumerate() {
            check_str(&format_args!("inventory.gpus[{i}].uuid"), &g.uuid, &l)?;
            check_str(&format_args!("inventory.gpus[{i}].model"), &g.model, &l)?;
            gpus.push(GpuInfo {
                index: g.index,
                uuid: g.uuid,
                model: g.model,
                memory_total_bytes: g.memory_total_bytes,
            });
        }
        check_unique_indices("inventory.gpus", gpus.iter().map(|g| g.index))?;
        let gpu_source = match w.gpu_source.as_str() {
            "nvml" => GpuSourceKind::Nvml,
            "simulated" => GpuSourceKind::Simulated,
            "none" | "" => GpuSourceKind::None,
            other => {
                return Err(err("inventory.gpu_source", format!("unknown source {other:?}")));
            }
        };
        let gateway = match w.gateway {
            Some(g) => {
                check_str("inventory.gateway.nginx_version", &g.nginx_version, &l)?;
                Some(GatewayInfo { nginx_version: g.nginx_version })
            }
            None => None,
        };
        Ok(Inventory {
            hostname: w.hostname,
            os: w.os,
            kernel: w.kernel,
            cpu_model: w.cpu_model,
            cpu_cores: w.cpu_cores,
            memory_total_bytes: w.memory_total_bytes,
            gpus,
            gpu_source,
            gpu_source_note: w.gpu_source_note,
            driver_version: w.driver_version,
            cuda_version: w.cuda_version,
            labels: labels_from_wire("inventory.labels", w.labels, &l)?,
            agent_version: w.agent_version,
            gateway,
        })
    }
}

fn check_unique_indices(field: &str, indices: impl Iterator<Item = u32>) -> Result<(), WireError> {
    let mut seen = std::collections::BTreeSet::new();
    for index in indices {
        if !seen.insert(index) {
            return Err(err(field, format!("GPU index {index} appears twice")));
        }
    }
    Ok(())
}

impl From<Inventory> for pb::Inventory {
    fn from(d: Inventory) -> Self {
        pb::Inventory {
            hostname: d.hostname,
            os: d.os,
            kernel: d.kernel,
            cpu_model: d.cpu_model,
            cpu_cores: d.cpu_cores,
            memory_total_bytes: d.memory_total_bytes,
            gpus: d
                .gpus
                .into_iter()
                .map(|g| pb::GpuInfo {
                    index: g.index,
                    uuid: g.uuid,
                    model: g.model,
                    memory_total_bytes: g.memory_total_bytes,
                })
                .collect(),
            gpu_source_note: d.gpu_source_note,
            driver_version: d.driver_version,
            cuda_version: d.cuda_version,
            labels: d.labels.into_iter().collect(),
            agent_version: d.agent_version,
            gpu_source: d.gpu_source.as_str().to_owned(),
            // Live state, not part of the stored inventory: the caller adds it.
            containers: None,
            gateway: d.gateway.map(|g| pb::GatewayInfo { nginx_version: g.nginx_version }),
        }
    }
}

impl TryFrom<pb::TelemetryBatch> for TelemetryBatch {
    type Error = WireError;
    fn try_from(w: pb::TelemetryBatch) -> Result<Self, WireError> {
        let l = Limits::DEFAULT;
        if w.seq == 0 {
            return Err(err("telemetry.seq", "must be at least 1"));
        }
        if w.created_unix_ms <= 0 {
            return Err(err("telemetry.created_unix_ms", "must be a positive Unix time in ms"));
        }
        check_len("telemetry.gpus", w.gpus.len(), l.max_gpus)?;
        check_len("telemetry.samples", w.samples.len(), l.max_samples)?;
        check_len("telemetry.collectors", w.collectors.len(), l.max_list)?;
        check_unique_indices("telemetry.gpus", w.gpus.iter().map(|g| g.index))?;
        let gpus = w.gpus.into_iter().map(gpu_from_wire).collect::<Result<_, _>>()?;
        let host = w.host.map(|h| host_from_wire(h, &l)).transpose()?;
        let mut samples = Vec::with_capacity(w.samples.len());
        for (i, s) in w.samples.into_iter().enumerate() {
            check_name(&format_args!("telemetry.samples[{i}].name"), &s.name, true)?;
            check_str(&format_args!("telemetry.samples[{i}].name"), &s.name, &l)?;
            samples.push(Sample {
                labels: labels_from_wire(&format_args!("telemetry.samples[{i}].labels"), s.labels, &l)?,
                name: s.name,
                // NaN and ±Inf are legal Prometheus values (e.g. a quantile with no data).
                value: s.value,
            });
        }
        let mut collectors = Vec::with_capacity(w.collectors.len());
        for c in w.collectors {
            check_str("telemetry.collectors.name", &c.name, &l)?;
            // Error texts come from the agent's OS; keep them but bound their size.
            let error: String = c.error.chars().filter(|ch| !ch.is_control()).take(l.max_string).collect();
            collectors.push(CollectorStatus { name: c.name, healthy: c.healthy, error });
        }
        Ok(TelemetryBatch { seq: w.seq, created_unix_ms: w.created_unix_ms, gpus, host, samples, collectors })
    }
}

fn gpu_from_wire(g: pb::GpuSample) -> Result<GpuSample, WireError> {
    let l = Limits::DEFAULT;
    let index = g.index;
    let f = |field: &'static str| Indexed { list: "telemetry.gpus", index, field };
    check_str(&f("uuid"), &g.uuid, &l)?;
    check_len(&f("xid_events"), g.xid_events.len(), l.max_list)?;
    check_len(&f("processes"), g.processes.len(), l.max_list)?;
    let mut xid_events: Vec<XidCount> =
        g.xid_events.iter().map(|x| XidCount { code: x.code, count: x.count }).collect();
    xid_events.sort_by_key(|x| x.code);
    if xid_events.windows(2).any(|w| w[0].code == w[1].code) {
        return Err(err(f("xid_events").to_string(), "an XID code appears twice"));
    }
    let mut processes = Vec::with_capacity(g.processes.len());
    for p in g.processes {
        check_str(&f("processes.name"), &p.name, &l)?;
        processes.push(GpuProcess { pid: p.pid, name: p.name, used_memory_bytes: p.used_memory_bytes });
    }
    if let (Some(used), Some(total)) = (g.memory_used_bytes, g.memory_total_bytes)
        && used > total
    {
        return Err(err(f("memory_used_bytes").to_string(), format!("{used} exceeds memory_total_bytes {total}")));
    }
    Ok(GpuSample {
        utilization_ratio: check_ratio(&f("utilization_ratio"), g.utilization_ratio)?,
        memory_utilization_ratio: check_ratio(&f("memory_utilization_ratio"), g.memory_utilization_ratio)?,
        temperature_celsius: check_opt(&f("temperature_celsius"), g.temperature_celsius)?,
        power_watts: check_opt(&f("power_watts"), g.power_watts)?,
        power_limit_watts: check_opt(&f("power_limit_watts"), g.power_limit_watts)?,
        index: g.index,
        uuid: g.uuid,
        memory_used_bytes: g.memory_used_bytes,
        memory_total_bytes: g.memory_total_bytes,
        sm_clock_mhz: g.sm_clock_mhz,
        memory_clock_mhz: g.memory_clock_mhz,
        memory_reserved_bytes: g.memory_reserved_bytes,
        memory_temperature_celsius: check_opt(&f("memory_temperature_celsius"), g.memory_temperature_celsius)?,
        energy_joules_total: check_opt(&f("energy_joules_total"), g.energy_joules_total)?,
        clock_event_reasons: g.clock_event_reasons,
        pcie_rx_bytes_per_second: check_opt(&f("pcie_rx_bytes_per_second"), g.pcie_rx_bytes_per_second)?,
        pcie_tx_bytes_per_second: check_opt(&f("pcie_tx_bytes_per_second"), g.pcie_tx_bytes_per_second)?,
        pcie_replay_total: g.pcie_replay_total,
        ecc_corrected_volatile_total: g.ecc_corrected_volatile_total,
        ecc_uncorrected_volatile_total: g.ecc_uncorrected_volatile_total,
        ecc_corrected_aggregate_total: g.ecc_corrected_aggregate_total,
        ecc_uncorrected_aggregate_total: g.ecc_uncorrected_aggregate_total,
        remapped_rows_correctable: g.remapped_rows_correctable,
        remapped_rows_uncorrectable: g.remapped_rows_uncorrectable,
        remapped_rows_pending: g.remapped_rows_pending,
        remapped_rows_failed: g.remapped_rows_failed,
        retired_pages_single_bit: g.retired_pages_single_bit,
        retired_pages_double_bit: g.retired_pages_double_bit,
        xid_events,
        processes,
    })
}

fn host_from_wire(h: pb::HostSample, l: &Limits) -> Result<HostSample, WireError> {
    check_len("telemetry.host.filesystems", h.filesystems.len(), l.max_list)?;
    check_len("telemetry.host.networks", h.networks.len(), l.max_list)?;
    let mut filesystems = Vec::with_capacity(h.filesystems.len());
    for fs in h.filesystems {
        check_str("telemetry.host.filesystems.mount_point", &fs.mount_point, l)?;
        check_str("telemetry.host.filesystems.device", &fs.device, l)?;
        check_str("telemetry.host.filesystems.fs_type", &fs.fs_type, l)?;
        filesystems.push(FilesystemSample {
            mount_point: fs.mount_point,
            device: fs.device,
            fs_type: fs.fs_type,
            size_bytes: fs.size_bytes,
            avail_bytes: fs.avail_bytes,
        });
    }
    let mut networks = Vec::with_capacity(h.networks.len());
    for n in h.networks {
        check_str("telemetry.host.networks.interface", &n.interface, l)?;
        networks.push(NetworkSample {
            interface: n.interface,
            receive_bytes_total: n.receive_bytes_total,
            transmit_bytes_total: n.transmit_bytes_total,
        });
    }
    Ok(HostSample {
        cpu_utilization_ratio: check_ratio("telemetry.host.cpu_utilization_ratio", Some(h.cpu_utilization_ratio))?
            .unwrap_or_default(),
        load1: check_finite("telemetry.host.load1", h.load1)?,
        load5: check_finite("telemetry.host.load5", h.load5)?,
        load15: check_finite("telemetry.host.load15", h.load15)?,
        memory_total_bytes: h.memory_total_bytes,
        memory_available_bytes: h.memory_available_bytes,
        swap_total_bytes: h.swap_total_bytes,
        swap_used_bytes: h.swap_used_bytes,
        filesystems,
        networks,
    })
}

impl From<TelemetryBatch> for pb::TelemetryBatch {
    fn from(d: TelemetryBatch) -> Self {
        pb::TelemetryBatch {
            seq: d.seq,
            created_unix_ms: d.created_unix_ms,
            gpus: d.gpus.into_iter().map(Into::into).collect(),
            host: d.host.map(Into::into),
            samples: d
                .samples
                .into_iter()
                .map(|s| pb::Sample { name: s.name, labels: s.labels.into_iter().collect(), value: s.value })
                .collect(),
            collectors: d
                .collectors
                .into_iter()
                .map(|c| pb::CollectorStatus { name: c.name, healthy: c.healthy, error: c.error })
                .collect(),
        }
    }
}

impl From<GpuSample> for pb::GpuSample {
    fn from(g: GpuSample) -> Self {
        pb::GpuSample {
            index: g.index,
            uuid: g.uuid,
            utilization_ratio: g.utilization_ratio,
            memory_utilization_ratio: g.memory_utilization_ratio,
            memory_used_bytes: g.memory_used_bytes,
            memory_total_bytes: g.memory_total_bytes,
            temperature_celsius: g.temperature_celsius,
            power_watts: g.power_watts,
            power_limit_watts: g.power_limit_watts,
            sm_clock_mhz: g.sm_clock_mhz,
            memory_clock_mhz: g.memory_clock_mhz,
            memory_reserved_bytes: g.memory_reserved_bytes,
            memory_temperature_celsius: g.memory_temperature_celsius,
            energy_joules_total: g.energy_joules_total,
            clock_event_reasons: g.clock_event_reasons,
            pcie_rx_bytes_per_second: g.pcie_rx_bytes_per_second,
            pcie_tx_bytes_per_second: g.pcie_tx_bytes_per_second,
            pcie_replay_total: g.pcie_replay_total,
            ecc_corrected_volatile_total: g.ecc_corrected_volatile_total,
            ecc_uncorrected_volatile_total: g.ecc_uncorrected_volatile_total,
            ecc_corrected_aggregate_total: g.ecc_corrected_aggregate_total,
            ecc_uncorrected_aggregate_total: g.ecc_uncorrected_aggregate_total,
            remapped_rows_correctable: g.remapped_rows_correctable,
            remapped_rows_uncorrectable: g.remapped_rows_uncorrectable,
            remapped_rows_pending: g.remapped_rows_pending,
            remapped_rows_failed: g.remapped_rows_failed,
            retired_pages_single_bit: g.retired_pages_single_bit,
            retired_pages_double_bit: g.retired_pages_double_bit,
            xid_events: g.xid_events.into_iter().map(|x| pb::XidCount { code: x.code, count: x.count }).collect(),
            processes: g
                .processes
                .into_iter()
                .map(|p| pb::GpuProcess { pid: p.pid, name: p.name, used_memory_bytes: p.used_memory_bytes })
                .collect(),
        }
    }
}

impl From<HostSample> for pb::HostSample {
    fn from(h: HostSample) -> Self {
        pb::HostSample {
            cpu_utilization_ratio: h.cpu_utilization_ratio,
            load1: h.load1,
            load5: h.load5,
            load15: h.load15,
            memory_total_bytes: h.memory_total_bytes,
            memory_available_bytes: h.memory_available_bytes,
            swap_total_bytes: h.swap_total_bytes,
            swap_used_bytes: h.swap_used_bytes,
            filesystems: h
                .filesystems
                .into_iter()
                .map(|f| pb::FilesystemSample {
                    mount_point: f.mount_point,
                    device: f.device,
                    fs_type: f.fs_type,
                    size_bytes: f.size_bytes,
                    avail_bytes: f.avail_bytes,
                })
                .collect(),
            networks: h
                .networks
                .into_iter()
                .map(|n| pb::NetworkSample {
                    interface: n.interface,
                    receive_bytes_total: n.receive_bytes_total,
                    transmit_bytes_total: n.transmit_bytes_total,
                })
                .collect(),
        }
    }
}

impl From<NodeState> for pb::NodeState {
    fn from(s: NodeState) -> Self {
        match s {
            NodeState::Up => pb::NodeState::Up,
            NodeState::Degraded => pb::NodeState::Degraded,
            NodeState::Cordoned => pb::NodeState::Cordoned,
            NodeState::Draining => pb::NodeState::Draining,
            NodeState::Down => pb::NodeState::Down,
            NodeState::Revoked => pb::NodeState::Revoked,
        }
    }
}

impl TryFrom<pb::NodeState> for NodeState {
    type Error = WireError;
    fn try_from(s: pb::NodeState) -> Result<Self, WireError> {
        Ok(match s {
            pb::NodeState::Up => NodeState::Up,
            pb::NodeState::Degraded => NodeState::Degraded,
            pb::NodeState::Cordoned => NodeState::Cordoned,
            pb::NodeState::Draining => NodeState::Draining,
            pb::NodeState::Down => NodeState::Down,
            pb::NodeState::Revoked => NodeState::Revoked,
            pb::NodeState::Unspecified => return Err(err("state", "unspecified node state")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> TelemetryBatch {
        TelemetryBatch {
            seq: 7,
            created_unix_ms: 1_700_000_000_000,
            gpus: vec![GpuSample {
                index: 0,
                uuid: "GPU-1".into(),
                utilization_ratio: Some(0.5),
                memory_used_bytes: Some(1),
                memory_total_bytes: Some(2),
                temperature_celsius: Some(60.0),
                ..Default::default()
            }],
            host: Some(HostSample { cpu_utilization_ratio: 0.2, ..Default::default() }),
            samples: vec![Sample { name: "x_total".into(), labels: BTreeMap::new(), value: 1.0 }],
            collectors: vec![CollectorStatus { name: "gpu".into(), healthy: true, error: String::new() }],
        }
    }

    #[test]
    fn batch_round_trips() {
        let b = batch();
        assert_eq!(TelemetryBatch::try_from(pb::TelemetryBatch::from(b.clone())).unwrap(), b);
    }

    #[test]
    fn invalid_batches_are_refused_with_the_field() {
        let mut w = pb::TelemetryBatch::from(batch());
        w.seq = 0;
        assert_eq!(TelemetryBatch::try_from(w).unwrap_err().field, "telemetry.seq");

        let mut w = pb::TelemetryBatch::from(batch());
        w.gpus[0].utilization_ratio = Some(f64::NAN);
        assert!(TelemetryBatch::try_from(w).unwrap_err().field.contains("utilization_ratio"));

        let mut w = pb::TelemetryBatch::from(batch());
        w.gpus.push(w.gpus[0].clone());
        assert!(TelemetryBatch::try_from(w).unwrap_err().problem.contains("twice"));

        let mut w = pb::TelemetryBatch::from(batch());
        w.gpus = vec![pb::GpuSample::default(); 65];
        assert!(TelemetryBatch::try_from(w).is_err());

        let mut w = pb::TelemetryBatch::from(batch());
        w.samples[0].name = "bad name".into();
        assert!(TelemetryBatch::try_from(w).is_err());
    }

    #[test]
    fn the_gateway_role_round_trips_and_is_checked() {
        let with = Inventory {
            hostname: "gw".into(),
            gateway: Some(GatewayInfo { nginx_version: "nginx/1.22.1".into() }),
            ..Default::default()
        };
        assert_eq!(Inventory::try_from(pb::Inventory::from(with.clone())).unwrap(), with);
        let without = Inventory { hostname: "gpu".into(), ..Default::default() };
        let wire = pb::Inventory::from(without.clone());
        assert_eq!(wire.gateway, None, "no role, no message");
        assert_eq!(Inventory::try_from(wire).unwrap(), without);
        let mut bad = pb::Inventory::from(with);
        bad.gateway = Some(pb::GatewayInfo { nginx_version: "x\ny".into() });
        assert_eq!(Inventory::try_from(bad).unwrap_err().field, "inventory.gateway.nginx_version");
    }
}
