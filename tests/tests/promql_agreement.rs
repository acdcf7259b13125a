#![allow(clippy::expect_used, clippy::unwrap_used)]
//! The referee for the alert engine's PromQL evaluator: the same samples are
//! pushed into a `Window` and written as a promtool unit test whose expected
//! results are the evaluator's own. `promtool test rules` (Prometheus 2.x, from
//! the Debian package `prometheus`) then evaluates every expression itself and
//! compares exactly (float equality), naming any expression that disagrees.
//!
//! promtool loads the series in a random order, so aggregations here never sum
//! more than two inexact values (their order would change the last bit). Powers
//! are integer or ±0.5: other fractional exponents go through Go's assembly
//! `Exp`/`Log`, which the evaluator does not reproduce bit for bit.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use flotilla_controller::alert::promql::{Expr, Sample};
use flotilla_controller::alert::window::{STALE_MARKER, Window};

/// Samples are 15 s apart, from 0 to 20 minutes.
const STEP_MS: i64 = 15_000;
const STEPS: usize = 81;

/// One input value: a sample, a missing scrape, or a staleness marker.
#[derive(Clone, Copy)]
enum V {
    Val(f64),
    Gap,
    Stale,
}

struct Input {
    name: &'static str,
    labels: Vec<(String, String)>,
    values: Vec<V>,
}

fn input(name: &'static str, labels: &[(&str, &str)], f: impl Fn(usize) -> V) -> Input {
    let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    Input { name, labels, values: (0..STEPS).map(f).collect() }
}

/// A counter incremented by `inc(i)` at step i, restarting from zero at `reset`.
fn counter(inc: impl Fn(usize) -> f64, reset: Option<usize>) -> Vec<f64> {
    let mut c = 0.0;
    (0..STEPS)
        .map(|i| {
            if Some(i) == reset {
                c = 0.0;
            }
            c += inc(i);
            c
        })
        .collect()
}

fn inputs() -> Vec<Input> {
    let mut out = vec![
        // Gauges whose values never tie across series (.0/.5, .25/.75, .125/...),
        // so topk/bottomk have one answer whatever order promtool loads them in.
        input("gpu_temp_celsius", &[("node", "n1"), ("gpu", "0")], |i| V::Val(40.0 + ((i * 7) % 20) as f64 * 0.5)),
        input("gpu_temp_celsius", &[("node", "n1"), ("gpu", "1")], |i| {
            if (30..34).contains(&i) { V::Gap } else { V::Val(55.25 + ((i * 11) % 17) as f64 * 0.5) }
        }),
        input("gpu_temp_celsius", &[("node", "n2"), ("gpu", "0")], |i| V::Val(61.125 - (i % 9) as f64 * 1.25)),
        // Seven and a half minutes without samples: longer than the lookback.
        input("queue_depth", &[("node", "n1")], |i| {
            if (40..70).contains(&i) { V::Gap } else { V::Val(((i % 5) * 2) as f64) }
        }),
        // A staleness marker, then the series comes back.
        input("queue_depth", &[("node", "n2")], |i| match i {
            45 => V::Stale,
            46..50 => V::Gap,
            _ => V::Val((i % 7) as f64 + 0.5),
        }),
        input("node_info", &[("node", "n1"), ("zone", "z1")], |_| V::Val(1.0)),
        input("node_info", &[("node", "n2"), ("zone", "z2")], |_| V::Val(2.0)),
    ];
    let n1_ok = counter(|i| ((i * 13) % 7 + 1) as f64, Some(40));
    out.push(input("requests_total", &[("node", "n1"), ("code", "200")], |i| V::Val(n1_ok[i])));
    let n1_err = counter(|i| if i.is_multiple_of(3) { 1.0 } else { 0.0 }, None);
    out.push(input("requests_total", &[("node", "n1"), ("code", "500")], |i| V::Val(n1_err[i])));
    let n2_ok = counter(|i| (3 + i % 4) as f64, None);
    out.push(input("requests_total", &[("node", "n2"), ("code", "200")], |i| {
        if (50..53).contains(&i) { V::Gap } else { V::Val(n2_ok[i]) }
    }));
    // A classic histogram per node; n2's process restarts at step 60.
    let bounds = ["0.1", "0.25", "0.5", "1", "+Inf"];
    for (node, reset) in [("n1", None), ("n2", Some(60))] {
        let per_bucket: Vec<Vec<f64>> = (0..bounds.len())
            .map(|b| {
                counter(
                    |i| {
                        // Observations per step that fall in bucket b alone.
                        let own = |i: usize| match (node, b) {
                            ("n1", 0) => i % 3,
                            ("n1", 1) => 1,
                            ("n1", 2) => i % 2,
                            ("n1", 3) => 2,
                            ("n2", 0) => 1,
                            ("n2", 1) => i % 4,
                            ("n2", 2) => 3,
                            ("n2", 3) => i % 2,
                            _ => usize::from(i.is_multiple_of(5)),
                        };
                        own(i) as f64
                    },
                    reset,
                )
            })
            .collect();
        for (b, le) in bounds.iter().enumerate() {
            // Cumulative: each bucket counts its own and every lower bucket's.
            let cumulative: Vec<f64> = (0..STEPS).map(|i| (0..=b).map(|lower| per_bucket[lower][i]).sum()).collect();
            out.push(input("latency_seconds_bucket", &[("node", node), ("le", le)], |i| V::Val(cumulative[i])));
        }
    }
    out
}

