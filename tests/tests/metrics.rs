//! The controller's fleet-wide /metrics: one series per simulated GPU, valid for
//! `promtool check metrics`, scraped by a real Prometheus, and changed by the
//! simulator's fault injections the way the real faults change real metrics.

// Test helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_tests::{
    Agent, AgentOpts, Controller, Pki, Proc, eventually, eventually_within, flotctl, free_port, http_get, https_get,
    metric_value, wait_state,
};

fn scrape(pki: &Pki, controller: &Controller) -> String {
    let addr = controller.metrics_addr.as_deref().expect("metrics enabled");
    let (status, body) = https_get(addr, "/metrics", &pki.ca(), &pki.admin()).expect("scrape");
    assert_eq!(status, 200, "{body}");
    body
}

fn fleet(dir: &std::path::Path, gpus: u32) -> (Pki, Controller, Vec<Agent>) {
    let pki = Pki::new(&dir.join("pki"));
    let controller = Controller::start_with_metrics(dir, &pki);
    let url = controller.url();
    let agents = ["gpu-a", "gpu-b"]
        .iter()
        .map(|n| Agent::start(dir, &pki, &url, n, AgentOpts { gpus, interval: "200ms", ..Default::default() }))
        .collect::<Vec<_>>();
    for a in &agents {
        wait_state(&pki, &url, &a.node, "up");
    }
    (pki, controller, agents)
}

