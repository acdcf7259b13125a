//! Unit tests of the evaluator: hand-computed cases, refusals with their
//! columns, static label names, and randomised properties.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{EvalError, Expr, Sample};
use crate::alert::window::{STALE_MARKER, Window};

const S: i64 = 1000;
const M: i64 = 60 * S;

fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// `name{a="b", ...} value` for each sample.
fn show(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .map(|s| {
            let name = s.labels.iter().find(|(k, _)| k == "__name__").map_or("", |(_, v)| v.as_str());
            let rest: Vec<String> =
                s.labels.iter().filter(|(k, _)| k != "__name__").map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}} {}", rest.join(", "), s.value)
        })
        .collect()
}

fn eval(w: &Window, expr: &str, t: i64) -> Vec<String> {
    show(
        &Expr::parse(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .eval(w, t)
            .unwrap_or_else(|e| panic!("{expr}: {e}")),
    )
}

fn eval_err(w: &Window, expr: &str, t: i64) -> EvalError {
    Expr::parse(expr).unwrap().eval(w, t).unwrap_err()
}

/// Gauges `temp` for nodes a and b, a counter `req_total` with a reset on a,
/// each sampled every 15 s from 0 to 10 min.
fn fleet() -> Window {
    let mut w = Window::new(Duration::from_secs(3600));
    for i in 0..=40 {
        let t = i * 15 * S;
        w.push("temp", &l(&[("node", "a"), ("gpu", "0")]), t, 50.0 + i as f64);
        w.push("temp", &l(&[("node", "b"), ("gpu", "0")]), t, 70.0);
        // 0, 10, 20, ... then a reset to 0 at i = 20.
        let c = if i < 20 { i * 10 } else { (i - 20) * 10 };
        w.push("req_total", &l(&[("node", "a")]), t, c as f64);
        w.push("req_total", &l(&[("node", "b")]), t, (i * 3) as f64);
    }
    w
}

#[test]
fn instant_selectors_use_matchers_lookback_and_offset() {
    let w = fleet();
    assert_eq!(eval(&w, r#"temp{node="a"}"#, 10 * M), ["temp{gpu=\"0\", node=\"a\"} 90"]);
    assert_eq!(eval(&w, r#"temp{node!="a"}"#, 10 * M), ["temp{gpu=\"0\", node=\"b\"} 70"]);
    assert_eq!(eval(&w, r#"temp{node=~"a|c"}"#, 10 * M).len(), 1);
    assert_eq!(eval(&w, r#"temp{node!~"a.*"}"#, 10 * M).len(), 1);
    assert_eq!(eval(&w, r#"{__name__=~"te.*", node="b"}"#, 10 * M), ["temp{gpu=\"0\", node=\"b\"} 70"]);
    assert_eq!(eval(&w, r#"temp{missing=""}"#, 10 * M).len(), 2, "an absent label matches the empty string");
    // Between samples the newest one counts; offset moves the evaluation back.
    assert_eq!(eval(&w, r#"temp{node="a"}"#, 10 * M - 1), ["temp{gpu=\"0\", node=\"a\"} 89"]);
    assert_eq!(eval(&w, r#"temp{node="a"} offset 1m"#, 10 * M), ["temp{gpu=\"0\", node=\"a\"} 86"]);
    // The lookback is closed: a sample exactly 5 minutes old still counts.
    assert_eq!(eval(&w, r#"temp{node="a"}"#, 15 * M), ["temp{gpu=\"0\", node=\"a\"} 90"]);
    assert!(eval(&w, r#"temp{node="a"}"#, 15 * M + 1).is_empty());
    assert!(eval(&w, "temp", -1).is_empty(), "nothing before the first sample");
    assert!(eval(&w, "nothing_here", 10 * M).is_empty());
}

#[test]
fn stale_markers_hide_a_series() {
    let mut w = Window::new(Duration::from_secs(3600));
    w.push("x", &[], 0, 1.0);
    w.push("x", &[], 15 * S, STALE_MARKER);
    w.push("x", &[], 30 * S, 3.0);
    assert_eq!(eval(&w, "x", 10 * S), ["x{} 1"]);
    assert!(eval(&w, "x", 20 * S).is_empty());
    assert_eq!(eval(&w, "x", 30 * S), ["x{} 3"]);
    assert_eq!(eval(&w, "count_over_time(x[1m])", 30 * S), ["{} 2"], "range selectors skip the marker");
    // An ordinary NaN is a value.
    w.push("x", &[], 45 * S, f64::NAN);
    assert_eq!(eval(&w, "x", 45 * S), ["x{} NaN"]);
}

#[test]
fn range_functions_match_hand_computation() {
    let w = fleet();
    let t = 10 * M;
    // Node b: 3 per 15 s, sampled at both ends of the range: exactly 0.2/s.
    assert_eq!(eval(&w, r#"rate(req_total{node="b"}[5m])"#, t), ["{node=\"b\"} 0.2"]);
    assert_eq!(eval(&w, r#"increase(req_total{node="b"}[5m])"#, t), ["{node=\"b\"} 60"]);
    // Node a over [5 min, 10 min]: 0..200 from the reset on.
    assert_eq!(eval(&w, r#"increase(req_total{node="a"}[5m])"#, t), ["{node=\"a\"} 200"]);
    // Over [4 min, 10 min]: 160..190, a reset, 0..200: the reset adds 190.
    assert_eq!(eval(&w, r#"increase(req_total{node="a"}[6m])"#, t), ["{node=\"a\"} 230"]);
    assert_eq!(eval(&w, r#"delta(req_total{node="a"}[6m])"#, t), ["{node=\"a\"} 40"]);
    assert_eq!(eval(&w, r#"irate(req_total{node="b"}[1m])"#, t), ["{node=\"b\"} 0.2"]);
    assert_eq!(eval(&w, r#"idelta(temp{node="a"}[1m])"#, t), ["{gpu=\"0\", node=\"a\"} 1"]);
    // Range boundaries are closed: [9 min, 10 min] holds five samples.
    assert_eq!(eval(&w, r#"count_over_time(temp{node="a"}[1m])"#, t), ["{gpu=\"0\", node=\"a\"} 5"]);
    assert_eq!(eval(&w, r#"sum_over_time(temp{node="a"}[1m])"#, t), ["{gpu=\"0\", node=\"a\"} 440"]);
    assert_eq!(eval(&w, r#"avg_over_time(temp{node="a"}[1m])"#, t), ["{gpu=\"0\", node=\"a\"} 88"]);
    assert_eq!(eval(&w, r#"min_over_time(temp{node="a"}[1m])"#, t), ["{gpu=\"0\", node=\"a\"} 86"]);
    assert_eq!(eval(&w, r#"max_over_time(temp{node="a"}[1m] offset 1m)"#, t), ["{gpu=\"0\", node=\"a\"} 86"]);
    assert_eq!(eval(&w, r#"quantile_over_time(0.5, temp{node="a"}[1m])"#, t), ["{gpu=\"0\", node=\"a\"} 88"]);
    assert_eq!(eval(&w, r#"stddev_over_time(temp{node="b"}[1m])"#, t), ["{gpu=\"0\", node=\"b\"} 0"]);
    assert_eq!(eval(&w, r#"present_over_time(temp{node="b"}[1m])"#, t), ["{gpu=\"0\", node=\"b\"} 1"]);
    assert_eq!(
        eval(&w, r#"last_over_time(temp{node="b"}[1m])"#, t),
        ["temp{gpu=\"0\", node=\"b\"} 70"],
        "last_over_time keeps the name"
    );
    assert!(eval(&w, "rate(req_total[5m])", 0).is_empty(), "one sample is not enough for a rate");
    assert!(eval(&w, "count_over_time(temp[1m])", 20 * M).is_empty(), "no samples in range");
}

#[test]
fn names_are_dropped_where_prometheus_drops_them() {
    let w = fleet();
    let t = 10 * M;
    assert_eq!(eval(&w, r#"temp{node="b"} + 1"#, t), ["{gpu=\"0\", node=\"b\"} 71"]);
    assert_eq!(eval(&w, r#"-temp{node="b"}"#, t), ["{gpu=\"0\", node=\"b\"} -70"]);
    assert_eq!(eval(&w, r#"abs(-temp{node="b"})"#, t), ["{gpu=\"0\", node=\"b\"} 70"]);
    assert_eq!(eval(&w, r#"temp{node="b"} > 1"#, t), ["temp{gpu=\"0\", node=\"b\"} 70"]);
    assert_eq!(eval(&w, r#"temp{node="b"} > bool 1"#, t), ["{gpu=\"0\", node=\"b\"} 1"]);
    assert_eq!(eval(&w, r#"1 < temp{node="b"}"#, t), ["temp{gpu=\"0\", node=\"b\"} 70"], "the vector's value");
    assert_eq!(eval(&w, r#"100 < bool temp{node="b"}"#, t), ["{gpu=\"0\", node=\"b\"} 0"]);
    assert_eq!(eval(&w, "topk(1, temp)", t), ["temp{gpu=\"0\", node=\"a\"} 90"]);
    assert_eq!(eval(&w, "bottomk(1, temp)", t), ["temp{gpu=\"0\", node=\"b\"} 70"]);
    assert_eq!(eval(&w, "max by (gpu) (temp)", t), ["{gpu=\"0\"} 90"]);
    assert_eq!(eval(&w, "clamp_max(temp, 80)", t), ["{gpu=\"0\", node=\"a\"} 80", "{gpu=\"0\", node=\"b\"} 70"]);
    assert_eq!(eval(&w, "clamp_min(temp, 80)", t), ["{gpu=\"0\", node=\"a\"} 90", "{gpu=\"0\", node=\"b\"} 80"]);
}

#[test]
fn aggregations_group_by_and_without() {
    let w = fleet();
    let t = 10 * M;
    assert_eq!(eval(&w, "sum(temp)", t), ["{} 160"]);
    assert_eq!(eval(&w, "sum by (node) (temp)", t), ["{node=\"a\"} 90", "{node=\"b\"} 70"]);
    assert_eq!(eval(&w, "sum without (node) (temp)", t), ["{gpu=\"0\"} 160"]);
    assert_eq!(eval(&w, "avg(temp)", t), ["{} 80"]);
    assert_eq!(eval(&w, "count(temp)", t), ["{} 2"]);
    assert_eq!(eval(&w, "group by (gpu) (temp)", t), ["{gpu=\"0\"} 1"]);
    assert_eq!(eval(&w, "min(temp)", t), ["{} 70"]);
    assert_eq!(eval(&w, "stddev(temp)", t), ["{} 10"]);
    assert_eq!(eval(&w, "stdvar(temp)", t), ["{} 100"]);
    assert_eq!(eval(&w, "sum by (missing) (temp)", t), ["{} 160"]);
    assert_eq!(eval(&w, "topk by (node) (1, temp)", t).len(), 2);
    assert!(eval(&w, "topk(0, temp)", t).is_empty());
    assert!(eval(&w, "sum(nothing)", t).is_empty());
    assert!(matches!(eval_err(&w, "topk(scalar(nothing), temp)", t), EvalError::ParamOverflow { .. }));
}

#[test]
fn comparisons_set_operators_and_matching() {
    let w = fleet();
    let t = 10 * M;
    assert_eq!(eval(&w, "temp > 80", t), ["temp{gpu=\"0\", node=\"a\"} 90"]);
    assert_eq!(eval(&w, "temp == bool 70", t), ["{gpu=\"0\", node=\"a\"} 0", "{gpu=\"0\", node=\"b\"} 1"]);
    assert_eq!(eval(&w, r#"temp and temp{node="a"}"#, t), ["temp{gpu=\"0\", node=\"a\"} 90"]);
    assert_eq!(eval(&w, r#"temp unless temp{node="a"}"#, t), ["temp{gpu=\"0\", node=\"b\"} 70"]);
    assert_eq!(eval(&w, r#"temp{node="a"} or temp"#, t).len(), 2);
    assert_eq!(eval(&w, "temp and on (node) req_total", t).len(), 2);
    assert!(eval(&w, "temp and req_total", t).is_empty(), "gpu differs");
    assert_eq!(eval(&w, "temp and ignoring (gpu) req_total", t).len(), 2);
    // one-to-one with on(): the result keeps only the `on` labels.
    assert_eq!(eval(&w, "temp - on (node) req_total", t), ["{node=\"a\"} -110", "{node=\"b\"} -50"]);
    assert_eq!(eval(&w, "temp - ignoring (gpu) req_total", t), ["{node=\"a\"} -110", "{node=\"b\"} -50"]);
    // Comparisons keep the left side's name unless on() drops it.
    assert_eq!(eval(&w, "temp < ignoring (gpu) req_total", t), ["temp{node=\"a\"} 90", "temp{node=\"b\"} 70"]);
    assert_eq!(eval(&w, "temp > bool ignoring (gpu) req_total", t), ["{node=\"a\"} 0", "{node=\"b\"} 0"]);
    // group_left copies labels from the "one" side.
    assert_eq!(
        eval(&w, "temp * on () group_left () count(temp)", t),
        ["{gpu=\"0\", node=\"a\"} 180", "{gpu=\"0\", node=\"b\"} 140"]
    );
    // Copying node from the one side makes both results alike: an error.
    let err = eval_err(&w, r#"temp / on (gpu) group_left (node) temp{node="b"}"#, t);
    assert!(matches!(err, EvalError::ManyToOneMultiple), "{err}");
    let mut w2 = fleet();
    w2.push("info", &l(&[("node", "a"), ("zone", "z1")]), t, 1.0);
    w2.push("info", &l(&[("node", "b"), ("zone", "z2")]), t, 2.0);
    assert_eq!(
        eval(&w2, "temp * on (node) group_left (zone) info", t),
        ["{gpu=\"0\", node=\"a\", zone=\"z1\"} 90", "{gpu=\"0\", node=\"b\", zone=\"z2\"} 140"]
    );
    assert_eq!(
        eval(&w2, "info * on (node) group_right (zone) temp", t),
        ["{gpu=\"0\", node=\"a\", zone=\"z1\"} 90", "{gpu=\"0\", node=\"b\", zone=\"z2\"} 140"]
    );
    assert_eq!(
        eval(&w2, "info < on (node) group_right (zone) temp", t),
        ["temp{gpu=\"0\", node=\"a\", zone=\"z1\"} 1", "temp{gpu=\"0\", node=\"b\", zone=\"z2\"} 2"],
        "the value is the left operand's, the labels the many side's"
    );
    assert_eq!(eval(&w, r#"count(temp / on (gpu) group_left temp{node="b"})"#, t), ["{} 2"]);
    assert_eq!(eval(&w, "sum(temp) by (gpu) / on (gpu) group_right sum(temp) by (gpu, node)", t).len(), 2);
}

#[test]
fn matching_errors_follow_prometheus() {
    let w = fleet();
    let t = 10 * M;
    let many = eval_err(&w, "req_total + on () temp", t);
    assert!(matches!(many, EvalError::ManyToMany { side: "right", .. }), "{many}");
    assert!(many.to_string().contains("many-to-many matching not allowed"), "{many}");
    assert!(matches!(eval_err(&w, "temp + on () sum(temp)", t), EvalError::OneToOneMultiple));
    assert!(eval(&w, "temp + on (gpu) sum(temp)", t).is_empty(), "no gpu label on the right: no match");
    assert_eq!(eval(&w, "temp + on () group_left sum(temp) by (gpu)", t).len(), 2);
    let err = eval_err(&w, "temp + on () group_left (node) sum(temp) by (gpu)", t);
    assert!(matches!(err, EvalError::ManyToOneMultiple), "{err}");
    // A filtering comparison that keeps one element avoids the error, as in Prometheus.
    assert_eq!(eval(&w, "temp > on () sum(temp) - 80", t), ["{} 90"]);
    let mut w2 = Window::new(Duration::from_secs(3600));
    w2.push("a", &l(&[("x", "1")]), 0, 1.0);
    w2.push("b", &l(&[("x", "1")]), 0, 2.0);
    let dup = eval_err(&w2, r#"{__name__=~"a|b"} * 2"#, 0);
    assert!(matches!(dup, EvalError::DuplicateSeries { .. }), "{dup}");
    assert_eq!(dup.to_string(), "vector cannot contain metrics with the same labelset: {x=\"1\"}");
    assert!(matches!(eval_err(&w2, r#"abs({__name__=~"a|b"})"#, 0), EvalError::DuplicateSeries { .. }));
    assert_eq!(eval(&w2, r#"{__name__=~"a|b"} > 0"#, 0), ["a{x=\"1\"} 1", "b{x=\"1\"} 2"]);
}

#[test]
fn absent_reports_equality_matchers() {
    let w = fleet();
    let t = 10 * M;
    assert!(eval(&w, "absent(temp)", t).is_empty());
    assert_eq!(eval(&w, r#"absent(nothing{job="x", node=~"a", env="p", env="q", e=""})"#, t), ["{job=\"x\"} 1"]);
    assert_eq!(eval(&w, r#"absent((nothing{job="x"}))"#, t), ["{} 1"], "not a bare selector");
    assert_eq!(eval(&w, r#"absent(sum(nothing{job="x"}))"#, t), ["{} 1"]);
    assert_eq!(eval(&w, r#"absent_over_time(nothing{job="x"}[5m])"#, t), ["{job=\"x\"} 1"]);
    assert!(eval(&w, r#"absent_over_time(temp{node="a"}[5m])"#, 14 * M).is_empty());
    assert_eq!(eval(&w, r#"absent_over_time(temp{node="a"}[1m])"#, 14 * M), ["{node=\"a\"} 1"]);
}

#[test]
fn histogram_quantile_groups_buckets_by_labels() {
    let mut w = Window::new(Duration::from_secs(3600));
    for (le, count) in [("0.1", 10.0), ("0.5", 60.0), ("1", 90.0), ("+Inf", 100.0)] {
        w.push("lat_bucket", &l(&[("node", "a"), ("le", le)]), 0, count);
        w.push("lat_bucket", &l(&[("node", "b"), ("le", le)]), 0, count / 10.0);
    }
    w.push("lat_bucket", &l(&[("node", "c"), ("le", "1")]), 0, 1.0);
    w.push("lat_bucket", &l(&[("node", "d")]), 0, 1.0);
    assert_eq!(
        eval(&w, "histogram_quantile(0.5, lat_bucket)", 0),
        ["{node=\"a\"} 0.42000000000000004", "{node=\"b\"} 0.42000000000000004", "{node=\"c\"} NaN"]
    );
    assert_eq!(eval(&w, "histogram_quantile(0.95, sum by (le) (lat_bucket))", 0), ["{} 1"]);
    assert_eq!(eval(&w, r#"histogram_quantile(2, lat_bucket{node="a"})"#, 0), ["{node=\"a\"} inf"]);
}

#[test]
fn scalars_and_arithmetic_follow_go_floats() {
    let w = fleet();
    assert_eq!(eval(&w, "1 + 2 * 3 ^ 2", 0), ["{} 19"]);
    assert_eq!(eval(&w, "2 ^ 3 ^ 2", 0), ["{} 512"], "^ is right-associative");
    assert_eq!(eval(&w, "1 / 0", 0), ["{} inf"]);
    assert_eq!(eval(&w, "-1 / 0", 0), ["{} -inf"]);
    assert_eq!(eval(&w, "0 / 0", 0), ["{} NaN"]);
    assert_eq!(eval(&w, "-7 % 3", 0), ["{} -1"]);
    assert_eq!(eval(&w, "5 % 0", 0), ["{} NaN"]);
    assert_eq!(eval(&w, "1 > bool 0", 0), ["{} 1"]);
    assert_eq!(eval(&w, "time()", 90 * S), ["{} 90"]);
    assert_eq!(eval(&w, "vector(time())", 1500), ["{} 1.5"]);
    assert_eq!(eval(&w, r#"scalar(temp{node="b"})"#, 10 * M), ["{} 70"]);
    assert_eq!(eval(&w, "scalar(temp)", 10 * M), ["{} NaN"], "more than one element");
    assert_eq!(eval(&w, "-(1)", 0), ["{} -1"]);
    assert_eq!(eval(&w, "NaN == bool NaN", 0), ["{} 0"]);
    assert_eq!(eval(&w, "temp / 0", 10 * M), ["{gpu=\"0\", node=\"a\"} inf", "{gpu=\"0\", node=\"b\"} inf"]);
}

/// What a refusal says: its column and a fragment of its message.
#[test]
fn unsupported_constructs_are_refused_with_their_column() {
    for (text, column, what) in [
        (
            r#"label_replace(x, "a", "b", "c", "d")"#,
            1,
            "the function label_replace() is not supported; supported functions: abs, absent",
        ),
        ("x + round(y)", 5, "the function round() is not supported"),
        ("quantile(0.9, x)", 1, "the aggregation quantile is not supported; supported aggregations: avg"),
        (r#"count_values("v", x)"#, 1, "the aggregation count_values"),
        ("sum(x) + max_over_time(x[5m:1m])", 25, "a subquery"),
        ("x @ 100", 3, "the @ modifier"),
        ("rate(x[5m] offset -1m)", 12, "a negative offset"),
        (r#"x{a="1" or b="2"}"#, 9, "`or` between label matchers"),
        ("x atan2 y", 3, "the operator atan2"),
        ("x + fill(0) y", 5, "the fill modifiers"),
        ("x[5m]", 1, "a range vector cannot be a rule's result"),
        (r#""text""#, 1, "a string literal"),
        ("rate(x)", 1, "does not parse: expected type matrix"),
        ("sum(", 1, "does not parse"),
        ("1 > 2", 1, "comparisons between scalars must use BOOL modifier"),
        ("x * on () 2", 1, "vector matching (on, ignoring, group_left, group_right) needs two instant vectors"),
        (r#"x{a=~"("}"#, 1, "does not parse"),
        ("", 1, "does not parse"),
    ] {
        let err = Expr::parse(text).unwrap_err();
        assert_eq!(err.column, column, "{text}: {err}");
        assert!(err.message.contains(what), "{text}: {err}");
        assert!(err.to_string().starts_with(&format!("at column {column}: ")), "{err}");
    }
}

#[test]
fn label_names_are_known_statically() {
    let catalog = |name: &str| match name {
        "temp" => Some(vec!["node".to_owned(), "gpu".to_owned()]),
        "req_total" => Some(vec!["node".to_owned()]),
        "lat_bucket" => Some(vec!["node".to_owned(), "le".to_owned()]),
        _ => None,
    };
    let names = |text: &str| {
        Expr::parse(text).unwrap().label_names(&catalog).map(|s| s.into_iter().collect::<Vec<_>>().join(","))
    };
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(names("temp"), some("gpu,node"));
    assert_eq!(names("unknown"), None);
    assert_eq!(names(r#"{__name__=~"temp"}"#), None);
    assert_eq!(names("sum by (node, rack) (temp)"), some("node"));
    assert_eq!(names("sum by (node, rack) (unknown)"), some("node,rack"));
    assert_eq!(names("sum without (gpu) (temp)"), some("node"));
    assert_eq!(names("sum without (gpu) (unknown)"), None);
    assert_eq!(names("sum(temp)"), some(""));
    assert_eq!(names("topk(3, temp)"), some("gpu,node"));
    assert_eq!(names("rate(req_total[5m]) > 3"), some("node"));
    assert_eq!(names("histogram_quantile(0.9, rate(lat_bucket[5m]))"), some("node"));
    assert_eq!(names(r#"absent(temp{node="a", gpu=~"1"})"#), some("node"));
    assert_eq!(names("temp / on (node) req_total"), some("node"));
    assert_eq!(names("temp / ignoring (gpu) req_total"), some("node"));
    assert_eq!(names("temp / on (node) group_left (zone) req_total"), some("gpu,node,zone"));
    assert_eq!(names("req_total / on (node) group_right temp"), some("gpu,node"));
    assert_eq!(names("temp or req_total"), some("gpu,node"));
    assert_eq!(names("temp or unknown"), None);
    assert_eq!(names("req_total unless temp"), some("node"));
    assert_eq!(names("1 + 2"), some(""));
    assert_eq!(names("vector(1)"), some(""));
    assert_eq!(names("-clamp_min(temp, 0)"), some("gpu,node"));
}

#[test]
fn selects_and_reach() {
    let e = Expr::parse(r#"rate(req_total{node=~"a|b"}[10m] offset 1m) > on (node) temp{gpu="0"}"#).unwrap();
    assert!(e.selects("req_total", &l(&[("node", "a")])));
    assert!(!e.selects("req_total", &l(&[("node", "c")])));
    assert!(e.selects("temp", &l(&[("node", "c"), ("gpu", "0")])));
    assert!(!e.selects("temp", &l(&[("node", "c")])));
    assert!(!e.selects("other", &[]));
    assert_eq!(e.reach(), Duration::from_secs(11 * 60 + 5 * 60));
    assert_eq!(Expr::parse("1").unwrap().reach(), Duration::from_secs(300));
    assert_eq!(e.text(), r#"rate(req_total{node=~"a|b"}[10m] offset 1m) > on (node) temp{gpu="0"}"#);
}

/// Randomised: a window of random series and random expressions built from
/// the supported constructs never panics, and a few identities hold.
#[test]
fn random_windows_and_expressions() {
    let mut rng = StdRng::seed_from_u64(7);
    let atoms = [
        "x",
        r#"x{node="n1"}"#,
        r#"y{node=~"n[12]"}"#,
        "rate(x[1m])",
        "increase(y[2m] offset 30s)",
        "max_over_time(x[1m])",
        "quantile_over_time(0.3, y[1m])",
        "histogram_quantile(0.9, sum by (le) (rate(h_bucket[1m])))",
        "sum by (node) (x)",
        "topk(2, y)",
        "absent(z)",
        "vector(1)",
        "scalar(x)",
        "time()",
        "3",
    ];
    let ops = ["+", "-", "*", "/", "%", "^", "==", "!=", ">", "<", ">=", "<=", "and", "or", "unless"];
    for round in 0..60 {
        let mut w = Window::new(Duration::from_secs(600));
        for node in ["n1", "n2", "n3"] {
            let mut t = 0;
            let mut c = 0.0;
            while t < 5 * M {
                t += rng.random_range(1..30) * S;
                c += if rng.random_bool(0.1) { -c } else { rng.random_range(0.0..10.0) };
                w.push("x", &l(&[("node", node)]), t, rng.random_range(-5.0..5.0));
                w.push("y", &l(&[("node", node)]), t, c);
                for le in ["0.5", "1", "+Inf"] {
                    w.push("h_bucket", &l(&[("node", node), ("le", le)]), t, c * le.len() as f64);
                }
            }
        }
        for _ in 0..40 {
            let a = atoms[rng.random_range(0..atoms.len())];
            let b = atoms[rng.random_range(0..atoms.len())];
            let op = ops[rng.random_range(0..ops.len())];
            let comparison = matches!(op, "==" | "!=" | ">" | "<" | ">=" | "<=");
            let modifier = if comparison && rng.random_bool(0.5) { " bool" } else { "" };
            let text = format!("({a}) {op}{modifier} ({b})");
            let Ok(e) = Expr::parse(&text) else {
                continue; // e.g. a set operator between scalars
            };
            let at = rng.random_range(0..6 * M);
            match e.eval(&w, at) {
                Ok(samples) => {
                    let unique: BTreeSet<_> = samples.iter().map(|s| format!("{:?}", s.labels)).collect();
                    assert_eq!(unique.len(), samples.len(), "round {round}: {text}: duplicate output labels");
                }
                Err(err) => assert!(!matches!(err, EvalError::Internal { .. }), "{text}: {err}"),
            }
        }
        // Identities.
        let at = rng.random_range(0..6 * M);
        let x = Expr::parse("x").unwrap().eval(&w, at).unwrap();
        assert_eq!(Expr::parse("x and x").unwrap().eval(&w, at).unwrap(), x);
        assert_eq!(Expr::parse("x or x").unwrap().eval(&w, at).unwrap(), x);
        assert!(Expr::parse("x unless x").unwrap().eval(&w, at).unwrap().is_empty());
        let sum: f64 = x.iter().map(|s| s.value).sum();
        let got = Expr::parse("sum(x)").unwrap().eval(&w, at).unwrap();
        if x.is_empty() {
            assert!(got.is_empty());
        } else {
            assert!((got[0].value - sum).abs() < 1e-9, "sum(x) {} vs {sum}", got[0].value);
        }
        let counts = Expr::parse("count_over_time(x[1m])").unwrap().eval(&w, at).unwrap();
        let by_hand: usize = ["n1", "n2", "n3"]
            .iter()
            .map(|n| {
                let e = Expr::parse(&format!(r#"count_over_time(x{{node="{n}"}}[1m])"#)).unwrap();
                e.eval(&w, at).unwrap().first().map_or(0, |s| s.value as usize)
            })
            .sum();
        assert_eq!(counts.iter().map(|s| s.value as usize).sum::<usize>(), by_hand);
    }
}

#[test]
fn nesting_is_bounded_before_anything_recurses() {
    use super::compile::{MAX_DEPTH, MAX_TOKENS};
    // On a thread with a tokio worker's stack: the depth allowed compiles and
    // evaluates there; deeper is refused, not a stack overflow (fuzzing found one).
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let nested = |n: usize, open: &str, close: &str| format!("{}x{}", open.repeat(n), close.repeat(n));
            let mut w = Window::new(Duration::from_secs(600));
            w.push("x", &l(&[("a", "b")]), 0, 1.0);
            for (open, close) in [("(", ")"), ("abs(", ")"), ("sum(", ")"), ("-(", ")")] {
                // The selector is a level too; `-(` is two levels per parenthesis.
                let allowed = if open == "-(" { (MAX_DEPTH - 1) / 2 } else { MAX_DEPTH - 1 };
                let ok = Expr::parse(&nested(allowed, open, close)).unwrap();
                assert_eq!(ok.eval(&w, M).unwrap().len(), 1, "{open}");
                for n in [MAX_DEPTH + 1, 500] {
                    let err = Expr::parse(&nested(n, open, close)).unwrap_err();
                    assert!(err.message.contains("nests deeper than 64 levels"), "{open} x{n}: {err}");
                }
                let err = Expr::parse(&nested(20_000, open, close)).unwrap_err();
                assert!(err.message.contains("tokens; at most 2048"), "{open} x20000: {err}");
            }
            // Operator chains nest without parentheses: bounded by the token count.
            for op in [" + ", " * ", " and ", " > bool "] {
                let longest = vec!["x"; MAX_TOKENS / (op.split_whitespace().count() + 1)].join(op);
                assert!(Expr::parse(&longest).is_err_and(|e| e.message.contains("nests deeper")), "{op}");
                let err = Expr::parse(&vec!["x"; 100_000].join(op)).unwrap_err();
                assert!(err.message.contains("tokens; at most 2048"), "{op}: {err}");
            }
            let unary = format!("{}x", "-".repeat(MAX_TOKENS - 1));
            assert!(Expr::parse(&unary).is_err_and(|e| e.message.contains("nests deeper")));
        })
        .unwrap()
        .join()
        .unwrap();
}
