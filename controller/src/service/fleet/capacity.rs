//! The Fleet methods for capacity and diagnosis (read-only: any operator
//! certificate). They read windows of stored batches, the fleet view and the
//! alert book, and hand them to the pure functions in `crate::capacity`.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use tonic::{Request, Response, Status};

use crate::alert::state::AlertState;
use crate::capacity::diagnose::{self, NodeFacts};
use crate::capacity::measure::{self, NodeWindow};
use crate::capacity::{DEFAULT_WINDOW, MAX_WINDOW};
use crate::service::{Context, blocking};

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;
/// How many days of daily peaks feed the growth trend.
const TREND_DAYS: i64 = 30;

fn window(ms: u64) -> Result<Duration, Status> {
    let w = if ms == 0 { DEFAULT_WINDOW } else { Duration::from_millis(ms) };
    if w < Duration::from_secs(10) || w > MAX_WINDOW {
        return Err(Status::invalid_argument(format!(
            "window {} must be between 10s and {}",
            humantime::format_duration(w),
            humantime::format_duration(MAX_WINDOW)
        )));
    }
    Ok(w)
}

/// Every known node's window of batches (and, with `trend`, its daily peaks).
async fn windows(ctx: &Context, nodes: Vec<NodeId>, w: Duration, trend: bool) -> Result<Vec<NodeWindow>, Status> {
    let store = ctx.store.clone();
    let retention = i64::try_from(ctx.config.telemetry.retention.as_millis()).unwrap_or(i64::MAX);
    blocking("reading telemetry windows", move || {
        let now = now_unix_ms();
        let from = now - i64::try_from(w.as_millis()).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for node in nodes {
            let batches = store.batches_between(&node, from, now)?;
            let mut daily_peaks = BTreeMap::new();
            if trend {
                daily_peaks = peaks(store.as_ref(), &node, now, now.saturating_sub(retention));
            }
            out.push(NodeWindow { node: node.to_string(), batches, daily_peaks });
        }
        Ok(out)
    })
    .await
}

/// Per endpoint, each day's highest hourly tokens/s over the last 30 days.
fn peaks(store: &dyn crate::store::Store, node: &NodeId, now: i64, raw_from: i64) -> BTreeMap<String, Vec<(f64, f64)>> {
    let selector = format!("flotilla_inference_generation_tokens_total{{node=\"{node}\"}}");
    let Ok(q) = crate::query::RangeQuery::new(&selector, now - TREND_DAYS * DAY_MS, now, HOUR_MS, now) else {
        return BTreeMap::new();
    };
    let Ok(series) = crate::query::run(store, &q, raw_from) else { return BTreeMap::new() };
    // Sum the label sets of each endpoint per hour, then take increases.
    let mut hourly: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for s in series {
        let Some(ep) = s.series.labels.iter().find(|(k, _)| k == "endpoint").map(|(_, v)| v.clone()) else { continue };
        let per = hourly.entry(ep).or_default();
        for (t, v) in s.points {
            *per.entry(t).or_default() += v;
        }
    }
    hourly
        .into_iter()
        .map(|(ep, points)| {
            let mut by_day: BTreeMap<i64, f64> = BTreeMap::new();
            let pts: Vec<(i64, f64)> = points.into_iter().collect();
            for w in pts.windows(2) {
                let d = if w[1].1 >= w[0].1 { w[1].1 - w[0].1 } else { w[1].1 };
                let dt = (w[1].0 - w[0].0) as f64 / 1000.0;
                if dt > 0.0 {
                    let day = w[1].0.div_euclid(DAY_MS);
                    let e = by_day.entry(day).or_insert(0.0);
                    *e = e.max(d / dt);
                }
            }
            (ep, by_day.into_iter().map(|(d, p)| (d as f64, p)).collect())
        })
        .collect()
}

