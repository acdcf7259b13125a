//! Measured capacity of each serving endpoint from a window of its node's
//! batches. Pure: batches (oldest first) in, figures and recommendations out.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_common::model::TelemetryBatch;

use super::triggers;
use crate::rollout::gates::quantile;
use crate::rollout::model::Histogram;

const TOKENS: &str = "flotilla_inference_generation_tokens_total";
const WAITING: &str = "flotilla_inference_requests_waiting";
const E2E_BUCKET: &str = "flotilla_inference_e2e_request_latency_seconds_bucket";
const TTFT_BUCKET: &str = "flotilla_inference_time_to_first_token_seconds_bucket";
const SUCCEEDED: &str = "flotilla_inference_requests_succeeded_total";
const FAILED: &str = "flotilla_inference_requests_failed_total";

/// One node's window.
#[derive(Debug, Clone, Default)]
pub struct NodeWindow {
    pub node: String,
    /// Oldest first.
    pub batches: Vec<TelemetryBatch>,
    /// Per endpoint: (day number, that day's peak hourly tokens/s), oldest first.
    pub daily_peaks: BTreeMap<String, Vec<(f64, f64)>>,
}

/// The figures of one endpoint; NaN where not measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EndpointFigures {
    pub node: String,
    pub endpoint: String,
    pub model: String,
    pub tokens_per_second: f64,
    pub peak_tokens_per_second: f64,
    pub gpu_utilization: f64,
    pub saturation_tokens_per_second: f64,
    pub saturation_basis: String,
    pub headroom_tokens_per_second: f64,
    pub headroom_ratio: f64,
    pub days_until_saturated: f64,
    pub queue_depth: f64,
    pub p95_latency_seconds: f64,
    pub p95_ttft_seconds: f64,
    pub error_ratio: f64,
    pub joules_per_1k_tokens: f64,
    pub cost_per_1k_tokens: f64,
    pub saturated: bool,
}

/// A scaling trigger that holds, or a consolidation hint.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recommendation {
    pub kind: &'static str,
    pub trigger: &'static str,
    pub node: String,
    pub model: String,
    pub action: String,
    pub evidence: String,
    pub value: f64,
    pub threshold: f64,
}

#[derive(Debug, Clone, Default)]
pub struct NodeReport {
    pub endpoints: Vec<EndpointFigures>,
    pub recommendations: Vec<Recommendation>,
    pub notes: Vec<String>,
}

