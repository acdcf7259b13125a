//! Backup and restore end to end: a controller with nodes, a firing alert, a
//! deployment rolled out through a real nginx gateway onto the real Docker
//! engine, a join token and an audit log is backed up with `flotctl backup
//! create` while it runs; the file restores (`flotilla-controller restore`)
//! into an empty data dir, and a fresh controller on it lists the same nodes,
//! alerts, deployment, rollout and tokens, keeps the command-signing key the
//! agents pin, and `audit verify` passes. A damaged copy is refused.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use flotilla_tests::nginx::Nginx;
use flotilla_tests::{
    Agent, AgentOpts, ContainerCleanup, Controller, Pki, eventually, eventually_within, flotctl, free_port, json,
    standin_image, wait_state,
};

const RULES: &str = "groups:\n  - name: backup-test\n    rules:\n      - alert: BackupProbe\n        \
                     expr: flotilla_gpu_temperature_celsius > 0\n        labels: { severity: info }\n";

fn restore(file: &std::path::Path, data_dir: &std::path::Path) -> std::process::Output {
    Command::new(flotilla_tests::bin("flotilla-controller"))
        .arg("restore")
        .arg(file)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap()
}

/// The listed values of `field` in a JSON array, sorted.
fn field(list: &serde_json::Value, field: &str) -> Vec<String> {
    let mut v: Vec<String> =
        list.as_array().unwrap().iter().map(|x| x[field].as_str().unwrap_or_default().to_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_backup_restores_into_a_fresh_controller_with_everything_and_an_intact_audit_chain() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let rules = dir.path().join("rules.yml");
    std::fs::write(&rules, RULES).unwrap();
    // The CA key lets the controller make join tokens.
    let config = format!(
        "enroll_listen = \"127.0.0.1:0\"\n[tls]\nca_key = \"{}\"\n[alerting]\nrules = \"{}\"\n",
        pki.dir.join("ca.key").display(),
        rules.display()
    );
    let mut controller = Controller::start_configured(dir.path(), &pki, &config);
    let url = controller.url();
    let nginx = Nginx::start(&dir.path().join("nginx"), free_port());
    let key = format!("command_key = \"{}\"\n", controller.data_dir.join("command-signing.pub").display());
    let gateway_toml = format!("{key}{}", nginx.agent_section(free_port()));
    let _gw = Agent::start(
        dir.path(),
        &pki,
        &url,
        "gw",
        AgentOpts { gpus: 0, interval: "1s", config_toml: Some(gateway_toml), ..Default::default() },
    );
    let prefix = format!("fb{:06x}", std::process::id() & 0xff_ffff);
    let gpu_toml = format!("{key}[runtime]\nrelist_interval = \"1s\"\nname_prefix = \"{prefix}-\"\n");
    let _gpu = Agent::start(
        dir.path(),
        &pki,
        &url,
        "gpu-a",
        AgentOpts { gpus: 1, interval: "1s", config_toml: Some(gpu_toml), ..Default::default() },
    );
    let _cleanup = ContainerCleanup::new([format!("{prefix}-chat-1")]);
    wait_state(&pki, &url, "gw", "up");
    wait_state(&pki, &url, "gpu-a", "up");

    // State worth keeping: a deployment rolled out, an alert firing, a token, audit records.
    let spec = dir.path().join("chat.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: chat\nmodel: {{ name: chat-model, revision: r1 }}\n\
             runtime:\n  image: {}\n  port: 8000\n  host_port: {}\n  gpus: 1\n  env: {{ STANDIN_MODEL: chat-model }}\n\
             placement: {{ nodes: [gpu-a], replicas: 1 }}\ngateway: {{ node: gw, upstream: chat }}\n\
             strategy: {{ type: rolling, bake: 0s, min_healthy_time: 0s }}\n",
            standin_image(),
            free_port()
        ),
    )
    .unwrap();
    let applied = flotctl(&pki, &url, &["deploy", "apply", "-f", spec.to_str().unwrap()]);
    assert!(applied.status.success(), "{applied:?}");
    eventually_within(Duration::from_secs(120), "the rollout to succeed", |last| {
        let s = json(&flotctl(&pki, &url, &["rollout", "status", "chat", "-o", "json"]));
        *last = format!("{} {}", s["state"], s["error"]);
        assert_ne!(s["state"], "failed", "{s:#}");
        (s["state"] == "succeeded").then_some(())
    });
    eventually("the probe alert to fire", |last| {
        let alerts = json(&flotctl(&pki, &url, &["alerts", "ls", "-o", "json"]));
        *last = alerts.to_string();
        alerts.as_array().unwrap().iter().any(|a| a["name"] == "BackupProbe" && a["state"] == "firing").then_some(())
    });
    let token = flotctl(&pki, &url, &["token", "create", "--ttl", "1h", "--uses", "3"]);
    assert!(token.status.success(), "{token:?}");

    // Before: what a restore must give back.
    let nodes_before = field(&json(&flotctl(&pki, &url, &["nodes", "ls", "-o", "json"])), "id");
    let alerts_before = field(&json(&flotctl(&pki, &url, &["alerts", "ls", "-o", "json"])), "id");
    let tokens_before = field(&json(&flotctl(&pki, &url, &["token", "ls", "-o", "json"])), "id");
    let history_before = json(&flotctl(&pki, &url, &["deploy", "history", "chat", "-o", "json"]));

    // Backed up while everything runs.
    let file = dir.path().join("fleet.flotbak");
    let out = flotctl(&pki, &url, &["backup", "create", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("sha256"), "{out:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "it holds a private key");
    let again = flotctl(&pki, &url, &["backup", "create", file.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(64), "never over an existing file: {again:?}");
    let audit_before = json(&flotctl(&pki, &url, &["audit", "ls", "-o", "json"]));
    let backed_up_audit: Vec<&serde_json::Value> =
        audit_before.as_array().unwrap().iter().take_while(|r| r["action"] != "store.backup").collect();

    // A damaged copy is refused, and leaves nothing behind.
    let damaged = dir.path().join("damaged.flotbak");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&damaged, bytes).unwrap();
    let refused = restore(&damaged, &dir.path().join("scratch"));
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("checksum does not match") || err.contains("damaged"), "{err}");
    assert!(!dir.path().join("scratch/store").exists(), "nothing written from a bad file");
    // Nor over a live store.
    let over = restore(&file, &controller.data_dir);
    assert_eq!(over.status.code(), Some(1), "{over:?}");
    assert!(String::from_utf8_lossy(&over.stderr).contains("already holds a store"), "{over:?}");

    // The old controller is gone (the host died); restore onto a new one.
    controller.proc.kill9();
    let new_dir = dir.path().join("new");
    let restored = restore(&file, &new_dir.join("controller"));
    assert!(restored.status.success(), "{restored:?}");
    assert!(String::from_utf8_lossy(&restored.stdout).contains("restored"), "{restored:?}");
    let fresh = Controller::start_configured(&new_dir, &pki, &config);
    let url = fresh.url();
    assert_eq!(
        std::fs::read(fresh.data_dir.join("command-signing.pub")).unwrap(),
        std::fs::read(controller.data_dir.join("command-signing.pub")).unwrap(),
        "the key the agents pin came back"
    );

    let verify = flotctl(&pki, &url, &["audit", "verify"]);
    assert!(verify.status.success(), "{verify:?}");
    assert!(String::from_utf8_lossy(&verify.stdout).contains("audit log intact"), "{verify:?}");
    let audit_after = json(&flotctl(&pki, &url, &["audit", "ls", "-o", "json"]));
    let after: Vec<&serde_json::Value> = audit_after.as_array().unwrap().iter().take(backed_up_audit.len()).collect();
    assert_eq!(after, backed_up_audit, "the audit chain came back record for record");
    assert!(audit_after.as_array().unwrap().iter().any(|r| r["action"] == "store.backup"), "the backup is in it");

    assert_eq!(field(&json(&flotctl(&pki, &url, &["nodes", "ls", "-o", "json"])), "id"), nodes_before);
    assert_eq!(field(&json(&flotctl(&pki, &url, &["alerts", "ls", "-o", "json"])), "id"), alerts_before);
    assert_eq!(field(&json(&flotctl(&pki, &url, &["token", "ls", "-o", "json"])), "id"), tokens_before);
    let history_after = json(&flotctl(&pki, &url, &["deploy", "history", "chat", "-o", "json"]));
    assert_eq!(history_after, history_before, "the deployment's revisions and rollouts came back");
    let status = json(&flotctl(&pki, &url, &["rollout", "status", "chat", "-o", "json"]));
    assert_eq!(status["state"], "succeeded", "{status:#}");
    drop(nginx);
}
