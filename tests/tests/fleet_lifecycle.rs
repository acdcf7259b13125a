//! A controller and three agent processes: the fleet is listed with its GPUs; a
//! killed agent turns down; restarted, it comes back up with the same identity.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use flotilla_tests::{Agent, AgentOpts, Controller, Pki, state_of, wait_state};

#[test]
fn agents_come_up_go_down_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let mut agents: Vec<Agent> = ["gpu-a", "gpu-b", "gpu-c"]
        .iter()
        .map(|n| Agent::start(dir.path(), &pki, &url, n, AgentOpts::default()))
        .collect();

    for a in &agents {
        wait_state(&pki, &url, &a.node, "up");
    }
    let list = flotilla_tests::eventually("telemetry for every GPU", |last| {
        let list = flotilla_tests::nodes(&pki, &url).ok()?;
        let complete = list.len() == 3
            && list.iter().all(|n| {
                n["gpus"]
                    .as_array()
                    .is_some_and(|g| g.len() == 4 && g.iter().all(|g| g["utilization_ratio"].is_number()))
            });
        *last = format!("{list:?}");
        complete.then_some(list)
    });
    for n in &list {
        assert_eq!(n["state"], "up");
        assert!(n["id"].is_string());
        let gpus = n["gpus"].as_array().unwrap();
        let uuids: std::collections::BTreeSet<&str> = gpus.iter().map(|g| g["uuid"].as_str().unwrap()).collect();
        assert_eq!(uuids.len(), 4, "each GPU has its own UUID");
        assert!(n["gpu_memory_total_bytes"].as_u64().unwrap() > 0);
    }

    // Kill one agent: the controller notices within a few heartbeat intervals.
    agents[1].proc.kill9();
    let list = wait_state(&pki, &url, "gpu-b", "down");
    assert_eq!(state_of(&list, "gpu-a").as_deref(), Some("up"), "the others are unaffected");
    assert_eq!(state_of(&list, "gpu-c").as_deref(), Some("up"));

    // Restart it: same identity, back up, still three nodes.
    agents[1].restart();
    let list = wait_state(&pki, &url, "gpu-b", "up");
    assert_eq!(list.len(), 3);
    assert!(controller.proc.log_text().contains("agent disconnected"), "the controller logged the disconnect");
}

#[test]
fn nodes_show_reports_inventory_and_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let _agent = Agent::start(dir.path(), &pki, &url, "gpu-a", AgentOpts { gpus: 2, ..Default::default() });
    wait_state(&pki, &url, "gpu-a", "up");

    let node = flotilla_tests::eventually("a node with host data", |_| {
        let out = flotilla_tests::flotctl(&pki, &url, &["nodes", "show", "gpu-a", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["host"]["memory_available_bytes"].is_number().then_some(v)
    });
    assert_eq!(node["gpus"].as_array().unwrap().len(), 2);
    assert!(node["host"]["cpu_cores"].as_u64().unwrap() >= 1);

    let out = flotilla_tests::flotctl(&pki, &url, &["nodes", "show", "gpu-a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Node:       gpu-a") && text.contains("NVIDIA H100"), "{text}");

    let out = flotilla_tests::flotctl(&pki, &url, &["nodes", "show", "nope", "-o", "yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node nope"));

    let out = flotilla_tests::flotctl(&pki, &url, &["nodes", "ls", "-o", "yaml"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("id: gpu-a"));
}
