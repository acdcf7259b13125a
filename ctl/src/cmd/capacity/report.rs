//! `flotctl capacity report`: `Fleet.CapacityReport` as per-endpoint rows, a per-model
//! summary, the recommendations and notes; NaN ("not measured") shows as `-` and null.

use std::time::Duration;

use flotilla_proto::pb;
use serde::Serialize;

use super::{cell, measured, rpc_error, window_ms};
use crate::cli::Format;
use crate::client::connect;
use crate::context::Connection;
use crate::output::{self, percent};

/// `capacity report` as `-o json` prints it; NaN ("not measured") is null.
#[derive(Debug, Serialize)]
struct ReportView {
    at_unix_ms: i64,
    window_ms: u64,
    price_per_kwh: Option<f64>,
    endpoints: Vec<EndpointView>,
    models: Vec<ModelView>,
    recommendations: Vec<RecommendationView>,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct EndpointView {
    node: String,
    endpoint: String,
    model: String,
    tokens_per_second: Option<f64>,
    peak_tokens_per_second: Option<f64>,
    gpu_utilization: Option<f64>,
    saturation_tokens_per_second: Option<f64>,
    saturation_basis: String,
    headroom_tokens_per_second: Option<f64>,
    headroom_ratio: Option<f64>,
    days_until_saturated: Option<f64>,
    queue_depth: Option<f64>,
    p95_latency_seconds: Option<f64>,
    p95_ttft_seconds: Option<f64>,
    error_ratio: Option<f64>,
    joules_per_1k_tokens: Option<f64>,
    cost_per_1k_tokens: Option<f64>,
    saturated: bool,
}

#[derive(Debug, Serialize)]
struct ModelView {
    model: String,
    tokens_per_second: Option<f64>,
    saturation_tokens_per_second: Option<f64>,
    headroom_tokens_per_second: Option<f64>,
    nodes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct RecommendationView {
    kind: String,
    trigger: String,
    node: String,
    model: String,
    action: String,
    evidence: String,
    value: Option<f64>,
    threshold: Option<f64>,
}

impl ReportView {
    fn from_wire(r: pb::CapacityReportResponse, price_per_kwh: Option<f64>) -> Self {
        let endpoints = r
            .endpoints
            .into_iter()
            .map(|e| EndpointView {
                node: e.node,
                endpoint: e.endpoint,
                model: e.model,
                tokens_per_second: measured(e.tokens_per_second),
                peak_tokens_per_second: measured(e.peak_tokens_per_second),
                gpu_utilization: measured(e.gpu_utilization),
                saturation_tokens_per_second: measured(e.saturation_tokens_per_second),
                saturation_basis: e.saturation_basis,
                headroom_tokens_per_second: measured(e.headroom_tokens_per_second),
                headroom_ratio: measured(e.headroom_ratio),
                days_until_saturated: measured(e.days_until_saturated),
                queue_depth: measured(e.queue_depth),
                p95_latency_seconds: measured(e.p95_latency_seconds),
                p95_ttft_seconds: measured(e.p95_ttft_seconds),
                error_ratio: measured(e.error_ratio),
                joules_per_1k_tokens: measured(e.joules_per_1k_tokens),
                cost_per_1k_tokens: measured(e.cost_per_1k_tokens),
                saturated: e.saturated,
            })
            .collect();
        let models = r
            .models
            .into_iter()
            .map(|m| ModelView {
                model: m.model,
                tokens_per_second: measured(m.tokens_per_second),
                saturation_tokens_per_second: measured(m.saturation_tokens_per_second),
                headroom_tokens_per_second: measured(m.headroom_tokens_per_second),
                nodes: m.nodes,
            })
            .collect();
        let recommendations = r
            .recommendations
            .into_iter()
            .map(|c| RecommendationView {
                kind: c.kind,
                trigger: c.trigger,
                node: c.node,
                model: c.model,
                action: c.action,
                evidence: c.evidence,
                value: measured(c.value),
                threshold: measured(c.threshold),
            })
            .collect();
        Self {
            at_unix_ms: r.at_unix_ms,
            window_ms: r.window_ms,
            price_per_kwh,
            endpoints,
            models,
            recommendations,
            notes: r.notes,
        }
    }
}

pub(super) async fn run(window: Duration, price: Option<f64>, format: Format, conn: &Connection) -> anyhow::Result<()> {
    let request = pb::CapacityReportRequest { window_ms: window_ms(window), price_per_kwh: price.unwrap_or(0.0) };
    let mut client = connect(conn).await?;
    let resp = client.capacity_report(request).await.map_err(|s| rpc_error("capacity report", "CapacityReport", &s))?;
    let view = ReportView::from_wire(resp.into_inner(), price);
    output::print(format, &view, report_text)
}

fn report_text(v: &ReportView) -> String {
    let window = humantime::format_duration(Duration::from_millis(v.window_ms));
    let mut out = format!("Capacity over the last {window}:\n\n");
    if v.endpoints.is_empty() {
        out.push_str("No serving endpoint reported in the window.\n");
    } else {
        out.push_str(&endpoints_table(&v.endpoints));
        out.push('\n');
        if v.endpoints.iter().any(|e| e.saturated) {
            out.push_str("* a scaling trigger holds for this endpoint\n");
        }
    }
    if !v.models.is_empty() {
        let mut t = output::table(&["MODEL", "TOK/S", "SATURATION", "HEADROOM", "NODES"]);
        for m in &v.models {
            t.add_row(vec![
                m.model.clone(),
                cell(m.tokens_per_second, |x| format!("{x:.1}")),
                cell(m.saturation_tokens_per_second, |x| format!("{x:.0}")),
                cell(m.headroom_tokens_per_second, |x| format!("{x:.0}")),
                m.nodes.join(","),
            ]);
        }
        out.push('\n');
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if v.recommendations.is_empty() {
        out.push_str("\nRecommendations: none (no scaling trigger holds)\n");
    } else {
        out.push_str("\nRecommendations:\n");
        for (i, r) in v.recommendations.iter().enumerate() {
            let node = if r.node.is_empty() { String::new() } else { format!(" on {}", r.node) };
            let model = if r.model.is_empty() { String::new() } else { format!(" ({})", r.model) };
            out.push_str(&format!("  {}. [{}] {}{node}{model}: {}\n", i + 1, r.kind, r.trigger, r.action));
            if !r.evidence.is_empty() {
                out.push_str(&format!("     evidence: {}\n", r.evidence));
            }
        }
    }
    for n in &v.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out.trim_end().to_owned()
}

fn endpoints_table(endpoints: &[EndpointView]) -> String {
    let mut t = output::table(&[
        "NODE",
        "ENDPOINT",
        "MODEL",
        "TOK/S",
        "PEAK",
        "GPU UTIL",
        "SATURATION",
        "HEADROOM",
        "DAYS LEFT",
        "QUEUE",
        "P95",
        "TTFT P95",
        "ERR",
        "J/1K TOK",
        "COST/1K",
    ]);
    for e in endpoints {
        let headroom = match (e.headroom_tokens_per_second, e.headroom_ratio) {
            (Some(h), Some(r)) => format!("{h:.0} ({})", percent(Some(r))),
            (Some(h), None) => format!("{h:.0}"),
            _ => "-".to_owned(),
        };
        t.add_row(vec![
            e.node.clone(),
            if e.saturated { format!("{}*", e.endpoint) } else { e.endpoint.clone() },
            e.model.clone(),
            cell(e.tokens_per_second, |x| format!("{x:.1}")),
            cell(e.peak_tokens_per_second, |x| format!("{x:.1}")),
            percent(e.gpu_utilization),
            cell(e.saturation_tokens_per_second, |x| format!("{x:.0}")),
            headroom,
            cell(e.days_until_saturated, |x| format!("{x:.1}")),
            cell(e.queue_depth, |x| format!("{x:.1}")),
            cell(e.p95_latency_seconds, |x| format!("{x:.2}s")),
            cell(e.p95_ttft_seconds, |x| format!("{x:.2}s")),
            cell(e.error_ratio, |x| format!("{:.2}%", x * 100.0)),
            cell(e.joules_per_1k_tokens, |x| format!("{x:.0}")),
            cell(e.cost_per_1k_tokens, |x| format!("{x:.4}")),
        ]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, saturation: f64) -> pb::ModelCapacity {
        pb::ModelCapacity {
            model: name.to_owned(),
            tokens_per_second: 300.0,
            saturation_tokens_per_second: saturation,
            headroom_tokens_per_second: saturation - 300.0,
            nodes: vec!["gpu-a".to_owned()],
        }
    }

    fn endpoint(node: &str, saturated: bool) -> pb::EndpointCapacity {
        pb::EndpointCapacity {
            node: node.to_owned(),
            endpoint: "vllm".to_owned(),
            model: "llama".to_owned(),
            tokens_per_second: 410.5,
            peak_tokens_per_second: 520.0,
            gpu_utilization: 0.86,
            saturation_tokens_per_second: 600.0,
            saturation_basis: "queueing".to_owned(),
            headroom_tokens_per_second: 189.5,
            headroom_ratio: 0.316,
            days_until_saturated: f64::NAN,
            queue_depth: 1.25,
            p95_latency_seconds: 2.5,
            p95_ttft_seconds: 0.31,
            error_ratio: 0.002,
            joules_per_1k_tokens: f64::NAN,
            cost_per_1k_tokens: f64::NAN,
            saturated,
        }
    }

    #[test]
    fn report_renders_nan_as_dash_and_null() {
        let r = pb::CapacityReportResponse {
            at_unix_ms: 1,
            window_ms: 600_000,
            endpoints: vec![endpoint("gpu-a", true), endpoint("gpu-b", false)],
            models: vec![model("llama", 1200.0)],
            recommendations: vec![pb::Recommendation {
                kind: "add_capacity".into(),
                trigger: "gpu_utilization".into(),
                node: "gpu-a".into(),
                model: "llama".into(),
                action: "Add GPU or replica".into(),
                evidence: "mean GPU utilisation 86% over 10m (threshold 80%)".into(),
                value: 0.86,
                threshold: 0.8,
            }],
            notes: vec!["no power readings: no energy figures".into()],
        };
        let v = ReportView::from_wire(r, None);
        let json = serde_json::to_value(&v).unwrap();
        assert!(json["endpoints"][0]["days_until_saturated"].is_null());
        assert!(json["endpoints"][0]["cost_per_1k_tokens"].is_null());
        assert_eq!(json["endpoints"][0]["gpu_utilization"], 0.86);
        assert_eq!(json["recommendations"][0]["threshold"], 0.8);
        // YAML must not carry .nan either.
        assert!(!serde_yaml_ng::to_string(&v).unwrap().contains("nan"));
        let text = report_text(&v);
        let row = text.lines().find(|l| l.trim_start().starts_with("gpu-a")).unwrap();
        assert!(row.contains("vllm*") && row.contains("410.5") && row.contains("86%"), "{row}");
        assert!(row.contains("190 (32%)") && row.contains("2.50s") && row.contains("0.20%"), "{row}");
        assert!(row.split_whitespace().filter(|c| *c == "-").count() >= 3, "{row}");
        assert!(text.contains("1. [add_capacity] gpu_utilization on gpu-a (llama): Add GPU or replica"), "{text}");
        assert!(text.contains("evidence: mean GPU utilisation 86%"), "{text}");
        assert!(text.contains("note: no power readings"), "{text}");
        for header in ["DAYS LEFT", "TTFT P95", "J/1K TOK", "COST/1K"] {
            assert!(text.contains(header), "{header}");
        }
    }

    #[test]
    fn an_empty_report_says_so() {
        let v =
            ReportView::from_wire(pb::CapacityReportResponse { window_ms: 60_000, ..Default::default() }, Some(0.3));
        let text = report_text(&v);
        assert!(text.contains("No serving endpoint reported"), "{text}");
        assert!(text.contains("Recommendations: none"), "{text}");
    }
}