pub async fn report(
    ctx: &Context,
    request: Request<pb::CapacityReportRequest>,
) -> Result<Response<pb::CapacityReportResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let req = request.into_inner();
    let w = window(req.window_ms)?;
    if !req.price_per_kwh.is_finite() || req.price_per_kwh < 0.0 {
        return Err(Status::invalid_argument(format!(
            "price_per_kwh {} must be a non-negative number",
            req.price_per_kwh
        )));
    }
    let windows = windows(ctx, ctx.view.nodes(), w, true).await?;
    let mut resp = pb::CapacityReportResponse {
        at_unix_ms: now_unix_ms(),
        window_ms: u64::try_from(w.as_millis()).unwrap_or(u64::MAX),
        ..Default::default()
    };
    let mut models: BTreeMap<String, pb::ModelCapacity> = BTreeMap::new();
    for nw in &windows {
        let r = measure::measure(nw, req.price_per_kwh);
        for e in r.endpoints {
            let m = models
                .entry(e.model.clone())
                .or_insert_with(|| pb::ModelCapacity { model: e.model.clone(), ..Default::default() });
            m.tokens_per_second += e.tokens_per_second.max(0.0);
            if e.saturation_tokens_per_second.is_finite() {
                m.saturation_tokens_per_second += e.saturation_tokens_per_second;
            }
            if !m.nodes.contains(&e.node) {
                m.nodes.push(e.node.clone());
            }
            resp.endpoints.push(pb::EndpointCapacity {
                node: e.node,
                endpoint: e.endpoint,
                model: e.model,
                tokens_per_second: e.tokens_per_second,
                peak_tokens_per_second: e.peak_tokens_per_second,
                gpu_utilization: e.gpu_utilization,
                saturation_tokens_per_second: e.saturation_tokens_per_second,
                saturation_basis: e.saturation_basis,
                headroom_tokens_per_second: e.headroom_tokens_per_second,
                headroom_ratio: e.headroom_ratio,
                days_until_saturated: e.days_until_saturated,
                queue_depth: e.queue_depth,
                p95_latency_seconds: e.p95_latency_seconds,
                p95_ttft_seconds: e.p95_ttft_seconds,
                error_ratio: e.error_ratio,
                joules_per_1k_tokens: e.joules_per_1k_tokens,
                cost_per_1k_tokens: e.cost_per_1k_tokens,
                saturated: e.saturated,
            });
        }
        resp.recommendations.extend(r.recommendations.into_iter().map(|x| pb::Recommendation {
            kind: x.kind.to_owned(),
            trigger: x.trigger.to_owned(),
            node: x.node,
            model: x.model,
            action: x.action,
            evidence: x.evidence,
            value: x.value,
            threshold: x.threshold,
        }));
        resp.notes.extend(r.notes);
    }
    for m in models.values_mut() {
        m.headroom_tokens_per_second = m.saturation_tokens_per_second - m.tokens_per_second;
    }
    resp.models = models.into_values().collect();
    if resp.endpoints.is_empty() {
        resp.notes.push(
            "no inference endpoint reported tokens in the window: per-model capacity needs agents that scrape model servers"
                .into(),
        );
    }
    Ok(Response::new(resp))
}

pub async fn diagnose(
    ctx: &Context,
    request: Request<pb::DiagnoseRequest>,
) -> Result<Response<pb::DiagnoseResponse>, Status> {
    crate::auth::require_operator(&request)?;
    let req = request.into_inner();
    let w = window(req.window_ms)?;
    let target = req.target.trim().to_owned();
    if target.is_empty() {
        return Err(Status::invalid_argument("give a node id or a deployment name"));
    }
    // A node, or else a deployment: its replicas' nodes, limited to its endpoints.
    let known = ctx.view.nodes();
    let (kind, scope): (&str, Vec<(NodeId, Vec<String>)>) = match known.iter().find(|n| n.as_str() == target) {
        Some(node) => ("node", vec![(node.clone(), Vec::new())]),
        None => {
            let rollouts = ctx.rollouts.clone();
            let name = target.clone();
            let found = tokio::task::spawn_blocking(move || rollouts.history(&name))
                .await
                .map_err(|e| Status::internal(format!("reading deployments failed: {e}")))?;
            let Ok((dep, _)) = found else {
                return Err(Status::not_found(format!(
                    "{target:?} is neither a node (flotctl nodes ls) nor a deployment (flotctl deploy ls)"
                )));
            };
            let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for r in &dep.replicas {
                by_node.entry(r.node.clone()).or_default().push(r.container.clone());
            }
            ("deployment", by_node.into_iter().filter_map(|(n, eps)| NodeId::new(n).ok().map(|id| (id, eps))).collect())
        }
    };
    let nodes: Vec<NodeId> = scope.iter().map(|(n, _)| n.clone()).collect();
    let windows = windows(ctx, nodes, w, false).await?;
    let firing = ctx.alerts.alerts(Some(AlertState::Firing)).await;
    let mut resp = pb::DiagnoseResponse {
        target: target.clone(),
        kind: kind.to_owned(),
        at_unix_ms: now_unix_ms(),
        ..Default::default()
    };
    for (nw, (id, endpoints)) in windows.into_iter().zip(scope) {
        let alerts = firing
            .iter()
            .filter(|a| a.record.labels.iter().any(|(k, v)| k == "node" && v == id.as_str()))
            .map(|a| {
                let summary = a
                    .record
                    .annotations
                    .iter()
                    .find(|(k, _)| k == "summary")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                (a.record.name.clone(), summary)
            })
            .collect();
        let facts = NodeFacts {
            window: nw,
            connected: ctx.registry.session(&id).is_some(),
            containers: ctx.view.containers(&id).filter(|r| r.runtime_error.is_none()).map(|r| r.containers),
            alerts,
            endpoints,
        };
        let (findings, checked) = diagnose::diagnose(&facts);
        resp.findings.extend(findings.into_iter().map(|f| {
            pb::Finding {
                issue: f.issue.to_owned(),
                severity: f.severity.to_owned(),
                node: f.node,
                gpu: f.gpu.map(|g| g.to_string()).unwrap_or_default(),
                summary: f.summary,
                evidence: f
                    .evidence
                    .into_iter()
                    .map(|e| pb::Evidence { what: e.what, value: e.value, text: e.text, at_unix_ms: e.at_unix_ms })
                    .collect(),
                resolutions: f.resolutions,
            }
        }));
        resp.checked.extend(checked.into_iter().map(|c| format!("{id}: {c}")));
    }
    let rank = |s: &str| match s {
        "critical" => 0,
        "warning" => 1,
        _ => 2,
    };
    resp.findings.sort_by_key(|f| rank(&f.severity));
    Ok(Response::new(resp))
}
