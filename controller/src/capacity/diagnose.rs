//! The seed's troubleshooting guide as a function: a node's window of batches,
//! its containers and its firing alerts in, findings out, each with the
//! evidence (values and times) and the seed's resolutions ranked for the case.
//! Pure.

use flotilla_common::model::{Container, TelemetryBatch};

use super::measure::{self, NodeWindow};
use super::triggers;

/// What diagnosis reads of one node.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub window: NodeWindow,
    pub connected: bool,
    /// The managed containers as last reported (None: unknown).
    pub containers: Option<Vec<Container>>,
    /// Firing alerts on the node: (alert name, summary).
    pub alerts: Vec<(String, String)>,
    /// Limit to these endpoints (a deployment's replicas); empty: all.
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub what: String,
    pub value: f64,
    pub text: String,
    pub at_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub issue: &'static str,
    pub severity: &'static str,
    pub node: String,
    pub gpu: Option<u32>,
    pub summary: String,
    pub evidence: Vec<Evidence>,
    pub resolutions: Vec<String>,
}

/// Findings (most severe first) and the checks that ran.
pub fn diagnose(n: &NodeFacts) -> (Vec<Finding>, Vec<String>) {
    let node = &n.window.node;
    let mut findings = Vec::new();
    let mut checked = Vec::new();
    if !n.connected {
        findings.push(Finding {
            issue: "node_down",
            severity: "critical",
            node: node.clone(),
            gpu: None,
            summary: format!("{node} is not connected: the data below is its last"),
            evidence: Vec::new(),
            resolutions: vec![
                "Check the agent (systemctl status flotilla-agent) and the network path to the controller".into(),
            ],
        });
    }
    let Some(last) = n.window.batches.last() else {
        checked.push(format!("{node}: no telemetry in the window; nothing to check"));
        return (findings, checked);
    };
    let report = measure::measure(&n.window, 0.0);
    let endpoints: Vec<&measure::EndpointFigures> =
        report.endpoints.iter().filter(|e| n.endpoints.is_empty() || n.endpoints.contains(&e.endpoint)).collect();
    let kv = latest_by_endpoint(last, "flotilla_inference_kv_cache_usage_ratio");
    out_of_memory(n, last, &kv, &mut findings, &mut checked);
    high_latency(n, last, &endpoints, &kv, &mut findings, &mut checked);
    loading(n, last, &mut findings, &mut checked);
    errors(n, &endpoints, &mut findings, &mut checked);
    gpu_faults(n, &mut findings, &mut checked);
    let rank = |s: &str| match s {
        "critical" => 0,
        "warning" => 1,
        _ => 2,
    };
    findings.sort_by_key(|f| rank(f.severity));
    (findings, checked)
}

fn ev(what: &str, value: f64, text: String, at: i64) -> Evidence {
    Evidence { what: what.to_owned(), value, text, at_unix_ms: at }
}

fn latest_by_endpoint(b: &TelemetryBatch, name: &str) -> Vec<(String, f64)> {
    b.samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| s.labels.get("endpoint").map(|e| (e.clone(), s.value)))
        .collect()
}

