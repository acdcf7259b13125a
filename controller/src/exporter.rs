//! The fleet-wide Prometheus exposition: every node's latest GPU, host and
//! generic series with `node`/`gpu`/`uuid`/`model` labels, plus the controller's
//! own metrics — one scrape replaces an exporter per node.

pub mod http;

use std::collections::BTreeMap;

use flotilla_common::model::{Inventory, NodeState};
use prometheus::proto::{self, MetricFamily, MetricType};
use tokio::time::Instant;

use crate::fleetview::FleetView;
use crate::metrics::Metrics;
use crate::registry::{Registry, node_state};
use crate::series::{Labels, Metric, Value, batch_metrics};

/// Everything a scrape needs.
#[derive(Clone)]
pub struct Exporter {
    pub view: FleetView,
    pub registry: Registry,
    pub metrics: Metrics,
    pub missed_heartbeats: u32,
    pub store: std::sync::Arc<dyn crate::store::Store>,
    /// While it is in its restart grace, a node not yet reconnected has no
    /// `flotilla_agent_up` (rather than 0), so that an AgentDown rule run by an
    /// outside Prometheus does not fire for every node after a restart.
    pub alerts: Option<crate::alert::engine::Engine>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

/// Metric families under construction, keyed by name so each is written once.
#[derive(Default)]
struct Families {
    map: BTreeMap<String, MetricFamily>,
}

fn label_pairs(labels: Labels) -> Vec<proto::LabelPair> {
    labels
        .into_iter()
        .map(|(k, v)| {
            let mut p = proto::LabelPair::default();
            p.set_name(k);
            p.set_value(v);
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

    fn push(&mut self, metric: Metric) {
        let Metric { name, help, labels, value } = metric;
        let mut m = proto::Metric::default();
        m.set_label(label_pairs(labels));
        let kind = match value {
            Value::Gauge(v) => {
                let mut g = proto::Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
                MetricType::GAUGE
            }
            Value::Counter(v) => {
                let mut c = proto::Counter::default();
                c.set_value(v);
                m.set_counter(c);
                MetricType::COUNTER
            }
            Value::Histogram(h) => {
                let mut hist = proto::Histogram::default();
                hist.set_sample_count(h.count);
                hist.set_sample_sum(h.sum);
                hist.set_bucket(
                    h.buckets
                        .iter()
                        .map(|(le, c)| {
                            let mut b = proto::Bucket::default();
                            b.set_upper_bound(*le);
                            b.set_cumulative_count(*c);
                            b
                        })
                        .collect(),
                );
                m.set_histogram(hist);
                MetricType::HISTOGRAM
            }
        };
        self.family(&name, help, kind).mut_metric().push(m);
    }

    fn encode(self, out: &mut String) {
        let families: Vec<MetricFamily> = self.map.into_values().filter(|f| !f.get_metric().is_empty()).collect();
        if let Err(error) = prometheus::TextEncoder::new().encode_utf8(&families, out) {
            tracing::warn!(%error, "encoding fleet metrics failed");
        }
    }
}

impl Exporter {
    /// The full exposition in Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut f = Families::default();
        let now = Instant::now();
        for (node, state) in self.view.snapshot() {
            let session = self.registry.session(&node);
            let (st, _) = node_state(session.as_ref(), state.latest.as_deref(), now, self.missed_heartbeats);
            let n: Labels = vec![("node".into(), node.to_string())];
            let up = if matches!(st, NodeState::Down) { 0.0 } else { 1.0 };
            let awaited = session.is_none() && self.alerts.as_ref().is_some_and(|a| a.in_restart_grace());
            if !awaited {
                f.push(Metric::gauge(
                    "flotilla_agent_up",
                    "1 when the node's agent is connected and heartbeating.",
                    n.clone(),
                    up,
                ));
            }
            for s in [NodeState::Up, NodeState::Degraded, NodeState::Cordoned, NodeState::Draining, NodeState::Down] {
                let mut l = n.clone();
                l.push(("state".into(), s.as_str().into()));
                let value = if s == st { 1.0 } else { 0.0 };
                f.push(Metric::gauge("flotilla_node_state", "1 for the node's current state.", l, value));
            }
            node_info(&mut f, &n, &state.inventory);
            if let Some(batch) = &state.latest {
                f.push(Metric::gauge(
                    "flotilla_node_last_sample_timestamp_seconds",
                    "When the agent made its newest stored batch.",
                    n,
                    batch.created_unix_ms as f64 / 1000.0,
                ));
                for metric in batch_metrics(&node, &state.inventory, batch) {
                    f.push(metric);
                }
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
    f.push(Metric::gauge("flotilla_node_info", "Static facts about the node (value is always 1).", l, 1.0));
    f.push(Metric::gauge("flotilla_node_gpus", "GPUs in the node's inventory.", n.clone(), inv.gpus.len() as f64));
}

#[cfg(test)]
mod tests {
    use flotilla_common::NodeId;
    use flotilla_common::model::{Sample, TelemetryBatch};

    use super::*;

    #[test]
    fn generic_histograms_are_reassembled() {
        let s = |name: &str, le: Option<&str>, v: f64| Sample {
            name: name.into(),
            labels: le.map(|le| [("le".to_owned(), le.to_owned())].into_iter().collect()).unwrap_or_default(),
            value: v,
        };
        let batch = TelemetryBatch {
            samples: vec![
                s("x_seconds_bucket", Some("0.1"), 1.0),
                s("x_seconds_bucket", Some("1.0"), 3.0),
                s("x_seconds_bucket", Some("+Inf"), 4.0),
                s("x_seconds_sum", None, 2.5),
                s("x_seconds_count", None, 4.0),
                s("y_total", None, 7.0),
                s("z", None, 0.5),
            ],
            ..Default::default()
        };
        let mut f = Families::default();
        for m in batch_metrics(&NodeId::new("n").unwrap(), &Inventory::default(), &batch) {
            f.push(m);
        }
        let mut out = String::new();
        f.encode(&mut out);
        assert!(out.contains("# TYPE x_seconds histogram"), "{out}");
        assert!(out.contains("x_seconds_bucket{node=\"n\",le=\"1\"} 3"), "{out}");
        assert!(out.contains("x_seconds_bucket{node=\"n\",le=\"+Inf\"} 4"), "{out}");
        assert!(out.contains("# TYPE y_total counter"));
        assert!(out.contains("# TYPE z gauge"));
    }

    /// The query path's flat series must be exactly what a scrape of the same
    /// batch yields, line for line.
    #[test]
    fn flat_series_are_the_exposition_lines() {
        use flotilla_common::model::{
            FilesystemSample, GpuInfo, GpuProcess, GpuSample, HostSample, NetworkSample, XidCount,
        };
        let node = NodeId::new("n").unwrap();
        let inventory = Inventory {
            gpus: vec![GpuInfo { index: 0, uuid: "GPU-0".into(), model: "H\"100\\x".into(), memory_total_bytes: 9 }],
            ..Default::default()
        };
        let label = |k: &str, v: &str| [(k.to_owned(), v.to_owned())].into_iter().collect();
        let batch = TelemetryBatch {
            gpus: vec![GpuSample {
                index: 0,
                uuid: "GPU-0".into(),
                temperature_celsius: Some(61.5),
                energy_joules_total: Some(12.25),
                clock_event_reasons: Some(0x41),
                ecc_uncorrected_volatile_total: Some(1),
                remapped_rows_pending: Some(true),
                xid_events: vec![XidCount { code: 48, count: 1 }],
                processes: vec![GpuProcess { pid: 7, name: "python".into(), used_memory_bytes: Some(3) }],
                ..Default::default()
            }],
            host: Some(HostSample {
                load1: 0.5,
                filesystems: vec![FilesystemSample { mount_point: "/".into(), size_bytes: 10, ..Default::default() }],
                networks: vec![NetworkSample {
                    interface: "eth0".into(),
                    receive_bytes_total: 5,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            samples: vec![
                Sample { name: "t_seconds_bucket".into(), labels: label("le", "0.25"), value: 2.0 },
                Sample { name: "t_seconds_bucket".into(), labels: label("le", "+Inf"), value: 3.0 },
                Sample { name: "t_seconds_sum".into(), labels: Default::default(), value: 0.5 },
                Sample { name: "q".into(), labels: label("model", "a\nb"), value: 1.0 },
            ],
            ..Default::default()
        };
        let mut f = Families::default();
        for m in batch_metrics(&node, &inventory, &batch) {
            f.push(m);
        }
        let mut text = String::new();
        f.encode(&mut text);
        let mut exposed: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        let escape = |v: &str| v.replace('\\', "\\\\").replace('\n', "\\n").replace('"', "\\\"");
        let mut flat: Vec<String> = crate::series::batch_samples(&node, &inventory, &batch)
            .into_iter()
            .map(|s| {
                let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
                format!("{}{{{}}} {}", s.name, labels.join(","), s.value)
            })
            .collect();
        exposed.sort_unstable();
        flat.sort_unstable();
        assert_eq!(flat, exposed);
    }
}
