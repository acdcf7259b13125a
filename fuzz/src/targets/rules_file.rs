//! A Prometheus rules file as `Fleet.CheckRules`, `ReloadRules` and the start-up
//! load read it (YAML, PromQL, label and annotation templates), then what the
//! engine does with an accepted file on every pass: evaluate each rule over the
//! in-memory window and render its templates with the results, including
//! values at the edges (NaN, ±Inf, huge, tiny, negative).

use std::sync::OnceLock;
use std::time::Duration;

use flotilla_controller::alert::template::Data;
use flotilla_controller::alert::window::Window;

/// The evaluation time: ten minutes after the window's first sample.
const T_MS: i64 = 1_800_000_600_000;

/// A small window: gauges and counters on two nodes and GPUs over ten minutes,
/// with a histogram, so that selectors, ranges and aggregations find data.
fn window() -> &'static Window {
    static WINDOW: OnceLock<Window> = OnceLock::new();
    WINDOW.get_or_init(|| {
        let mut w = Window::new(Duration::from_secs(3600));
        let label = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        for step in 0..=40i64 {
            let t = T_MS - 600_000 + step * 15_000;
            let x = step as f64;
            for node in ["gpu-01", "gpu-02"] {
                for gpu in ["0", "1"] {
                    let l = label(&[("node", node), ("gpu", gpu)]);
                    w.push("flotilla_gpu_temperature_celsius", &l, t, 60.0 + x);
                    w.push("flotilla_gpu_utilization_ratio", &l, t, (x / 40.0).min(1.0));
                    w.push("flotilla_gpu_xid_errors_total", &l, t, (x / 10.0).floor());
                }
                let l = label(&[("node", node)]);
                w.push("flotilla_agent_up", &l, t, 1.0);
                w.push("flotilla_inference_requests_total", &label(&[("node", node), ("code", "200")]), t, x * 10.0);
                w.push("flotilla_inference_requests_total", &label(&[("node", node), ("code", "500")]), t, x);
                for le in ["0.1", "0.5", "1", "+Inf"] {
                    let bucket = label(&[("node", node), ("le", le)]);
                    let share = match le {
                        "0.1" => 0.2,
                        "0.5" => 0.6,
                        "1" => 0.9,
                        _ => 1.0,
                    };
                    w.push("flotilla_inference_time_to_first_token_seconds_bucket", &bucket, t, x * 10.0 * share);
                }
            }
        }
        w
    })
}

const EDGE_VALUES: [f64; 7] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, -1e300, 5e-324, -0.0];

pub fn run(data: &[u8]) {
    let text = super::text(data);
    let Ok(rules) = flotilla_controller::alert::engine::check("fuzz.yml", &text) else { return };
    let _ = rules.reach();
    for rule in rules.rules() {
        let mut samples: Vec<(Vec<(String, String)>, f64)> = match rule.expr.eval(window(), T_MS) {
            Ok(found) => found.into_iter().take(4).map(|s| (s.labels, s.value)).collect(),
            Err(_) => Vec::new(),
        };
        let labels = samples.first().map(|(l, _)| l.clone()).unwrap_or_default();
        samples.extend(EDGE_VALUES.iter().map(|v| (labels.clone(), *v)));
        for (labels, value) in &samples {
            for (_, template) in rule.labels.iter().chain(&rule.annotations) {
                let _ = template.render(Data { labels, value: *value });
            }
        }
    }
}
