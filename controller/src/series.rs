//! The series view of a telemetry batch: every value a batch carries, named and
//! labelled as Prometheus sees it on the controller's `/metrics`. The exporter,
//! the rollups and `QueryMetrics` all read batches through [`batch_metrics`], so a
//! name or a label means the same thing in each of them.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_common::NodeId;
use flotilla_common::model::{CLOCK_EVENT_REASONS, GpuSample, HostSample, Inventory, Sample, TelemetryBatch};
use serde::{Deserialize, Serialize};

/// Label pairs in exposition order (`node` first, as written on `/metrics`).
pub type Labels = Vec<(String, String)>;

/// How a series behaves over time, which decides how it is rolled up and stepped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Goes up and down: summarised by min, max and mean.
    Gauge,
    /// Only grows (until a reset): summarised by its last value.
    Counter,
}

/// One metric of a batch with its type, as the exporter writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub help: &'static str,
    pub labels: Labels,
    pub value: Value,
}

/// The value of a [`Metric`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Gauge(f64),
    Counter(f64),
    Histogram(Histogram),
}

/// A histogram as the exposition writes it: finite buckets in order (the `+Inf`
/// bucket is `count`), cumulative counts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// One flat series value: what Prometheus stores after scraping a [`Metric`]
/// (a histogram becomes its `_bucket`, `_sum` and `_count` series).
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesSample {
    pub name: String,
    pub labels: Labels,
    pub kind: Kind,
    pub value: f64,
}

impl Metric {
    /// A gauge.
    pub fn gauge(name: &str, help: &'static str, labels: Labels, value: f64) -> Self {
        Self { name: name.to_owned(), help, labels, value: Value::Gauge(value) }
    }

    /// A counter.
    pub fn counter(name: &str, help: &'static str, labels: Labels, value: f64) -> Self {
        Self { name: name.to_owned(), help, labels, value: Value::Counter(value) }
    }

    /// The flat series Prometheus makes of this metric, in exposition order.
    pub fn flatten(self, out: &mut Vec<SeriesSample>) {
        let Metric { name, labels, value, .. } = self;
        match value {
            Value::Gauge(v) => out.push(SeriesSample { name, labels, kind: Kind::Gauge, value: v }),
            Value::Counter(v) => out.push(SeriesSample { name, labels, kind: Kind::Counter, value: v }),
            Value::Histogram(h) => {
                // The text encoder formats `le` with `f64::to_string` and adds the
                // `+Inf` bucket from the count; do the same so names match.
                let bounds = h.buckets.iter().map(|(le, c)| (le.to_string(), *c)).chain([("+Inf".to_owned(), h.count)]);
                for (le, c) in bounds {
                    out.push(SeriesSample {
                        name: format!("{name}_bucket"),
                        labels: with(&labels, [("le", le)]),
                        kind: Kind::Counter,
                        value: c as f64,
                    });
                }
                out.push(SeriesSample {
                    name: format!("{name}_sum"),
                    labels: labels.clone(),
                    kind: Kind::Counter,
                    value: h.sum,
                });
                out.push(SeriesSample {
                    name: format!("{name}_count"),
                    labels,
                    kind: Kind::Counter,
                    value: h.count as f64,
                });
            }
        }
    }
}

/// Every metric `batch` carries for `node`: GPU series (labelled with the model
/// from `inventory`), host series and the agent's named samples.
pub fn batch_metrics(node: &NodeId, inventory: &Inventory, batch: &TelemetryBatch) -> Vec<Metric> {
    let mut out = Vec::with_capacity(batch.gpus.len() * 32 + batch.samples.len() + 16);
    for gpu in &batch.gpus {
        let model = inventory.gpus.iter().find(|g| g.index == gpu.index).map(|g| g.model.clone());
        gpu_metrics(&mut out, node, gpu, model.unwrap_or_default());
    }
    let n: Labels = vec![("node".into(), node.to_string())];
    if let Some(host) = &batch.host {
        host_metrics(&mut out, &n, host);
    }
    generic_metrics(&mut out, &n, &batch.samples);
    out
}