/// Measures one node's window. `price_per_kwh` 0 leaves costs unmeasured.
pub fn measure(w: &NodeWindow, price_per_kwh: f64) -> NodeReport {
    let mut out = NodeReport::default();
    let Some((first, last)) = w.batches.first().zip(w.batches.last()) else {
        out.notes.push(format!("{}: no telemetry in the window", w.node));
        return out;
    };
    let span_s = (last.created_unix_ms - first.created_unix_ms) as f64 / 1000.0;
    let util_per_batch: Vec<Option<f64>> = w.batches.iter().map(mean_gpu_util).collect();
    let util_points: Vec<f64> = util_per_batch.iter().flatten().copied().collect();
    let gpu_util = mean(&util_points);
    let window_text = humantime::format_duration(std::time::Duration::from_secs(span_s.max(0.0) as u64)).to_string();
    gpu_triggers(w, &util_points, gpu_util, &window_text, &mut out);

    let endpoints: BTreeSet<String> = w
        .batches
        .iter()
        .flat_map(|b| b.samples.iter())
        .filter(|s| s.name == TOKENS || s.name == WAITING)
        .filter_map(|s| s.labels.get("endpoint").cloned())
        .collect();
    let energy: Vec<(i64, f64)> =
        w.batches.iter().filter_map(|b| energy_total(b).map(|e| (b.created_unix_ms, e))).collect();
    let node_tokens: f64 = endpoints.iter().map(|ep| increase(&series(&w.batches, TOKENS, ep))).sum();
    let node_joules = increase(&energy);
    for ep in &endpoints {
        let tokens = series(&w.batches, TOKENS, ep);
        let mut f = EndpointFigures {
            node: w.node.clone(),
            endpoint: ep.clone(),
            model: model_of(&w.batches, ep),
            gpu_utilization: gpu_util,
            ..nan_figures()
        };
        let rates = per_interval_rates(&tokens);
        if span_s > 0.0 && tokens.len() >= 2 {
            f.tokens_per_second = increase(&tokens) / span_s;
            f.peak_tokens_per_second = peak_minute(&rates);
        }
        let waiting = series(&w.batches, WAITING, ep);
        f.queue_depth = mean(&waiting.iter().map(|(_, v)| *v).collect::<Vec<_>>());
        f.p95_latency_seconds = window_quantile(&w.batches, E2E_BUCKET, ep);
        f.p95_ttft_seconds = window_quantile(&w.batches, TTFT_BUCKET, ep);
        let (ok, failed) = (increase(&series(&w.batches, SUCCEEDED, ep)), increase(&series(&w.batches, FAILED, ep)));
        let has_failed_series = w.batches.iter().any(|b| b.samples.iter().any(|s| s.name == FAILED));
        if has_failed_series && ok + failed > 0.0 {
            f.error_ratio = failed / (ok + failed);
        }
        saturation(&mut f, &rates, &waiting, &w.batches, &util_per_batch);
        if f.saturation_tokens_per_second.is_finite() && f.tokens_per_second.is_finite() {
            f.headroom_tokens_per_second = f.saturation_tokens_per_second - f.tokens_per_second;
            if f.saturation_tokens_per_second > 0.0 {
                f.headroom_ratio = f.headroom_tokens_per_second / f.saturation_tokens_per_second;
            }
        }
        if let Some(peaks) = w.daily_peaks.get(ep) {
            f.days_until_saturated = days_until(peaks, f.saturation_tokens_per_second);
        }
        if node_tokens > 0.0 && node_joules.is_finite() && node_joules > 0.0 {
            // The node's GPU energy, shared by the endpoints in proportion to their tokens.
            f.joules_per_1k_tokens = node_joules / node_tokens * 1000.0;
            if price_per_kwh > 0.0 {
                f.cost_per_1k_tokens = f.joules_per_1k_tokens / 3.6e6 * price_per_kwh;
            }
        }
        endpoint_triggers(&mut f, &waiting, &window_text, &mut out);
        out.endpoints.push(f);
    }
    if endpoints.len() > 1 {
        out.notes.push(format!("{}: energy per token is the node's, shared by {} endpoints", w.node, endpoints.len()));
    }
    out
}

fn nan_figures() -> EndpointFigures {
    let nan = f64::NAN;
    EndpointFigures {
        tokens_per_second: nan,
        peak_tokens_per_second: nan,
        gpu_utilization: nan,
        saturation_tokens_per_second: nan,
        headroom_tokens_per_second: nan,
        headroom_ratio: nan,
        days_until_saturated: nan,
        queue_depth: nan,
        p95_latency_seconds: nan,
        p95_ttft_seconds: nan,
        error_ratio: nan,
        joules_per_1k_tokens: nan,
        cost_per_1k_tokens: nan,
        ..Default::default()
    }
}

