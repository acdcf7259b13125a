//! The health gates' arithmetic: counters read at the start of a bake are
//! subtracted from the counters now, per server and per replica, and the new
//! revision's error ratio, p95 latency (both from the gateway's access log, so
//! old and new are measured by the same hand) and p95 time to first token (from
//! the replicas' own metrics) are compared with absolute limits and with the old
//! revision over the same window. Pure.

use std::time::Duration;

use super::model::{Counters, GateReading, Histogram};
use super::spec::Gates;

/// Which servers and replicas belong to which side.
#[derive(Debug, Clone, Default)]
pub struct Sides {
    pub old_servers: Vec<String>,
    pub new_servers: Vec<String>,
    /// `node/container` keys into [`Counters::ttft`].
    pub old_replicas: Vec<String>,
    pub new_replicas: Vec<String>,
}

pub const PASS: &str = "pass";
pub const FAIL: &str = "fail";
pub const NO_DATA: &str = "no data";

/// The gate readings for the window from `start` to `now`.
pub fn evaluate(gates: &Gates, start: &Counters, now: &Counters, sides: &Sides) -> Vec<GateReading> {
    let delta = |keys: &[String]| {
        let mut responses = 0.0;
        let mut errors = 0.0;
        let mut latency = Histogram::default();
        for k in keys {
            let Some(n) = now.servers.get(k) else { continue };
            let s = start.servers.get(k).cloned().unwrap_or_default();
            responses += increase(s.responses, n.responses);
            errors += increase(s.errors, n.errors);
            latency = add(&latency, &diff(&s.latency, &n.latency));
        }
        (responses, errors, latency)
    };
    let (new_n, new_err, new_lat) = delta(&sides.new_servers);
    let (old_n, old_err, old_lat) = delta(&sides.old_servers);
    let min = gates.min_requests as f64;
    let mut out = Vec::new();

    let new_ratio = if new_n > 0.0 { new_err / new_n } else { f64::NAN };
    let old_ratio = if old_n >= min && old_n > 0.0 { old_err / old_n } else { f64::NAN };
    let mut limit = gates.error_ratio;
    if old_ratio.is_finite() {
        limit = limit.min(old_ratio * gates.baseline_factor + gates.error_ratio_margin);
    }
    out.push(reading(
        "error_ratio",
        new_ratio,
        old_ratio,
        limit,
        new_n >= min && new_n > 0.0,
        format!("{new_err} of {new_n} answers failed (old: {old_err} of {old_n})"),
    ));

    let new_p95 = quantile(0.95, &new_lat);
    let old_p95 = if old_n >= min { quantile(0.95, &old_lat) } else { f64::NAN };
    out.push(ratio_gate(
        "p95_latency_seconds",
        new_p95,
        old_p95,
        gates.p95_latency,
        gates,
        new_n >= min && new_n > 0.0,
    ));

    let ttft = |keys: &[String]| {
        keys.iter().fold(Histogram::default(), |acc, k| match now.ttft.get(k) {
            Some(n) => add(&acc, &diff(&start.ttft.get(k).cloned().unwrap_or_default(), n)),
            None => acc,
        })
    };
    let (new_t, old_t) = (ttft(&sides.new_replicas), ttft(&sides.old_replicas));
    let new_count = total(&new_t);
    let old_count = total(&old_t);
    let old_ttft = if old_count >= min { quantile(0.95, &old_t) } else { f64::NAN };
    out.push(ratio_gate(
        "p95_ttft_seconds",
        quantile(0.95, &new_t),
        old_ttft,
        gates.p95_ttft,
        gates,
        new_count >= min && new_count > 0.0,
    ));
    out
}

fn ratio_gate(gate: &str, value: f64, baseline: f64, abs: Duration, gates: &Gates, enough: bool) -> GateReading {
    let mut limit = abs.as_secs_f64();
    if baseline.is_finite() && baseline > 0.0 {
        limit = limit.min(baseline * gates.baseline_factor).max(0.0);
    }
    let detail = if baseline.is_finite() {
        format!("new {value:.3}s, old {baseline:.3}s over the same window")
    } else {
        format!("new {value:.3}s")
    };
    reading(gate, value, baseline, limit, enough, detail)
}

fn reading(gate: &str, value: f64, baseline: f64, limit: f64, enough: bool, detail: String) -> GateReading {
    let verdict = if !enough || !value.is_finite() {
        NO_DATA
    } else if value > limit {
        FAIL
    } else {
        PASS
    };
    GateReading { gate: gate.to_owned(), value, baseline, limit, verdict: verdict.to_owned(), detail }
}

/// A counter's increase, a reset (the value fell) counting from zero.
fn increase(before: f64, after: f64) -> f64 {
    if after >= before { after - before } else { after }
}

fn diff(before: &Histogram, after: &Histogram) -> Histogram {
    Histogram {
        buckets: after
            .buckets
            .iter()
            .map(|(le, n)| {
                let b = before.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
                (*le, increase(b, *n))
            })
            .collect(),
    }
}

fn add(a: &Histogram, b: &Histogram) -> Histogram {
    let mut buckets = a.buckets.clone();
    for (le, n) in &b.buckets {
        match buckets.iter_mut().find(|(l, _)| l == le) {
            Some((_, c)) => *c += n,
            None => buckets.push((*le, *n)),
        }
    }
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    Histogram { buckets }
}

