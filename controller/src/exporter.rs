//! The fleet-wide Prometheus exposition: every node's latest GPU, host and
//! generic series with `node`/`gpu`/`uuid`/`model` labels, plus the controller's
//! own metrics — one scrape replaces an exporter per node.

pub mod http;

use std::collections::BTreeMap;

use flotilla_common::model::{CLOCK_EVENT_REASONS, GpuSample, HostSample, Inventory, Sample};
use prometheus::proto::{self, MetricFamily, MetricType};
use tokio::time::Instant;

use crate::fleetview::FleetView;
use crate::metrics::Metrics;
use crate::registry::{Registry, node_state};

/// Everything a scrape needs.
#[derive(Clone)]
pub struct Exporter {
    pub view: FleetView,
    pub registry: Registry,
    pub metrics: Metrics,
    pub missed_heartbeats: u32,
    pub store: std::sync::Arc<dyn crate::store::Store>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

type Labels = Vec<(String, String)>;

/// Metric families under construction, keyed by name so each is written once.
#[derive(Default)]
struct Families {
    map: BTreeMap<String, MetricFamily>,
}

fn label_pairs(labels: &Labels) -> Vec<proto::LabelPair> {
    labels
        .iter()
        .map(|(k, v)| {
            let mut p = proto::LabelPair::default();
            p.set_name(k.clone());
            p.set_value(v.clone());
            p
        })
        .collect()
}

impl Families {
    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut MetricFamily {
        self.map.entry(name.to_owned()).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_owned());
            f.set_help(help.to_owned());
            f.set_field_type(kind);
            f
        })
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &Labels, value: f64) {
        let mut m = proto::Metric::default();
        m.set_label(label_pairs(labels));
        let mut g = proto::Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
        self.family(name, help, MetricType::GAUGE).mut_metric().push(m);
    }

    fn counter(&mut self, name: &str, help: &str, labels: &Labels, value: f64) {
        let mut m = proto::Metric::default();
        m.set_label(label_pairs(labels));
        let mut c = proto::Counter::default();
        c.set_value(value);
        m.set_counter(c);
        self.family(name, help, MetricType::COUNTER).mut_metric().push(m);
    }

    fn histogram(&mut self, name: &str, help: &str, labels: &Labels, h: &HistogramParts) {
        let mut m = proto::Metric::default();
        m.set_label(label_pairs(labels));
        let mut hist = proto::Histogram::default();
        let count = h.count.or(h.inf).unwrap_or(0.0);
        hist.set_sample_count(to_count(count));
        hist.set_sample_sum(h.sum.unwrap_or(0.0));
        hist.set_bucket(
            h.buckets
                .iter()
                .map(|(le, c)| {
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(*le);
                    b.set_cumulative_count(to_count(*c));
                    b
                })
                .collect(),
        );
        m.set_histogram(hist);
        self.family(name, help, MetricType::HISTOGRAM).mut_metric().push(m);
    }

    fn encode(self, out: &mut String) {
        let families: Vec<MetricFamily> = self.map.into_values().filter(|f| !f.get_metric().is_empty()).collect();
        if let Err(error) = prometheus::TextEncoder::new().encode_utf8(&families, out) {
            tracing::warn!(%error, "encoding fleet metrics failed");
        }
    }
}

fn to_count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 { v as u64 } else { 0 }
}

#[derive(Debug, Default)]
struct HistogramParts {
    buckets: Vec<(f64, f64)>,
    inf: Option<f64>,
    sum: Option<f64>,
    count: Option<f64>,
}

impl Exporter {
    /// The full exposition in Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut f = Families::default();
        let now = Instant::now();
        for (node, state) in self.view.snapshot() {
            let session = self.registry.session(&node);
            let (st, _) = node_state(session.as_ref(), state.latest.as_ref(), now, self.missed_heartbeats);
            let n: Labels = vec![("node".into(), node.to_string())];
            let up = if matches!(st, flotilla_common::model::NodeState::Down) { 0.0 } else { 1.0 };
            f.gauge("flotilla_agent_up", "1 when the node's agent is connected and heartbeating.", &n, up);
            for s in [
                flotilla_common::model::NodeState::Up,
                flotilla_common::model::NodeState::Degraded,
                flotilla_common::model::NodeState::Cordoned,
                flotilla_common::model::NodeState::Draining,
                flotilla_common::model::NodeState::Down,
            ] {
                let mut l = n.clone();
                l.push(("state".into(), s.as_str().into()));
                f.gauge("flotilla_node_state", "1 for the node's current state.", &l, if s == st { 1.0 } else { 0.0 });
            }
            node_info(&mut f, &n, &state.inventory);
            if let Some(batch) = &state.latest {
                f.gauge(
                    "flotilla_node_last_sample_timestamp_seconds",
                    "When the agent made its newest stored batch.",
                    &n,
                    batch.created_unix_ms as f64 / 1000.0,
                );
                for gpu in &batch.gpus {
                    let model = state.inventory.gpus.iter().find(|g| g.index == gpu.index).map(|g| g.model.clone());
                    gpu_series(&mut f, &node, gpu, model.unwrap_or_default());
                }
                if let Some(host) = &batch.host {
                    host_series(&mut f, &n, host);
                }
                generic_series(&mut f, &n, &batch.samples);
            }
        }
        self.metrics.agents_connected.set(i64::try_from(self.registry.len()).unwrap_or(i64::MAX));
        self.metrics.store_size_bytes.set(i64::try_from(self.store.size_on_disk()).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(64 * 1024);
        f.encode(&mut out);
        if let Err(error) = prometheus::TextEncoder::new().encode_utf8(&self.metrics.registry.gather(), &mut out) {
            tracing::warn!(%error, "encoding controller metrics failed");
        }
        out
    }
}

