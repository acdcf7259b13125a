//! Capacity and diagnosis end to end: a simulated fleet with a known load
//! (each agent scrapes a vLLM-format page whose token counter grows at a set
//! rate, with a set queue), one node's GPUs saturated and another's leaking
//! memory (simulated faults). `flotctl capacity report` must name the
//! saturated node with the seed's triggers and measure its tokens/s;
//! `flotctl diagnose` must name the OOM risk on the leaking GPU and the
//! saturated GPU behind the other node's latency. `capacity plan` works with
//! no controller at all.

// Test equipment: a failed setup step should stop the test loudly, with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]
// A synchronous test: waiting is a plain sleep.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use flotilla_tests::{
    Agent, AgentOpts, Controller, Pki, eventually_within, flotctl, json, serve_inference, wait_state,
};

/// A vLLM page: `rate` generation tokens per second since `start`, `waiting` queued.
fn vllm_page(start: Instant, rate: f64, waiting: u32) -> String {
    let tokens = (start.elapsed().as_secs_f64() * rate).floor();
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"llama-test\"}} 4.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"llama-test\"}} {waiting}.0\n\
         # HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
         # TYPE vllm:generation_tokens_total counter\n\
         vllm:generation_tokens_total{{engine=\"0\",model_name=\"llama-test\"}} {tokens}\n"
    )
}

fn agent(dir: &std::path::Path, pki: &Pki, url: &str, node: &str, rate: f64, waiting: u32) -> Agent {
    let start = Instant::now();
    let addr = serve_inference(move || vllm_page(start, rate, waiting));
    let toml = format!("[[inference]]\nname = \"llama\"\nurl = \"http://{addr}\"\nengine = \"vllm\"\n");
    Agent::start(
        dir,
        pki,
        url,
        node,
        AgentOpts { gpus: 2, interval: "500ms", config_toml: Some(toml), ..Default::default() },
    )
}

#[test]
fn the_report_names_the_saturated_node_and_diagnose_the_injected_faults() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let _a = agent(dir.path(), &pki, &url, "gpu-hot", 100.0, 8);
    let _b = agent(dir.path(), &pki, &url, "gpu-leak", 50.0, 0);
    wait_state(&pki, &url, "gpu-hot", "up");
    wait_state(&pki, &url, "gpu-leak", "up");
    for (node, fault, gpu) in [("gpu-hot", "saturate", None), ("gpu-leak", "memory-creep", Some("1"))] {
        let mut args = vec!["sim", "inject", node, fault];
        if let Some(g) = gpu {
            args.extend(["--gpu", g]);
        }
        let out = flotctl(&pki, &url, &args);
        assert!(out.status.success(), "{out:?}");
    }
    let patience = Duration::from_secs(90);

    // The report: measured once the whole 15 s window holds the faults.
    std::thread::sleep(Duration::from_secs(16));
    let report = eventually_within(patience, "the capacity report to name gpu-hot", |last| {
        let out =
            flotctl(&pki, &url, &["capacity", "report", "--window", "15s", "--price-per-kwh", "0.30", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        *last = v.to_string();
        let recs = v["recommendations"].as_array()?;
        let hot = |trigger: &str| recs.iter().any(|r| r["node"] == "gpu-hot" && r["trigger"] == trigger);
        (hot("gpu_utilization") && hot("queue_depth")).then_some(v)
    });
    let endpoints = report["endpoints"].as_array().unwrap();
    let row = |node: &str| endpoints.iter().find(|e| e["node"] == node).unwrap_or_else(|| panic!("{node}: {report:#}"));
    let hot = row("gpu-hot");
    let tps = hot["tokens_per_second"].as_f64().unwrap();
    eprintln!("gpu-hot: {tps:.1} tokens/s measured (100 served); report {hot}");
    assert!((85.0..=115.0).contains(&tps), "gpu-hot serves 100 tokens/s, measured {tps}");
    assert_eq!(hot["saturated"], true, "{hot}");
    assert_eq!(hot["model"], "llama-test");
    assert!(hot["joules_per_1k_tokens"].as_f64().unwrap() > 0.0, "{hot}");
    // gpu-leak's simulated utilisation follows its own curve; its queue is empty.
    let leak = row("gpu-leak");
    assert!(leak["queue_depth"].as_f64().unwrap() < 1.0, "{leak}");
    assert!(
        !report["recommendations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["node"] == "gpu-leak" && r["trigger"] == "queue_depth"),
        "{report:#}"
    );

    // Diagnosis: the leak is an OOM risk on GPU 1 of gpu-leak.
    let out = flotctl(&pki, &url, &["diagnose", "gpu-leak", "--window", "15s", "-o", "json"]);
    let v = json(&out);
    let oom = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["issue"] == "out_of_memory" && f["gpu"] == "1")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert!(oom["summary"].as_str().unwrap().contains("OOM risk on GPU 1"), "{oom}");
    assert!(!oom["resolutions"].as_array().unwrap().is_empty());
    // The saturated node's queue is a latency finding whose first resolution is the GPU's.
    let out = flotctl(&pki, &url, &["diagnose", "gpu-hot", "--window", "15s", "-o", "json"]);
    let v = json(&out);
    let slow = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["issue"] == "high_latency")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert!(slow["summary"].as_str().unwrap().contains("the GPU is saturated"), "{slow}");
    assert!(slow["resolutions"][0].as_str().unwrap().starts_with("If the GPU is at 100 %"), "{slow}");
    // Nothing unknown is diagnosed.
    let out = flotctl(&pki, &url, &["diagnose", "nobody"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("neither a node"), "{out:?}");
}

#[test]
fn capacity_plan_works_without_a_controller() {
    let out = std::process::Command::new(flotilla_tests::bin("flotctl"))
        .args([
            "--controller",
            "https://127.0.0.1:1",
            "capacity",
            "plan",
            "--team",
            "50",
            "--usage",
            "medium",
            "-o",
            "json",
        ])
        .env("HOME", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["daily_requests"], 5000.0, "{v}");
    let rpm = v["peak_requests_per_minute"].as_f64().unwrap();
    assert!((rpm - 8.33).abs() < 0.01, "{v}");
    let tps = v["required_tokens_per_second"].as_f64().unwrap();
    assert!((tps - 415.0).abs() / 415.0 < 0.005, "the seed's 50 medium developers: {v}");
    let bad = std::process::Command::new(flotilla_tests::bin("flotctl"))
        .args(["capacity", "plan", "--team", "0", "--usage", "medium"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("team"), "{bad:?}");
}