fn total(h: &Histogram) -> f64 {
    h.buckets.last().map_or(0.0, |(_, n)| *n)
}

/// `histogram_quantile` as Prometheus computes it: linear within the bucket,
/// the lower bound of the `+Inf` bucket when the rank falls there.
pub fn quantile(q: f64, h: &Histogram) -> f64 {
    let count = total(h);
    if count <= 0.0 {
        return f64::NAN;
    }
    let rank = q * count;
    let mut prev_le = 0.0;
    let mut prev_n = 0.0;
    for (le, n) in &h.buckets {
        if *n >= rank {
            if le.is_infinite() {
                return prev_le;
            }
            let in_bucket = n - prev_n;
            if in_bucket <= 0.0 {
                return *le;
            }
            return prev_le + (le - prev_le) * (rank - prev_n) / in_bucket;
        }
        prev_le = *le;
        prev_n = *n;
    }
    prev_le
}

#[cfg(test)]
mod tests {
    use super::super::model::ServerCounters;
    use super::*;

    fn hist(pairs: &[(f64, f64)]) -> Histogram {
        Histogram { buckets: pairs.to_vec() }
    }

    fn server(responses: f64, errors: f64, latency: Histogram) -> ServerCounters {
        ServerCounters { responses, errors, latency }
    }

    fn sides() -> Sides {
        Sides {
            old_servers: vec!["old:1".into()],
            new_servers: vec!["new:1".into()],
            old_replicas: vec!["a/x-1".into()],
            new_replicas: vec!["a/x-2".into()],
        }
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let h = hist(&[(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (f64::INFINITY, 100.0)]);
        assert!((quantile(0.5, &h) - 0.1).abs() < 1e-9);
        assert!((quantile(0.95, &h) - 0.75).abs() < 1e-9);
        assert!(quantile(0.95, &Histogram::default()).is_nan());
        let tail = hist(&[(1.0, 1.0), (f64::INFINITY, 10.0)]);
        assert_eq!(quantile(0.95, &tail), 1.0);
    }

    #[test]
    fn a_failing_new_revision_fails_the_error_gate_over_the_window_only() {
        let gates = Gates::default();
        let lat = hist(&[(0.1, 0.0), (f64::INFINITY, 0.0)]);
        let mut start = Counters::default();
        start.servers.insert("old:1".into(), server(1000.0, 900.0, lat.clone()));
        start.servers.insert("new:1".into(), server(0.0, 0.0, lat.clone()));
        let mut now = start.clone();
        // The old side's history of errors before the window does not count.
        now.servers.insert("old:1".into(), server(1100.0, 900.0, hist(&[(0.1, 100.0), (f64::INFINITY, 100.0)])));
        now.servers.insert("new:1".into(), server(40.0, 10.0, hist(&[(0.1, 40.0), (f64::INFINITY, 40.0)])));
        let r = evaluate(&gates, &start, &now, &sides());
        assert_eq!(r[0].gate, "error_ratio");
        assert_eq!(r[0].verdict, FAIL, "{r:?}");
        assert!((r[0].value - 0.25).abs() < 1e-9);
        assert_eq!(r[0].baseline, 0.0);
        assert!((r[0].limit - 0.01).abs() < 1e-9, "baseline 0 × 1.5 + 0.01 margin");
        assert_eq!(r[1].verdict, PASS);
        assert_eq!(r[2].verdict, NO_DATA, "no TTFT series at all");
    }

    #[test]
    fn too_little_traffic_is_no_data_and_a_counter_reset_counts_from_zero() {
        let gates = Gates::default();
        let mut start = Counters::default();
        start.servers.insert("new:1".into(), server(500.0, 0.0, Histogram::default()));
        let mut now = Counters::default();
        // The agent restarted: its counters started over.
        now.servers.insert("new:1".into(), server(5.0, 5.0, Histogram::default()));
        let r = evaluate(&gates, &start, &now, &sides());
        assert_eq!(r[0].verdict, NO_DATA);
        assert!((r[0].value - 1.0).abs() < 1e-9);
    }

    #[test]
    fn slower_than_the_baseline_by_more_than_the_factor_fails() {
        let gates = Gates::default();
        let start = Counters::default();
        let mut now = Counters::default();
        let fast = hist(&[(0.1, 100.0), (0.2, 100.0), (1.0, 100.0), (f64::INFINITY, 100.0)]);
        let slow = hist(&[(0.1, 0.0), (0.2, 0.0), (1.0, 100.0), (f64::INFINITY, 100.0)]);
        now.servers.insert("old:1".into(), server(100.0, 0.0, fast.clone()));
        now.servers.insert("new:1".into(), server(100.0, 0.0, slow));
        now.ttft.insert("a/x-1".into(), fast.clone());
        now.ttft.insert("a/x-2".into(), fast);
        let r = evaluate(&gates, &start, &now, &sides());
        assert_eq!(r[1].verdict, FAIL, "{:?}", r[1]);
        assert!(r[1].limit < 0.2, "1.5 × the old p95 (0.095 s), below the 5 s absolute limit");
        assert_eq!(r[2].verdict, PASS, "{:?}", r[2]);
    }
}