fn gpu_triggers(w: &NodeWindow, util_points: &[f64], gpu_util: f64, window: &str, out: &mut NodeReport) {
    let share_over = share(util_points, |u| u > triggers::GPU_UTILIZATION);
    if gpu_util.is_finite() && share_over >= triggers::SUSTAINED_SHARE {
        out.recommendations.push(Recommendation {
            kind: "add_capacity",
            trigger: "gpu_utilization",
            node: w.node.clone(),
            model: String::new(),
            action: "Add a GPU or a replica (scale horizontally)".into(),
            evidence: format!(
                "mean GPU utilisation {:.0} % over {window}, above {:.0} % in {:.0} % of samples",
                gpu_util * 100.0,
                triggers::GPU_UTILIZATION * 100.0,
                share_over * 100.0
            ),
            value: gpu_util,
            threshold: triggers::GPU_UTILIZATION,
        });
    }
    // Per GPU: idle ones are consolidation candidates.
    let mut per_gpu: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for b in &w.batches {
        for g in &b.gpus {
            if let Some(u) = g.utilization_ratio {
                per_gpu.entry(g.index).or_default().push(u);
            }
        }
    }
    for (index, points) in per_gpu {
        let m = mean(&points);
        if m.is_finite() && m < triggers::IDLE_GPU && points.len() >= 2 {
            out.recommendations.push(Recommendation {
                kind: "consolidate",
                trigger: "idle_gpu",
                node: w.node.clone(),
                model: String::new(),
                action: format!("GPU {index} is idle: move its replica onto a busier GPU, or free it"),
                evidence: format!("GPU {index} mean utilisation {:.1} % over {window}", m * 100.0),
                value: m,
                threshold: triggers::IDLE_GPU,
            });
        }
    }
}

fn endpoint_triggers(f: &mut EndpointFigures, waiting: &[(i64, f64)], window: &str, out: &mut NodeReport) {
    let who = format!("{} on {}", f.endpoint, f.node);
    let queue_share = share(&waiting.iter().map(|(_, v)| *v).collect::<Vec<_>>(), |q| q > triggers::QUEUE_DEPTH);
    let mut add = |trigger: &'static str, action: &str, evidence: String, value: f64, threshold: f64| {
        out.recommendations.push(Recommendation {
            kind: "add_capacity",
            trigger,
            node: f.node.clone(),
            model: f.model.clone(),
            action: action.to_owned(),
            evidence,
            value,
            threshold,
        });
    };
    let mut saturated = f.gpu_utilization.is_finite() && f.gpu_utilization > triggers::GPU_UTILIZATION;
    if f.queue_depth.is_finite() && queue_share >= triggers::SUSTAINED_SHARE {
        saturated = true;
        add(
            "queue_depth",
            "Add a replica",
            format!(
                "{who}: mean {:.1} requests waiting over {window}, above {} in {:.0} % of samples",
                f.queue_depth,
                triggers::QUEUE_DEPTH,
                queue_share * 100.0
            ),
            f.queue_depth,
            triggers::QUEUE_DEPTH,
        );
    }
    if f.p95_latency_seconds > triggers::P95_LATENCY_S {
        saturated = true;
        add(
            "p95_latency",
            "Add a GPU or a replica",
            format!("{who}: p95 latency {:.2} s over {window}", f.p95_latency_seconds),
            f.p95_latency_seconds,
            triggers::P95_LATENCY_S,
        );
    }
    if f.error_ratio > triggers::ERROR_RATIO {
        add(
            "error_rate",
            "Add a replica if the errors come from load (flotctl diagnose tells)",
            format!("{who}: {:.1} % of requests failed over {window}", f.error_ratio * 100.0),
            f.error_ratio,
            triggers::ERROR_RATIO,
        );
    }
    f.saturated = saturated;
}