/// [`batch_metrics`] flattened into the series Prometheus would store.
pub fn batch_samples(node: &NodeId, inventory: &Inventory, batch: &TelemetryBatch) -> Vec<SeriesSample> {
    let mut out = Vec::new();
    for m in batch_metrics(node, inventory, batch) {
        m.flatten(&mut out);
    }
    out
}

/// `labels` plus `extra`.
fn with<const N: usize>(labels: &Labels, extra: [(&str, String); N]) -> Labels {
    let mut l = labels.clone();
    l.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
    l
}

fn gpu_metrics(out: &mut Vec<Metric>, node: &NodeId, g: &GpuSample, model: String) {
    let l: Labels = vec![
        ("node".into(), node.to_string()),
        ("gpu".into(), g.index.to_string()),
        ("uuid".into(), g.uuid.clone()),
        ("model".into(), model),
    ];
    let gauges: [(&str, &'static str, Option<f64>); 13] = [
        ("flotilla_gpu_utilization_ratio", "GPU (SM) utilisation, 0-1.", g.utilization_ratio),
        ("flotilla_gpu_memory_utilization_ratio", "Memory controller utilisation, 0-1.", g.memory_utilization_ratio),
        ("flotilla_gpu_memory_used_bytes", "GPU memory in use.", g.memory_used_bytes.map(|v| v as f64)),
        ("flotilla_gpu_memory_total_bytes", "GPU memory installed.", g.memory_total_bytes.map(|v| v as f64)),
        (
            "flotilla_gpu_memory_reserved_bytes",
            "GPU memory reserved by the driver.",
            g.memory_reserved_bytes.map(|v| v as f64),
        ),
        ("flotilla_gpu_temperature_celsius", "GPU core temperature.", g.temperature_celsius),
        ("flotilla_gpu_memory_temperature_celsius", "GPU memory (HBM) temperature.", g.memory_temperature_celsius),
        ("flotilla_gpu_power_watts", "Power draw.", g.power_watts),
        ("flotilla_gpu_power_limit_watts", "Enforced power limit.", g.power_limit_watts),
        ("flotilla_gpu_sm_clock_hertz", "SM clock.", g.sm_clock_mhz.map(|v| f64::from(v) * 1e6)),
        ("flotilla_gpu_memory_clock_hertz", "Memory clock.", g.memory_clock_mhz.map(|v| f64::from(v) * 1e6)),
        ("flotilla_gpu_pcie_receive_bytes_per_second", "PCIe receive throughput.", g.pcie_rx_bytes_per_second),
        ("flotilla_gpu_pcie_transmit_bytes_per_second", "PCIe transmit throughput.", g.pcie_tx_bytes_per_second),
    ];
    for (name, help, v) in gauges {
        if let Some(v) = v {
            out.push(Metric::gauge(name, help, l.clone(), v));
        }
    }
    if let Some(v) = g.energy_joules_total {
        out.push(Metric::counter(
            "flotilla_gpu_energy_joules_total",
            "Energy used since the driver loaded.",
            l.clone(),
            v,
        ));
    }
    if let Some(v) = g.pcie_replay_total {
        out.push(Metric::counter("flotilla_gpu_pcie_replays_total", "PCIe replay counter.", l.clone(), v as f64));
    }
    if let Some(mask) = g.clock_event_reasons {
        for (bit, reason) in CLOCK_EVENT_REASONS {
            out.push(Metric::gauge(
                "flotilla_gpu_clock_event_active",
                "1 while the clocks are held down for this reason.",
                with(&l, [("reason", reason.to_owned())]),
                bool_value(mask & bit != 0),
            ));
        }
    }
    for (kind, scope, v) in [
        ("corrected", "volatile", g.ecc_corrected_volatile_total),
        ("uncorrected", "volatile", g.ecc_uncorrected_volatile_total),
        ("corrected", "aggregate", g.ecc_corrected_aggregate_total),
        ("uncorrected", "aggregate", g.ecc_uncorrected_aggregate_total),
    ] {
        if let Some(v) = v {
            out.push(Metric::counter(
                "flotilla_gpu_ecc_errors_total",
                "ECC errors (volatile: since the last reset).",
                with(&l, [("type", kind.to_owned()), ("scope", scope.to_owned())]),
                v as f64,
            ));
        }
    }
    for (kind, v) in [("correctable", g.remapped_rows_correctable), ("uncorrectable", g.remapped_rows_uncorrectable)] {
        if let Some(v) = v {
            out.push(Metric::counter(
                "flotilla_gpu_remapped_rows_total",
                "Rows remapped because of memory errors.",
                with(&l, [("type", kind.to_owned())]),
                v as f64,
            ));
        }
    }
    if let Some(v) = g.remapped_rows_pending {
        out.push(Metric::gauge(
            "flotilla_gpu_remapped_rows_pending",
            "1 when a remap waits for a GPU reset.",
            l.clone(),
            bool_value(v),
        ));
    }
    if let Some(v) = g.remapped_rows_failed {
        out.push(Metric::gauge(
            "flotilla_gpu_remapped_rows_failed",
            "1 when a row remap failed (the GPU needs service).",
            l.clone(),
            bool_value(v),
        ));
    }
    for (cause, v) in [("single_bit", g.retired_pages_single_bit), ("double_bit", g.retired_pages_double_bit)] {
        if let Some(v) = v {
            out.push(Metric::counter(
                "flotilla_gpu_retired_pages_total",
                "Memory pages retired.",
                with(&l, [("cause", cause.to_owned())]),
                v as f64,
            ));
        }
    }
    for x in &g.xid_events {
        out.push(Metric::counter(
            "flotilla_gpu_xid_errors_total",
            "XID errors seen since the agent started.",
            with(&l, [("xid", x.code.to_string())]),
            x.count as f64,
        ));
    }
    for p in &g.processes {
        if let Some(used) = p.used_memory_bytes {
            out.push(Metric::gauge(
                "flotilla_gpu_process_memory_used_bytes",
                "GPU memory used by one process.",
                with(&l, [("pid", p.pid.to_string()), ("process", p.name.clone())]),
                used as f64,
            ));
        }
    }
}

fn bool_value(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

fn host_metrics(out: &mut Vec<Metric>, n: &Labels, h: &HostSample) {
    let gauges: [(&str, &'static str, f64); 8] = [
        ("flotilla_node_cpu_utilization_ratio", "CPU utilisation over all cores, 0-1.", h.cpu_utilization_ratio),
        ("flotilla_node_load1", "1-minute load average.", h.load1),
        ("flotilla_node_load5", "5-minute load average.", h.load5),
        ("flotilla_node_load15", "15-minute load average.", h.load15),
        ("flotilla_node_memory_total_bytes", "Physical memory.", h.memory_total_bytes as f64),
        ("flotilla_node_memory_available_bytes", "Memory available for new work.", h.memory_available_bytes as f64),
        ("flotilla_node_swap_total_bytes", "Swap space.", h.swap_total_bytes as f64),
        ("flotilla_node_swap_used_bytes", "Swap in use.", h.swap_used_bytes as f64),
    ];
    for (name, help, v) in gauges {
        out.push(Metric::gauge(name, help, n.clone(), v));
    }
    for fs in &h.filesystems {
        let l = with(
            n,
            [("mountpoint", fs.mount_point.clone()), ("device", fs.device.clone()), ("fstype", fs.fs_type.clone())],
        );
        out.push(Metric::gauge(
            "flotilla_node_filesystem_size_bytes",
            "Filesystem size.",
            l.clone(),
            fs.size_bytes as f64,
        ));
        out.push(Metric::gauge(
            "flotilla_node_filesystem_avail_bytes",
            "Filesystem space available to users.",
            l,
            fs.avail_bytes as f64,
        ));
    }
    for net in &h.networks {
        let l = with(n, [("interface", net.interface.clone())]);
        out.push(Metric::counter(
            "flotilla_node_network_receive_bytes_total",
            "Bytes received.",
            l.clone(),
            net.receive_bytes_total as f64,
        ));
        out.push(Metric::counter(
            "flotilla_node_network_transmit_bytes_total",
            "Bytes sent.",
            l,
            net.transmit_bytes_total as f64,
        ));
    }
}

/// The label names a series of metric `name` carries, when Flotilla makes that
/// metric itself (`None` for anything else, such as an agent's generic samples).
/// The alert engine checks rule templates against it: a template that reads a
/// label the series can never have is refused when the rules load.
pub fn label_names(name: &str) -> Option<Vec<String>> {
    let gpu = ["node", "gpu", "uuid", "model"];
    let extra: &[&str] = match name {
        "flotilla_gpu_clock_event_active" => &["reason"],
        "flotilla_gpu_ecc_errors_total" => &["type", "scope"],
        "flotilla_gpu_remapped_rows_total" => &["type"],
        "flotilla_gpu_retired_pages_total" => &["cause"],
        "flotilla_gpu_xid_errors_total" => &["xid"],
        "flotilla_gpu_process_memory_used_bytes" => &["pid", "process"],
        _ => &[],
    };
    let names: Vec<&str> = if name.starts_with("flotilla_gpu_") {
        gpu.iter().chain(extra).copied().collect()
    } else if name == "flotilla_node_filesystem_size_bytes" || name == "flotilla_node_filesystem_avail_bytes" {
        vec!["node", "mountpoint", "device", "fstype"]
    } else if name.starts_with("flotilla_node_network_") {
        vec!["node", "interface"]
    } else if name == "flotilla_node_state" {
        vec!["node", "state"]
    } else if name == "flotilla_node_info" {
        vec!["node", "hostname", "os", "agent_version", "gpu_source", "driver_version"]
    } else if name == "flotilla_agent_up"
        || (name.starts_with("flotilla_node_")
            && !name.starts_with("flotilla_node_disk_")
            && !name.starts_with("flotilla_node_model_dir_"))
    {
        vec!["node"]
    } else if matches!(name, "flotilla_inference_up" | "flotilla_inference_ready" | "flotilla_inference_live") {
        vec!["node", "endpoint"]
    } else if name == "flotilla_inference_expected_series_missing" {
        vec!["node", "endpoint", "engine", "series"]
    } else if let Some(rest) = name.strip_prefix("flotilla_inference_") {
        // Mapped engine series: `model` only where the engine names it.
        let mut v = vec!["node", "endpoint", "engine", "model"];
        if rest.ends_with("_bucket") {
            v.push("le");
        }
        v
    } else {
        return None;
    };
    Some(names.into_iter().map(str::to_owned).collect())
}

/// The parts of one generic histogram before they are checked.
#[derive(Debug, Default)]
struct HistogramParts {
    buckets: Vec<(f64, f64)>,
    inf: Option<f64>,
    sum: Option<f64>,
    count: Option<f64>,
}

fn to_count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 { v as u64 } else { 0 }
}

const GENERIC_HELP: &str = "Reported by the agent.";

/// Names the controller itself produces from typed data: a named sample may not
/// use them, or one agent could put a second, conflicting series under a typed
/// name and break the fleet scrape for everyone. The agent's own named host
/// series (`flotilla_node_disk_*`, `flotilla_node_model_dir_*`) stay allowed.
fn reserved(name: &str) -> bool {
    let allowed_node = ["flotilla_node_disk_", "flotilla_node_model_dir_"];
    name.starts_with("flotilla_gpu_")
        || name.starts_with("flotilla_controller_")
        || name == "flotilla_agent_up"
        || (name.starts_with("flotilla_node_") && !allowed_node.iter().any(|p| name.starts_with(p)))
}

/// Re-exports named samples (inference servers, agent internals). Their type is
/// inferred from Prometheus naming: `_bucket{le}` + `_sum` + `_count` make a
/// histogram, `_total` a counter, anything else a gauge.
fn generic_metrics(out: &mut Vec<Metric>, n: &Labels, samples: &[Sample]) {
    let histogram_bases: BTreeSet<&str> =
        samples.iter().filter(|s| s.labels.contains_key("le")).filter_map(|s| s.name.strip_suffix("_bucket")).collect();
    let mut histograms: BTreeMap<(String, Labels), HistogramParts> = BTreeMap::new();
    for s in samples.iter().filter(|s| !reserved(&s.name)) {
        let mut labels: Labels = n.clone();
        labels.extend(
            s.labels
                .iter()
                .filter(|(k, _)| k.as_str() != "le" && k.as_str() != "node")
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let part = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            s.name.strip_suffix(suffix).filter(|b| histogram_bases.contains(b)).map(|b| (b, *suffix))
        });
        match part {
            Some((base, suffix)) => {
                let h = histograms.entry((base.to_owned(), labels)).or_default();
                match suffix {
                    "_sum" => h.sum = Some(s.value),
                    "_count" => h.count = Some(s.value),
                    _ => match s.labels.get("le").map(|le| le.parse::<f64>()) {
                        Some(Ok(le)) if le.is_infinite() => h.inf = Some(s.value),
                        Some(Ok(le)) => h.buckets.push((le, s.value)),
                        _ => {}
                    },
                }
            }
            None if s.name.ends_with("_total") => out.push(Metric::counter(&s.name, GENERIC_HELP, labels, s.value)),
            None => out.push(Metric::gauge(&s.name, GENERIC_HELP, labels, s.value)),
        }
    }
    for ((base, labels), mut parts) in histograms {
        parts.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let histogram = Histogram {
            buckets: parts.buckets.iter().map(|(le, c)| (*le, to_count(*c))).collect(),
            sum: parts.sum.unwrap_or(0.0),
            count: to_count(parts.count.or(parts.inf).unwrap_or(0.0)),
        };
        out.push(Metric { name: base, help: GENERIC_HELP, labels, value: Value::Histogram(histogram) });
    }
}

#[cfg(test)]
mod tests {
    use flotilla_common::model::{GpuInfo, XidCount};

    use super::*;

    fn find<'a>(samples: &'a [SeriesSample], name: &str, label: (&str, &str)) -> Option<&'a SeriesSample> {
        samples.iter().find(|s| s.name == name && s.labels.iter().any(|(k, v)| k == label.0 && v == label.1))
    }

    #[test]
    fn gpu_series_carry_node_gpu_uuid_and_model_labels() {
        let node = NodeId::new("n1").unwrap();
        let inventory = Inventory {
            gpus: vec![GpuInfo { index: 0, uuid: "GPU-0".into(), model: "H100".into(), memory_total_bytes: 1 }],
            ..Default::default()
        };
        let batch = TelemetryBatch {
            seq: 1,
            created_unix_ms: 1,
            gpus: vec![GpuSample {
                index: 0,
                uuid: "GPU-0".into(),
                temperature_celsius: Some(61.0),
                sm_clock_mhz: Some(1500),
                clock_event_reasons: Some(0x20),
                xid_events: vec![XidCount { code: 48, count: 2 }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = batch_samples(&node, &inventory, &batch);
        let temp = find(&s, "flotilla_gpu_temperature_celsius", ("gpu", "0")).unwrap();
        assert_eq!(
            temp.labels,
            [("node", "n1"), ("gpu", "0"), ("uuid", "GPU-0"), ("model", "H100")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!((temp.kind, temp.value), (Kind::Gauge, 61.0));
        assert_eq!(find(&s, "flotilla_gpu_sm_clock_hertz", ("gpu", "0")).unwrap().value, 1.5e9);
        assert_eq!(find(&s, "flotilla_gpu_clock_event_active", ("reason", "sw_thermal_slowdown")).unwrap().value, 1.0);
        assert_eq!(find(&s, "flotilla_gpu_clock_event_active", ("reason", "gpu_idle")).unwrap().value, 0.0);
        let xid = find(&s, "flotilla_gpu_xid_errors_total", ("xid", "48")).unwrap();
        assert_eq!((xid.kind, xid.value), (Kind::Counter, 2.0));
    }

    #[test]
    fn named_samples_cannot_shadow_typed_series() {
        let node = NodeId::new("n").unwrap();
        let batch = TelemetryBatch {
            seq: 1,
            created_unix_ms: 1,
            samples: vec![
                Sample { name: "flotilla_gpu_temperature_celsius".into(), ..Default::default() },
                Sample { name: "flotilla_node_load1".into(), ..Default::default() },
                Sample { name: "flotilla_agent_up".into(), ..Default::default() },
                Sample { name: "flotilla_node_disk_read_bytes_total".into(), ..Default::default() },
                Sample { name: "flotilla_inference_up".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        let names: Vec<String> =
            batch_metrics(&node, &Inventory::default(), &batch).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["flotilla_node_disk_read_bytes_total", "flotilla_inference_up"]);
    }
}