/// Every supported construct, each evaluated at every time below.
const EXPRESSIONS: &[&str] = &[
    // Selectors, matchers, offset, lookback and staleness.
    "gpu_temp_celsius",
    r#"gpu_temp_celsius{node="n1"}"#,
    r#"gpu_temp_celsius{node!="n1"}"#,
    r#"gpu_temp_celsius{gpu=~"1|2"}"#,
    r#"gpu_temp_celsius{node!~"n1"}"#,
    r#"{__name__=~"gpu_temp.*", gpu="0"}"#,
    "gpu_temp_celsius offset 2m",
    "queue_depth",
    // Rates over counter resets and gaps.
    "rate(requests_total[5m])",
    "irate(requests_total[2m])",
    "increase(requests_total[10m])",
    r#"increase(requests_total{code="500"}[3m] offset 1m)"#,
    "delta(gpu_temp_celsius[5m])",
    "idelta(gpu_temp_celsius[1m])",
    "rate(requests_total[5m]) * 60",
    "rate(requests_total[5m] offset 5m)",
    "delta(queue_depth[10m])",
    "irate(queue_depth[3m])",
    // *_over_time.
    "avg_over_time(gpu_temp_celsius[5m])",
    "min_over_time(gpu_temp_celsius[3m])",
    "max_over_time(queue_depth[10m])",
    "sum_over_time(gpu_temp_celsius[2m])",
    "count_over_time(queue_depth[5m])",
    "last_over_time(queue_depth[10m])",
    "quantile_over_time(0.9, gpu_temp_celsius[5m])",
    "stddev_over_time(gpu_temp_celsius[5m])",
    "present_over_time(queue_depth[1m])",
    // Histograms.
    "histogram_quantile(0.95, sum by (le, node) (rate(latency_seconds_bucket[5m])))",
    "histogram_quantile(0.5, sum by (le) (rate(latency_seconds_bucket[5m])))",
    r#"histogram_quantile(0.99, rate(latency_seconds_bucket{node="n1"}[10m]))"#,
    "histogram_quantile(0.3, latency_seconds_bucket)",
    // absent on missing and present series.
    r#"absent(queue_depth{node="n1"})"#,
    r#"absent(no_such_metric{job="x", node=~"n.*"})"#,
    r#"absent_over_time(queue_depth{node="n1"}[2m])"#,
    // Aggregations.
    "sum(gpu_temp_celsius)",
    "sum by (node) (gpu_temp_celsius)",
    "avg by (node) (gpu_temp_celsius)",
    "max without (gpu) (gpu_temp_celsius)",
    "min(gpu_temp_celsius) by (gpu)",
    "count(gpu_temp_celsius)",
    "group by (node) (requests_total)",
    "topk(2, gpu_temp_celsius)",
    "bottomk by (node) (1, gpu_temp_celsius)",
    "sum by (node) (rate(requests_total[5m]))",
    "sum(gpu_temp_celsius) / count(gpu_temp_celsius)",
    "stddev by (node) (gpu_temp_celsius)",
    "stdvar by (node) (gpu_temp_celsius)",
    "sum without () (gpu_temp_celsius)",
    r#"sum by (__name__) ({__name__=~"gpu_temp_celsius|queue_depth"})"#,
    "count by (code) (requests_total)",
    "last_over_time(gpu_temp_celsius[1m] offset 30s)",
    "quantile_over_time(1.5, gpu_temp_celsius[5m])",
    "histogram_quantile(-1, rate(latency_seconds_bucket[5m]))",
    // Arithmetic and functions of values.
    "gpu_temp_celsius * 2 - 10 / 4",
    r#"-gpu_temp_celsius{node="n2"} ^ 2"#,
    "gpu_temp_celsius % 7",
    "100 - gpu_temp_celsius",
    r#"{__name__=~"queue_depth|gpu_temp_celsius"} + 0"#,
    "gpu_temp_celsius / 0",
    "-gpu_temp_celsius / 0",
    "rate(requests_total[5m]) ^ 7",
    "(gpu_temp_celsius / 7) ^ 5",
    "(gpu_temp_celsius / 7) ^ -3",
    "gpu_temp_celsius ^ 0.5",
    "clamp_max(gpu_temp_celsius, 60)",
    "clamp_min(queue_depth, 3)",
    "abs(delta(gpu_temp_celsius[2m]))",
    // Comparisons, filtering and bool.
    "gpu_temp_celsius > 50",
    "gpu_temp_celsius >= bool 50",
    "60 < gpu_temp_celsius",
    "50 < bool gpu_temp_celsius",
    "gpu_temp_celsius > bool on (node, gpu) gpu_temp_celsius offset 1m",
    "gpu_temp_celsius != ignoring (gpu) group_left max by (node) (gpu_temp_celsius)",
    "requests_total and ignoring (code) queue_depth",
    r#"vector(1) unless on () queue_depth{node="n1"}"#,
    "requests_total unless on (node) queue_depth > 6",
    "rate(requests_total[5m]) > 0.28",
    // Set operators and vector matching.
    "gpu_temp_celsius and on (node) queue_depth",
    "gpu_temp_celsius unless on (node) queue_depth",
    r#"queue_depth or on (node) gpu_temp_celsius{gpu="0"}"#,
    "gpu_temp_celsius - on (node, gpu) gpu_temp_celsius offset 1m",
    "gpu_temp_celsius > ignoring (gpu) group_left sum by (node) (gpu_temp_celsius) / 2",
    "sum by (node) (rate(requests_total[5m])) / ignoring (zone) group_left (zone) node_info",
    "gpu_temp_celsius * on (node) group_left (zone) node_info",
    "node_info * on (node) group_right (zone) gpu_temp_celsius",
    // Scalars.
    "scalar(sum(queue_depth))",
    "vector(time())",
    "time() - 60",
    "-(time() / 60)",
    "1 + 2 * 3",
    "2 ^ 3 ^ 2",
    "(1 > bool 2) + 1",
    // Nothing at all.
    "count_over_time(no_such_metric[5m])",
    "gpu_temp_celsius > 1000",
];