#[test]
fn metrics_pass_promtool_and_need_an_operator_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, controller, _agents) = fleet(dir.path(), 3);
    let body = eventually("every GPU in /metrics", |last| {
        let body = scrape(&pki, &controller);
        *last = body.lines().filter(|l| l.starts_with("flotilla_gpu_temperature")).count().to_string();
        (body.lines().filter(|l| l.starts_with("flotilla_gpu_temperature_celsius{")).count() == 6).then_some(body)
    });
    for want in [
        "flotilla_agent_up{node=\"gpu-a\"} 1",
        "flotilla_controller_batches_committed_total",
        "flotilla_node_memory_total_bytes{node=\"gpu-b\"}",
    ] {
        assert!(body.contains(want), "{want} missing");
    }
    assert!(metric_value(&body, "flotilla_gpu_memory_total_bytes", &[("node", "gpu-a"), ("gpu", "2")]).unwrap() > 0.0);

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; ./x test installs it)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A node certificate may not scrape.
    let addr = controller.metrics_addr.as_deref().unwrap();
    let (status, _) = https_get(addr, "/metrics", &pki.ca(), &pki.node("gpu-a")).unwrap();
    assert_eq!(status, 403);
    let (status, _) = https_get(addr, "/healthz", &pki.ca(), &pki.admin()).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn fault_injections_change_the_exported_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, controller, _agents) = fleet(dir.path(), 3);
    let url = controller.url();
    let inject = |node: &str, fault: &str, gpu: Option<&str>| {
        let mut args = vec!["sim", "inject", node, fault];
        if let Some(g) = gpu {
            args.extend(["--gpu", g]);
        }
        let out = flotctl(&pki, &url, &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };

    inject("gpu-a", "xid=48", Some("0"));
    inject("gpu-a", "memory-creep", Some("1"));
    inject("gpu-b", "overheat", Some("2"));
    eventually("XID 48 counted with its ECC consequences", |last| {
        let body = scrape(&pki, &controller);
        let xid =
            metric_value(&body, "flotilla_gpu_xid_errors_total", &[("node", "gpu-a"), ("gpu", "0"), ("xid", "48")]);
        let ecc = metric_value(
            &body,
            "flotilla_gpu_ecc_errors_total",
            &[("node", "gpu-a"), ("gpu", "0"), ("type", "uncorrected"), ("scope", "volatile")],
        );
        *last = format!("xid {xid:?}, ecc {ecc:?}");
        (xid == Some(1.0) && ecc == Some(1.0)).then_some(())
    });
    eventually("memory creep fills GPU 1", |last| {
        let body = scrape(&pki, &controller);
        let used = metric_value(&body, "flotilla_gpu_memory_used_bytes", &[("node", "gpu-a"), ("gpu", "1")])?;
        let total = metric_value(&body, "flotilla_gpu_memory_total_bytes", &[("node", "gpu-a"), ("gpu", "1")])?;
        *last = format!("{:.3}", used / total);
        (used / total > 0.99).then_some(())
    });
    // A failed fan heats the card until the driver throttles it (tens of seconds, as on hardware).
    eventually_within(Duration::from_secs(120), "overheating GPU 2 to throttle", |last| {
        let body = scrape(&pki, &controller);
        let temp = metric_value(&body, "flotilla_gpu_temperature_celsius", &[("node", "gpu-b"), ("gpu", "2")]);
        let throttled = metric_value(
            &body,
            "flotilla_gpu_clock_event_active",
            &[("node", "gpu-b"), ("gpu", "2"), ("reason", "sw_thermal_slowdown")],
        );
        *last = format!("temperature {temp:?}, sw_thermal_slowdown {throttled:?}");
        (temp.is_some_and(|t| t > 85.0) && throttled == Some(1.0)).then_some(())
    });
    let body = scrape(&pki, &controller);
    let cool = metric_value(&body, "flotilla_gpu_temperature_celsius", &[("node", "gpu-b"), ("gpu", "0")]).unwrap();
    assert!(cool < 85.0, "only the injected GPU overheats: {cool}");

    // A GPU that falls off the bus stops reporting and the node turns degraded.
    inject("gpu-b", "gpu-lost", Some("1"));
    eventually("GPU 1 of gpu-b gone and the node degraded", |last| {
        let body = scrape(&pki, &controller);
        let present = metric_value(&body, "flotilla_gpu_temperature_celsius", &[("node", "gpu-b"), ("gpu", "1")]);
        let degraded = metric_value(&body, "flotilla_node_state", &[("node", "gpu-b"), ("state", "degraded")]);
        *last = format!("gpu 1 {present:?}, degraded {degraded:?}");
        (present.is_none() && degraded == Some(1.0)).then_some(())
    });
    inject("gpu-b", "clear", None);
    wait_state(&pki, &url, "gpu-b", "up");

    // Refusals: unknown fault, missing GPU, unknown node.
    let out = flotctl(&pki, &url, &["sim", "inject", "gpu-a", "melt"]);
    assert_eq!(out.status.code(), Some(64));
    let out = flotctl(&pki, &url, &["sim", "inject", "gpu-a", "overheat", "--gpu", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no GPU 9"));
    let out = flotctl(&pki, &url, &["sim", "inject", "ghost", "overheat"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node ghost"));
}

#[test]
fn a_real_prometheus_scrapes_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, controller, _agents) = fleet(dir.path(), 2);
    let admin = pki.admin();
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: flotilla\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      key_file: {key}\n    static_configs:\n      - targets: ['{target}']\n",
            ca = pki.ca().display(),
            cert = admin.cert.display(),
            key = admin.key.display(),
            target = controller.metrics_addr.as_deref().unwrap(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let prometheus = Proc::spawn_logged(cmd, &dir.path().join("prometheus.log"));
    let addr = format!("127.0.0.1:{port}");
    let result = eventually_within(Duration::from_secs(60), "Prometheus to return every simulated GPU", |last| {
        let (status, body) = http_get(&addr, "/api/v1/query?query=flotilla_gpu_temperature_celsius").ok()?;
        *last = format!("{status}: {}", body.chars().take(300).collect::<String>());
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?.clone();
        (result.len() == 4).then_some(result)
    });
    let mut seen: Vec<(String, String)> = result
        .iter()
        .map(|r| (r["metric"]["node"].as_str().unwrap().to_owned(), r["metric"]["gpu"].as_str().unwrap().to_owned()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [("gpu-a", "0"), ("gpu-a", "1"), ("gpu-b", "0"), ("gpu-b", "1")].map(|(n, g)| (n.to_owned(), g.to_owned()))
    );
    assert!(result.iter().all(|r| r["metric"]["uuid"].as_str().is_some_and(|u| u.starts_with("GPU-"))));
    drop(prometheus);
}

#[test]
fn inference_server_metrics_reach_the_fleet_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start_with_metrics(dir.path(), &pki);
    let url = controller.url();
    let old = flotilla_tests::serve_inference_fixture(flotilla_tests::metrics_fixture("vllm-v0-0.6.6.post1.txt"));
    let new = flotilla_tests::serve_inference_fixture(flotilla_tests::metrics_fixture("vllm-v1-0.11.0.txt"));
    let config = format!(
        "[[inference]]\nname = \"old\"\nurl = \"http://{old}\"\n\n[[inference]]\nname = \"new\"\nurl = \"http://{new}\"\n"
    );
    let _agent = Agent::start(
        dir.path(),
        &pki,
        &url,
        "gpu-a",
        AgentOpts { gpus: 1, config_toml: Some(config), ..Default::default() },
    );
    wait_state(&pki, &url, "gpu-a", "up");
    let body = eventually("inference series in /metrics", |last| {
        let body = scrape(&pki, &controller);
        let found = body.lines().filter(|l| l.starts_with("flotilla_inference_kv_cache_usage_ratio{")).count();
        *last = format!("{found} kv-cache series");
        (found == 2).then_some(body)
    });
    // Old (gpu_cache_usage_perc) and new (kv_cache_usage_perc) vLLM land on the same series names.
    let names = |endpoint: &str| -> std::collections::BTreeSet<String> {
        body.lines()
            .filter(|l| l.starts_with("flotilla_inference_") && l.contains(&format!("endpoint=\"{endpoint}\"")))
            .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
            .collect()
    };
    assert_eq!(names("old"), names("new"));
    for endpoint in ["old", "new"] {
        let up = metric_value(&body, "flotilla_inference_up", &[("node", "gpu-a"), ("endpoint", endpoint)]);
        assert_eq!(up, Some(1.0), "{endpoint}");
        let kv = metric_value(&body, "flotilla_inference_kv_cache_usage_ratio", &[("endpoint", endpoint)]).unwrap();
        assert!((0.0..=1.0).contains(&kv));
    }
    assert!(body.contains("# TYPE flotilla_inference_time_to_first_token_seconds histogram"));
}