/// The saturation point from the observed relation between load and symptoms.
fn saturation(
    f: &mut EndpointFigures,
    rates: &[(i64, f64)],
    waiting: &[(i64, f64)],
    batches: &[TelemetryBatch],
    util: &[Option<f64>],
) {
    // Queueing: the lowest one-minute throughput at which requests waited.
    let minutes = minute_means(rates);
    let waits = minute_means(waiting);
    let queued: Vec<f64> =
        minutes.iter().filter(|(m, _)| waits.get(m).is_some_and(|w| *w >= 1.0)).map(|(_, r)| *r).collect();
    if !queued.is_empty() {
        let at = queued.iter().copied().fold(f64::INFINITY, f64::min);
        f.saturation_tokens_per_second = at;
        f.saturation_basis = format!("requests queue from about {at:.0} tokens/s (one-minute means with ≥ 1 waiting)");
        return;
    }
    // Otherwise utilisation against throughput, by least squares, up to 95 %.
    let pairs: Vec<(f64, f64)> = rates
        .iter()
        .filter_map(|(t, r)| {
            let i = batches.iter().position(|b| b.created_unix_ms == *t)?;
            util.get(i).copied().flatten().map(|u| (*r, u))
        })
        .collect();
    if pairs.len() >= 10 {
        let (mx, my) = (
            mean(&pairs.iter().map(|p| p.0).collect::<Vec<_>>()),
            mean(&pairs.iter().map(|p| p.1).collect::<Vec<_>>()),
        );
        let sxx: f64 = pairs.iter().map(|(x, _)| (x - mx).powi(2)).sum();
        let sxy: f64 = pairs.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
        if sxx > 0.0 && sxy > 0.0 {
            let slope = sxy / sxx;
            let intercept = my - slope * mx;
            let at = (0.95 - intercept) / slope;
            if at.is_finite() && at > 0.0 {
                f.saturation_tokens_per_second = at;
                f.saturation_basis = format!(
                    "GPU utilisation reaches 95 % at about {at:.0} tokens/s (least squares over {} samples)",
                    pairs.len()
                );
                return;
            }
        }
    }
    if f.tokens_per_second > 0.0 && f.gpu_utilization > 0.0 {
        let at = f.tokens_per_second / f.gpu_utilization * 0.95;
        f.saturation_tokens_per_second = at;
        f.saturation_basis = "in proportion to GPU utilisation (too little variation for a fit)".into();
    } else {
        f.saturation_basis = "no load measured".into();
    }
}

/// Days until the trend of daily peaks reaches `saturation` (NaN: not growing, or under 3 days).
pub fn days_until(peaks: &[(f64, f64)], saturation: f64) -> f64 {
    if peaks.len() < 3 || !saturation.is_finite() {
        return f64::NAN;
    }
    let mx = mean(&peaks.iter().map(|p| p.0).collect::<Vec<_>>());
    let my = mean(&peaks.iter().map(|p| p.1).collect::<Vec<_>>());
    let sxx: f64 = peaks.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let sxy: f64 = peaks.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if sxx <= 0.0 || sxy <= 0.0 {
        return f64::NAN;
    }
    let slope = sxy / sxx;
    let last_day = peaks.last().map_or(0.0, |p| p.0);
    let at_last = my + slope * (last_day - mx);
    ((saturation - at_last) / slope).max(0.0)
}

fn mean_gpu_util(b: &TelemetryBatch) -> Option<f64> {
    let u: Vec<f64> = b.gpus.iter().filter_map(|g| g.utilization_ratio).collect();
    (!u.is_empty()).then(|| mean(&u))
}

fn energy_total(b: &TelemetryBatch) -> Option<f64> {
    let e: Vec<f64> = b.gpus.iter().filter_map(|g| g.energy_joules_total).collect();
    (!e.is_empty()).then(|| e.iter().sum())
}

/// `name` summed over the label sets of `endpoint`, per batch.
fn series(batches: &[TelemetryBatch], name: &str, endpoint: &str) -> Vec<(i64, f64)> {
    batches
        .iter()
        .filter_map(|b| {
            let values: Vec<f64> = b
                .samples
                .iter()
                .filter(|s| s.name == name && s.labels.get("endpoint").map(String::as_str) == Some(endpoint))
                .map(|s| s.value)
                .collect();
            (!values.is_empty()).then(|| (b.created_unix_ms, values.iter().sum()))
        })
        .collect()
}