/// VRAM near full, or filling: the seed's "Out of Memory".
fn out_of_memory(
    n: &NodeFacts,
    last: &TelemetryBatch,
    kv: &[(String, f64)],
    out: &mut Vec<Finding>,
    checked: &mut Vec<String>,
) {
    let node = &n.window.node;
    let mut any = false;
    for g in &last.gpus {
        let (Some(used), Some(total)) = (g.memory_used_bytes, g.memory_total_bytes) else { continue };
        if total == 0 {
            continue;
        }
        let share = used as f64 / total as f64;
        // Growth over the window, per minute, from this GPU's own samples.
        let points: Vec<(i64, f64)> = n
            .window
            .batches
            .iter()
            .filter_map(|b| {
                b.gpus
                    .iter()
                    .find(|x| x.index == g.index)
                    .and_then(|x| x.memory_used_bytes)
                    .map(|u| (b.created_unix_ms, u as f64))
            })
            .collect();
        let growth_per_min = slope_per_minute(&points);
        let minutes_to_full = if growth_per_min > 0.0 { (total - used) as f64 / growth_per_min } else { f64::INFINITY };
        let filling = growth_per_min > (total as f64) * 0.002 && points.len() >= 5;
        if share < triggers::MEMORY_NEAR_FULL && !(filling && minutes_to_full < 30.0) {
            continue;
        }
        any = true;
        let severity = if share > 0.97 || minutes_to_full < 10.0 { "critical" } else { "warning" };
        let mut evidence = vec![ev(
            "gpu_memory_used_ratio",
            share,
            format!("GPU {} memory {:.1} % used ({:.1} of {:.1} GiB)", g.index, share * 100.0, gib(used), gib(total)),
            last.created_unix_ms,
        )];
        if filling {
            evidence.push(ev(
                "gpu_memory_growth_bytes_per_minute",
                growth_per_min,
                format!(
                    "rising {:.0} MiB/min over the window: full in about {:.0} min",
                    growth_per_min / 1048576.0,
                    minutes_to_full.min(1e6)
                ),
                last.created_unix_ms,
            ));
        }
        let restarting: Vec<&Container> = n
            .containers
            .iter()
            .flatten()
            .filter(|c| c.state == "restarting" || c.state == "exited" || c.state == "dead")
            .collect();
        for c in &restarting {
            evidence.push(ev(
                "container_state",
                f64::NAN,
                format!("container {} is {}", c.name, c.state),
                last.created_unix_ms,
            ));
        }
        let kv_full = kv.iter().find(|(_, v)| *v > 0.9);
        if let Some((ep, v)) = kv_full {
            evidence.push(ev(
                "kv_cache_usage_ratio",
                *v,
                format!("{ep}: KV cache {:.0} % used", v * 100.0),
                last.created_unix_ms,
            ));
        }
        let util = g.utilization_ratio.unwrap_or(f64::NAN);
        let mut resolutions = vec![
            "Reduce context length: lower --max-model-len".to_owned(),
            "Reduce batch size: lower --max-num-seqs".to_owned(),
            "Use quantization: switch to an AWQ/GPTQ model".to_owned(),
            "Add GPU memory: a larger GPU or more GPUs (tensor parallel)".to_owned(),
        ];
        let summary = if kv_full.is_some() {
            format!("OOM risk on GPU {}: the KV cache is full", g.index)
        } else if filling {
            // Memory rising while the load does not: a leak or batches growing without bound.
            resolutions.swap(0, 1);
            format!(
                "OOM risk on GPU {}: memory rising {:.0} MiB/min (utilisation {:.0} %), full in about {:.0} min",
                g.index,
                growth_per_min / 1048576.0,
                util * 100.0,
                minutes_to_full.min(1e6)
            )
        } else {
            // Full at rest: the weights and cache simply do not fit with room to spare.
            resolutions.rotate_left(2);
            format!("OOM risk on GPU {}: memory {:.1} % used", g.index, share * 100.0)
        };
        out.push(Finding {
            issue: "out_of_memory",
            severity,
            node: node.clone(),
            gpu: Some(g.index),
            summary,
            evidence,
            resolutions,
        });
    }
    if !any {
        let top = last
            .gpus
            .iter()
            .filter_map(|g| Some(g.memory_used_bytes? as f64 / g.memory_total_bytes? as f64))
            .fold(0.0, f64::max);
        checked.push(format!("out of memory: GPU memory at most {:.0} % used, not rising toward full", top * 100.0));
    }
}