/// Evaluation times in seconds: before, during and after gaps, resets and the
/// staleness marker, aligned with samples and not, and after the last sample.
const EVAL_TIMES_S: &[i64] = &[180, 450, 600, 720, 787, 1020, 1200, 1380];

/// A label set as promtool's unit tests write it: `name{a="b"}` or `{a="b"}`.
fn render_labels(labels: &[(String, String)]) -> String {
    let name = labels.iter().find(|(k, _)| k == "__name__").map_or("", |(_, v)| v.as_str());
    let pairs: Vec<String> = labels
        .iter()
        .filter(|(k, _)| k != "__name__")
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    format!("{name}{{{}}}", pairs.join(","))
}

/// A float YAML reads back as exactly the same float64 (shortest round-trip).
fn yaml_float(v: f64) -> String {
    if v == f64::INFINITY {
        ".inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-.inf".to_owned()
    } else {
        format!("{v:?}")
    }
}

/// YAML single-quoted string.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn promtool() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("promtool")).find(|p| p.is_file()))
        .unwrap_or_default();
    on_path.or_else(|| Some(PathBuf::from("/usr/bin/promtool")).filter(|p| p.is_file())).unwrap_or_else(|| {
        panic!(
            "promtool is not installed: install the Debian package `prometheus` \
             (apt-get install prometheus; `./x test` and CI install it)"
        )
    })
}