fn model_of(batches: &[TelemetryBatch], endpoint: &str) -> String {
    batches
        .iter()
        .rev()
        .flat_map(|b| b.samples.iter())
        .filter(|s| s.labels.get("endpoint").map(String::as_str) == Some(endpoint))
        .find_map(|s| s.labels.get("model").cloned())
        .unwrap_or_default()
}

/// A counter's increase over the points, resets counted from zero.
fn increase(points: &[(i64, f64)]) -> f64 {
    if points.len() < 2 {
        return f64::NAN;
    }
    points.windows(2).map(|w| if w[1].1 >= w[0].1 { w[1].1 - w[0].1 } else { w[1].1 }).sum()
}

/// (end of interval, rate) between consecutive points.
fn per_interval_rates(points: &[(i64, f64)]) -> Vec<(i64, f64)> {
    points
        .windows(2)
        .filter_map(|w| {
            let dt = (w[1].0 - w[0].0) as f64 / 1000.0;
            let d = if w[1].1 >= w[0].1 { w[1].1 - w[0].1 } else { w[1].1 };
            (dt > 0.0).then_some((w[1].0, d / dt))
        })
        .collect()
}

fn minute_means(points: &[(i64, f64)]) -> BTreeMap<i64, f64> {
    let mut acc: BTreeMap<i64, (f64, f64)> = BTreeMap::new();
    for (t, v) in points {
        let e = acc.entry(t.div_euclid(60_000)).or_default();
        e.0 += v;
        e.1 += 1.0;
    }
    acc.into_iter().map(|(m, (sum, n))| (m, sum / n)).collect()
}

fn peak_minute(rates: &[(i64, f64)]) -> f64 {
    minute_means(rates).values().copied().fold(f64::NAN, f64::max)
}

/// p95 of the histogram's increase over the window.
fn window_quantile(batches: &[TelemetryBatch], name: &str, endpoint: &str) -> f64 {
    let hist = |b: &TelemetryBatch| {
        let mut by_le: BTreeMap<String, f64> = BTreeMap::new();
        for s in b
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels.get("endpoint").map(String::as_str) == Some(endpoint))
        {
            if let Some(le) = s.labels.get("le") {
                *by_le.entry(le.clone()).or_default() += s.value;
            }
        }
        let mut buckets: Vec<(f64, f64)> = by_le
            .into_iter()
            .filter_map(|(le, n)| {
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse::<f64>().ok()? };
                Some((bound, n))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram { buckets }
    };
    let first = batches.iter().map(hist).find(|h| !h.buckets.is_empty());
    let last = batches.iter().rev().map(hist).find(|h| !h.buckets.is_empty());
    let (Some(first), Some(last)) = (first, last) else { return f64::NAN };
    let delta = Histogram {
        buckets: last
            .buckets
            .iter()
            .map(|(le, n)| {
                let before = first.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
                (*le, if *n >= before { n - before } else { *n })
            })
            .collect(),
    };
    quantile(0.95, &delta)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
}

fn share(v: &[f64], pred: impl Fn(f64) -> bool) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().filter(|x| pred(**x)).count() as f64 / v.len() as f64 }
}

#[cfg(test)]
mod tests {
    use flotilla_common::model::{GpuSample, Sample};

    use super::*;