/// The seed's "High Latency": GPU saturated? queue building? memory pressure? network?
fn high_latency(
    n: &NodeFacts,
    last: &TelemetryBatch,
    endpoints: &[&measure::EndpointFigures],
    kv: &[(String, f64)],
    out: &mut Vec<Finding>,
    checked: &mut Vec<String>,
) {
    let node = &n.window.node;
    let mut any = false;
    for e in endpoints {
        let slow = e.p95_latency_seconds > triggers::P95_LATENCY_S;
        let slow_first = e.p95_ttft_seconds > triggers::TTFT_SLO_S;
        let queued = e.queue_depth > triggers::QUEUE_DEPTH;
        if !(slow || slow_first || queued) {
            continue;
        }
        any = true;
        let at = last.created_unix_ms;
        let mut evidence = Vec::new();
        if e.p95_latency_seconds.is_finite() {
            evidence.push(ev(
                "p95_latency_seconds",
                e.p95_latency_seconds,
                format!("p95 latency {:.2} s", e.p95_latency_seconds),
                at,
            ));
        }
        if e.p95_ttft_seconds.is_finite() {
            evidence.push(ev(
                "p95_ttft_seconds",
                e.p95_ttft_seconds,
                format!("p95 time to first token {:.3} s", e.p95_ttft_seconds),
                at,
            ));
        }
        evidence.push(ev(
            "queue_depth",
            e.queue_depth,
            format!("{:.1} requests waiting on average", e.queue_depth),
            at,
        ));
        evidence.push(ev(
            "gpu_utilization",
            e.gpu_utilization,
            format!("GPU utilisation {:.0} % on average", e.gpu_utilization * 100.0),
            at,
        ));
        let kv_high = kv.iter().find(|(ep, v)| ep == &e.endpoint && *v > 0.9).map(|(_, v)| *v);
        let mut ranked: Vec<(u8, String)> = vec![
            (3, "If the GPU is at 100 %: scale horizontally or reduce the batch size".into()),
            (2, "If the queue is deep: increase max_concurrent_requests (or add a replica)".into()),
            (1, "If memory is under pressure: reduce max_model_len".into()),
            (0, "If none of these: check the network latency to clients".into()),
        ];
        let saturated = e.gpu_utilization > 0.95;
        for (rank, text) in &mut ranked {
            let lead = (saturated && text.starts_with("If the GPU"))
                || (queued && text.starts_with("If the queue"))
                || (kv_high.is_some() && text.starts_with("If memory"))
                || (!saturated && !queued && kv_high.is_none() && text.starts_with("If none"));
            if lead {
                *rank += 10;
            }
        }
        ranked.sort_by_key(|r| std::cmp::Reverse(r.0));
        let cause = if saturated {
            "the GPU is saturated"
        } else if queued {
            "requests are queueing"
        } else if kv_high.is_some() {
            "the KV cache is full"
        } else {
            "neither the GPU nor the queue explains it: look at the network"
        };
        out.push(Finding {
            issue: "high_latency",
            severity: if slow { "critical" } else { "warning" },
            node: node.clone(),
            gpu: None,
            summary: format!("{}: high latency; {cause}", e.endpoint),
            evidence,
            resolutions: ranked.into_iter().map(|(_, t)| t).collect(),
        });
    }
    if !any {
        checked.push(format!(
            "high latency: {} endpoint(s) within p95 {} s, TTFT {} s, queue {}",
            endpoints.len(),
            triggers::P95_LATENCY_S,
            triggers::TTFT_SLO_S,
            triggers::QUEUE_DEPTH
        ));
    }
}