#[test]
fn evaluator_agrees_with_promtool() {
    let promtool = promtool();
    let inputs = inputs();
    let mut window = Window::new(Duration::from_secs(3600));
    let mut series_yaml = String::new();
    for s in &inputs {
        let mut labels = s.labels.clone();
        labels.push(("__name__".to_owned(), s.name.to_owned()));
        labels.sort();
        let mut values = Vec::new();
        for (i, v) in s.values.iter().enumerate() {
            let t = i as i64 * STEP_MS;
            match *v {
                V::Val(x) => {
                    assert!(window.push(s.name, &s.labels, t, x));
                    values.push(yaml_float(x).replace(".inf", "Inf"));
                }
                V::Gap => values.push("_".to_owned()),
                V::Stale => {
                    assert!(window.push(s.name, &s.labels, t, STALE_MARKER));
                    values.push("stale".to_owned());
                }
            }
        }
        writeln!(
            series_yaml,
            "      - series: {}\n        values: {}",
            quoted(&render_labels(&labels)),
            quoted(&values.join(" "))
        )
        .unwrap();
    }

    let mut tests_yaml = String::new();
    let (mut checks, mut empty) = (0, 0);
    for text in EXPRESSIONS {
        let expr = Expr::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let mut nonempty_somewhere = false;
        for &at in EVAL_TIMES_S {
            let samples: Vec<Sample> = expr.eval(&window, at * 1000).unwrap_or_else(|e| panic!("{text} at {at}s: {e}"));
            assert!(
                samples.iter().all(|s| !s.value.is_nan()),
                "{text} at {at}s gives NaN, which promtool cannot compare: choose another expression or time"
            );
            write!(tests_yaml, "      - expr: {}\n        eval_time: {at}s\n", quoted(text)).unwrap();
            if samples.is_empty() {
                tests_yaml.push_str("        exp_samples: []\n");
                empty += 1;
            } else {
                tests_yaml.push_str("        exp_samples:\n");
                for s in &samples {
                    writeln!(
                        tests_yaml,
                        "          - labels: {}\n            value: {}",
                        quoted(&render_labels(&s.labels)),
                        yaml_float(s.value)
                    )
                    .unwrap();
                }
                nonempty_somewhere = true;
            }
            checks += 1;
        }
        let meant_empty = text.contains("no_such_metric[") || text.contains("> 1000");
        assert_eq!(nonempty_somewhere, !meant_empty, "{text}: results at some time are what makes the check count");
    }

    let dir = tempfile::tempdir().unwrap();
    // An empty rule file rather than `rule_files: []`, which some promtool versions refuse.
    std::fs::write(dir.path().join("empty_rules.yml"), "groups: []\n").unwrap();
    let test_file = dir.path().join("promql_agreement_test.yml");
    let yaml = format!(
        "rule_files:\n  - empty_rules.yml\nevaluation_interval: 1m\ntests:\n  - interval: 15s\n    input_series:\n{series_yaml}    promql_expr_test:\n{tests_yaml}"
    );
    std::fs::write(&test_file, &yaml).unwrap();
    let out =
        Command::new(&promtool).arg("test").arg("rules").arg(&test_file).current_dir(dir.path()).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let kept = std::env::temp_dir().join("flotilla_promql_agreement_test.yml");
        let _ = std::fs::write(&kept, &yaml);
        panic!("promtool disagrees (test file kept at {}):\n{report}", kept.display());
    }
    eprintln!(
        "promtool agrees on {} expressions at {} times: {checks} checks, {empty} of them empty results",
        EXPRESSIONS.len(),
        EVAL_TIMES_S.len()
    );
}