fn node_info(f: &mut Families, n: &Labels, inv: &Inventory) {
    let mut l = n.clone();
    l.extend([
        ("hostname".to_owned(), inv.hostname.clone()),
        ("os".to_owned(), inv.os.clone()),
        ("agent_version".to_owned(), inv.agent_version.clone()),
        ("gpu_source".to_owned(), inv.gpu_source.as_str().to_owned()),
        ("driver_version".to_owned(), inv.driver_version.clone()),
    ]);
    f.gauge("flotilla_node_info", "Static facts about the node (value is always 1).", &l, 1.0);
    f.gauge("flotilla_node_gpus", "GPUs in the node's inventory.", n, inv.gpus.len() as f64);
}

fn gpu_series(f: &mut Families, node: &flotilla_common::NodeId, g: &GpuSample, model: String) {
    let l: Labels = vec![
        ("node".into(), node.to_string()),
        ("gpu".into(), g.index.to_string()),
        ("uuid".into(), g.uuid.clone()),
        ("model".into(), model),
    ];
    let gauges: [(&str, &str, Option<f64>); 12] = [
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
    ];
    for (name, help, v) in gauges {
        if let Some(v) = v {
            f.gauge(name, help, &l, v);
        }
    }
    if let Some(v) = g.pcie_tx_bytes_per_second {
        f.gauge("flotilla_gpu_pcie_transmit_bytes_per_second", "PCIe transmit throughput.", &l, v);
    }
    if let Some(v) = g.energy_joules_total {
        f.counter("flotilla_gpu_energy_joules_total", "Energy used since the driver loaded.", &l, v);
    }
    if let Some(v) = g.pcie_replay_total {
        f.counter("flotilla_gpu_pcie_replays_total", "PCIe replay counter.", &l, v as f64);
    }
    if let Some(mask) = g.clock_event_reasons {
        for (bit, reason) in CLOCK_EVENT_REASONS {
            let mut rl = l.clone();
            rl.push(("reason".into(), reason.into()));
            let active = if mask & bit != 0 { 1.0 } else { 0.0 };
            f.gauge(
                "flotilla_gpu_clock_event_active",
                "1 while the clocks are held down for this reason.",
                &rl,
                active,
            );
        }
    }
    for (kind, scope, v) in [
        ("corrected", "volatile", g.ecc_corrected_volatile_total),
        ("uncorrected", "volatile", g.ecc_uncorrected_volatile_total),
        ("corrected", "aggregate", g.ecc_corrected_aggregate_total),
        ("uncorrected", "aggregate", g.ecc_uncorrected_aggregate_total),
    ] {
        if let Some(v) = v {
            let mut el = l.clone();
            el.extend([("type".to_owned(), kind.to_owned()), ("scope".to_owned(), scope.to_owned())]);
            f.counter("flotilla_gpu_ecc_errors_total", "ECC errors (volatile: since the last reset).", &el, v as f64);
        }
    }
    for (kind, v) in [("correctable", g.remapped_rows_correctable), ("uncorrectable", g.remapped_rows_uncorrectable)] {
        if let Some(v) = v {
            let mut rl = l.clone();
            rl.push(("type".into(), kind.into()));
            f.counter("flotilla_gpu_remapped_rows_total", "Rows remapped because of memory errors.", &rl, v as f64);
        }
    }
    if let Some(v) = g.remapped_rows_pending {
        f.gauge("flotilla_gpu_remapped_rows_pending", "1 when a remap waits for a GPU reset.", &l, bool_value(v));
    }
    if let Some(v) = g.remapped_rows_failed {
        f.gauge(
            "flotilla_gpu_remapped_rows_failed",
            "1 when a row remap failed (the GPU needs service).",
            &l,
            bool_value(v),
        );
    }
    for (cause, v) in [("single_bit", g.retired_pages_single_bit), ("double_bit", g.retired_pages_double_bit)] {
        if let Some(v) = v {
            let mut rl = l.clone();
            rl.push(("cause".into(), cause.into()));
            f.counter("flotilla_gpu_retired_pages_total", "Memory pages retired.", &rl, v as f64);
        }
    }
    for x in &g.xid_events {
        let mut xl = l.clone();
        xl.push(("xid".into(), x.code.to_string()));
        f.counter("flotilla_gpu_xid_errors_total", "XID errors seen since the agent started.", &xl, x.count as f64);
    }
    for p in &g.processes {
        if let Some(used) = p.used_memory_bytes {
            let mut pl = l.clone();
            pl.extend([("pid".to_owned(), p.pid.to_string()), ("process".to_owned(), p.name.clone())]);
            f.gauge("flotilla_gpu_process_memory_used_bytes", "GPU memory used by one process.", &pl, used as f64);
        }
    }
}