/// The seed's "Model Loading Failure": restart loops, servers not ready, disk.
fn loading(n: &NodeFacts, last: &TelemetryBatch, out: &mut Vec<Finding>, checked: &mut Vec<String>) {
    let node = &n.window.node;
    let at = last.created_unix_ms;
    let mut evidence = Vec::new();
    for c in n.containers.iter().flatten() {
        if c.state == "restarting"
            || c.health.as_deref() == Some("unhealthy")
            || c.state == "exited"
            || c.state == "dead"
        {
            evidence.push(ev(
                "container",
                f64::NAN,
                format!(
                    "container {} is {}{}",
                    c.name,
                    c.state,
                    c.health.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
                ),
                at,
            ));
        }
    }
    for (ep, v) in latest_by_endpoint(last, "flotilla_inference_ready") {
        if v < 1.0 && (n.endpoints.is_empty() || n.endpoints.contains(&ep)) {
            evidence.push(ev("inference_ready", v, format!("{ep} does not answer GET /v1/models"), at));
        }
    }
    if evidence.is_empty() {
        checked.push("model loading: every model server is running and ready".into());
        return;
    }
    let low_disk = last.host.as_ref().and_then(|h| {
        h.filesystems
            .iter()
            .filter(|f| f.size_bytes > 0)
            .map(|f| (f, f.avail_bytes as f64 / f.size_bytes as f64))
            .find(|(_, free)| *free < 0.1)
            .map(|(f, free)| (f.mount_point.clone(), free))
    });
    let vram_full = last.gpus.iter().any(|g| match (g.memory_used_bytes, g.memory_total_bytes) {
        (Some(u), Some(t)) if t > 0 => u as f64 / t as f64 > triggers::MEMORY_NEAR_FULL,
        _ => false,
    });
    if let Some((mount, free)) = &low_disk {
        evidence.push(ev("filesystem_free_ratio", *free, format!("{mount}: {:.1} % free", free * 100.0), at));
    }
    let mut resolutions = vec![
        "Corrupted download: re-download the model".to_owned(),
        "Insufficient memory: use a smaller model or quantization".to_owned(),
        "Missing files: verify all shards are present (and config.json)".to_owned(),
        "Disk full: clear old models and logs".to_owned(),
    ];
    if low_disk.is_some() {
        resolutions.rotate_right(1);
    } else if vram_full {
        resolutions.swap(0, 1);
    }
    out.push(Finding {
        issue: "model_loading_failure",
        severity: "critical",
        node: node.clone(),
        gpu: None,
        summary: "a model server is not serving: restarting, unhealthy or not ready".into(),
        evidence,
        resolutions,
    });
}

/// The seed's "High Error Rate".
fn errors(n: &NodeFacts, endpoints: &[&measure::EndpointFigures], out: &mut Vec<Finding>, checked: &mut Vec<String>) {
    let mut any = false;
    for e in endpoints.iter().filter(|e| e.error_ratio > triggers::ERROR_RATIO) {
        any = true;
        let loaded = e.gpu_utilization > triggers::GPU_UTILIZATION || e.queue_depth > triggers::QUEUE_DEPTH;
        let mut resolutions = vec![
            "Timeout errors: increase the timeout, reduce load".to_owned(),
            "Validation errors: check the input formatting".to_owned(),
            "Internal errors: check the container's resources".to_owned(),
            "Rate limit errors: increase limits or add capacity".to_owned(),
        ];
        if loaded {
            resolutions.rotate_right(1);
        } else {
            resolutions.swap(0, 2);
        }
        out.push(Finding {
            issue: "high_error_rate",
            severity: "critical",
            node: n.window.node.clone(),
            gpu: None,
            summary: format!(
                "{}: {:.1} % of requests failed{}",
                e.endpoint,
                e.error_ratio * 100.0,
                if loaded { " under load" } else { "" }
            ),
            evidence: vec![ev(
                "error_ratio",
                e.error_ratio,
                format!("{:.1} % failed over the window", e.error_ratio * 100.0),
                0,
            )],
            resolutions,
        });
    }
    if !any {
        checked.push("error rate: no endpoint above 1 % failed requests (where the engine counts failures)".into());
    }
}

