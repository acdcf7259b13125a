//! Signed commands end to end: `flotctl exec` → Fleet.ExecCommand → a signed
//! envelope down the agent's stream → verified and executed on the agent →
//! result back; an agent without the controller's key refuses; and every
//! command lands in the hash-chained audit log, whose tampering `flotctl audit
//! verify` detects.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use flotilla_tests::{Agent, AgentOpts, Controller, Pki, flotctl, wait_state};

fn agent_with_key(dir: &std::path::Path, pki: &Pki, controller: &Controller, node: &str) -> Agent {
    let key = controller.data_dir.join("command-signing.pub");
    let config = format!("command_key = \"{}\"\n", key.display());
    Agent::start(
        dir,
        pki,
        &controller.url(),
        node,
        AgentOpts { gpus: 2, config_toml: Some(config), ..Default::default() },
    )
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

#[test]
fn signed_commands_run_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let mut controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let _a = agent_with_key(dir.path(), &pki, &controller, "gpu-a");
    let _b = Agent::start(dir.path(), &pki, &url, "gpu-nokey", AgentOpts::default());
    wait_state(&pki, &url, "gpu-a", "up");
    wait_state(&pki, &url, "gpu-nokey", "up");

    let out = flotctl(&pki, &url, &["exec", "gpu-a", "noop", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["noop"], true);

    // The seed's pre-start checks, on a model directory that is complete.
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), r#"{"architectures":["LlamaForCausalLM"]}"#).unwrap();
    std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
    let model_arg = format!("model_path={}", model.display());
    let out = flotctl(
        &pki,
        &url,
        &["exec", "gpu-a", "prestart-check", "--arg", &model_arg, "--arg", "min_free_bytes=1", "-o", "json"],
    );
    let v = json(&out);
    assert_eq!(v["ok"], true, "{v}");
    let names: Vec<&str> = v["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in ["gpu_visible", "disk_space", "model_files", "runtime_reachable"] {
        assert!(names.contains(&want), "{want} missing: {names:?}");
    }
    assert!(v["checks"].as_array().unwrap().iter().all(|c| c["ok"].is_boolean() && c["detail"].is_string()));
    assert!(out.status.success());

    // A broken config.json fails the check, with the reason, and flotctl exits 1.
    std::fs::write(model.join("config.json"), "{not json").unwrap();
    let out = flotctl(&pki, &url, &["exec", "gpu-a", "prestart-check", "--arg", &model_arg, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["ok"], false);
    let model_check = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "model_files").unwrap();
    assert_eq!(model_check["ok"], false);
    assert!(model_check["detail"].as_str().unwrap().contains("config.json"));

    // An agent that has not pinned the controller's key runs nothing.
    let out = flotctl(&pki, &url, &["exec", "gpu-nokey", "noop", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["status"], "refused");
    assert!(v["detail"].as_str().unwrap().contains("no controller command key"), "{v}");

    // Bad commands are refused before anything is signed.
    let out = flotctl(&pki, &url, &["exec", "gpu-a", "reboot"]);
    assert_eq!(out.status.code(), Some(64));
    let out = flotctl(&pki, &url, &["exec", "gpu-a", "logs"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("container"));

    // Fan-out by label: the two agents carry the default labels of the harness (none), so select by hostname-free label.
    let out = flotctl(&pki, &url, &["exec", "noop", "--selector", "nope=x"]);
    assert_eq!(out.status.code(), Some(64));

    // The audit log has every command, issued and answered, with the operator's identity.
    let out = flotctl(&pki, &url, &["audit", "ls", "-o", "json"]);
    let records = json(&out);
    let records = records.as_array().unwrap();
    let issued = records.iter().filter(|r| r["action"] == "command.issue").count();
    let answered = records.iter().filter(|r| r["action"] == "command.result").count();
    assert_eq!(issued, 4, "{records:?}");
    assert_eq!(answered, 4);
    assert!(records.iter().all(|r| r["actor"] == "operator admin (admin)"));
    let out = flotctl(&pki, &url, &["audit", "verify"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact: 8 records"));

    // Someone edits a record in the store directly: verify names it.
    assert!(controller.proc.terminate().success());
    {
        let db = flotilla_controller::store::sled_config(&controller.data_dir.join("store"), Default::default())
            .open()
            .unwrap();
        let audit = db.open_tree("audit").unwrap();
        let key = 3u64.to_be_bytes();
        let raw = audit.get(key).unwrap().unwrap();
        let mut record: flotilla_controller::audit::AuditRecord = postcard::from_bytes(&raw[1..]).unwrap();
        record.entry.target = "somewhere-else".into();
        let mut bytes = vec![raw[0]];
        bytes.extend(postcard::to_stdvec(&record).unwrap());
        audit.insert(key, bytes).unwrap();
        db.flush().unwrap();
    }
    controller.restart();
    let out = flotctl(&pki, &url, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken at record 3"), "{err}");
}

/// `flotctl exec --selector` over more nodes at once than the controller's
/// per-client rate limit lets through: the refused calls (refused before they
/// run, with `grpc-retry-pushback-ms`) are made again after the pushback, so
/// every node runs the command exactly once and the fan-out succeeds.
#[test]
fn a_fan_out_over_the_rate_limit_waits_its_turn_and_runs_everywhere() {
    use flotilla_common::Role;

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let config = "[limits]\nrequests_per_second_per_client = 2.0\nburst_per_client = 3\n";
    let controller = Controller::start_configured(dir.path(), &pki, config);
    let url = controller.url();
    let key = controller.data_dir.join("command-signing.pub");
    let nodes: Vec<String> = (0..8).map(|i| format!("gpu-{i}")).collect();
    let _agents: Vec<Agent> = nodes
        .iter()
        .map(|node| {
            let config = format!("command_key = \"{}\"\n[labels]\nrack = \"r7\"\n", key.display());
            let opts = AgentOpts { config_toml: Some(config), ..Default::default() };
            Agent::start(dir.path(), &pki, &url, node, opts)
        })
        .collect();
    for node in &nodes {
        wait_state(&pki, &url, node, "up");
    }

    // A fresh identity, so that its bucket is full: three calls pass, five are pushed back.
    let ops = pki.operator("fanout", Role::Operator);
    let out = flotilla_tests::flotctl_as(
        &pki.ca(),
        &ops,
        &url,
        &["exec", "noop", "--selector", "rack=r7", "--batch", "8", "-o", "json"],
    );
    assert!(out.status.success(), "{out:?}");
    let results = json(&out);
    let mut ran: Vec<&str> = results["results"]
        .as_array()
        .unwrap_or_else(|| panic!("{results}"))
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "succeeded", "{r}");
            r["node"].as_str().unwrap()
        })
        .collect();
    ran.sort_unstable();
    assert_eq!(ran, nodes.iter().map(String::as_str).collect::<Vec<_>>());
    controller.proc.wait_for_log("client over its request rate");

    // Each node ran it once: one issue per node in the audit log.
    let audit = json(&flotctl(&pki, &url, &["audit", "ls", "-o", "json"]));
    let issued = audit.as_array().unwrap().iter().filter(|r| r["action"] == "command.issue").count();
    assert_eq!(issued, nodes.len(), "{audit}");
}