fn bool_value(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

fn host_series(f: &mut Families, n: &Labels, h: &HostSample) {
    f.gauge("flotilla_node_cpu_utilization_ratio", "CPU utilisation over all cores, 0-1.", n, h.cpu_utilization_ratio);
    f.gauge("flotilla_node_load1", "1-minute load average.", n, h.load1);
    f.gauge("flotilla_node_load5", "5-minute load average.", n, h.load5);
    f.gauge("flotilla_node_load15", "15-minute load average.", n, h.load15);
    f.gauge("flotilla_node_memory_total_bytes", "Physical memory.", n, h.memory_total_bytes as f64);
    f.gauge(
        "flotilla_node_memory_available_bytes",
        "Memory available for new work.",
        n,
        h.memory_available_bytes as f64,
    );
    f.gauge("flotilla_node_swap_total_bytes", "Swap space.", n, h.swap_total_bytes as f64);
    f.gauge("flotilla_node_swap_used_bytes", "Swap in use.", n, h.swap_used_bytes as f64);
    for fs in &h.filesystems {
        let mut l = n.clone();
        l.extend([
            ("mountpoint".to_owned(), fs.mount_point.clone()),
            ("device".to_owned(), fs.device.clone()),
            ("fstype".to_owned(), fs.fs_type.clone()),
        ]);
        f.gauge("flotilla_node_filesystem_size_bytes", "Filesystem size.", &l, fs.size_bytes as f64);
        f.gauge(
            "flotilla_node_filesystem_avail_bytes",
            "Filesystem space available to users.",
            &l,
            fs.avail_bytes as f64,
        );
    }
    for net in &h.networks {
        let mut l = n.clone();
        l.push(("interface".into(), net.interface.clone()));
        f.counter("flotilla_node_network_receive_bytes_total", "Bytes received.", &l, net.receive_bytes_total as f64);
        f.counter("flotilla_node_network_transmit_bytes_total", "Bytes sent.", &l, net.transmit_bytes_total as f64);
    }
}

/// Re-exports named samples (inference servers, agent internals). Their type is
/// inferred from Prometheus naming: `_bucket{le}` + `_sum` + `_count` make a
/// histogram, `_total` a counter, anything else a gauge.
fn generic_series(f: &mut Families, n: &Labels, samples: &[Sample]) {
    let histogram_bases: std::collections::BTreeSet<&str> =
        samples.iter().filter(|s| s.labels.contains_key("le")).filter_map(|s| s.name.strip_suffix("_bucket")).collect();
    let mut histograms: BTreeMap<(String, Labels), HistogramParts> = BTreeMap::new();
    for s in samples {
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
            None if s.name.ends_with("_total") => f.counter(&s.name, "Reported by the agent.", &labels, s.value),
            None => f.gauge(&s.name, "Reported by the agent.", &labels, s.value),
        }
    }
    for ((base, labels), mut parts) in histograms {
        parts.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        f.histogram(&base, "Reported by the agent.", &labels, &parts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_histograms_are_reassembled() {
        let mut f = Families::default();
        let s = |name: &str, le: Option<&str>, v: f64| Sample {
            name: name.into(),
            labels: le.map(|le| [("le".to_owned(), le.to_owned())].into_iter().collect()).unwrap_or_default(),
            value: v,
        };
        generic_series(
            &mut f,
            &vec![("node".into(), "n".into())],
            &[
                s("x_seconds_bucket", Some("0.1"), 1.0),
                s("x_seconds_bucket", Some("1"), 3.0),
                s("x_seconds_bucket", Some("+Inf"), 4.0),
                s("x_seconds_sum", None, 2.5),
                s("x_seconds_count", None, 4.0),
                s("y_total", None, 7.0),
                s("z", None, 0.5),
            ],
        );
        let mut out = String::new();
        f.encode(&mut out);
        assert!(out.contains("# TYPE x_seconds histogram"), "{out}");
        assert!(out.contains("x_seconds_bucket{node=\"n\",le=\"1\"} 3"), "{out}");
        assert!(out.contains("x_seconds_bucket{node=\"n\",le=\"+Inf\"} 4"), "{out}");
        assert!(out.contains("# TYPE y_total counter"));
        assert!(out.contains("# TYPE z gauge"));
    }
}