/// GPU hardware: XID errors, uncorrectable ECC, heat.
fn gpu_faults(n: &NodeFacts, out: &mut Vec<Finding>, checked: &mut Vec<String>) {
    let (Some(first), Some(last)) = (n.window.batches.first(), n.window.batches.last()) else { return };
    let mut any = false;
    for g in &last.gpus {
        let before = first.gpus.iter().find(|x| x.index == g.index);
        let mut evidence = Vec::new();
        for x in &g.xid_events {
            let earlier = before.and_then(|b| b.xid_events.iter().find(|y| y.code == x.code)).map_or(0, |y| y.count);
            if x.count > earlier {
                evidence.push(ev(
                    "xid",
                    x.code as f64,
                    format!("XID {} raised {} time(s) in the window", x.code, x.count - earlier),
                    last.created_unix_ms,
                ));
            }
        }
        if let Some(u) = g.ecc_uncorrected_volatile_total.filter(|u| *u > 0) {
            evidence.push(ev(
                "ecc_uncorrected",
                u as f64,
                format!("{u} uncorrectable ECC errors since the last reset"),
                last.created_unix_ms,
            ));
        }
        if let Some(t) = g.temperature_celsius.filter(|t| *t > 80.0) {
            evidence.push(ev("temperature_celsius", t, format!("GPU {} at {t:.0} °C", g.index), last.created_unix_ms));
        }
        if evidence.is_empty() {
            continue;
        }
        any = true;
        out.push(Finding {
            issue: "gpu_fault",
            severity: "critical",
            node: n.window.node.clone(),
            gpu: Some(g.index),
            summary: format!("GPU {} reports hardware trouble", g.index),
            evidence,
            resolutions: vec![
                "Drain the node (flotctl rollout or exec drain) before the GPU fails requests".into(),
                "Overheating: check fans and airflow; the GPU throttles above its slowdown temperature".into(),
                "XID 48/63/64/79 or uncorrectable ECC: reset the GPU (nvidia-smi -r) or replace it".into(),
            ],
        });
    }
    for (name, summary) in &n.alerts {
        checked.push(format!("alert firing: {name}: {summary}"));
    }
    if !any {
        checked.push("GPU hardware: no new XID, no uncorrectable ECC, no GPU above 80 °C".into());
    }
}

fn slope_per_minute(points: &[(i64, f64)]) -> f64 {
    if points.len() < 2 {
        return 0.0;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0 as f64 / 60_000.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 as f64 / 60_000.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 as f64 / 60_000.0 - mx) * (p.1 - my)).sum();
    if sxx > 0.0 { sxy / sxx } else { 0.0 }
}

fn gib(b: u64) -> f64 {
    b as f64 / 1073741824.0
}

#[cfg(test)]
mod tests {
    use flotilla_common::model::GpuSample;

    use super::*;

    fn batch(t_s: i64, used_gib: f64, util: f64) -> TelemetryBatch {
        TelemetryBatch {
            created_unix_ms: t_s * 1000,
            gpus: vec![GpuSample {
                index: 1,
                utilization_ratio: Some(util),
                memory_used_bytes: Some((used_gib * 1073741824.0) as u64),
                memory_total_bytes: Some(80 * 1073741824),
                temperature_celsius: Some(60.0),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn memory_creeping_toward_full_is_an_oom_risk_on_that_gpu() {
        // 60 GiB rising 1 GiB a minute at flat load: full in about 20 minutes.
        let batches: Vec<TelemetryBatch> = (0..60).map(|i| batch(i * 5, 60.0 + i as f64 * 5.0 / 60.0, 0.5)).collect();
        let facts = NodeFacts {
            window: NodeWindow { node: "gpu-2".into(), batches, ..Default::default() },
            connected: true,
            ..Default::default()
        };
        let (findings, _) = diagnose(&facts);
        let oom = findings.iter().find(|f| f.issue == "out_of_memory").expect("an OOM finding");
        assert_eq!(oom.gpu, Some(1));
        assert!(oom.summary.contains("OOM risk on GPU 1") && oom.summary.contains("rising"), "{}", oom.summary);
        assert!(oom.resolutions[0].contains("batch size"), "a leak ranks the batch size first: {:?}", oom.resolutions);
        assert!(oom.evidence.iter().any(|e| e.what == "gpu_memory_growth_bytes_per_minute"));
    }

    #[test]
    fn a_healthy_node_has_no_findings_and_says_what_was_checked() {
        let batches: Vec<TelemetryBatch> = (0..30).map(|i| batch(i, 40.0, 0.5)).collect();
        let facts = NodeFacts {
            window: NodeWindow { node: "gpu-1".into(), batches, ..Default::default() },
            connected: true,
            ..Default::default()
        };
        let (findings, checked) = diagnose(&facts);
        assert!(findings.is_empty(), "{findings:?}");
        assert!(checked.iter().any(|c| c.starts_with("out of memory")), "{checked:?}");
        assert!(checked.iter().any(|c| c.starts_with("GPU hardware")), "{checked:?}");
    }
}