    fn batch(t_s: i64, util: f64, tokens: f64, waiting: f64, energy: f64) -> TelemetryBatch {
        let labels =
            |ep: &str| [("endpoint".to_owned(), ep.to_owned()), ("model".to_owned(), "llama".to_owned())].into();
        TelemetryBatch {
            created_unix_ms: t_s * 1000,
            gpus: vec![GpuSample {
                index: 0,
                utilization_ratio: Some(util),
                energy_joules_total: Some(energy),
                ..Default::default()
            }],
            samples: vec![
                Sample { name: TOKENS.into(), labels: labels("llama-1"), value: tokens },
                Sample { name: WAITING.into(), labels: labels("llama-1"), value: waiting },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_saturated_queueing_endpoint_is_measured_and_flagged() {
        // 100 tokens/s, GPU at 97 %, 8 requests waiting, 300 W.
        let batches: Vec<TelemetryBatch> =
            (0..120).map(|i| batch(i, 0.97, 100.0 * i as f64, 8.0, 300.0 * i as f64)).collect();
        let r = measure(&NodeWindow { node: "gpu-1".into(), batches, daily_peaks: BTreeMap::new() }, 0.30);
        let f = &r.endpoints[0];
        assert_eq!((f.endpoint.as_str(), f.model.as_str()), ("llama-1", "llama"));
        assert!((f.tokens_per_second - 100.0).abs() < 1e-9);
        assert!(
            (f.saturation_tokens_per_second - 100.0).abs() < 1e-9,
            "queueing at 100 tokens/s: {}",
            f.saturation_basis
        );
        assert!(f.headroom_tokens_per_second.abs() < 1e-9);
        assert!((f.joules_per_1k_tokens - 3000.0).abs() < 1e-6, "300 J/s over 100 tokens/s");
        assert!((f.cost_per_1k_tokens - 3000.0 / 3.6e6 * 0.30).abs() < 1e-12);
        assert!(f.saturated);
        let triggers: Vec<&str> = r.recommendations.iter().map(|x| x.trigger).collect();
        assert_eq!(triggers, ["gpu_utilization", "queue_depth"]);
        assert!(r.recommendations[1].evidence.contains("8.0 requests waiting"), "{:?}", r.recommendations[1]);
    }

    #[test]
    fn without_queueing_the_saturation_point_comes_from_utilisation() {
        // Utilisation rises with load: 0.1 + 0.004 per token/s; 95 % at 212.5 tokens/s.
        let mut total = 0.0;
        let batches: Vec<TelemetryBatch> = (0..60)
            .map(|i| {
                let rate = 50.0 + (i % 10) as f64 * 10.0;
                total += rate;
                batch(i, 0.1 + 0.004 * rate, total, 0.0, 0.0)
            })
            .collect();
        let r = measure(&NodeWindow { node: "n".into(), batches, daily_peaks: BTreeMap::new() }, 0.0);
        let f = &r.endpoints[0];
        assert!(
            (f.saturation_tokens_per_second - 212.5).abs() < 5.0,
            "{} ({})",
            f.saturation_tokens_per_second,
            f.saturation_basis
        );
        assert!(f.headroom_ratio > 0.3, "{f:?}");
        assert!(f.cost_per_1k_tokens.is_nan(), "no price, no cost");
        assert!(r.recommendations.is_empty(), "{:?}", r.recommendations);
    }

    #[test]
    fn idle_gpus_are_consolidation_hints_and_growth_gives_days_left() {
        let batches: Vec<TelemetryBatch> = (0..30).map(|i| batch(i, 0.02, 0.0, 0.0, 0.0)).collect();
        let r = measure(&NodeWindow { node: "n".into(), batches, daily_peaks: BTreeMap::new() }, 0.0);
        assert!(r.recommendations.iter().any(|x| x.trigger == "idle_gpu" && x.kind == "consolidate"));
        // Peaks grow 10 tokens/s a day from 100; saturation 200: 10 days after the last (day 4, 140).
        let peaks: Vec<(f64, f64)> = (0..5).map(|d| (f64::from(d), 100.0 + 10.0 * f64::from(d))).collect();
        assert!((days_until(&peaks, 200.0) - 6.0).abs() < 1e-9);
        assert!(days_until(&peaks[..2], 200.0).is_nan(), "under three days");
        assert!(days_until(&[(0.0, 5.0), (1.0, 4.0), (2.0, 3.0)], 10.0).is_nan(), "shrinking load");
        let empty = measure(&NodeWindow { node: "n".into(), ..Default::default() }, 0.0);
        assert!(empty.notes[0].contains("no telemetry"));
    }
}
