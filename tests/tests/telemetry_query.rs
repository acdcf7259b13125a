//! `flotctl metrics get` and `flotctl nodes show` against real controller and
//! agent processes: streamed telemetry comes back out under the names and labels
//! of the controller's /metrics, anything but a plain selector is a usage error,
//! and the GPU health fields reach the node view.

// Test helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use flotilla_tests::{Agent, AgentOpts, Controller, Pki, eventually, flotctl, wait_state};
use serde_json::Value;

const SELECTOR: &str = r#"flotilla_gpu_temperature_celsius{node="gpu-a"}"#;

/// A controller and node gpu-a with two simulated GPUs, up.
fn fleet(dir: &std::path::Path) -> (Pki, Controller, Agent) {
    let pki = Pki::new(&dir.join("pki"));
    let controller = Controller::start(dir, &pki);
    let url = controller.url();
    let agent = Agent::start(dir, &pki, &url, "gpu-a", AgentOpts { gpus: 2, interval: "200ms", ..Default::default() });
    wait_state(&pki, &url, "gpu-a", "up");
    (pki, controller, agent)
}

#[test]
fn metrics_get_returns_streamed_series_and_refuses_expressions() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, controller, _agent) = fleet(dir.path());
    let url = controller.url();

    let series: Vec<Value> = eventually("both GPUs' temperatures from flotctl metrics get", |last| {
        let out = flotctl(&pki, &url, &["metrics", "get", SELECTOR, "-o", "json"]);
        if !out.status.success() {
            *last = String::from_utf8_lossy(&out.stderr).into_owned();
            return None;
        }
        let v: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
        *last = String::from_utf8_lossy(&out.stdout).chars().take(300).collect();
        (v.len() == 2 && v.iter().all(|s| s["points"].as_array().is_some_and(|p| !p.is_empty()))).then_some(v)
    });
    for (gpu, s) in series.iter().enumerate() {
        let m = &s["metric"];
        assert_eq!(m["__name__"], "flotilla_gpu_temperature_celsius", "{s}");
        assert_eq!(m["node"], "gpu-a", "{s}");
        assert_eq!(m["gpu"], gpu.to_string(), "series are ordered by labels: {s}");
        assert!(m["uuid"].as_str().is_some_and(|u| u.starts_with("GPU-")), "{s}");
        assert!(m["model"].as_str().is_some_and(|u| !u.is_empty()), "{s}");
        let points = s["points"].as_array().unwrap();
        let times: Vec<i64> = points.iter().map(|p| p[0].as_i64().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first: {times:?}");
        assert!(points.iter().all(|p| p[1].as_f64().is_some_and(|t| (10.0..=120.0).contains(&t))), "{s}");
    }

    let out = flotctl(&pki, &url, &["metrics", "get", "flotilla_node_load1", "--since", "1m", "--step", "0s"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("LAST") && table.contains(r#"flotilla_node_load1{node="gpu-a"}"#), "{table}");

    let out = flotctl(&pki, &url, &["metrics", "get", "sum(flotilla_gpu_power_watts)"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("aggregation sum") && stderr.contains("not supported"), "{stderr}");
}

#[test]
fn nodes_show_names_clock_events_and_counts_xids() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, controller, _agent) = fleet(dir.path());
    let url = controller.url();
    let out = flotctl(&pki, &url, &["sim", "inject", "gpu-a", "xid=48", "--gpu", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let gpu = eventually("XID 48 in nodes show -o json", |last| {
        let out = flotctl(&pki, &url, &["nodes", "show", "gpu-a", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let gpu = v["gpus"][0].clone();
        *last = gpu.to_string();
        (gpu["xid_events"][0]["code"] == 48).then_some(gpu)
    });
    assert_eq!(gpu["xid_events"][0]["count"], 1);
    assert!(gpu["clock_event_reasons"].is_array(), "reasons by name: {gpu}");
    assert!(
        gpu["ecc_uncorrected_volatile_total"].as_u64().is_some_and(|n| n >= 1),
        "XID 48 is a double-bit ECC error: {gpu}"
    );

    let out = flotctl(&pki, &url, &["nodes", "show", "gpu-a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CLOCKS HELD BY") && text.contains("48×1"), "{text}");
}
